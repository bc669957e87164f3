"""R-Drop (Liang et al., 2021): regularise a model by the disagreement of two dropout passes over the same input.

Feed the model a batch whose rows are repeated in pairs (``rdrop_repeat``: ``[a, a, b, b, ...]``), so both copies
of a row go through the network in the SAME call with DIFFERENT dropout masks. (Calling the model twice does not
work in GRAPH_MODE: the same dropout op gives the same mask within a compiled step.) Then, with ``p1``/``p2`` the
softmax outputs of the two copies::

    loss = CE(logits, labels) + w * alpha * sum_pairs [ KL(p1 || p2) + KL(p2 || p1) ]

``CE`` is the mean cross-entropy over all 2B rows (labels equal to -100 are ignored, as ``nn.CrossEntropyLoss``),
which is the mean of the two passes' cross-entropies, and the KL sum runs over the pairs and every position/class.
The weight ``w`` is chosen by ``kl_reduction``:

- ``'mindpet'`` (default): ``w = 1/4``, MindPet 1.0.4's weighting, so an ``alpha`` tuned with MindPet means the same
  here (the drop-in contract);
- ``'reference'``: ``w = 1/2``, the R-Drop authors' code (``ce_loss + alpha * (sum KL(q||p) + sum KL(p||q)) / 2``),
  so an ``alpha`` from the paper means the same.

MindPet's ``alpha = 4`` is therefore the reference's ``alpha = 2``. In both, the KL term is a sum (not a mean), so its
weight relative to the cross-entropy grows with the batch size and the number of positions.
"""
import numpy as np
from mindspore import nn, ops, Tensor
from mindspore import dtype as mstype

from mindpet.delta.sharding import apply_strategies
from mindpet.utils.validation import check_int, check_choice

IGNORE_INDEX = -100
#: ``kl_reduction`` -> the weight ``w`` of ``alpha * summed symmetric KL`` (see the module docstring)
KL_WEIGHTS = {'mindpet': 0.25, 'reference': 0.5}


