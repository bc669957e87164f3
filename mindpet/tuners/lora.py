"""LoRA for :func:`mindpet.get_pet_model`: the config, and the tuner that injects :class:`LoRADense`, switches,
merges, stores and combines LoRA adapters.

Adapters of different ranks on one layer: the layer's live ``A``/``B`` Parameters are allocated at the largest
rank any loaded adapter needs there, and an adapter of rank ``r`` occupies the first ``r`` rows of ``A`` and
columns of ``B``, the rest being zero. The output is exactly the adapter's own (the zero rows/columns add exact
zeros), and training keeps them zero (their gradients are exactly zero while both padded blocks are zero), so an
adapter trained in a wider allocation keeps its rank. The scaling ``alpha / r`` of the active adapter is Parameter
data. Switching therefore copies only the adapter's tensors; loading an adapter of a larger rank than any before
grows the allocation, which makes the next call recompile (see :meth:`mindpet.PetModel.load_adapter`).
"""
import dataclasses
import math
import re
from typing import Optional, Union

import numpy as np
from mindspore import Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import initializer, HeUniform

from mindpet.delta.dora import DoRADense, DoraLayer
from mindpet.delta.lora import LoRADense, LoraLayer, lora_increment
from mindpet.tuners import dora
from mindpet.tuners.base import DenseLayerTuner
from mindpet.tuners.config import PetConfig, TARGETS_REQUIRED, check_compute_dtype
from mindpet.tuners.registry import register_method
from mindpet.utils.validation import check_int, check_real, check_rate, check_choice, check_bool

A_NAME = 'mindpet_delta_lora_a'
B_NAME = 'mindpet_delta_lora_b'
SCALING_NAME = 'mindpet_state_lora_scaling'
COMBINATION_TYPES = ('svd', 'cat')


@dataclasses.dataclass
class LoraConfig(PetConfig):
    """LoRA hyper-parameters for :func:`mindpet.get_pet_model`.

    Args:
        target_modules (list[str] | str): cells to adapt, by regex full-match or name suffix: ``nn.Dense``,
            ``mint.nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv2d``/``mint.nn.Conv2d``, ``nn.Embedding``/
            ``mint.nn.Embedding`` (DoRA: not embeddings).
        lora_rank (int): rank ``r`` > 0. Default 8.
        lora_alpha (int | float): non-zero; the increment is scaled by ``lora_alpha / lora_rank``. Default 16.
        lora_dropout (float): dropout on the LoRA branch input, in [0, 1). Default 0.0. Fixed per layer when the
            layer is first adapted (it only acts in training).
        compute_dtype (str | None): 'float32', 'float16' or 'bfloat16' for the layer's matmuls; None (default)
            computes in the base weight's dtype, so the adapted model equals the base model exactly at init.
        use_dora (bool): DoRA (:class:`mindpet.delta.dora.DoRADense`): a trainable per-row magnitude times the
            LoRA-updated direction. Default False. A layer keeps the variant of the first adapter that adapted it.
        dora_detach_norm (bool): DoRA only: True (default, as PEFT) treats the row norms as constants in the
            backward pass; False differentiates through them (the exact gradient). Same forward pass and merge.
        exclude_modules, modules_to_save: see :class:`PetConfig`.

    Example:
        >>> cfg = LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=8, lora_alpha=16)
        >>> cfg.to_dict()['type']
        'lora'
    """
    lora_rank: int = 8
    lora_alpha: Union[int, float] = 16
    lora_dropout: float = 0.0
    compute_dtype: Optional[str] = None
    use_dora: bool = False
    dora_detach_norm: bool = True
    targets_required = TARGETS_REQUIRED

    def validate(self):
        super().validate()
        owner = type(self).__name__
        check_int('lora_rank', self.lora_rank, owner)
        check_real('lora_alpha', self.lora_alpha, owner, nonzero=True)
        if self.lora_dropout == 0 and type(self.lora_dropout) is int:  # pylint: disable=unidiomatic-typecheck
            self.lora_dropout = 0.0    # YAML writes 'lora_dropout: 0'
        check_rate('lora_dropout', self.lora_dropout, owner)
        check_compute_dtype(owner, self.compute_dtype)
        check_bool('use_dora', self.use_dora, owner)
        check_bool('dora_detach_norm', self.dora_detach_norm, owner)

    @property
    def scaling(self):
        """``lora_alpha / lora_rank``."""
        return self.lora_alpha / self.lora_rank


