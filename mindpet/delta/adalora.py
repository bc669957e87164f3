"""AdaLoRA: adaptive budget allocation for low-rank adaptation (Zhang et al., 2023).

The increment of a frozen Dense layer is held in SVD form::

    h = W0 x + b + s * P diag(lambda) Q dropout(x),      s = adalora_alpha / adalora_rank

with ``P`` (``mindpet_delta_adalora_p``, ``[out, r]``), ``lambda`` (``mindpet_delta_adalora_lambda``, ``[r]``, init 0,
so the layer starts as its base Dense) and ``Q`` (``mindpet_delta_adalora_q``, ``[r, in]``). Training adds
``orth_reg_weight * (||P^T P - I||_F^2 + ||Q Q^T - I||_F^2)`` (mean over layers; :class:`WithOrthRegularizer`) and,
after each step, :class:`AdaLoRAAllocator` scores every triplet ``(P[:, i], lambda_i, Q[i, :])`` by
``s(lambda_i) + mean s(P[:, i]) + mean s(Q[i, :])`` with ``s = Ibar * Ubar`` from ``I = |w * grad|``, and zeroes the
lambdas outside the budget (all adapted layers compete for one budget, which falls on a cubic schedule). The final
ranks per layer are reported by :meth:`AdaLoRAAllocator.rank_pattern`. The result merges into ``W0`` like LoRA.
"""
import numpy as np
from mindspore import nn, ops, Parameter, Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import Normal

from mindpet.delta.base import DeltaDense, host_f32, init_param, check_init_shape, check_rank_fits
from mindpet.delta.sharding import apply_dense_strategies
from mindpet.delta.rank_allocation import (RankAllocator, WithOrthRegularizer, TrainStepWithGrads, find_cells,
                                           cubic_budget)
from mindpet.utils.validation import check_int, check_real, check_rate

__all__ = ['AdaLoRADense', 'AdaLoRAAllocator', 'WithOrthRegularizer', 'TrainStepWithGrads', 'cubic_budget',
           'adalora_increment']


def adalora_increment(p, lam, q, scaling):
    """``scaling * P diag(lambda) Q`` as float32 numpy ``(out, in)`` from ``P (out, r)``, ``lambda (r,)``,
    ``Q (r, in)`` (what merging adds to the weight)."""
    p, lam, q = (np.asarray(a, np.float32) for a in (p, lam, q))
    return np.float32(scaling) * ((p * lam[None, :]) @ q)


