"""PST: parameter-efficient sparse training (Li et al., IJCAI 2022, arXiv 2205.11005).

Prunes a frozen Dense weight ``W0`` (out, in) to a target sparsity while training few parameters::

    W' = W0 + U V                                  U: (out, r_w)  V: (r_w, in)   weight update
    S  = |W'| + A B + (R 1^T + 1 C^T)              A: (out, r_m)  B: (r_m, in)   data-driven importance
                                                   R: (out,)      C: (in,)       row / column importance
    M  = top_{1-s}(S)                              per layer: exactly n - round(s n) ones, n = out * in
    h  = (M * W') x + b

The mask's gradient goes straight through to ``S`` (``M + S - stop_gradient(S)``: the value is exactly ``M``, the
gradient is that of ``S``). The sparsity ``s`` is Parameter data (``mindpet_state_pst_sparsity``) so a compiled
graph follows the schedule; :class:`PSTSparsityScheduler` raises it on the cubic schedule of
:func:`cubic_sparsity` (a ``Model.train`` callback, or ``scheduler.step(i)`` in a custom loop). After training,
:meth:`PSTDense.export_weight` / ``to_dense()`` give the plain sparse weight ``M * (W0 + U V)``.

Parameters: ``mindpet_delta_pst_u``, ``_v``, ``_a``, ``_b``, ``_r``, ``_c``. ``U``, ``A``, ``R``, ``C`` start at
zero, so at initialisation ``W' = W0`` and ``S = |W0|`` (magnitude pruning).
"""
import math

import numpy as np
from mindspore import ops, Parameter, Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import HeUniform, Normal
from mindspore.train import Callback

from mindpet.delta.base import DeltaDense, init_param, check_init_shape, check_rank_fits
from mindpet.delta.sharding import apply_dense_strategies
from mindpet.utils.validation import FieldValueError, check_int, check_real, check_cell


def _check_sparsity(name, value, owner, upper_inclusive=False):
    check_real(name, value, owner)
    if not (0.0 <= value < 1.0 or (upper_inclusive and value == 1.0)):
        bound = ']' if upper_inclusive else ')'
        raise FieldValueError(f"For '{owner}', the '{name}' must be in [0.0, 1.0{bound}, but got {value!r}.",
                              field=name)
    return float(value)


def kept_count(sparsity, numel):
    """How many of ``numel`` entries a mask at ``sparsity`` keeps: ``numel - floor(sparsity * numel + 0.5)``, the
    product rounded in float32 exactly as the compiled graph does it."""
    pruned = np.floor(np.float32(sparsity) * np.float32(numel) + np.float32(0.5))
    return int(numel - int(pruned))


def sparse_export(weight, u, v, a, b, r, c, sparsity):
    """NumPy twin of :meth:`PSTDense.export_weight` for checkpoint arrays (``mindpet merge``): ``M * (W0 + U V)``
    in float32 arithmetic, cast to ``weight``'s dtype; ``M`` keeps the ``kept_count(sparsity, out * in)`` highest
    scores. Equal scores are ordered by position here and by the device's sort in the Cell, so the two can differ
    only on exact ties."""
    f32 = lambda t: np.asarray(t, np.float32)  # noqa: E731
    updated = f32(weight) + f32(u) @ f32(v)
    scores = np.abs(updated) + f32(a) @ f32(b) + f32(r)[:, None] + f32(c)[None, :]
    mask = np.zeros(scores.size, np.float32)
    mask[np.argsort(-scores.reshape(-1), kind='stable')[:kept_count(float(sparsity), scores.size)]] = 1.0
    return (mask.reshape(scores.shape) * updated).astype(np.asarray(weight).dtype)


