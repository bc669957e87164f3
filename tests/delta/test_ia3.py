"""IA3Dense: output scaling l * (W0 x + b) and input scaling W0 (l * x) + b vs NumPy, merge, training."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

from mindpet.delta.ia3 import IA3Dense
from mindpet.graph import freeze_delta

from tests.nets import regression_data, snapshot, train_steps, relu


def _reference(layer, x, activation=None):
    w = layer.weight.asnumpy().astype(np.float64)
    vec = layer.mindpet_delta_ia3_vector.asnumpy().astype(np.float64)
    bias = layer.bias.asnumpy().astype(np.float64) if layer.has_bias else 0.0
    x64 = x.astype(np.float64)
    out = (x64 * vec) @ w.T + bias if layer.ia3_feedforward else vec * (x64 @ w.T + bias)
    return activation(out) if activation else out


def _randomise(layer, seed=3):
    shape = layer.mindpet_delta_ia3_vector.shape
    layer.mindpet_delta_ia3_vector.set_data(
        Tensor(np.random.RandomState(seed).uniform(0.5, 1.5, shape).astype(np.float32)))


@pytest.mark.parametrize('feedforward,size', [(False, 8), (True, 16)])
def test_names_shapes_init(feedforward, size):
    layer = IA3Dense(16, 8, ia3_feedforward=feedforward)
    names = {p.name: tuple(p.shape) for p in layer.get_parameters()}
    assert names == {'weight': (8, 16), 'bias': (8,), 'mindpet_delta_ia3_vector': (size,),
                     'mindpet_state_ia3_gate': ()}
    np.testing.assert_array_equal(layer.mindpet_delta_ia3_vector.asnumpy(), 1.0)


@pytest.mark.parametrize('feedforward', [False, True])
@pytest.mark.parametrize('compute_dtype,tol', [(ms.float32, 1e-5), (ms.float16, 1e-2)])
def test_matches_formula_after_graph_ran(ms_mode, feedforward, compute_dtype, tol):
    layer = IA3Dense(16, 8, ia3_feedforward=feedforward, compute_dtype=compute_dtype)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 16)).astype(np.float32)
    base = x @ layer.weight.asnumpy().T + layer.bias.asnumpy()
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), base, atol=tol, rtol=tol)
    _randomise(layer)
    out = layer(Tensor(x))
    assert out.shape == (2, 3, 8) and out.dtype == ms.float32
    np.testing.assert_allclose(out.asnumpy(), _reference(layer, x), atol=tol, rtol=tol)


@pytest.mark.parametrize('feedforward', [False, True])
def test_merge_unmerge_in_compiled_graph(graph_mode, feedforward):
    layer = IA3Dense(16, 8, ia3_feedforward=feedforward, compute_dtype=ms.float32, activation='relu')
    _randomise(layer)
    x = np.random.RandomState(6).randn(4, 16).astype(np.float32)
    w0, b0 = layer.weight.asnumpy().copy(), layer.bias.asnumpy().copy()
    vec = layer.mindpet_delta_ia3_vector.asnumpy()
    unmerged = layer(Tensor(x)).asnumpy()
    np.testing.assert_allclose(unmerged, _reference(layer, x, relu), atol=1e-5)
    layer.merge()
    if feedforward:
        np.testing.assert_array_equal(layer.weight.asnumpy(), w0 * vec[None, :])
        np.testing.assert_array_equal(layer.bias.asnumpy(), b0)
    else:
        np.testing.assert_array_equal(layer.weight.asnumpy(), vec[:, None] * w0)
        np.testing.assert_array_equal(layer.bias.asnumpy(), vec * b0)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), unmerged, atol=1e-5)
    with pytest.raises(RuntimeError, match='already merged'):
        layer.merge()
    dense = layer.to_dense()
    assert type(dense) is nn.Dense
    np.testing.assert_allclose(dense(Tensor(x)).asnumpy(), unmerged, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.asnumpy(), w0, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.bias.asnumpy(), b0, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), unmerged, atol=1e-5)


def test_merge_refuses_zero_entry():
    layer = IA3Dense(4, 3, ia3_init=Tensor(np.array([1.0, 0.0, 2.0], np.float32)))
    with pytest.raises(RuntimeError, match='exactly 0'):
        layer.merge()
    assert not layer.merged
    np.testing.assert_array_equal(layer.to_dense().weight.asnumpy()[1], 0)


class _IA3Net(nn.Cell):
    """A feed-forward block: value-like projection (output scaling), then the FF output (input scaling)."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.fc1 = IA3Dense(8, 16, compute_dtype=ms.float32,
                            weight_init=Tensor(rng.randn(16, 8).astype(np.float32) * 0.3))
        self.act = nn.ReLU()
        self.fc2 = IA3Dense(16, 4, ia3_feedforward=True, compute_dtype=ms.float32,
                            weight_init=Tensor(rng.randn(4, 16).astype(np.float32) * 0.3))

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_training_graph_mode_changes_only_ia3_vectors(graph_mode):
    net = _IA3Net()
    freeze_delta(net, 'ia3')
    assert sorted(p.name for p in net.trainable_params()) == ['fc1.mindpet_delta_ia3_vector',
                                                             'fc2.mindpet_delta_ia3_vector']
    x, y = regression_data()
    before = snapshot(net)
    losses = train_steps(net, x, y, steps=20, lr=0.1)
    assert losses[-1] < 0.8 * losses[0], losses
    after = snapshot(net)
    for name, value in before.items():
        if 'mindpet_delta_ia3' in name:
            assert np.abs(after[name] - value).max() > 1e-3, name
        else:
            np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_shard():
    layer = IA3Dense(16, 8)
    assert layer.shard(strategy_org_dense_matmul=((2, 1), (1, 1)), strategy_ia3_mul=((2, 1), (1,))) is layer
    assert layer.ia3_mul.in_strategy == ((2, 1), (1,))
    with pytest.raises(ValueError, match='strategy_ia3_mul'):
        layer.shard(strategy_ia3_mul=((2, 1),))


@pytest.mark.parametrize('override,exc,fragments', [
    (dict(ia3_feedforward=1), TypeError, ['ia3_feedforward', '1']),
    (dict(ia3_init=Tensor(np.ones((3,), np.float32))), ValueError, ['ia3_init', '(3,)', '(4,)']),
    (dict(out_channels=0), ValueError, ['out_channels', '0']),
    (dict(param_init_type=ms.int8), TypeError, ['param_init_type']),
    (dict(lora_rank=2), TypeError, ['lora_rank']),
])
def test_bad_arguments(override, exc, fragments):
    kwargs = dict(dict(in_channels=8, out_channels=4), **override)
    with pytest.raises(exc) as info:
        IA3Dense(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
