"""LoRA for :func:`mindpet.get_pet_model`: the config, and the tuner that injects :class:`LoRADense`, switches,
merges, stores and combines LoRA adapters.

Adapters of different ranks on one layer: the layer's live ``A``/``B`` Parameters are allocated at the largest
rank any loaded adapter needs there, and an adapter of rank ``r`` occupies the first ``r`` rows of ``A`` and
columns of ``B``, the rest being zero. The output is exactly the adapter's own (the zero rows/columns add exact
zeros), and training keeps them zero (their gradients are exactly zero while both padded blocks are zero), so an
adapter trained in a wider allocation keeps its rank. The scaling ``alpha / r`` of the active adapter is Parameter
data. Switching therefore copies only the adapter's tensors; loading an adapter of a larger rank than any before
grows the allocation, which makes the next call recompile (see :meth:`mindpet.PetModel.load_adapter`).

Hugging Face PEFT's options (all saved in the adapter config and applied to merging, saving, loading and switching):

- ``use_rslora``: scaling ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
- ``rank_pattern`` / ``alpha_pattern``: per-layer rank and alpha by layer-name pattern (the first matching pattern
  wins; patterns match as ``target_modules`` do). Every hook works on the layer's own config
  (:meth:`LoraConfig.for_layer`).
- ``layers_to_transform`` (+ ``layers_pattern``): adapt only the layers with these block indices.
- ``init_lora_weights``: ``True`` (Kaiming-uniform ``A``, zero ``B``), ``'gaussian'``, ``'pissa'`` or ``'olora'``.
  PiSSA and OLoRA start ``B A`` from the base weight itself; while such an adapter is active the layer's base weight
  holds the residual ``W0 - s B0 A0`` (``A0``, ``B0`` the initial factors), so the layer computes ``W0`` at
  initialisation. The adapter stores ``A0`` and ``B0`` too (``mindpet_state_lora_init_a``/``_b``): that is what
  loading it onto the original base model, switching away from it (the base weight goes back to ``W0``, kept on the
  host) and ``mindpet merge`` (``W0 + s (B A - B0 A0)``) need. The saved adapter therefore always applies to the
  original base weights, as PEFT's converted PiSSA/OLoRA adapters do.
"""
import dataclasses
import math
import re
from typing import Dict, List, Optional, Union

import numpy as np
from mindspore import Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import initializer, HeUniform

from mindpet.delta.base import check_rank_fits
from mindpet.delta.dora import DoRADense, DoraLayer
from mindpet.delta.lora import LoRADense, LoraLayer, lora_increment, lora_init_factors, LORA_INITS
from mindpet.tuners import dora
from mindpet.tuners.base import DenseLayerTuner, naming_layer
from mindpet.tuners.config import PetConfig, TARGETS_REQUIRED, check_compute_dtype, check_regex
from mindpet.tuners.inject import name_matches
from mindpet.tuners.registry import register_method
from mindpet.utils.validation import (FieldTypeError, FieldValueError, check_int, check_real, check_rate, check_choice,
                                      check_bool, check_str_list)