class _PlainLora:
    """The per-layer hooks of plain LoRA (:class:`LoRADense`, :class:`LoraLayer`); :mod:`mindpet.tuners.dora`
    provides the same functions for DoRA. :class:`LoraTuner` picks one of the two in :meth:`LoraTuner.variant`."""

    @staticmethod
    def create_layer(cell, config, key):
        return DenseLayerTuner.build_delta(cell, key, LoRADense, LoraLayer, config.compute_dtype,
                                           lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                                           lora_dropout=config.lora_dropout)

    @staticmethod
    def adapter_shapes(weight_shape, config):
        out_channels, in_channels = weight_shape
        return {A_NAME: (config.lora_rank, in_channels), B_NAME: (out_channels, config.lora_rank)}

    @staticmethod
    def read_live(layer, config):
        rank = config.lora_rank
        return {A_NAME: layer.mindpet_delta_lora_a.asnumpy()[:rank].copy(),
                B_NAME: layer.mindpet_delta_lora_b.asnumpy()[:, :rank].copy()}

    @staticmethod
    def write_live(layer, config, tensors):
        lora_a, lora_b = tensors[A_NAME], tensors[B_NAME]
        rank, live = lora_a.shape[0], layer.mindpet_delta_lora_a.shape[0]
        width = max(rank, live)
        dtype = layer.mindpet_delta_lora_a.dtype
        padded_a = np.zeros((width, lora_a.shape[1]), lora_a.dtype)
        padded_a[:rank] = lora_a
        padded_b = np.zeros((lora_b.shape[0], width), lora_b.dtype)
        padded_b[:, :rank] = lora_b
        layer.mindpet_delta_lora_a.set_data(Tensor(padded_a, dtype))
        layer.mindpet_delta_lora_b.set_data(Tensor(padded_b, dtype))
        # The live width (A's rows) may now exceed any one adapter's rank; layer.lora_rank stays the active
        # adapter's rank (set by activate), so layer.scaling == layer.lora_alpha / layer.lora_rank always holds.
        return rank > live

    @staticmethod
    def init_adapter(layer, config):
        rank = config.lora_rank
        lora_a = initializer(HeUniform(negative_slope=math.sqrt(5)), [rank, layer.in_channels], mstype.float32)
        return {A_NAME: lora_a.init_data().asnumpy(),
                B_NAME: np.zeros((layer.out_channels, rank), np.float32)}

    @staticmethod
    def base_derived(layer, config, tensors):
        return {}

    @staticmethod
    def activate(layer, config):
        layer.lora_rank, layer.lora_alpha, layer.scaling = config.lora_rank, config.lora_alpha, config.scaling
        if not layer.merged:
            layer.mindpet_state_lora_scaling.set_data(Tensor(config.scaling, mstype.float32))
        return False

    @staticmethod
    def deactivate(layer):
        layer.mindpet_state_lora_scaling.set_data(Tensor(0.0, mstype.float32))
        return False

    @staticmethod
    def merge_weights(params, key, tensors, config):
        name = f'{key}.weight'
        weight = params[name]
        merged = weight.astype(np.float32) + lora_increment(tensors[A_NAME], tensors[B_NAME], config.scaling)
        return {name: merged.astype(weight.dtype)}


