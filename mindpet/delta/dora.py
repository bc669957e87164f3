"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024).

The adapted weight is split into a trainable magnitude ``m`` (one value per output row) and a direction that LoRA
updates::

    W' = W0 + s * B A,        s = lora_alpha / lora_rank
    W  = m * W' / ||W'||_row  (||.||_row: the L2 norm of each of the ``out`` rows of the (out, in) weight)
    h  = W x + b

``m`` (``mindpet_delta_dora_magnitude``, shape ``[out]``) starts at the row norms of ``W0`` and ``B`` at zero, so the
layer equals its base Dense at initialisation. ``A`` is ``mindpet_delta_dora_a`` ``[r, in]``, ``B`` is
``mindpet_delta_dora_b`` ``[out, r]``. Dropout (LoRA branch input only) gives
``h = m / ||W'||_row * (W0 x + s B A dropout(x)) + b``, which is the formula above when the rate is 0.

``dora_detach_norm`` chooses the gradient. True (the default, as Hugging Face PEFT and section 4.3 of the DoRA
paper): ``||W'||_row`` is treated as a constant in the backward pass, so no gradient flows through the norm to
``A`` and ``B`` and the backward pass keeps nothing of the ``(out, in)`` norm computation. False: the exact
gradient, differentiated through the norm. The forward pass (and so merging) is the same.
"""
import math

import numpy as np
from mindspore import nn, ops, Parameter, Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import HeUniform

from mindpet.delta.base import DeltaDense, host_f32, init_param, check_init_shape, check_rank_fits
from mindpet.delta.layer_kinds import DeltaLayer
from mindpet.delta.sharding import apply_dense_strategies
from mindpet.utils.validation import check_int, check_real, check_rate, check_bool, check_dtype


class _DoraWeights:
    """DoRA's host-side maths, shared by :class:`DoRADense` and :class:`DoraLayer`: the magnitude's initialisation,
    merging and unmerging on the ``(out, in)`` weight that the class gives through ``_view_f32()`` and
    ``_store_view(matrix)``; and the Parameters both hold (:meth:`_build_dora`, same names in both)."""

    @staticmethod
    def _check_dora_args(owner, lora_rank, lora_alpha, lora_dropout):
        """The checked ``(rank, alpha, dropout)`` of either Cell."""
        return (check_int('lora_rank', lora_rank, owner), check_real('lora_alpha', lora_alpha, owner, nonzero=True),
                check_rate('lora_dropout', lora_dropout, owner))

    @staticmethod
    def _check_dora_shapes(owner, rank, in_channels, out_channels, lora_a_init, lora_b_init):
        """The rank against the layer's sizes and the initializers against the factor shapes (before allocating)."""
        check_rank_fits(owner, rank, in_channels, out_channels)
        check_init_shape(owner, 'lora_a_init', lora_a_init, (rank, in_channels))
        check_init_shape(owner, 'lora_b_init', lora_b_init, (out_channels, rank))

    def _build_dora(self, rank, alpha, rate, lora_a_init, lora_b_init, param_init_type):
        """A ``[r, in]``, B ``[out, r]``, m ``[out]`` (set to the row norms of the base weight), the dropout and the
        run-time state, from checked arguments; ``in_channels``/``out_channels`` and the weight are in place."""
        self.lora_rank, self.lora_alpha, self.lora_dropout_rate = rank, alpha, rate
        self.lora_dropout = nn.Dropout(p=rate)
        self.use_lora_dropout = rate > 0
        self.mindpet_delta_dora_a = init_param(lora_a_init, (rank, self.in_channels), param_init_type,
                                               'mindpet_delta_dora_a')
        self.mindpet_delta_dora_b = init_param(lora_b_init, (self.out_channels, rank), param_init_type,
                                               'mindpet_delta_dora_b')
        self.mindpet_delta_dora_magnitude = init_param('zeros', (self.out_channels,), param_init_type,
                                                       'mindpet_delta_dora_magnitude')
        self.scaling = self.lora_alpha / self.lora_rank
        # Run-time state as Parameter data so merge()/unmerge() reach an already-compiled graph: the LoRA scaling
        # (0 once merged) and a gate choosing between "m / ||W'|| scaling" (1) and "plain merged weight" (0).
        self.mindpet_state_dora_scaling = Parameter(Tensor(self.scaling, mstype.float32),
                                                    name='mindpet_state_dora_scaling', requires_grad=False)
        self.mindpet_state_dora_gate = Parameter(Tensor(1.0, mstype.float32), name='mindpet_state_dora_gate',
                                                 requires_grad=False)
        self._merge_norm = None
        self.init_magnitude()

    def init_magnitude(self):
        """Set ``m`` to the row norms of the current direction ``W0 + s B A`` (the layer then equals that weight).

        Called by the constructor; call it again after replacing ``weight`` (e.g. with a pretrained Parameter).
        """
        norm = np.linalg.norm(self._direction_f32(), axis=1).astype(np.float32)
        self.mindpet_delta_dora_magnitude.set_data(Tensor(norm).astype(self.mindpet_delta_dora_magnitude.dtype))

    def _direction_f32(self):
        """``W0 + s B A`` (float32 numpy), with the scaling in effect (0 once merged)."""
        scaling = float(self.mindpet_state_dora_scaling.asnumpy())
        lora_b, lora_a = host_f32(self.mindpet_delta_dora_b), host_f32(self.mindpet_delta_dora_a)
        return self._view_f32() + np.float32(scaling) * (lora_b @ lora_a)

    def delta_weight(self):
        """``W - W0`` as float32 numpy ``(out, in)``: the change the adapter makes to the base weight."""
        if self.merged:
            raise RuntimeError(f"For '{type(self).__name__}', delta_weight() needs the unmerged base weight; call "
                               f"unmerge() first.")
        return self._merged_weight_f32() - self._view_f32()

    def _merged_weight_f32(self):
        return dora_weight(self._view_f32(), host_f32(self.mindpet_delta_dora_a),
                           host_f32(self.mindpet_delta_dora_b), host_f32(self.mindpet_delta_dora_magnitude),
                           self.scaling)

    def _merge_weights(self):
        magnitude = host_f32(self.mindpet_delta_dora_magnitude)
        if np.any(magnitude == 0):
            raise RuntimeError(f"For '{type(self).__name__}', a magnitude entry is exactly 0, so the merge could not "
                               f"be undone; use to_dense() (nn.Dense) or merge_and_unload() on a copy instead.")
        direction = self._direction_f32()
        norm = np.linalg.norm(direction, axis=1).astype(np.float32)
        # The norm is all unmerge() needs besides m, B and A to rebuild W0 (the merged rows have norm |m|).
        self._merge_norm = norm
        self._store_view(magnitude[:, None] / norm[:, None] * direction)
        self.mindpet_state_dora_scaling.set_data(Tensor(0.0, mstype.float32))
        self.mindpet_state_dora_gate.set_data(Tensor(0.0, mstype.float32))

    def _unmerge_weights(self):
        magnitude = host_f32(self.mindpet_delta_dora_magnitude)
        direction = self._view_f32() * (self._merge_norm / magnitude)[:, None]
        lora_b, lora_a = host_f32(self.mindpet_delta_dora_b), host_f32(self.mindpet_delta_dora_a)
        self._store_view(direction - np.float32(self.scaling) * (lora_b @ lora_a))
        self._merge_norm = None
        self.mindpet_state_dora_scaling.set_data(Tensor(self.scaling, mstype.float32))
        self.mindpet_state_dora_gate.set_data(Tensor(1.0, mstype.float32))