class AdaLoRADense(DeltaDense):
    """A ``nn.Dense`` with an SVD-form low-rank increment whose rank an :class:`AdaLoRAAllocator` adapts.

    Args:
        in_channels (int): input features.
        out_channels (int): output features.
        adalora_rank (int): initial rank ``r`` (number of triplets), at most ``min(in_channels, out_channels)``.
            Default 12.
        adalora_alpha (int | float): non-zero; the increment is scaled by ``adalora_alpha / adalora_rank``.
            Default 8.
        adalora_dropout (float): dropout in [0, 1) on the increment's input. Default 0.
        adalora_p_init, adalora_q_init: initializers (or Tensors ``[out, r]`` / ``[r, in]``) for P and Q.
            Default Normal(0.02). ``lambda`` always starts at zero.
        param_init_type (mindspore.dtype): dtype of P, lambda, Q. Default float32.
        compute_dtype (mindspore.dtype): dtype of the matmuls. Default float16.
        **kwargs: ``nn.Dense`` keywords (``weight_init``, ``bias_init``, ``has_bias``, ``activation``, ``dtype``).

    Inputs:
        x (Tensor): shape ``(*, in_channels)``, at least 2 dimensions.

    Outputs:
        Tensor ``(*, out_channels)`` of the dtype of ``x``.

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindpet.delta.adalora import AdaLoRADense
        >>> layer = AdaLoRADense(16, 8, adalora_rank=4, compute_dtype=ms.float32)
        >>> layer(ms.Tensor(np.ones((2, 16), np.float32))).shape
        (2, 8)
    """

    def __init__(self, in_channels, out_channels, adalora_rank=12, adalora_alpha=8, adalora_dropout=0.,
                 adalora_p_init=Normal(0.02), adalora_q_init=Normal(0.02), param_init_type=mstype.float32,
                 compute_dtype=mstype.float16, **kwargs):
        owner = type(self).__name__
        self.adalora_rank = check_int('adalora_rank', adalora_rank, owner)
        self.adalora_alpha = check_real('adalora_alpha', adalora_alpha, owner, nonzero=True)
        self.adalora_dropout_rate = check_rate('adalora_dropout', adalora_dropout, owner)
        in_channels = check_int('in_channels', in_channels, owner)
        out_channels = check_int('out_channels', out_channels, owner)
        # The initial rank: the allocator only lowers it, and P (out, r) / Q (r, in) cannot hold more than
        # min(in, out) orthonormal triplets, so a larger one could never be used.
        check_rank_fits(owner, self.adalora_rank, in_channels, out_channels, name='adalora_rank')
        super().__init__(in_channels, out_channels, param_init_type, compute_dtype, **kwargs)
        check_init_shape(owner, 'adalora_p_init', adalora_p_init, (out_channels, adalora_rank))
        check_init_shape(owner, 'adalora_q_init', adalora_q_init, (adalora_rank, in_channels))
        self.mindpet_delta_adalora_p = init_param(adalora_p_init, (out_channels, adalora_rank), param_init_type,
                                                  'mindpet_delta_adalora_p')
        self.mindpet_delta_adalora_lambda = init_param('zeros', (adalora_rank,), param_init_type,
                                                       'mindpet_delta_adalora_lambda')
        self.mindpet_delta_adalora_q = init_param(adalora_q_init, (adalora_rank, in_channels), param_init_type,
                                                  'mindpet_delta_adalora_q')
        self.scaling = self.adalora_alpha / self.adalora_rank
        # 0 once merged: Parameter data, so merge()/unmerge() reach a compiled graph.
        self.mindpet_state_adalora_scaling = Parameter(Tensor(self.scaling, mstype.float32),
                                                       name='mindpet_state_adalora_scaling', requires_grad=False)
        self.adalora_dropout = nn.Dropout(p=adalora_dropout)
        self.use_dropout = adalora_dropout > 0
        self.q_matmul = ops.MatMul(transpose_b=True)
        self.p_matmul = ops.MatMul(transpose_b=True)
        self.lambda_mul = ops.Mul()
        self.add = ops.Add()
        self.eye = Tensor(np.eye(adalora_rank, dtype=np.float32))

    def construct(self, x):
        ori_dtype = x.dtype
        x_shape = x.shape
        x = self._to_2d(x)
        out = self._base(x, self.weight)
        delta_x = self.adalora_dropout(x) if self.use_dropout else x
        delta_x = self.q_matmul(delta_x, self.cast(self.mindpet_delta_adalora_q, self.compute_dtype))
        # lambda and the scaling act on the (N, r) intermediate: cheaper than on the (N, out) result.
        scaled_lambda = self.cast(self.mindpet_delta_adalora_lambda, mstype.float32) * self.mindpet_state_adalora_scaling
        delta_x = self.lambda_mul(delta_x, self.cast(scaled_lambda, self.compute_dtype))
        delta_x = self.p_matmul(delta_x, self.cast(self.mindpet_delta_adalora_p, self.compute_dtype))
        out = self._add_bias(self.add(out, delta_x))
        return self._finish(out, x_shape, ori_dtype)

    def orth_regularization(self):
        """``||P^T P - I||_F^2 + ||Q Q^T - I||_F^2`` (float32 scalar Tensor; usable inside a compiled graph)."""
        p = self.cast(self.mindpet_delta_adalora_p, mstype.float32)
        q = self.cast(self.mindpet_delta_adalora_q, mstype.float32)
        p_gram = ops.matmul(ops.transpose(p, (1, 0)), p) - self.eye
        q_gram = ops.matmul(q, ops.transpose(q, (1, 0))) - self.eye
        return ops.reduce_sum(ops.square(p_gram)) + ops.reduce_sum(ops.square(q_gram))

    @property
    def rank(self):
        """Number of non-zero singular values (lambdas)."""
        return int(np.count_nonzero(self.mindpet_delta_adalora_lambda.asnumpy()))

    # ----- merge / export --------------------------------------------------------------------------------------
    def delta_weight(self):
        """``s * P diag(lambda) Q`` as float32 numpy ``(out, in)``."""
        return adalora_increment(host_f32(self.mindpet_delta_adalora_p), host_f32(self.mindpet_delta_adalora_lambda),
                                 host_f32(self.mindpet_delta_adalora_q), self.scaling)

    def _merged_weight_f32(self):
        return host_f32(self.weight) + self.delta_weight()

    def _merge_weights(self):
        self._set_weight(self._merged_weight_f32())
        self.mindpet_state_adalora_scaling.set_data(Tensor(0.0, mstype.float32))

    def _unmerge_weights(self):
        self._set_weight(host_f32(self.weight) - self.delta_weight())
        self.mindpet_state_adalora_scaling.set_data(Tensor(self.scaling, mstype.float32))

    def shard(self, strategy_org_dense_matmul=None, strategy_org_bias_add=None, strategy_adalora_dropout=None,
              strategy_adalora_q_matmul=None, strategy_adalora_lambda_mul=None, strategy_adalora_p_matmul=None,
              strategy_adalora_add=None, strategy_activation=None):
        """Semi-auto-parallel strategies per operator, e.g. ``strategy_adalora_q_matmul=((dp, 1), (1, 1))``;
        ``strategy_adalora_lambda_mul`` is ``((dp, 1), (1,))``."""
        return apply_dense_strategies(type(self).__name__, self, [
            (self.matmul, 'strategy_org_dense_matmul', strategy_org_dense_matmul, (2, 2)),
            (self.adalora_dropout.dropout, 'strategy_adalora_dropout', strategy_adalora_dropout, (2,)),
            (self.q_matmul, 'strategy_adalora_q_matmul', strategy_adalora_q_matmul, (2, 2)),
            (self.lambda_mul, 'strategy_adalora_lambda_mul', strategy_adalora_lambda_mul, (2, 1)),
            (self.p_matmul, 'strategy_adalora_p_matmul', strategy_adalora_p_matmul, (2, 2)),
            (self.add, 'strategy_adalora_add', strategy_adalora_add, (2, 2)),
        ], strategy_org_bias_add, strategy_activation)

    def extend_repr(self):
        return (super().extend_repr() + f', adalora_rank={self.adalora_rank}, adalora_alpha={self.adalora_alpha}, '
                f'merged={self.merged}')