A_NAME = 'mindpet_delta_lora_a'
B_NAME = 'mindpet_delta_lora_b'
# PiSSA / OLoRA: the initial factors, from which the base weight's residual is rebuilt (not trained).
INIT_A_NAME = 'mindpet_state_lora_init_a'
INIT_B_NAME = 'mindpet_state_lora_init_b'
RESIDUAL_INITS = ('pissa', 'olora')
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
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: Optional[Dict[str, int]] = None
    alpha_pattern: Optional[Dict[str, Union[int, float]]] = None
    layers_to_transform: Optional[List[int]] = None
    layers_pattern: Optional[List[str]] = None
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
        check_bool('use_rslora', self.use_rslora, owner)
        if self.init_lora_weights is not True and (isinstance(self.init_lora_weights, bool)
                                                   or self.init_lora_weights not in LORA_INITS):
            choices = [True] + list(LORA_INITS)
            exc = FieldValueError if isinstance(self.init_lora_weights, (bool, str)) else FieldTypeError
            raise exc(f"For '{owner}', the 'init_lora_weights' must be one of {choices}, but got "
                      f"{self.init_lora_weights!r} ({type(self.init_lora_weights).__name__}).",
                      field='init_lora_weights')
        if self.use_dora and self.init_lora_weights is not True:
            raise FieldValueError(f"For '{owner}', the 'init_lora_weights' must be True with use_dora=True, but got "
                                  f"{self.init_lora_weights!r}.", field='init_lora_weights')
        self.rank_pattern = _check_pattern_map(owner, 'rank_pattern', self.rank_pattern, integer=True)
        self.alpha_pattern = _check_pattern_map(owner, 'alpha_pattern', self.alpha_pattern, integer=False)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            if not isinstance(self.layers_to_transform, (list, tuple)) or not self.layers_to_transform:
                raise FieldTypeError(f"For '{owner}', the 'layers_to_transform' must be None, an int or a non-empty "
                                     f"list of ints, but got {self.layers_to_transform!r}.",
                                     field='layers_to_transform')
            self.layers_to_transform = [check_int(f'layers_to_transform[{i}]', v, owner, min_value=0)
                                        for i, v in enumerate(self.layers_to_transform)]
        if self.layers_pattern is not None:
            if self.layers_to_transform is None:
                raise FieldValueError(f"For '{owner}', the 'layers_pattern' ({self.layers_pattern!r}) only applies "
                                      f"with 'layers_to_transform', which is None.", field='layers_pattern')
            if isinstance(self.layers_pattern, str):
                self.layers_pattern = [self.layers_pattern]
            self.layers_pattern = check_str_list('layers_pattern', self.layers_pattern, owner, allow_none=False)

    @property
    def scaling(self):
        """``lora_alpha / lora_rank`` (``lora_alpha / sqrt(lora_rank)`` with ``use_rslora``)."""
        return self.lora_alpha / (math.sqrt(self.lora_rank) if self.use_rslora else self.lora_rank)

    def for_layer(self, key):
        """This config with the rank and alpha that ``rank_pattern`` / ``alpha_pattern`` give layer ``key`` (the
        config itself when neither applies).

        Example:
            >>> cfg = LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=8, rank_pattern={'v_proj': 2})
            >>> cfg.for_layer('blocks.0.attn.v_proj').lora_rank, cfg.for_layer('blocks.0.attn.q_proj').lora_rank
            (2, 8)
        """
        rank = _pattern_value(self.rank_pattern, key, self.lora_rank)
        alpha = _pattern_value(self.alpha_pattern, key, self.lora_alpha)
        if rank == self.lora_rank and alpha == self.lora_alpha:
            return self
        return dataclasses.replace(self, lora_rank=rank, lora_alpha=alpha, rank_pattern=None, alpha_pattern=None)

    def transforms(self, key):
        """Whether ``layers_to_transform`` lets layer ``key`` be adapted (True without it)."""
        if self.layers_to_transform is None:
            return True
        parts = key.split('.')
        for position, part in enumerate(parts):
            if part.isdigit() and (self.layers_pattern is None or
                                   (position > 0 and parts[position - 1] in self.layers_pattern)):
                return int(part) in self.layers_to_transform
        return False


