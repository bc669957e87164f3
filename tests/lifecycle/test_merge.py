"""merge / unmerge / merge_and_unload / unload in GRAPH_MODE, after the graph has already run."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

from mindpet import LoraConfig, get_pet_model
from mindpet.delta import LoRADense

from tests.gpt_like import GPTLike, token_batch

TARGETS = ['q_proj', 'v_proj', 'fc_in']


def _randomise(pet, seed):
    """Give every live LoRA A and B random values (what training would do), through Parameter data."""
    rng = np.random.RandomState(seed)
    for layer in pet.pet_layers.values():
        for param in (layer.mindpet_delta_lora_a, layer.mindpet_delta_lora_b):
            param.set_data(Tensor(rng.randn(*param.shape).astype(np.float32) * 0.2))


def _increment(layer, scaling):
    a = layer.mindpet_delta_lora_a.asnumpy().astype(np.float64)
    b = layer.mindpet_delta_lora_b.asnumpy().astype(np.float64)
    return scaling * b @ a


def _snapshot(net):
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def test_merge_and_unmerge_in_an_already_compiled_graph(graph_mode):
    net = GPTLike()
    base = _snapshot(net)
    pet = get_pet_model(net, LoraConfig(target_modules=TARGETS, lora_rank=4, lora_alpha=8))
    ids, _ = token_batch('shift')
    pet(ids)                                  # the graph is compiled and has run
    _randomise(pet, seed=1)
    unmerged = pet(ids).asnumpy()
    assert np.abs(unmerged - GPTLike()(ids).asnumpy()).max() > 1e-2

    pet.merge()
    assert pet.merged
    for key, layer in pet.pet_layers.items():
        np.testing.assert_allclose(layer.weight.asnumpy(), base[f'{key}.weight'] + _increment(layer, 2.0),
                                   atol=1e-6, rtol=1e-6)
        assert float(layer.mindpet_state_lora_scaling.asnumpy()) == 0.0
    merged_weights = _snapshot(net)
    np.testing.assert_allclose(pet(ids).asnumpy(), unmerged, atol=1e-5, rtol=1e-5)

    with pytest.raises(RuntimeError, match='already merged'):
        pet.merge()
    for name, value in _snapshot(net).items():   # the refused merge changed nothing
        np.testing.assert_array_equal(value, merged_weights[name])

    pet.unmerge()
    assert not pet.merged
    after = _snapshot(net)
    for name, value in base.items():
        assert np.abs(after[name] - value).max() <= 1e-6, name
    for layer in pet.pet_layers.values():
        assert float(layer.mindpet_state_lora_scaling.asnumpy()) == 2.0
    np.testing.assert_allclose(pet(ids).asnumpy(), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match='no adapter is merged'):
        pet.unmerge()
    assert len(pet.compile_cache) == 1       # all of it ran in the first compiled graph


def test_merge_and_unload_returns_a_plain_network_with_the_same_outputs(graph_mode):
    net = GPTLike()
    base_names = sorted(p.name for p in GPTLike().get_parameters())
    pet = get_pet_model(net, LoraConfig(target_modules=TARGETS, lora_rank=4, lora_alpha=8))
    ids, _ = token_batch('double')
    pet(ids)
    _randomise(pet, seed=2)
    expected = pet(ids).asnumpy()
    weights = {key: layer.weight.asnumpy() + _increment(layer, 2.0) for key, layer in pet.pet_layers.items()}

    plain = pet.merge_and_unload()
    assert plain is net
    cells = dict(plain.cells_and_names())
    assert not any(isinstance(cell, LoRADense) for cell in cells.values())
    for key in weights:
        assert type(cells[key]) is nn.Dense  # pylint: disable=unidiomatic-typecheck
        np.testing.assert_allclose(cells[key].weight.asnumpy(), weights[key], atol=1e-6, rtol=1e-6)
    assert sorted(p.name for p in plain.get_parameters()) == base_names
    assert all(p.requires_grad for p in plain.get_parameters())    # as before injection
    np.testing.assert_allclose(plain(ids).asnumpy(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match='was unloaded'):
        pet.merge()
    with pytest.raises(RuntimeError, match='was unloaded'):
        pet.set_adapter('default')


def test_switching_and_disabling_while_merged(graph_mode):
    net = GPTLike()
    base = _snapshot(net)
    pet = get_pet_model(net, LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=4, lora_alpha=8))
    pet.add_adapter('other', LoraConfig(target_modules=['q_proj', 'k_proj'], lora_rank=2, lora_alpha=2))
    ids, _ = token_batch('shift')
    base_out = pet(ids).asnumpy()
    _randomise(pet, seed=3)
    out_default = pet(ids).asnumpy()
    pet.set_adapter('other')
    _randomise(pet, seed=4)
    out_other = pet(ids).asnumpy()
    increments = {key: _increment(layer, 1.0) for key, layer in pet.pet_layers.items()
                  if key.endswith(('q_proj', 'k_proj'))}
    cache = len(pet.compile_cache)

    pet.merge()
    np.testing.assert_allclose(pet(ids).asnumpy(), out_other, atol=1e-5, rtol=1e-5)
    for key, inc in increments.items():
        np.testing.assert_allclose(net.parameters_dict()[f'{key}.weight'].asnumpy(),
                                   base[f'{key}.weight'] + inc, atol=1e-6)
    pet.set_adapter('default')                 # stays merged: 'other' out, 'default' in
    assert pet.merged and pet.active_adapter == 'default'
    np.testing.assert_allclose(pet(ids).asnumpy(), out_default, atol=1e-5, rtol=1e-5)
    with pet.disable_adapter():
        assert not pet.merged
        np.testing.assert_allclose(pet(ids).asnumpy(), base_out, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match='inside'):
            pet.merge()
        with pytest.raises(RuntimeError, match='inside'):
            pet.set_adapter('other')
    assert pet.merged
    np.testing.assert_allclose(pet(ids).asnumpy(), out_default, atol=1e-5, rtol=1e-5)
    pet.unmerge()
    after = _snapshot(net)
    for name, value in base.items():
        assert np.abs(after[name] - value).max() <= 1e-6, name
    assert len(pet.compile_cache) == cache

    plain = pet.unload()                       # discard the adapters: the base network again
    np.testing.assert_allclose(plain(ids).asnumpy(), base_out, atol=1e-5, rtol=1e-5)


def test_merge_needs_an_active_adapter():
    pet = get_pet_model(GPTLike(), LoraConfig(target_modules=['q_proj'], lora_rank=2))
    pet.delete_adapter('default')
    assert pet.active_adapter is None
    with pytest.raises(ValueError, match='no active adapter'):
        pet.merge()


def test_float16_base_weights_merge_in_a_compiled_graph(graph_mode):
    rng = np.random.RandomState(5)
    net = nn.SequentialCell([nn.Dense(16, 16, dtype=ms.float16), nn.ReLU(), nn.Dense(16, 8, dtype=ms.float16)])
    base = _snapshot(net)
    x = Tensor(rng.randn(4, 16).astype(np.float16))
    base_out = net(x).asnumpy()
    pet = get_pet_model(net, LoraConfig(target_modules=[r'\d'], lora_rank=2, lora_alpha=4))
    assert all(layer.compute_dtype == ms.float16 for layer in pet.pet_layers.values())
    np.testing.assert_array_equal(pet(x).asnumpy(), base_out)
    _randomise(pet, seed=6)
    unmerged = pet(x).asnumpy()
    pet.merge()
    assert all(layer.weight.dtype == ms.float16 for layer in pet.pet_layers.values())
    np.testing.assert_allclose(pet(x).asnumpy(), unmerged, atol=1e-2, rtol=1e-2)
    pet.unmerge()
    for name, value in base.items():   # fp16 rounding of W + delta - delta: within one fp16 step of |W + delta|
        np.testing.assert_allclose(_snapshot(net)[name], value, atol=2e-3)
