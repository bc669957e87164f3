"""Adaptive rank allocation shared by AdaLoRA and the t-SVD adapter.

Both methods hold "singular values" (AdaLoRA's lambda, t-SVD's f-diagonal tubes) whose count falls during training
from an initial budget to a target on a cubic schedule; which ones survive is decided from smoothed importance
scores computed from gradients on the host after each step. This module has the pieces both use:

- :func:`cubic_budget` - the budget schedule (AdaLoRA's ``t_init``, ``t_final``, ``delta_T``);
- :class:`ImportanceTracker` - sensitivity smoothing ``Ibar <- b1 Ibar + (1 - b1) I`` and uncertainty
  ``Ubar <- b2 Ubar + (1 - b2) |I - Ibar|``, score ``Ibar * Ubar``;
- :func:`keep_top` - exactly ``budget`` units kept across all layers;
- :class:`RankAllocator` - the per-step driver (subclassed by each method);
- :class:`WithOrthRegularizer` - adds ``weight * mean_layers(orth_regularization())`` to a loss Cell;
- :class:`TrainStepWithGrads` - a ``TrainOneStepCell`` that also returns the gradients the allocator reads.
"""
import numpy as np
from mindspore import nn, ops

from mindpet.utils.validation import check_int, check_real, check_cell, check_beta


def check_schedule(owner, total_steps, t_init, t_final, delta_t):
    """Check the budget schedule's step arguments; returns them as ints."""
    total_steps = check_int('total_steps', total_steps, owner)
    t_init = check_int('t_init', t_init, owner, min_value=0)
    t_final = check_int('t_final', t_final, owner, min_value=0)
    delta_t = check_int('delta_t', delta_t, owner)
    if t_init + t_final >= total_steps:
        raise ValueError(f"For '{owner}', 't_init' + 't_final' must be < 'total_steps' ({total_steps}), but got "
                         f"{t_init} + {t_final}.")
    return total_steps, t_init, t_final, delta_t


def cubic_budget(step, total_steps, init_budget, target_budget, t_init=0, t_final=0, delta_t=1):
    """AdaLoRA's budget schedule: how many singular values may stay at ``step`` and whether to mask now.

    ::

        b(t) = b_init                                                           t <= t_init
        b(t) = b_T + int((b_init - b_T) * (1 - (t - t_init) / (T - t_init - t_final))^3)   t_init < t < T - t_final
        b(t) = b_T                                                              t >= T - t_final

    Masking happens every ``delta_t`` steps in the middle phase (``(t - t_init) % delta_t == 0``) and at every step
    of the final phase (where the allocation is fixed).

    Returns:
        tuple(int, bool): the budget and whether to mask at this step.

    Example:
        >>> cubic_budget(50, 100, init_budget=48, target_budget=16, t_init=10, t_final=10)
        (20, True)
    """
    owner = 'cubic_budget'
    step = check_int('step', step, owner, min_value=0)
    total_steps, t_init, t_final, delta_t = check_schedule(owner, total_steps, t_init, t_final, delta_t)
    init_budget = check_int('init_budget', init_budget, owner, min_value=0)
    target_budget = check_int('target_budget', target_budget, owner, min_value=0)
    if step <= t_init:
        return init_budget, False
    if step >= total_steps - t_final:
        return target_budget, True
    progress = (step - t_init) / (total_steps - t_final - t_init)
    budget = target_budget + int((init_budget - target_budget) * (1.0 - progress) ** 3)
    return budget, (step - t_init) % delta_t == 0