class PSTDense(DeltaDense):
    """A frozen ``nn.Dense`` pruned by a learned, per-layer top-k mask while a low-rank update trains (PST).

    Args:
        in_channels (int): input features.
        out_channels (int): output features.
        pst_rank_w (int): rank ``r_w`` of the weight update ``U V``, at most ``min(in_channels, out_channels)``.
            Default 8.
        pst_rank_m (int): rank ``r_m`` of the importance term ``A B``, at most ``min(in_channels, out_channels)``.
            Default 8.
        pst_sparsity (float): sparsity in [0, 1) the layer starts with (a scheduler changes it later). Default 0.
        pst_u_init, pst_v_init, pst_a_init, pst_b_init: initializers (or Tensors of the right shape) for U, V, A, B.
            Defaults 'zeros', Kaiming-uniform(a=sqrt 5), 'zeros', Normal(0.02).
        param_init_type (mindspore.dtype): dtype of the PST parameters. Default float32.
        compute_dtype (mindspore.dtype): dtype of the input-side matmul. Default float16; the weight, scores and
            mask are computed in float32.
        **kwargs: ``nn.Dense`` keywords (``weight_init``, ``bias_init``, ``has_bias``, ``activation``, ``dtype``).

    Inputs:
        x (Tensor): shape ``(*, in_channels)``, at least 2 dimensions.

    Outputs:
        Tensor ``(*, out_channels)`` of the dtype of ``x``.

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindpet.delta.pst import PSTDense
        >>> layer = PSTDense(16, 8, pst_rank_w=2, pst_rank_m=2, pst_sparsity=0.5, compute_dtype=ms.float32)
        >>> int((layer.current_mask() == 0).sum())
        64
    """

    def __init__(self, in_channels, out_channels, pst_rank_w=8, pst_rank_m=8, pst_sparsity=0.0,
                 pst_u_init='zeros', pst_v_init=HeUniform(negative_slope=math.sqrt(5)), pst_a_init='zeros',
                 pst_b_init=Normal(0.02), param_init_type=mstype.float32, compute_dtype=mstype.float16, **kwargs):
        owner = type(self).__name__
        self.pst_rank_w = check_int('pst_rank_w', pst_rank_w, owner)
        self.pst_rank_m = check_int('pst_rank_m', pst_rank_m, owner)
        sparsity = _check_sparsity('pst_sparsity', pst_sparsity, owner)
        in_channels = check_int('in_channels', in_channels, owner)
        out_channels = check_int('out_channels', out_channels, owner)
        # U V and A B are (out, r)(r, in) products: neither can use a rank above min(in, out).
        check_rank_fits(owner, self.pst_rank_w, in_channels, out_channels, name='pst_rank_w')
        check_rank_fits(owner, self.pst_rank_m, in_channels, out_channels, name='pst_rank_m')
        super().__init__(in_channels, out_channels, param_init_type, compute_dtype, **kwargs)
        shapes = {'u': (out_channels, pst_rank_w), 'v': (pst_rank_w, in_channels),
                  'a': (out_channels, pst_rank_m), 'b': (pst_rank_m, in_channels)}
        inits = {'u': pst_u_init, 'v': pst_v_init, 'a': pst_a_init, 'b': pst_b_init}
        for key, shape in shapes.items():
            check_init_shape(owner, f'pst_{key}_init', inits[key], shape)
        self.mindpet_delta_pst_u = init_param(pst_u_init, shapes['u'], param_init_type, 'mindpet_delta_pst_u')
        self.mindpet_delta_pst_v = init_param(pst_v_init, shapes['v'], param_init_type, 'mindpet_delta_pst_v')
        self.mindpet_delta_pst_a = init_param(pst_a_init, shapes['a'], param_init_type, 'mindpet_delta_pst_a')
        self.mindpet_delta_pst_b = init_param(pst_b_init, shapes['b'], param_init_type, 'mindpet_delta_pst_b')
        self.mindpet_delta_pst_r = init_param('zeros', (out_channels,), param_init_type, 'mindpet_delta_pst_r')
        self.mindpet_delta_pst_c = init_param('zeros', (in_channels,), param_init_type, 'mindpet_delta_pst_c')
        # Run-time state read by the compiled graph: the current sparsity (moved by the scheduler) and a gate that
        # switches to the plain (merged, already sparse) weight.
        self.mindpet_state_pst_sparsity = Parameter(Tensor(sparsity, mstype.float32),
                                                    name='mindpet_state_pst_sparsity', requires_grad=False)
        self.mindpet_state_pst_gate = Parameter(Tensor(1.0, mstype.float32), name='mindpet_state_pst_gate',
                                                requires_grad=False)
        self.numel = in_channels * out_channels
        self._unmerged_weight = None
        self.update_matmul = ops.MatMul()
        self.importance_matmul = ops.MatMul()

    # ----- maths shared by the graph and the host-side export (ops only, so it also runs eagerly) ---------------
    def _updated_weight(self):
        """``W0 + U V`` in float32."""
        return self.cast(self.weight, mstype.float32) + self.update_matmul(
            self.cast(self.mindpet_delta_pst_u, mstype.float32), self.cast(self.mindpet_delta_pst_v, mstype.float32))

    def _scores(self, updated):
        """``S = |W'| + A B + R 1^T + 1 C^T`` in float32."""
        low_rank = self.importance_matmul(self.cast(self.mindpet_delta_pst_a, mstype.float32),
                                          self.cast(self.mindpet_delta_pst_b, mstype.float32))
        rows = ops.expand_dims(self.cast(self.mindpet_delta_pst_r, mstype.float32), 1)
        cols = ops.expand_dims(self.cast(self.mindpet_delta_pst_c, mstype.float32), 0)
        return ops.abs(updated) + low_rank + rows + cols

    def _topk_mask(self, scores):
        """1 for the ``kept_count(s, n)`` highest scores (ties broken by the sort), 0 elsewhere; no gradient.
        The count is integer arithmetic, so it is exact for any layer size."""
        flat = ops.reshape(ops.stop_gradient(scores), (self.numel,))
        _, order = ops.sort(flat, descending=True)
        pruned = ops.floor(self.mindpet_state_pst_sparsity * float(self.numel) + 0.5)
        kept = self.numel - self.cast(pruned, mstype.int32)
        keep_sorted = self.cast(ops.arange(0, self.numel, 1, dtype=mstype.int32) < kept, mstype.float32)
        mask = ops.scatter_nd(ops.reshape(order, (self.numel, 1)), keep_sorted, (self.numel,))
        return ops.reshape(mask, (self.out_channels, self.in_channels))

    def construct(self, x):
        ori_dtype = x.dtype
        x_shape = x.shape
        x = self._to_2d(x)
        updated = self._updated_weight()
        scores = self._scores(updated)
        # Straight-through: the value is exactly the 0/1 mask (S - S is exactly 0; (M + S) - S would not be exactly
        # M), the gradient is the gradient w.r.t. the scores.
        mask = self._topk_mask(scores) + (scores - ops.stop_gradient(scores))
        gate = self.mindpet_state_pst_gate
        weight = gate * (updated * mask) + (1.0 - gate) * self.cast(self.weight, mstype.float32)
        out = self._add_bias(self._base(x, weight))
        return self._finish(out, x_shape, ori_dtype)

    # ----- host side: mask, export, merge --------------------------------------------------------------------
    def set_sparsity(self, sparsity):
        """Set the current sparsity (seen by compiled graphs)."""
        sparsity = _check_sparsity('sparsity', sparsity, type(self).__name__)
        self.mindpet_state_pst_sparsity.set_data(Tensor(sparsity, mstype.float32))

    @property
    def sparsity(self):
        """The current sparsity (float)."""
        return float(self.mindpet_state_pst_sparsity.asnumpy())

    def importance_scores(self):
        """The scores ``S`` (float32 numpy, (out, in)) for the current parameters."""
        return self._scores(self._updated_weight()).asnumpy()

    def current_mask(self):
        """The 0/1 mask the forward pass uses now (float32 numpy, (out, in)), computed by the same operators."""
        return self._topk_mask(self._scores(self._updated_weight())).asnumpy()

    def export_weight(self):
        """The plain sparse weight ``M * (W0 + U V)`` (numpy, the weight's dtype) at the current sparsity."""
        return self.merged_weight()

    def _merged_weight_f32(self):
        updated = self._updated_weight()
        return (self._topk_mask(self._scores(updated)) * updated).asnumpy()

    def _merge_weights(self):
        # Pruned entries cannot be recovered from the sparse weight, so the dense W0 is kept on the host for
        # unmerge() (one copy of the weight in host memory while merged).
        self._unmerged_weight = self.weight.asnumpy().copy()
        self._set_weight(self._merged_weight_f32())
        self.mindpet_state_pst_gate.set_data(Tensor(0.0, mstype.float32))

    def _unmerge_weights(self):
        self.weight.set_data(Tensor(self._unmerged_weight))
        self._unmerged_weight = None
        self.mindpet_state_pst_gate.set_data(Tensor(1.0, mstype.float32))

    def shard(self, strategy_org_dense_matmul=None, strategy_org_bias_add=None, strategy_activation=None):
        """Semi-auto-parallel strategies for the input-side operators. The mask needs the whole score matrix
        (a per-layer top-k), so the weight-side operators are left to the planner."""
        return apply_dense_strategies(type(self).__name__, self, [
            (self.matmul, 'strategy_org_dense_matmul', strategy_org_dense_matmul, (2, 2)),
        ], strategy_org_bias_add, strategy_activation)

    def extend_repr(self):
        return (super().extend_repr() + f', pst_rank_w={self.pst_rank_w}, pst_rank_m={self.pst_rank_m}, '
                f'sparsity={self.sparsity:.4f}, merged={self.merged}')


