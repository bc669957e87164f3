"""Every MindSpore initializer form for LoRA's A and B (name, Initializer, number, concrete Tensor of another dtype,
lazily initialised Tensor, numpy array); numpy integers accepted and bools refused for every integer
hyper-parameter end to end; ranks above a layer's size and sizes beyond the machine's memory refused before
anything is allocated, naming the argument (and the layer), leaving the model as it was."""
import json
import os
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn
from mindspore import dtype as mstype
from mindspore.common.initializer import One, Constant

from mindpet import LoraConfig, PetModel, get_pet_model
from mindpet.tuners.adalora import AdaLoraConfig
from mindpet.tuners.adapter import AdapterConfig
from mindpet.tuners.low_rank_adapter import LowRankAdapterConfig
from mindpet.tuners.pst import PstConfig
from mindpet.tuners.tsvd import TensorSVDConfig
from mindpet.delta import AdapterDense, DoRADense, IA3Dense, LoRADense, LowRankAdapterDense
from tests.nets import PlainMLP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IN, OUT, RANK = 4, 3, 2
X = np.random.RandomState(0).randn(5, IN).astype(np.float32)
W = np.random.RandomState(1).randn(OUT, IN).astype(np.float32)

FORMS = {
    'name': 'ones',
    'initializer': One(),
    'number': 1,
    'tensor-int8': lambda shape: Tensor(np.ones(shape, np.int8)),
    'tensor-lazy-int8': lambda shape: Tensor(shape=shape, dtype=mstype.int8, init=One()),
    'numpy-float64': lambda shape: np.ones(shape, np.float64),
}


@pytest.mark.parametrize('form', sorted(FORMS))
def test_every_initializer_form_gives_the_same_layer_in_a_compiled_graph(graph_mode, form):
    make = FORMS[form]
    shaped = isinstance(make, type(lambda: None))       # a form that needs the shape (a Tensor or an array)
    a_init = make((RANK, IN)) if shaped else make
    b_init = make((OUT, RANK)) if shaped else make
    layer = LoRADense(IN, OUT, lora_rank=RANK, lora_alpha=4, lora_a_init=a_init, lora_b_init=b_init,
                      weight_init=Tensor(W), has_bias=False, compute_dtype=ms.float32)
    for param in (layer.mindpet_delta_lora_a, layer.mindpet_delta_lora_b):
        assert param.dtype == ms.float32
        np.testing.assert_array_equal(param.asnumpy(), np.ones(param.shape, np.float32))
    expected = X @ W.T + (4 / RANK) * X @ np.ones((RANK, IN)).T @ np.ones((OUT, RANK)).T
    np.testing.assert_allclose(layer(Tensor(X)).asnumpy(), expected, rtol=1e-5, atol=1e-5)


def test_the_issues_lazy_tensor_does_not_crash_the_process():
    """Tensor(shape=(2, 1), dtype=int8, init=One()) as B (out 2, rank 1) and as A of a wide enough layer, in a child
    process: before, casting the lazy tensor ended the process with a segmentation fault."""
    child = (
        "import numpy as np\n"
        "from mindspore import Tensor, dtype as mstype\n"
        "from mindspore.common.initializer import One\n"
        "from mindpet.delta import LoRADense\n"
        "lazy = Tensor(shape=(2, 1), dtype=mstype.int8, init=One())\n"
        "b = LoRADense(4, 2, lora_rank=1, lora_alpha=1, lora_b_init=lazy).mindpet_delta_lora_b.asnumpy()\n"
        "a = LoRADense(1, 3, lora_rank=1, lora_alpha=1,\n"
        "              lora_a_init=Tensor(shape=(1, 1), dtype=mstype.int8, init=One())).mindpet_delta_lora_a\n"
        "print(b.ravel().tolist(), a.asnumpy().ravel().tolist(), str(a.dtype))\n")
    env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v='3')
    done = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split('\n')[-2] == '[1.0, 1.0] [1.0] Float32'


