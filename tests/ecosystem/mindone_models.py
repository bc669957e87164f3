"""Tiny mindone models built from a config (no download), made runnable on the CPU.

MindSpore 2.10 has no CPU kernel for some ``mint`` ops that mindone's models call: ``Embedding``, ``LayerNormExt``
(``mint.nn.LayerNorm``), ``GeluExt``, ``Arange`` (``mint.arange``), ``RmsNorm``. :func:`cpu_runnable` swaps the
cells that call the first two for cells computing the same function with ops that do have CPU kernels, holding
the *same Parameter objects* (names, values and training unchanged); the configs avoid GELU (``hidden_act='relu'``).
:func:`cpu_arange` puts an ``ops.arange`` equivalent in place of ``mint.arange`` while a LLaMA is built and run.
On Ascend none of this is needed. Every layer mindpet adapts here (``nn.Dense``) is mindone's own.
"""
import contextlib

import numpy as np
import mindspore as ms
from mindspore import mint, nn, ops


class GatherEmbedding(nn.Cell):
    """``mint.nn.Embedding`` without padding gradients tricks: ``weight[ids]`` (same Parameter)."""

    def __init__(self, weight):
        super().__init__(auto_prefix=False)
        self.weight = weight

    def construct(self, ids):
        return ops.gather(self.weight, ids.astype(ms.int32), 0)


class OpsLayerNorm(nn.Cell):
    """``mint.nn.LayerNorm`` over the last axis through ``ops.LayerNorm`` (same weight and bias Parameters)."""

    def __init__(self, weight, bias, eps):
        super().__init__(auto_prefix=False)
        self.weight = weight
        self.bias = bias
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        return self.norm(x, self.weight, self.bias)[0]


def cpu_runnable(model):
    """Swap ``model``'s ``mint.nn.Embedding`` and ``mint.nn.LayerNorm`` cells (see the module doc) in place.
    Returns the swapped cell names."""
    names = {id(p): p.name for p in model.get_parameters()}
    swapped = []
    for name, cell in list(model.cells_and_names()):
        for key, child in list(cell._cells.items()):  # pylint: disable=protected-access
            if isinstance(child, mint.nn.Embedding):
                new = GatherEmbedding(child.weight)
            elif isinstance(child, mint.nn.LayerNorm):
                new = OpsLayerNorm(child.weight, child.bias, child.eps)
            else:
                continue
            cell.insert_child_to_cell(key, new)
            swapped.append(f'{name}.{key}' if name else key)
    assert {id(p): p.name for p in model.get_parameters()} == names  # same Parameters, same names
    return swapped


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
