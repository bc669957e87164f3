"""R-Drop: rdrop_repeat interleaving, RDropLoss against CE + alpha/4 * symmetric KL (MindPet) and the reference
code's mean CE of both passes + alpha/2 * summed symmetric KL, different dropout masks per
pair in GRAPH_MODE (KL > 0 with dropout, exactly 0 without), 20 graph steps with LoRA, shard and bad input."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

from mindpet.delta import LoRADense, RDropLoss, rdrop_repeat

from tests.delta_nets import DropoutClassifier, RDropTrainLoss, fixed_weight, train_checked


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_rdrop_loss(logits, labels, alpha):
    """MindPet's definition with textbook KL: mean CE over non-ignored rows + alpha/4 (KL(p1||p2) + KL(p2||p1))."""
    logp = np_log_softmax(logits.astype(np.float64))
    flat, flat_labels = logp.reshape(-1, logp.shape[-1]), labels.reshape(-1)
    valid = flat_labels != -100
    ce = -flat[valid, flat_labels[valid]].mean()
    lp1, lp2 = logp[0::2], logp[1::2]
    p1, p2 = np.exp(lp1), np.exp(lp2)
    kl = (p1 * (lp1 - lp2)).sum() + (p2 * (lp2 - lp1)).sum()
    return ce + alpha / 4 * kl, kl


def np_reference_rdrop_loss(logits, labels, alpha):
    """The R-Drop authors' code, written out with two separate passes: ce = (CE(pass 1) + CE(pass 2)) / 2, each the
    mean over its own non-ignored rows; kl = (sum KL(q||p) + sum KL(p||q)) / 2 over every position and class;
    loss = ce + alpha * kl."""
    logp = np_log_softmax(logits.astype(np.float64))
    num_classes = logp.shape[-1]

    def cross_entropy(log_probs, targets):
        flat, flat_targets = log_probs.reshape(-1, num_classes), targets.reshape(-1)
        valid = flat_targets != -100
        return -flat[valid, flat_targets[valid]].mean()

    lp, lq = logp[0::2], logp[1::2]            # pass 1 (p) and pass 2 (q) of every sample
    ce = 0.5 * (cross_entropy(lp, labels[0::2]) + cross_entropy(lq, labels[1::2]))
    kl_q_p = (np.exp(lq) * (lq - lp)).sum()     # torch's kl_div(log_softmax(p), softmax(q)), summed
    kl_p_q = (np.exp(lp) * (lp - lq)).sum()
    return ce + alpha * (kl_q_p + kl_p_q) / 2


class _Repeat(nn.Cell):
    def construct(self, a, b):
        return rdrop_repeat(a, b)


def test_rdrop_repeat_interleaves_rows(ms_mode):
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = np.array([7, 8, 9], np.int32)
    out_a, out_b = _Repeat()(Tensor(a), Tensor(b)) if ms_mode == 'graph' else rdrop_repeat(Tensor(a), Tensor(b))
    np.testing.assert_array_equal(out_a.asnumpy(), [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5]])
    np.testing.assert_array_equal(out_b.asnumpy(), [7, 7, 8, 8, 9, 9])
    assert out_b.dtype == ms.int32
    (np_out,) = rdrop_repeat(a)  # numpy arrays too (data pipelines); always a tuple, as MindPet
    np.testing.assert_array_equal(np_out, out_a.asnumpy())


@pytest.mark.parametrize('args,exc,fragment', [
    ((), ValueError, 'at least one'),
    (([1, 2],), TypeError, "'tensors[0]'"),
    ((np.zeros(2), 3.0), TypeError, "'tensors[1]'"),
    ((np.array(1.0),), ValueError, "'tensors[0]'"),
    ((Tensor(np.ones(2)), Tensor(1.0)), ValueError, "'tensors[1]'"),
])
def test_rdrop_repeat_bad_input(args, exc, fragment):
    with pytest.raises(exc, match=fragment.replace('[', r'\[').replace(']', r'\]')):
        rdrop_repeat(*args)


class _Loss(nn.Cell):
    def __init__(self, alpha, kl_reduction=None):
        super().__init__()
        self.loss = RDropLoss() if kl_reduction is None else RDropLoss(kl_reduction=kl_reduction)
        self.alpha = alpha

    def construct(self, logits, labels):
        return self.loss(logits, labels, self.alpha)


