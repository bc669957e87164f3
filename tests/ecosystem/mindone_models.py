"""Tiny mindone models built from a config (no download), made runnable on the CPU.

MindSpore 2.10 has no CPU kernel for some ``mint`` ops that mindone's models call: ``Embedding``, ``LayerNormExt``
(``mint.nn.LayerNorm``), ``GeluExt``, ``Arange`` (``mint.arange``), ``RmsNorm``. :func:`cpu_runnable` applies the
library's own swaps (``mindpet.train.generic.apply_cpu_fallbacks``, what ``mindpet finetune`` does with
``model.cpu_fallbacks``): cells computing the same function with ops that do have CPU kernels, holding the *same
Parameter objects* (names, values and training unchanged); the configs avoid GELU (``hidden_act='relu'``).
:func:`cpu_arange` puts an ``ops.arange`` equivalent in place of ``mint.arange`` while a LLaMA is built and run.
On Ascend none of this is needed. Every layer mindpet adapts here (``nn.Dense``) is mindone's own.
"""
import contextlib

import numpy as np
import mindspore as ms
from mindspore import mint, nn, ops

from mindpet.train.generic import apply_cpu_fallbacks


def cpu_runnable(model):
    """:func:`mindpet.train.generic.apply_cpu_fallbacks` on ``model`` in place, checking that every Parameter
    object keeps its name. Returns how many cells were swapped."""
    names = {id(p): p.name for p in model.get_parameters()}
    count = apply_cpu_fallbacks(model)
    assert {id(p): p.name for p in model.get_parameters()} == names  # same Parameters, same names
    return count


def _arange(start=0, end=None, step=1, *, dtype=None):
    if end is None:
        start, end = 0, start
    out = ops.arange(start, end, step)
    return out if dtype is None else out.astype(dtype)


@contextlib.contextmanager
def cpu_arange():
    """``mint.arange`` computed by ``ops.arange`` (which has a CPU kernel) inside the block."""
    original = mint.arange
    mint.arange = _arange
    try:
        yield
    finally:
        mint.arange = original


def tiny_bert_config(num_labels=3):
    import transformers  # pylint: disable=import-outside-toplevel
    return transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32, hidden_act='relu',
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   num_labels=num_labels, initializer_range=0.2, attn_implementation='eager')


def tiny_bert(seed=0, num_labels=3):
    """A mindone ``BertForSequenceClassification`` (2 layers, hidden 16) with seeded weights, CPU-runnable."""
    from mindone.transformers import BertForSequenceClassification  # pylint: disable=import-outside-toplevel
    ms.set_seed(seed)
    np.random.seed(seed)
    model = BertForSequenceClassification(tiny_bert_config(num_labels))
    model.set_train(False)
    cpu_runnable(model)
    return model


def bert_batch(seed=0, batch=4, length=6, num_labels=3):
    """``(input_ids, attention_mask, token_type_ids, labels)`` int32 tensors (GRAPH_MODE needs all three
    inputs passed explicitly)."""
    rng = np.random.RandomState(seed)
    ids = ms.Tensor(rng.randint(1, 50, (batch, length)).astype(np.int32))
    mask = ms.Tensor(np.ones((batch, length), np.int32))
    types = ms.Tensor(np.zeros((batch, length), np.int32))
    labels = ms.Tensor(rng.randint(0, num_labels, (batch,)).astype(np.int32))
    return ids, mask, types, labels


class BertLogits(nn.Cell):
    """``logits = model(ids, mask, types)`` with ``return_dict=False`` (what GRAPH_MODE compiles)."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, ids, mask, types):
        return self.model(input_ids=ids, attention_mask=mask, token_type_ids=types, return_dict=False)[0]


class BertLoss(nn.Cell):
    """Mean cross-entropy of a :class:`BertLogits` network's logits against integer labels."""

    def __init__(self, logits_net):
        super().__init__(auto_prefix=False)
        self.logits_net = logits_net
        self.loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction='mean')

    def construct(self, ids, mask, types, labels):
        return self.loss(self.logits_net(ids, mask, types), labels)


def tiny_llama(seed=0):
    """A mindone ``LlamaForCausalLM`` (2 layers, hidden 32, grouped-query attention) with seeded weights,
    CPU-runnable (its rotary embedding is built under :func:`cpu_arange`)."""
    import transformers  # pylint: disable=import-outside-toplevel
    from mindone.transformers import LlamaForCausalLM  # pylint: disable=import-outside-toplevel
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      use_cache=False, initializer_range=0.2, attn_implementation='eager')
    ms.set_seed(seed)
    np.random.seed(seed)
    with cpu_arange():
        model = LlamaForCausalLM(config)
    model.set_train(False)
    cpu_runnable(model)
    return model


def llama_batch(seed=0, batch=4, length=8):
    """``(input_ids, causal_mask, position_ids, cache_position)``: the 4-D additive causal mask and the positions
    are passed in, so the forward pass needs no ``mint.arange`` (no CPU kernel)."""
    rng = np.random.RandomState(seed)
    ids = ms.Tensor(rng.randint(0, 64, (batch, length)).astype(np.int32))
    causal = np.triu(np.full((length, length), -65504.0, np.float32), 1)
    mask = ms.Tensor(np.broadcast_to(causal, (batch, 1, length, length)).copy())
    positions = np.arange(length, dtype=np.int32)
    return ids, mask, ms.Tensor(positions[None]), ms.Tensor(positions)


class LlamaLogits(nn.Cell):
    """``logits = model(ids, mask, position_ids, cache_position)`` with ``return_dict=False``."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, ids, mask, position_ids, cache_position):
        return self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                          cache_position=cache_position, return_dict=False)[0]


class NextTokenLoss(nn.Cell):
    """Mean cross-entropy of the logits at positions ``0..L-2`` against the tokens at ``1..L-1``."""

    def __init__(self, logits_net):
        super().__init__(auto_prefix=False)
        self.logits_net = logits_net
        self.loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction='mean')

    def construct(self, ids, mask, position_ids, cache_position):
        logits = self.logits_net(ids, mask, position_ids, cache_position)
        vocab = logits.shape[-1]
        return self.loss(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
