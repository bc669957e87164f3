"""Semi-auto-parallel strategies checked without a device: on one process, every operator a Cell's ``shard()`` gave a
strategy is run the way the devices would run it -- its inputs sliced by the strategy, the operator applied to each
device's slices, the pieces assembled (partial products of a split contraction summed, as the AllReduce MindSpore
inserts) -- and the Cell's output is compared with the unsharded Cell. Every strategy is also checked against the
rules of MindSpore's operator-level parallelism that decide whether the sharded result can equal the single-device
one:

- a strategy has one entry per input dimension, each split divides that dimension, and the product of the splits
  divides the device count (the rest is repeated calculation);
- element-wise operators (Add, Sub, Mul, BiasAdd, activations, Cast, Exp, ...): inputs split alike on every
  dimension they share after broadcasting; a broadcast (size-1 or missing) dimension is not split; BiasAdd's bias
  is split as the input's channel (last) dimension;
- MatMul / BatchMatMul: the contracted dimension is split alike in both inputs, batch dimensions alike;
- Softmax / LogSoftmax: the axis is not split (MindSpore's operator list: "The logits can't be split into the
  dimension of axis"); Split: the split axis is not split (its pieces would mix devices);
- Transpose: the output layout is the permuted input layout.

Operators this file does not know make the simulation fail, so a new operator in a ``shard()`` needs its rule here.
"""
import importlib.util
import itertools
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor
from mindspore.ops.primitive import Primitive

from mindpet.delta import (LoRADense, IA3Dense, AdapterDense, LowRankAdapterDense, PrefixLayer, PromptTuningEmbedding,
                           RDropLoss, rdrop_repeat)
from mindpet.delta.adalora import AdaLoRADense
from mindpet.delta.adapter import AdapterLayer
from mindpet.delta.dora import DoRADense
from mindpet.delta.low_rank_adapter import LowRankAdapterLayer
from mindpet.delta.prefix_layer import PrefixAttention
from mindpet.delta.pst import PSTDense
from mindpet.delta.ptuning2 import PrefixEncoder
from mindpet.delta.tsvd import TSVDGroup, TSVDDense

DP, MP = 2, 2
DEVICES = DP * MP
ELEMENTWISE = {'Add', 'Sub', 'Mul', 'RealDiv', 'Div', 'Maximum', 'Minimum', 'BiasAdd', 'ReLU', 'GeLU', 'FastGeLU',
               'Tanh', 'Sigmoid', 'Exp', 'Log', 'Cast', 'Softmax', 'LogSoftmax', 'Dropout', 'SiLU', 'Square', 'Sqrt'}


class StrategyError(AssertionError):
    """A strategy MindSpore would reject or that would not reproduce the single-device result."""