@pytest.mark.parametrize('dtype,tol', [(np.float32, 1e-5), (np.float16, 1e-2)])
@pytest.mark.parametrize('shape', [(6, 5), (4, 3, 5)])
def test_loss_matches_numpy_reference(ms_mode, dtype, tol, shape):
    rng = np.random.RandomState(0)
    loss = _Loss(alpha=4)
    labels = rng.randint(0, 5, shape[:-1]).astype(np.int32)
    labels.reshape(-1)[1] = -100  # ignored, as nn.CrossEntropyLoss
    for seed in (1, 2):  # the second call runs the already-compiled graph on new data
        logits = np.random.RandomState(seed).randn(*shape).astype(dtype)
        got = float(loss(Tensor(logits), Tensor(labels)).asnumpy())
        want, kl = np_rdrop_loss(logits.astype(np.float32), labels, 4)
        assert kl > 0.1
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize('dtype,tol', [(np.float32, 1e-5), (np.float16, 1e-2)])
@pytest.mark.parametrize('shape', [(6, 5), (4, 3, 5)])
def test_reference_reduction_matches_the_reference_code(ms_mode, dtype, tol, shape):
    rng = np.random.RandomState(4)
    loss = _Loss(alpha=2, kl_reduction='reference')
    # The same label for both passes of a sample (as rdrop_repeat makes them), one position ignored in both.
    labels = np.repeat(rng.randint(0, 5, (shape[0] // 2,) + shape[1:-1]), 2, axis=0).astype(np.int32)
    labels.reshape(shape[0], -1)[0:2, 0] = -100
    for seed in (1, 2):
        logits = np.random.RandomState(seed).randn(*shape).astype(dtype)
        got = float(loss(Tensor(logits), Tensor(labels)).asnumpy())
        want = np_reference_rdrop_loss(logits.astype(np.float32), labels, 2)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        # The KL term's weight is what tells the two reductions apart: reference alpha=2 is MindPet's alpha=4,
        # and the same alpha gives the reference twice MindPet's KL term.
        mindpet_same_alpha, kl = np_rdrop_loss(logits.astype(np.float32), labels, 2)
        assert kl > 0.1
        np.testing.assert_allclose(want - mindpet_same_alpha, kl / 2, rtol=1e-6)
        np.testing.assert_allclose(got, float(_Loss(alpha=4)(Tensor(logits), Tensor(labels)).asnumpy()),
                                   rtol=tol, atol=tol)


def test_kl_reduction_is_checked():
    assert RDropLoss().kl_reduction == 'mindpet'
    with pytest.raises(ValueError, match=r"'kl_reduction' must be one of \['mindpet', 'reference'\], but got 'mean'"):
        RDropLoss(kl_reduction='mean')
    with pytest.raises(TypeError, match="'kl_reduction'"):
        RDropLoss(kl_reduction=0.5)


def test_odd_batch_is_rejected(ms_mode):
    with pytest.raises(ValueError, match='even number of rows'):
        _Loss(4)(Tensor(np.zeros((3, 4), np.float32)), Tensor(np.zeros(3, np.int32)))


class _Probe(nn.Cell):
    """One graph: repeat the batch, one forward, the logits and the loss with and without the KL term."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.net = net
        self.loss = RDropLoss()

    def construct(self, x, labels):
        x, labels = rdrop_repeat(x, labels)
        logits = self.net(x)
        return logits, self.loss(logits, labels, 4), self.loss(logits, labels, 0)


@pytest.mark.parametrize('dropout', [0.3, 0.0])
def test_two_passes_get_different_dropout_masks_in_graph_mode(graph_mode, dropout):
    net = DropoutClassifier(dropout=dropout)
    net.set_train(True)
    probe = _Probe(net)
    x = Tensor(np.random.RandomState(3).randn(8, 8).astype(np.float32))
    labels = Tensor(np.arange(8, dtype=np.int32) % 3)
    for _ in range(2):  # also on the second run of the compiled graph
        logits, with_kl, without_kl = (t.asnumpy() for t in probe(x, labels))
        _, kl = np_rdrop_loss(logits, np.repeat(labels.asnumpy(), 2), 4)
        if dropout:
            assert not np.array_equal(logits[0::2], logits[1::2])
            assert kl > 1e-3
            np.testing.assert_allclose(with_kl - without_kl, kl, rtol=1e-4)
        else:
            np.testing.assert_array_equal(logits[0::2], logits[1::2])
            assert kl == 0.0 and with_kl == without_kl


def test_twenty_graph_steps_with_lora(graph_mode):
    net = DropoutClassifier(dropout=0.2)
    net.fc = LoRADense(8, 32, lora_rank=4, lora_alpha=8, weight_init=fixed_weight(32, 8, 4), activation='relu',
                       compute_dtype=ms.float32)
    rng = np.random.RandomState(5)
    x = rng.randn(16, 8).astype(np.float32)
    labels = (x @ rng.randn(8, 3)).argmax(-1).astype(np.int32)
    train_checked(net, RDropTrainLoss(net, alpha=4), 'lora', (Tensor(x), Tensor(labels)), lr=0.02,
                  exclude=['head.*'], expect_trainable=['fc.mindpet_delta_lora_a', 'fc.mindpet_delta_lora_b',
                                                       'head.weight', 'head.bias'])


def test_shard():
    loss = RDropLoss()
    assert loss.shard(data_parallel=4) is loss
    assert loss.log_softmax.in_strategy == ((4, 1),)
    assert loss.kl_mul.in_strategy == ((4, 1, 1, 1), (4, 1, 1, 1))
    with pytest.raises(ValueError, match="'data_parallel'.*0"):
        loss.shard(0)
    with pytest.raises(TypeError, match="'data_parallel'"):
        loss.shard((2, 1))
