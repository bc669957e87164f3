"""A user's own tiny text models, named by ``model.class`` in run configs (no task code)."""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor


class TinyTextClassifier(nn.Cell):
    """``(input_ids, attention_mask) -> logits (N, num_labels)``: embeddings, masked mean, a hidden layer, a head."""

    def __init__(self, vocab_size, hidden=32, num_labels=4):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden)
        self.proj = nn.Dense(hidden, hidden, activation='relu')
        self.head = nn.Dense(hidden, num_labels)

    def construct(self, input_ids, attention_mask):
        mask = attention_mask.astype(ms.float32)[:, :, None]
        pooled = (self.embedding(input_ids) * mask).sum(axis=1) / ops.maximum(mask.sum(axis=1), 1.0)
        return self.head(self.proj(pooled))


class TinyDecoder(nn.Cell):
    """``input_ids (N, T) -> logits (N, T, vocab)``: one causal single-head attention block and an MLP."""

    def __init__(self, vocab_size, hidden=32, max_length=16):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden)
        self.position = nn.Embedding(max_length, hidden)
        self.query = nn.Dense(hidden, hidden)
        self.key = nn.Dense(hidden, hidden)
        self.value = nn.Dense(hidden, hidden)
        self.ffn = nn.Dense(hidden, hidden, activation='relu')
        self.head = nn.Dense(hidden, vocab_size)
        self.positions = Tensor(np.arange(max_length, dtype=np.int32)[None])
        self.causal = Tensor(np.triu(np.full((max_length, max_length), -1e9, np.float32), 1))
        self.scale = 1.0 / float(np.sqrt(hidden))

    def construct(self, input_ids):
        length = input_ids.shape[1]
        x = self.embedding(input_ids) + self.position(self.positions[:, :length])
        scores = ops.matmul(self.query(x), self.key(x).transpose(0, 2, 1)) * self.scale
        attention = ops.softmax(scores + self.causal[:length, :length], axis=-1)
        x = x + ops.matmul(attention, self.value(x))
        x = x + self.ffn(x)
        return self.head(x)


def build_classifier(vocab_size, hidden=32, num_labels=4):
    """A factory (``model.factory``) of :class:`TinyTextClassifier`."""
    return TinyTextClassifier(vocab_size, hidden, num_labels)


class NormedClassifier(TinyTextClassifier):
    """A classifier with a classic ``nn.LayerNorm`` (``gamma``/``beta``) and a Hugging Face-style
    ``base_model_prefix``, for the built-in weight-name map."""
    base_model_prefix = 'encoder_model'

    def __init__(self, vocab_size, hidden=32, num_labels=4):
        super().__init__(vocab_size, hidden, num_labels)
        self.norm = nn.LayerNorm((hidden,))

    def construct(self, input_ids, attention_mask):
        mask = attention_mask.astype(ms.float32)[:, :, None]
        pooled = (self.embedding(input_ids) * mask).sum(axis=1) / ops.maximum(mask.sum(axis=1), 1.0)
        return self.head(self.proj(self.norm(pooled)))


class CachedTinyDecoder(TinyDecoder):
    """:class:`TinyDecoder` with a Hugging Face-style KV cache: ``use_cache=True`` returns ``(logits, (keys,
    values))``, and ``past_key_values`` continues from them (the new tokens attend to the cached positions)."""

    def construct(self, input_ids, past_key_values=None, use_cache=False):
        length = input_ids.shape[1]
        start = 0
        if past_key_values is not None:
            start = past_key_values[0].shape[1]
        x = self.embedding(input_ids) + self.position(self.positions[:, start:start + length])
        keys, values = self.key(x), self.value(x)
        if past_key_values is not None:
            keys = ops.concat((past_key_values[0], keys), 1)
            values = ops.concat((past_key_values[1], values), 1)
        total = start + length
        scores = ops.matmul(self.query(x), keys.transpose(0, 2, 1)) * self.scale
        attention = ops.softmax(scores + self.causal[start:total, :total], axis=-1)
        x = x + ops.matmul(attention, values)
        x = x + self.ffn(x)
        logits = self.head(x)
        if use_cache:
            return logits, (keys, values)
        return logits
