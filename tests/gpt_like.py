"""A tiny GPT-style decoder written with plain MindSpore only (no knowledge of mindpet), as users' models are.

Parameter names follow the usual layout: ``embed.embedding_table``, ``blocks.<i>.attn.{q,k,v,out}_proj``,
``blocks.<i>.mlp.{fc_in,fc_out}``, ``ln_f``, ``lm_head``.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor, Parameter


class Attention(nn.Cell):
    """Causal multi-head self-attention."""

    def __init__(self, hidden, heads, seq_len):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.q_proj = nn.Dense(hidden, hidden)
        self.k_proj = nn.Dense(hidden, hidden)
        self.v_proj = nn.Dense(hidden, hidden)
        self.out_proj = nn.Dense(hidden, hidden)
        mask = np.triu(np.full((seq_len, seq_len), -1e9, np.float32), k=1)
        self.mask = Tensor(mask)
        self.scale = 1.0 / float(np.sqrt(self.head_dim))

    def _split(self, x, batch, seq):
        return ops.transpose(ops.reshape(x, (batch, seq, self.heads, self.head_dim)), (0, 2, 1, 3))

    def construct(self, x):
        batch, seq, hidden = x.shape
        q = self._split(self.q_proj(x), batch, seq)
        k = self._split(self.k_proj(x), batch, seq)
        v = self._split(self.v_proj(x), batch, seq)
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * self.scale + self.mask[:seq, :seq]
        context = ops.matmul(ops.softmax(scores, axis=-1), v)
        context = ops.reshape(ops.transpose(context, (0, 2, 1, 3)), (batch, seq, hidden))
        return self.out_proj(context)


class MLP(nn.Cell):
    def __init__(self, hidden):
        super().__init__()
        self.fc_in = nn.Dense(hidden, 4 * hidden)
        self.fc_out = nn.Dense(4 * hidden, hidden)

    def construct(self, x):
        return self.fc_out(ops.gelu(self.fc_in(x)))


class Block(nn.Cell):
    def __init__(self, hidden, heads, seq_len):
        super().__init__()
        self.ln_1 = nn.LayerNorm((hidden,))
        self.attn = Attention(hidden, heads, seq_len)
        self.ln_2 = nn.LayerNorm((hidden,))
        self.mlp = MLP(hidden)

    def construct(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPTLike(nn.Cell):
    """Token ids ``(batch, seq)`` int32 -> logits ``(batch, seq, vocab)``."""

    def __init__(self, vocab=64, hidden=32, layers=2, heads=4, seq_len=16, seed=0):
        super().__init__()
        ms.set_seed(seed)
        np.random.seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = Parameter(Tensor(np.random.randn(seq_len, hidden).astype(np.float32) * 0.02), name='pos')
        self.blocks = nn.CellList([Block(hidden, heads, seq_len) for _ in range(layers)])
        self.ln_f = nn.LayerNorm((hidden,))
        self.lm_head = nn.Dense(hidden, vocab, has_bias=False)

    def construct(self, input_ids):
        x = self.embed(input_ids) + self.pos[:input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class LMLoss(nn.Cell):
    """Mean token cross-entropy of a causal LM: ``loss(input_ids, labels)``."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, input_ids, labels):
        logits = self.net(input_ids)
        vocab = logits.shape[-1]
        return ops.cross_entropy(ops.reshape(logits, (-1, vocab)), ops.reshape(labels, (-1,)))


def base_weights(seed=0, **kwargs):
    """name -> numpy copy of a freshly built GPTLike's parameters (a 'pretrained' base)."""
    return {p.name: p.asnumpy().copy() for p in GPTLike(seed=seed, **kwargs).get_parameters()}


def token_batch(task, batch=8, seq=16, vocab=64, seed=0):
    """(input_ids, labels) int32 for a toy task: 'shift' predicts (t + 1) % vocab, 'double' (2 t) % vocab."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, size=(batch, seq)).astype(np.int32)
    labels = (ids + 1) % vocab if task == 'shift' else (2 * ids) % vocab
    return Tensor(ids), Tensor(labels.astype(np.int32))


def train(net, task, steps=8, lr=0.01, seed=0):
    """Train ``net``'s trainable parameters on ``task`` (GRAPH or PyNative, whatever the context is); returns the
    losses."""
    loss_net = LMLoss(net)
    opt = nn.Adam(net.trainable_params(), learning_rate=lr)
    step = nn.TrainOneStepCell(loss_net, opt)
    step.set_train()
    ids, labels = token_batch(task, seed=seed)
    losses = [float(step(ids, labels).asnumpy()) for _ in range(steps)]
    net.set_train(False)
    return losses
