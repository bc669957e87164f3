"""LoRADense is a DeltaDense: the shared merge/unmerge/to_dense/merged_weight act on its increment, with its
MindPet 1.0.4 names, keywords and parameter names unchanged; checked in GRAPH_MODE after the graph has run."""
import numpy as np
import mindspore as ms
import pytest

from mindpet.delta import LoRADense
from mindpet.delta.base import DeltaDense


@pytest.fixture(autouse=True)
def _graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_lora_dense_uses_the_shared_merge_and_export():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 16)).astype(np.float32)
    b = rng.standard_normal((8, 4)).astype(np.float32)
    layer = LoRADense(16, 8, lora_rank=4, lora_alpha=8, lora_a_init=ms.Tensor(a), lora_b_init=ms.Tensor(b),
                      compute_dtype=ms.float32)
    assert isinstance(layer, DeltaDense) and type(layer).merge is DeltaDense.merge
    assert type(layer).to_dense is DeltaDense.to_dense
    assert sorted(p.name for p in layer.get_parameters()) == ['bias', 'mindpet_delta_lora_a', 'mindpet_delta_lora_b',
                                                              'mindpet_state_lora_scaling', 'weight']
    w0, bias = layer.weight.asnumpy().copy(), layer.bias.asnumpy().copy()
    x = rng.standard_normal((3, 16)).astype(np.float32)
    expected = x @ (w0 + 2.0 * b @ a).T + bias
    np.testing.assert_allclose(layer(ms.Tensor(x)).asnumpy(), expected, rtol=1e-5, atol=1e-5)  # graph compiled
    np.testing.assert_allclose(layer.merged_weight(), w0 + 2.0 * b @ a, rtol=1e-6, atol=1e-6)
    layer.merge()
    np.testing.assert_allclose(layer.weight.asnumpy(), w0 + 2.0 * b @ a, rtol=1e-6, atol=1e-6)
    assert layer.mindpet_state_lora_scaling.asnumpy() == 0.0
    np.testing.assert_allclose(layer(ms.Tensor(x)).asnumpy(), expected, rtol=1e-5, atol=1e-5)  # same graph
    dense = layer.to_dense()
    np.testing.assert_array_equal(dense.weight.asnumpy(), layer.weight.asnumpy())
    with pytest.raises(RuntimeError, match='already merged'):
        layer.merge()
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.asnumpy(), w0, rtol=1e-6, atol=1e-6)
    assert layer.mindpet_state_lora_scaling.asnumpy() == pytest.approx(2.0)
    with pytest.raises(RuntimeError, match='no merged'):
        layer.unmerge()
    assert layer.dtype == ms.float32 and layer.lora_rank == 4 and layer.lora_alpha == 8 and not layer.merged
