"""LoRA: low-rank adaptation of a frozen ``nn.Dense`` (Hu et al., 2021).

    h = W0 x + b + (lora_alpha / lora_rank) * B A dropout(x)

``A`` (``mindpet_delta_lora_a``, shape ``[lora_rank, in_channels]``) starts Kaiming-uniform and ``B``
(``mindpet_delta_lora_b``, ``[out_channels, lora_rank]``) starts at zero, so the layer equals its base Dense at
initialisation. :meth:`LoRADense.merge` folds the increment into ``weight`` for zero-overhead inference and
:meth:`LoRADense.unmerge` takes it out again; both act on Parameter data, so they also take effect in a graph that
has already been compiled.
"""
import math

import numpy as np
from mindspore import nn, ops, Parameter, Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import initializer, HeUniform, Normal

from mindpet.delta.base import (DeltaDense, init_param, check_init_shape, check_dense_kwargs, check_rank_fits,
                                host_f32)
from mindpet.delta.layer_kinds import DeltaLayer
from mindpet.delta.sharding import apply_dense_strategies
from mindpet.utils.validation import check_int, check_real, check_rate, check_dtype


class LoRADense(DeltaDense):
    """A ``nn.Dense`` with a trainable low-rank increment (LoRA). A :class:`~mindpet.delta.base.DeltaDense`: merge,
    unmerge, ``to_dense`` and ``merged_weight`` are the shared ones, built on :meth:`delta_weight`.

    Args:
        in_channels (int): input features.
        out_channels (int): output features.
        lora_rank (int): rank ``r`` of the increment, in ``[1, min(in_channels, out_channels)]``.
        lora_alpha (int | float): non-zero; the increment is scaled by ``lora_alpha / lora_rank``.
        lora_dropout (float): dropout rate in [0, 1) applied to the LoRA branch's input only. Default 0.
        lora_a_init: initializer (name, Initializer or Tensor ``[r, in]``) for A. Default Kaiming-uniform(a=sqrt 5).
        lora_b_init: initializer for B (Tensor ``[out, r]`` allowed). Default 'zeros'.
        param_init_type (mindspore.dtype): dtype of A and B: float32, float16 or bfloat16. Default float32.
        compute_dtype (mindspore.dtype): dtype the matmuls run in. Default float16 (as MindPet).
        **kwargs: ``nn.Dense`` keywords: ``weight_init``, ``bias_init``, ``has_bias``, ``activation``, ``dtype``
            (dtype of the base weight and bias, default float32 so existing base checkpoints load unchanged).

    Inputs:
        x (Tensor): shape ``(*, in_channels)`` with at least 2 dimensions.

    Outputs:
        Tensor of shape ``(*, out_channels)`` and the dtype of ``x``.

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindpet.delta import LoRADense
        >>> layer = LoRADense(16, 8, lora_rank=4, lora_alpha=8, compute_dtype=ms.float32)
        >>> layer(ms.Tensor(np.ones((2, 5, 16), np.float32))).shape
        (2, 5, 8)
    """

    def __init__(self, in_channels, out_channels, lora_rank, lora_alpha, lora_dropout=0.,
                 lora_a_init=HeUniform(negative_slope=math.sqrt(5)), lora_b_init='zeros',
                 param_init_type=mstype.float32, compute_dtype=mstype.float16, **kwargs):
        owner = type(self).__name__
        # Every argument is checked before anything is built, in MindPet's order (the base checks follow in
        # DeltaDense.__init__, which repeats the two channel checks).
        in_channels = check_int('in_channels', in_channels, owner)
        out_channels = check_int('out_channels', out_channels, owner)
        lora_rank = check_int('lora_rank', lora_rank, owner)
        check_rank_fits(owner, lora_rank, in_channels, out_channels)
        lora_alpha = check_real('lora_alpha', lora_alpha, owner, nonzero=True)
        check_rate('lora_dropout', lora_dropout, owner)
        check_dtype('param_init_type', param_init_type, owner)
        check_dtype('compute_dtype', compute_dtype, owner)
        check_dense_kwargs(owner, kwargs)
        check_init_shape(owner, 'lora_a_init', lora_a_init, (lora_rank, in_channels))
        check_init_shape(owner, 'lora_b_init', lora_b_init, (out_channels, lora_rank))
        super().__init__(in_channels, out_channels, param_init_type=param_init_type, compute_dtype=compute_dtype,
                         **kwargs)
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha

        self.lora_dropout_rate = lora_dropout
        self.lora_dropout = nn.Dropout(p=lora_dropout)
        self.use_lora_dropout = lora_dropout > 0
        self.mindpet_delta_lora_a = init_param(lora_a_init, (lora_rank, in_channels), param_init_type,
                                               'mindpet_delta_lora_a')
        self.mindpet_delta_lora_b = init_param(lora_b_init, (out_channels, lora_rank), param_init_type,
                                               'mindpet_delta_lora_b')
        self.scaling = self.lora_alpha / self.lora_rank
        # The scaling is Parameter data, not a Python float, so merge()/unmerge() and adapter switching can change
        # it after the graph is compiled (a compiled graph ignores Python attribute changes).
        self.mindpet_state_lora_scaling = Parameter(Tensor(self.scaling, mstype.float32),
                                                    name='mindpet_state_lora_scaling', requires_grad=False)
        self.lora_a_matmul = ops.MatMul(transpose_b=True)
        self.lora_b_matmul = ops.MatMul(transpose_b=True)
        self.mul = ops.Mul()
        self.add = ops.Add()

    def construct(self, x):
        ori_dtype = x.dtype
        x_shape = x.shape
        if len(x_shape) < 2:
            raise ValueError(f"For 'LoRADense', the input must have at least 2 dimensions, but got {len(x_shape)}.")
        if len(x_shape) != 2:
            x = self.reshape(x, (-1, x_shape[-1]))
        x = self._to_compute(x)

        lora_x = x
        if self.use_lora_dropout:
            lora_x = self.lora_dropout(lora_x)
        lora_x = self.lora_a_matmul(lora_x, self._to_compute(self.mindpet_delta_lora_a))
        # Scaling the (N, r) intermediate costs r/out of scaling the (N, out) result.
        lora_x = self.mul(lora_x, self._to_compute(self.mindpet_state_lora_scaling))
        lora_x = self.lora_b_matmul(lora_x, self._to_compute(self.mindpet_delta_lora_b))
        out = self.matmul(x, self._to_compute(self.weight))
        if self.has_bias and self.compute_dtype == mstype.float32:
            # The bias goes onto the branch, so the frozen product meets branch and bias in one Add straight
            # after its MatMul: one pass over the (N, out) result fewer than bias_add(matmul) + add. Exact in
            # float32 only: in float16 the base Dense's MatMul+BiasAdd rounds once, so there the bias stays on the
            # main product and the layer equals its base Dense bit for bit at init.
            lora_x = self.bias_add(lora_x, self._to_compute(self.bias))
        elif self.has_bias:
            out = self.bias_add(out, self._to_compute(self.bias))
        out = self.add(out, lora_x)

        if self.activation_flag:
            out = self.activation(out)
        if len(x_shape) != 2:
            out = self.reshape(out, x_shape[:-1] + (self.out_channels,))
        if out.dtype != ori_dtype:
            out = self.cast(out, ori_dtype)
        return out

    # ----- merge / export ------------------------------------------------------------------------------------
    def delta_weight(self):
        """The increment ``(lora_alpha / lora_rank) * B @ A`` as a float32 numpy array of shape (out, in)."""
        return lora_increment(self.mindpet_delta_lora_a.asnumpy(), self.mindpet_delta_lora_b.asnumpy(),
                              self.scaling)

    def _merged_weight_f32(self):
        return host_f32(self.weight) + self.delta_weight()

    def _merge_weights(self):
        # The scaling Parameter set to 0 switches the branch off in an already-compiled graph.
        self._set_weight(self._merged_weight_f32())
        self.mindpet_state_lora_scaling.set_data(Tensor(0.0, mstype.float32))

    def _unmerge_weights(self):
        self._set_weight(host_f32(self.weight) - self.delta_weight())
        self.mindpet_state_lora_scaling.set_data(Tensor(self.scaling, mstype.float32))

    def shard(self, strategy_org_dense_matmul=None, strategy_org_bias_add=None, strategy_lora_dropout=None,
              strategy_lora_a_matmul=None, strategy_lora_b_matmul=None, strategy_lora_mul=None,
              strategy_lora_add=None, strategy_activation=None):
        """Set semi-auto-parallel strategies per operator (MindPet's keywords). Each is None (unsharded) or a
        tuple with one tuple per operator input, e.g. ``strategy_org_dense_matmul=((dp, 1), (mp, 1))``.

        ``strategy_lora_mul`` takes ``((dp, 1), ())``: the second input is the scalar scaling.
        """
        return apply_dense_strategies(type(self).__name__, self, [
            (self.matmul, 'strategy_org_dense_matmul', strategy_org_dense_matmul, (2, 2)),
            (self.lora_dropout.dropout, 'strategy_lora_dropout', strategy_lora_dropout, (2,)),
            (self.lora_a_matmul, 'strategy_lora_a_matmul', strategy_lora_a_matmul, (2, 2)),
            (self.lora_b_matmul, 'strategy_lora_b_matmul', strategy_lora_b_matmul, (2, 2)),
            (self.mul, 'strategy_lora_mul', strategy_lora_mul, (2, 0)),
            (self.add, 'strategy_lora_add', strategy_lora_add, (2, 2)),
        ], strategy_org_bias_add, strategy_activation)

    def extend_repr(self):
        return (super().extend_repr() + f', lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha}, '
                f'lora_dropout={self.lora_dropout_rate}, merged={self.merged}')


