"""t-SVD adapter: NumPy t-product / t-transpose / t-SVD maths, the shared-factor Cells against the t-product
formula, the orthogonality regulariser, per-batch tube allocation, merging, and GRAPH_MODE training."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

from mindpet.delta.tsvd import (TSVDGroup, TSVDDense, TSVDAllocator, t_product, t_transpose, t_svd, f_diag,
                                t_identity, t_orthogonal)
from mindpet.delta.rank_allocation import WithOrthRegularizer, TrainStepWithGrads
from mindpet.graph import freeze_delta

from tests.nets import snapshot


def _circular(a, b):
    """The t-product by its definition: C_l = sum_j A_j @ B_{(l - j) mod L}."""
    length = a.shape[2]
    return np.stack([sum(a[:, :, j] @ b[:, :, (l - j) % length] for j in range(length)) for l in range(length)], 2)


@pytest.mark.parametrize('length', [1, 2, 3, 4, 5])
def test_t_product_and_transpose_match_definitions(length):
    rng = np.random.RandomState(length)
    a, b = rng.randn(3, 4, length), rng.randn(4, 2, length)
    np.testing.assert_allclose(t_product(a, b), _circular(a, b), atol=1e-12)
    # (A * B)^T = B^T * A^T, and the identity tensor is neutral.
    np.testing.assert_allclose(t_transpose(t_product(a, b)), t_product(t_transpose(b), t_transpose(a)), atol=1e-12)
    np.testing.assert_allclose(t_product(a, t_identity(4, length)), a, atol=1e-12)
    assert t_transpose(a)[:, :, 0].tolist() == a[:, :, 0].T.tolist()


@pytest.mark.parametrize('n,length', [(6, 4), (5, 3), (8, 1), (4, 6)])
def test_t_svd_reconstructs_random_tensor_and_factors_are_orthogonal(n, length):
    x = np.random.RandomState(n + length).randn(n, n, length).astype(np.float32)
    u, s, v = t_svd(x)
    assert u.shape == (n, n, length) and s.shape == (n, length) and v.shape == (n, n, length)
    recon = t_product(t_product(u, f_diag(s)), t_transpose(v))
    assert np.abs(recon - x).max() < 1e-5
    for factor in (u, v):
        assert np.abs(t_product(t_transpose(factor), factor) - t_identity(n, length)).max() < 1e-5
    # Truncation keeps orthogonality and gives the best-in-Fourier approximation (error falls with rank).
    errors = []
    for rank in (1, n // 2, n):
        u_r, s_r, v_r = t_svd(x, rank)
        assert np.abs(t_product(t_transpose(u_r), u_r) - t_identity(rank, length)).max() < 1e-5
        errors.append(np.linalg.norm(t_product(t_product(u_r, f_diag(s_r)), t_transpose(v_r)) - x))
    assert errors[0] > errors[1] > errors[2]


def test_t_orthogonal_and_rectangular_t_svd():
    q = t_orthogonal(np.random.RandomState(0).randn(7, 3, 4))
    assert np.abs(t_product(t_transpose(q), q) - t_identity(3, 4)).max() < 1e-10
    x = np.random.RandomState(1).randn(5, 3, 4)
    u, s, v = t_svd(x)
    assert u.shape == (5, 3, 4) and v.shape == (3, 3, 4)
    assert np.abs(t_product(t_product(u, f_diag(s)), t_transpose(v)) - x).max() < 1e-10
    with pytest.raises(ValueError, match='n >= k'):
        t_orthogonal(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match='do not chain'):
        t_product(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))


class _Blocks(nn.Cell):
    """L blocks, each with a t-SVD query projection (one group) and a t-SVD output projection (another group)."""

    def __init__(self, num_blocks=3, dim=8, rank=4, hidden=6):
        super().__init__()
        rng = np.random.RandomState(0)
        # The groups are only handed to the layers: they are registered under the first layer of each.
        q_group = TSVDGroup(dim, dim, num_blocks, tsvd_rank=rank, tsvd_alpha=rank)
        o_group = TSVDGroup(dim, hidden, num_blocks, tsvd_rank=rank, tsvd_alpha=rank)
        self.q = nn.CellList([TSVDDense(dim, dim, q_group, i, compute_dtype=ms.float32,
                                        weight_init=Tensor(rng.randn(dim, dim).astype(np.float32) * 0.3))
                              for i in range(num_blocks)])
        self.o = nn.CellList([TSVDDense(dim, hidden, o_group, i, compute_dtype=ms.float32,
                                        weight_init=Tensor(rng.randn(hidden, dim).astype(np.float32) * 0.3))
                              for i in range(num_blocks)])
        self.act = nn.ReLU()
        self.head = nn.Dense(hidden * num_blocks, 4, weight_init=Tensor(rng.randn(4, hidden * num_blocks)
                                                                        .astype(np.float32) * 0.3))

    @property
    def q_group(self):
        return self.q[0].tsvd_group

    @property
    def o_group(self):
        return self.o[0].tsvd_group

    def construct(self, x):
        outs = ()
        for q, o in zip(self.q, self.o):
            x = self.act(q(x)) + x
            outs = outs + (o(x),)
        return self.head(ms.ops.concat(outs, 1))


def _randomise(group, seed):
    rng = np.random.RandomState(seed)
    for key in ('u', 's', 'v'):
        param = getattr(group, f'mindpet_delta_tsvd_{key}')
        param.set_data(Tensor((rng.randn(*param.shape) * 0.5).astype(np.float32)))


def _np_increment(group, index):
    u = group.mindpet_delta_tsvd_u.asnumpy().astype(np.float64)
    s = group.mindpet_delta_tsvd_s.asnumpy().astype(np.float64)
    v = group.mindpet_delta_tsvd_v.asnumpy().astype(np.float64)
    return group.scaling * _circular(_circular(u, f_diag(s)), t_transpose(v))[:, :, index]


def test_group_names_init_and_orthogonality():
    net = _Blocks()
    names = [p.name for p in net.get_parameters()]
    # A shared group is registered once, under the first layer it was given to.
    assert len(names) == len(set(names))
    assert sorted(n for n in names if 'mindpet_delta_tsvd' in n) == sorted(
        f'{layer}.0.tsvd_group.mindpet_delta_tsvd_{key}' for layer in ('q', 'o') for key in ('u', 's', 'v'))
    assert net.q[2].tsvd_group is net.q_group
    assert net.q_group.mindpet_delta_tsvd_u.shape == (8, 4, 3) and net.o_group.mindpet_delta_tsvd_u.shape == (6, 4, 3)
    np.testing.assert_array_equal(net.q_group.mindpet_delta_tsvd_s.asnumpy(), 0)
    for group in (net.q_group, net.o_group):
        for key in ('u', 'v'):
            f = getattr(group, f'mindpet_delta_tsvd_{key}').asnumpy().astype(np.float64)
            assert np.abs(t_product(t_transpose(f), f) - t_identity(4, 3)).max() < 1e-5
        assert float(group.orth_regularization().asnumpy()) < 1e-9
    assert net.q_group.rank == 0


def test_layers_match_t_product_formula_after_graph_ran(graph_mode):
    net = _Blocks()
    x = np.random.RandomState(1).randn(5, 8).astype(np.float32)
    layer_x = Tensor(x)
    for layer in net.q:
        np.testing.assert_allclose(layer(layer_x).asnumpy(), x @ layer.weight.asnumpy().T + layer.bias.asnumpy(),
                                   atol=1e-5)  # S = 0: each layer is its base Dense; graphs now compiled
    _randomise(net.q_group, 3)
    for i, layer in enumerate(net.q):
        want = x @ (layer.weight.asnumpy() + _np_increment(net.q_group, i)).T + layer.bias.asnumpy()
        np.testing.assert_allclose(layer(layer_x).asnumpy(), want, atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(layer.delta_weight(), _np_increment(net.q_group, i), atol=1e-5)


def test_orth_regularizer_matches_numpy(graph_mode):
    net = _Blocks()
    _randomise(net.q_group, 4)
    loss_net = WithOrthRegularizer(nn.WithLossCell(net, nn.MSELoss()), orth_reg_weight=0.2)
    x, y = Tensor(np.ones((2, 8), np.float32)), Tensor(np.zeros((2, 4), np.float32))
    loss_net(x, y)  # compile, then change U through Parameter data
    _randomise(net.q_group, 5)
    want = 0.0
    for key in ('u', 'v'):
        f = getattr(net.q_group, f'mindpet_delta_tsvd_{key}').asnumpy().astype(np.float64)
        want += np.sum((t_product(t_transpose(f), f) - t_identity(4, 3)) ** 2)
    assert float(net.q_group.orth_regularization().asnumpy()) == pytest.approx(want, rel=1e-5)
    task = float(nn.WithLossCell(net, nn.MSELoss())(x, y).asnumpy())
    total = task + 0.2 * (want + float(net.o_group.orth_regularization().asnumpy())) / 2
    assert float(loss_net(x, y).asnumpy()) == pytest.approx(total, rel=1e-5)


def test_merge_unfolded_increments_in_compiled_graph(graph_mode):
    net = _Blocks()
    _randomise(net.q_group, 6)
    _randomise(net.o_group, 7)
    x = Tensor(np.random.RandomState(2).randn(4, 8).astype(np.float32))
    out = net(x).asnumpy()
    weights = [layer.weight.asnumpy().copy() for layer in net.q]
    increments = net.q_group.increments()
    for i, layer in enumerate(net.q):
        layer.merge()
        np.testing.assert_allclose(layer.weight.asnumpy(), weights[i] + increments[:, :, i], atol=1e-6)
    for layer in net.o:
        layer.merge()
    np.testing.assert_allclose(net(x).asnumpy(), out, atol=1e-4)
    # Zero-overhead copies: plain Dense layers with the unfolded increments merged.
    dense = [layer.to_dense() for layer in net.q]
    assert all(type(d) is nn.Dense for d in dense)
    np.testing.assert_allclose(dense[1].weight.asnumpy(), weights[1] + increments[:, :, 1], atol=1e-6)
    for layer in list(net.q) + list(net.o):
        layer.unmerge()
    for i, layer in enumerate(net.q):
        np.testing.assert_allclose(layer.weight.asnumpy(), weights[i], atol=1e-6)
    np.testing.assert_allclose(net(x).asnumpy(), out, atol=1e-4)


def test_allocator_keeps_budget_of_tubes_from_current_and_previous_scores(graph_mode):
    net = _Blocks()
    _randomise(net.q_group, 8)
    _randomise(net.o_group, 9)
    x = Tensor(np.random.RandomState(3).randn(4, 8).astype(np.float32))
    net(x)
    allocator = TSVDAllocator(net, total_steps=10, target_rank=2, t_init=1, t_final=3, beta1=0.5, beta2=0.5)
    assert [name for name, _ in allocator.layers] == ['q.0.tsvd_group', 'o.0.tsvd_group']
    rng = np.random.RandomState(4)
    params = [p for p in net.trainable_params() if 'tsvd' in p.name]
    grads = [{p.name: rng.randn(*p.shape) for p in params} for _ in range(2)]

    def ref_scores(step_grads_list):
        sens = {name: np.zeros_like(g) for name, g in step_grads_list[0].items()}
        unc = {name: np.zeros_like(g) for name, g in step_grads_list[0].items()}
        history = []
        for g in step_grads_list:
            for name in sens:
                sens[name] = 0.5 * sens[name] + 0.5 * np.abs(g[name])
                unc[name] = 0.5 * unc[name] + 0.5 * np.abs(np.abs(g[name]) - sens[name])
            scores = []
            for prefix in ('q.0.tsvd_group', 'o.0.tsvd_group'):
                score = {key: sens[f'{prefix}.mindpet_delta_tsvd_{key}'] * unc[f'{prefix}.mindpet_delta_tsvd_{key}']
                         for key in ('u', 's', 'v')}
                scores.append(score['s'].mean(1) + score['u'].mean((0, 2)) + score['v'].mean((0, 2)))
            history.append(np.concatenate(scores))
        return history

    s_before = [g.mindpet_delta_tsvd_s.asnumpy().copy() for g in (net.q_group, net.o_group)]
    assert allocator.update_and_allocate(0, grads[0]) == 8  # warm-up: nothing masked
    assert allocator.rank_pattern() == {'q.0.tsvd_group': 4, 'o.0.tsvd_group': 4}
    budget = allocator.update_and_allocate(2, grads[1])
    assert budget == 4 + int(4 * (1 - 1 / 6) ** 3) == 6
    history = ref_scores(grads)
    decision = 0.5 * (history[1] + history[0])
    keep = np.zeros(8, bool)
    keep[np.argsort(-decision)[:6]] = True
    for i, group in enumerate((net.q_group, net.o_group)):
        s_now = group.mindpet_delta_tsvd_s.asnumpy()
        np.testing.assert_array_equal(s_now[~keep[4 * i:4 * i + 4]], 0)
        np.testing.assert_array_equal(s_now[keep[4 * i:4 * i + 4]], s_before[i][keep[4 * i:4 * i + 4]])
    assert sum(allocator.rank_pattern().values()) == 6
    assert net.q_group.rank + net.o_group.rank == 6
    # The compiled graph sees the dropped tubes: layer 0 equals the formula with the zeroed S.
    layer = net.q[0]
    want = x.asnumpy() @ (layer.weight.asnumpy() + _np_increment(net.q_group, 0)).T + layer.bias.asnumpy()
    np.testing.assert_allclose(layer(x).asnumpy(), want, atol=1e-4)


def test_training_with_tube_allocation_graph_mode(graph_mode):
    net = _Blocks()
    freeze_delta(net, 'tsvd')
    assert len(net.trainable_params()) == 6
    rng = np.random.RandomState(5)
    x = rng.randn(32, 8).astype(np.float32)
    y = np.tanh(x @ rng.randn(8, 4)).astype(np.float32)
    before = snapshot(net)
    step = TrainStepWithGrads(WithOrthRegularizer(nn.WithLossCell(net, nn.MSELoss()), 0.1),
                              nn.Adam(net.trainable_params(), 0.02))
    allocator = TSVDAllocator(net, total_steps=20, target_rank=2, t_init=2, t_final=5)
    losses, budgets = [], []
    for i in range(20):
        loss, grads = step(Tensor(x), Tensor(y))
        losses.append(float(loss.asnumpy()))
        budgets.append(allocator.update_and_allocate(i, step.grad_dict(grads)))
    assert budgets[0] == 8 and budgets[-1] == 4
    assert min(losses[-3:]) < 0.7 * losses[0], losses
    assert sum(allocator.rank_pattern().values()) == 4
    assert net.q_group.rank + net.o_group.rank == 4
    after = snapshot(net)
    for name, value in before.items():
        if 'mindpet_delta_tsvd_s' in name:
            # S starts at 0; the kept tubes trained, the dropped ones are exactly 0 (a whole group may lose them all).
            kept = np.any(after[name] != 0, axis=1)
            assert kept.sum() == allocator.rank_pattern()[name.rsplit('.', 1)[0]]
        elif 'mindpet_delta_tsvd' in name:
            assert np.abs(after[name] - value).max() > 1e-4, name
        else:
            np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert np.abs(after['o.0.tsvd_group.mindpet_delta_tsvd_s']).max() > 1e-3
    print('losses', [round(v, 4) for v in losses], 'budgets', budgets, 'ranks', allocator.rank_pattern())


@pytest.mark.parametrize('call,exc,fragments', [
    (lambda: TSVDGroup(8, 8, 0), ValueError, ['num_layers', '0']),
    (lambda: TSVDGroup(8, 4, 2, tsvd_rank=5), ValueError, ['tsvd_rank', '5']),
    (lambda: TSVDGroup(8, 8, 2, tsvd_alpha=0), ValueError, ['tsvd_alpha', '0']),
    (lambda: TSVDGroup(8, 8, 2, tsvd_rank=2.0), TypeError, ['tsvd_rank', '2.0']),
    (lambda: TSVDDense(8, 8, 'group', 0), TypeError, ['tsvd_group', 'str']),
    (lambda: TSVDDense(8, 4, TSVDGroup(8, 8, 2, tsvd_rank=2), 0), ValueError, ['out_channels=4']),
    (lambda: TSVDDense(8, 8, TSVDGroup(8, 8, 2, tsvd_rank=2), 2), ValueError, ['tsvd_index', '2']),
    (lambda: TSVDAllocator(nn.Dense(2, 2), 10), ValueError, ['no TSVDGroup']),
    (lambda: t_svd(np.zeros((2, 2))), ValueError, ['3-D']),
])
def test_bad_arguments(call, exc, fragments):
    with pytest.raises(exc) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