def test_numpy_integers_work_end_to_end(tmp_path, graph_mode):
    """lora_rank=np.int64(4) through get_pet_model, a training step, save_pretrained and from_pretrained."""
    config = LoraConfig(target_modules=['fc1'], lora_rank=np.int64(4), lora_alpha=np.int32(8),
                        lora_dropout=np.float64(0.0))
    assert type(config.lora_rank) is int and type(config.lora_alpha) is int and type(config.lora_dropout) is float
    pet = get_pet_model(PlainMLP(), config)
    assert pet.base_model.fc1.mindpet_delta_lora_a.shape == (4, 8)
    x, y = Tensor(np.ones((4, 8), np.float32)), Tensor(np.zeros((4, 4), np.float32))
    step = nn.TrainOneStepCell(nn.WithLossCell(pet, nn.MSELoss()), nn.Adam(pet.trainable_params(), 0.1))
    step(x, y)
    trained = pet.base_model.fc1.mindpet_delta_lora_b.asnumpy()
    assert np.abs(trained).sum() > 0
    pet.save_pretrained(str(tmp_path / 'adapter'))
    loaded = PetModel.from_pretrained(PlainMLP(), str(tmp_path / 'adapter'))
    assert loaded.get_adapter_config().lora_rank == 4
    np.testing.assert_array_equal(loaded.base_model.fc1.mindpet_delta_lora_b.asnumpy(), trained)
    layer = LoRADense(np.int64(IN), np.int32(OUT), lora_rank=np.int16(RANK), lora_alpha=np.int64(4),
                      compute_dtype=ms.float32)
    assert (type(layer.in_channels), type(layer.lora_rank)) == (int, int)
    assert layer(Tensor(X)).shape == (5, OUT)


