"""A decoder-only language model in the shape of PanGu-alpha, with attention that accepts prefix keys/values.

PanGu-alpha (Zeng et al., 2021) is a GPT-style pre-LayerNorm transformer with one twist: its last layer is a *top
query layer* whose queries come from a separate learned position embedding (``top_query_embedding``) instead of the
hidden states, while keys and values come from the hidden states of the ``num_layers - 1`` ordinary blocks. The
output logits reuse the word embedding (tied weights). Parameter paths follow MindSpore's PanGu-alpha::

    backbone.word_embedding.embedding_table, backbone.position_embedding.embedding_table
    backbone.blocks.N.{layernorm1, attention.{dense1, dense2, dense3, projection}, layernorm2,
                       output.{mapping, projection}}          dense1/2/3 = query/key/value
    backbone.layernorm, backbone.top_query_embedding, backbone.top_query_layer.(same as a block)

Every attention (the blocks and the top query layer) takes optional prefix keys/values, so prefix tuning / P-Tuning
v2 plug in without touching this file: ``prefix_key_values`` holds, per layer ``i`` (``num_layers`` of them, the top
query layer last), a tensor ``(2, B, heads, P, head_dim)`` - a tuple of such tensors (what
:class:`mindpet.delta.ptuning2.PrefixEncoder` returns) or one ``(num_layers, 2, B, heads, P, head_dim)`` tensor.
Keys become ``[P_k; K]``, values ``[P_v; V]``, and the attention mask gains ``P`` always-visible columns.

:data:`TINY_CONFIG` runs on CPU; :data:`FULL_2_6B_CONFIG` records PanGu-alpha 2.6B (32 layers, hidden 2560,
32 heads, vocabulary 40000, 1024 tokens) for Ascend.
"""
from dataclasses import dataclass

import numpy as np
from mindspore import nn, ops, Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import Normal

from examples.common import ExampleConfig
from mindpet.utils.validation import check_int, check_real, check_rate

MASK_VALUE = -10000.0


@dataclass
class PanguConfig(ExampleConfig):
    """PanGu-alpha dimensions.

    Example:
        >>> PanguConfig.from_dict(FULL_2_6B_CONFIG).head_dim
        80
    """
    vocab_size: int = 64
    hidden_size: int = 64
    num_layers: int = 3
    num_heads: int = 4
    ffn_hidden_size: int = 256
    seq_length: int = 64
    dropout_rate: float = 0.0
    layernorm_eps: float = 1e-5
    pad_token_id: int = 0
    init_std: float = 0.02

    def __post_init__(self):
        owner = 'PanguConfig'
        self.check_positive_ints(('vocab_size', 'hidden_size', 'num_heads', 'ffn_hidden_size', 'seq_length'))
        # At least one ordinary block below the top query layer.
        check_int('num_layers', self.num_layers, owner, min_value=2)
        check_int('pad_token_id', self.pad_token_id, owner, min_value=0, max_value=self.vocab_size - 1)
        check_rate('dropout_rate', self.dropout_rate, owner)
        check_real('layernorm_eps', self.layernorm_eps, owner, min_value=0, min_inclusive=False)
        check_real('init_std', self.init_std, owner, min_value=0, min_inclusive=False)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"For '{owner}', the 'hidden_size' ({self.hidden_size}) must be divisible by "
                             f"'num_heads' ({self.num_heads}).")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads


TINY_CONFIG = dict(vocab_size=64, hidden_size=64, num_layers=3, num_heads=4, ffn_hidden_size=256, seq_length=64,
                   dropout_rate=0.0, layernorm_eps=1e-5, pad_token_id=0)
# PanGu-alpha 2.6B (Zeng et al. 2021, table 1; MindSpore's PanGu-alpha config: pad/eod token 6), for Ascend.
FULL_2_6B_CONFIG = dict(vocab_size=40000, hidden_size=2560, num_layers=32, num_heads=32, ffn_hidden_size=10240,
                        seq_length=1024, dropout_rate=0.1, layernorm_eps=1e-5, pad_token_id=6)


