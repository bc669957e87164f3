"""DoRA for :func:`mindpet.get_pet_model`: ``LoraConfig(use_dora=True)`` (YAML ``type: lora``, ``use_dora: true``).

:class:`mindpet.tuners.lora.LoraTuner` injects :class:`mindpet.delta.dora.DoRADense` for such a config and calls
the per-layer functions of this module for DoRA layers. An adapter's tensors on one layer are ``A`` (``r x in``),
``B`` (``out x r``) and the magnitude ``m`` (``out``). As for LoRA, adapters of different ranks share one layer: the
live ``A``/``B`` are allocated at the largest rank and zero-padded (the zero rows/columns add exact zeros to
``W0 + s B A`` and so to its row norms).

Switching and disabling are Parameter data: the active adapter's ``A``, ``B``, ``m``, its scaling ``s`` and the DoRA
gate; disabling sets ``s`` and the gate to 0, so the layer computes ``W0 x + b``. Merging writes
``m * W' / ||W'||_row`` into the weight (exact up to float32 rounding; refused when an entry of ``m`` is 0, since
the merge could not be undone). DoRA adapters cannot be combined with ``add_weighted_adapter``.
"""
import math

import numpy as np
from mindspore import Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import initializer, HeUniform

from mindpet.delta.dora import DoRADense, DoraLayer, dora_weight
from mindpet.delta.layer_kinds import canonical_weight_f32
from mindpet.tuners.base import DenseLayerTuner, read_corner, write_padded

A_NAME = 'mindpet_delta_dora_a'
B_NAME = 'mindpet_delta_dora_b'
M_NAME = 'mindpet_delta_dora_magnitude'


def is_dora_layer(layer):
    """Whether ``layer`` is a DoRA delta Cell (of any layer type)."""
    return isinstance(layer, (DoRADense, DoraLayer))


def create_layer(cell, config, key):
    """A DoRADense (``nn.Dense``) or DoraLayer (other layer types) holding ``cell``'s weight/bias Parameters, its
    magnitude set to their row norms (the layer then equals ``cell``)."""
    layer = DenseLayerTuner.build_delta(cell, key, DoRADense, DoraLayer, config.compute_dtype,
                                        lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                                        lora_dropout=config.lora_dropout,
                                        dora_detach_norm=config.dora_detach_norm)
    layer.init_magnitude()
    return layer


def adapter_shapes(weight_shape, config):
    """``suffix -> shape`` of one DoRA layer's adapter tensors."""
    out_channels, in_channels = weight_shape
    return {A_NAME: (config.lora_rank, in_channels), B_NAME: (out_channels, config.lora_rank),
            M_NAME: (out_channels,)}


def read_live(layer, config):
    """The live tensors of ``layer`` cut to ``config``'s rank (copies)."""
    return read_corner(layer, adapter_shapes((layer.out_channels, layer.in_channels), config))


def write_live(layer, config, tensors):
    """Write an adapter's tensors (zero-padded to the live rank); True when the live rank grew."""
    return write_padded(layer, tensors)


def init_adapter(layer, config):
    """Fresh tensors: ``A`` Kaiming-uniform, ``B`` zero, ``m`` the row norms of the base weight.

    Raises:
        RuntimeError: the layer is merged (its weight is not the base weight then).
    """
    if layer.merged:
        raise RuntimeError("For 'add_adapter', a new DoRA adapter needs the base weight's row norms; call unmerge() "
                           "first.")
    rank = config.lora_rank
    lora_a = initializer(HeUniform(negative_slope=math.sqrt(5)), [rank, layer.in_channels], mstype.float32)
    weight = canonical_weight_f32(layer)
    return {A_NAME: lora_a.init_data().asnumpy(), B_NAME: np.zeros((layer.out_channels, rank), np.float32),
            M_NAME: np.linalg.norm(weight, axis=1).astype(np.float32)}


def base_derived(layer, config, tensors):
    """``m`` recomputed from the layer's current base weight: the row norms of ``W0 + s B A`` (``A``, ``B`` from
    ``tensors``), PEFT's initialisation, which is the row norms of ``W0`` for an untrained adapter (``B = 0``).

    Raises:
        RuntimeError: the layer is merged (its weight is not the base weight then).
    """
    if layer.merged:
        raise RuntimeError("For 'reinit_from_base', DoRA's magnitude needs the base weight's row norms; call "
                           "unmerge() first.")
    weight = canonical_weight_f32(layer)
    lora_a = np.asarray(tensors[A_NAME], np.float32)
    lora_b = np.asarray(tensors[B_NAME], np.float32)
    adapted = weight + config.scaling * (lora_b @ lora_a)
    return {M_NAME: np.linalg.norm(adapted, axis=1).astype(np.float32)}


def activate(layer, config):
    """Scaling ``s`` and gate 1 (unless merged: the merged weight already holds the adapter). Returns True (the
    caller recompiles) when the adapter's ``dora_detach_norm`` differs from the layer's: it is a graph constant."""
    layer.lora_rank, layer.lora_alpha, layer.scaling = config.lora_rank, config.lora_alpha, config.scaling
    if not layer.merged:
        layer.mindpet_state_dora_scaling.set_data(Tensor(config.scaling, mstype.float32))
        layer.mindpet_state_dora_gate.set_data(Tensor(1.0, mstype.float32))
    regraph = layer.dora_detach_norm != config.dora_detach_norm
    layer.dora_detach_norm = config.dora_detach_norm
    return regraph


def deactivate(layer):
    """Scaling and gate 0: the layer computes ``W0 x + b``."""
    layer.mindpet_state_dora_scaling.set_data(Tensor(0.0, mstype.float32))
    layer.mindpet_state_dora_gate.set_data(Tensor(0.0, mstype.float32))
    return False


def merge_weights(params, key, tensors, config):
    """``{<key>.weight: m * W' / ||W'||_row}`` for ``mindpet merge``."""
    name = f'{key}.weight'
    weight = params[name]
    merged = dora_weight(weight, tensors[A_NAME], tensors[B_NAME], tensors[M_NAME], config.scaling)
    return {name: merged.astype(weight.dtype)}