Row = namedtuple('Row', ['id', 'call', 'exc', 'fragments'])
BIG = 10 ** 7
ROWS = [
    Row('config-rank-bool', lambda p: LoraConfig(target_modules=['fc1'], lora_rank=True), TypeError,
        ["'lora_rank'", 'True (bool)']),
    Row('config-rank-numpy-bool', lambda p: LoraConfig(target_modules=['fc1'], lora_rank=np.bool_(True)), TypeError,
        ["'lora_rank'", '(bool_)']),
    Row('cell-rank-bool', lambda p: LoRADense(IN, OUT, lora_rank=True, lora_alpha=1), TypeError, ["'lora_rank'"]),
    Row('cell-in-bool', lambda p: LoRADense(True, OUT, lora_rank=1, lora_alpha=1), TypeError, ["'in_channels'"]),
    Row('cell-init-none', lambda p: LoRADense(IN, OUT, lora_rank=1, lora_alpha=1, lora_a_init=None), TypeError,
        ["'lora_a_init'", 'None']),
    Row('cell-rank-above-size', lambda p: LoRADense(IN, OUT, lora_rank=4, lora_alpha=1), ValueError,
        ["'lora_rank'", 'min(in_channels, out_channels) = 3', 'but got 4']),
    Row('cell-rank-1e9', lambda p: LoRADense(IN, OUT, lora_rank=10 ** 9, lora_alpha=1), ValueError,
        ["'lora_rank'", 'but got 1000000000']),
    Row('cell-size-beyond-memory', lambda p: LoRADense(BIG, BIG, lora_rank=1, lora_alpha=1), ValueError,
        ["'in_channels' and 'out_channels'", f'({BIG}, {BIG})', 'more than the', 'available here']),
    Row('inject-rank-above-layer', lambda p: get_pet_model(p, LoraConfig(target_modules=['fc1'], lora_rank=9)),
        ValueError, ["layer 'fc1'", "'lora_rank'", 'min(in_channels, out_channels) = 8']),
    Row('inject-rank-1e9', lambda p: get_pet_model(p, LoraConfig(target_modules=['fc2'], lora_rank=10 ** 9)),
        ValueError, ["layer 'fc2'", 'but got 1000000000']),
    Row('add-adapter-rank-above-layer', lambda p: get_pet_model(p, LoraConfig(target_modules=['fc1'], lora_rank=2))
        .add_adapter('big', LoraConfig(target_modules=['fc1'], lora_rank=9)),
        ValueError, ["layer 'fc1'", 'but got 9']),
    # Every method with a rank: fc2 (16 -> 16) holds it, head (16 -> 4) does not. fc2 comes first in the model, so
    # an injection that replaced layers as it went would leave fc2 adapted; the model must be left as it was.
    Row('inject-dora-rank', lambda p: get_pet_model(p, LoraConfig(target_modules=['fc2', 'head'], use_dora=True,
                                                                  lora_rank=8)),
        ValueError, ["layer 'head'", "'DoRADense'", "'lora_rank'", 'min(in_channels, out_channels) = 4', 'but got 8']),
    Row('inject-adalora-init-r', lambda p: get_pet_model(p, AdaLoraConfig(target_modules=['fc2', 'head'], init_r=8,
                                                                          target_r=2)),
        ValueError, ["layer 'head'", "'adalora_rank'", "the config's 'init_r'", '= 4', 'but got 8']),
    Row('inject-pst-r-m', lambda p: get_pet_model(p, PstConfig(target_modules=['fc2', 'head'], r_w=2, r_m=8)),
        ValueError, ["layer 'head'", "'pst_rank_m'", "the config's 'r_m'", '= 4', 'but got 8']),
    Row('inject-tsvd-rank', lambda p: get_pet_model(p, TensorSVDConfig(target_modules=['fc2', 'head'], tsvd_rank=8,
                                                                       target_rank=2)),
        ValueError, ["layer 'head'", "'TSVDGroup'", "'tsvd_rank'", '= 4', 'but got 8']),
    Row('inject-low-rank-adapter', lambda p: get_pet_model(p, LowRankAdapterConfig(target_modules=['fc2', 'head'],
                                                                                   reduction_factor=2,
                                                                                   low_rank_size=3)),
        ValueError, ["layer 'head'", "'low_rank_size'", 'the bottleneck out_channels // reduction_factor = 2',
                     'but got 3']),
    # A second adapter on an adapted layer widens its live tensors: the same bounds apply before that.
    Row('add-adapter-low-rank-size', lambda p: get_pet_model(p, LowRankAdapterConfig(target_modules=['head'],
                                                                                     reduction_factor=2))
        .add_adapter('big', LowRankAdapterConfig(target_modules=['head'], reduction_factor=2, low_rank_size=3)),
        ValueError, ["layer 'head'", "'low_rank_size'", 'out_channels // reduction_factor = 2', 'but got 3']),
    Row('add-adapter-bottleneck-beyond-memory', lambda p: get_pet_model(p, AdapterConfig(target_modules=['head'],
                                                                                         bottleneck_size=2))
        .add_adapter('big', AdapterConfig(target_modules=['head'], bottleneck_size=10 ** 12)),
        ValueError, ["layer 'head'", "'bottleneck_size'", f'({10 ** 12}, 4)', 'more than the']),
]

#: the config field each injection row's error must carry (the runner reports it as the YAML key pet.<field>)
FIELDS = {'inject-rank-above-layer': 'lora_rank', 'inject-dora-rank': 'lora_rank', 'inject-adalora-init-r': 'init_r',
          'inject-pst-r-m': 'r_m', 'inject-tsvd-rank': 'tsvd_rank', 'inject-low-rank-adapter': 'low_rank_size'}