def _dense(cfg, in_channels, out_channels):
    return nn.Dense(in_channels, out_channels, weight_init=Normal(cfg.init_std))


class PanguAttention(nn.Cell):
    """Multi-head attention with optional prefix keys/values.

    Inputs:
        query_input (Tensor): ``(B, S, hidden)`` - what the queries are computed from.
        kv_input (Tensor): ``(B, S, hidden)`` - what keys and values are computed from.
        attention_mask (Tensor): ``(B, S, P + S)``, 1 where a query may attend to a key (prefix columns first).
        prefix_kv (Tensor, optional): ``(2, B, heads, P, head_dim)``: prefix keys ``[0]`` and values ``[1]``.

    Output: ``(B, S, hidden)``.
    """

    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = 1.0 / float(np.sqrt(cfg.head_dim))
        self.dense1 = _dense(cfg, cfg.hidden_size, cfg.hidden_size)
        self.dense2 = _dense(cfg, cfg.hidden_size, cfg.hidden_size)
        self.dense3 = _dense(cfg, cfg.hidden_size, cfg.hidden_size)
        self.projection = _dense(cfg, cfg.hidden_size, cfg.hidden_size)
        self.prob_dropout = nn.Dropout(p=cfg.dropout_rate)
        self.dropout = nn.Dropout(p=cfg.dropout_rate)

    def _heads(self, x):
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, query_input, kv_input, attention_mask, prefix_kv=None):
        q = self._heads(self.dense1(query_input))
        k = self._heads(self.dense2(kv_input))
        v = self._heads(self.dense3(kv_input))
        if prefix_kv is not None:
            k = ops.concat((prefix_kv[0].astype(k.dtype), k), axis=2)
            v = ops.concat((prefix_kv[1].astype(v.dtype), v), axis=2)
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) * self.scale
        additive = (1.0 - attention_mask.astype(scores.dtype)).expand_dims(1) * MASK_VALUE
        probs = ops.softmax((scores + additive).astype(mstype.float32), axis=-1)
        ctx = ops.matmul(self.prob_dropout(probs).astype(v.dtype), v).transpose(0, 2, 1, 3)
        batch, seq, _, _ = ctx.shape
        return self.dropout(self.projection(ctx.reshape(batch, seq, self.num_heads * self.head_dim)))