def _blocks(shape, splits):
    """Every block index of a tensor of ``shape`` split by ``splits`` and its slices."""
    sizes = [dim // split for dim, split in zip(shape, splits)]
    for index in itertools.product(*[range(split) for split in splits]):
        yield index, tuple(slice(i * size, (i + 1) * size) for i, size in zip(index, sizes))


class SimulatedOp:
    """Runs ``prim`` as the devices would under its ``in_strategy`` (PyNative; inputs are Tensors)."""

    def __init__(self, owner, attr, prim, calls, devices=DEVICES):
        self.owner, self.attr, self.prim, self.calls, self.devices = owner, attr, prim, calls, devices
        self.strategy = prim.in_strategy

    def fail(self, why):
        raise StrategyError(f"{self.owner}.{self.attr} ({self.prim.name}, strategy {self.strategy}): {why}")

    def __call__(self, *args):
        self.calls.append(f'{self.owner}.{self.attr}')
        tensors = [a for a in args if isinstance(a, Tensor)]
        strategy = [tuple(s) for s in self.strategy]
        if len(strategy) > len(args):
            self.fail(f"{len(strategy)} input strategies for {len(args)} inputs")
        for position, splits in enumerate(strategy):
            value = args[position]
            shape = tuple(value.shape) if isinstance(value, Tensor) else ()
            if self.prim.name == 'OneHot' and position == 0:     # the strategy of the output (indices + depth)
                shape = shape + (args[1],)
            if len(splits) != len(shape):
                self.fail(f"input {position} has shape {shape}, the strategy {splits} has {len(splits)} entries")
            for dim, split in zip(shape, splits):
                if split < 1 or dim % split:
                    self.fail(f"input {position} of shape {shape}: split {split} does not divide {dim}")
            if self.devices % int(np.prod(splits or (1,))):
                self.fail(f"the product of {splits} does not divide the {self.devices} devices")
        name = self.prim.name
        if name in ELEMENTWISE:
            return self._elementwise(args, strategy)
        if name in ('MatMul', 'BatchMatMul'):
            return self._matmul(tensors, strategy)
        if name == 'Transpose':
            return self._transpose(args, strategy)
        if name == 'Split':
            return self._split(args, strategy)
        if name == 'Tile':
            return self._tile(args, strategy)
        if name == 'OneHot':
            return self._one_hot(args, strategy)
        return self.fail("no simulation rule for this operator (add one to tests/delta/test_shard_simulation.py)")

    # ----- element-wise, with broadcasting ---------------------------------------------------------------------
    def _elementwise(self, args, strategy):
        name = self.prim.name
        shapes = [tuple(args[i].shape) if isinstance(args[i], Tensor) else () for i in range(len(strategy))]
        rank = max(len(s) for s in shapes)
        out_splits = [1] * rank
        if name == 'BiasAdd':   # the bias runs along the channel (last, for 2-D inputs) dimension
            aligned = [(tuple(strategy[0]), shapes[0]), ((1,) * (rank - 1) + tuple(strategy[1]),
                                                         (1,) * (rank - 1) + shapes[1])]
        else:
            aligned = [((1,) * (rank - len(sh)) + tuple(st), (1,) * (rank - len(sh)) + sh)
                       for st, sh in zip(strategy, shapes)]
        for dim in range(rank):
            splits = {st[dim] for st, sh in aligned if sh[dim] != 1}
            if any(sh[dim] == 1 and st[dim] != 1 for st, sh in aligned):
                self.fail(f"a broadcast dimension (size 1) is split along dimension {dim}")
            if len(splits) > 1:
                self.fail(f"the inputs are split differently along dimension {dim}: {sorted(splits)}")
            out_splits[dim] = splits.pop() if splits else 1
        if name in ('Softmax', 'LogSoftmax'):
            axes = self.prim.axis if isinstance(self.prim.axis, (tuple, list)) else (self.prim.axis,)
            for axis in axes:
                if out_splits[axis] != 1:
                    self.fail(f"the softmax axis {axis} is split {out_splits[axis]}: each device would normalise "
                              f"over a part of it")
        full = self.prim(*args)
        first = full[0] if isinstance(full, tuple) else full
        out = np.zeros(first.shape, first.asnumpy().dtype)
        for index, slices in _blocks(first.shape, out_splits):
            pieces = []
            for position, arg in enumerate(args):
                if position >= len(aligned) or not isinstance(arg, Tensor):
                    pieces.append(arg)
                    continue
                splits, shape = aligned[position]
                own = [slice(None) if shape[d] == 1 else slices[d] for d in range(rank)][rank - len(arg.shape):]
                pieces.append(Tensor(arg.asnumpy()[tuple(own)]))
            piece = self.prim(*pieces)
            out[slices] = (piece[0] if isinstance(piece, tuple) else piece).asnumpy()
        return Tensor(out)

    # ----- matrix products: the contracted dimension's pieces are summed (AllReduce) --------------------------
    def _matmul(self, tensors, strategy):
        a, b = tensors
        sa, sb = list(strategy[0]), list(strategy[1])
        ta, tb = bool(self.prim.transpose_a), bool(self.prim.transpose_b)
        if self.prim.name == 'BatchMatMul' and ta:
            self.fail("transpose_a=True is not supported by the sharded BatchMatMul")
        k_a, k_b = (-2 if ta else -1), (-1 if tb else -2)
        if sa[k_a] != sb[k_b]:
            self.fail(f"the contracted dimension is split {sa[k_a]} in the first input and {sb[k_b]} in the second")
        batch = len(a.shape) - 2
        if sa[:batch] != sb[:batch]:
            self.fail(f"the batch dimensions are split differently: {sa[:batch]} and {sb[:batch]}")
        full = self.prim(a, b).asnumpy()
        m_split, n_split, k_split = sa[-1 if ta else -2], sb[-2 if tb else -1], sa[k_a]
        out = np.zeros_like(full)
        out_splits = sa[:batch] + [m_split, n_split]
        a_np, b_np = a.asnumpy(), b.asnumpy()
        k_size = a.shape[k_a] // k_split
        for index, slices in _blocks(full.shape, out_splits):
            for k in range(k_split):
                k_slice = slice(k * k_size, (k + 1) * k_size)
                a_idx = list(slices[:batch]) + ([k_slice, slices[-2]] if ta else [slices[-2], k_slice])
                b_idx = list(slices[:batch]) + ([slices[-1], k_slice] if tb else [k_slice, slices[-1]])
                out[slices] += self.prim(Tensor(a_np[tuple(a_idx)]), Tensor(b_np[tuple(b_idx)])).asnumpy()
        return Tensor(out)

    # ----- layout operators ------------------------------------------------------------------------------------
    def _transpose(self, args, strategy):
        x, perm = args
        out_splits = [strategy[0][p] for p in perm]
        full = self.prim(x, perm)
        out = np.zeros(full.shape, full.asnumpy().dtype)
        x_np = x.asnumpy()
        for index, slices in _blocks(x.shape, strategy[0]):
            out_slices = tuple(slices[p] for p in perm)
            out[out_slices] = self.prim(Tensor(x_np[slices]), perm).asnumpy()
        assert [full.shape[d] // s for d, s in enumerate(out_splits)]
        return Tensor(out)

    def _split(self, args, strategy):
        axis = self.prim.axis
        if strategy[0][axis] != 1:
            self.fail(f"the split axis {axis} is itself split {strategy[0][axis]}")
        x = args[0]
        full = self.prim(x)
        outs = [np.zeros(t.shape, t.asnumpy().dtype) for t in full]
        for index, slices in _blocks(x.shape, strategy[0]):
            for out, piece in zip(outs, self.prim(Tensor(x.asnumpy()[slices]))):
                piece_slices = tuple(slice(0, None) if d == axis else s for d, s in enumerate(slices))
                out[piece_slices] = piece.asnumpy()
        return tuple(Tensor(o) for o in outs)

    def _one_hot(self, args, strategy):
        indices, depth, on_value, off_value = args
        if strategy[0][-1] != 1:
            self.fail("the depth (class) dimension is split: this simulation requires it whole")
        full = self.prim(indices, depth, on_value, off_value)
        out = np.zeros(full.shape, full.asnumpy().dtype)
        for index, slices in _blocks(indices.shape, strategy[0][:-1]):
            out[slices] = self.prim(Tensor(indices.asnumpy()[slices]), depth, on_value, off_value).asnumpy()
        return Tensor(out)

    def _tile(self, args, strategy):
        x, multiples = args
        for dim, (split, multiple) in enumerate(zip(strategy[0], multiples)):
            if split != 1 and multiple != 1:
                self.fail(f"dimension {dim} is both split ({split}) and tiled ({multiple})")
        out_splits = list(strategy[0])
        full = self.prim(x, multiples)
        out = np.zeros(full.shape, full.asnumpy().dtype)
        for index, slices in _blocks(full.shape, out_splits):
            src = tuple(s if m == 1 else slice(None) for s, m in zip(slices, multiples))
            local = tuple(1 if m == 1 else m for m in multiples)
            out[slices] = self.prim(Tensor(x.asnumpy()[src]), local).asnumpy()
        return Tensor(out)


def sharded_primitives(cell):
    """``(owner path, attribute, Primitive)`` of every primitive with a strategy inside ``cell``."""
    found = []
    for path, sub in cell.cells_and_names():
        for attr, prim in getattr(sub, '_primitives', {}).items():
            if isinstance(prim, Primitive) and getattr(prim, 'in_strategy', None) is not None:
                found.append((path or type(cell).__name__, sub, attr, prim))
    return found


def simulate(cell, monkeypatch, devices=DEVICES):
    """Replace every sharded primitive of ``cell`` by its simulation on ``devices`` devices; returns the list the
    calls are recorded in and the names of the sharded primitives."""
    calls = []
    found = sharded_primitives(cell)
    assert found, 'shard() set no strategy'
    for path, sub, attr, prim in found:
        monkeypatch.setitem(sub.__dict__, attr, SimulatedOp(path, attr, prim, calls, devices))
    return calls, {f'{path}.{attr}' for path, _, attr, _ in found}


def _dense_kwargs(out_dim, in_dim, seed):
    rng = np.random.RandomState(seed)
    return dict(weight_init=Tensor(rng.randn(out_dim, in_dim).astype(np.float32) * 0.3),
                bias_init=Tensor(rng.randn(out_dim).astype(np.float32) * 0.1))


def _randomise(cell, seed):
    """Non-zero values in every delta parameter (at init many are 0 and would hide a wrong assembly)."""
    rng = np.random.RandomState(seed)
    for param in cell.get_parameters():
        if 'mindpet_delta_' in param.name and param.requires_grad is not None:
            value = param.asnumpy()
            param.set_data(Tensor((value + rng.randn(*value.shape) * 0.3).astype(value.dtype)))


# Row-parallel = the contracted (input) dimension split over mp: partial products summed across devices.
COLUMN = dict(strategy_org_dense_matmul=((DP, 1), (MP, 1)), strategy_org_bias_add=((DP, MP), (MP,)),
              strategy_activation=((DP, MP),))
ROW = dict(strategy_org_dense_matmul=((DP, MP), (1, MP)), strategy_org_bias_add=((DP, 1), (1,)))


def _lora(strategies):
    layer = LoRADense(8, 8, lora_rank=4, lora_alpha=8, compute_dtype=ms.float32, activation='relu',
                      **_dense_kwargs(8, 8, 0))
    if strategies == 'column':
        layer.shard(**COLUMN, strategy_lora_a_matmul=((DP, 1), (1, 1)), strategy_lora_b_matmul=((DP, 1), (MP, 1)),
                    strategy_lora_mul=((DP, 1), ()), strategy_lora_add=((DP, MP), (DP, MP)))
    else:
        layer.shard(**dict(ROW, strategy_activation=((DP, 1),)), strategy_lora_a_matmul=((DP, MP), (1, MP)),
                    strategy_lora_b_matmul=((DP, 1), (1, 1)), strategy_lora_mul=((DP, 1), ()),
                    strategy_lora_add=((DP, 1), (DP, 1)))
    return layer, (Tensor(np.random.RandomState(1).randn(4, 3, 8).astype(np.float32)),)


def _dora(strategies):
    layer = DoRADense(8, 8, lora_rank=4, lora_alpha=8, compute_dtype=ms.float32, **_dense_kwargs(8, 8, 0))
    layer.init_magnitude()
    layer.shard(strategy_org_dense_matmul=((DP, 1), (MP, 1)), strategy_org_bias_add=((DP, MP), (MP,)),
                strategy_lora_a_matmul=((DP, 1), (1, 1)), strategy_lora_b_matmul=((DP, 1), (MP, 1)),
                strategy_lora_mul=((DP, 1), ()), strategy_lora_add=((DP, MP), (DP, MP)),
                strategy_dora_scale_mul=((DP, MP), (MP,)))
    return layer, (Tensor(np.random.RandomState(1).randn(8, 8).astype(np.float32)),)


def _adalora(strategies):
    layer = AdaLoRADense(8, 8, adalora_rank=4, adalora_alpha=8, compute_dtype=ms.float32, **_dense_kwargs(8, 8, 0))
    layer.shard(strategy_org_dense_matmul=((DP, 1), (MP, 1)), strategy_org_bias_add=((DP, MP), (MP,)),
                strategy_adalora_q_matmul=((DP, 1), (1, 1)), strategy_adalora_lambda_mul=((DP, 1), (1,)),
                strategy_adalora_p_matmul=((DP, 1), (MP, 1)), strategy_adalora_add=((DP, MP), (DP, MP)))
    return layer, (Tensor(np.random.RandomState(1).randn(8, 8).astype(np.float32)),)


def _ia3(strategies):
    layer = IA3Dense(8, 8, compute_dtype=ms.float32, **_dense_kwargs(8, 8, 0))
    layer.shard(strategy_org_dense_matmul=((DP, 1), (MP, 1)), strategy_org_bias_add=((DP, MP), (MP,)),
                strategy_ia3_mul=((DP, MP), (MP,)))
    return layer, (Tensor(np.random.RandomState(1).randn(8, 8).astype(np.float32)),)


def _ia3_feedforward(strategies):
    layer = IA3Dense(8, 8, ia3_feedforward=True, compute_dtype=ms.float32, **_dense_kwargs(8, 8, 0))
    layer.shard(**ROW, strategy_ia3_mul=((DP, MP), (MP,)))
    return layer, (Tensor(np.random.RandomState(1).randn(8, 8).astype(np.float32)),)


def _pst(strategies):
    layer = PSTDense(8, 8, pst_rank_w=2, pst_rank_m=2, compute_dtype=ms.float32, **_dense_kwargs(8, 8, 0))
    layer.shard(strategy_org_dense_matmul=((DP, 1), (MP, 1)), strategy_org_bias_add=((DP, MP), (MP,)))
    return layer, (Tensor(np.random.RandomState(1).randn(8, 8).astype(np.float32)),)


def _tsvd(strategies):
    group = TSVDGroup(8, 8, 2, tsvd_rank=2, tsvd_alpha=4)
    layer = TSVDDense(8, 8, group, 1, compute_dtype=ms.float32, **_dense_kwargs(8, 8, 0))
    TSVDDense(8, 8, group, 0, compute_dtype=ms.float32)
    layer.shard(strategy_org_dense_matmul=((DP, 1), (MP, 1)), strategy_org_bias_add=((DP, MP), (MP,)),
                strategy_tsvd_v_matmul=((DP, 1), (1, 1)), strategy_tsvd_us_matmul=((DP, 1), (MP, 1)),
                strategy_tsvd_add=((DP, MP), (DP, MP)))
    return layer, (Tensor(np.random.RandomState(1).randn(8, 8).astype(np.float32)),)


ADAPTER = dict(strategy_matmul_down_sampler=((DP, 1), (1, 1)), strategy_bias_down_sampler=((DP, 1), (1,)),
               strategy_non_linearity=((DP, 1),), strategy_matmul_up_sampler=((DP, 1), (MP, 1)),
               strategy_bias_up_sampler=((DP, MP), (MP,)), strategy_residual_add=((DP, MP), (DP, MP)))


def _adapter_layer(strategies):
    layer = AdapterLayer(8, bottleneck_size=4, compute_dtype=ms.float32)
    layer.shard(**ADAPTER)
    return layer, (Tensor(np.random.RandomState(1).randn(8, 8).astype(np.float32)),)


def _adapter_dense(strategies):
    layer = AdapterDense(8, 8, bottleneck_size=4, compute_dtype=ms.float32, **_dense_kwargs(8, 8, 0))
    layer.shard(strategy_matmul_org=((DP, 1), (MP, 1)), strategy_bias_org=((DP, MP), (MP,)), **ADAPTER)
    return layer, (Tensor(np.random.RandomState(1).randn(8, 8).astype(np.float32)),)


LOW_RANK = dict(strategy_matmul_down_sampler_weight=((1, 1), (1, 1)),
                strategy_matmul_down_sampler_input=((DP, 1), (1, 1)), strategy_bias_down_sampler=((DP, 1), (1,)),
                strategy_non_linearity=((DP, 1),), strategy_matmul_up_sampler_weight=((1, 1), (1, MP)),
                strategy_matmul_up_sampler_input=((DP, 1), (1, MP)), strategy_bias_up_sampler=((DP, MP), (MP,)),
                strategy_residual_add=((DP, MP), (DP, MP)))


def _low_rank_layer(strategies):
    layer = LowRankAdapterLayer(8, reduction_factor=2, low_rank_size=2, compute_dtype=ms.float32)
    layer.shard(**LOW_RANK)
    return layer, (Tensor(np.random.RandomState(1).randn(8, 8).astype(np.float32)),)


def _low_rank_dense(strategies):
    layer = LowRankAdapterDense(8, 8, reduction_factor=2, low_rank_size=2, compute_dtype=ms.float32,
                                **_dense_kwargs(8, 8, 0))
    layer.shard(strategy_matmul_org=((DP, 1), (MP, 1)), strategy_bias_org=((DP, MP), (MP,)), **LOW_RANK)
    return layer, (Tensor(np.random.RandomState(1).randn(8, 8).astype(np.float32)),)


class _PrefixCall(nn.Cell):
    def __init__(self, prefix, batch):
        super().__init__()
        self.prefix, self.batch = prefix, batch

    def construct(self):
        return self.prefix(self.batch)


def _prefix_layer(strategies):
    prefix = PrefixLayer(4, 2, 2, 8, embed_dim=6, mid_dim=8, dropout_rate=0.0)
    prefix.shard(model_parallel=MP)
    return _PrefixCall(prefix, 2), ()


def _prefix_attention(strategies):
    prefix = PrefixLayer(4, 2, 2, 8, embed_dim=6, mid_dim=8, dropout_rate=0.0)
    attn = PrefixAttention(8, 2, prefix=prefix)
    attn.shard(data_parallel=DP, model_parallel=MP)
    rng = np.random.RandomState(1)
    mask = Tensor(np.tril(np.ones((2, 4, 4), np.float32)))
    return attn, (Tensor(rng.randn(2, 4, 8).astype(np.float32)), mask)


class _EncoderCall(nn.Cell):
    def __init__(self, encoder, batch):
        super().__init__()
        self.encoder, self.batch = encoder, batch

    def construct(self):
        return self.encoder(self.batch, ms.float32)


def _ptuning2(strategies):
    encoder = PrefixEncoder(3, num_layers=2, num_heads=2, kv_channels=4, prefix_projection=True, projection_dim=6,
                            dropout_prob=0.0)
    encoder.shard(DP, MP)
    return _EncoderCall(encoder, 2), ()


class _RDrop(nn.Cell):
    def __init__(self):
        super().__init__()
        self.loss = RDropLoss()

    def construct(self, logits, labels):
        return self.loss(logits, labels, 4)


def _r_drop(strategies):
    cell = _RDrop()
    cell.loss.shard(data_parallel=DP)
    rng = np.random.RandomState(1)
    labels, = rdrop_repeat(rng.randint(0, 5, 4).astype(np.int32))
    return cell, (Tensor(rng.randn(8, 5).astype(np.float32)), Tensor(labels))


CASES = {
    'LoRADense column-parallel': (_lora, 'column'), 'LoRADense row-parallel': (_lora, 'row'),
    'DoRADense': (_dora, None), 'AdaLoRADense': (_adalora, None), 'IA3Dense': (_ia3, None),
    'IA3Dense feed-forward': (_ia3_feedforward, None), 'PSTDense': (_pst, None), 'TSVDDense': (_tsvd, None),
    'AdapterLayer': (_adapter_layer, None), 'AdapterDense': (_adapter_dense, None),
    'LowRankAdapterLayer': (_low_rank_layer, None), 'LowRankAdapterDense': (_low_rank_dense, None),
    'PrefixLayer': (_prefix_layer, None), 'PrefixAttention': (_prefix_attention, None),
    'PrefixEncoder (P-Tuning v2)': (_ptuning2, None), 'RDropLoss': (_r_drop, None),
}


def _numpy(out):
    return [o.asnumpy() for o in out] if isinstance(out, tuple) else [out.asnumpy()]


@pytest.fixture
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield


@pytest.mark.parametrize('case', list(CASES))
def test_each_shard_computes_what_the_unsharded_cell_computes(pynative, monkeypatch, case):
    build, strategies = CASES[case]
    cell, inputs = build(strategies)
    cell.set_train(False)
    _randomise(cell, 3)
    want = _numpy(cell(*inputs))
    calls, sharded = simulate(cell, monkeypatch)
    got = _numpy(cell(*inputs))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # Every operator with a strategy ran sharded, except dropout in inference (nn.Dropout skips its operator).
    missed = {name for name in sharded if name not in calls and 'dropout' not in name.rsplit('.', 1)[-1]}
    assert not missed, missed


def test_every_cell_with_a_shard_method_is_simulated():
    import mindpet.delta as delta_package
    import mindpet.delta.adalora, mindpet.delta.dora, mindpet.delta.pst, mindpet.delta.ptuning2  # noqa: E401,F401
    import mindpet.delta.tsvd, mindpet.delta.prefix_layer, mindpet.delta.adapter  # noqa: E401,F401
    import mindpet.delta.low_rank_adapter  # noqa: F401
    from mindpet.delta.prefix_layer import StaticPrefix
    seen = set()
    for module in [m for name, m in vars(mindpet.delta).items() if type(m).__name__ == 'module'] + [delta_package]:
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, nn.Cell) and 'shard' in vars(value) \
                    and value.__module__.startswith('mindpet.'):
                seen.add(value.__name__)
    covered = {name.split(' ')[0] for name in CASES} | {'PrefixEncoder'}
    # StaticPrefix.shard is a documented no-op (it computes nothing but a broadcast): nothing to simulate.
    assert StaticPrefix(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.float32), 2).shard(2) is not None
    assert not sharded_primitives(StaticPrefix(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.float32), 2))
    assert len(seen) >= 15 and seen - covered - {'StaticPrefix'} == set(), (seen, covered)


