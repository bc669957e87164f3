"""Mixed-adapter batches (MixedLoraModel): every row equals the PetModel with only that row's adapter active (or
none), in GRAPH_MODE after the graph has run, and a second mix runs in the same compiled graph."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindpet import LoraConfig, get_pet_model
from mindpet.serving import MixedLoraModel, MixedLoraDense

from tests.gpt_like import GPTLike, token_batch

ADAPTERS = {
    'a': LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=4, lora_alpha=8),
    'b': LoraConfig(target_modules=['q_proj', 'k_proj', 'v_proj'], lora_rank=8, lora_alpha=4),
    'c': LoraConfig(target_modules=['fc_in'], lora_rank=2, lora_alpha=2, use_rslora=True),
}


def _pet_with_adapters(seed=3):
    """A GPTLike PetModel holding three adapters of different targets, ranks and scalings, each with non-zero
    random B (so every adapter changes the output)."""
    pet = get_pet_model(GPTLike(), ADAPTERS['a'], adapter_name='a')
    pet.add_adapter('b', ADAPTERS['b'])
    pet.add_adapter('c', ADAPTERS['c'])
    rng = np.random.RandomState(seed)
    for name in ADAPTERS:
        pet.set_adapter(name)
        for param in pet.trainable_params():
            param.set_data(Tensor(rng.randn(*param.shape).astype(np.float32) * 0.3))
    return pet


def _references(pet, ids):
    """Adapter name (None: base) -> the PetModel's output with only that adapter active."""
    refs = {}
    for name in ADAPTERS:
        pet.set_adapter(name)
        refs[name] = pet(ids).asnumpy()
    with pet.disable_adapter():
        refs[None] = pet(ids).asnumpy()
    return refs


def test_each_row_equals_its_adapter_alone_in_one_compiled_graph(graph_mode):
    ids, _ = token_batch('shift', batch=8)
    pet = _pet_with_adapters()
    refs = _references(pet, ids)
    for name in ADAPTERS:     # every adapter, and no adapter, gives a distinct output
        assert np.abs(refs[name] - refs[None]).max() > 1e-2
    pet.set_adapter('b')
    with MixedLoraModel(pet) as view:
        assert view.adapter_slots == {'a': 1, 'b': 2, 'c': 3}
        assert all(isinstance(layer, MixedLoraDense) for layer in view.layers.values())
        first = ['a', None, 'b', 'c', 'c', 'a', None, 'b']
        out = view.forward(ids, adapter_names=first).asnumpy()
        for row, name in enumerate(first):
            np.testing.assert_allclose(out[row], refs[name][row], rtol=1e-5, atol=1e-5)
        graphs = set(view._compile_cache)   # pylint: disable=protected-access
        # A second mix: Parameter data only, the same compiled graph.
        second = [None, 'c', 'c', 'b', 'a', 'b', 'a', None]
        out = view.forward(ids, adapter_names=second).asnumpy()
        assert set(view._compile_cache) == graphs   # pylint: disable=protected-access
        for row, name in enumerate(second):
            np.testing.assert_allclose(out[row], refs[name][row], rtol=1e-5, atol=1e-5)
        # All rows on one adapter equals the PetModel with it active, for the whole batch.
        np.testing.assert_allclose(view.forward(ids, adapter_names=['c'] * 8).asnumpy(), refs['c'],
                                   rtol=1e-5, atol=1e-5)
    # Closed: the PetModel's own layers are back, parameter names and active adapter as before.
    assert [type(layer).__name__ for layer in pet.pet_layers.values()] == ['LoRADense'] * 8
    assert pet.base_model.blocks[0].attn.q_proj is pet.pet_layers['blocks.0.attn.q_proj']
    assert pet.base_model.blocks[1].mlp.fc_in is pet.pet_layers['blocks.1.mlp.fc_in']
    assert not [p.name for p in pet.get_parameters() if 'mixed' in p.name]
    assert 'blocks.0.attn.q_proj.weight' in [p.name for p in pet.get_parameters()]
    np.testing.assert_array_equal(pet(ids).asnumpy(), refs['b'])


def test_a_new_batch_size_and_a_subset_of_adapters(graph_mode):
    ids, _ = token_batch('shift', batch=8)
    pet = _pet_with_adapters()
    refs = _references(pet, ids)
    with MixedLoraModel(pet, adapter_names=['c', 'a']) as view:
        assert view.adapter_slots == {'c': 1, 'a': 2}
        out = view.forward(ids[:3], adapter_names=['a', None, 'c']).asnumpy()
        for row, name in enumerate(['a', None, 'c']):
            np.testing.assert_allclose(out[row], refs[name][row], rtol=1e-5, atol=1e-5)
        out = view.forward(ids, adapter_names=['c'] * 4 + ['a'] * 4).asnumpy()
        np.testing.assert_allclose(out[:4], refs['c'][:4], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[4:], refs['a'][4:], rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused_naming_the_argument():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ids, _ = token_batch('shift', batch=2)
    pet = _pet_with_adapters()
    pet.set_adapter('a')
    before = pet(ids).asnumpy()
    with pytest.raises(ValueError, match="adapter_names.*'zz'"):
        MixedLoraModel(pet, adapter_names=['a', 'zz'])
    with pytest.raises(TypeError, match="'pet' must be a PetModel"):
        MixedLoraModel(GPTLike())
    pet.merge()
    with pytest.raises(RuntimeError, match='merged=True'):
        MixedLoraModel(pet)
    pet.unmerge()
    # The refusals changed nothing (merge + unmerge round the base weight in float32: 1e-6, not exact).
    np.testing.assert_allclose(pet(ids).asnumpy(), before, rtol=1e-5, atol=1e-5)
    before = pet(ids).asnumpy()
    view = MixedLoraModel(pet)
    with pytest.raises(ValueError, match=r"adapter_names\[1\]' must be None or one of \['a', 'b', 'c'\], but got 'd'"):
        view.set_rows(['a', 'd'])
    view.close()
    with pytest.raises(RuntimeError, match='closed'):
        view.set_rows(['a', 'b'])
    np.testing.assert_array_equal(pet(ids).asnumpy(), before)
