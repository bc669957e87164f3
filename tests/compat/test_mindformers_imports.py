"""Every MindPet 1.0.4 path MindFormers imports resolves here and behaves as MindFormers uses it.

The paths (read from MindFormers' sources, releases r1.5 to r1.8 and dev) are listed in doc/compat.md:
``mindpet.utils.version_control.get_dropout``, ``mindpet.graph.freeze_utils.freeze_delta`` / ``freeze_modules``
(``mindpet.graph.freeze_delta`` in r1.5), ``mindpet.delta.lora.LoRADense``, ``mindpet.delta.ptuning2.PrefixEncoder``;
MindPet 1.0.4's own modules imported ``get_activation`` from ``version_control`` too.
"""
import enum
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Tensor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_version_control_imports_in_a_fresh_interpreter():
    # The exact check from issue 13, in a clean process (no test module has imported mindpet before).
    code = "import mindpet.utils.version_control as v; d = v.get_dropout(0.1); print(type(d).__name__, d.p)"
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ['Dropout', '0.1']


def test_get_dropout_drops_scales_and_is_shardable():
    from mindpet.utils.version_control import get_dropout
    layer = get_dropout(0.25)
    assert isinstance(layer, nn.Dropout)
    # MindFormers' prefix adapters call layer.dropout.shard(...): the primitive must be there, keeping 1 - p.
    assert isinstance(layer.dropout, ops.Primitive) and layer.dropout.keep_prob == pytest.approx(0.75)
    x = Tensor(np.ones((200, 100), np.float32))
    layer.set_train(True)
    y = layer(x).asnumpy()
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)  # inverted dropout scaling
    assert 0.70 < kept.mean() < 0.80  # 20,000 draws: the kept fraction is 0.75 +- 0.01
    layer.set_train(False)
    np.testing.assert_array_equal(layer(x).asnumpy(), x.asnumpy())
    zero = get_dropout(0)  # MindPet 1.0.4 accepted an int 0
    zero.set_train(True)
    np.testing.assert_array_equal(zero(x).asnumpy(), x.asnumpy())


@pytest.mark.parametrize('value, exc', [(1.0, ValueError), (-0.1, ValueError), (float('nan'), ValueError),
                                        ('0.1', TypeError), (True, TypeError), (None, TypeError)])
def test_get_dropout_bad_input(value, exc):
    from mindpet.utils.version_control import get_dropout
    with pytest.raises(exc, match=r"get_dropout.*'dropout_prob'"):
        get_dropout(value)


def test_get_activation_matches_formulas_and_mindpet_errors():
    from mindpet.utils.version_control import get_activation, _activation
    x = np.linspace(-3, 3, 13, dtype=np.float32).reshape(1, 13)
    tx = Tensor(x)
    np.testing.assert_allclose(get_activation('relu')(tx).asnumpy(), np.maximum(x, 0))
    np.testing.assert_allclose(get_activation('sigmoid')(tx).asnumpy(), 1 / (1 + np.exp(-x)), rtol=1e-6)
    np.testing.assert_allclose(get_activation('tanh')(tx).asnumpy(), np.tanh(x), rtol=1e-6)
    gelu_tanh = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(get_activation('gelu')(tx).asnumpy(), gelu_tanh, atol=1e-5)
    np.testing.assert_allclose(get_activation('silu')(tx).asnumpy(), x / (1 + np.exp(-x)), rtol=1e-5)
    assert get_activation('relu') is not get_activation('relu')  # a new Cell each call
    assert get_activation(None) is None
    assert {'relu', 'gelu', 'fast_gelu', 'silu', 'sigmoid', 'tanh', 'leakyrelu'} <= set(_activation)
    with pytest.raises(KeyError, match="For 'MyLayer', the 'name' must be in .*got swish"):
        get_activation('swish', prim_name='MyLayer')


class PetType(str, enum.Enum):
    """MindFormers passes its own str enum as freeze_delta's mode (mindformers/pet/constants.py)."""
    LORA = "lora"