class PanguFeedForward(nn.Cell):
    """``projection(fast_gelu(mapping(x)))`` (hidden -> ffn_hidden_size -> hidden); PanGu-alpha's activation is
    fast GELU, ``x * sigmoid(1.702 x)``."""

    def __init__(self, cfg):
        super().__init__()
        self.mapping = _dense(cfg, cfg.hidden_size, cfg.ffn_hidden_size)
        self.projection = _dense(cfg, cfg.ffn_hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(p=cfg.dropout_rate)

    def construct(self, x):
        return self.dropout(self.projection(ops.fast_gelu(self.mapping(x))))


class PanguBlock(nn.Cell):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + ffn(ln2(x))``.

    Inputs: ``x`` ``(B, S, hidden)``, ``attention_mask`` ``(B, S, P + S)``, optional ``prefix_kv``.
    """

    def __init__(self, cfg):
        super().__init__()
        self.layernorm1 = nn.LayerNorm((cfg.hidden_size,), epsilon=cfg.layernorm_eps)
        self.attention = PanguAttention(cfg)
        self.layernorm2 = nn.LayerNorm((cfg.hidden_size,), epsilon=cfg.layernorm_eps)
        self.output = PanguFeedForward(cfg)

    def construct(self, x, attention_mask, prefix_kv=None):
        normed = self.layernorm1(x)
        x = x + self.attention(normed, normed, attention_mask, prefix_kv)
        return x + self.output(self.layernorm2(x))


class PanguQueryLayer(PanguBlock):
    """The top query layer: like a block, but the queries come from ``query_vector`` (the top query embedding of
    each position), not from the hidden states.

    Inputs: ``x`` ``(B, S, hidden)``, ``query_vector`` ``(B, S, hidden)``, ``attention_mask``, optional
    ``prefix_kv``.
    """

    def construct(self, x, query_vector, attention_mask, prefix_kv=None):
        normed = self.layernorm1(x)
        x = x + self.attention(query_vector, normed, attention_mask, prefix_kv)
        return x + self.output(self.layernorm2(x))


def extend_mask_for_prefix(attention_mask, prefix_length):
    """``(B, S, S)`` mask -> ``(B, S, prefix_length + S)``: every query may attend to every prefix position."""
    if prefix_length == 0:
        return attention_mask
    batch, seq, _ = attention_mask.shape
    return ops.concat((ops.ones((batch, seq, prefix_length), attention_mask.dtype), attention_mask), axis=2)


class PanguAlphaModel(nn.Cell):
    """The PanGu-alpha backbone: ids ``(B, S)`` -> hidden states ``(B, S, hidden)`` after the top query layer.

    Inputs:
        input_ids (Tensor): int32 ``(B, S)`` with ``S <= seq_length``; ``pad_token_id`` marks padding.
        prefix_key_values (tuple[Tensor] | Tensor, optional): per-layer prefix keys/values (module docstring).

    The mask is causal and hides padded keys.
    """

    def __init__(self, cfg):
        super().__init__()
        init = Normal(cfg.init_std)
        self.pad_token_id = cfg.pad_token_id
        self.word_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size, embedding_table=init)
        self.position_embedding = nn.Embedding(cfg.seq_length, cfg.hidden_size, embedding_table=init)
        self.top_query_embedding = nn.Embedding(cfg.seq_length, cfg.hidden_size, embedding_table=init)
        self.embedding_dropout = nn.Dropout(p=cfg.dropout_rate)
        self.blocks = nn.CellList([PanguBlock(cfg) for _ in range(cfg.num_layers - 1)])
        self.layernorm = nn.LayerNorm((cfg.hidden_size,), epsilon=cfg.layernorm_eps)
        self.top_query_layer = PanguQueryLayer(cfg)
        self.causal = Tensor(np.tril(np.ones((cfg.seq_length, cfg.seq_length), np.float32)))

    def construct(self, input_ids, prefix_key_values=None):
        batch, seq = input_ids.shape
        positions = ops.arange(seq, dtype=mstype.int32).reshape(1, seq)
        hidden = self.embedding_dropout(self.word_embedding(input_ids) + self.position_embedding(positions))
        key_visible = (input_ids != self.pad_token_id).astype(mstype.float32).reshape(batch, 1, seq)
        mask = self.causal[:seq, :seq].reshape(1, seq, seq) * key_visible
        if prefix_key_values is None:
            for block in self.blocks:
                hidden = block(hidden, mask)
            hidden = self.layernorm(hidden)
            query = ops.broadcast_to(self.top_query_embedding(positions), hidden.shape)
            return self.top_query_layer(hidden, query, mask)
        mask = extend_mask_for_prefix(mask, prefix_key_values[0].shape[-2])
        index = 0
        for block in self.blocks:
            hidden = block(hidden, mask, prefix_key_values[index])
            index = index + 1
        hidden = self.layernorm(hidden)
        query = ops.broadcast_to(self.top_query_embedding(positions), hidden.shape)
        return self.top_query_layer(hidden, query, mask, prefix_key_values[index])


class PanguAlphaForCausalLM(nn.Cell):
    """Backbone + tied output head: ids ``(B, S)`` -> float32 logits ``(B, S, vocab)``.

    Args:
        config (PanguConfig | dict): dimensions (:data:`TINY_CONFIG`, :data:`FULL_2_6B_CONFIG`).

    Inputs: ``input_ids`` int32 ``(B, S)``, optional ``prefix_key_values``.

    Example:
        >>> net = PanguAlphaForCausalLM(TINY_CONFIG)
        >>> net(ms.Tensor(np.ones((2, 10), np.int32))).shape
        (2, 10, 64)
    """

    def __init__(self, config):
        super().__init__()
        self.config = config if isinstance(config, PanguConfig) else PanguConfig.from_dict(config)
        self.backbone = PanguAlphaModel(self.config)

    def construct(self, input_ids, prefix_key_values=None):
        hidden = self.backbone(input_ids, prefix_key_values)
        table = self.backbone.word_embedding.embedding_table
        return ops.matmul(hidden, table.astype(hidden.dtype).T).astype(mstype.float32)


class CausalLMWithLoss(nn.Cell):
    """Next-token cross-entropy, averaged over real (non-pad) target tokens.

    Inputs: ``input_ids`` int32 ``(B, S)``, optional ``prefix_key_values``. Position ``s`` predicts token
    ``s + 1``. Output: scalar float32 loss.
    """

    def __init__(self, network):
        # auto_prefix=False: wrapping must not rename the network's parameters (checkpoint names).
        super().__init__(auto_prefix=False)
        self.network = network
        self.pad_token_id = network.config.pad_token_id

    def construct(self, input_ids, prefix_key_values=None):
        logits = self.network(input_ids, prefix_key_values)
        batch, seq, vocab = logits.shape
        targets = input_ids[:, 1:].reshape(-1)
        losses = ops.cross_entropy(logits[:, :-1].reshape(batch * (seq - 1), vocab), targets, reduction='none')
        weights = (targets != self.pad_token_id).astype(mstype.float32)
        return (losses * weights).sum() / ops.clamp(weights.sum(), min=1.0)


def greedy_generate(network, prompt_ids, max_new_tokens, eos_id=None, prefix_key_values=None):
    """Greedy decoding: repeatedly append the most likely next token.

    The network always sees a fixed ``(B, seq_length)`` input (right-padded), so one compiled graph serves every
    step; the causal mask makes the padding invisible to real tokens.

    Args:
        network (PanguAlphaForCausalLM): the model (put in inference mode here).
        prompt_ids (list[list[int]]): one token-id list per sequence.
        max_new_tokens (int): tokens to add (stops earlier at ``seq_length`` or when every row produced ``eos_id``).
        eos_id (int | None): end-of-sequence id.
        prefix_key_values: passed through to the network.

    Returns:
        list[list[int]]: the generated ids (without the prompts, without the final eos).
    """
    check_int('max_new_tokens', max_new_tokens, 'greedy_generate', min_value=0)
    cfg = network.config
    pad = cfg.pad_token_id
    lengths = [len(p) for p in prompt_ids]
    if min(lengths) < 1 or max(lengths) > cfg.seq_length:
        raise ValueError(f"For 'greedy_generate', each prompt must hold 1 to {cfg.seq_length} tokens, but got "
                         f"lengths {lengths}.")
    ids = np.full((len(prompt_ids), cfg.seq_length), pad, np.int32)
    for row, prompt in enumerate(prompt_ids):
        ids[row, :len(prompt)] = prompt
    outputs = [[] for _ in prompt_ids]
    done = [False] * len(prompt_ids)
    network.set_train(False)
    for _ in range(max_new_tokens):
        if all(done):
            break
        logits = network(Tensor(ids), prefix_key_values).asnumpy()
        for row, length in enumerate(lengths):
            if done[row] or length >= cfg.seq_length:
                done[row] = True
                continue
            token = int(np.argmax(logits[row, length - 1]))
            if eos_id is not None and token == eos_id:
                done[row] = True
                continue
            ids[row, length] = token
            outputs[row].append(token)
            lengths[row] = length + 1
    return outputs


__all__ = ['PanguConfig', 'TINY_CONFIG', 'FULL_2_6B_CONFIG', 'PanguAttention', 'PanguBlock', 'PanguQueryLayer',
           'PanguAlphaModel', 'PanguAlphaForCausalLM', 'CausalLMWithLoss', 'extend_mask_for_prefix',
           'greedy_generate']