class AdaLoRAAllocator(RankAllocator):
    """Allocates AdaLoRA's singular values across every :class:`AdaLoRADense` in ``network``.

    After each optimizer step call :meth:`update_and_allocate` with the step's gradients. The total budget falls
    from the sum of the initial ranks to ``target_rank * number_of_layers`` on :func:`cubic_budget`; at each
    masking step the lambdas outside the budget (lowest triplet scores, all layers together) are set to zero.
    In the final ``t_final`` steps the allocation is fixed and re-applied after every step.

    Args:
        network (nn.Cell): the network holding the AdaLoRA layers.
        total_steps (int): training steps ``T``.
        target_rank (int): average rank per layer at the end. Default 8.
        t_init (int): steps before the budget starts falling. Default 0.
        t_final (int): last steps with the final, fixed allocation. Default 0.
        delta_t (int): steps between two maskings in the middle phase. Default 1.
        beta1, beta2 (float): smoothing of sensitivity and uncertainty, in [0, 1). Default 0.85.

    Example:
        >>> allocator = AdaLoRAAllocator(net, total_steps=100, target_rank=2, t_init=10, t_final=20)  # doctest: +SKIP
        >>> step = TrainStepWithGrads(WithOrthRegularizer(nn.WithLossCell(net, loss_fn)), opt)  # doctest: +SKIP
        >>> for i in range(100):                                                                 # doctest: +SKIP
        ...     loss, grads = step(x, y)
        ...     allocator.update_and_allocate(i, step.grad_dict(grads))
        >>> allocator.rank_pattern()                                                             # doctest: +SKIP
        {'fc1': 3, 'fc2': 1}
    """

    owner = 'AdaLoRAAllocator'

    def __init__(self, network, total_steps, target_rank=8, t_init=0, t_final=0, delta_t=1, beta1=0.85,
                 beta2=0.85):
        self.layers = find_cells(network, AdaLoRADense, self.owner)
        init_budget = sum(layer.adalora_rank for _, layer in self.layers)
        target_rank = check_int('target_rank', target_rank, self.owner, min_value=0)
        target_budget = target_rank * len(self.layers)
        if target_budget > init_budget:
            raise ValueError(f"For '{self.owner}', the 'target_rank' must not exceed the layers' mean initial rank "
                             f"({init_budget / len(self.layers):g}), but got {target_rank}.")
        super().__init__(total_steps, init_budget, target_budget, t_init, t_final, delta_t, beta1, beta2)

    def _unit_scores(self, grads):
        scores = []
        for _, layer in self.layers:
            parts = {}
            for key in ('p', 'lambda', 'q'):
                param = getattr(layer, f'mindpet_delta_adalora_{key}')
                sensitivity = np.abs(param.asnumpy().astype(np.float64) * self._grad(grads, param))
                parts[key] = self.tracker.update(param.name, sensitivity)
            scores.append(parts['lambda'] + parts['p'].mean(axis=0) + parts['q'].mean(axis=1))
        return scores

    def _apply(self, layer, keep):
        param = layer.mindpet_delta_adalora_lambda
        values = param.asnumpy()
        values[~keep] = 0
        param.set_data(Tensor(values))

    def _rank(self, layer):
        return layer.adalora_rank
