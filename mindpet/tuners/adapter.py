"""Adapters (Houlsby et al., 2019) for :func:`mindpet.get_pet_model`: the config, and the tuner that replaces a
matched ``nn.Dense`` by an :class:`AdapterDense` (the same weight and bias Parameters, then a bottleneck adapter
``y + W_up f(W_down y + b_down) + b_up`` on its output).

An adapter is non-linear, so it cannot be folded into the weights: ``merge()``/``merge_and_unload()`` and
``mindpet merge`` raise ``NotImplementedError`` (keep the adapter for inference; ``unload()`` gives back the base
network). Switching copies the adapter's four tensors; disabling zeroes the live up-projection (weight and bias), so
the layer computes exactly its base Dense. Adapters of different bottleneck sizes share a layer: the live tensors are
allocated at the largest size and zero-padded (zero rows/columns contribute exact zeros).
"""
import dataclasses
from typing import Optional

import numpy as np
from mindspore import Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import initializer, Normal

from mindpet.delta.adapter import AdapterDense, ADAPTER_INIT_SIGMA
from mindpet.delta.sharding import make_activation
from mindpet.tuners.base import (BaseTuner, adopt_dense_params, plain_dense, read_corner, write_padded, live_params,
                                 naming_layer)
from mindpet.tuners.config import PetConfig, TARGETS_REQUIRED, check_compute_dtype, resolve_compute_dtype
from mindpet.tuners.registry import register_method
from mindpet.utils.validation import FieldValueError, check_int, check_allocation

_PREFIX = 'adapter.mindpet_delta_adapter_'


def check_adapter_fields(config, owner):
    """Checks shared by the adapter configs: non_linearity and compute_dtype known."""
    make_activation(owner, config.non_linearity)
    check_compute_dtype(owner, config.compute_dtype)


@dataclasses.dataclass
class AdapterConfig(PetConfig):
    """Adapter hyper-parameters for :func:`mindpet.get_pet_model`.

    Args:
        target_modules (list[str] | str): ``nn.Dense`` cells whose output gets an adapter (e.g. each block's
            attention output and feed-forward output projections), by regex full-match or name suffix.
        bottleneck_size (int): the adapter's inner size m > 0. Default 64.
        non_linearity (str): the bottleneck activation, a ``mindspore.nn.get_activation`` name. Default 'gelu'.
        compute_dtype (str | None): 'float32', 'float16' or 'bfloat16' for the layer's matmuls; None (default) the
            base weight's dtype.
        exclude_modules, modules_to_save: see :class:`PetConfig`.

    Example:
        >>> cfg = AdapterConfig(target_modules=['out_proj', 'fc_out'], bottleneck_size=16)
        >>> cfg.to_dict()['type']
        'adapter'
    """
    bottleneck_size: int = 64
    non_linearity: str = 'gelu'
    compute_dtype: Optional[str] = None
    targets_required = TARGETS_REQUIRED

    def validate(self):
        super().validate()
        owner = type(self).__name__
        check_int('bottleneck_size', self.bottleneck_size, owner)
        check_adapter_fields(self, owner)


class AdapterTuner(BaseTuner):
    """Replaces ``nn.Dense`` layers by :class:`mindpet.delta.AdapterDense` holding their weight and bias
    Parameters; switching and storing for it (no merging: the adapter is non-linear)."""
    layer_class = AdapterDense
    #: the delta tensors zeroed to switch a layer's adapter off (the up-projection)
    off_suffixes = (_PREFIX + 'up_weight', _PREFIX + 'up_bias')
    #: the config fields that set the adapter's tensor sizes (named when they are too large)
    size_fields = ('bottleneck_size',)
    merge_refusal = ('its bottleneck is non-linear, so no single weight reproduces it. Keep the adapter for '
                     'inference (unload() gives back the base network), or use LoRA/IA3/DoRA where a mergeable '
                     'delta is needed.')

    def check_reuse(self, key, layer, config):
        if layer.adapter.non_linearity_name != config.non_linearity:
            raise FieldValueError(f"For the '{self.method}' config with non_linearity={config.non_linearity!r}, the "
                                  f"layer '{key}' was adapted with {layer.adapter.non_linearity_name!r} by an earlier "
                                  f"adapter; adapters sharing a layer must agree.", field='non_linearity')
        # A larger adapter widens the layer's live tensors (zero-padded): refuse sizes beyond memory first.
        with naming_layer(key):
            fields = ' and '.join(map(repr, self.size_fields))
            for suffix, shape in self.adapter_shapes(layer.weight.shape, config).items():
                check_allocation(type(layer).__name__, f"the new adapter's {fields} (its '{suffix}')", shape, 4)

    @staticmethod
    def compute_dtype(cell, config):
        return resolve_compute_dtype(config.compute_dtype, cell.weight.dtype)

    def create_layer(self, cell, config, key=None):
        layer = AdapterDense(cell.in_channels, cell.out_channels, weight_init='zeros', bias_init='zeros',
                             has_bias=cell.has_bias, activation=cell.activation,
                             bottleneck_size=config.bottleneck_size, non_linearity=config.non_linearity,
                             compute_dtype=self.compute_dtype(cell, config))
        return adopt_dense_params(layer, cell)

    def adapter_shapes(self, weight_shape, config):
        hidden, size = weight_shape[0], config.bottleneck_size
        return {_PREFIX + 'down_weight': (size, hidden), _PREFIX + 'down_bias': (size,),
                _PREFIX + 'up_weight': (hidden, size), _PREFIX + 'up_bias': (hidden,)}

    def read_live(self, layer, config):
        return read_corner(layer, self.adapter_shapes(layer.weight.shape, config))

    def write_live(self, layer, config, tensors):
        grew = write_padded(layer, tensors)
        self.note_sizes(layer, config)
        return grew

    def note_sizes(self, layer, config):
        """Record the live bottleneck size on the layer (for its repr) after a write."""
        size = live_params(layer)[_PREFIX + 'down_bias'].shape[0]
        layer.bottleneck_size = layer.adapter.bottleneck_size = size

    def init_adapter(self, layer, config):
        # The Cell's own initialisation: Houlsby's near-identity, every delta parameter reached by the first step.
        fresh = {}
        for suffix, shape in self.adapter_shapes(layer.weight.shape, config).items():
            init = Normal(ADAPTER_INIT_SIGMA) if suffix.endswith('weight') else 'zeros'
            fresh[suffix] = initializer(init, list(shape), mstype.float32).init_data().asnumpy()
        return fresh

    def activate(self, layer, config):
        return False        # write_live has put the up-projection back

    def deactivate(self, layer):
        live = live_params(layer)
        for suffix in self.off_suffixes:
            param = live[suffix]
            param.set_data(Tensor(np.zeros(param.shape, np.float32), param.dtype))
        return False

    def unload_layer(self, layer):
        return plain_dense(layer)   # used by unload(): the base Dense, adapter discarded


register_method('adapter', AdapterConfig, AdapterTuner)