class RDropLoss(nn.Cell):
    """Cross-entropy plus the symmetric KL between the paired rows of an R-Drop batch.

    Args:
        kl_reduction (str): how ``alpha`` weights the summed symmetric KL: ``'mindpet'`` (default, MindPet 1.0.4's
            ``alpha / 4``) or ``'reference'`` (the R-Drop reference code's ``alpha / 2``). The two give the same loss
            for ``alpha_mindpet = 2 * alpha_reference``.

    Inputs:
        logits (Tensor): ``(2B, ..., C)`` float16/float32, rows ``2i`` and ``2i + 1`` the two passes of sample i.
        label_ids (Tensor): int labels of shape ``(2B, ...)`` (or any shape with as many elements as the
            logits have rows of C); -100 marks ignored positions.
        alpha (float): weight of the KL term. Default 4.

    Outputs:
        Scalar float32 Tensor.

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindpet.delta.r_drop import RDropLoss, rdrop_repeat
        >>> logits = ms.Tensor(np.random.randn(4, 3).astype(np.float32))
        >>> labels, = rdrop_repeat(ms.Tensor(np.array([0, 2], np.int32)))
        >>> RDropLoss()(logits, labels, alpha=4).shape
        ()
        >>> float(RDropLoss('reference')(logits, labels, alpha=2)) == float(RDropLoss()(logits, labels, alpha=4))
        True
    """

    def __init__(self, kl_reduction='mindpet'):
        super().__init__()
        self.kl_reduction = check_choice('kl_reduction', kl_reduction, type(self).__name__, tuple(KL_WEIGHTS))
        self.kl_weight = KL_WEIGHTS[self.kl_reduction]
        self.cast = ops.Cast()
        self.reshape = ops.Reshape()
        self.log_softmax = ops.LogSoftmax(axis=-1)
        self.one_hot = ops.OneHot(axis=-1)
        self.not_equal = ops.NotEqual()
        self.ce_mul = ops.Mul()
        self.ce_sum = ops.ReduceSum()
        self.valid_sum = ops.ReduceSum()
        self.split_pairs = ops.Split(axis=1, output_num=2)
        self.exp = ops.Exp()
        self.prob_sub = ops.Sub()
        self.log_sub = ops.Sub()
        self.kl_mul = ops.Mul()
        self.kl_sum = ops.ReduceSum()
        self.on_value = Tensor(1.0, mstype.float32)
        self.off_value = Tensor(0.0, mstype.float32)

    def construct(self, logits, label_ids, alpha=4):
        rows = logits.shape[0]
        if rows % 2 != 0:
            raise ValueError(f"For 'RDropLoss', the 'logits' must have an even number of rows (pairs made by "
                             f"rdrop_repeat), but got {rows}.")
        num_classes = logits.shape[-1]
        log_probs = self.log_softmax(self.cast(self.reshape(logits, (-1, num_classes)), mstype.float32))
        labels = self.cast(self.reshape(label_ids, (-1,)), mstype.int32)
        # One-hot of an ignored label (-100) is all zeros, so it adds nothing to the sum; it is also left out
        # of the count the mean divides by.
        one_hot = self.one_hot(labels, num_classes, self.on_value, self.off_value)
        valid = self.cast(self.not_equal(labels, IGNORE_INDEX), mstype.float32)
        ce = -self.ce_sum(self.ce_mul(one_hot, log_probs)) / ops.maximum(self.valid_sum(valid), 1.0)
        # Row 2i and 2i + 1 are the two passes: (2B * R, C) -> (B, 2, R, C).
        pairs = self.reshape(log_probs, (rows // 2, 2, -1, num_classes))
        log_p1, log_p2 = self.split_pairs(pairs)
        # KL(p1||p2) + KL(p2||p1) = sum (p1 - p2)(log p1 - log p2): exactly 0 when the passes agree.
        kl = self.kl_sum(self.kl_mul(self.prob_sub(self.exp(log_p1), self.exp(log_p2)),
                                     self.log_sub(log_p1, log_p2)))
        return ce + alpha * self.kl_weight * kl

    def shard(self, data_parallel=1):
        """Strategies over the rows (``data_parallel`` devices)."""
        dp = check_int('data_parallel', data_parallel, 'RDropLoss')
        apply_strategies('RDropLoss', [
            (self.log_softmax, 'strategy_log_softmax', ((dp, 1),), (2,)),
            (self.one_hot, 'strategy_one_hot', ((dp, 1), (), ()), (2, 0, 0)),
            (self.ce_mul, 'strategy_ce_mul', ((dp, 1), (dp, 1)), (2, 2)),
            (self.exp, 'strategy_exp', ((dp, 1, 1, 1),), (4,)),
            (self.prob_sub, 'strategy_prob_sub', ((dp, 1, 1, 1), (dp, 1, 1, 1)), (4, 4)),
            (self.log_sub, 'strategy_log_sub', ((dp, 1, 1, 1), (dp, 1, 1, 1)), (4, 4)),
            (self.kl_mul, 'strategy_kl_mul', ((dp, 1, 1, 1), (dp, 1, 1, 1)), (4, 4)),
        ])
        return self


def rdrop_repeat(*tensors):
    """Repeat every row of each input twice, interleaved: rows ``[a, b]`` become ``[a, a, b, b]``.

    Works on MindSpore Tensors (also inside a GRAPH_MODE ``construct``) and on numpy arrays (data pipelines).

    Args:
        *tensors (Tensor | numpy.ndarray): inputs with a leading batch axis.

    Returns:
        tuple with one repeated input per argument (a tuple even for a single input, as MindPet).

    Example:
        >>> import numpy as np
        >>> from mindpet.delta.r_drop import rdrop_repeat
        >>> rdrop_repeat(np.array([[1, 2], [3, 4]]))[0].tolist()
        [[1, 2], [1, 2], [3, 4], [3, 4]]
    """
    if not tensors:
        raise ValueError("For 'rdrop_repeat', at least one tensor must be given.")
    out = ()
    for index, item in enumerate(tensors):
        if not isinstance(item, (np.ndarray, Tensor)):
            raise TypeError(f"For 'rdrop_repeat', the 'tensors[{index}]' must be a mindspore Tensor or a numpy "
                            f"array, but got {type(item).__name__}.")
        if not item.shape:
            raise ValueError(f"For 'rdrop_repeat', the 'tensors[{index}]' must have a batch axis, but got a "
                             f"0-d {type(item).__name__}.")
        out += (np.repeat(item, 2, axis=0) if isinstance(item, np.ndarray) else _repeat_rows(item),)
    return out


def _repeat_rows(x):
    shape = x.shape
    # (B, ...) -> (B, 1, ...) -> (B, 2, ...) -> (2B, ...): broadcast + reshape, an op set every backend has.
    doubled = ops.broadcast_to(ops.expand_dims(x, 1), (shape[0], 2) + shape[1:])
    return ops.reshape(doubled, (shape[0] * 2,) + shape[1:])
