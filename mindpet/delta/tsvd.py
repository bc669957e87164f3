"""Tensorised increments with adaptive t-SVD rank.

The increments of ``L`` same-shaped Dense layers (e.g. the query projections of all blocks) are stacked into one
tensor ``dT`` of shape ``(out, in, L)`` and parametrised as a tensor SVD::

    dT = U * S * V^T      U: (out, k, L)   S: f-diagonal, stored as k tubes (k, L)   V: (in, k, L)

where U and V may keep only their first ``P = tsvd_factor_slices`` frontal slices (the others are zero; default
``P = L``, full tensors). ``P = 1`` gives every layer the same singular vectors with its own singular values,
``dT[:, :, l] = U_0 diag(S[:, l]) V_0^T``: the layers share structure instead of each holding its own factors.

``*`` is the t-product, a circular convolution along the third (layer) mode::

    (A * B)[:, :, l] = sum_j A[:, :, j] @ B[:, :, (l - j) mod L]

and ``V^T`` the t-transpose (each frontal slice transposed, slices 1..L-1 in reverse order). Layer ``l`` adds
``s * dT[:, :, l]`` (``s = tsvd_alpha / tsvd_rank``) to its frozen weight. The forward pass never forms ``dT``: with
``US = U * S``, ``dT[:, :, l] = sum_{q < P} US_{(l + q) mod L} V_q^T``, so a layer costs one rank-``kP`` LoRA-like
product, built from gathers and matmuls only (runs in GRAPH_MODE on CPU and Ascend; no FFT needed).

Cost, per group of ``L`` layers ``(out, in)`` (counted by ``tests/delta/test_tsvd_cost.py``): trainable values
``k P (out + in) + k L`` (full factors: ``k L (out + in + 1)``, what LoRA of rank ``k`` trains on each of the ``L``
layers, plus ``k L``); forward multiply-adds per layer and ``N`` input rows: ``N k P (in + out)`` for the increment
(LoRA of rank ``r``: ``N r (in + out)``) plus ``k out P^2`` for this layer's slices of ``U * S``.

Training adds the orthogonality regulariser ``||U^T * U - I||^2 + ||V^T * V - I||^2`` (``I`` the identity tensor:
first frontal slice the identity matrix, the others zero) and, after each batch, :class:`TSVDAllocator` tracks the
gradient smoothness ``s_t = b1 s_{t-1} + (1 - b1) |g|`` and uncertainty ``u_t = b2 u_{t-1} + (1 - b2) | |g| - s_t |``
of every entry; a singular tube's score is the mean of ``s_t * u_t`` over its S tube, U and V lateral slices; the tubes
kept for the next batch are the top of a budget (AdaLoRA's cubic schedule, across all groups), ranked by the mean of
the current and the previous batch's scores. Dropped tubes are set to zero. Trained increments unfold back into
per-layer matrices that merge into ``W0`` like LoRA.

The NumPy functions :func:`t_product`, :func:`t_transpose`, :func:`t_svd`, :func:`f_diag`, :func:`t_identity` and
:func:`t_orthogonal` are the reference maths (FFT along the third mode) used for initialisation, tests and export.
"""
import numpy as np
from mindspore import ops, Parameter, Tensor, nn
from mindspore import dtype as mstype
from mindspore.common.initializer import initializer, Normal

from mindpet.delta.base import DeltaDense, host_f32, check_rank_fits
from mindpet.delta.sharding import apply_dense_strategies
from mindpet.delta.rank_allocation import RankAllocator, find_cells
from mindpet.utils.validation import check_int, check_real, check_dtype, check_allocation

__all__ = ['TSVDGroup', 'TSVDDense', 'TSVDAllocator', 't_product', 't_transpose', 't_svd', 'f_diag', 't_identity',
           't_orthogonal', 'orthogonal_init', 'tsvd_increments', 'pad_slices']


