"""Every state-changing PetModel method checks first and acts second: a refused call leaves the model exactly as it
was (active adapter, adapter list, merged flag, layers, trainability, every Parameter's bytes, the outputs of the
already-compiled graph). One table row per refusal; run in GRAPH_MODE after the graph has run once."""
import os
from collections import namedtuple

import numpy as np
import pytest
from mindspore import Tensor

from mindpet import LoraConfig, PetModel, get_pet_model
from mindpet.utils.exceptions import AdapterConfigError
from tests.nets import PlainMLP

X = Tensor(np.random.RandomState(3).randn(5, 8).astype(np.float32))
Row = namedtuple('Row', ['id', 'prepare', 'call', 'exc', 'fragments'])


def _model(tmp_path):
    pet = get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1'], lora_rank=2, lora_alpha=4))
    # Make both adapters non-trivial, so merging and switching change the outputs.
    pet.base_model.fc1.mindpet_delta_lora_b.set_data(Tensor(np.full((16, 2), 0.3, np.float32)))
    pet.add_adapter('other', LoraConfig(target_modules=['fc1'], lora_rank=2, lora_alpha=8))
    pet.save_pretrained(str(tmp_path / 'saved'))
    other_base = get_pet_model(PlainMLP(hidden=12), LoraConfig(target_modules=['fc1'], lora_rank=2))
    other_base.save_pretrained(str(tmp_path / 'other_base'))
    return pet


def _state(pet):
    return {'active': pet.active_adapter, 'adapters': pet.adapters, 'merged': pet.merged,
            'layers': {k: id(v) for k, v in pet.pet_layers.items()},
            'cells': [(name, type(cell).__name__) for name, cell in pet.base_model.cells_and_names()],
            'grad': {p.name: p.requires_grad for p in pet.get_parameters()},
            'data': {p.name: p.asnumpy().tobytes() for p in pet.get_parameters()},
            'output': pet(X).asnumpy().tobytes()}


def _merged(pet):
    pet.merge()


def _fail_second_layer_merge(pet):
    """A tuner whose merge fails after the first layer is merged (the rollback must undo that layer)."""
    pet.add_adapter('two', LoraConfig(target_modules=['fc1', 'fc2'], lora_rank=2))
    pet.set_adapter('two')
    pet.base_model.fc2.mindpet_delta_lora_b.set_data(Tensor(np.full((16, 2), 0.2, np.float32)))
    tuner = pet._state.tuner  # pylint: disable=protected-access
    real = tuner.merge_layer
    calls = []

    def merge_layer(layer, config):
        calls.append(layer)
        if len(calls) == 2:
            raise RuntimeError('merge failed on the second layer')
        return real(layer, config)
    tuner.merge_layer = merge_layer


ROWS = [
    Row('set-adapter-none', None, lambda p, t: p.set_adapter(None), TypeError, ["'adapter_name'", 'None']),
    Row('set-adapter-none-merged', _merged, lambda p, t: p.set_adapter(None), TypeError, ["'adapter_name'"]),
    Row('set-adapter-unknown-merged', _merged, lambda p, t: p.set_adapter('nope'), ValueError, ["'nope'"]),
    Row('set-adapter-int', None, lambda p, t: p.set_adapter(1), TypeError, ["'adapter_name'", '(int)']),
    Row('delete-adapter-none', None, lambda p, t: p.delete_adapter(None), TypeError, ["'adapter_name'"]),
    Row('delete-adapter-unknown', _merged, lambda p, t: p.delete_adapter('nope'), ValueError, ["'nope'"]),
    Row('merge-twice', _merged, lambda p, t: p.merge(), RuntimeError, ['already merged']),
    Row('merge-fails-midway', _fail_second_layer_merge, lambda p, t: p.merge(), RuntimeError,
        ['second layer']),
    Row('unmerge-nothing-merged', None, lambda p, t: p.unmerge(), RuntimeError, ['no adapter is merged']),
    Row('load-adapter-missing', None, lambda p, t: p.load_adapter(str(t / 'missing'), 'x'), AdapterConfigError,
        ['missing']),
    Row('load-adapter-existing-name', _merged, lambda p, t: p.load_adapter(str(t / 'saved'), 'other'), ValueError,
        ["'other'", 'already exists']),
    Row('load-adapter-other-base', _merged, lambda p, t: p.load_adapter(str(t / 'other_base'), 'x'),
        AdapterConfigError, ['other_base']),
    Row('add-adapter-modules-match-nothing', None,
        lambda p, t: p.add_adapter('x', LoraConfig(target_modules=['fc2'], modules_to_save=['nothing'])),
        ValueError, ["modules_to_save ['nothing']"]),
    Row('add-weighted-unknown', _merged, lambda p, t: p.add_weighted_adapter(['default', 'nope'], [1, 1], 'mix'),
        ValueError, ["'nope'"]),
    Row('add-weighted-weights', None, lambda p, t: p.add_weighted_adapter(['default'], [1, 2], 'mix'), ValueError,
        ["'weights'"]),
    Row('add-weighted-existing-name', None, lambda p, t: p.add_weighted_adapter(['default'], [1], 'other'),
        ValueError, ["'other'", 'already exists']),
]


@pytest.mark.parametrize('row', ROWS, ids=[row.id for row in ROWS])
def test_refused_call_leaves_the_model_as_it_was(tmp_path, graph_mode, row):
    pet = _model(tmp_path)
    pet(X)                                     # the graph is compiled before anything below
    if row.prepare:
        row.prepare(pet)
    before = _state(pet)
    with pytest.raises(row.exc) as info:
        row.call(pet, tmp_path)
    assert all(fragment in str(info.value) for fragment in row.fragments), str(info.value)
    assert _state(pet) == before


def test_set_adapter_none_after_merge_keeps_training_results(tmp_path, graph_mode):
    """The issue's sequence: merge(), a refused set_adapter(None), then unmerge: the adapter's values survive and
    the outputs are the merged ones throughout."""
    pet = _model(tmp_path)
    pet.merge()
    merged_out = pet(X).asnumpy()
    with pytest.raises(TypeError):
        pet.set_adapter(None)
    assert pet.merged and pet.active_adapter == 'default'
    np.testing.assert_array_equal(pet(X).asnumpy(), merged_out)
    pet.unmerge()
    np.testing.assert_allclose(pet(X).asnumpy(), merged_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pet.base_model.fc1.mindpet_delta_lora_b.asnumpy(), np.full((16, 2), 0.3, np.float32))
    assert os.path.isdir(tmp_path / 'saved')