def lora_increment(lora_a, lora_b, scaling):
    """The weight increment ``scaling * B @ A`` (float32 numpy, shape ``(out, in)``) from numpy ``A`` ``(r, in)``
    and ``B`` ``(out, r)``. The one formula used by merging, unloading and ``mindpet merge``."""
    return np.float32(scaling) * (np.asarray(lora_b, np.float32) @ np.asarray(lora_a, np.float32))


class LoraLayer(DeltaLayer):
    """LoRA on a base layer of a :class:`~mindpet.delta.layer_kinds.LayerKind` (``mint.nn.Linear``, GPT-2
    ``Conv1D``, ``nn.Conv2d``/``mint.nn.Conv2d``, ``nn.Embedding``/``mint.nn.Embedding``): ``h = base(x) + s B A x``
    with ``A`` ``(r, in)`` and ``B`` ``(out, r)`` on the kind's canonical ``(out, in)`` view of the weight
    (``in = C_in*kh*kw`` for a convolution, whose ``A`` acts as a convolution with the base kernel geometry and
    ``B`` as a 1x1 convolution; ``in = num_embeddings`` for an embedding, whose ``A^T`` rows are looked up).

    The parameters and hooks are :class:`LoRADense`'s (``mindpet_delta_lora_a``/``_b``, the scaling Parameter),
    so the LoRA tuner drives both. Dropout acts on float inputs only (an embedding's ids are not dropped, as PEFT).

    Args:
        base_layer (nn.Cell): the layer to adapt; it keeps its Parameter objects and names.
        kind (LayerKind): ``kind_of(base_layer)``.
        lora_rank, lora_alpha, lora_dropout, lora_a_init, lora_b_init, param_init_type, compute_dtype: as
            :class:`LoRADense` (``compute_dtype`` default: the base weight's dtype).

    Inputs:
        x (Tensor): the base layer's input.

    Outputs:
        Tensor: the base layer's output plus the increment, in its dtype.

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindspore import mint
        >>> from mindpet.delta.layer_kinds import kind_of
        >>> base = mint.nn.Linear(16, 8)
        >>> layer = LoraLayer(base, kind_of(base), lora_rank=4, lora_alpha=8)
        >>> layer(ms.Tensor(np.ones((2, 16), np.float32))).shape
        (2, 8)
    """

    def __init__(self, base_layer, kind, lora_rank, lora_alpha, lora_dropout=0.,
                 lora_a_init=HeUniform(negative_slope=math.sqrt(5)), lora_b_init='zeros',
                 param_init_type=mstype.float32, compute_dtype=None):
        owner = type(self).__name__
        rank = check_int('lora_rank', lora_rank, owner)
        alpha = check_real('lora_alpha', lora_alpha, owner, nonzero=True)
        check_rate('lora_dropout', lora_dropout, owner)
        check_dtype('param_init_type', param_init_type, owner)
        weight = getattr(base_layer, kind.weight_attr)
        compute_dtype = weight.dtype if compute_dtype is None else check_dtype('compute_dtype', compute_dtype, owner)
        super().__init__(base_layer, kind, compute_dtype)
        lora_rank = check_rank_fits(owner, rank, self.in_channels, self.out_channels)
        check_init_shape(owner, 'lora_a_init', lora_a_init, (lora_rank, self.in_channels))
        check_init_shape(owner, 'lora_b_init', lora_b_init, (self.out_channels, lora_rank))
        self.lora_rank = rank
        self.lora_alpha = alpha
        self.lora_dropout_rate = lora_dropout
        self.lora_dropout = nn.Dropout(p=lora_dropout)
        self.use_lora_dropout = lora_dropout > 0 and kind.float_features_last
        self.mindpet_delta_lora_a = init_param(lora_a_init, (lora_rank, self.in_channels), param_init_type,
                                               'mindpet_delta_lora_a')
        self.mindpet_delta_lora_b = init_param(lora_b_init, (self.out_channels, lora_rank), param_init_type,
                                               'mindpet_delta_lora_b')
        self.scaling = self.lora_alpha / self.lora_rank
        # Parameter data, not a Python float: merge/switching change it in an already-compiled graph.
        self.mindpet_state_lora_scaling = Parameter(Tensor(self.scaling, mstype.float32),
                                                    name='mindpet_state_lora_scaling', requires_grad=False)

    def construct(self, x):
        out = self.base_layer(x)
        lora_x = self._branch_input(x)
        if self.use_lora_dropout:
            lora_x = self.lora_dropout(lora_x)
        lora_x = self.branch.down(lora_x, self.cast(self.mindpet_delta_lora_a, self.compute_dtype))
        lora_x = lora_x * self.cast(self.mindpet_state_lora_scaling, self.compute_dtype)
        lora_x = self.branch.up(lora_x, self.cast(self.mindpet_delta_lora_b, self.compute_dtype))
        return out + self.cast(lora_x, out.dtype)

    def delta_weight(self):
        """``s B A`` as float32 NumPy ``(out, in)`` (the canonical view)."""
        return lora_increment(self.mindpet_delta_lora_a.asnumpy(), self.mindpet_delta_lora_b.asnumpy(),
                              self.scaling)

    def _merge_weights(self):
        self._set_canonical_weight(self.canonical_weight_f32() + self.delta_weight())
        self.mindpet_state_lora_scaling.set_data(Tensor(0.0, mstype.float32))

    def _unmerge_weights(self):
        self._set_canonical_weight(self.canonical_weight_f32() - self.delta_weight())
        self.mindpet_state_lora_scaling.set_data(Tensor(self.scaling, mstype.float32))

    def extend_repr(self):
        return (super().extend_repr() + f', lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha}, '
                f'lora_dropout={self.lora_dropout_rate}')


