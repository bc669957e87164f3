"""Hugging Face PEFT's adapter format (mindpet/peft_format.py) on plain networks: what the files hold, round trips
for LoRA, DoRA and IA3 in GRAPH_MODE, and refusals. The round trips with adapters written by mindone.peft itself
are in test_mindone_bert.py."""
import json
import os

import numpy as np
import pytest
from mindspore import Tensor
from safetensors.numpy import load_file, save_file

from mindpet import IA3Config, LoraConfig, PetModel, get_pet_model
from mindpet.utils.exceptions import AdapterConfigError, CheckpointError

from tests.nets import PlainMLP

X = Tensor(np.random.RandomState(3).randn(5, 8).astype(np.float32))


def _randomised(pet, seed=0, scale=0.5):
    rng = np.random.RandomState(seed)
    for param in pet.trainable_params():
        param.set_data(Tensor((1.0 + scale * rng.randn(*param.shape)).astype(np.float32)
                              if 'magnitude' in param.name or 'ia3' in param.name
                              else (scale * rng.randn(*param.shape)).astype(np.float32)))
    return pet


def _configs():
    return {
        'lora': LoraConfig(target_modules=['fc1', 'fc2'], lora_rank=2, lora_alpha=6),
        'dora': LoraConfig(target_modules=['fc1', 'fc2'], lora_rank=2, lora_alpha=6, use_dora=True),
        'ia3': IA3Config(target_modules=['fc1', 'fc2'], feedforward_modules=['fc2']),
    }


def test_lora_file_holds_peft_keys_and_layouts(tmp_path):
    pet = _randomised(get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1', 'fc2'], lora_rank=2, lora_alpha=6,
                                                           modules_to_save=['head'])))
    pet.save_pretrained(str(tmp_path), format='peft')
    assert sorted(os.listdir(tmp_path)) == ['adapter_config.json', 'adapter_model.safetensors']
    config = json.loads((tmp_path / 'adapter_config.json').read_text())
    assert config['peft_type'] == 'LORA' and config['r'] == 2 and config['lora_alpha'] == 6
    assert config['target_modules'] == ['fc1', 'fc2'] and config['modules_to_save'] == ['head']
    assert config['use_dora'] is False and config['bias'] == 'none' and config['fan_in_fan_out'] is False
    tensors = load_file(str(tmp_path / 'adapter_model.safetensors'))
    assert sorted(tensors) == ['base_model.model.fc1.lora_A.weight', 'base_model.model.fc1.lora_B.weight',
                               'base_model.model.fc2.lora_A.weight', 'base_model.model.fc2.lora_B.weight',
                               'base_model.model.head.bias', 'base_model.model.head.weight']
    layer = pet.base_model.fc1
    # PyTorch's nn.Linear layout: A (r, in), B (out, r), the same arrays as nn.Dense's factors.
    np.testing.assert_array_equal(tensors['base_model.model.fc1.lora_A.weight'], layer.mindpet_delta_lora_a.asnumpy())
    np.testing.assert_array_equal(tensors['base_model.model.fc1.lora_B.weight'], layer.mindpet_delta_lora_b.asnumpy())
    np.testing.assert_array_equal(tensors['base_model.model.head.weight'], pet.base_model.head.weight.asnumpy())


def test_ia3_vectors_are_columns_or_feedforward_rows(tmp_path):
    pet = _randomised(get_pet_model(PlainMLP(), _configs()['ia3']))
    pet.save_pretrained(str(tmp_path), format='peft')
    config = json.loads((tmp_path / 'adapter_config.json').read_text())
    assert config['peft_type'] == 'IA3' and config['feedforward_modules'] == ['fc2']
    tensors = load_file(str(tmp_path / 'adapter_model.safetensors'))
    assert tensors['base_model.model.fc1.ia3_l'].shape == (16, 1)    # output scaling: (out, 1)
    assert tensors['base_model.model.fc2.ia3_l'].shape == (1, 16)    # feed-forward, input scaling: (1, in)
    np.testing.assert_array_equal(tensors['base_model.model.fc1.ia3_l'][:, 0],
                                  pet.base_model.fc1.mindpet_delta_ia3_vector.asnumpy())


@pytest.mark.parametrize('method', ['lora', 'dora', 'ia3'])
def test_round_trip_same_outputs_in_graph_mode(method, tmp_path, graph_mode):
    pet = _randomised(get_pet_model(PlainMLP(), _configs()[method]))
    expected = pet(X).asnumpy()
    base = PlainMLP()(X).asnumpy()
    assert np.abs(expected - base).max() > 1e-2   # the adapter changes the function
    pet.save_pretrained(str(tmp_path), format='peft')
    loaded = PetModel.from_pretrained(PlainMLP(), str(tmp_path))
    np.testing.assert_allclose(loaded(X).asnumpy(), expected, rtol=1e-5, atol=1e-6)
    # ... and switched to in an already-compiled graph, next to a zero adapter.
    other = get_pet_model(PlainMLP(), _configs()[method], adapter_name='plain')
    np.testing.assert_allclose(other(X).asnumpy(), base, rtol=1e-5, atol=1e-6)
    other.load_adapter(str(tmp_path), 'peft')
    other.set_adapter('peft')
    np.testing.assert_allclose(other(X).asnumpy(), expected, rtol=1e-5, atol=1e-6)
    merged = other.merge_and_unload()
    np.testing.assert_allclose(merged(X).asnumpy(), expected, rtol=1e-5, atol=1e-5)