# ----- NumPy reference maths --------------------------------------------------------------------------------------
def _check_3d(name, value):
    value = np.asarray(value)
    if value.ndim != 3:
        raise ValueError(f"For 't-SVD', the '{name}' must be a 3-D array (n1, n2, L), but got shape {value.shape}.")
    return value


def t_product(a, b):
    """t-product ``(n1, n2, L) * (n2, n3, L) -> (n1, n3, L)``: slice-wise products after an FFT along the third
    mode (equal to the circular convolution ``C_l = sum_j A_j B_{(l - j) mod L}``)."""
    a, b = _check_3d('a', a), _check_3d('b', b)
    if a.shape[1] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"For 't_product', the shapes {a.shape} and {b.shape} do not chain (n1, n2, L) * "
                         f"(n2, n3, L).")
    fa, fb = np.fft.fft(a, axis=2), np.fft.fft(b, axis=2)
    return np.real(np.fft.ifft(np.einsum('ijl,jkl->ikl', fa, fb), axis=2))


def t_transpose(a):
    """t-transpose ``(n1, n2, L) -> (n2, n1, L)``: every frontal slice transposed, slices 1..L-1 reversed."""
    a = _check_3d('a', a)
    out = np.transpose(a, (1, 0, 2))
    return np.concatenate([out[:, :, :1], out[:, :, :0:-1]], axis=2)


def t_identity(n, length):
    """The identity tensor ``(n, n, L)``: first frontal slice the identity matrix, the others zero."""
    ident = np.zeros((n, n, length))
    ident[:, :, 0] = np.eye(n)
    return ident


def f_diag(tubes):
    """``(k, L)`` tubes -> the f-diagonal tensor ``(k, k, L)`` holding them on its diagonal."""
    tubes = np.asarray(tubes)
    out = np.zeros((tubes.shape[0], tubes.shape[0], tubes.shape[1]), tubes.dtype)
    idx = np.arange(tubes.shape[0])
    out[idx, idx, :] = tubes
    return out