def _check_pattern_map(owner, name, value, integer):
    """None or a mapping ``pattern -> positive int`` (rank) / ``non-zero number`` (alpha). Returns a plain dict."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FieldTypeError(f"For '{owner}', the '{name}' must be None or a mapping of layer-name pattern -> "
                             f"{'rank' if integer else 'alpha'}, but got {value!r} ({type(value).__name__}).",
                             field=name)
    for pattern, number in value.items():
        if not isinstance(pattern, str):
            raise FieldTypeError(f"For '{owner}', the '{name}' keys must be layer-name patterns (str), but got "
                                 f"{pattern!r}.", field=name)
        check_regex(owner, name, pattern)
        if integer:
            check_int(f'{name}[{pattern!r}]', number, owner)
        else:
            check_real(f'{name}[{pattern!r}]', number, owner, nonzero=True)
    return dict(value)


def _pattern_value(patterns, key, default):
    for pattern, value in (patterns or {}).items():
        if name_matches(key, pattern):
            return value
    return default




class _PlainLora:
    """The per-layer hooks of plain LoRA (:class:`LoRADense`, :class:`LoraLayer`); :mod:`mindpet.tuners.dora`
    provides the same functions for DoRA. :class:`LoraTuner` picks one of the two in :meth:`LoraTuner.variant`.
    ``config`` is the layer's own (:meth:`LoraConfig.for_layer`)."""

    @classmethod
    def create_layer(cls, cell, config, key):
        if config.init_lora_weights in RESIDUAL_INITS and type(cell).__name__ != 'Dense':
            raise FieldValueError(f"For the 'lora' config with init_lora_weights={config.init_lora_weights!r}, the "
                                  f"layer '{key}' is a {type(cell).__name__}; PiSSA/OLoRA adapt nn.Dense layers only.",
                                  field='init_lora_weights')
        layer = DenseLayerTuner.build_delta(cell, key, LoRADense, LoraLayer, config.compute_dtype,
                                            lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                                            lora_dropout=config.lora_dropout)
        if config.init_lora_weights is not True:
            # The first adapter's tensors are read back from the new layer: give it that adapter's initialisation.
            cls.write_live(layer, config, cls.init_adapter(layer, config))
        return layer

    @staticmethod
    def adapter_shapes(weight_shape, config):
        out_channels, in_channels = weight_shape
        shapes = {A_NAME: (config.lora_rank, in_channels), B_NAME: (out_channels, config.lora_rank)}
        if config.init_lora_weights in RESIDUAL_INITS:
            shapes.update({INIT_A_NAME: shapes[A_NAME], INIT_B_NAME: shapes[B_NAME]})
        return shapes

    @staticmethod
    def read_live(layer, config):
        rank = config.lora_rank
        tensors = {A_NAME: layer.mindpet_delta_lora_a.asnumpy()[:rank].copy(),
                   B_NAME: layer.mindpet_delta_lora_b.asnumpy()[:, :rank].copy()}
        if config.init_lora_weights in RESIDUAL_INITS:
            init_a, init_b = layer.lora_init_factors
            tensors.update({INIT_A_NAME: init_a.copy(), INIT_B_NAME: init_b.copy()})
        return tensors

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
        # PiSSA / OLoRA: the initial factors stay on the host with the live adapter (activate() derives the base
        # weight's residual from them; read_live() stores them with the adapter).
        layer.lora_init_factors = ((tensors[INIT_A_NAME], tensors[INIT_B_NAME]) if INIT_A_NAME in tensors
                                   else None)
        # The live width (A's rows) may now exceed any one adapter's rank; layer.lora_rank stays the active
        # adapter's rank, set by activate() together with its lora_alpha and scaling (config.scaling).
        return rank > live

    @staticmethod
    def init_adapter(layer, config):
        rank = config.lora_rank
        if config.init_lora_weights is True:
            lora_a = initializer(HeUniform(negative_slope=math.sqrt(5)), [rank, layer.in_channels], mstype.float32)
            return {A_NAME: lora_a.init_data().asnumpy(),
                    B_NAME: np.zeros((layer.out_channels, rank), np.float32)}
        weight = _base_weight(layer) if config.init_lora_weights in RESIDUAL_INITS else \
            np.zeros((layer.out_channels, layer.in_channels), np.float32)
        lora_a, lora_b = lora_init_factors(config.init_lora_weights, weight, rank, config.scaling)
        tensors = {A_NAME: lora_a, B_NAME: lora_b}
        if config.init_lora_weights in RESIDUAL_INITS:
            tensors.update({INIT_A_NAME: lora_a.copy(), INIT_B_NAME: lora_b.copy()})
        return tensors

    @classmethod
    def base_derived(cls, layer, config, tensors):
        if config.init_lora_weights not in RESIDUAL_INITS:
            return {}
        residual = getattr(layer, 'lora_residual', None)
        if residual is not None and not np.array_equal(layer.weight.asnumpy(), _residual_weight(layer, residual)):
            # New base weights were loaded over the residual: they are the base now.
            layer.lora_residual = layer.lora_base_weight = None
        return cls.init_adapter(layer, config)

    @staticmethod
    def activate(layer, config):
        layer.lora_rank, layer.lora_alpha, layer.scaling = config.lora_rank, config.lora_alpha, config.scaling
        if not layer.merged:
            layer.mindpet_state_lora_scaling.set_data(Tensor(config.scaling, mstype.float32))
            factors = getattr(layer, 'lora_init_factors', None)
            _set_residual(layer, None if factors is None else lora_increment(*factors, config.scaling))
        return False

    @staticmethod
    def deactivate(layer):
        layer.mindpet_state_lora_scaling.set_data(Tensor(0.0, mstype.float32))
        if not layer.merged:
            _set_residual(layer, None)
        return False

    @staticmethod
    def merge_weights(params, key, tensors, config):
        name = f'{key}.weight'
        weight = params[name]
        merged = weight.astype(np.float32) + lora_increment(tensors[A_NAME], tensors[B_NAME], config.scaling)
        if INIT_A_NAME in tensors:    # relative to the original base weight: W0 + s (B A - B0 A0)
            merged -= lora_increment(tensors[INIT_A_NAME], tensors[INIT_B_NAME], config.scaling)
        return {name: merged.astype(weight.dtype)}