@pytest.mark.parametrize('row', ROWS, ids=[row.id for row in ROWS])
def test_refused_before_allocating_and_nothing_changed(row):
    base = PlainMLP()
    before = [(name, type(cell).__name__) for name, cell in base.cells_and_names()]
    weights = {p.name: p.asnumpy().copy() for p in base.get_parameters()}
    with pytest.raises(row.exc) as info:
        row.call(base)
    assert all(fragment in str(info.value) for fragment in row.fragments), str(info.value)
    if row.id in FIELDS:
        assert info.value.field == FIELDS[row.id]
    if not row.id.startswith('add-adapter'):       # there the first adapter was injected before the refusal
        assert [(name, type(cell).__name__) for name, cell in base.cells_and_names()] == before
    for param in base.get_parameters():
        if param.name in weights:
            np.testing.assert_array_equal(param.asnumpy(), weights[param.name])


NUMPY_CELLS = {
    'AdapterDense': lambda n: AdapterDense(
        n(8), n(6), bottleneck_size=n(4), weight_init=Tensor(np.ones((6, 8), np.float32)), compute_dtype=ms.float32),
    'LowRankAdapterDense': lambda n: LowRankAdapterDense(
        n(8), n(6), reduction_factor=n(2), low_rank_size=n(1), weight_init=Tensor(np.ones((6, 8), np.float32)),
        compute_dtype=ms.float32),
    'DoRADense': lambda n: DoRADense(
        n(8), n(6), lora_rank=n(2), lora_alpha=n(4), weight_init=Tensor(np.ones((6, 8), np.float32)),
        compute_dtype=ms.float32),
    'IA3Dense': lambda n: IA3Dense(
        n(8), n(6), weight_init=Tensor(np.ones((6, 8), np.float32)), compute_dtype=ms.float32),
}


@pytest.mark.parametrize('name', sorted(NUMPY_CELLS))
def test_delta_cells_take_numpy_integers(name):
    """The same Cell built from numpy integers and from ints: same parameter shapes, same outputs."""
    ms.set_seed(0)
    plain = NUMPY_CELLS[name](int)
    ms.set_seed(0)
    numpy_built = NUMPY_CELLS[name](np.int64)
    shapes = [(p.name, p.shape) for p in plain.get_parameters()]
    assert [(p.name, p.shape) for p in numpy_built.get_parameters()] == shapes
    for mine, theirs in zip(numpy_built.get_parameters(), plain.get_parameters()):
        mine.set_data(theirs.data.copy())
    x = Tensor(np.random.RandomState(2).randn(3, 8).astype(np.float32))
    np.testing.assert_array_equal(numpy_built(x).asnumpy(), plain(x).asnumpy())


class KindsNet(nn.Cell):
    """One layer of each kind the rank bound sees differently: a mint Linear (8 -> 4) and a Conv2d whose canonical
    view is (out 3, in 2*2*2 = 8)."""

    def __init__(self):
        super().__init__()
        self.linear = ms.mint.nn.Linear(8, 4)
        self.conv = nn.Conv2d(2, 3, 2, has_bias=True)

    def construct(self, x, image):
        return self.linear(x), self.conv(image)


@pytest.mark.parametrize('target, use_dora, rank, limit', [('linear', True, 5, 4), ('conv', False, 4, 3),
                                                           ('linear', False, 5, 4)])
def test_layer_kinds_refuse_ranks_above_their_view(target, use_dora, rank, limit):
    net = KindsNet()
    weights = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    before = [(name, type(cell).__name__) for name, cell in net.cells_and_names()]
    with pytest.raises(ValueError) as info:
        get_pet_model(net, LoraConfig(target_modules=['conv', 'linear'], use_dora=use_dora, lora_rank=rank,
                                      rank_pattern={'conv' if target == 'linear' else 'linear': 1}))
    message = str(info.value)
    assert f"layer '{target}'" in message and "'lora_rank'" in message, message
    assert f'min(in_channels, out_channels) = {limit}, but got {rank}' in message, message
    assert [(name, type(cell).__name__) for name, cell in net.cells_and_names()] == before
    for param in net.get_parameters():
        np.testing.assert_array_equal(param.asnumpy(), weights[param.name])
