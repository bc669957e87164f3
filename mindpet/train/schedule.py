"""Learning-rate schedules of the run config: linear warm-up to a start (peak) rate, then decay to an end rate.

The names follow Wukong-Huahua's fine-tuning scripts and the MindPet blog (``warmup_steps``,
``start_learning_rate``, ``end_learning_rate``). The schedule is a list of one float per step, which MindSpore's
optimizers take as a dynamic learning rate (it lives in the optimizer's state, so the compiled graph is reused).
"""
import math

from mindpet.utils.validation import check_int, check_real, check_choice

DECAYS = ('linear', 'cosine', 'polynomial', 'constant')


def learning_rates(total_steps, start_learning_rate, end_learning_rate=0.0, warmup_steps=0, decay='linear',
                   power=1.0):
    """Per-step learning rates.

    Step ``i`` (0-based) of warm-up gets ``start * (i + 1) / warmup_steps``; then, with ``n`` decay steps and
    ``p = j / (n - 1)`` for decay step ``j`` (``p = 1`` when ``n == 1``):

    * linear: ``start + (end - start) * p``
    * cosine: ``end + (start - end) * (1 + cos(pi * p)) / 2``
    * polynomial: ``end + (start - end) * (1 - p) ** power``
    * constant: ``start``

    so the first decay step runs at ``start`` and the last at ``end``.

    Args:
        total_steps (int): steps of the run, > 0.
        start_learning_rate (float): the peak rate, > 0.
        end_learning_rate (float): the last step's rate, >= 0.
        warmup_steps (int): warm-up steps, >= 0 (at most ``total_steps``).
        decay (str): 'linear', 'cosine', 'polynomial' or 'constant'.
        power (float): exponent of the polynomial decay.

    Returns:
        list[float] of length ``total_steps``.

    Example:
        >>> [round(x, 3) for x in learning_rates(5, 1.0, 0.0, warmup_steps=2)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    owner = 'learning_rates'
    check_int('total_steps', total_steps, owner)
    check_real('start_learning_rate', start_learning_rate, owner, min_value=0, min_inclusive=False)
    check_real('end_learning_rate', end_learning_rate, owner, min_value=0)
    check_int('warmup_steps', warmup_steps, owner, min_value=0)
    check_choice('decay', decay, owner, DECAYS)
    check_real('power', power, owner, min_value=0, min_inclusive=False)
    # A run shorter than the warm-up stops part-way up the ramp (the ramp is not compressed).
    warmup = min(warmup_steps, total_steps)
    rates = [start_learning_rate * (i + 1) / warmup_steps for i in range(warmup)]
    remaining = total_steps - warmup
    for j in range(remaining):
        p = j / (remaining - 1) if remaining > 1 else 1.0
        if decay == 'constant':
            rate = start_learning_rate
        elif decay == 'linear':
            rate = start_learning_rate + (end_learning_rate - start_learning_rate) * p
        elif decay == 'cosine':
            rate = end_learning_rate + (start_learning_rate - end_learning_rate) * (1 + math.cos(math.pi * p)) / 2
        else:
            rate = end_learning_rate + (start_learning_rate - end_learning_rate) * (1 - p) ** power
        rates.append(float(rate))
    return rates


__all__ = ['learning_rates', 'DECAYS']