@pytest.mark.parametrize('strategies,fragment', [
    (dict(strategy_org_dense_matmul=((DP, MP), (MP, 1))), 'contracted dimension is split 2 in the first input and 1'),
    (dict(strategy_org_dense_matmul=((DP, 1), (MP, 1)), strategy_org_bias_add=((DP, MP), (1,))),
     'split differently'),
    (dict(strategy_lora_a_matmul=((DP, 1), (1, 1)), strategy_lora_b_matmul=((DP, 1), (3, 1))), 'does not divide'),
])
def test_inconsistent_strategies_are_caught(pynative, monkeypatch, strategies, fragment):
    layer = LoRADense(8, 8, lora_rank=4, lora_alpha=8, compute_dtype=ms.float32, **_dense_kwargs(8, 8, 0))
    layer.shard(**strategies)
    simulate(layer, monkeypatch)
    with pytest.raises(StrategyError, match=fragment):
        layer(Tensor(np.ones((4, 8), np.float32)))


def test_softmax_axis_split_is_caught(pynative, monkeypatch):
    loss = _RDrop()
    loss.loss.shard(data_parallel=DP)
    loss.loss.log_softmax.shard(((1, 2),))
    simulate(loss, monkeypatch)
    with pytest.raises(StrategyError, match='softmax axis'):
        loss(Tensor(np.ones((4, 4), np.float32)), Tensor(np.zeros(4, np.int32)))


def _semi_auto_example():
    path = os.path.join(os.path.dirname(__file__), '..', '..', 'examples', 'distributed', 'semi_auto_lora.py')
    spec = importlib.util.spec_from_file_location('semi_auto_lora', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('name', ['data_parallel', 'column_parallel', 'row_parallel'])
def test_the_semi_auto_example_strategy_sets_compute_the_unsharded_layer(pynative, monkeypatch, name):
    """The strategy sets examples/distributed/semi_auto_lora.py runs with msrun (2 devices), simulated here: what
    tests/train/test_distributed.py cannot check on a CPU, where MindSpore refuses SEMI_AUTO_PARALLEL."""
    semi = _semi_auto_example()
    x, _ = semi.inputs()
    layer = semi.build_layer()
    want = layer(Tensor(x)).asnumpy()
    layer = semi.build_layer().shard(**semi.strategies(2)[name])
    calls, sharded = simulate(layer, monkeypatch, devices=2)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), want, rtol=1e-5, atol=1e-5)
    assert {n for n in sharded if 'dropout' not in n} <= set(calls)