class DoRADense(_DoraWeights, DeltaDense):
    """A ``nn.Dense`` whose weight is re-parametrised as magnitude times (LoRA-updated) direction.

    Args:
        in_channels (int): input features.
        out_channels (int): output features.
        lora_rank (int): rank ``r`` of the direction update, in ``[1, min(in_channels, out_channels)]``.
        lora_alpha (int | float): non-zero; the update is scaled by ``lora_alpha / lora_rank``.
        lora_dropout (float): dropout rate in [0, 1) on the LoRA branch input. Default 0.
        dora_detach_norm (bool): True (default, as PEFT): the row norms ``||W'||_row`` are constants in the backward
            pass; False: the exact gradient through them. The forward pass is the same.
        lora_a_init: initializer (or Tensor ``[r, in]``) for A. Default Kaiming-uniform(a=sqrt 5).
        lora_b_init: initializer (or Tensor ``[out, r]``) for B. Default 'zeros'.
        param_init_type (mindspore.dtype): dtype of A, B and m. Default float32.
        compute_dtype (mindspore.dtype): dtype of the input-side matmuls. Default float16. The row norms are
            always computed in float32.
        **kwargs: ``nn.Dense`` keywords (``weight_init``, ``bias_init``, ``has_bias``, ``activation``, ``dtype``).

    Inputs:
        x (Tensor): shape ``(*, in_channels)``, at least 2 dimensions.

    Outputs:
        Tensor ``(*, out_channels)`` of the dtype of ``x``.

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindpet.delta.dora import DoRADense
        >>> layer = DoRADense(16, 8, lora_rank=4, lora_alpha=8, compute_dtype=ms.float32)
        >>> layer(ms.Tensor(np.ones((2, 5, 16), np.float32))).shape
        (2, 5, 8)
    """

    def __init__(self, in_channels, out_channels, lora_rank, lora_alpha, lora_dropout=0.,
                 lora_a_init=HeUniform(negative_slope=math.sqrt(5)), lora_b_init='zeros',
                 param_init_type=mstype.float32, compute_dtype=mstype.float16, dora_detach_norm=True, **kwargs):
        owner = type(self).__name__
        rank, alpha, rate = self._check_dora_args(owner, lora_rank, lora_alpha, lora_dropout)
        # A Python constant of the compiled graph: changing it afterwards needs a recompilation.
        self.dora_detach_norm = check_bool('dora_detach_norm', dora_detach_norm, owner)
        in_channels = check_int('in_channels', in_channels, owner)
        out_channels = check_int('out_channels', out_channels, owner)
        self._check_dora_shapes(owner, rank, in_channels, out_channels, lora_a_init, lora_b_init)
        super().__init__(in_channels, out_channels, param_init_type, compute_dtype, **kwargs)
        self._build_dora(rank, alpha, rate, lora_a_init, lora_b_init, param_init_type)
        self.lora_a_matmul = ops.MatMul(transpose_b=True)
        self.lora_b_matmul = ops.MatMul(transpose_b=True)
        self.delta_matmul = ops.MatMul()
        self.mul = ops.Mul()
        self.add = ops.Add()
        self.scale_mul = ops.Mul()

    def construct(self, x):
        ori_dtype = x.dtype
        x_shape = x.shape
        x = self._to_2d(x)
        scaling = self.mindpet_state_dora_scaling
        gate = self.mindpet_state_dora_gate
        lora_a = self.cast(self.mindpet_delta_dora_a, mstype.float32)
        lora_b = self.cast(self.mindpet_delta_dora_b, mstype.float32)
        direction = self.cast(self.weight, mstype.float32) + scaling * self.delta_matmul(lora_b, lora_a)
        norm = ops.sqrt(ops.reduce_sum(ops.square(direction), 1))
        if self.dora_detach_norm:
            norm = ops.stop_gradient(norm)
        magnitude = self.cast(self.mindpet_delta_dora_magnitude, mstype.float32)
        factor = gate * magnitude / norm + (1.0 - gate)

        out = self._base(x, self.weight)
        lora_x = x
        if self.use_lora_dropout:
            lora_x = self.lora_dropout(lora_x)
        lora_x = self.lora_a_matmul(lora_x, self.cast(self.mindpet_delta_dora_a, self.compute_dtype))
        lora_x = self.mul(lora_x, self.cast(scaling, self.compute_dtype))
        lora_x = self.lora_b_matmul(lora_x, self.cast(self.mindpet_delta_dora_b, self.compute_dtype))
        out = self.add(out, lora_x)
        out = self.scale_mul(out, self.cast(factor, self.compute_dtype))
        out = self._add_bias(out)
        return self._finish(out, x_shape, ori_dtype)

    # ----- merge / export (the maths is _DoraWeights'; these give it the (out, in) weight) ------------------------
    def _view_f32(self):
        return host_f32(self.weight)

    def _store_view(self, matrix):
        self._set_weight(matrix)

    def shard(self, strategy_org_dense_matmul=None, strategy_org_bias_add=None, strategy_lora_dropout=None,
              strategy_lora_a_matmul=None, strategy_lora_b_matmul=None, strategy_lora_mul=None,
              strategy_lora_add=None, strategy_dora_scale_mul=None, strategy_activation=None):
        """Semi-auto-parallel strategies for the input-side operators (LoRA's keywords plus
        ``strategy_dora_scale_mul=((dp, mp), (mp,))`` for the per-row ``m / ||W'||`` scaling). Weight-side
        operators (the norm) are left to the auto-parallel planner."""
        return apply_dense_strategies(type(self).__name__, self, [
            (self.matmul, 'strategy_org_dense_matmul', strategy_org_dense_matmul, (2, 2)),
            (self.lora_dropout.dropout, 'strategy_lora_dropout', strategy_lora_dropout, (2,)),
            (self.lora_a_matmul, 'strategy_lora_a_matmul', strategy_lora_a_matmul, (2, 2)),
            (self.lora_b_matmul, 'strategy_lora_b_matmul', strategy_lora_b_matmul, (2, 2)),
            (self.mul, 'strategy_lora_mul', strategy_lora_mul, (2, 0)),
            (self.add, 'strategy_lora_add', strategy_lora_add, (2, 2)),
            (self.scale_mul, 'strategy_dora_scale_mul', strategy_dora_scale_mul, (2, 1)),
        ], strategy_org_bias_add, strategy_activation)

    def extend_repr(self):
        return (super().extend_repr() + f', lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha}, '
                f'lora_dropout={self.lora_dropout_rate}, dora_detach_norm={self.dora_detach_norm}, '
                f'merged={self.merged}')


