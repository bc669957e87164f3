"""t-SVD's cost counted, not asserted: trainable values and forward FLOPs per layer from the Cells themselves (every
matrix product of a PyNative forward pass is intercepted and its multiply-adds counted), checked against the formulas
and the table of doc/tsvd.md. Also the ``tsvd_factor_slices`` option (U and V with P < L frontal slices) against the
t-product formula, the orthogonality regulariser and merging."""
import os
import re

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

import mindpet.delta.tsvd as tsvd_module
from mindpet.delta import LoRADense
from mindpet.delta.tsvd import (TSVDGroup, TSVDDense, t_product, t_transpose, t_identity, f_diag, pad_slices,
                                orthogonal_init)
from mindpet.delta.rank_allocation import WithOrthRegularizer, TrainStepWithGrads
from mindpet.graph import freeze_delta

DOC = os.path.join(os.path.dirname(__file__), '..', '..', 'doc', 'tsvd.md')
# The shapes of doc/tsvd.md's table: the query projections of scripts/compare_methods.py's 4-block encoder, one
# batch of 32 sequences x 16 tokens.
IN, OUT, LAYERS, ROWS = 128, 128, 4, 512


class _MacCounter:
    """Wraps matrix-product operators: records the multiply-adds of every call (``(..., m, k) x (..., k, n)``:
    ``batch * m * k * n``)."""

    def __init__(self):
        self.macs = 0

    def wrap(self, op, transpose_b=False):
        def counted(a, b):
            a_shape, b_shape = tuple(a.shape), tuple(b.shape)
            inner = b_shape[-1] if transpose_b else b_shape[-2]
            cols = b_shape[-2] if transpose_b else b_shape[-1]
            assert a_shape[-1] == inner, (a_shape, b_shape)
            self.macs += int(np.prod(a_shape[:-1])) * inner * cols
            return op(a, b)
        return counted


class _CountingOps:
    """Stands in for ``mindspore.ops`` inside mindpet.delta.tsvd: counts ``bmm``/``matmul``, passes the rest."""

    def __init__(self, counter):
        self._counter = counter

    def __getattr__(self, name):
        real = getattr(ms.ops, name)
        return self._counter.wrap(real) if name in ('bmm', 'matmul') else real


def _count_forward(layer, monkeypatch, rows=ROWS):
    counter = _MacCounter()
    for name in ('matmul', 'v_matmul', 'us_matmul', 'lora_a_matmul', 'lora_b_matmul'):
        op = getattr(layer, name, None)
        if op is not None:
            monkeypatch.setitem(layer.__dict__, name, counter.wrap(op, transpose_b=op.transpose_b))
    monkeypatch.setattr(tsvd_module, 'ops', _CountingOps(counter))
    out = layer(Tensor(np.ones((rows, layer.in_channels), np.float32)))
    assert out.shape == (rows, layer.out_channels)
    return 2 * counter.macs      # FLOPs: a multiply and an add per multiply-add


def _trainable(cells):
    seen = {}
    for cell in cells:
        for param in cell.get_parameters():
            if param.name.rsplit('.', 1)[-1].startswith('mindpet_delta_'):
                seen[id(param)] = int(np.prod(param.shape))
    return sum(seen.values())


def _tsvd_layers(rank, slices):
    group = TSVDGroup(IN, OUT, LAYERS, tsvd_rank=rank, tsvd_alpha=rank, tsvd_factor_slices=slices)
    return [TSVDDense(IN, OUT, group, i, compute_dtype=ms.float32) for i in range(LAYERS)]


def _doc_rows():
    """``label -> (trainable per 4 layers, adapter FLOPs per layer)`` from the table in doc/tsvd.md."""
    with open(DOC, encoding='utf-8') as handle:
        text = handle.read()
    rows = {}
    for label, trainable, flops in re.findall(r'^\| (LoRA r=\d+|t-SVD k=\d+, P=\d+) \| ([\d,]+) \| [^|]+\| ([\d,]+) \|',
                                              text, re.M):
        rows[label] = (int(trainable.replace(',', '')), int(flops.replace(',', '')))
    return rows


