"""LowRankAdapterLayer / LowRankAdapterDense against y = x + gelu(x L_d R_d + b_d) L_u R_u + b_u."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor
from mindspore.common.initializer import Normal

from mindpet.delta import LowRankAdapterDense, LowRankAdapterLayer
from mindpet.delta.low_rank_adapter import LowRankAdapterLayer as FromModule

from tests.delta_nets import (MSELossNet, TwoLayerNet, assert_bad_args, assert_formula_after_graph_ran,
                              fixed_weight, np_gelu, train_checked)
from tests.nets import regression_data

PREFIX = 'mindpet_delta_low_rank_adapter_'


def np_low_rank_adapter(layer, h):
    p = {n: getattr(layer, PREFIX + n).asnumpy().astype(np.float64)
         for n in ('down_left', 'down_right', 'down_bias', 'up_left', 'up_right', 'up_bias')}
    down = p['down_left'] @ p['down_right']
    up = p['up_left'] @ p['up_right']
    return h + np_gelu(h @ down + p['down_bias']) @ up + p['up_bias']


def np_low_rank_dense(layer, x):
    return np_low_rank_adapter(layer.adapter, x.astype(np.float64) @ layer.weight.asnumpy().T + layer.bias.asnumpy())


CASES = {
    'layer': (lambda dtype: LowRankAdapterLayer(16, reduction_factor=4, low_rank_size=2, compute_dtype=dtype), 16,
              np_low_rank_adapter),
    'dense': (lambda dtype: LowRankAdapterDense(12, 16, reduction_factor=2, low_rank_size=3, compute_dtype=dtype),
              12, np_low_rank_dense),
}


@pytest.mark.parametrize('compute_dtype,tol', [(ms.float32, 1e-5), (ms.float16, 1e-2)])
@pytest.mark.parametrize('kind', sorted(CASES))
def test_matches_numpy_formula_after_graph_ran(ms_mode, kind, compute_dtype, tol):
    make, in_dim, reference = CASES[kind]
    cell = make(compute_dtype)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 3, in_dim)).astype(np.float32)
    out = assert_formula_after_graph_ran(cell, [x], lambda: reference(cell, x),
                                         [p for p in cell.get_parameters() if PREFIX in p.name], tol)
    assert out.shape == (2, 3, 16) and out.dtype == ms.float32


def test_projections_are_products_of_thin_factors():
    layer = LowRankAdapterDense(in_channels=10, out_channels=12, reduction_factor=4, low_rank_size=2)
    shapes = {p.name: tuple(p.shape) for p in layer.get_parameters()}
    assert shapes == {'weight': (12, 10), 'bias': (12,),
                      'adapter.' + PREFIX + 'down_left': (12, 2), 'adapter.' + PREFIX + 'down_right': (2, 3),
                      'adapter.' + PREFIX + 'down_bias': (3,),
                      'adapter.' + PREFIX + 'up_left': (3, 2), 'adapter.' + PREFIX + 'up_right': (2, 12),
                      'adapter.' + PREFIX + 'up_bias': (12,)}
    assert isinstance(layer, nn.Dense) and LowRankAdapterLayer is FromModule
    assert layer.adapter.bottleneck_size == 3
    # A product of two rank-2 factors has rank 2: the adapter holds 2 * (12 + 3) * 2 numbers, not 2 * 12 * 3.
    down = layer.adapter.mindpet_delta_low_rank_adapter_down_left.asnumpy() @ \
        layer.adapter.mindpet_delta_low_rank_adapter_down_right.asnumpy()
    assert np.linalg.matrix_rank(down) == 2
    with pytest.raises(NotImplementedError, match='cannot be merged'):
        layer.merge()


def test_float16_input_and_initializer_object(ms_mode):
    layer = LowRankAdapterLayer(8, reduction_factor=2, low_rank_w_init=Normal(0.1), param_init_type=ms.float16)
    assert layer.mindpet_delta_low_rank_adapter_up_left.dtype == ms.float16
    x = np.random.RandomState(3).randn(5, 8).astype(np.float16)
    out = layer(Tensor(x))
    assert out.dtype == ms.float16
    np.testing.assert_allclose(out.asnumpy().astype(np.float64), np_low_rank_adapter(layer, x.astype(np.float64)),
                               atol=1e-2, rtol=1e-2)


def test_twenty_graph_steps_train_only_the_factors(graph_mode):
    def make_layer(i, o, seed):
        return LowRankAdapterDense(i, o, weight_init=fixed_weight(o, i, seed), reduction_factor=4, low_rank_size=2,
                                   low_rank_w_init=Normal(0.1), compute_dtype=ms.float32)

    net = TwoLayerNet(make_layer)
    x, y = regression_data()
    expected = [f'{fc}.adapter.{PREFIX}{n}' for fc in ('fc1', 'fc2')
                for n in ('down_left', 'down_right', 'down_bias', 'up_left', 'up_right', 'up_bias')]
    train_checked(net, MSELossNet(net), 'low_rank_adapter', (Tensor(x), Tensor(y)), lr=0.05,
                  expect_trainable=expected)


def test_shard_sets_strategies():
    layer = LowRankAdapterDense(16, 8, reduction_factor=2)
    layer.shard(strategy_matmul_org=((2, 1), (1, 1)), strategy_bias_org=((2, 1), (1,)),
                strategy_matmul_down_sampler_weight=((1, 1), (1, 1)),
                strategy_matmul_down_sampler_input=((2, 1), (1, 1)), strategy_bias_down_sampler=((2, 1), (1,)),
                strategy_non_linearity=((2, 1),), strategy_matmul_up_sampler_weight=((1, 1), (1, 1)),
                strategy_matmul_up_sampler_input=((2, 1), (1, 1)), strategy_bias_up_sampler=((2, 1), (1,)),
                strategy_residual_add=((2, 1), (2, 1)))
    assert layer.adapter.down_matmul_input.in_strategy == ((2, 1), (1, 1))
    assert layer.adapter.up_matmul_weight.in_strategy == ((1, 1), (1, 1))
    assert layer.adapter.non_linearity.op.in_strategy == ((2, 1),)


@pytest.mark.parametrize('kwargs,exc,fragment', [
    (dict(strategy_matmul_down_sampler_weight=((1, 1),)), ValueError, 'strategy_matmul_down_sampler_weight'),
    (dict(strategy_matmul_up_sampler_input=((2, 1, 1), (1, 1))), ValueError, 'strategy_matmul_up_sampler_input'),
    (dict(strategy_bias_down_sampler=((2, 1), (0,))), TypeError, 'strategy_bias_down_sampler'),
    (dict(strategy_residual_add='dp'), TypeError, 'strategy_residual_add'),
])
def test_shard_rejects_bad_strategies(kwargs, exc, fragment):
    layer = LowRankAdapterLayer(8, reduction_factor=2)
    with pytest.raises(exc, match=fragment):
        layer.shard(**kwargs)


_COMMON_BAD = [
    (dict(reduction_factor=0), ValueError, ['reduction_factor', '0']),
    (dict(reduction_factor=2.5), TypeError, ['reduction_factor', '2.5']),
    (dict(reduction_factor=9), ValueError, ['reduction_factor', '9']),
    (dict(low_rank_size=0), ValueError, ['low_rank_size', '0']),
    (dict(low_rank_size='1'), TypeError, ['low_rank_size', "'1'"]),
    (dict(low_rank_w_init=3), TypeError, ['low_rank_w_init', '3']),
    (dict(low_rank_w_init='no_such_init'), ValueError, ['low_rank_w_init', "'no_such_init'"]),
    (dict(non_linearity='swish'), ValueError, ['non_linearity', "'swish'"]),
    (dict(param_init_type=ms.int8), TypeError, ['param_init_type', 'mindspore.int8']),
    (dict(compute_dtype=None), TypeError, ['compute_dtype', 'None']),
]


@pytest.mark.parametrize('override,exc,fragments', _COMMON_BAD + [
    (dict(hidden_size=-8), ValueError, ['hidden_size', '-8']),
])
def test_layer_bad_arguments(override, exc, fragments):
    assert_bad_args(LowRankAdapterLayer, dict(hidden_size=8, reduction_factor=2), override, exc, fragments)


@pytest.mark.parametrize('override,exc,fragments', _COMMON_BAD + [
    (dict(in_channels=0), ValueError, ['in_channels', '0']),
    (dict(out_channels=None), TypeError, ['out_channels', 'None']),
    (dict(has_bias=1), TypeError, ['has_bias', '1']),
    (dict(activation='nope'), ValueError, ['activation', "'nope'"]),
])
def test_dense_bad_arguments(override, exc, fragments):
    assert_bad_args(LowRankAdapterDense, dict(in_channels=6, out_channels=8, reduction_factor=2), override, exc,
                    fragments)