def _write_peft(directory, config, tensors):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'adapter_config.json'), 'w', encoding='utf-8') as handle:
        json.dump(config, handle)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
              os.path.join(directory, 'adapter_model.safetensors'))
    return str(directory)


def _lora_files(rank=2):
    rng = np.random.RandomState(0)
    config = {'peft_type': 'LORA', 'r': rank, 'lora_alpha': 4, 'target_modules': ['fc1'], 'lora_dropout': 0.0,
              'bias': 'none', 'fan_in_fan_out': False, 'task_type': None}
    tensors = {'base_model.model.fc1.lora_A.weight': rng.randn(rank, 8),
               'base_model.model.fc1.lora_B.weight': rng.randn(16, rank)}
    return config, tensors


def test_hand_written_peft_lora_matches_numpy_reference(tmp_path):
    config, tensors = _lora_files()
    directory = _write_peft(tmp_path / 'a', config, tensors)
    net = PlainMLP()
    w1, b1 = net.fc1.weight.asnumpy(), net.fc1.bias.asnumpy()
    pet = PetModel.from_pretrained(net, directory)
    assert pet.get_adapter_config().lora_rank == 2 and pet.get_adapter_config().lora_alpha == 4
    x = X.asnumpy()
    delta = (4 / 2) * tensors['base_model.model.fc1.lora_B.weight'] @ tensors['base_model.model.fc1.lora_A.weight']
    h = np.maximum(x @ (w1 + delta).T + b1, 0)
    h = np.maximum(h @ net.fc2.weight.asnumpy().T + net.fc2.bias.asnumpy(), 0)
    ref = h @ net.head.weight.asnumpy().T + net.head.bias.asnumpy()
    np.testing.assert_allclose(pet(X).asnumpy(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('change, exc, fragment', [
    ({'peft_type': 'LOHA'}, AdapterConfigError, "peft_type 'LOHA'"),
    ({'fan_in_fan_out': True}, AdapterConfigError, 'fan_in_fan_out=True'),
    ({'bias': 'all'}, AdapterConfigError, "bias='all'"),
    ({'layers_to_transform': [0]}, AdapterConfigError, 'layers_to_transform=[0]'),
    ({'init_lora_weights': 'pissa'}, AdapterConfigError, "init_lora_weights='pissa'"),
    ({'some_new_option': 3}, AdapterConfigError, 'some_new_option=3'),
    ({'r': 3}, CheckpointError, 'r=3'),
])
def test_refuses_options_and_shapes_naming_them(change, exc, fragment, tmp_path):
    config, tensors = _lora_files()
    config.update(change)
    directory = _write_peft(tmp_path / 'a', config, tensors)
    net = PlainMLP()
    names = [p.name for p in net.get_parameters()]
    with pytest.raises(exc, match=__import__('re').escape(fragment)):
        PetModel.from_pretrained(net, directory)
    assert [p.name for p in net.get_parameters()] == names   # the model is left as it was
    assert type(net.fc1).__name__ == 'Dense'


def test_refuses_unknown_key_missing_factor_and_wrong_layer_shape(tmp_path):
    config, tensors = _lora_files()
    bad = dict(tensors, **{'base_model.model.fc1.lora_C.weight': np.ones((2, 2))})
    with pytest.raises(CheckpointError, match='lora_C'):
        PetModel.from_pretrained(PlainMLP(), _write_peft(tmp_path / 'a', config, bad))
    missing = {k: v for k, v in tensors.items() if 'lora_B' not in k}
    with pytest.raises(CheckpointError, match=r'lacks tensor .*fc1\.lora_B\.weight'):
        PetModel.from_pretrained(PlainMLP(), _write_peft(tmp_path / 'b', config, missing))
    # Factors for a 7-input layer do not fit fc1 (8 inputs): refused against the model, before anything changes.
    wrong = {'base_model.model.fc1.lora_A.weight': np.ones((2, 7)),
             'base_model.model.fc1.lora_B.weight': np.ones((16, 2))}
    net = PlainMLP()
    with pytest.raises(CheckpointError, match='fc1'):
        PetModel.from_pretrained(net, _write_peft(tmp_path / 'c', config, wrong))
    assert type(net.fc1).__name__ == 'Dense'
    os.remove(os.path.join(tmp_path / 'c', 'adapter_model.safetensors'))
    with pytest.raises(CheckpointError, match='has no adapter_model.safetensors'):
        PetModel.from_pretrained(PlainMLP(), str(tmp_path / 'c'))


def test_saving_a_method_peft_cannot_hold_is_refused_before_writing(tmp_path):
    from mindpet import BitFitConfig
    pet = get_pet_model(PlainMLP(), BitFitConfig())
    with pytest.raises(ValueError, match="format 'peft' holds LoRA, DoRA and IA3 adapters, but this adapter is"):
        pet.save_pretrained(str(tmp_path / 'out'), format='peft')
    assert not os.path.exists(tmp_path / 'out') or not os.listdir(tmp_path / 'out')
