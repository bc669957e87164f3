"""AdapterLayer / AdapterDense against y = x + W_up gelu(W_down x + b_down) + b_up, training, shard, bad input."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

from mindpet.delta import AdapterDense, AdapterLayer
from mindpet.delta.adapter import AdapterLayer as AdapterLayerFromModule

from tests.delta_nets import (MSELossNet, TwoLayerNet, assert_bad_args, assert_formula_after_graph_ran,
                              fixed_weight, np_gelu, train_checked)
from tests.nets import regression_data, relu


def np_adapter(layer, h):
    """The Houlsby formula on the last axis of ``h`` (float64)."""
    p = {n: getattr(layer, 'mindpet_delta_adapter_' + n).asnumpy().astype(np.float64)
         for n in ('down_weight', 'down_bias', 'up_weight', 'up_bias')}
    return h + np_gelu(h @ p['down_weight'].T + p['down_bias']) @ p['up_weight'].T + p['up_bias']


def np_adapter_dense(layer, x, activation=None):
    h = x.astype(np.float64) @ layer.weight.asnumpy().T + layer.bias.asnumpy()
    return np_adapter(layer.adapter, activation(h) if activation else h)


def delta_params(cell):
    return [p for p in cell.get_parameters() if 'mindpet_delta_adapter_' in p.name]


CASES = {
    'layer': (lambda dtype: AdapterLayer(16, bottleneck_size=4, compute_dtype=dtype), 16, np_adapter),
    'dense': (lambda dtype: AdapterDense(12, 16, bottleneck_size=4, activation='relu', compute_dtype=dtype), 12,
              lambda layer, x: np_adapter_dense(layer, x, relu)),
}


@pytest.mark.parametrize('compute_dtype,tol', [(ms.float32, 1e-5), (ms.float16, 1e-2)])
@pytest.mark.parametrize('kind', sorted(CASES))
def test_matches_numpy_formula_after_graph_ran(ms_mode, kind, compute_dtype, tol):
    make, in_dim, reference = CASES[kind]
    cell = make(compute_dtype)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 3, in_dim)).astype(np.float32)
    out = assert_formula_after_graph_ran(cell, [x], lambda: reference(cell, x), delta_params(cell), tol)
    assert out.shape == (2, 3, 16) and out.dtype == ms.float32


def test_near_identity_at_init_and_float16_input(ms_mode):
    layer = AdapterLayer(32, bottleneck_size=8)
    # float32 input: the adapter's own contribution y - x is small at init (W ~ N(0, 0.01^2) on both projections)
    # but not zero, and it is the formula's to 1% of its size (an identity, y = x, misses by 100%).
    x32 = np.random.RandomState(2).randn(4, 32).astype(np.float32)
    contribution = layer(Tensor(x32)).asnumpy().astype(np.float64) - x32
    want = np_adapter(layer, x32.astype(np.float64)) - x32
    assert 1e-4 < np.abs(want).max() < 1e-2
    np.testing.assert_allclose(contribution, want, rtol=0, atol=1e-2 * np.abs(want).max())
    # float16 input: the output keeps the dtype and is the formula at float16 resolution.
    x = x32.astype(np.float16)
    out = layer(Tensor(x))
    assert out.dtype == ms.float16
    # W ~ N(0, 0.01^2) on both projections: the adapter adds about 1e-3 to inputs of size ~1.
    assert 0 < np.abs(out.asnumpy().astype(np.float32) - x).max() < 1e-2
    np.testing.assert_allclose(out.asnumpy().astype(np.float64), np_adapter(layer, x.astype(np.float64)),
                               atol=1e-2, rtol=1e-2)


def test_contract_names_shapes_dtypes():
    layer = AdapterDense(in_channels=12, out_channels=6, bottleneck_size=3, param_init_type=ms.float16)
    shapes = {p.name: tuple(p.shape) for p in layer.get_parameters()}
    assert shapes == {'weight': (6, 12), 'bias': (6,),
                      'adapter.mindpet_delta_adapter_down_weight': (3, 6),
                      'adapter.mindpet_delta_adapter_down_bias': (3,),
                      'adapter.mindpet_delta_adapter_up_weight': (6, 3),
                      'adapter.mindpet_delta_adapter_up_bias': (6,)}
    assert isinstance(layer, nn.Dense) and AdapterLayer is AdapterLayerFromModule
    assert layer.adapter.mindpet_delta_adapter_up_weight.dtype == ms.float16
    assert layer.weight.dtype == ms.float32  # base weight keeps Dense's dtype: base checkpoints load unchanged
    assert layer.adapter.compute_dtype == ms.float16  # MindPet's default
    np.testing.assert_array_equal(layer.adapter.mindpet_delta_adapter_up_bias.asnumpy(), 0)
    assert 0.002 < layer.adapter.mindpet_delta_adapter_down_weight.asnumpy().std() < 0.05


def test_merge_is_refused_clearly():
    for cell in (AdapterLayer(8, 2), AdapterDense(8, 8, bottleneck_size=2)):
        with pytest.raises(NotImplementedError, match='cannot be merged'):
            cell.merge()


def test_twenty_graph_steps_train_only_the_adapters(graph_mode):
    def make_layer(i, o, seed):
        return AdapterDense(i, o, weight_init=fixed_weight(o, i, seed), bottleneck_size=4,
                            compute_dtype=ms.float32)

    net = TwoLayerNet(make_layer)
    x, y = regression_data()
    expected = [f'{fc}.adapter.mindpet_delta_adapter_{n}' for fc in ('fc1', 'fc2')
                for n in ('down_weight', 'down_bias', 'up_weight', 'up_bias')]
    train_checked(net, MSELossNet(net), 'adapter', (Tensor(x), Tensor(y)), lr=0.05, expect_trainable=expected)


def test_shard_sets_strategies():
    layer = AdapterDense(16, 8, bottleneck_size=4, activation='relu')
    out = layer.shard(strategy_matmul_org=((2, 1), (1, 1)), strategy_bias_org=((2, 1), (1,)),
                      strategy_activation_org=((2, 1),), strategy_matmul_down_sampler=((2, 1), (1, 1)),
                      strategy_bias_down_sampler=((2, 1), (1,)), strategy_non_linearity=((2, 1),),
                      strategy_matmul_up_sampler=((2, 1), (1, 1)), strategy_bias_up_sampler=((2, 1), (1,)),
                      strategy_residual_add=((2, 1), (2, 1)))
    assert out is layer
    assert layer.matmul.in_strategy == ((2, 1), (1, 1))
    assert layer.activation.relu.in_strategy == ((2, 1),)
    assert layer.adapter.down_matmul.in_strategy == ((2, 1), (1, 1))
    assert layer.adapter.non_linearity.op.in_strategy == ((2, 1),)
    assert layer.adapter.residual_add.in_strategy == ((2, 1), (2, 1))


@pytest.mark.parametrize('make,kwargs,exc,fragment', [
    (lambda: AdapterLayer(8, 2), dict(strategy_matmul_down_sampler=((2, 1),)), ValueError,
     'strategy_matmul_down_sampler'),
    (lambda: AdapterLayer(8, 2), dict(strategy_bias_up_sampler=((2, 1), (1, 1))), ValueError,
     'strategy_bias_up_sampler'),
    (lambda: AdapterLayer(8, 2), dict(strategy_residual_add=[(2, 1), (2, 1)]), TypeError, 'strategy_residual_add'),
    (lambda: AdapterLayer(8, 2, non_linearity='leakyrelu'), dict(strategy_non_linearity=((2, 1),)), ValueError,
     'strategy_non_linearity'),
    (lambda: AdapterDense(8, 8, bottleneck_size=2), dict(strategy_activation_org=((2, 1),)), ValueError,
     'strategy_activation_org'),
    (lambda: AdapterDense(8, 8, has_bias=False, bottleneck_size=2), dict(strategy_bias_org=((2, 1), (1,))),
     ValueError, 'strategy_bias_org'),
])
def test_shard_rejects_bad_strategies_and_changes_nothing(make, kwargs, exc, fragment):
    cell = make()
    with pytest.raises(exc, match=fragment):
        cell.shard(**dict(dict(strategy_matmul_down_sampler=((2, 1), (1, 1))), **kwargs))
    layer = cell.adapter if isinstance(cell, AdapterDense) else cell
    assert getattr(layer.down_matmul, 'in_strategy', None) is None  # all checked before any was applied


_LAYER = dict(hidden_size=8, bottleneck_size=2)
_DENSE = dict(in_channels=8, out_channels=6, bottleneck_size=2)
_COMMON_BAD = [
    (dict(bottleneck_size=0), ValueError, ['bottleneck_size', '0']),
    (dict(bottleneck_size=2.0), TypeError, ['bottleneck_size', '2.0']),
    (dict(bottleneck_size=True), TypeError, ['bottleneck_size', 'True']),
    (dict(non_linearity='swish'), ValueError, ['non_linearity', "'swish'"]),
    (dict(non_linearity=nn.ReLU), TypeError, ['non_linearity']),
    (dict(param_init_type=ms.int32), TypeError, ['param_init_type', 'mindspore.int32']),
    (dict(compute_dtype='float16'), TypeError, ['compute_dtype', "'float16'"]),
]


@pytest.mark.parametrize('override,exc,fragments', _COMMON_BAD + [
    (dict(hidden_size=0), ValueError, ['hidden_size', '0']),
    (dict(hidden_size='8'), TypeError, ['hidden_size', "'8'"]),
])
def test_layer_bad_arguments(override, exc, fragments):
    assert_bad_args(AdapterLayer, _LAYER, override, exc, fragments)


@pytest.mark.parametrize('override,exc,fragments', _COMMON_BAD + [
    (dict(in_channels=-1), ValueError, ['in_channels', '-1']),
    (dict(out_channels=6.0), TypeError, ['out_channels', '6.0']),
    (dict(has_bias='yes'), TypeError, ['has_bias', "'yes'"]),
    (dict(activation=3), TypeError, ['activation']),
    (dict(weight_init=Tensor(np.zeros((5, 8), np.float32))), ValueError, ['weight_init']),
    (dict(bias_init=Tensor(np.zeros((5,), np.float32))), ValueError, ['bias_init']),
])
def test_dense_bad_arguments(override, exc, fragments):
    assert_bad_args(AdapterDense, _DENSE, override, exc, fragments)