class ImportanceTracker:
    """Exponential moving averages of a sensitivity and of its uncertainty, per named array.

    ``update(name, sensitivity)`` applies ``Ibar <- b1 Ibar + (1 - b1) I`` and then
    ``Ubar <- b2 Ubar + (1 - b2) |I - Ibar|`` (the freshly smoothed ``Ibar``), both starting at zero, and returns
    the score ``Ibar * Ubar``.
    """

    def __init__(self, beta1=0.85, beta2=0.85):
        self.beta1 = check_beta('beta1', beta1, type(self).__name__)
        self.beta2 = check_beta('beta2', beta2, type(self).__name__)
        self.sensitivity = {}
        self.uncertainty = {}

    def update(self, name, sensitivity):
        sensitivity = np.asarray(sensitivity, np.float64)
        ibar = self.sensitivity.get(name, np.zeros_like(sensitivity))
        ubar = self.uncertainty.get(name, np.zeros_like(sensitivity))
        ibar = self.beta1 * ibar + (1.0 - self.beta1) * sensitivity
        ubar = self.beta2 * ubar + (1.0 - self.beta2) * np.abs(sensitivity - ibar)
        self.sensitivity[name], self.uncertainty[name] = ibar, ubar
        return ibar * ubar

    def score(self, name):
        return self.sensitivity[name] * self.uncertainty[name]


def keep_top(scores, budget):
    """Boolean keep-masks, one per array in ``scores``, keeping exactly ``min(budget, total)`` highest scores across
    all arrays (ties go to the earlier unit)."""
    flat = np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in scores]) if scores else np.zeros(0)
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind='stable')[:max(0, min(budget, flat.size))]] = True
    masks, start = [], 0
    for s in scores:
        size = np.asarray(s).size
        masks.append(keep[start:start + size].reshape(np.shape(s)))
        start += size
    return masks


def grad_dict(params, grads):
    """``{parameter name: numpy gradient}`` from parallel sequences of Parameters and gradient Tensors."""
    return {p.name: (g.asnumpy() if hasattr(g, 'asnumpy') else np.asarray(g)) for p, g in zip(params, grads)}


class RankAllocator:
    """Drives a budget of units (singular values) across layers; subclasses say what a unit is.

    Subclasses set ``self.layers`` (list of ``(name, layer)``) and implement ``_unit_scores(grads)`` (one score
    array per layer, updating the tracker) and ``_apply(layer, keep)`` (zero the dropped units' values).
    """

    owner = 'RankAllocator'

    def __init__(self, total_steps, init_budget, target_budget, t_init, t_final, delta_t, beta1, beta2):
        self.total_steps, self.t_init, self.t_final, self.delta_t = check_schedule(
            self.owner, total_steps, t_init, t_final, delta_t)
        self.init_budget = init_budget
        self.target_budget = target_budget
        self.tracker = ImportanceTracker(beta1, beta2)
        self.masks = None
        self.final_masks = None
        self.budget = init_budget

    def budget_at(self, step):
        """The budget and mask flag at ``step`` (see :func:`cubic_budget`)."""
        return cubic_budget(step, self.total_steps, self.init_budget, self.target_budget, self.t_init, self.t_final,
                            self.delta_t)

    def update_and_allocate(self, step, grads):
        """Call once after each optimizer step ``step`` (0-based) with that step's gradients.

        Args:
            step (int): the global step just taken.
            grads (dict): ``{parameter name: gradient}`` holding at least every parameter of the adapted layers
                (see :class:`TrainStepWithGrads` and :func:`grad_dict`).

        Returns:
            int: the budget in force after this step.
        """
        step = check_int('step', step, self.owner, min_value=0)
        if not isinstance(grads, dict):
            raise TypeError(f"For '{self.owner}', the 'grads' must be a dict of parameter name -> gradient, but got "
                            f"{type(grads).__name__}.")
        self.budget, mask_now = self.budget_at(step)
        if self.final_masks is not None:
            masks = self.final_masks
        else:
            scores = self._unit_scores(grads)
            if not mask_now:
                return self.budget
            masks = keep_top(scores, self.budget)
            if step >= self.total_steps - self.t_final:
                self.final_masks = masks
        self.masks = masks
        for (_, layer), keep in zip(self.layers, masks):
            self._apply(layer, keep)
        return self.budget

    def _grad(self, grads, param):
        if param.name not in grads:
            raise ValueError(f"For '{self.owner}', the 'grads' have no entry for the parameter '{param.name}'; pass "
                             f"the gradients of every adapted layer's parameters.")
        return np.asarray(grads[param.name], np.float64)

    def rank_pattern(self):
        """``{layer name: kept rank}`` from the latest mask (the initial ranks before the first masking)."""
        if self.masks is None:
            return {name: self._rank(layer) for name, layer in self.layers}
        return {name: int(np.count_nonzero(keep)) for (name, _), keep in zip(self.layers, self.masks)}

    def _unit_scores(self, grads):
        raise NotImplementedError

    def _apply(self, layer, keep):
        raise NotImplementedError

    def _rank(self, layer):
        raise NotImplementedError