class _TwoLayers(nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense1 = nn.Dense(6, 8)
        self.act = nn.ReLU()
        self.dense2 = nn.Dense(8, 3, has_bias=False)

    def construct(self, x):
        return self.dense2(self.act(self.dense1(x)))


def _replace_like_mindformers(net, rank=2, alpha=4):
    """MindFormers' ``recursive_replace_dense_cell`` (lora_adapter.py): a LoRADense built from the Dense's sizes,
    then the Dense's own matmul, weight and bias objects moved onto it."""
    from mindpet.delta.lora import LoRADense
    for name, cell in list(net._cells.items()):  # pylint: disable=protected-access
        if not isinstance(cell, nn.Dense):
            continue
        dest = LoRADense(in_channels=cell.in_channels, out_channels=cell.out_channels, lora_rank=rank,
                         lora_alpha=alpha, lora_dropout=0.0, param_init_type=cell.weight.dtype,
                         compute_dtype=cell.weight.dtype, has_bias=cell.has_bias, activation=cell.activation)
        dest.matmul = cell.matmul
        dest.weight = cell.weight
        if cell.has_bias:
            dest.bias = cell.bias
            dest.bias_add = cell.bias_add
        # MindFormers writes net._cells[name]; setattr does the same and also gives the new Parameters their
        # path names ('dense1.mindpet_delta_lora_a'), which MindFormers gets from its model wrapper.
        setattr(net, name, dest)
    return net


def test_mindformers_lora_recipe_trains_only_lora_in_graph_mode(graph_mode):
    from mindpet.graph.freeze_utils import freeze_delta, freeze_modules
    from mindpet.graph import freeze_delta as graph_freeze_delta  # MindFormers r1.5's path
    assert graph_freeze_delta is freeze_delta
    ms.set_seed(0)
    rng = np.random.RandomState(0)
    x = Tensor(rng.randn(16, 6).astype(np.float32))
    y = Tensor(rng.randn(16, 3).astype(np.float32))
    base = _TwoLayers()
    base_out = base(x).asnumpy()
    base_values = {n: p.asnumpy().copy() for n, p in base.parameters_and_names()}

    net = _replace_like_mindformers(base)
    np.testing.assert_allclose(net(x).asnumpy(), base_out, atol=1e-6)  # B = 0: the base model at init
    freeze_delta(net, PetType.LORA)
    trainable = sorted(p.name for p in net.trainable_params())
    assert trainable == ['dense1.mindpet_delta_lora_a', 'dense1.mindpet_delta_lora_b',
                         'dense2.mindpet_delta_lora_a', 'dense2.mindpet_delta_lora_b']
    # MindFormers' mcore path: freeze_modules(model, include, exclude) with fnmatch patterns.
    freeze_modules(net, include=['dense2.*'])
    assert not any(p.name.startswith('dense2.') for p in net.trainable_params())
    freeze_delta(net, PetType.LORA)

    loss_net = nn.WithLossCell(net, nn.MSELoss())
    step = nn.TrainOneStepCell(loss_net, nn.SGD(net.trainable_params(), learning_rate=0.1))
    step.set_train(True)
    losses = [float(step(x, y).asnumpy()) for _ in range(6)]
    assert losses[-1] < losses[0]
    for name, param in net.parameters_and_names():
        if 'mindpet_delta_lora' in name:
            continue
        if name.endswith('mindpet_state_lora_scaling'):
            continue
        np.testing.assert_array_equal(param.asnumpy(), base_values[name], err_msg=name)
    assert not np.allclose(net.dense1.mindpet_delta_lora_b.asnumpy(), 0)


def test_glm2_prefix_encoder_call():
    """GLM2 builds ``PrefixEncoder`` with seven positional arguments and calls it with the batch size."""
    from mindpet.delta.ptuning2 import PrefixEncoder
    pre_seq_len, num_layers, num_heads, kv_channels = 3, 2, 2, 4
    encoder = PrefixEncoder(pre_seq_len, num_layers, num_heads, kv_channels, False, 8, 0.0)
    outs = encoder(2)
    assert len(outs) == num_layers
    for out in outs:
        assert out.shape == (2, 2, num_heads, pre_seq_len, kv_channels)
