"""DoRADense against W = m (W0 + s B A) / ||W0 + s B A||_row, merge/unmerge in a compiled graph, training."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

from mindpet.delta.dora import DoRADense
from mindpet.graph import freeze_delta

from tests.nets import regression_data, snapshot, train_steps, relu


def _reference(layer, x, activation=None):
    w0 = layer.weight.asnumpy().astype(np.float64)
    a = layer.mindpet_delta_dora_a.asnumpy().astype(np.float64)
    b = layer.mindpet_delta_dora_b.asnumpy().astype(np.float64)
    m = layer.mindpet_delta_dora_magnitude.asnumpy().astype(np.float64)
    direction = w0 + layer.lora_alpha / layer.lora_rank * b @ a
    w = m[:, None] * direction / np.linalg.norm(direction, axis=1, keepdims=True)
    out = x.astype(np.float64) @ w.T
    if layer.has_bias:
        out = out + layer.bias.asnumpy()
    return activation(out) if activation else out


def _randomise(layer, seed=3):
    rng = np.random.RandomState(seed)
    layer.mindpet_delta_dora_b.set_data(Tensor(rng.randn(*layer.mindpet_delta_dora_b.shape).astype(np.float32)))
    m = layer.mindpet_delta_dora_magnitude.asnumpy()
    layer.mindpet_delta_dora_magnitude.set_data(Tensor((m * rng.uniform(0.5, 1.5, m.shape)).astype(np.float32)))


def test_names_shapes_and_magnitude_init():
    layer = DoRADense(12, 6, lora_rank=3, lora_alpha=6)
    names = {p.name: tuple(p.shape) for p in layer.get_parameters()}
    assert names == {'weight': (6, 12), 'bias': (6,), 'mindpet_delta_dora_a': (3, 12),
                     'mindpet_delta_dora_b': (6, 3), 'mindpet_delta_dora_magnitude': (6,),
                     'mindpet_state_dora_scaling': (), 'mindpet_state_dora_gate': ()}
    assert isinstance(layer, nn.Dense)
    np.testing.assert_allclose(layer.mindpet_delta_dora_magnitude.asnumpy(),
                               np.linalg.norm(layer.weight.asnumpy(), axis=1), rtol=1e-6)
    assert not layer.mindpet_state_dora_gate.requires_grad


@pytest.mark.parametrize('compute_dtype,tol', [(ms.float32, 1e-5), (ms.float16, 1e-2)])
def test_matches_formula_after_graph_ran(ms_mode, compute_dtype, tol):
    layer = DoRADense(16, 8, lora_rank=4, lora_alpha=8, compute_dtype=compute_dtype)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 16)).astype(np.float32)
    base = x @ layer.weight.asnumpy().T + layer.bias.asnumpy()
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), base, atol=tol, rtol=tol)
    _randomise(layer)  # seen by the compiled graph: Parameter data
    out = layer(Tensor(x))
    assert out.shape == (2, 3, 8) and out.dtype == ms.float32
    np.testing.assert_allclose(out.asnumpy(), _reference(layer, x), atol=tol, rtol=tol)


def test_no_bias_activation_and_dropout(graph_mode):
    layer = DoRADense(16, 8, lora_rank=4, lora_alpha=4, lora_dropout=0.5, compute_dtype=ms.float32,
                      has_bias=False, activation='relu')
    _randomise(layer)
    x = np.random.RandomState(1).randn(32, 16).astype(np.float32)
    layer.set_train(False)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), _reference(layer, x, relu), atol=1e-5)
    layer.set_train(True)
    assert np.abs(layer(Tensor(x)).asnumpy() - _reference(layer, x, relu)).max() > 1e-3

    # Training mode, as the formula: h = relu(m / ||W'||_row * (W0 x + s B A d(x))) with d(x) the dropout of the
    # LoRA branch's input only, each entry 0 or x / (1 - p). With A = I and B of full column rank, d(x) is solved
    # for from the output (positive inputs and weights keep relu out of the way) and checked entry by entry.
    train = DoRADense(8, 16, lora_rank=8, lora_alpha=8, lora_dropout=0.5, compute_dtype=ms.float32, has_bias=False,
                      activation='relu')
    rng = np.random.RandomState(4)
    w0, lora_b = (rng.uniform(0.1, 1, (16, 8)).astype(np.float32) for _ in range(2))
    train.weight.set_data(Tensor(w0))
    train.mindpet_delta_dora_a.set_data(Tensor(np.eye(8, dtype=np.float32)))
    train.mindpet_delta_dora_b.set_data(Tensor(lora_b))
    scaling = train.lora_alpha / train.lora_rank
    direction = w0.astype(np.float64) + scaling * lora_b
    magnitude = (np.linalg.norm(direction, axis=1) * rng.uniform(0.5, 1.5, 16)).astype(np.float32)
    train.mindpet_delta_dora_magnitude.set_data(Tensor(magnitude))
    x = rng.uniform(0.5, 1.5, (64, 8)).astype(np.float32)
    train.set_train(True)
    out = train(Tensor(x)).asnumpy().astype(np.float64)
    assert out.min() > 0
    branch = out / (magnitude / np.linalg.norm(direction, axis=1)) - x @ w0.T.astype(np.float64)
    dropped_input = np.linalg.lstsq(scaling * lora_b.astype(np.float64), branch.T, rcond=None)[0].T
    zero = np.abs(dropped_input) < 1e-4
    scaled = np.abs(dropped_input - x / 0.5) < 1e-4
    assert np.all(zero | scaled)                                     # each entry dropped or kept and rescaled
    assert 0.3 < zero.mean() < 0.7 and len({tuple(row) for row in zero}) > 10      # p = 0.5, a mask per row


def test_merge_unmerge_exact_in_compiled_graph(graph_mode):
    layer = DoRADense(16, 8, lora_rank=4, lora_alpha=8, compute_dtype=ms.float32)
    _randomise(layer)
    x = np.random.RandomState(6).randn(4, 16).astype(np.float32)
    w0 = layer.weight.asnumpy().copy()
    expected_w = layer.delta_weight() + w0
    unmerged = layer(Tensor(x)).asnumpy()
    layer.merge()
    np.testing.assert_allclose(layer.weight.asnumpy(), expected_w, atol=1e-6)
    # The merged rows have exactly the magnitudes as norms.
    np.testing.assert_allclose(np.linalg.norm(layer.weight.asnumpy(), axis=1),
                               layer.mindpet_delta_dora_magnitude.asnumpy(), rtol=1e-6)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), unmerged, atol=1e-5)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), x @ expected_w.T + layer.bias.asnumpy(), atol=1e-5)
    with pytest.raises(RuntimeError, match='already merged'):
        layer.merge()
    with pytest.raises(RuntimeError, match='unmerge'):
        layer.delta_weight()
    dense_merged = layer.to_dense()
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.asnumpy(), w0, atol=1e-6)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), unmerged, atol=1e-5)
    with pytest.raises(RuntimeError, match='no merged'):
        layer.unmerge()
    for dense in (dense_merged, layer.to_dense()):
        assert type(dense) is nn.Dense
        np.testing.assert_allclose(dense(Tensor(x)).asnumpy(), unmerged, atol=1e-5)


def test_init_magnitude_after_weight_swap():
    layer = DoRADense(6, 4, lora_rank=2, lora_alpha=2, compute_dtype=ms.float32)
    w = np.random.RandomState(2).randn(4, 6).astype(np.float32)
    layer.weight.set_data(Tensor(w))
    layer.init_magnitude()
    np.testing.assert_allclose(layer.mindpet_delta_dora_magnitude.asnumpy(), np.linalg.norm(w, axis=1),
                               rtol=1e-6)


class _DoRANet(nn.Cell):
    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.fc1 = DoRADense(8, 16, lora_rank=4, lora_alpha=8, compute_dtype=ms.float32,
                             weight_init=Tensor(rng.randn(16, 8).astype(np.float32) * 0.3))
        self.act = nn.ReLU()
        self.head = nn.Dense(16, 4, weight_init=Tensor(rng.randn(4, 16).astype(np.float32) * 0.3))

    def construct(self, x):
        return self.head(self.act(self.fc1(x)))


def test_training_graph_mode_changes_only_dora_params(graph_mode):
    net = _DoRANet()
    freeze_delta(net, 'dora')
    assert sorted(p.name for p in net.trainable_params()) == [
        'fc1.mindpet_delta_dora_a', 'fc1.mindpet_delta_dora_b', 'fc1.mindpet_delta_dora_magnitude']
    x, y = regression_data()
    before = snapshot(net)
    losses = train_steps(net, x, y, steps=20)
    assert losses[-1] < 0.7 * losses[0], losses
    after = snapshot(net)
    for name, value in before.items():
        if 'mindpet_delta_dora' in name:
            assert np.abs(after[name] - value).max() > 1e-4, name
        else:
            np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_shard_checks_and_applies():
    layer = DoRADense(16, 8, lora_rank=4, lora_alpha=4)
    assert layer.shard(strategy_org_dense_matmul=((2, 1), (1, 1)), strategy_dora_scale_mul=((2, 1), (1,)),
                       strategy_org_bias_add=((2, 1), (1,))) is layer
    assert layer.scale_mul.in_strategy == ((2, 1), (1,))
    with pytest.raises(ValueError, match='strategy_dora_scale_mul'):
        layer.shard(strategy_dora_scale_mul=((2, 1), (1, 1)))
    with pytest.raises(ValueError, match='strategy_activation'):
        layer.shard(strategy_activation=((2, 1),))


@pytest.mark.parametrize('override,exc,fragments', [
    (dict(lora_rank=0), ValueError, ['lora_rank', '0']),
    (dict(lora_rank=2.0), TypeError, ['lora_rank', '2.0']),
    (dict(lora_alpha=0), ValueError, ['lora_alpha', '0']),
    (dict(lora_dropout=1.0), ValueError, ['lora_dropout', '1.0']),
    (dict(in_channels=0), ValueError, ['in_channels', '0']),
    (dict(compute_dtype=ms.int32), TypeError, ['compute_dtype', 'mindspore.int32']),
    (dict(lora_a_init=Tensor(np.zeros((3, 8), np.float32))), ValueError, ['lora_a_init', '(3, 8)']),
    (dict(bogus=1), TypeError, ['bogus']),
])
def test_bad_arguments(override, exc, fragments):
    kwargs = dict(dict(in_channels=8, out_channels=4, lora_rank=2, lora_alpha=4), **override)
    with pytest.raises(exc) as info:
        DoRADense(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
