"""LoRADense's fast paths (bias on the branch, no Cast when dtypes match) keep the LoRA formula exactly.

h = x W^T + b + (alpha / r) * (x A^T) B^T, checked against NumPy for fp32 and fp16 compute, with and without bias,
2-D and 3-D inputs, in GRAPH_MODE after the graph has run (A/B changed with set_data, merge() in place) and in
PyNative mode; gradients of A and B against the hand-derived formula.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Tensor, ParameterTuple

from mindpet.delta import LoRADense

IN, OUT, RANK, ALPHA = 12, 10, 4, 8
SCALE = ALPHA / RANK


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return dict(w=rng.standard_normal((OUT, IN)).astype(np.float32) * 0.3,
                b=rng.standard_normal(OUT).astype(np.float32),
                a=rng.standard_normal((RANK, IN)).astype(np.float32) * 0.3,
                bb=rng.standard_normal((OUT, RANK)).astype(np.float32) * 0.3)


def _layer(arr, compute_dtype, has_bias=True):
    kwargs = dict(bias_init=Tensor(arr['b'])) if has_bias else dict(has_bias=False)
    return LoRADense(IN, OUT, RANK, ALPHA, compute_dtype=compute_dtype, weight_init=Tensor(arr['w']),
                     lora_a_init=Tensor(arr['a']), lora_b_init=Tensor(arr['bb']), **kwargs)


def _reference(x, arr, has_bias=True, a=None, bb=None):
    a = arr['a'] if a is None else a
    bb = arr['bb'] if bb is None else bb
    x64 = x.astype(np.float64)
    out = x64 @ arr['w'].T + SCALE * (x64 @ a.T) @ bb.T
    return out + arr['b'] if has_bias else out


@pytest.mark.parametrize('compute_dtype, tol', [(ms.float32, 1e-5), (ms.float16, 1e-2)])
@pytest.mark.parametrize('has_bias', [True, False])
def test_forward_matches_formula_after_graph_ran(ms_mode, compute_dtype, tol, has_bias):
    arr = _arrays()
    layer = _layer(arr, compute_dtype, has_bias)
    x = np.random.default_rng(1).standard_normal((2, 3, IN)).astype(np.float32)
    out = layer(Tensor(x))
    assert out.dtype == ms.float32 and out.shape == (2, 3, OUT)
    np.testing.assert_allclose(out.asnumpy(), _reference(x, arr, has_bias), rtol=tol, atol=tol)
    # Change the adapter after the first run: the compiled graph must read the new data.
    new_a, new_b = arr['a'][::-1].copy(), arr['bb'] * -2.0
    layer.mindpet_delta_lora_a.set_data(Tensor(new_a))
    layer.mindpet_delta_lora_b.set_data(Tensor(new_b))
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), _reference(x, arr, has_bias, new_a, new_b),
                               rtol=tol, atol=tol)
    # merge() in the compiled graph: branch off, weight holds the increment, same output.
    layer.merge()
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), _reference(x, arr, has_bias, new_a, new_b),
                               rtol=tol, atol=tol)
    expected_w = arr['w'] + SCALE * new_b @ new_a
    np.testing.assert_allclose(layer.weight.asnumpy(), expected_w, rtol=1e-6, atol=1e-6)


def test_two_dim_input_and_fp16_input_keep_dtype(graph_mode):
    arr = _arrays(2)
    layer = _layer(arr, ms.float32)
    x = np.random.default_rng(3).standard_normal((5, IN)).astype(np.float32)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), _reference(x, arr), rtol=1e-5, atol=1e-5)
    out16 = layer(Tensor(x.astype(np.float16)))
    assert out16.dtype == ms.float16
    np.testing.assert_allclose(out16.asnumpy().astype(np.float32), _reference(x.astype(np.float16), arr),
                               rtol=1e-2, atol=1e-2)


class _WeightedSum(nn.Cell):
    def __init__(self, net, g):
        super().__init__()
        self.net, self.g = net, Tensor(g)

    def construct(self, x):
        return (self.net(x) * self.g).sum()


class _Grads(nn.Cell):
    def __init__(self, net, params):
        super().__init__()
        self.net, self.params = net, ParameterTuple(params)
        self.grad = ops.GradOperation(get_all=True, get_by_list=True)

    def construct(self, x):
        return self.grad(self.net, self.params)(x)


def test_gradients_match_formula_and_frozen_base_gets_none(graph_mode):
    """d/dA sum(g * h) = s B^T g^T x, d/dB = s g (x A^T), d/dx = g W + s (g B) A."""
    arr = _arrays(4)
    layer = _layer(arr, ms.float32)
    layer.weight.requires_grad = False
    layer.bias.requires_grad = False
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, IN)).astype(np.float32)
    g = rng.standard_normal((6, OUT)).astype(np.float32)
    grads_cell = _Grads(_WeightedSum(layer, g), layer.trainable_params())
    assert [p.name.rsplit('.', 1)[-1] for p in layer.trainable_params()] == ['mindpet_delta_lora_a',
                                                                           'mindpet_delta_lora_b']
    (dx,), (da, db) = grads_cell(Tensor(x))
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    np.testing.assert_allclose(da.asnumpy(), SCALE * arr['bb'].T @ g64.T @ x64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db.asnumpy(), SCALE * g64.T @ (x64 @ arr['a'].T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx.asnumpy(), g64 @ arr['w'] + SCALE * (g64 @ arr['bb']) @ arr['a'],
                               rtol=1e-5, atol=1e-5)
    # Second call after the graph ran, with a new B: gradients follow the new data.
    new_b = arr['bb'] + 1.0
    layer.mindpet_delta_lora_b.set_data(Tensor(new_b))
    (_,), (da2, _) = grads_cell(Tensor(x))
    np.testing.assert_allclose(da2.asnumpy(), SCALE * new_b.T @ g64.T @ x64, rtol=1e-5, atol=1e-5)


def test_no_cast_when_dtypes_match():
    """The fast path skips Cast for tensors already in the compute dtype and casts the others."""
    layer = _layer(_arrays(), ms.float32)
    weight = layer.weight
    assert layer._to_compute(weight) is weight  # pylint: disable=protected-access
    layer16 = _layer(_arrays(), ms.float16)
    assert layer16._to_compute(layer16.weight).dtype == ms.float16  # pylint: disable=protected-access
