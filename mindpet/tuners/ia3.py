"""IA3 for :func:`mindpet.get_pet_model`: the config, and the tuner that injects :class:`IA3Dense`.

A layer matched by ``feedforward_modules`` scales its input (``h = W0 (l * x) + b``, the feed-forward block's
output projection); the other targets scale their output (``h = l * (W0 x + b)``, keys and values). ``l`` starts at
one, so the adapted model is the base model at init. Switching copies ``l`` and sets a gate Parameter (gate 0: the
layer is its base Dense); merging folds ``l`` into the weight (and bias), exactly up to float32 rounding.
"""
import dataclasses
from typing import List, Optional

import numpy as np
from mindspore import Tensor
from mindspore import dtype as mstype

from mindpet.delta.ia3 import IA3Dense, IA3Layer, ia3_weight, ia3_bias
from mindpet.tuners.base import DenseLayerTuner, fingerprint_param, write_exact
from mindpet.tuners.config import PetConfig, TARGETS_REQUIRED, check_patterns, check_compute_dtype
from mindpet.tuners.inject import matches_any
from mindpet.tuners.registry import register_method
from mindpet.utils.validation import FieldValueError

VECTOR_NAME = 'mindpet_delta_ia3_vector'


@dataclasses.dataclass
class IA3Config(PetConfig):
    """IA3 hyper-parameters for :func:`mindpet.get_pet_model`.

    Args:
        target_modules (list[str] | str): cells to rescale (regex full-match or name suffix), e.g. the key and
            value projections and the feed-forward output projection: ``nn.Dense``, ``mint.nn.Linear``, GPT-2
            ``Conv1D``, ``nn.Conv2d``/``mint.nn.Conv2d`` and embeddings (output scaling only).
        feedforward_modules (list[str] | str | None): the targets whose input is scaled (the feed-forward output
            projections); every pattern must match a target. Default None: every target scales its output.
        compute_dtype (str | None): 'float32', 'float16' or 'bfloat16' for the layer's matmul; None (default) the
            base weight's dtype (the adapted model then equals the base model exactly at init).
        exclude_modules, modules_to_save: see :class:`PetConfig`.

    Example:
        >>> cfg = IA3Config(target_modules=['k_proj', 'v_proj', 'fc_out'], feedforward_modules=['fc_out'])
        >>> cfg.to_dict()['type']
        'ia3'
    """
    feedforward_modules: Optional[List[str]] = None
    compute_dtype: Optional[str] = None
    targets_required = TARGETS_REQUIRED

    def validate(self):
        super().validate()
        owner = type(self).__name__
        self.feedforward_modules = check_patterns(owner, 'feedforward_modules', self.feedforward_modules)
        check_compute_dtype(owner, self.compute_dtype)

    def is_feedforward(self, key):
        """Whether layer ``key`` scales its input."""
        return matches_any(key, self.feedforward_modules)


class IA3Tuner(DenseLayerTuner):
    """Injects :class:`mindpet.delta.IA3Dense` in place of ``nn.Dense`` layers (keeping their weight and bias
    Parameter objects), and :class:`mindpet.delta.ia3.IA3Layer` around the other layer types of
    :mod:`mindpet.delta.layer_kinds` (feed-forward targets: linear-like layers only); switching, merging and
    storing for them."""
    layer_class = (IA3Dense, IA3Layer)
    adapts_layer_kinds = True

    def inject(self, model, config, layers):
        if config.feedforward_modules:
            names = [name for name, _ in model.cells_and_names()
                     if name and matches_any(name, config.target_modules)
                     and not matches_any(name, config.exclude_modules)]
            for pattern in config.feedforward_modules:
                if not any(matches_any(name, [pattern]) for name in names):
                    raise FieldValueError(f"For 'get_pet_model', the 'ia3' config's feedforward_modules pattern "
                                          f"{pattern!r} matches none of the target_modules' cells {names[:6]}.",
                                          field='feedforward_modules')
        return super().inject(model, config, layers)

    def check_reuse(self, key, layer, config):
        if layer.ia3_feedforward != config.is_feedforward(key):
            raise FieldValueError(f"For the 'ia3' config, the layer '{key}' was adapted with "
                                  f"ia3_feedforward={layer.ia3_feedforward} by an earlier adapter, but this config "
                                  f"makes it {config.is_feedforward(key)}; adapters sharing a layer must agree "
                                  f"('feedforward_modules').", field='feedforward_modules')

    def create_layer(self, cell, config, key=None):
        return self.build_delta(cell, key, IA3Dense, IA3Layer, config.compute_dtype,
                                ia3_feedforward=config.is_feedforward(key))

    def expected_shapes(self, key, fingerprint, config, source):
        out_channels, in_channels = fingerprint_param(fingerprint, key, 'weight', source)
        return {VECTOR_NAME: (in_channels if config.is_feedforward(key) else out_channels,)}

    def read_live(self, layer, config):
        return {VECTOR_NAME: layer.mindpet_delta_ia3_vector.asnumpy().copy()}

    def write_live(self, layer, config, tensors):
        return write_exact(layer, tensors)

    def init_adapter(self, layer, config):
        return {VECTOR_NAME: np.ones(layer.mindpet_delta_ia3_vector.shape, np.float32)}

    def activate(self, layer, config):
        if not layer.merged:
            layer.mindpet_state_ia3_gate.set_data(Tensor(1.0, mstype.float32))
        return False

    def deactivate(self, layer):
        layer.mindpet_state_ia3_gate.set_data(Tensor(0.0, mstype.float32))
        return False

    def merge_weights(self, params, key, tensors, config):
        name = f'{key}.weight'
        weight, vector, feedforward = params[name], tensors[VECTOR_NAME], config.is_feedforward(key)
        out = {name: ia3_weight(weight, vector, feedforward).astype(weight.dtype)}
        bias_name = f'{key}.bias'
        if bias_name in params and not feedforward:
            out[bias_name] = ia3_bias(params[bias_name], vector, feedforward).astype(params[bias_name].dtype)
        return out


register_method('ia3', IA3Config, IA3Tuner)
