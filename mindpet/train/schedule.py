"""Learning-rate schedules of the run config: linear warm-up to a start (peak) rate, then decay to an end rate.

The names follow Wukong-Huahua's fine-tuning scripts and the MindPet blog (``warmup_steps``,
``start_learning_rate``, ``end_learning_rate``). The rate is computed per step, from the step number: by
:func:`learning_rate_at` on the host (progress lines, ``metrics.json``) and by :class:`WarmupDecayLR` inside the
optimizer's graph, so a run of any length costs no memory and no time up front (a list of one float per step for
``training.epochs: 1e30`` could never be built). :func:`learning_rates` lists the rates of a short run.
"""
import math

import mindspore as ms
from mindspore import ops
from mindspore.nn.learning_rate_schedule import LearningRateSchedule

from mindpet.utils.validation import check_int, check_real, check_choice

DECAYS = ('linear', 'cosine', 'polynomial', 'constant')


def _check_schedule(owner, total_steps, start_learning_rate, end_learning_rate, warmup_steps, decay, power):
    check_int('total_steps', total_steps, owner)
    check_real('start_learning_rate', start_learning_rate, owner, min_value=0, min_inclusive=False)
    check_real('end_learning_rate', end_learning_rate, owner, min_value=0)
    check_int('warmup_steps', warmup_steps, owner, min_value=0)
    check_choice('decay', decay, owner, DECAYS)
    check_real('power', power, owner, min_value=0, min_inclusive=False)


def learning_rate_at(step, total_steps, start_learning_rate, end_learning_rate=0.0, warmup_steps=0, decay='linear',
                     power=1.0):
    """The learning rate of step ``step`` (0-based) of a ``total_steps`` run.

    Step ``i`` of warm-up gets ``start * (i + 1) / warmup_steps``; then, with ``n`` decay steps and
    ``p = j / (n - 1)`` for decay step ``j`` (``p = 1`` when ``n == 1``):

    * linear: ``start + (end - start) * p``
    * cosine: ``end + (start - end) * (1 + cos(pi * p)) / 2``
    * polynomial: ``end + (start - end) * (1 - p) ** power``
    * constant: ``start``

    so the first decay step runs at ``start`` and the last at ``end``. A run shorter than the warm-up stops part-way
    up the ramp (the ramp is not compressed). Steps past the end keep the last rate.

    Example:
        >>> learning_rate_at(0, 5, 1.0, 0.0, warmup_steps=2)
        0.5
    """
    check_int('step', step, 'learning_rate_at', min_value=0)
    _check_schedule('learning_rate_at', total_steps, start_learning_rate, end_learning_rate, warmup_steps, decay,
                    power)
    return _rate(step, total_steps, start_learning_rate, end_learning_rate, warmup_steps, decay, power)


def _rate(step, total_steps, start, end, warmup_steps, decay, power):
    warmup = min(warmup_steps, total_steps)
    if step < warmup:
        return start * (step + 1) / warmup_steps
    remaining = total_steps - warmup
    p = min((step - warmup) / (remaining - 1), 1.0) if remaining > 1 else 1.0
    if decay == 'constant':
        rate = start
    elif decay == 'linear':
        rate = start + (end - start) * p
    elif decay == 'cosine':
        rate = end + (start - end) * (1 + math.cos(math.pi * p)) / 2
    else:
        rate = end + (start - end) * (1 - p) ** power
    return float(rate)


def learning_rates(total_steps, start_learning_rate, end_learning_rate=0.0, warmup_steps=0, decay='linear',
                   power=1.0):
    """Per-step learning rates of a run (:func:`learning_rate_at` for every step), for short runs and reports; a
    training run uses :class:`WarmupDecayLR`.

    Args:
        total_steps (int): steps of the run, > 0.
        start_learning_rate (float): the peak rate, > 0.
        end_learning_rate (float): the last step's rate, >= 0.
        warmup_steps (int): warm-up steps, >= 0.
        decay (str): 'linear', 'cosine', 'polynomial' or 'constant'.
        power (float): exponent of the polynomial decay.

    Returns:
        list[float] of length ``total_steps``.

    Example:
        >>> [round(x, 3) for x in learning_rates(5, 1.0, 0.0, warmup_steps=2)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    _check_schedule('learning_rates', total_steps, start_learning_rate, end_learning_rate, warmup_steps, decay, power)
    return [_rate(i, total_steps, start_learning_rate, end_learning_rate, warmup_steps, decay, power)
            for i in range(total_steps)]


class WarmupDecayLR(LearningRateSchedule):
    """:func:`learning_rate_at` as a MindSpore learning-rate schedule: the optimizer computes the rate of each step
    from its ``global_step`` inside the compiled graph (float32), so nothing of size ``total_steps`` is built and a
    resumed optimizer (its ``global_step`` restored) continues the schedule where it stopped.

    Args: as :func:`learning_rate_at` (without ``step``).

    Inputs:
        global_step (Tensor): int32 scalar, the 0-based step.

    Outputs:
        float32 scalar Tensor.

    Example:
        >>> lr = WarmupDecayLR(5, 1.0, 0.0, warmup_steps=2)
        >>> float(lr(ms.Tensor(0, ms.int32)))
        0.5
    """

    def __init__(self, total_steps, start_learning_rate, end_learning_rate=0.0, warmup_steps=0, decay='linear',
                 power=1.0):
        super().__init__()
        _check_schedule('WarmupDecayLR', total_steps, start_learning_rate, end_learning_rate, warmup_steps, decay,
                        power)
        warmup = min(warmup_steps, total_steps)
        remaining = total_steps - warmup
        self.decay = decay
        self.warmup = float(warmup)
        self.ramp = float(start_learning_rate) / max(warmup_steps, 1)
        self.start = float(start_learning_rate)
        self.end = float(end_learning_rate)
        self.power = float(power)
        # p = (step - warmup) * inv_span, clipped to [0, 1]; a single decay step has p = 1.
        self.inv_span = 1.0 / (remaining - 1) if remaining > 1 else 0.0
        self.single = remaining <= 1
        self.pi = math.pi

    def construct(self, global_step):
        step = ops.cast(global_step, ms.float32)
        warm = (step + 1.0) * self.ramp
        if self.single:
            p = ops.ones_like(step)
        else:
            p = ops.clamp((step - self.warmup) * self.inv_span, 0.0, 1.0)
        if self.decay == 'constant':
            decayed = ops.ones_like(step) * self.start
        elif self.decay == 'linear':
            decayed = self.start + (self.end - self.start) * p
        elif self.decay == 'cosine':
            decayed = self.end + (self.start - self.end) * (1.0 + ops.cos(self.pi * p)) / 2.0
        else:
            decayed = self.end + (self.start - self.end) * ops.pow(1.0 - p, self.power)
        return ops.select(step < self.warmup, warm, decayed)


__all__ = ['learning_rates', 'learning_rate_at', 'WarmupDecayLR', 'DECAYS']
