"""Low-rank adapters (Compacter-style, as in MindPet) for :func:`mindpet.get_pet_model`: the config, and the tuner
that replaces a matched ``nn.Dense`` by a :class:`LowRankAdapterDense` (same weight and bias Parameters; an adapter
whose projections are products of two thin factors on its output).

Everything works as for :mod:`mindpet.tuners.adapter` (no merging; switching copies the six tensors; disabling
zeroes the up-projection's right factor and bias). Adapters with other bottlenecks (``reduction_factor``) or factor
sizes (``low_rank_size``) share a layer through zero-padding.
"""
import dataclasses
from typing import Optional

from mindspore import dtype as mstype
from mindspore.common.initializer import initializer

from mindpet.delta.low_rank_adapter import LowRankAdapterDense, check_low_rank_sizes
from mindpet.tuners.adapter import AdapterTuner, check_adapter_fields
from mindpet.tuners.base import adopt_dense_params, live_params, naming_layer
from mindpet.tuners.config import PetConfig, TARGETS_REQUIRED
from mindpet.tuners.registry import register_method
from mindpet.utils.validation import FieldTypeError, check_int, check_initializer

_PREFIX = 'adapter.mindpet_delta_low_rank_adapter_'


@dataclasses.dataclass
class LowRankAdapterConfig(PetConfig):
    """Low-rank adapter hyper-parameters for :func:`mindpet.get_pet_model`.

    Args:
        target_modules (list[str] | str): ``nn.Dense`` cells whose output gets an adapter, by regex full-match or
            name suffix.
        reduction_factor (int): bottleneck = ``out_channels // reduction_factor`` (<= each target's out_channels).
            Default 1.
        low_rank_size (int): inner size k of each factor pair. Default 1.
        low_rank_w_init (str): initializer name of the four factors. Default 'xavier_uniform'.
        non_linearity (str): the bottleneck activation. Default 'gelu'.
        compute_dtype (str | None): 'float32', 'float16' or 'bfloat16'; None (default) the base weight's dtype.
        exclude_modules, modules_to_save: see :class:`PetConfig`.

    Example:
        >>> cfg = LowRankAdapterConfig(target_modules=['out_proj'], reduction_factor=4, low_rank_size=2)
        >>> cfg.to_dict()['type']
        'low_rank_adapter'
    """
    reduction_factor: int = 1
    low_rank_size: int = 1
    low_rank_w_init: str = 'xavier_uniform'
    non_linearity: str = 'gelu'
    compute_dtype: Optional[str] = None
    targets_required = TARGETS_REQUIRED

    def validate(self):
        super().validate()
        owner = type(self).__name__
        check_int('reduction_factor', self.reduction_factor, owner)
        check_int('low_rank_size', self.low_rank_size, owner)
        if not isinstance(self.low_rank_w_init, str):     # (a config holds YAML-safe values only)
            raise FieldTypeError(f"For '{owner}', the 'low_rank_w_init' must be an initializer name (str), but got "
                                 f"{self.low_rank_w_init!r} ({type(self.low_rank_w_init).__name__}).",
                                 field='low_rank_w_init')
        check_initializer('low_rank_w_init', self.low_rank_w_init, owner, named_only=True)
        check_adapter_fields(self, owner)


class LowRankAdapterTuner(AdapterTuner):
    """Replaces ``nn.Dense`` layers by :class:`mindpet.delta.LowRankAdapterDense`; see :class:`AdapterTuner`."""
    layer_class = LowRankAdapterDense
    off_suffixes = (_PREFIX + 'up_right', _PREFIX + 'up_bias')
    size_fields = ('reduction_factor', 'low_rank_size')

    def create_layer(self, cell, config, key=None):
        layer = LowRankAdapterDense(cell.in_channels, cell.out_channels, weight_init='zeros', bias_init='zeros',
                                    has_bias=cell.has_bias, activation=cell.activation,
                                    reduction_factor=config.reduction_factor, low_rank_size=config.low_rank_size,
                                    low_rank_w_init=config.low_rank_w_init, non_linearity=config.non_linearity,
                                    compute_dtype=self.compute_dtype(cell, config))
        return adopt_dense_params(layer, cell)

    def check_reuse(self, key, layer, config):
        with naming_layer(key):
            check_low_rank_sizes(type(layer).__name__, 'out_channels', layer.out_channels, config.reduction_factor,
                                 config.low_rank_size)
        super().check_reuse(key, layer, config)

    def adapter_shapes(self, weight_shape, config):
        hidden = weight_shape[0]
        size, rank = hidden // config.reduction_factor, config.low_rank_size
        return {_PREFIX + 'down_left': (hidden, rank), _PREFIX + 'down_right': (rank, size),
                _PREFIX + 'down_bias': (size,), _PREFIX + 'up_left': (size, rank),
                _PREFIX + 'up_right': (rank, hidden), _PREFIX + 'up_bias': (hidden,)}

    def note_sizes(self, layer, config):
        live = live_params(layer)
        layer.adapter.bottleneck_size = live[_PREFIX + 'down_bias'].shape[0]
        layer.low_rank_size = layer.adapter.low_rank_size = live[_PREFIX + 'down_left'].shape[1]

    def init_adapter(self, layer, config):
        fresh = {}
        for suffix, shape in self.adapter_shapes(layer.weight.shape, config).items():
            init = 'zeros' if suffix.endswith('bias') else config.low_rank_w_init
            fresh[suffix] = initializer(init, list(shape), mstype.float32).init_data().asnumpy()
        return fresh


register_method('low_rank_adapter', LowRankAdapterConfig, LowRankAdapterTuner)