def find_cells(network, cell_type, owner):
    """``[(name, cell)]`` of every ``cell_type`` in ``network`` with a trainable parameter (frozen ones, e.g. the
    layers of an inactive adapter, take no part in the allocation); ValueError when there is none."""
    check_cell('network', network, owner)
    found = [(name, cell) for name, cell in network.cells_and_names()
             if isinstance(cell, cell_type) and any(p.requires_grad for p in cell.get_parameters())]
    if not found:
        raise ValueError(f"For '{owner}', the 'network' contains no {cell_type.__name__} with trainable "
                         f"parameters.")
    return found


class WithOrthRegularizer(nn.Cell):
    """``loss_net(*inputs) + orth_reg_weight * mean over layers of layer.orth_regularization()``.

    Every sub-Cell of ``loss_net`` with an ``orth_regularization()`` method (AdaLoRA layers, t-SVD groups) takes
    part. The layers are held in a tuple, not re-registered, so parameter names do not change.

    Args:
        loss_net (nn.Cell): a Cell returning the scalar task loss (e.g. ``nn.WithLossCell``).
        orth_reg_weight (float): the regulariser's weight (>= 0). Default 0.5.

    Example:
        >>> loss_net = WithOrthRegularizer(nn.WithLossCell(net, nn.MSELoss()), 0.1)  # doctest: +SKIP
    """

    def __init__(self, loss_net, orth_reg_weight=0.5):
        super().__init__(auto_prefix=False)
        owner = type(self).__name__
        check_cell('loss_net', loss_net, owner)
        self.orth_reg_weight = float(check_real('orth_reg_weight', orth_reg_weight, owner, min_value=0))
        self.loss_net = loss_net
        seen, cells = set(), []
        for _, cell in loss_net.cells_and_names():
            if hasattr(cell, 'orth_regularization') and id(cell) not in seen:
                seen.add(id(cell))
                cells.append(cell)
        if not cells:
            raise ValueError(f"For '{owner}', the 'loss_net' has no Cell with an orth_regularization() method.")
        self._reg_cells = tuple(cells)
        self._reg_scale = self.orth_reg_weight / len(cells)

    def regularization(self):
        """The unweighted mean of the layers' regularisers."""
        total = 0.0
        for cell in self._reg_cells:
            total = total + cell.orth_regularization()
        return total / len(self._reg_cells)

    def construct(self, *inputs):
        total = 0.0
        for cell in self._reg_cells:
            total = total + cell.orth_regularization()
        return self.loss_net(*inputs) + self._reg_scale * total


class TrainStepWithGrads(nn.TrainOneStepCell):
    """``nn.TrainOneStepCell`` that returns ``(loss, grads)``; ``grads`` follow ``optimizer.parameters``.

    The allocators read importance from these gradients after each step::

        step = TrainStepWithGrads(loss_net, optimizer)
        loss, grads = step(x, y)
        allocator.update_and_allocate(i, step.grad_dict(grads))
    """

    def construct(self, *inputs):
        loss = self.network(*inputs)
        sens = ops.fill(loss.dtype, loss.shape, self.sens)
        grads = self.grad(self.network, self.weights)(*inputs, sens)
        grads = self.grad_reducer(grads)
        loss = ops.depend(loss, self.optimizer(grads))
        return loss, grads

    def grad_dict(self, grads):
        """``{parameter name: numpy gradient}`` for the gradients this step returned."""
        return grad_dict(self.weights, grads)
