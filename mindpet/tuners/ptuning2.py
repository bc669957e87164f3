"""P-Tuning v2 / deep prefix tuning for :func:`mindpet.get_pet_model`: the config, and the tuner that feeds a model's
``prefix_key_values`` argument from a trainable :class:`mindpet.delta.ptuning2.PrefixEncoder`.

Targets are Cells whose ``construct`` takes ``prefix_key_values`` (per-layer prefix keys/values, the MindFormers
P-Tuning v2 convention; e.g. the PanGu-alpha example's ``backbone``). Each is wrapped in a
:class:`PrefixKeyValueModel` that computes the prefixes from its encoder on every call; the wrapped model's
parameters keep their names, and the encoder's are ``<target>.prefix_encoder.mindpet_delta_ptuning2_*``.

With ``prefix_projection`` the prefix is produced by a two-layer tanh MLP from a smaller embedding (Li & Liang's
reparametrisation); without it the embedding is the prefix. Switching between adapters of the same sizes copies the
encoder tensors (same graph); disabling the adapter, or another prefix length, changes the graph, so the next call
recompiles by itself. Nothing can be merged: a prefix adds keys and values to every attention.
"""
import dataclasses

from mindpet.delta.ptuning2 import PrefixEncoder, PrefixKeyValueModel, prefix_argument_index
from mindpet.tuners.base import BaseTuner, live_params, switch_flag, write_exact
from mindpet.tuners.config import PetConfig
from mindpet.tuners.registry import register_method
from mindpet.utils.exceptions import AdapterConfigError
from mindpet.utils.validation import FieldValueError, check_int, check_bool, check_rate

_PREFIX = 'prefix_encoder.mindpet_delta_ptuning2_'


@dataclasses.dataclass
class PTuning2Config(PetConfig):
    """P-Tuning v2 hyper-parameters for :func:`mindpet.get_pet_model`.

    Args:
        target_modules (list[str] | str): the Cell(s) taking ``prefix_key_values`` (e.g. ``['backbone']``), by regex
            full-match or name suffix.
        num_layers (int): layers that receive a prefix (the length of ``prefix_key_values``).
        num_heads (int): key/value heads per layer.
        kv_channels (int): size of one head.
        num_virtual_tokens (int): prefix length P. Default 16.
        prefix_projection (bool): reparametrise through a two-layer tanh MLP. Default True.
        projection_dim (int): the MLP's hidden size. Default 128.
        prefix_dropout (float): dropout on the prefix while training, in [0, 1). Default 0.0.
        exclude_modules, modules_to_save: see :class:`PetConfig`.

    Example:
        >>> cfg = PTuning2Config(target_modules=['backbone'], num_layers=3, num_heads=4, kv_channels=16,
        ...                      num_virtual_tokens=8, projection_dim=64)
        >>> cfg.to_dict()['type'], cfg.shapes()['prefix_encoder.mindpet_delta_ptuning2_embedding']
        ('ptuning2', (8, 384))
    """
    num_layers: int = None
    num_heads: int = None
    kv_channels: int = None
    num_virtual_tokens: int = 16
    prefix_projection: bool = True
    projection_dim: int = 128
    prefix_dropout: float = 0.0
    targets_required = "name the Cell taking 'prefix_key_values' (a list of str)"

    def validate(self):
        super().validate()
        owner = type(self).__name__
        for name in ('num_layers', 'num_heads', 'kv_channels', 'num_virtual_tokens', 'projection_dim'):
            check_int(name, getattr(self, name), owner)
        check_bool('prefix_projection', self.prefix_projection, owner)
        if self.prefix_dropout == 0 and type(self.prefix_dropout) is int:  # pylint: disable=unidiomatic-typecheck
            self.prefix_dropout = 0.0    # YAML writes 'prefix_dropout: 0'
        check_rate('prefix_dropout', self.prefix_dropout, owner)

    def shapes(self):
        """``suffix -> shape`` of the encoder tensors of one adapted Cell."""
        embed = 2 * self.num_layers * self.num_heads * self.kv_channels
        shapes = {_PREFIX + 'embedding': (self.num_virtual_tokens, embed)}
        if self.prefix_projection:
            shapes.update({_PREFIX + 'dense_in_weight': (self.projection_dim, embed),
                           _PREFIX + 'dense_in_bias': (self.projection_dim,),
                           _PREFIX + 'dense_out_weight': (embed, self.projection_dim),
                           _PREFIX + 'dense_out_bias': (embed,)})
        return shapes

    def encoder(self):
        """A new :class:`PrefixEncoder` with these sizes (its own initialisation)."""
        return PrefixEncoder(self.num_virtual_tokens, self.num_layers, self.num_heads, self.kv_channels,
                             self.prefix_projection, self.projection_dim, self.prefix_dropout)


