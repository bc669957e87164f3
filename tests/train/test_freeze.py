"""freeze_modules / freeze_delta / freeze_from_config."""
import numpy as np
import pytest

from mindpet.graph import freeze_modules, freeze_delta, freeze_from_config
from mindpet.utils.exceptions import ModelConfigFreezeInfoError, ReadYamlFileError, MindPetError

from tests.nets import LoRAMLP, PlainMLP


def _trainable(net):
    return sorted(p.name for p in net.trainable_params())


LORA_NAMES = ['fc1.mindpet_delta_lora_a', 'fc1.mindpet_delta_lora_b', 'fc2.mindpet_delta_lora_a',
              'fc2.mindpet_delta_lora_b']


@pytest.mark.parametrize('mode', ['lora', 'LoRA', 'LORA'])
def test_freeze_delta_lora_any_case(mode):
    net = LoRAMLP()
    freeze_delta(net, mode)
    assert _trainable(net) == LORA_NAMES


def test_freeze_delta_reenables_frozen_delta_params_and_never_trains_state():
    net = LoRAMLP()
    freeze_modules(net, include=['*'])
    assert _trainable(net) == []
    freeze_delta(net, 'lora', exclude=['head.*'])
    assert _trainable(net) == LORA_NAMES + ['head.bias', 'head.weight']
    freeze_modules(net, exclude=['*'])
    assert 'fc1.mindpet_state_lora_scaling' not in _trainable(net)
    assert len(_trainable(net)) == len(list(net.get_parameters())) - 2


def test_freeze_delta_bitfit_trains_only_biases():
    net = PlainMLP()
    freeze_delta(net, 'bitfit')
    assert _trainable(net) == ['fc1.bias', 'fc2.bias', 'head.bias']


def test_freeze_modules_include_exclude_conflict_left_unchanged():
    net = PlainMLP()
    freeze_modules(net, include=['fc1.*', 'head.weight'], exclude=['fc1.bias', 'head.weight'])
    # fc1.weight: include only -> frozen; fc1.bias: both -> unchanged (trainable); head.weight: both -> unchanged.
    assert _trainable(net) == ['fc1.bias', 'fc2.bias', 'fc2.weight', 'head.bias', 'head.weight']


def test_freeze_delta_include_then_exclude():
    net = LoRAMLP()
    freeze_delta(net, 'lora', include=['fc2.*'])
    assert _trainable(net) == LORA_NAMES[:2]


@pytest.mark.parametrize('call,exc,fragment', [
    (lambda n: freeze_delta(n, 'loraa'), ValueError, "'loraa'"),
    (lambda n: freeze_delta(n, 3), TypeError, 'mode'),
    (lambda n: freeze_delta(n, 'adapter'), ValueError, 'mindpet_delta_adapter_'),
    (lambda n: freeze_delta('net', 'lora'), TypeError, 'model'),
    (lambda n: freeze_delta(n, 'lora', exclude=['*heads*']), ValueError, "'*heads*'"),
    (lambda n: freeze_delta(n, 'lora', include='fc1.*'), TypeError, 'include'),
    (lambda n: freeze_modules(n), ValueError, 'include'),
    (lambda n: freeze_modules(n, include=[]), ValueError, 'include'),
    (lambda n: freeze_modules(n, include=['fc1.*', 3]), TypeError, 'include'),
    (lambda n: freeze_modules(n, exclude=['nothing.here']), ValueError, "'nothing.here'"),
    (lambda n: freeze_modules(None, include=['*']), TypeError, 'model'),
    (lambda n: freeze_from_config(n, 5), TypeError, 'config_path'),
])
def test_bad_input(call, exc, fragment):
    net = LoRAMLP()
    before = _trainable(net)
    with pytest.raises(exc) as info:
        call(net)
    assert fragment in str(info.value)
    assert _trainable(net) == before  # nothing half-applied


def test_freeze_from_config(tmp_path):
    path = tmp_path / 'freeze.yaml'
    path.write_text("freeze:\n  include: ['*']\n  exclude: ['*mindpet_delta_lora*', 'head.bias']\n")
    net = LoRAMLP()
    freeze_from_config(net, str(path))
    assert _trainable(net) == LORA_NAMES + ['head.bias']


@pytest.mark.parametrize('content,exc,fragment', [
    (None, ReadYamlFileError, 'does not exist'),
    ("freeze: [unclosed\n", ReadYamlFileError, 'not valid YAML'),
    ("other: 1\n", ModelConfigFreezeInfoError, "no 'freeze'"),
    ("freeze: {include: ['*'], exclud: ['x']}\n", ModelConfigFreezeInfoError, 'exclud'),
    ("freeze: {include: '*'}\n", ModelConfigFreezeInfoError, 'freeze.include'),
    ("freeze: {}\n", ModelConfigFreezeInfoError, 'freeze'),
])
def test_freeze_from_config_errors(tmp_path, content, exc, fragment):
    path = tmp_path / 'freeze.yaml'
    if content is not None:
        path.write_text(content)
    with pytest.raises(exc) as info:
        freeze_from_config(LoRAMLP(), str(path))
    assert isinstance(info.value, MindPetError)
    assert fragment in str(info.value)
