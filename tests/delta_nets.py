"""Tiny networks, NumPy references and a checked training loop shared by the delta-method tests."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Tensor

from mindpet.delta import PrefixAttention
from mindpet.delta.r_drop import RDropLoss, rdrop_repeat
from mindpet.graph import freeze_delta

from tests.nets import snapshot

# ----- NumPy references -------------------------------------------------------------------------------------------


def np_gelu(x):
    """The tanh approximation MindSpore's GeLU uses."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_attention(x, mask, weights, num_heads, prefix_key=None, prefix_value=None):
    """Causal multi-head attention with an optional prefix, in float64.

    weights: dict name -> (W, b) for dense1..3 and projection; prefix_*: (heads, P, d) shared by the batch."""
    x = x.astype(np.float64)
    batch, seq, hidden = x.shape
    d = hidden // num_heads

    def proj(name, t):
        w, b = weights[name]
        return t @ w.T.astype(np.float64) + b

    def heads(t):
        return t.reshape(batch, seq, num_heads, d).transpose(0, 2, 1, 3)

    q, k, v = (heads(proj(n, x)) for n in ('dense1', 'dense2', 'dense3'))
    mask = mask.astype(np.float64)
    if prefix_key is not None:
        pk = np.broadcast_to(prefix_key, (batch,) + prefix_key.shape)
        pv = np.broadcast_to(prefix_value, (batch,) + prefix_value.shape)
        k, v = np.concatenate([pk, k], 2), np.concatenate([pv, v], 2)
        mask = np.concatenate([np.ones((batch, seq, prefix_key.shape[1])), mask], -1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + (1.0 - mask[:, None]) * -10000.0
    context = (np_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(batch, seq, hidden)
    return proj('projection', context)


def dense_weights(cell):
    """name -> (W, b) numpy of a PrefixAttention's projections."""
    return {name: (getattr(cell, name).weight.asnumpy(), getattr(cell, name).bias.asnumpy())
            for name in ('dense1', 'dense2', 'dense3', 'projection')}


def randomise(params, seed=0, scale=0.5):
    """Give every Parameter new random data through set_data (what a compiled graph must pick up)."""
    rng = np.random.RandomState(seed)
    for param in params:
        data = rng.randn(*param.shape).astype(np.float32) * scale
        param.set_data(Tensor(data, param.dtype))


def assert_formula_after_graph_ran(cell, inputs, reference, params, tol, seed=1, scale=0.5):
    """``cell(*inputs)`` equals ``reference()`` (float64 NumPy) at init and again after every Parameter in
    ``params`` got new data: the second call reuses the compiled graph, which must see the new data."""
    for call in range(2):
        if call:
            randomise(params, seed=seed, scale=scale)
        out = cell(*(Tensor(a) for a in inputs))
        np.testing.assert_allclose(out.asnumpy().astype(np.float64), reference(), atol=tol, rtol=tol)
    return out


def causal_mask(batch, seq):
    return Tensor(np.tile(np.tril(np.ones((seq, seq), np.float32)), (batch, 1, 1)))


# ----- Tiny networks ----------------------------------------------------------------------------------------------


class TwoLayerNet(nn.Cell):
    """fc1 -> relu -> fc2 -> head, the two fc layers built by ``make_layer(in, out, seed)``."""

    def __init__(self, make_layer, in_dim=8, hidden=16, out_dim=4):
        super().__init__()
        self.fc1 = make_layer(in_dim, hidden, 1)
        self.fc2 = make_layer(hidden, hidden, 2)
        self.act = nn.ReLU()
        self.head = nn.Dense(hidden, out_dim, weight_init=fixed_weight(out_dim, hidden, 3))

    def construct(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


def fixed_weight(out_dim, in_dim, seed):
    return Tensor(np.random.RandomState(seed).randn(out_dim, in_dim).astype(np.float32) * 0.3)


class CausalLMBlock(nn.Cell):
    """Pre-norm transformer block around the shipped PrefixAttention."""

    def __init__(self, hidden, heads, prefix=None):
        super().__init__()
        self.attention_norm = nn.LayerNorm((hidden,))
        self.attention = PrefixAttention(hidden, heads, prefix=prefix)
        self.ffn_norm = nn.LayerNorm((hidden,))
        self.ffn_in = nn.Dense(hidden, 2 * hidden, activation='relu')
        self.ffn_out = nn.Dense(2 * hidden, hidden)

    def construct(self, x, mask, prefix_key=None, prefix_value=None):
        x = x + self.attention(self.attention_norm(x), mask, prefix_key, prefix_value)
        return x + self.ffn_out(self.ffn_in(self.ffn_norm(x)))


class TinyCausalLM(nn.Cell):
    """A Pangu-shaped causal LM: token + position embeddings, blocks, LayerNorm, LM head.

    ``make_prefix(layer_index)`` gives each block a prefix Cell (Prefix-Tuning); ``prefix_encoder`` gives all
    blocks their prefixes from one P-Tuning v2 ``PrefixEncoder``.
    """

    def __init__(self, vocab=13, hidden=16, heads=2, layers=2, seq=6, batch=4, make_prefix=None,
                 prefix_encoder=None):
        super().__init__()
        ms.set_seed(0)
        self.batch, self.seq = batch, seq
        self.embedding = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(seq, hidden)
        self.blocks = nn.CellList([CausalLMBlock(hidden, heads, make_prefix(i) if make_prefix else None)
                                   for i in range(layers)])
        self.norm = nn.LayerNorm((hidden,))
        self.head = nn.Dense(hidden, vocab, has_bias=False)
        self.prefix_encoder = prefix_encoder
        self.positions = Tensor(np.arange(seq, dtype=np.int32)[None])
        self.mask = causal_mask(batch, seq)

    def construct(self, input_ids):
        x = self.embedding(input_ids) + self.position(self.positions)
        if self.prefix_encoder is not None:
            prefixes = self.prefix_encoder(self.batch, ms.float32)
            for i, block in enumerate(self.blocks):
                x = block(x, self.mask, prefixes[i][0], prefixes[i][1])
        else:
            for block in self.blocks:
                x = block(x, self.mask)
        return self.head(self.norm(x))


class LMLoss(nn.Cell):
    """Mean next-token cross-entropy of a causal LM (labels are the inputs shifted by one)."""

    def __init__(self, lm):
        super().__init__(auto_prefix=False)
        self.lm = lm

    def construct(self, input_ids, labels):
        logits = self.lm(input_ids)
        return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def lm_data(batch=4, seq=6, vocab=13, seed=0):
    """Random token sequences whose next token is a fixed function of the current one (a learnable task)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (batch, seq + 1)).astype(np.int32)
    for t in range(1, seq + 1):
        ids[:, t] = (3 * ids[:, t - 1] + 1) % vocab
    return Tensor(ids[:, :-1]), Tensor(ids[:, 1:])


class DropoutClassifier(nn.Cell):
    """Dense -> ReLU -> Dropout -> Dense classifier."""

    def __init__(self, in_dim=8, hidden=32, classes=3, dropout=0.3):
        super().__init__()
        self.fc = nn.Dense(in_dim, hidden, weight_init=fixed_weight(hidden, in_dim, 4), activation='relu')
        self.dropout = nn.Dropout(p=dropout)
        self.head = nn.Dense(hidden, classes, weight_init=fixed_weight(classes, hidden, 5))

    def construct(self, x):
        return self.head(self.dropout(self.fc(x)))


class RDropTrainLoss(nn.Cell):
    """R-Drop as a training loss: repeat the batch in pairs inside the graph, one forward, RDropLoss."""

    def __init__(self, net, alpha=4):
        super().__init__(auto_prefix=False)
        self.net = net
        self.loss = RDropLoss()
        self.alpha = alpha

    def construct(self, x, labels):
        x, labels = rdrop_repeat(x, labels)
        return self.loss(self.net(x), labels, self.alpha)


class MSELossNet(nn.Cell):
    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.net = net
        self.mse = nn.MSELoss()

    def construct(self, x, y):
        return self.mse(self.net(x), y)


# ----- Checked training -------------------------------------------------------------------------------------------


class GradStep(nn.Cell):
    """One optimiser step that also returns the gradients (to check every delta parameter got one)."""

    def __init__(self, loss_net, optimizer):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.optimizer = optimizer
        self.grad_fn = ms.value_and_grad(loss_net, None, optimizer.parameters)

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        self.optimizer(grads)
        return loss, grads


def train_checked(net, loss_net, mode, inputs, steps=20, lr=0.02, exclude=None, expect_trainable=None):
    """Freeze ``net`` by ``freeze_delta(mode)``, run ``steps`` GRAPH_MODE steps and check the contract:

    loss falls; every trainable parameter got a non-zero gradient (in some step: a zero-initialised factor such as
    LoRA's B blocks its partner's first gradient) and changed; every frozen
    parameter is bit-identical. Returns (losses, before, after) where before/after map name -> numpy.
    """
    freeze_delta(net, mode, exclude=exclude)
    trainable = [p.name for p in net.trainable_params()]
    assert trainable, 'nothing to train'
    if expect_trainable is not None:
        assert sorted(trainable) == sorted(expect_trainable), trainable
    before = snapshot(net)
    opt = nn.Adam(net.trainable_params(), learning_rate=lr)
    step = GradStep(loss_net, opt)
    step.set_train()
    losses, max_grad = [], dict.fromkeys(trainable, 0.0)
    for _ in range(steps):
        loss, grads = step(*inputs)
        losses.append(float(loss.asnumpy()))
        for param, grad in zip(opt.parameters, grads):
            max_grad[param.name] = max(max_grad[param.name], float(np.abs(grad.asnumpy()).max()))
    net.set_train(False)
    after = snapshot(net)
    assert losses[-1] < 0.9 * losses[0], losses
    for name in trainable:
        assert max_grad[name] > 0, f'{name} never got a non-zero gradient'
        assert not np.array_equal(before[name], after[name]), f'{name} did not change'
    for name in set(before) - set(trainable):
        np.testing.assert_array_equal(before[name], after[name], err_msg=f'frozen {name} changed')
    return losses, before, after


def assert_bad_args(factory, good, override, exc, fragments):
    """``factory(**good | override)`` raises ``exc`` whose message has every fragment (argument, value)."""
    with pytest.raises(exc) as info:
        factory(**dict(good, **override))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