def cubic_sparsity(step, total_steps, initial_sparsity=0.0, final_sparsity=0.9, warmup_fraction=0.1,
                   cooldown_fraction=0.1):
    """The cubic sparsity schedule (Zhu & Gupta 2017, as used by PST and movement pruning).

    With ``t_i = warmup_fraction * total_steps`` and ``t_f = cooldown_fraction * total_steps``::

        s(t) = s_i                                                  t <= t_i
        s(t) = s_f + (s_i - s_f) * (1 - (t - t_i) / (T - t_i - t_f))^3    t_i < t < T - t_f
        s(t) = s_f                                                  t >= T - t_f

    Args:
        step (int): the current step (0-based, >= 0).
        total_steps (int): ``T``, > 0.
        initial_sparsity, final_sparsity (float): ``s_i`` and ``s_f`` in [0, 1).
        warmup_fraction, cooldown_fraction (float): in [0, 1), summing to less than 1.

    Returns:
        float: the sparsity at ``step``.

    Example:
        >>> round(cubic_sparsity(50, 100, 0.0, 0.9, 0.1, 0.1), 6)
        0.789844
    """
    owner = 'cubic_sparsity'
    step = check_int('step', step, owner, min_value=0)
    total_steps = check_int('total_steps', total_steps, owner)
    s_i = _check_sparsity('initial_sparsity', initial_sparsity, owner)
    s_f = _check_sparsity('final_sparsity', final_sparsity, owner)
    warm = _check_sparsity('warmup_fraction', warmup_fraction, owner)
    cool = _check_sparsity('cooldown_fraction', cooldown_fraction, owner)
    if warm + cool >= 1.0:
        raise ValueError(f"For '{owner}', 'warmup_fraction' + 'cooldown_fraction' must be < 1, but got "
                         f"{warmup_fraction!r} + {cooldown_fraction!r}.")
    t_i, t_f = warm * total_steps, cool * total_steps
    if step <= t_i:
        return s_i
    if step >= total_steps - t_f:
        return s_f
    progress = (step - t_i) / (total_steps - t_i - t_f)
    return s_f + (s_i - s_f) * (1.0 - progress) ** 3