class LoraTuner(DenseLayerTuner):
    """Injects :class:`mindpet.delta.LoRADense` (or, with ``use_dora``, :class:`mindpet.delta.dora.DoRADense`) in
    place of ``nn.Dense`` layers (keeping their weight and bias Parameter objects), and
    :class:`~mindpet.delta.lora.LoraLayer` / :class:`~mindpet.delta.dora.DoraLayer` around the other layer types of
    :mod:`mindpet.delta.layer_kinds`; implements switching, merging, storing and combining for them.

    Every per-layer hook goes through :meth:`variant`: plain LoRA (:class:`_PlainLora`) or DoRA
    (:mod:`mindpet.tuners.dora`), chosen by the config (new layers) or by the layer (existing ones)."""
    layer_class = (LoRADense, DoRADense, LoraLayer, DoraLayer)
    adapts_layer_kinds = True

    @staticmethod
    def variant(use_dora):
        """The hooks of the plain LoRA (False) or DoRA (True) variant."""
        return dora if use_dora else _PlainLora

    def _of_layer(self, layer):
        return self.variant(dora.is_dora_layer(layer))

    def check_reuse(self, key, layer, config):
        if dora.is_dora_layer(layer) != config.use_dora:
            raise ValueError(f"For the 'lora' config with use_dora={config.use_dora}, the layer '{key}' was adapted "
                             f"as {type(layer).__name__} by an earlier adapter; one layer holds one variant "
                             f"(exclude it with 'exclude_modules', or adapt another model).")

    def create_layer(self, cell, config, key=None):
        return self.variant(config.use_dora).create_layer(cell, config, key)

    def adapter_shapes(self, weight_shape, config):
        return self.variant(config.use_dora).adapter_shapes(weight_shape, config)

    def read_live(self, layer, config):
        return self._of_layer(layer).read_live(layer, config)

    def write_live(self, layer, config, tensors):
        return self._of_layer(layer).write_live(layer, config, tensors)

    def init_adapter(self, layer, config):
        return self._of_layer(layer).init_adapter(layer, config)

    def base_derived(self, layer, config, tensors):
        return self._of_layer(layer).base_derived(layer, config, tensors)

    def activate(self, layer, config):
        return self._of_layer(layer).activate(layer, config)

    def deactivate(self, layer):
        return self._of_layer(layer).deactivate(layer)

    def sync_scaling(self, layer, config):
        layer.scaling = config.scaling

    def merge_weights(self, params, key, tensors, config):
        return self.variant(config.use_dora).merge_weights(params, key, tensors, config)

    def combine(self, adapters, weights, combination_type, rank):
        """``svd``: the weighted sum of the increments, re-factorised to ``rank`` (default: the largest input
        rank) by a truncated SVD -- exact when the sum has at most that rank (e.g. weights (1, 0)), otherwise
        its best rank-``rank`` approximation. ``cat``: exact, the factors stacked (rank = sum of the ranks).
        Both give ``lora_alpha = rank`` (scaling 1)."""
        check_choice('combination_type', combination_type, 'add_weighted_adapter', COMBINATION_TYPES)
        if any(config.use_dora for config, _ in adapters):
            raise NotImplementedError("For 'add_weighted_adapter', DoRA adapters cannot be combined: a DoRA layer "
                                      "divides by the row norms of its own direction, so increments do not add.")
        keys = []
        for _, tensors in adapters:
            keys += [key for key in tensors if key not in keys]
        if combination_type == 'cat':
            new_rank = sum(config.lora_rank for config, _ in adapters)
            if rank is not None and rank != new_rank:
                raise ValueError(f"For 'add_weighted_adapter', combination_type 'cat' gives rank {new_rank} (the "
                                 f"sum of the ranks), but 'rank' is {rank}.")
        else:
            new_rank = rank if rank is not None else max(config.lora_rank for config, _ in adapters)
        combined = {}
        for key in keys:
            stacked_a, stacked_b = self._stack(adapters, weights, key)
            if combination_type == 'cat':
                lora_a, lora_b = stacked_a, stacked_b
            else:
                lora_a, lora_b = _low_rank_factors(stacked_a, stacked_b, new_rank)
            combined[key] = {A_NAME: lora_a.astype(np.float32), B_NAME: lora_b.astype(np.float32)}
        first = adapters[0][0]
        config = first.replace(lora_rank=new_rank, lora_alpha=new_rank, target_modules=[re.escape(k) for k in keys],
                               exclude_modules=None, modules_to_save=None)
        return config, combined

    @staticmethod
    def _stack(adapters, weights, key):
        """A (sum r, in) and B (out, sum r) with ``B @ A = sum_i w_i s_i B_i A_i`` (zero blocks where an adapter
        does not cover ``key``)."""
        shape_a = shape_b = None
        for _, tensors in adapters:
            if key in tensors:
                shape_a, shape_b = tensors[key][A_NAME].shape, tensors[key][B_NAME].shape
                break
        blocks_a, blocks_b = [], []
        for (config, tensors), weight in zip(adapters, weights):
            if key in tensors:
                blocks_a.append(tensors[key][A_NAME].astype(np.float64))
                blocks_b.append(tensors[key][B_NAME].astype(np.float64) * (weight * config.scaling))
            else:
                blocks_a.append(np.zeros((config.lora_rank, shape_a[1])))
                blocks_b.append(np.zeros((shape_b[0], config.lora_rank)))
        return np.concatenate(blocks_a, axis=0), np.concatenate(blocks_b, axis=1)


def _low_rank_factors(stacked_a, stacked_b, rank):
    """Balanced rank-``rank`` factors ``A (rank, in)``, ``B (out, rank)`` of ``stacked_b @ stacked_a`` by a
    truncated SVD, computed through QR of the thin factors (never forming the full ``out x in`` matrix)."""
    q_b, r_b = np.linalg.qr(stacked_b)
    q_a, r_a = np.linalg.qr(stacked_a.T)
    u, s, vt = np.linalg.svd(r_b @ r_a.T)
    keep = min(rank, s.shape[0])
    root = np.sqrt(s[:keep])
    lora_b = np.zeros((stacked_b.shape[0], rank))
    lora_a = np.zeros((rank, stacked_a.shape[1]))
    lora_b[:, :keep] = (q_b @ u[:, :keep]) * root
    lora_a[:keep] = root[:, None] * (vt[:keep] @ q_a.T)
    return lora_a, lora_b


register_method('lora', LoraConfig, LoraTuner)