#: ``init_lora_weights`` values besides the default ``True`` (Kaiming-uniform A, zero B), as Hugging Face PEFT
LORA_INITS = ('gaussian', 'pissa', 'olora')


def lora_init_factors(kind, weight, rank, scaling):
    """Initial ``A (rank, in)`` and ``B (out, rank)`` (float32 numpy) of a LoRA adapter initialised by ``kind``.

    - ``'gaussian'``: ``A ~ N(0, (1 / rank)^2)`` (MindSpore's RNG: ``mindspore.set_seed`` makes it reproducible),
      ``B = 0`` (the layer starts as its base layer).
    - ``'pissa'`` (Meng et al., 2024): from the SVD ``W = U S V^T`` of the base weight, ``A = sqrt(S_r / s) V_r^T``
      and ``B = U_r sqrt(S_r / s)``, so ``s B A`` is the best rank-``r`` part of ``W``.
    - ``'olora'`` (Buyukakyuz, 2024): from the QR decomposition ``W = Q R``, ``A = R[:r]``, ``B = Q[:, :r]``.

    For ``'pissa'`` and ``'olora'`` the base weight is replaced by the residual ``W - s B A`` while the adapter is
    active, so the adapted layer again computes ``W`` at initialisation (see :mod:`mindpet.tuners.lora`).

    Args:
        kind (str): one of :data:`LORA_INITS`.
        weight (numpy.ndarray): the base weight ``(out, in)`` (used by 'pissa' and 'olora').
        rank (int): ``r``, at most ``min(out, in)`` for 'pissa' and 'olora'.
        scaling (float): ``s``, the adapter's scaling.

    Example:
        >>> w = np.diag([3., 2., 1.]).astype(np.float32)
        >>> a, b = lora_init_factors('pissa', w, 2, 1.0)
        >>> np.allclose(b @ a, np.diag([3., 2., 0.]))
        True
    """
    weight = np.asarray(weight, np.float64)
    out_channels, in_channels = weight.shape
    if kind == 'gaussian':
        lora_a = initializer(Normal(1.0 / rank), [rank, in_channels], mstype.float32).init_data().asnumpy()
        return lora_a.astype(np.float32), np.zeros((out_channels, rank), np.float32)
    if rank > min(out_channels, in_channels):
        raise ValueError(f"For 'init_lora_weights={kind!r}', the rank must be at most min(out, in) = "
                         f"{min(out_channels, in_channels)} of the weight {weight.shape}, but got {rank}.")
    if kind == 'pissa':
        u, s, vt = np.linalg.svd(weight, full_matrices=False)
        root = np.sqrt(s[:rank] / scaling)
        return (root[:, None] * vt[:rank]).astype(np.float32), (u[:, :rank] * root[None, :]).astype(np.float32)
    if kind == 'olora':
        q, r = np.linalg.qr(weight)
        return r[:rank].astype(np.float32), q[:, :rank].astype(np.float32)
    raise ValueError(f"For 'lora_init_factors', the 'kind' must be one of {list(LORA_INITS)}, but got {kind!r}.")