class PSTSparsityScheduler(Callback):
    """Moves every :class:`PSTDense` in ``network`` along :func:`cubic_sparsity`.

    Use it as a ``Model.train`` callback (the sparsity for step ``i`` is set before step ``i`` runs), or call
    :meth:`step` yourself before each step of a custom loop. It only writes Parameter data, so compiled graphs
    follow it.

    Args:
        network (nn.Cell): the network holding the PSTDense layers (at least one).
        total_steps (int): training steps ``T``.
        initial_sparsity, final_sparsity, warmup_fraction, cooldown_fraction: see :func:`cubic_sparsity`.
            Defaults 0.0, 0.9, 0.1, 0.1.

    Example:
        >>> scheduler = PSTSparsityScheduler(net, total_steps=1000, final_sparsity=0.9)  # doctest: +SKIP
        >>> model.train(1, dataset, callbacks=[scheduler])                                # doctest: +SKIP
    """

    def __init__(self, network, total_steps, initial_sparsity=0.0, final_sparsity=0.9, warmup_fraction=0.1,
                 cooldown_fraction=0.1):
        super().__init__()
        owner = type(self).__name__
        check_cell('network', network, owner)
        self.total_steps = check_int('total_steps', total_steps, owner)
        self.kwargs = dict(initial_sparsity=initial_sparsity, final_sparsity=final_sparsity,
                           warmup_fraction=warmup_fraction, cooldown_fraction=cooldown_fraction)
        cubic_sparsity(0, total_steps, **self.kwargs)  # checks the schedule's arguments now, not mid-training
        self.layers = [(name, cell) for name, cell in network.cells_and_names() if isinstance(cell, PSTDense)]
        if not self.layers:
            raise ValueError(f"For '{owner}', the 'network' contains no PSTDense layer.")
        self.current = None

    def sparsity_at(self, step):
        """The scheduled sparsity at ``step`` (0-based); steps past ``total_steps`` keep the final value."""
        return cubic_sparsity(min(step, self.total_steps), self.total_steps, **self.kwargs)

    def step(self, step):
        """Set every layer's sparsity for ``step``; returns it."""
        self.current = self.sparsity_at(step)
        for _, layer in self.layers:
            layer.set_sparsity(self.current)
        return self.current

    def on_train_step_begin(self, run_context):
        self.step(run_context.original_args().cur_step_num - 1)

    def report(self):
        """name -> (kept entries, total entries, current sparsity of the mask) for every PST layer."""
        result = {}
        for name, layer in self.layers:
            kept = int(layer.current_mask().sum())
            result[name] = (kept, layer.numel, 1.0 - kept / layer.numel)
        return result
