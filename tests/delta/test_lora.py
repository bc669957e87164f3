"""LoRADense against the NumPy formula h = x W^T + b + (alpha/r) (x A^T) B^T, in both modes and dtypes."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

from mindpet.delta import LoRADense
from mindpet.delta.lora import LoRADense as LoRADenseFromModule

from tests.nets import relu


def _reference(layer, x, activation=None):
    w = layer.weight.asnumpy().astype(np.float64)
    a = layer.mindpet_delta_lora_a.asnumpy().astype(np.float64)
    b = layer.mindpet_delta_lora_b.asnumpy().astype(np.float64)
    x64 = x.astype(np.float64)
    out = x64 @ w.T + (layer.lora_alpha / layer.lora_rank) * (x64 @ a.T) @ b.T
    if layer.has_bias:
        out = out + layer.bias.asnumpy().astype(np.float64)
    return activation(out) if activation else out


def _randomise_b(layer, seed=3):
    rng = np.random.RandomState(seed)
    layer.mindpet_delta_lora_b.set_data(Tensor(rng.randn(*layer.mindpet_delta_lora_b.shape).astype(np.float32)))


@pytest.mark.parametrize('compute_dtype,tol', [(ms.float32, 1e-5), (ms.float16, 1e-2)])
@pytest.mark.parametrize('shape', [(6, 16), (2, 3, 16), (2, 2, 3, 16)])
def test_matches_numpy_formula_after_graph_ran(ms_mode, compute_dtype, tol, shape):
    layer = LoRADense(16, 8, lora_rank=4, lora_alpha=8, compute_dtype=compute_dtype)
    x = np.random.RandomState(0).uniform(-1, 1, shape).astype(np.float32)
    # At init B is zero: the layer is its base Dense.
    out0 = layer(Tensor(x)).asnumpy()
    base = x @ layer.weight.asnumpy().T + layer.bias.asnumpy()
    np.testing.assert_allclose(out0, base, atol=tol, rtol=tol)
    # Change B through Parameter data: the already-compiled graph must see it.
    _randomise_b(layer)
    out = layer(Tensor(x))
    assert out.shape == shape[:-1] + (8,)
    assert out.dtype == ms.float32
    np.testing.assert_allclose(out.asnumpy(), _reference(layer, x), atol=tol, rtol=tol)


def test_float16_input_keeps_its_dtype(ms_mode):
    layer = LoRADense(16, 8, lora_rank=2, lora_alpha=2)
    _randomise_b(layer)
    x = np.random.RandomState(1).uniform(-1, 1, (4, 16)).astype(np.float16)
    out = layer(Tensor(x))
    assert out.dtype == ms.float16
    np.testing.assert_allclose(out.asnumpy().astype(np.float64), _reference(layer, x.astype(np.float32)),
                               atol=2e-2, rtol=2e-2)


def test_equals_plain_dense_at_init(ms_mode):
    rng = np.random.RandomState(2)
    w, b = rng.randn(8, 16).astype(np.float32), rng.randn(8).astype(np.float32)
    dense = nn.Dense(16, 8, weight_init=Tensor(w), bias_init=Tensor(b))
    lora = LoRADense(16, 8, lora_rank=4, lora_alpha=4, compute_dtype=ms.float32,
                     weight_init=Tensor(w), bias_init=Tensor(b))
    x = Tensor(rng.randn(3, 5, 16).astype(np.float32))
    np.testing.assert_array_equal(lora(x).asnumpy(), dense(x).asnumpy())


def test_no_bias_and_activation(ms_mode):
    layer = LoRADense(16, 8, lora_rank=4, lora_alpha=4, compute_dtype=ms.float32, has_bias=False,
                      activation='relu')
    _randomise_b(layer)
    x = np.random.RandomState(3).randn(5, 16).astype(np.float32)
    assert layer.bias is None
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), _reference(layer, x, relu), atol=1e-5)


def test_contract_names_shapes_and_scaling():
    layer = LoRADense(in_channels=12, out_channels=6, lora_rank=3, lora_alpha=6)
    names = {p.name: tuple(p.shape) for p in layer.get_parameters()}
    assert names == {'weight': (6, 12), 'bias': (6,), 'mindpet_delta_lora_a': (3, 12),
                     'mindpet_delta_lora_b': (6, 3), 'mindpet_state_lora_scaling': ()}
    assert isinstance(layer, nn.Dense)
    assert LoRADense is LoRADenseFromModule
    assert layer.scaling == 2.0
    assert float(layer.mindpet_state_lora_scaling.asnumpy()) == 2.0
    assert not layer.mindpet_state_lora_scaling.requires_grad
    np.testing.assert_array_equal(layer.mindpet_delta_lora_b.asnumpy(), 0)
    # Kaiming-uniform(a=sqrt 5) bound for A is 1/sqrt(in).
    assert np.abs(layer.mindpet_delta_lora_a.asnumpy()).max() <= 1 / np.sqrt(12) + 1e-6
    assert layer.mindpet_delta_lora_a.asnumpy().std() > 0
    assert layer.compute_dtype == ms.float16 and layer.dtype == ms.float16


def test_param_init_type_float16_and_tensor_inits():
    a = np.full((2, 4), 0.5, np.float32)
    b = np.full((3, 2), 0.25, np.float32)
    layer = LoRADense(4, 3, lora_rank=2, lora_alpha=2, lora_a_init=Tensor(a), lora_b_init=Tensor(b),
                      param_init_type=ms.float16)
    assert layer.mindpet_delta_lora_a.dtype == ms.float16
    assert layer.weight.dtype == ms.float32  # base weight keeps Dense's dtype so base checkpoints load unchanged
    np.testing.assert_array_equal(layer.mindpet_delta_lora_b.asnumpy(), b.astype(np.float16))


def test_to_float_returns_layer_and_runs(graph_mode):
    layer = LoRADense(16, 8, lora_rank=4, lora_alpha=4).to_float(ms.float16)
    assert isinstance(layer, LoRADense)
    _randomise_b(layer)
    x = np.random.RandomState(4).randn(2, 16).astype(np.float32)
    out = layer(Tensor(x))
    np.testing.assert_allclose(out.asnumpy().astype(np.float64), _reference(layer, x), atol=2e-2, rtol=2e-2)


def test_dropout_only_on_lora_branch(graph_mode):
    layer = LoRADense(16, 8, lora_rank=4, lora_alpha=4, lora_dropout=0.5, compute_dtype=ms.float32)
    _randomise_b(layer)
    x = np.random.RandomState(5).randn(64, 16).astype(np.float32)
    layer.set_train(False)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), _reference(layer, x), atol=1e-5)
    layer.set_train(True)
    out = layer(Tensor(x)).asnumpy()
    assert np.abs(out - _reference(layer, x)).max() > 1e-3
    # Dropout touches only the LoRA branch: with B zero the output is the exact base output even in training.
    layer.mindpet_delta_lora_b.set_data(Tensor(np.zeros((8, 4), np.float32)))
    base = x @ layer.weight.asnumpy().T + layer.bias.asnumpy()
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), base, atol=1e-5)


def test_merge_unmerge_in_compiled_graph(graph_mode):
    layer = LoRADense(16, 8, lora_rank=4, lora_alpha=8, compute_dtype=ms.float32)
    _randomise_b(layer)
    x = np.random.RandomState(6).randn(4, 16).astype(np.float32)
    w0 = layer.weight.asnumpy().copy()
    unmerged = layer(Tensor(x)).asnumpy()  # compiles the graph
    layer.merge()
    np.testing.assert_allclose(layer.weight.asnumpy(), w0 + layer.delta_weight(), atol=1e-6)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), unmerged, atol=1e-5)
    with pytest.raises(RuntimeError, match='already merged'):
        layer.merge()
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.asnumpy(), w0, atol=1e-6)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), unmerged, atol=1e-5)
    with pytest.raises(RuntimeError, match='no merged'):
        layer.unmerge()
    dense = layer.to_dense()
    assert type(dense) is nn.Dense
    np.testing.assert_allclose(dense(Tensor(x)).asnumpy(), unmerged, atol=1e-5)


def test_shard_accepts_mindpet_keywords_including_activation():
    layer = LoRADense(16, 8, lora_rank=4, lora_alpha=4, activation='relu', lora_dropout=0.1)
    out = layer.shard(strategy_org_dense_matmul=((2, 1), (1, 1)), strategy_org_bias_add=((2, 1), (1,)),
                      strategy_lora_dropout=((2, 1),), strategy_lora_a_matmul=((2, 1), (1, 1)),
                      strategy_lora_b_matmul=((2, 1), (1, 1)), strategy_lora_mul=((2, 1), ()),
                      strategy_lora_add=((2, 1), (2, 1)), strategy_activation=((2, 1),))
    assert out is layer
    assert layer.matmul.in_strategy == ((2, 1), (1, 1))
    assert layer.lora_a_matmul.in_strategy == ((2, 1), (1, 1))


@pytest.mark.parametrize('kwargs,exc,fragment', [
    (dict(strategy_org_dense_matmul=((2, 1),)), ValueError, 'strategy_org_dense_matmul'),
    (dict(strategy_lora_a_matmul=((2, 1, 1), (1, 1))), ValueError, 'strategy_lora_a_matmul'),
    (dict(strategy_lora_b_matmul=[(2, 1), (1, 1)]), TypeError, 'strategy_lora_b_matmul'),
    (dict(strategy_lora_add=((2, 0), (2, 1))), TypeError, 'strategy_lora_add'),
    (dict(strategy_activation=((2, 1),)), ValueError, 'strategy_activation'),
])
def test_shard_rejects_bad_strategies(kwargs, exc, fragment):
    layer = LoRADense(16, 8, lora_rank=4, lora_alpha=4)
    with pytest.raises(exc, match=fragment):
        layer.shard(**kwargs)


_GOOD = dict(in_channels=8, out_channels=4, lora_rank=2, lora_alpha=4)


@pytest.mark.parametrize('override,exc,fragments', [
    (dict(in_channels=0), ValueError, ['in_channels', '0']),
    (dict(in_channels=8.0), TypeError, ['in_channels', '8.0']),
    (dict(out_channels=-1), ValueError, ['out_channels', '-1']),
    (dict(lora_rank=0), ValueError, ['lora_rank', '0']),
    (dict(lora_rank=-2), ValueError, ['lora_rank', '-2']),
    (dict(lora_rank=2.0), TypeError, ['lora_rank', '2.0']),
    (dict(lora_rank=True), TypeError, ['lora_rank', 'True']),
    (dict(lora_rank='4'), TypeError, ['lora_rank', "'4'"]),
    (dict(lora_alpha=0), ValueError, ['lora_alpha', '0']),
    (dict(lora_alpha='8'), TypeError, ['lora_alpha', "'8'"]),
    (dict(lora_alpha=None), TypeError, ['lora_alpha', 'None']),
    (dict(lora_alpha=float('nan')), ValueError, ['lora_alpha', 'nan']),
    (dict(lora_dropout=1.0), ValueError, ['lora_dropout', '1.0']),
    (dict(lora_dropout=-0.1), ValueError, ['lora_dropout', '-0.1']),
    (dict(lora_dropout=0), TypeError, ['lora_dropout', '0']),
    (dict(param_init_type=ms.int32), TypeError, ['param_init_type', 'mindspore.int32']),
    (dict(param_init_type='float32'), TypeError, ['param_init_type', "'float32'"]),
    (dict(compute_dtype=ms.float64), TypeError, ['compute_dtype', 'mindspore.float64']),
    (dict(lora_a_init=Tensor(np.zeros((3, 8), np.float32))), ValueError, ['lora_a_init', '(3, 8)']),
    (dict(lora_b_init=Tensor(np.zeros((4, 3), np.float32))), ValueError, ['lora_b_init', '(4, 3)']),
    (dict(has_bias='yes'), TypeError, ['has_bias']),
    (dict(activation=3), TypeError, ['activation']),
    (dict(lora_ranks=4), TypeError, ['lora_ranks']),
])
def test_bad_arguments_name_argument_and_value(override, exc, fragments):
    kwargs = dict(_GOOD, **override)
    with pytest.raises(exc) as info:
        LoRADense(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_rank_one_input_is_rejected(ms_mode):
    layer = LoRADense(4, 2, lora_rank=1, lora_alpha=1, compute_dtype=ms.float32)
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        layer(Tensor(np.ones((4,), np.float32)))