class LoraTuner(DenseLayerTuner):
    """Injects :class:`mindpet.delta.LoRADense` (or, with ``use_dora``, :class:`mindpet.delta.dora.DoRADense`) in
    place of ``nn.Dense`` layers (keeping their weight and bias Parameter objects), and
    :class:`~mindpet.delta.lora.LoraLayer` / :class:`~mindpet.delta.dora.DoraLayer` around the other layer types of
    :mod:`mindpet.delta.layer_kinds`; implements switching, merging, storing and combining for them.

    Every per-layer hook goes through :meth:`variant`: plain LoRA (:class:`_PlainLora`) or DoRA
    (:mod:`mindpet.tuners.dora`), chosen by the config (new layers) or by the layer (existing ones), and receives
    the layer's own config (:meth:`LoraConfig.for_layer`: ``rank_pattern`` / ``alpha_pattern``)."""
    layer_class = (LoRADense, DoRADense, LoraLayer, DoraLayer)
    adapts_layer_kinds = True

    @staticmethod
    def variant(use_dora):
        """The hooks of the plain LoRA (False) or DoRA (True) variant."""
        return dora if use_dora else _PlainLora

    def _of_layer(self, layer):
        return self.variant(dora.is_dora_layer(layer))

    @staticmethod
    def _own(layer, config):
        # The layer key is recorded when the layer is created (create_layer below).
        return config.for_layer(layer.lora_layer_key)

    def match(self, model, config, layers):
        holders, matches = super().match(model, config, layers)
        kept = [match for match in matches if config.transforms(match[0])]
        if not kept:
            raise FieldValueError(f"For 'get_pet_model', the 'lora' config's layers_to_transform "
                                  f"{config.layers_to_transform} (layers_pattern {config.layers_pattern}) keeps none "
                                  f"of the {len(matches)} matched layers, e.g. {[key for key, _, _ in matches][:4]}.",
                                  field='layers_to_transform')
        return holders, kept

    def check_reuse(self, key, layer, config):
        if dora.is_dora_layer(layer) != config.use_dora:
            raise FieldValueError(f"For the 'lora' config with use_dora={config.use_dora}, the layer '{key}' was "
                                  f"adapted as {type(layer).__name__} by an earlier adapter; one layer holds one "
                                  f"variant (exclude it with 'exclude_modules', or adapt another model).",
                                  field='use_dora')
        with naming_layer(key):
            # The rank this adapter needs on this layer (rank_pattern may give it its own).
            check_rank_fits(type(layer).__name__, config.for_layer(key).lora_rank, layer.in_channels,
                            layer.out_channels)

    def create_layer(self, cell, config, key=None):
        layer = self.variant(config.use_dora).create_layer(cell, config.for_layer(key), key)
        layer.lora_layer_key = key
        return layer

    def expected_shapes(self, key, fingerprint, config, source):
        return super().expected_shapes(key, fingerprint, config.for_layer(key), source)

    def adapter_shapes(self, weight_shape, config):
        return self.variant(config.use_dora).adapter_shapes(weight_shape, config)

    def read_live(self, layer, config):
        return self._of_layer(layer).read_live(layer, self._own(layer, config))

    def write_live(self, layer, config, tensors):
        return self._of_layer(layer).write_live(layer, self._own(layer, config), tensors)

    def init_adapter(self, layer, config):
        return self._of_layer(layer).init_adapter(layer, self._own(layer, config))

    def base_derived(self, layer, config, tensors):
        return self._of_layer(layer).base_derived(layer, self._own(layer, config), tensors)

    def activate(self, layer, config):
        return self._of_layer(layer).activate(layer, self._own(layer, config))

    def deactivate(self, layer):
        return self._of_layer(layer).deactivate(layer)

    def sync_scaling(self, layer, config):
        layer.scaling = self._own(layer, config).scaling

    def merge_weights(self, params, key, tensors, config):
        config = config.for_layer(key)
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
        if any(config.init_lora_weights in RESIDUAL_INITS for config, _ in adapters):
            raise NotImplementedError("For 'add_weighted_adapter', PiSSA/OLoRA adapters cannot be combined: each "
                                      "replaces the base weight by its own residual.")
        keys = []
        for _, tensors in adapters:
            keys += [key for key in tensors if key not in keys]
        ranks = {key: sum(config.for_layer(key).lora_rank for config, _ in adapters) for key in keys}
        if combination_type == 'cat':
            new_rank = max(ranks.values())
            if rank is not None and set(ranks.values()) != {rank}:
                raise ValueError(f"For 'add_weighted_adapter', combination_type 'cat' gives rank {new_rank} (the "
                                 f"sum of the ranks), but 'rank' is {rank}.")
        else:
            new_rank = rank if rank is not None else max(config.for_layer(key).lora_rank
                                                         for config, _ in adapters for key in keys)
            ranks = dict.fromkeys(keys, new_rank)
        combined = {}
        for key in keys:
            stacked_a, stacked_b = self._stack(adapters, weights, key)
            if combination_type == 'cat':
                lora_a, lora_b = stacked_a, stacked_b
            else:
                lora_a, lora_b = _low_rank_factors(stacked_a, stacked_b, new_rank)
            combined[key] = {A_NAME: lora_a.astype(np.float32), B_NAME: lora_b.astype(np.float32)}
        # Scaling 1 on every layer: alpha = rank, per layer where the ranks differ (cat of patterned adapters).
        pattern = {re.escape(key): value for key, value in ranks.items() if value != new_rank} or None
        first = adapters[0][0]
        config = first.replace(lora_rank=new_rank, lora_alpha=new_rank, target_modules=[re.escape(k) for k in keys],
                               exclude_modules=None, modules_to_save=None, use_rslora=False, rank_pattern=pattern,
                               alpha_pattern=pattern, layers_to_transform=None, layers_pattern=None)
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
            config = config.for_layer(key)
            if key in tensors:
                blocks_a.append(tensors[key][A_NAME].astype(np.float64))
                blocks_b.append(tensors[key][B_NAME].astype(np.float64) * (weight * config.scaling))
            else:
                blocks_a.append(np.zeros((config.lora_rank, shape_a[1])))
                blocks_b.append(np.zeros((shape_b[0], config.lora_rank)))
        return np.concatenate(blocks_a, axis=0), np.concatenate(blocks_b, axis=1)


def _base_weight(layer):
    """The layer's base weight ``W0`` (float32 numpy), also while a PiSSA/OLoRA residual replaces it."""
    if getattr(layer, 'lora_residual', None) is not None:
        return layer.lora_base_weight.astype(np.float32)
    return layer.weight.asnumpy().astype(np.float32)


def _residual_weight(layer, residual):
    base = layer.lora_base_weight
    return (base.astype(np.float32) - residual).astype(base.dtype)


def _set_residual(layer, residual):
    """Make the base weight ``W0 - residual`` (``W0`` for None), ``W0`` kept on the host while replaced."""
    current = getattr(layer, 'lora_residual', None)
    if current is None and residual is None:
        return
    if current is None:
        layer.lora_base_weight = layer.weight.asnumpy().copy()
    if residual is None:
        layer.weight.set_data(Tensor(layer.lora_base_weight))
        layer.lora_base_weight = None
    else:
        layer.weight.set_data(Tensor(_residual_weight(layer, residual)))
    layer.lora_residual = residual


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