class PTuning2Tuner(BaseTuner):
    """Wraps Cells taking ``prefix_key_values`` in :class:`PrefixKeyValueModel`; switching and storing for it. The
    base class's merge hooks refuse: a prefix adds keys and values to every attention, which no weight reproduces."""
    layer_class = PrefixKeyValueModel

    def is_target(self, cell):
        return not isinstance(cell, PrefixKeyValueModel) and prefix_argument_index(cell) is not None

    def create_layer(self, cell, config, key=None):
        self._check_sizes(key, cell, config)
        return PrefixKeyValueModel(cell, config.encoder())

    def inject(self, model, config, layers):
        """The shared injection walk; then the wrapped Cells' parameters get their own names back (the walk names
        everything inside a new layer after the layer, which would insert the wrapper's attribute name)."""
        names = {id(param): param.name for param in model.get_parameters()}
        created = set(layers)
        targets, changed = super().inject(model, config, layers)
        for key in targets:
            if key in created:
                continue
            wrapper = layers[key]
            for param in wrapper.model.get_parameters():
                param.name = names[id(param)]
            for attr, param in wrapper.prefix_encoder.parameters_and_names():
                param.name = f'{key}.prefix_encoder.{attr}'
        return targets, changed

    @staticmethod
    def _check_sizes(key, cell, config):
        """Compare the config's layer/head sizes with what the target Cell declares, when it does."""
        for attr in ('num_layers', 'num_heads'):
            value = getattr(getattr(cell, 'config', None), attr, None)
            if isinstance(value, int) and value != getattr(config, attr):
                raise FieldValueError(f"For 'get_pet_model', the 'ptuning2' config's '{attr}' is "
                                      f"{getattr(config, attr)}, but '{key}' has {value}.", field=attr)

    def check_reuse(self, key, layer, config):
        encoder = layer.prefix_encoder
        for attr in ('num_layers', 'num_heads', 'kv_channels', 'prefix_projection'):
            if getattr(encoder, attr) != getattr(config, attr):
                raise FieldValueError(f"For 'ptuning2', '{key}' was adapted with {attr}={getattr(encoder, attr)}; an "
                                      f"adapter with {attr}={getattr(config, attr)} cannot share it.", field=attr)

    def expected_shapes(self, key, fingerprint, config, source):
        if not any(name.startswith(key + '.') for name in fingerprint):
            raise AdapterConfigError(f"The adapter in '{source}' adapts '{key}', but its base model has no "
                                     f"parameter under '{key}.'.")
        return config.shapes()

    def read_live(self, layer, config):
        return {suffix: param.asnumpy().copy() for suffix, param in live_params(layer).items()}

    def write_live(self, layer, config, tensors):
        changed = write_exact(layer, tensors)
        encoder = layer.prefix_encoder
        changed = changed or encoder.pre_seq_len != config.num_virtual_tokens
        encoder.pre_seq_len = config.num_virtual_tokens
        encoder.projection_dim = config.projection_dim
        return changed

    def init_adapter(self, layer, config):
        fresh = config.encoder()
        return {'prefix_encoder.' + name: param.asnumpy().copy() for name, param in fresh.parameters_and_names()}

    def activate(self, layer, config):
        return switch_flag(layer, 'prefix_enabled', True)

    def deactivate(self, layer):
        return switch_flag(layer, 'prefix_enabled', False)

    def unload_layer(self, layer):
        return layer.model


register_method('ptuning2', PTuning2Config, PTuning2Tuner)

__all__ = ['PTuning2Config', 'PTuning2Tuner']
