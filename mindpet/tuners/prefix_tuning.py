"""Prefix tuning (Li & Liang, 2021) for :func:`mindpet.get_pet_model`: the config, and the tuner that gives every
matched attention block a trainable :class:`PrefixLayer`.

Targets are attention Cells of class :class:`mindpet.delta.PrefixAttention` built without a prefix (the shipped
Pangu-style attention; the base model is the network built with ``prefix=None``). Each is replaced by a
:class:`GatedPrefixAttention` holding the same projections (same Parameters and names) and a new ``PrefixLayer``
(``<block>.prefix.mindpet_delta_prefixtuning_*``). Attention written differently must be wired by the model's code
(``concat_prefix`` inside its ``construct``; see doc/prefix_tuning.md) and trained with ``freeze_delta``.

Switching copies the prefix tensors (the embedding and the reparametrisation MLP) when the adapters have the same
sizes; otherwise the next call recompiles by itself. Disabling sets the gate Parameter to 0, which masks the prefix
out: the block then computes its plain attention up to float32 rounding (the softmax runs over the extra, zero-
probability positions). Nothing can be merged: a prefix adds keys and values to the attention.
"""
import dataclasses
from typing import Optional

from mindspore import Tensor
from mindspore import dtype as mstype

from mindpet.delta.prefix_layer import PrefixAttention, PrefixLayer, GatedPrefixAttention
from mindpet.tuners.base import BaseTuner, fingerprint_param, live_params, write_exact
from mindpet.tuners.config import PetConfig
from mindpet.tuners.registry import register_method
from mindpet.utils.validation import check_int, check_rate

_PREFIX = 'prefix.mindpet_delta_prefixtuning_'


@dataclasses.dataclass
class PrefixTuningConfig(PetConfig):
    """Prefix-tuning hyper-parameters for :func:`mindpet.get_pet_model`.

    Args:
        target_modules (list[str] | str): the attention cells (``PrefixAttention`` without a prefix), by regex
            full-match or name suffix, e.g. ``['attention']``.
        num_virtual_tokens (int): prefix positions P per block, > 0. Default 20.
        embed_dim (int | None): size of the prefix embedding fed to the MLP; None (default) the block's hidden size.
        mid_dim (int): hidden size of the reparametrisation MLP. Default 512.
        prefix_dropout (float): dropout on the produced prefix while training, in [0, 1). Default 0.0. Fixed per
            block when the block is first adapted.
        exclude_modules, modules_to_save: see :class:`PetConfig`.

    Example:
        >>> cfg = PrefixTuningConfig(target_modules=['attention'], num_virtual_tokens=10, mid_dim=64)
        >>> cfg.to_dict()['type']
        'prefix_tuning'
    """
    num_virtual_tokens: int = 20
    embed_dim: Optional[int] = None
    mid_dim: int = 512
    prefix_dropout: float = 0.0
    targets_required = 'name the attention cells (a list of str)'

    def validate(self):
        super().validate()
        owner = type(self).__name__
        check_int('num_virtual_tokens', self.num_virtual_tokens, owner)
        if self.embed_dim is not None:
            check_int('embed_dim', self.embed_dim, owner)
        check_int('mid_dim', self.mid_dim, owner)
        if self.prefix_dropout == 0 and type(self.prefix_dropout) is int:  # pylint: disable=unidiomatic-typecheck
            self.prefix_dropout = 0.0    # YAML writes 'prefix_dropout: 0'
        check_rate('prefix_dropout', self.prefix_dropout, owner)

    def shapes(self, hidden):
        """``suffix -> shape`` of one block's prefix tensors for a block of width ``hidden``."""
        embed = self.embed_dim or hidden
        return {_PREFIX + 'embedding': (self.num_virtual_tokens, embed),
                _PREFIX + 'mlp_in_weight': (self.mid_dim, embed), _PREFIX + 'mlp_in_bias': (self.mid_dim,),
                _PREFIX + 'mlp_out_weight': (2 * hidden, self.mid_dim), _PREFIX + 'mlp_out_bias': (2 * hidden,)}


class PrefixTuningTuner(BaseTuner):
    """Replaces prefix-less ``PrefixAttention`` cells by ``GatedPrefixAttention`` with a new ``PrefixLayer``;
    switching and storing for it (no merging)."""
    layer_class = GatedPrefixAttention
    merge_refusal = ('a prefix adds keys and values to the attention, which no weight reproduces. Keep the '
                     'adapter for inference (unload() gives back the base network).')

    def is_target(self, cell):
        return type(cell) is PrefixAttention and cell.prefix is None  # pylint: disable=unidiomatic-typecheck

    @staticmethod
    def _prefix(attention, config):
        return PrefixLayer(config.num_virtual_tokens, 1, attention.num_heads, attention.hidden_size,
                           config.embed_dim or attention.hidden_size, config.mid_dim, config.prefix_dropout)

    def create_layer(self, cell, config, key=None):
        return GatedPrefixAttention.from_attention(cell, self._prefix(cell, config))

    def expected_shapes(self, key, fingerprint, config, source):
        return config.shapes(fingerprint_param(fingerprint, key, 'dense1.weight', source)[0])

    def read_live(self, layer, config):
        return {suffix: param.asnumpy().copy() for suffix, param in live_params(layer).items()}

    def write_live(self, layer, config, tensors):
        changed = write_exact(layer, tensors)
        prefix = layer.prefix
        prefix.prefix_token_num = config.num_virtual_tokens
        prefix.embed_dim = config.embed_dim or layer.hidden_size
        prefix.mid_dim = config.mid_dim
        return changed

    def init_adapter(self, layer, config):
        # A PrefixLayer's own initialisation (embedding N(0, 1), Kaiming-uniform MLP, zero biases).
        fresh = self._prefix(layer, config)
        return {'prefix.' + name: param.asnumpy().copy() for name, param in fresh.parameters_and_names()}

    def activate(self, layer, config):
        layer.mindpet_state_prefix_gate.set_data(Tensor(1.0, mstype.float32))
        return False

    def deactivate(self, layer):
        layer.mindpet_state_prefix_gate.set_data(Tensor(0.0, mstype.float32))
        return False

    def unload_layer(self, layer):
        return layer.to_attention()


register_method('prefix_tuning', PrefixTuningConfig, PrefixTuningTuner)