def dora_weight(weight, lora_a, lora_b, magnitude, scaling):
    """The plain weight a DoRA layer computes with, ``m * W' / ||W'||_row`` with ``W' = W0 + s B A`` (float32 numpy).

    Args:
        weight (numpy.ndarray): ``W0`` ``(out, in)``.
        lora_a (numpy.ndarray): ``A`` ``(r, in)``.
        lora_b (numpy.ndarray): ``B`` ``(out, r)``.
        magnitude (numpy.ndarray): ``m`` ``(out,)``.
        scaling (float): ``s = lora_alpha / lora_rank``.

    Example:
        >>> import numpy as np
        >>> w = np.array([[3., 4.]], np.float32)
        >>> dora_weight(w, np.zeros((1, 2)), np.zeros((1, 1)), np.array([10.]), 2.0)
        array([[6., 8.]], dtype=float32)
    """
    direction = weight.astype(np.float32) + np.float32(scaling) * (
        lora_b.astype(np.float32) @ lora_a.astype(np.float32))
    norm = np.linalg.norm(direction, axis=1)
    return (magnitude.astype(np.float32)[:, None] / norm[:, None] * direction).astype(np.float32)


class DoraLayer(_DoraWeights, DeltaLayer):
    """DoRA on a base layer of a :class:`~mindpet.delta.layer_kinds.LayerKind` (``mint.nn.Linear``, GPT-2
    ``Conv1D``, ``nn.Conv2d``/``mint.nn.Conv2d``; not embeddings). On the kind's canonical ``(out, in)`` view::

        W' = W0 + s B A,   h = m / ||W'||_row * (W0 x + s B A x) + b

    (for a convolution the row norm runs over ``C_in*kh*kw``, one magnitude per output channel, as PEFT). The
    base output comes from the base layer itself: ``h = base(x) + (f - 1)(base(x) - b) + f * s B A x`` with
    ``f = m / ||W'||_row``. Parameters and state are :class:`DoRADense`'s, so the LoRA tuner drives both.

    Args:
        base_layer (nn.Cell): the layer to adapt; it keeps its Parameter objects and names.
        kind (LayerKind): ``kind_of(base_layer)``.
        lora_rank, lora_alpha, lora_dropout, lora_a_init, lora_b_init, param_init_type, compute_dtype,
            dora_detach_norm: as :class:`DoRADense` (``compute_dtype`` default: the base weight's dtype).

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindspore import mint
        >>> from mindpet.delta.layer_kinds import kind_of
        >>> base = mint.nn.Linear(16, 8)
        >>> DoraLayer(base, kind_of(base), lora_rank=4, lora_alpha=8)(ms.Tensor(np.ones((2, 16), np.float32))).shape
        (2, 8)
    """

    def __init__(self, base_layer, kind, lora_rank, lora_alpha, lora_dropout=0.,
                 lora_a_init=HeUniform(negative_slope=math.sqrt(5)), lora_b_init='zeros',
                 param_init_type=mstype.float32, compute_dtype=None, dora_detach_norm=True):
        owner = type(self).__name__
        self.dora_detach_norm = check_bool('dora_detach_norm', dora_detach_norm, owner)
        if not kind.float_features_last:
            raise ValueError(f"For '{owner}', DoRA cannot adapt a {type(base_layer).__name__} (layer type "
                             f"'{kind.name}'); use LoRA there, or exclude it with 'exclude_modules'.")
        rank, alpha, rate = self._check_dora_args(owner, lora_rank, lora_alpha, lora_dropout)
        check_dtype('param_init_type', param_init_type, owner)
        if compute_dtype is None:
            compute_dtype = base_layer.weight.dtype
        check_dtype('compute_dtype', compute_dtype, owner)
        super().__init__(base_layer, kind, compute_dtype)
        self._check_dora_shapes(owner, rank, self.in_channels, self.out_channels, lora_a_init, lora_b_init)
        self._build_dora(rank, alpha, rate, lora_a_init, lora_b_init, param_init_type)

    def construct(self, x):
        out = self.base_layer(x)
        scaling = self.mindpet_state_dora_scaling
        gate = self.mindpet_state_dora_gate
        lora_a = self.cast(self.mindpet_delta_dora_a, mstype.float32)
        lora_b = self.cast(self.mindpet_delta_dora_b, mstype.float32)
        direction = self.branch.weight_view(self.cast(self.weight, mstype.float32)) + scaling * ops.matmul(lora_b,
                                                                                                          lora_a)
        norm = ops.sqrt(ops.reduce_sum(ops.square(direction), 1))
        if self.dora_detach_norm:
            norm = ops.stop_gradient(norm)
        magnitude = self.cast(self.mindpet_delta_dora_magnitude, mstype.float32)
        factor = self.branch.per_out(self.cast(gate * magnitude / norm + (1.0 - gate), out.dtype))

        lora_x = self._branch_input(x)
        if self.use_lora_dropout:
            lora_x = self.lora_dropout(lora_x)
        lora_x = self.branch.down(lora_x, self.cast(self.mindpet_delta_dora_a, self.compute_dtype))
        lora_x = lora_x * self.cast(scaling, self.compute_dtype)
        lora_x = self.cast(self.branch.up(lora_x, self.cast(self.mindpet_delta_dora_b, self.compute_dtype)),
                           out.dtype)
        base_x = out
        if self.has_bias:
            base_x = out - self.branch.per_out(self.cast(self.bias, out.dtype))
        return out + (factor - 1.0) * base_x + factor * lora_x

    # ----- merge (the maths is _DoraWeights'; these give it the (out, in) view of the weight) ---------------------
    def _view_f32(self):
        return self.canonical_weight_f32()

    def _store_view(self, matrix):
        self._set_canonical_weight(matrix)

    def extend_repr(self):
        return (super().extend_repr() + f', lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha}, '
                f'lora_dropout={self.lora_dropout_rate}, dora_detach_norm={self.dora_detach_norm}')
