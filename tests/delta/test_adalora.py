"""AdaLoRADense (h = W0 x + b + s P diag(lambda) Q x), its orthogonality regulariser, the cubic budget, the
allocator's masking across layers, merging, and GRAPH_MODE training with rank allocation."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

from mindpet.delta.adalora import (AdaLoRADense, AdaLoRAAllocator, WithOrthRegularizer, TrainStepWithGrads,
                                   cubic_budget)
from mindpet.delta.rank_allocation import ImportanceTracker, keep_top
from mindpet.graph import freeze_delta

from tests.nets import regression_data, snapshot


def _randomise(layer, seed=3):
    rng = np.random.RandomState(seed)
    for key in ('p', 'lambda', 'q'):
        param = getattr(layer, f'mindpet_delta_adalora_{key}')
        param.set_data(Tensor(rng.randn(*param.shape).astype(np.float32)))


def _reference(layer, x):
    p = layer.mindpet_delta_adalora_p.asnumpy().astype(np.float64)
    lam = layer.mindpet_delta_adalora_lambda.asnumpy().astype(np.float64)
    q = layer.mindpet_delta_adalora_q.asnumpy().astype(np.float64)
    w = layer.weight.asnumpy().astype(np.float64) + layer.scaling * (p * lam) @ q
    return x.astype(np.float64) @ w.T + layer.bias.asnumpy()


def test_names_shapes_init():
    layer = AdaLoRADense(12, 6, adalora_rank=3, adalora_alpha=6)
    names = {p.name: tuple(p.shape) for p in layer.get_parameters()}
    assert names == {'weight': (6, 12), 'bias': (6,), 'mindpet_delta_adalora_p': (6, 3),
                     'mindpet_delta_adalora_lambda': (3,), 'mindpet_delta_adalora_q': (3, 12),
                     'mindpet_state_adalora_scaling': ()}
    np.testing.assert_array_equal(layer.mindpet_delta_adalora_lambda.asnumpy(), 0)
    assert 0 < layer.mindpet_delta_adalora_p.asnumpy().std() < 0.05
    assert layer.scaling == 2.0 and layer.rank == 0


@pytest.mark.parametrize('compute_dtype,tol', [(ms.float32, 1e-5), (ms.float16, 1e-2)])
def test_matches_formula_after_graph_ran(ms_mode, compute_dtype, tol):
    layer = AdaLoRADense(16, 8, adalora_rank=4, adalora_alpha=8, compute_dtype=compute_dtype)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 16)).astype(np.float32)
    base = x @ layer.weight.asnumpy().T + layer.bias.asnumpy()
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), base, atol=tol, rtol=tol)
    _randomise(layer)
    out = layer(Tensor(x))
    assert out.shape == (2, 3, 8) and out.dtype == ms.float32
    np.testing.assert_allclose(out.asnumpy(), _reference(layer, x), atol=tol * 4, rtol=tol)


def test_orth_regularizer_matches_numpy(graph_mode):
    layer = AdaLoRADense(10, 6, adalora_rank=4, compute_dtype=ms.float32)
    _randomise(layer)
    p, q = layer.mindpet_delta_adalora_p.asnumpy(), layer.mindpet_delta_adalora_q.asnumpy()
    want = (np.linalg.norm(p.T @ p - np.eye(4)) ** 2 + np.linalg.norm(q @ q.T - np.eye(4)) ** 2)
    assert float(layer.orth_regularization().asnumpy()) == pytest.approx(want, rel=1e-5)
    # Orthonormal factors give 0.
    layer.mindpet_delta_adalora_p.set_data(Tensor(np.linalg.qr(p)[0].astype(np.float32)))
    layer.mindpet_delta_adalora_q.set_data(Tensor(np.linalg.qr(q.T)[0].T.astype(np.float32)))
    assert abs(float(layer.orth_regularization().asnumpy())) < 1e-5

    class _Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.fc1 = AdaLoRADense(6, 6, adalora_rank=2, compute_dtype=ms.float32)
            self.fc2 = AdaLoRADense(6, 3, adalora_rank=2, compute_dtype=ms.float32)

        def construct(self, x):
            return self.fc2(self.fc1(x))

    net = _Net()
    loss_net = nn.WithLossCell(net, nn.MSELoss())
    reg_net = WithOrthRegularizer(loss_net, orth_reg_weight=0.3)
    assert [p.name for p in reg_net.trainable_params()] == [p.name for p in net.trainable_params()]
    x, y = Tensor(np.ones((2, 6), np.float32)), Tensor(np.zeros((2, 3), np.float32))
    reg_net(x, y)  # compiled; then change the factors through Parameter data
    _randomise(net.fc1, 5)
    regs = [float(cell.orth_regularization().asnumpy()) for cell in (net.fc1, net.fc2)]
    want = float(loss_net(x, y).asnumpy()) + 0.3 * np.mean(regs)
    assert float(reg_net(x, y).asnumpy()) == pytest.approx(want, rel=1e-5)
    assert float(reg_net.regularization().asnumpy()) == pytest.approx(np.mean(regs), rel=1e-5)


def test_cubic_budget_follows_formula():
    total, b0, bt, t_i, t_f = 100, 48, 16, 10, 20
    for step in range(100):
        budget, mask = cubic_budget(step, total, b0, bt, t_i, t_f, delta_t=5)
        if step <= t_i:
            assert (budget, mask) == (b0, False)
        elif step >= total - t_f:
            assert (budget, mask) == (bt, True)
        else:
            want = bt + int((b0 - bt) * (1 - (step - t_i) / (total - t_f - t_i)) ** 3)
            assert budget == want
            assert mask == ((step - t_i) % 5 == 0)
    budgets = [cubic_budget(s, total, b0, bt, t_i, t_f)[0] for s in range(100)]
    assert all(b <= a for a, b in zip(budgets, budgets[1:]))
    with pytest.raises(ValueError, match='t_final'):
        cubic_budget(0, 10, 4, 2, t_init=5, t_final=5)


def test_importance_tracker_and_keep_top():
    tracker = ImportanceTracker(0.5, 0.8)
    s1 = tracker.update('w', np.array([1.0, 2.0]))
    ibar = 0.5 * np.array([1.0, 2.0])
    ubar = 0.2 * np.abs(np.array([1.0, 2.0]) - ibar)
    np.testing.assert_allclose(s1, ibar * ubar)
    s2 = tracker.update('w', np.array([3.0, 0.0]))
    ibar2 = 0.5 * ibar + 0.5 * np.array([3.0, 0.0])
    ubar2 = 0.8 * ubar + 0.2 * np.abs(np.array([3.0, 0.0]) - ibar2)
    np.testing.assert_allclose(s2, ibar2 * ubar2)
    masks = keep_top([np.array([5.0, 1.0, 3.0]), np.array([4.0, 2.0])], 3)
    assert [m.tolist() for m in masks] == [[True, False, True], [True, False]]


class _AdaNet(nn.Cell):
    def __init__(self, rank=4):
        super().__init__()
        rng = np.random.RandomState(0)
        self.fc1 = AdaLoRADense(8, 16, adalora_rank=rank, adalora_alpha=rank, compute_dtype=ms.float32,
                                weight_init=Tensor(rng.randn(16, 8).astype(np.float32) * 0.3))
        self.act = nn.ReLU()
        self.fc2 = AdaLoRADense(16, 4, adalora_rank=rank, adalora_alpha=rank, compute_dtype=ms.float32,
                                weight_init=Tensor(rng.randn(4, 16).astype(np.float32) * 0.3))

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_allocator_masks_lowest_triplets_across_layers(graph_mode):
    net = _AdaNet()
    for i, layer in enumerate((net.fc1, net.fc2)):
        _randomise(layer, seed=10 + i)
    x = np.random.RandomState(1).randn(5, 8).astype(np.float32)
    net(Tensor(x))  # compile before the allocator changes lambda
    rng = np.random.RandomState(2)
    grads = {p.name: rng.randn(*p.shape).astype(np.float32) for p in net.trainable_params()}
    allocator = AdaLoRAAllocator(net, total_steps=10, target_rank=1, t_init=0, t_final=2, beta1=0.5, beta2=0.5)
    # Reference triplet scores after one update: Ibar = 0.5 I, Ubar = 0.5 |I - Ibar|.
    ref = []
    for layer in (net.fc1, net.fc2):
        def score(key, layer=layer):
            param = getattr(layer, f'mindpet_delta_adalora_{key}')
            sens = np.abs(param.asnumpy().astype(np.float64) * grads[param.name])
            return (0.5 * sens) * (0.5 * np.abs(sens - 0.5 * sens))
        ref.append(score('lambda') + score('p').mean(0) + score('q').mean(1))
    lambdas_before = [layer.mindpet_delta_adalora_lambda.asnumpy().copy() for layer in (net.fc1, net.fc2)]
    budget = allocator.update_and_allocate(4, grads)
    want_budget = 2 + int((8 - 2) * (1 - 4 / 8) ** 3)
    assert budget == want_budget == 2
    flat = np.concatenate(ref)
    keep = np.zeros(8, bool)
    keep[np.argsort(-flat)[:budget]] = True
    for i, layer in enumerate((net.fc1, net.fc2)):
        lam = layer.mindpet_delta_adalora_lambda.asnumpy()
        kept = keep[4 * i:4 * i + 4]
        np.testing.assert_array_equal(lam[~kept], 0)
        np.testing.assert_array_equal(lam[kept], lambdas_before[i][kept])
    assert sum(allocator.rank_pattern().values()) == 2
    assert allocator.rank_pattern() == {'fc1': int(keep[:4].sum()), 'fc2': int(keep[4:].sum())}
    # The compiled graph sees the zeroed lambdas.
    hidden = np.maximum(_reference(net.fc1, x), 0)
    np.testing.assert_allclose(net(Tensor(x)).asnumpy(), _reference(net.fc2, hidden), atol=1e-5)
    with pytest.raises(ValueError, match='mindpet_delta_adalora'):
        allocator.update_and_allocate(5, {})


def test_training_with_allocation_graph_mode(graph_mode):
    net = _AdaNet(rank=4)
    freeze_delta(net, 'adalora')
    x, y = regression_data()
    before = snapshot(net)
    step = TrainStepWithGrads(WithOrthRegularizer(nn.WithLossCell(net, nn.MSELoss()), 0.1),
                              nn.Adam(net.trainable_params(), 0.05))
    allocator = AdaLoRAAllocator(net, total_steps=20, target_rank=2, t_init=3, t_final=5, delta_t=2)
    losses, budgets = [], []
    for i in range(20):
        loss, grads = step(Tensor(x), Tensor(y))
        losses.append(float(loss.asnumpy()))
        budgets.append(allocator.update_and_allocate(i, step.grad_dict(grads)))
    assert budgets[0] == 8 and budgets[-1] == 4
    assert all(b <= a for a, b in zip(budgets, budgets[1:]))
    assert min(losses[-3:]) < 0.7 * losses[0], losses
    pattern = allocator.rank_pattern()
    assert sum(pattern.values()) == 4
    assert {k: v.rank for k, v in (('fc1', net.fc1), ('fc2', net.fc2))} == pattern
    after = snapshot(net)
    for name, value in before.items():
        if name.endswith('mindpet_delta_adalora_lambda') and pattern[name.split('.')[0]] == 0:
            # The allocator may give a layer no rank at all (it depends on the random init): then every one of
            # its singular values is pruned to exactly zero.
            np.testing.assert_array_equal(after[name], 0, err_msg=name)
        elif 'mindpet_delta_adalora' in name:
            assert np.abs(after[name] - value).max() > 1e-4, name
        else:
            np.testing.assert_array_equal(after[name], value, err_msg=name)
    # Merge like LoRA in the compiled graph.
    out = net(Tensor(x)).asnumpy()
    w0 = net.fc1.weight.asnumpy().copy()
    net.fc1.merge()
    np.testing.assert_allclose(net.fc1.weight.asnumpy(), w0 + net.fc1.delta_weight(), atol=1e-6)
    np.testing.assert_allclose(net(Tensor(x)).asnumpy(), out, atol=1e-5)
    net.fc1.unmerge()
    np.testing.assert_allclose(net.fc1.weight.asnumpy(), w0, atol=1e-6)
    np.testing.assert_allclose(net.fc2.to_dense()(Tensor(np.maximum(_reference(net.fc1, x), 0).astype(np.float32)))
                               .asnumpy(), out, atol=1e-5)


def test_shard():
    layer = AdaLoRADense(16, 8, adalora_rank=4)
    layer.shard(strategy_adalora_q_matmul=((2, 1), (1, 1)), strategy_adalora_lambda_mul=((2, 1), (1,)))
    assert layer.lambda_mul.in_strategy == ((2, 1), (1,))
    with pytest.raises(ValueError, match='strategy_adalora_p_matmul'):
        layer.shard(strategy_adalora_p_matmul=((2, 1),))


@pytest.mark.parametrize('kwargs,exc,fragments', [
    (dict(adalora_rank=0), ValueError, ['adalora_rank', '0']),
    (dict(adalora_rank=2.5), TypeError, ['adalora_rank', '2.5']),
    (dict(adalora_alpha=0), ValueError, ['adalora_alpha', '0']),
    (dict(adalora_dropout=1), TypeError, ['adalora_dropout', '1']),
    (dict(adalora_p_init=Tensor(np.zeros((4, 3), np.float32))), ValueError, ['adalora_p_init', '(4, 3)']),
])
def test_bad_arguments(kwargs, exc, fragments):
    with pytest.raises(exc) as info:
        AdaLoRADense(**dict(dict(in_channels=8, out_channels=4, adalora_rank=2), **kwargs))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_allocator_argument_checks():
    net = _AdaNet(rank=2)
    with pytest.raises(ValueError, match='target_rank'):
        AdaLoRAAllocator(net, 10, target_rank=3)
    with pytest.raises(ValueError, match='no AdaLoRADense'):
        AdaLoRAAllocator(nn.Dense(2, 2), 10)
    with pytest.raises(ValueError, match='beta1'):
        AdaLoRAAllocator(net, 10, target_rank=1, beta1=1.0)
    with pytest.raises(ValueError, match="'t_init' \\+ 't_final'"):
        AdaLoRAAllocator(net, 10, target_rank=1, t_init=5, t_final=5)
    with pytest.raises(TypeError, match='grads'):
        AdaLoRAAllocator(net, 10, target_rank=1).update_and_allocate(0, [1])
    with pytest.raises(ValueError, match='orth_regularization'):
        WithOrthRegularizer(nn.WithLossCell(nn.Dense(2, 2), nn.MSELoss()))
