"""PSTDense: S = |W0+UV| + AB + R1^T + 1C^T, per-layer top-(1-s) mask with a straight-through gradient, the cubic
sparsity schedule driving a compiled graph, the sparse export, and GRAPH_MODE training."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor
from mindspore.train import Model

from mindpet.delta.pst import PSTDense, PSTSparsityScheduler, cubic_sparsity, kept_count
from mindpet.graph import freeze_delta

from tests.nets import regression_data, snapshot


def _randomise(layer, seed=3):
    rng = np.random.RandomState(seed)
    for name in ('u', 'v', 'a', 'b', 'r', 'c'):
        param = getattr(layer, f'mindpet_delta_pst_{name}')
        param.set_data(Tensor((rng.randn(*param.shape) * 0.3).astype(np.float32)))


def _np_parts(layer):
    get = lambda name: getattr(layer, f'mindpet_delta_pst_{name}').asnumpy().astype(np.float64)  # noqa: E731
    updated = layer.weight.asnumpy().astype(np.float64) + get('u') @ get('v')
    scores = np.abs(updated) + get('a') @ get('b') + get('r')[:, None] + get('c')[None, :]
    return updated, scores


def _np_mask(scores, sparsity):
    keep = kept_count(sparsity, scores.size)
    mask = np.zeros(scores.size)
    mask[np.argsort(-scores.reshape(-1), kind='stable')[:keep]] = 1
    return mask.reshape(scores.shape)


def test_names_shapes_and_init_is_magnitude_pruning():
    layer = PSTDense(12, 6, pst_rank_w=3, pst_rank_m=2)
    names = {p.name: tuple(p.shape) for p in layer.get_parameters()}
    assert names == {'weight': (6, 12), 'bias': (6,), 'mindpet_delta_pst_u': (6, 3), 'mindpet_delta_pst_v': (3, 12),
                     'mindpet_delta_pst_a': (6, 2), 'mindpet_delta_pst_b': (2, 12), 'mindpet_delta_pst_r': (6,),
                     'mindpet_delta_pst_c': (12,), 'mindpet_state_pst_sparsity': (), 'mindpet_state_pst_gate': ()}
    assert not layer.mindpet_state_pst_sparsity.requires_grad
    np.testing.assert_allclose(layer.importance_scores(), np.abs(layer.weight.asnumpy()), atol=1e-7)


@pytest.mark.parametrize('compute_dtype,tol', [(ms.float32, 1e-5), (ms.float16, 1e-2)])
def test_matches_formula_after_graph_ran(ms_mode, compute_dtype, tol):
    layer = PSTDense(16, 8, pst_rank_w=4, pst_rank_m=2, compute_dtype=compute_dtype)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 16)).astype(np.float32)
    base = x @ layer.weight.asnumpy().T + layer.bias.asnumpy()
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), base, atol=tol, rtol=tol)  # sparsity 0, U = 0
    _randomise(layer)
    layer.set_sparsity(0.6)  # Parameter data: the compiled graph must follow
    updated, scores = _np_parts(layer)
    mask = _np_mask(scores, 0.6)
    np.testing.assert_array_equal(layer.current_mask(), mask)
    out = layer(Tensor(x))
    assert out.shape == (2, 3, 8) and out.dtype == ms.float32
    np.testing.assert_allclose(out.asnumpy(), x @ (mask * updated).T + layer.bias.asnumpy(), atol=tol, rtol=tol)


@pytest.mark.parametrize('sparsity', [0.0, 0.1, 0.5, 0.75, 0.9, 0.97])
def test_mask_keeps_exact_top_share_and_export_has_that_sparsity(sparsity):
    layer = PSTDense(20, 10, pst_rank_w=3, pst_rank_m=3, pst_sparsity=sparsity, compute_dtype=ms.float32)
    _randomise(layer, seed=int(sparsity * 100))
    scores = layer.importance_scores()
    mask = layer.current_mask()
    n_keep = kept_count(sparsity, 200)
    assert n_keep == 200 - int(np.floor(sparsity * 200 + 0.5))
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert int(mask.sum()) == n_keep
    if 0 < n_keep < 200:
        assert scores[mask == 1].min() >= scores[mask == 0].max()
    weight = layer.export_weight()
    assert int((weight == 0).sum()) == 200 - n_keep
    updated, _ = _np_parts(layer)
    np.testing.assert_allclose(weight, mask * updated, atol=1e-6)


def test_straight_through_gradients_match_numpy(graph_mode):
    layer = PSTDense(6, 4, pst_rank_w=2, pst_rank_m=2, pst_sparsity=0.5, compute_dtype=ms.float32, has_bias=False)
    _randomise(layer)
    rng = np.random.RandomState(7)
    x, g = rng.randn(5, 6).astype(np.float32), rng.randn(5, 4).astype(np.float32)

    class _Loss(nn.Cell):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def construct(self, x, g):
            return (self.inner(x) * g).sum()

    params = [layer.mindpet_delta_pst_u, layer.mindpet_delta_pst_a, layer.mindpet_delta_pst_r,
              layer.mindpet_delta_pst_c]
    _, grads = ms.value_and_grad(_Loss(layer), None, params)(Tensor(x), Tensor(g))
    updated, scores = _np_parts(layer)
    mask = _np_mask(scores, 0.5)
    d_weight = g.T.astype(np.float64) @ x  # dL/d(M * W')
    d_scores = d_weight * updated          # through the straight-through mask
    v = layer.mindpet_delta_pst_v.asnumpy()
    b = layer.mindpet_delta_pst_b.asnumpy()
    expected = [(d_weight * mask + d_scores * np.sign(updated)) @ v.T, d_scores @ b.T, d_scores.sum(1),
                d_scores.sum(0)]
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.asnumpy(), want, rtol=1e-4, atol=1e-4)


def test_cubic_schedule_matches_formula():
    total, s_i, s_f = 100, 0.1, 0.9
    for step in range(0, 101):
        t_i, t_f = 10, 20
        if step <= t_i:
            want = s_i
        elif step >= total - t_f:
            want = s_f
        else:
            want = s_f + (s_i - s_f) * (1 - (step - t_i) / (total - t_i - t_f)) ** 3
        assert cubic_sparsity(step, total, s_i, s_f, 0.1, 0.2) == pytest.approx(want, abs=1e-12)
    values = [cubic_sparsity(t, total, s_i, s_f, 0.1, 0.2) for t in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert cubic_sparsity(50, 100) == pytest.approx(0.9 - 0.9 * (1 - 40 / 80) ** 3)


def test_scheduler_drives_compiled_graph_and_merge(graph_mode):
    net = nn.SequentialCell([PSTDense(8, 8, pst_rank_w=2, pst_rank_m=2, compute_dtype=ms.float32),
                             PSTDense(8, 4, pst_rank_w=2, pst_rank_m=2, compute_dtype=ms.float32)])
    for layer in net:
        _randomise(layer)
    x = Tensor(np.random.RandomState(1).randn(3, 8).astype(np.float32))
    dense_out = net(x).asnumpy()  # compiled at sparsity 0
    scheduler = PSTSparsityScheduler(net, total_steps=10, final_sparsity=0.75, warmup_fraction=0.2,
                                     cooldown_fraction=0.2)
    assert scheduler.step(0) == 0.0
    np.testing.assert_array_equal(net(x).asnumpy(), dense_out)
    assert scheduler.step(10) == 0.75
    assert scheduler.sparsity_at(5) == pytest.approx(0.75 - 0.75 * (1 - 3 / 6) ** 3)
    sparse_out = net(x).asnumpy()
    report = scheduler.report()
    assert report == {'0': (16, 64, 0.75), '1': (8, 32, 0.75)}
    ref = x.asnumpy()
    for layer in net:
        ref = ref @ layer.export_weight().T + layer.bias.asnumpy()
    np.testing.assert_allclose(sparse_out, ref, atol=1e-5)
    # merge in the compiled graph: the weight becomes the sparse export, outputs are unchanged
    w0 = net[0].weight.asnumpy().copy()
    for layer in net:
        layer.merge()
    assert int((net[0].weight.asnumpy() == 0).sum()) == 48
    np.testing.assert_allclose(net(x).asnumpy(), sparse_out, atol=1e-5)
    plain = nn.SequentialCell([layer.to_dense() for layer in net])
    np.testing.assert_allclose(plain(x).asnumpy(), sparse_out, atol=1e-5)
    for layer in net:
        layer.unmerge()
    np.testing.assert_array_equal(net[0].weight.asnumpy(), w0)
    np.testing.assert_allclose(net(x).asnumpy(), sparse_out, atol=1e-5)


class _PSTNet(nn.Cell):
    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.fc1 = PSTDense(8, 16, pst_rank_w=4, pst_rank_m=4, compute_dtype=ms.float32,
                            weight_init=Tensor(rng.randn(16, 8).astype(np.float32) * 0.3))
        self.act = nn.ReLU()
        self.fc2 = PSTDense(16, 4, pst_rank_w=4, pst_rank_m=4, compute_dtype=ms.float32,
                            weight_init=Tensor(rng.randn(4, 16).astype(np.float32) * 0.3))

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_training_graph_mode_with_schedule(graph_mode):
    net = _PSTNet()
    freeze_delta(net, 'pst')
    assert len(net.trainable_params()) == 12
    x, y = regression_data()
    before = snapshot(net)
    scheduler = PSTSparsityScheduler(net, total_steps=20, final_sparsity=0.5, warmup_fraction=0.1,
                                     cooldown_fraction=0.3)
    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), nn.Adam(net.trainable_params(), 0.05))
    losses, seen = [], []
    for i in range(20):
        seen.append(scheduler.step(i))
        losses.append(float(step(Tensor(x), Tensor(y)).asnumpy()))
    assert seen[0] == 0.0 and seen[-1] == 0.5 and seen[10] > 0.0
    assert min(losses[-3:]) < 0.7 * losses[0], losses
    after = snapshot(net)
    for name, value in before.items():
        if 'mindpet_delta_pst' in name:
            assert np.abs(after[name] - value).max() > 1e-4, name
        elif 'mindpet_state_pst_sparsity' in name:
            assert float(after[name]) == 0.5
        else:
            np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert int((net.fc1.export_weight() == 0).sum()) == 64
    assert int((net.fc2.export_weight() == 0).sum()) == 32


def test_model_train_callback_sets_sparsity_before_each_step(graph_mode):
    net = _PSTNet()
    freeze_delta(net, 'pst')
    x, y = regression_data(n=8)
    seen = []

    class _Record(ms.train.Callback):
        def on_train_step_begin(self, run_context):
            seen.append(net.fc1.sparsity)

    scheduler = PSTSparsityScheduler(net, total_steps=4, final_sparsity=0.5, warmup_fraction=0.0,
                                     cooldown_fraction=0.25)
    data = ms.dataset.NumpySlicesDataset({'x': x, 'y': y}, shuffle=False).batch(2)
    model = Model(nn.WithLossCell(net, nn.MSELoss()), optimizer=nn.Adam(net.trainable_params(), 0.01))
    model.train(1, data, callbacks=[scheduler, _Record()], dataset_sink_mode=False)
    want = [cubic_sparsity(i, 4, 0.0, 0.5, 0.0, 0.25) for i in range(4)]
    assert seen == pytest.approx(want)
    assert want[0] == 0.0 and want[-1] == 0.5


@pytest.mark.parametrize('kwargs,exc,fragments', [
    (dict(pst_rank_w=0), ValueError, ['pst_rank_w', '0']),
    (dict(pst_rank_m=1.5), TypeError, ['pst_rank_m', '1.5']),
    (dict(pst_sparsity=1.0), ValueError, ['pst_sparsity', '1.0']),
    (dict(pst_sparsity='0.5'), TypeError, ['pst_sparsity', "'0.5'"]),
    (dict(pst_u_init=Tensor(np.zeros((3, 8), np.float32))), ValueError, ['pst_u_init', '(3, 8)']),
    (dict(in_channels=-1), ValueError, ['in_channels', '-1']),
    (dict(pst_rank_w=5), ValueError, ['pst_rank_w', 'min(in_channels, out_channels) = 4', 'but got 5']),
    (dict(pst_rank_m=5), ValueError, ['pst_rank_m', 'min(in_channels, out_channels) = 4', 'but got 5']),
])
def test_bad_arguments(kwargs, exc, fragments):
    with pytest.raises(exc) as info:
        PSTDense(**dict(dict(in_channels=8, out_channels=4, pst_rank_w=2, pst_rank_m=2), **kwargs))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize('call,exc,fragment', [
    (lambda: cubic_sparsity(-1, 10), ValueError, 'step'),
    (lambda: cubic_sparsity(1, 0), ValueError, 'total_steps'),
    (lambda: cubic_sparsity(1, 10, final_sparsity=1.2), ValueError, 'final_sparsity'),
    (lambda: cubic_sparsity(1, 10, warmup_fraction=0.6, cooldown_fraction=0.5), ValueError, 'cooldown_fraction'),
    (lambda: PSTSparsityScheduler(nn.Dense(2, 2), 10), ValueError, 'no PSTDense'),
    (lambda: PSTSparsityScheduler('net', 10), TypeError, 'network'),
    (lambda: PSTDense(4, 2, 2, 2).set_sparsity(-0.1), ValueError, 'sparsity'),
])
def test_schedule_argument_checks(call, exc, fragment):
    with pytest.raises(exc, match=fragment):
        call()
