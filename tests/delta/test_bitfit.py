"""BitFit through freeze_delta(model, 'bitfit'): only bias terms (plus what the user un-freezes) train."""
import pytest
from mindspore import nn, Tensor

from mindpet.graph import freeze_delta

from tests.delta_nets import LMLoss, MSELossNet, TinyCausalLM, TwoLayerNet, fixed_weight, lm_data, train_checked
from tests.nets import regression_data


def _plain_net():
    return TwoLayerNet(lambda i, o, seed: nn.Dense(i, o, weight_init=fixed_weight(o, i, seed)))


@pytest.mark.parametrize('exclude,expected', [
    (None, ['fc1.bias', 'fc2.bias', 'head.bias']),
    (['head.weight'], ['fc1.bias', 'fc2.bias', 'head.bias', 'head.weight']),  # a task head trained in full
])
def test_twenty_graph_steps_train_only_biases(graph_mode, exclude, expected):
    net = _plain_net()
    x, y = regression_data()
    train_checked(net, MSELossNet(net), 'bitfit', (Tensor(x), Tensor(y)), lr=0.05, exclude=exclude,
                  expect_trainable=expected)


def test_causal_lm_bitfit_with_layernorm_shifts(graph_mode):
    # MindSpore names LayerNorm's shift 'beta', not 'bias'; the BitFit paper also trains it: un-freeze it by name.
    lm = TinyCausalLM()
    ids, labels = lm_data()
    freeze_delta(lm, 'bitfit')
    assert not any(p.name.endswith('beta') for p in lm.trainable_params())
    _, before, after = train_checked(lm, LMLoss(lm), 'bitfit', (ids, labels), lr=0.02, exclude=['*beta'])
    trained = sorted(n for n in before if not (before[n] == after[n]).all())
    assert trained and all(n.endswith(('bias', 'beta')) for n in trained), trained
    assert any(n.endswith('beta') for n in trained) and any(n.endswith('bias') for n in trained)


def test_bitfit_mode_is_case_insensitive_and_needs_biases():
    net = _plain_net()
    freeze_delta(net, 'BitFit')
    assert sorted(p.name for p in net.trainable_params()) == ['fc1.bias', 'fc2.bias', 'head.bias']
    no_bias = nn.Dense(4, 2, has_bias=False)
    with pytest.raises(ValueError, match="'bitfit'.*bias"):
        freeze_delta(no_bias, 'bitfit')