CASES = [('LoRA r=8', 'lora', 8, None), ('t-SVD k=8, P=4', 'tsvd', 8, 4), ('t-SVD k=32, P=1', 'tsvd', 32, 1),
         ('t-SVD k=8, P=1', 'tsvd', 8, 1)]


@pytest.mark.parametrize('label,kind,rank,slices', CASES)
def test_trainable_values_and_forward_flops_are_counted_and_documented(pynative_only, monkeypatch, label, kind,
                                                                       rank, slices):
    if kind == 'lora':
        layers = [LoRADense(IN, OUT, lora_rank=rank, lora_alpha=rank, compute_dtype=ms.float32)
                  for _ in range(LAYERS)]
        want_trainable = LAYERS * rank * (IN + OUT)
        want_adapter_flops = 2 * ROWS * rank * (IN + OUT)
    else:
        layers = _tsvd_layers(rank, slices)
        want_trainable = rank * slices * (IN + OUT) + rank * LAYERS
        want_adapter_flops = 2 * ROWS * rank * slices * (IN + OUT) + 2 * rank * OUT * slices ** 2
    base_flops = 2 * ROWS * IN * OUT
    assert _trainable(layers) == want_trainable
    for layer in layers:    # the same count for every layer of a group
        assert _count_forward(layer, monkeypatch) - base_flops == want_adapter_flops
        monkeypatch.undo()
    assert _doc_rows()[label] == (want_trainable, want_adapter_flops), 'doc/tsvd.md disagrees with the count'


def test_full_factors_train_what_lora_of_rank_k_trains_on_every_layer_plus_kl():
    # The point, counted: k L (out + in + 1) = L x LoRA(rank k) + k L.
    for rank, length in ((8, 4), (4, 12)):
        group = TSVDGroup(IN, OUT, length, tsvd_rank=rank)
        assert _trainable([group]) == length * rank * (IN + OUT) + rank * length


@pytest.fixture
def pynative_only():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield


# ----- tsvd_factor_slices ----------------------------------------------------------------------------------------
def _np_increments(group):
    u, s, v = (getattr(group, f'mindpet_delta_tsvd_{k}').asnumpy().astype(np.float64) for k in 'usv')
    length = s.shape[1]
    return group.scaling * t_product(t_product(pad_slices(u, length), f_diag(s)), t_transpose(pad_slices(v, length)))


def _randomise(group, seed):
    rng = np.random.RandomState(seed)
    for key in 'usv':
        param = getattr(group, f'mindpet_delta_tsvd_{key}')
        param.set_data(Tensor((rng.randn(*param.shape) * 0.5).astype(np.float32)))


@pytest.mark.parametrize('slices', [1, 2, 3, 5])
def test_factor_slices_match_the_t_product_of_zero_padded_factors(ms_mode, slices):
    rng = np.random.RandomState(slices)
    group = TSVDGroup(6, 5, 5, tsvd_rank=3, tsvd_alpha=6, tsvd_factor_slices=slices)
    assert group.mindpet_delta_tsvd_u.shape == (5, 3, slices) and group.mindpet_delta_tsvd_s.shape == (3, 5)
    weights = [rng.randn(5, 6).astype(np.float32) for _ in range(5)]
    layers = [TSVDDense(6, 5, group, i, compute_dtype=ms.float32, weight_init=Tensor(weights[i])) for i in range(5)]
    x = rng.randn(4, 6).astype(np.float32)
    for layer in layers:      # S = 0: the base layer (and the graphs are compiled)
        np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), x @ layer.weight.asnumpy().T + layer.bias.asnumpy(),
                                   atol=1e-5)
    _randomise(group, slices + 10)
    increments = _np_increments(group)
    for i, layer in enumerate(layers):
        want = x @ (weights[i] + increments[:, :, i]).T + layer.bias.asnumpy()
        np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(layer.delta_weight(), increments[:, :, i], atol=1e-5)
    if slices == 1:   # shared singular vectors, per-layer singular values
        u, s, v = (getattr(group, f'mindpet_delta_tsvd_{k}').asnumpy().astype(np.float64) for k in 'usv')
        for i in range(5):
            np.testing.assert_allclose(increments[:, :, i], group.scaling * u[:, :, 0] @ np.diag(s[:, i]) @ v[:, :, 0].T,
                                       atol=1e-10)
    # Merge and unmerge in the compiled graphs.
    outputs = [layer(Tensor(x)).asnumpy() for layer in layers]
    for i, layer in enumerate(layers):
        layer.merge()
        np.testing.assert_allclose(layer.weight.asnumpy(), weights[i] + increments[:, :, i], atol=1e-5)
        np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), outputs[i], atol=1e-4)
        layer.unmerge()
        np.testing.assert_allclose(layer.weight.asnumpy(), weights[i], atol=1e-5)