def _real_slices(length):
    return {0, length // 2} if length % 2 == 0 else {0}


def t_svd(x, rank=None):
    """Tensor SVD ``x = U * f_diag(S) * V^T`` of a real ``(n1, n2, L)`` tensor.

    Returns ``U (n1, k, L)``, ``S (k, L)`` tubes and ``V (n2, k, L)``, with ``k = min(n1, n2)`` or ``rank``; ``U`` and
    ``V`` are orthogonal tensors (``U^T * U`` is the identity tensor). Computed slice-wise after an FFT along the third
    mode, keeping the conjugate symmetry so that the factors are real.

    Example:
        >>> x = np.random.randn(4, 4, 3)
        >>> u, s, v = t_svd(x)
        >>> bool(np.allclose(t_product(t_product(u, f_diag(s)), t_transpose(v)), x))
        True
    """
    x = _check_3d('x', x)
    n1, n2, length = x.shape
    k = min(n1, n2) if rank is None else check_int('rank', rank, 't_svd', max_value=min(n1, n2))
    fx = np.fft.fft(x, axis=2)
    fu = np.zeros((n1, k, length), complex)
    fs = np.zeros((k, length), complex)
    fv = np.zeros((n2, k, length), complex)
    for f in range(length // 2 + 1):
        slc = fx[:, :, f].real if f in _real_slices(length) else fx[:, :, f]
        u, s, vh = np.linalg.svd(slc, full_matrices=False)
        fu[:, :, f], fs[:, f], fv[:, :, f] = u[:, :k], s[:k], vh[:k].conj().T
        if 0 < f and f != length - f:
            fu[:, :, length - f], fs[:, length - f], fv[:, :, length - f] = (
                u[:, :k].conj(), s[:k], vh[:k].T)
    back = lambda t, axis: np.real(np.fft.ifft(t, axis=axis))  # noqa: E731
    return back(fu, 2), back(fs, 1), back(fv, 2)


def t_orthogonal(sample):
    """The orthogonal tensor nearest in spirit to ``sample (n, k, L)`` (``n >= k``): per-frequency QR, so that
    ``Q^T * Q`` is the identity tensor."""
    sample = _check_3d('sample', sample)
    n, k, length = sample.shape
    if n < k:
        raise ValueError(f"For 't_orthogonal', an orthogonal (n, k, L) tensor needs n >= k, but got {sample.shape}.")
    fs = np.fft.fft(sample, axis=2)
    fq = np.zeros_like(fs)
    for f in range(length // 2 + 1):
        slc = fs[:, :, f].real if f in _real_slices(length) else fs[:, :, f]
        q, r = np.linalg.qr(slc)
        # Fix the signs/phases (diag(R) > 0) so the result depends continuously on the sample.
        phase = np.diag(r) / np.where(np.abs(np.diag(r)) > 0, np.abs(np.diag(r)), 1)
        q = q * phase[None, :]
        fq[:, :, f] = q
        if 0 < f and f != length - f:
            fq[:, :, length - f] = q.conj()
    return np.real(np.fft.ifft(fq, axis=2))


def orthogonal_init(rows, rank, length, std=1.0, slices=None):
    """A random orthogonal tensor ``(rows, rank, length)`` (float32): :func:`t_orthogonal` of a Normal(``std``)
    sample drawn with MindSpore's RNG (``mindspore.set_seed`` makes it reproducible).

    With ``slices < length``: the first ``slices`` frontal slices of a ``length``-slice orthogonal tensor whose other
    slices are zero (returned shape ``(rows, rank, slices)``): slice 0 has orthonormal columns (QR of the sample),
    the others start at zero."""
    slices = length if slices is None else slices
    sample = initializer(Normal(std), (rows, rank, slices if slices == length else 1), mstype.float32)
    sample = sample.init_data().asnumpy()
    if slices == length:
        return t_orthogonal(sample).astype(np.float32)
    out = np.zeros((rows, rank, slices), np.float32)
    out[:, :, 0] = t_orthogonal(sample)[:, :, 0]
    return out


def pad_slices(factor, length):
    """``(n, k, P)`` -> ``(n, k, length)``: the frontal slices ``P..length-1`` zero."""
    factor = np.asarray(factor)
    if factor.shape[2] == length:
        return factor
    return np.concatenate([factor, np.zeros(factor.shape[:2] + (length - factor.shape[2],), factor.dtype)], 2)


def tsvd_increments(u, s, v, scaling):
    """``scaling * U * f_diag(S) * V^T`` (float32 numpy ``(out, in, L)``) from the factors ``U (out, k, P)``,
    ``S (k, L)``, ``V (in, k, P)`` (``P <= L`` frontal slices, the rest zero): slice ``l`` is layer ``l``'s
    increment, to add to its weight."""
    length = np.shape(s)[1]
    u, v = (pad_slices(np.asarray(a, np.float64), length) for a in (u, v))
    s = np.asarray(s, np.float64)
    return (scaling * t_product(t_product(u, f_diag(s)), t_transpose(v))).astype(np.float32)


def _check_group_allocation(owner, in_channels, out_channels, k, length, kept):
    """Refuse, before anything is drawn, a group whose largest tensors would not fit into memory: the complex
    per-frequency copy :func:`t_orthogonal` makes of the larger factor (``P`` slices at most), and the
    regulariser's constants (the ``(L, P*P)`` lag table, the ``(L, k, k)`` identity tensor, float64 while it is
    built)."""
    check_allocation(owner, "'in_channels'/'out_channels', 'tsvd_rank' and 'num_layers'",
                     (max(in_channels, out_channels), k, kept), 16)
    check_allocation(owner, "'num_layers' and 'tsvd_factor_slices'", (length, kept * kept), 4)
    check_allocation(owner, "'tsvd_rank' and 'num_layers'", (length, k, k), 8)


# ----- MindSpore Cells --------------------------------------------------------------------------------------------
class TSVDGroup(nn.Cell):
    """The shared t-SVD factors of ``num_layers`` same-shaped increments ``(out_channels, in_channels)``.

    Hand the same group to every :class:`TSVDDense` of the group; its parameters are registered (and named) under
    the first of them, e.g. ``blocks.0.attn.q.tsvd_group.mindpet_delta_tsvd_u``.

    Args:
        in_channels (int), out_channels (int): the layers' shape.
        num_layers (int): ``L``, the number of layers sharing the group (>= 1).
        tsvd_rank (int): ``k``, the number of singular tubes, at most ``min(in, out)``. Default 8.
        tsvd_alpha (int | float): non-zero; increments are scaled by ``tsvd_alpha / tsvd_rank``. Default 8.
        tsvd_init_std (float): std of the Gaussian sample that U and V are orthogonalised from (MindSpore's RNG,
            so ``mindspore.set_seed`` makes it reproducible). Default 1.0. ``S`` starts at zero (``dT = 0``).
        param_init_type (mindspore.dtype): dtype of U, S, V. Default float32.
        tsvd_factor_slices (int | None): ``P``, the frontal slices U and V keep, in ``[1, num_layers]`` (the others
            are zero); None (default): ``num_layers``. ``1``: every layer gets the shared singular vectors ``U_0``,
            ``V_0`` and its own singular values ``S[:, l]``.

    Example:
        >>> group = TSVDGroup(16, 16, num_layers=4, tsvd_rank=2)
        >>> [tuple(p.shape) for p in group.get_parameters()]
        [(16, 2, 4), (2, 4), (16, 2, 4)]
        >>> [tuple(p.shape) for p in TSVDGroup(16, 16, 4, tsvd_rank=2, tsvd_factor_slices=1).get_parameters()]
        [(16, 2, 1), (2, 4), (16, 2, 1)]
    """

    def __init__(self, in_channels, out_channels, num_layers, tsvd_rank=8, tsvd_alpha=8, tsvd_init_std=1.0,
                 param_init_type=mstype.float32, tsvd_factor_slices=None):
        super().__init__()
        owner = type(self).__name__
        self.in_channels = check_int('in_channels', in_channels, owner)
        self.out_channels = check_int('out_channels', out_channels, owner)
        self.num_layers = check_int('num_layers', num_layers, owner)
        # Every frontal slice of U * S * V^T (in the Fourier domain) is an (out, in) matrix of rank <= k, so tubes
        # beyond min(in, out) add nothing.
        self.tsvd_rank = check_rank_fits(owner, check_int('tsvd_rank', tsvd_rank, owner), in_channels, out_channels,
                                         name='tsvd_rank')
        self.tsvd_alpha = check_real('tsvd_alpha', tsvd_alpha, owner, nonzero=True)
        check_real('tsvd_init_std', tsvd_init_std, owner, min_value=0, min_inclusive=False)
        check_dtype('param_init_type', param_init_type, owner)
        self.tsvd_factor_slices = (num_layers if tsvd_factor_slices is None else
                                   check_int('tsvd_factor_slices', tsvd_factor_slices, owner, max_value=num_layers))
        self.scaling = self.tsvd_alpha / self.tsvd_rank
        k, length, kept = self.tsvd_rank, self.num_layers, self.tsvd_factor_slices
        _check_group_allocation(owner, self.in_channels, self.out_channels, k, length, kept)

        def orthogonal(rows, name):
            value = orthogonal_init(rows, k, length, tsvd_init_std, slices=kept)
            return Parameter(Tensor(value).astype(param_init_type), name=name)

        self.mindpet_delta_tsvd_u = orthogonal(out_channels, 'mindpet_delta_tsvd_u')
        self.mindpet_delta_tsvd_s = Parameter(Tensor(np.zeros((k, length), np.float32)).astype(param_init_type),
                                              name='mindpet_delta_tsvd_s')
        self.mindpet_delta_tsvd_v = orthogonal(in_channels, 'mindpet_delta_tsvd_v')

        # For the regulariser: slice l of F^T * F sums the blocks F_m^T F_n with n - m = l (mod L); with only P
        # slices stored, the pairs (m, n) run over [0, P)^2. lag[l, m * P + n] is 1 for those pairs.
        pair_m, pair_n = (a.ravel() for a in np.meshgrid(np.arange(kept), np.arange(kept), indexing='ij'))
        lag = (np.arange(length)[:, None] == (pair_n - pair_m)[None, :] % length).astype(np.float32)
        self._lag = Tensor(lag)                                        # (L, P*P)
        self._identity = Tensor(np.transpose(t_identity(k, length), (2, 0, 1)).astype(np.float32))

    def circ_index(self, index):
        """The constant gather index of layer ``index`` for :meth:`us_unfolded`: ``[p, q] = (index + q - p) mod L``
        (``(P, P)``), so that ``S`` gathered by it gives the slices of ``U * S`` the layer needs."""
        kept = np.arange(self.tsvd_factor_slices)
        return Tensor((index + kept[None, :] - kept[:, None]) % self.num_layers, mstype.int32)

    def us_unfolded(self, circ):
        """Slices ``(index + q) mod L`` (``q < P``) of ``U * S`` for a layer, unfolded to ``(out, k*P)``: column
        ``i*P + q`` = ``sum_p U[:, i, p] S[i, (index + q - p) mod L]``, ``circ`` from :meth:`circ_index` (float32)."""
        u = ops.cast(self.mindpet_delta_tsvd_u, mstype.float32)
        s = ops.cast(self.mindpet_delta_tsvd_s, mstype.float32)
        circ = ops.gather(s, circ, 1)                                   # (k, P, P): [i, p, q]
        us = ops.bmm(ops.transpose(u, (1, 0, 2)), circ)                 # (k, out, P)
        return ops.reshape(ops.transpose(us, (1, 0, 2)), (self.out_channels, self.tsvd_rank * self.tsvd_factor_slices))

    def v_unfolded(self):
        """V unfolded to ``(in, k*P)``: column ``i*P + q`` = ``V[:, i, q]`` (float32)."""
        v = ops.cast(self.mindpet_delta_tsvd_v, mstype.float32)
        return ops.reshape(v, (self.in_channels, self.tsvd_rank * self.tsvd_factor_slices))

    def _orth_term(self, factor):
        rows, k, kept = factor.shape[0], self.tsvd_rank, self.tsvd_factor_slices
        unfolded = ops.reshape(ops.transpose(factor, (0, 2, 1)), (rows, kept * k))
        gram = ops.matmul(ops.transpose(unfolded, (1, 0)), unfolded)    # (P*k, P*k): blocks F_m^T F_n
        gram = ops.transpose(ops.reshape(gram, (kept, k, kept, k)), (0, 2, 1, 3))  # (P, P, k, k): [m, n]
        slices = ops.matmul(self._lag, ops.reshape(gram, (kept * kept, k * k)))    # (L, k*k): slice l of F^T * F
        return ops.reduce_sum(ops.square(ops.reshape(slices, (self.num_layers, k, k)) - self._identity))

    def orth_regularization(self):
        """``||U^T * U - I||_F^2 + ||V^T * V - I||_F^2`` (float32 scalar; usable in a compiled graph)."""
        return (self._orth_term(ops.cast(self.mindpet_delta_tsvd_u, mstype.float32))
                + self._orth_term(ops.cast(self.mindpet_delta_tsvd_v, mstype.float32)))

    def increments(self):
        """The scaled increments ``s * dT`` as a float32 numpy ``(out, in, L)`` tensor (NumPy t-product)."""
        return tsvd_increments(host_f32(self.mindpet_delta_tsvd_u), host_f32(self.mindpet_delta_tsvd_s),
                               host_f32(self.mindpet_delta_tsvd_v), self.scaling)

    @property
    def rank(self):
        """Number of non-zero singular tubes."""
        return int(np.count_nonzero(np.any(self.mindpet_delta_tsvd_s.asnumpy() != 0, axis=1)))

    def extend_repr(self):
        return (f'in_channels={self.in_channels}, out_channels={self.out_channels}, num_layers={self.num_layers}, '
                f'tsvd_rank={self.tsvd_rank}, tsvd_alpha={self.tsvd_alpha}, '
                f'tsvd_factor_slices={self.tsvd_factor_slices}')


class TSVDDense(DeltaDense):
    """Layer ``tsvd_index`` of a :class:`TSVDGroup`: ``h = W0 x + b + s * dT[:, :, tsvd_index] x``.

    Args:
        in_channels (int), out_channels (int): must match the group.
        tsvd_group (TSVDGroup): the shared factors.
        tsvd_index (int): this layer's slice, in ``[0, num_layers)``.
        compute_dtype (mindspore.dtype): dtype of the input-side matmuls. Default float16.
        **kwargs: ``nn.Dense`` keywords (``weight_init``, ``bias_init``, ``has_bias``, ``activation``, ``dtype``).

    Example:
        >>> group = TSVDGroup(8, 8, num_layers=2, tsvd_rank=2)
        >>> layers = [TSVDDense(8, 8, group, i, compute_dtype=ms.float32) for i in range(2)]  # doctest: +SKIP
    """

    def __init__(self, in_channels, out_channels, tsvd_group, tsvd_index, compute_dtype=mstype.float16, **kwargs):
        owner = type(self).__name__
        if not isinstance(tsvd_group, TSVDGroup):
            raise TypeError(f"For '{owner}', the 'tsvd_group' must be a TSVDGroup, but got "
                            f"{type(tsvd_group).__name__}.")
        super().__init__(in_channels, out_channels, tsvd_group.mindpet_delta_tsvd_u.dtype, compute_dtype, **kwargs)
        if (in_channels, out_channels) != (tsvd_group.in_channels, tsvd_group.out_channels):
            raise ValueError(f"For '{owner}', the layer shape (in_channels={in_channels}, "
                             f"out_channels={out_channels}) must match the 'tsvd_group' ({tsvd_group.in_channels}, "
                             f"{tsvd_group.out_channels}).")
        self.tsvd_index = check_int('tsvd_index', tsvd_index, owner, min_value=0,
                                    max_value=tsvd_group.num_layers - 1)
        self.tsvd_group = tsvd_group
        self._circ = tsvd_group.circ_index(self.tsvd_index)
        self.scaling = tsvd_group.scaling
        self.mindpet_state_tsvd_scaling = Parameter(Tensor(self.scaling, mstype.float32),
                                                    name='mindpet_state_tsvd_scaling', requires_grad=False)
        self.v_matmul = ops.MatMul()
        self.us_matmul = ops.MatMul(transpose_b=True)
        self.add = ops.Add()

    def construct(self, x):
        ori_dtype = x.dtype
        x_shape = x.shape
        x = self._to_2d(x)
        out = self._base(x, self.weight)
        v_unfolded = self.tsvd_group.v_unfolded()
        us = self.tsvd_group.us_unfolded(self._circ) * self.mindpet_state_tsvd_scaling
        delta = self.v_matmul(x, self.cast(v_unfolded, self.compute_dtype))
        delta = self.us_matmul(delta, self.cast(us, self.compute_dtype))
        out = self._add_bias(self.add(out, delta))
        return self._finish(out, x_shape, ori_dtype)

    def delta_weight(self):
        """This layer's scaled increment ``s * dT[:, :, index]`` (float32 numpy, (out, in))."""
        return self.tsvd_group.increments()[:, :, self.tsvd_index]

    def _merged_weight_f32(self):
        return host_f32(self.weight) + self.delta_weight()

    def _merge_weights(self):
        self._set_weight(self._merged_weight_f32())
        self.mindpet_state_tsvd_scaling.set_data(Tensor(0.0, mstype.float32))

    def _unmerge_weights(self):
        self._set_weight(host_f32(self.weight) - self.delta_weight())
        self.mindpet_state_tsvd_scaling.set_data(Tensor(self.scaling, mstype.float32))

    def shard(self, strategy_org_dense_matmul=None, strategy_org_bias_add=None, strategy_tsvd_v_matmul=None,
              strategy_tsvd_us_matmul=None, strategy_tsvd_add=None, strategy_activation=None):
        """Semi-auto-parallel strategies for the input-side operators, e.g.
        ``strategy_tsvd_v_matmul=((dp, 1), (1, 1))``; the factor-side operators are left to the planner."""
        return apply_dense_strategies(type(self).__name__, self, [
            (self.matmul, 'strategy_org_dense_matmul', strategy_org_dense_matmul, (2, 2)),
            (self.v_matmul, 'strategy_tsvd_v_matmul', strategy_tsvd_v_matmul, (2, 2)),
            (self.us_matmul, 'strategy_tsvd_us_matmul', strategy_tsvd_us_matmul, (2, 2)),
            (self.add, 'strategy_tsvd_add', strategy_tsvd_add, (2, 2)),
        ], strategy_org_bias_add, strategy_activation)

    def extend_repr(self):
        return super().extend_repr() + f', tsvd_index={self.tsvd_index}, merged={self.merged}'


class TSVDAllocator(RankAllocator):
    """Adapts the number of singular tubes kept in every :class:`TSVDGroup` of ``network`` from gradient smoothness
    and uncertainty.

    After each optimizer step, :meth:`update_and_allocate` updates, for every entry of U, S and V,
    ``s_t = b1 s_{t-1} + (1 - b1) |g|`` and ``u_t = b2 u_{t-1} + (1 - b2) | |g| - s_t |``; tube ``i`` of a group scores
    ``mean(s u over S[i, :]) + mean(s u over U[:, i, :]) + mean(s u over V[:, i, :])``. The tubes kept for the next
    batch are the ``budget`` highest (all groups together) by the mean of this batch's and the previous batch's
    scores; the others get ``S[i, :] = 0``. The budget falls from the total initial rank to
    ``target_rank * number_of_groups`` on :func:`~mindpet.delta.rank_allocation.cubic_budget`.

    Args:
        network (nn.Cell): the network holding the t-SVD layers.
        total_steps (int): training steps ``T``.
        target_rank (int): mean number of tubes per group at the end. Default 4.
        t_init, t_final, delta_t (int): the schedule's phases (see ``cubic_budget``). Defaults 0, 0, 1 (a decision
            after every batch).
        beta1, beta2 (float): smoothing factors in [0, 1). Default 0.85.
    """

    owner = 'TSVDAllocator'

    def __init__(self, network, total_steps, target_rank=4, t_init=0, t_final=0, delta_t=1, beta1=0.85,
                 beta2=0.85):
        self.layers = find_cells(network, TSVDGroup, self.owner)
        init_budget = sum(group.tsvd_rank for _, group in self.layers)
        target_rank = check_int('target_rank', target_rank, self.owner, min_value=0)
        if target_rank * len(self.layers) > init_budget:
            raise ValueError(f"For '{self.owner}', the 'target_rank' must not exceed the groups' mean rank "
                             f"({init_budget / len(self.layers):g}), but got {target_rank}.")
        super().__init__(total_steps, init_budget, target_rank * len(self.layers), t_init, t_final, delta_t, beta1,
                         beta2)
        self.previous = None

    def _unit_scores(self, grads):
        current = []
        for _, group in self.layers:
            score = {}
            for key, axes in (('u', (0, 2)), ('s', (1,)), ('v', (0, 2))):
                param = getattr(group, f'mindpet_delta_tsvd_{key}')
                score[key] = self.tracker.update(param.name, np.abs(self._grad(grads, param))).mean(axis=axes)
            current.append(score['s'] + score['u'] + score['v'])
        previous = self.previous if self.previous is not None else current
        self.previous = current
        return [0.5 * (now + before) for now, before in zip(current, previous)]

    def _apply(self, layer, keep):
        param = layer.mindpet_delta_tsvd_s
        values = param.asnumpy()
        values[~keep, :] = 0
        param.set_data(Tensor(values))

    def _rank(self, layer):
        return layer.tsvd_rank
