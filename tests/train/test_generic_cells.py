"""The built-in task's Cells in GRAPH_MODE after their graph ran once: the CPU fallbacks compute the mint cells'
formulas with the same Parameter objects (names kept), ModelCall passes what construct names, and the
classification loss is the NumPy cross-entropy."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import mint, nn, Tensor

from mindpet.train.generic import (ClassicLayerNorm, ClassificationLoss, GatherEmbedding, ModelCall,
                                   apply_cpu_fallbacks)


@pytest.fixture(autouse=True)
def _graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


class MintNet(nn.Cell):
    def __init__(self):
        super().__init__()
        self.embed = mint.nn.Embedding(11, 6)
        self.norm = mint.nn.LayerNorm(6, eps=1e-6)
        self.out = nn.Dense(6, 3)

    def construct(self, ids):
        return self.out(self.norm(self.embed(ids)))


def _numpy_forward(net, ids):
    params = {p.name: p.asnumpy().astype(np.float64) for p in net.get_parameters()}
    x = params['embed.weight'][ids]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    x = x * params['norm.weight'] + params['norm.bias']
    return x @ params['out.weight'].T + params['out.bias']


def test_cpu_fallbacks_compute_the_mint_formulas_with_the_same_parameters():
    net = MintNet()
    originals = {p.name: p for p in net.get_parameters()}
    assert apply_cpu_fallbacks(net) == 2
    assert isinstance(net.embed, GatherEmbedding) and isinstance(net.norm, ClassicLayerNorm)
    assert {p.name: p for p in net.get_parameters()} == originals        # same objects, same names
    ids = np.random.default_rng(0).integers(0, 11, (2, 5)).astype(np.int32)
    rng = np.random.default_rng(1)
    for _ in range(2):       # the second time after the graph ran: new Parameter data is seen
        for param in net.get_parameters():
            param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32)))
        np.testing.assert_allclose(net(Tensor(ids)).asnumpy(), _numpy_forward(net, ids), rtol=1e-4, atol=1e-4)


class MaskedNet(nn.Cell):
    def __init__(self):
        super().__init__()
        self.out = nn.Dense(4, 3)

    def construct(self, input_ids, attention_mask=None, token_type_ids=None, return_dict=True):
        features = ms.ops.stack([input_ids.astype(ms.float32).sum(1), attention_mask.astype(ms.float32).sum(1),
                                 token_type_ids.astype(ms.float32).sum(1), input_ids[:, 0].astype(ms.float32)], 1)
        logits = self.out(features)
        if return_dict:
            return {'logits': logits}
        return (logits, features)


def test_model_call_and_the_classification_loss():
    net = MaskedNet()
    call = ModelCall(net)
    assert call.pass_mask and call.pass_token_types and call.pass_return_dict
    ids = np.array([[1, 2, 0], [3, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    labels = np.array([2, 0], np.int32)
    loss = ClassificationLoss(net)
    rng = np.random.default_rng(0)
    for _ in range(2):
        for param in net.get_parameters():
            param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32)))
        features = np.stack([ids.sum(1), mask.sum(1), np.zeros(2), ids[:, 0]], 1).astype(np.float64)
        logits = features @ net.out.weight.asnumpy().T + net.out.bias.asnumpy()
        np.testing.assert_allclose(call(Tensor(ids), Tensor(mask)).asnumpy(), logits, rtol=1e-5, atol=1e-5)
        log_probs = logits - logits.max(1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
        np.testing.assert_allclose(float(loss(Tensor(ids), Tensor(mask), Tensor(labels)).asnumpy()),
                                   -log_probs[np.arange(2), labels].mean(), rtol=1e-5)