@pytest.mark.parametrize('slices', [1, 2, 4])
def test_factor_slices_init_is_orthogonal_and_the_regulariser_matches_numpy(graph_mode, slices):
    group = TSVDGroup(7, 6, 4, tsvd_rank=3, tsvd_factor_slices=slices)
    for key in 'uv':
        factor = pad_slices(getattr(group, f'mindpet_delta_tsvd_{key}').asnumpy().astype(np.float64), 4)
        assert np.abs(t_product(t_transpose(factor), factor) - t_identity(3, 4)).max() < 1e-5
    assert float(group.orth_regularization().asnumpy()) < 1e-9
    assert orthogonal_init(7, 3, 4, slices=slices).shape == (7, 3, slices)
    _randomise(group, 3)
    want = 0.0
    for key in 'uv':
        factor = pad_slices(getattr(group, f'mindpet_delta_tsvd_{key}').asnumpy().astype(np.float64), 4)
        want += np.sum((t_product(t_transpose(factor), factor) - t_identity(3, 4)) ** 2)
    assert float(group.orth_regularization().asnumpy()) == pytest.approx(want, rel=1e-5)


class _Stack(nn.Cell):
    def __init__(self, slices):
        super().__init__()
        rng = np.random.RandomState(0)
        group = TSVDGroup(8, 8, 3, tsvd_rank=4, tsvd_alpha=4, tsvd_factor_slices=slices)
        self.proj = nn.CellList([TSVDDense(8, 8, group, i, compute_dtype=ms.float32,
                                           weight_init=Tensor(rng.randn(8, 8).astype(np.float32) * 0.3))
                                 for i in range(3)])
        self.head = nn.Dense(8, 2, weight_init=Tensor(rng.randn(2, 8).astype(np.float32) * 0.3))

    def construct(self, x):
        for layer in self.proj:
            x = x + ms.ops.tanh(layer(x))
        return self.head(x)


def test_factor_slices_train_in_graph_mode(graph_mode):
    net = _Stack(slices=1)
    freeze_delta(net, 'tsvd')
    assert sorted(p.name for p in net.trainable_params()) == [
        f'proj.0.tsvd_group.mindpet_delta_tsvd_{k}' for k in 'suv']
    rng = np.random.RandomState(1)
    x, y = Tensor(rng.randn(16, 8).astype(np.float32)), Tensor(rng.randn(16, 2).astype(np.float32))
    base = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    step = TrainStepWithGrads(WithOrthRegularizer(nn.WithLossCell(net, nn.MSELoss()), orth_reg_weight=0.1),
                              nn.Adam(net.trainable_params(), 0.02))
    losses = [float(step(x, y)[0].asnumpy()) for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0], losses
    for param in net.get_parameters():
        changed = not np.array_equal(param.asnumpy(), base[param.name])
        assert changed == ('mindpet_delta_tsvd' in param.name), param.name


def test_factor_slices_bad_values():
    with pytest.raises(ValueError, match=r"'tsvd_factor_slices' must be an int in \[1, 3\], but got 4"):
        TSVDGroup(4, 4, 3, tsvd_rank=2, tsvd_factor_slices=4)
    with pytest.raises(TypeError, match="'tsvd_factor_slices'"):
        TSVDGroup(4, 4, 3, tsvd_rank=2, tsvd_factor_slices=1.0)
