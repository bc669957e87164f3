"""Many adapters: save/load (safetensors + YAML), fingerprint checks, set_adapter / disable_adapter /
delete_adapter / add_weighted_adapter in GRAPH_MODE after the graph has run."""
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
import mindspore as ms
from mindspore import Tensor
from safetensors.numpy import load_file, save_file

from mindpet import LoraConfig, PetModel, get_pet_model
from mindpet.adapter_store import model_fingerprint, ADAPTER_CONFIG_NAME, adapter_weights_path, weights_file_name
from mindpet.utils.exceptions import AdapterConfigError, CheckpointError, ModelConfigKeysInfoError

from tests.gpt_like import GPTLike, token_batch, train

A, B = 'mindpet_delta_lora_a', 'mindpet_delta_lora_b'


def _delta_values(pet):
    return {p.name: p.asnumpy().copy() for p in pet.get_parameters() if 'mindpet_delta_' in p.name}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Two adapters trained (GRAPH_MODE) on two toy tasks from the same base, saved, with their outputs."""
    ms.set_context(mode=ms.GRAPH_MODE)
    root = tmp_path_factory.mktemp('adapters')
    ids, _ = token_batch('shift', seed=5)
    base_out = GPTLike()(ids).asnumpy()
    pet_a = get_pet_model(GPTLike(), LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=4, lora_alpha=8),
                          adapter_name='shift')
    losses_a = train(pet_a, 'shift', steps=8)
    out_a = pet_a(ids).asnumpy()
    pet_a.save_pretrained(str(root / 'shift'))
    pet_b = get_pet_model(GPTLike(), LoraConfig(target_modules=['q_proj', 'k_proj', 'v_proj'], lora_rank=8,
                                                lora_alpha=4), adapter_name='double')
    losses_b = train(pet_b, 'double', steps=8)
    out_b = pet_b(ids).asnumpy()
    pet_b.save_pretrained(str(root / 'double'))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return SimpleNamespace(ids=ids, base_out=base_out, out_a=out_a, out_b=out_b, dir_a=str(root / 'shift'),
                           dir_b=str(root / 'double'), losses_a=losses_a, losses_b=losses_b,
                           tensors_a=_delta_values(pet_a), tensors_b=_delta_values(pet_b))


def test_two_trained_adapters_switch_exactly_in_a_compiled_graph(trained, graph_mode):
    assert trained.losses_a[-1] < trained.losses_a[0] and trained.losses_b[-1] < trained.losses_b[0]
    assert np.abs(trained.out_a - trained.out_b).max() > 1e-2
    ids = trained.ids
    pet = PetModel.from_pretrained(GPTLike(), trained.dir_a, adapter_name='shift')
    np.testing.assert_array_equal(pet(ids).asnumpy(), trained.out_a)
    # 'double' adapts k_proj too and has rank 8 > 4: loading and first activating it change the structure and
    # recompile by themselves.
    pet.load_adapter(trained.dir_b, 'double')
    assert pet.adapters == ['shift', 'double'] and pet.active_adapter == 'shift'
    np.testing.assert_array_equal(pet(ids).asnumpy(), trained.out_a)
    pet.set_adapter('double')
    assert pet.active_adapter == 'double'
    np.testing.assert_array_equal(pet(ids).asnumpy(), trained.out_b)
    compiled = len(pet.compile_cache)
    for _ in range(2):
        pet.set_adapter('shift')
        np.testing.assert_array_equal(pet(ids).asnumpy(), trained.out_a)
        pet.set_adapter('double')
        np.testing.assert_array_equal(pet(ids).asnumpy(), trained.out_b)
    with pet.disable_adapter():
        np.testing.assert_array_equal(pet(ids).asnumpy(), trained.base_out)
    np.testing.assert_array_equal(pet(ids).asnumpy(), trained.out_b)
    pet.add_weighted_adapter(['shift', 'double'], [1.0, 0.0], 'w10')
    pet.set_adapter('w10')
    np.testing.assert_allclose(pet(ids).asnumpy(), trained.out_a, rtol=1e-5, atol=1e-5)
    assert len(pet.compile_cache) == compiled   # switching never recompiled
    pet.delete_adapter('w10')
    assert pet.active_adapter is None and pet.adapters == ['shift', 'double']
    np.testing.assert_array_equal(pet(ids).asnumpy(), trained.base_out)


def test_save_load_round_trip_is_exact_and_holds_only_adapter_tensors(trained, tmp_path):
    weights_path = adapter_weights_path(trained.dir_a)
    with open(weights_path, 'rb') as handle:
        assert os.path.basename(weights_path) == weights_file_name(handle.read())      # named by its content
    assert sorted(os.listdir(trained.dir_a)) == [ADAPTER_CONFIG_NAME, os.path.basename(weights_path)]
    stored = load_file(weights_path)
    assert sorted(stored) == sorted(trained.tensors_a)
    for name, value in trained.tensors_a.items():
        assert stored[name].dtype == np.float32
        np.testing.assert_array_equal(stored[name], value)
    raw = sum(v.nbytes for v in stored.values())
    with open(weights_path, 'rb') as handle:
        header_len = int.from_bytes(handle.read(8), 'little')
    assert os.path.getsize(weights_path) - 8 - header_len == raw    # tensors only: no optimizer state

    meta = yaml.safe_load(open(os.path.join(trained.dir_a, ADAPTER_CONFIG_NAME), encoding='utf-8'))
    assert meta['pet'] == {'type': 'lora', 'target_modules': ['q_proj', 'v_proj'], 'exclude_modules': None,
                           'modules_to_save': None, 'lora_rank': 4, 'lora_alpha': 8, 'lora_dropout': 0.0,
                           'compute_dtype': None, 'use_dora': False, 'dora_detach_norm': True, 'use_rslora': False,
                           'init_lora_weights': True, 'rank_pattern': None, 'alpha_pattern': None,
                           'layers_to_transform': None, 'layers_pattern': None}
    assert meta['adapter_name'] == 'shift'
    assert meta['target_layers'] == ['blocks.0.attn.q_proj', 'blocks.0.attn.v_proj', 'blocks.1.attn.q_proj',
                                     'blocks.1.attn.v_proj']
    fingerprint = model_fingerprint(GPTLike())
    assert meta['base_model']['params'] == {k: list(v) for k, v in fingerprint.items()}
    assert list(meta['base_model']['params']) == list(fingerprint)
    assert meta['base_model']['num_parameters'] == sum(int(np.prod(s)) for s in fingerprint.values())

    pet = PetModel.from_pretrained(GPTLike(), trained.dir_a, adapter_name='shift')
    loaded = _delta_values(pet)
    assert sorted(loaded) == sorted(trained.tensors_a)
    for name, value in trained.tensors_a.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert pet.trainable_params() == []                       # loaded for inference by default
    again = str(tmp_path / 'again')
    pet.save_pretrained(again)
    for name, value in load_file(adapter_weights_path(again)).items():
        np.testing.assert_array_equal(value, stored[name])
    trainable = PetModel.from_pretrained(GPTLike(), trained.dir_a, is_trainable=True)
    assert sorted(p.name for p in trainable.trainable_params()) == sorted(trained.tensors_a)


def test_adapter_file_is_within_one_percent_of_the_raw_tensor_bytes(tmp_path):
    net = GPTLike(hidden=256, heads=4, layers=2)
    pet = get_pet_model(net, LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=16))
    pet.save_pretrained(str(tmp_path))
    raw = 4 * (16 * 256 + 256 * 16) * 4
    size = os.path.getsize(adapter_weights_path(str(tmp_path)))
    assert raw <= size <= 1.01 * raw, (size, raw)
    full = sum(p.asnumpy().nbytes for p in GPTLike(hidden=256, heads=4, layers=2).get_parameters())
    assert size < 0.1 * full


@pytest.mark.parametrize('kwargs,first', [
    ({'vocab': 80}, "'embed.embedding_table' has shape (80, 32) here but (64, 32)"),
    ({'layers': 3}, "'blocks.2.ln_1.gamma' (32,) is not in the adapter's base model"),
    ({'layers': 1}, "'blocks.1.ln_1.gamma' (32,), which this model does not have"),
])
def test_a_different_base_model_is_refused_naming_the_first_differing_parameter(trained, kwargs, first):
    net = GPTLike(**kwargs)
    with pytest.raises(AdapterConfigError, match=first.replace('(', r'\(').replace(')', r'\)')):
        PetModel.from_pretrained(net, trained.dir_a)
    assert not any('mindpet' in p.name for p in net.get_parameters())    # nothing was injected
    pet = get_pet_model(GPTLike(**kwargs), LoraConfig(target_modules=['q_proj']))
    with pytest.raises(AdapterConfigError, match=first.replace('(', r'\(').replace(')', r'\)')):
        pet.load_adapter(trained.dir_a, 'shift')
    assert pet.adapters == ['default']


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_broken_adapter_files_are_refused(trained, tmp_path):
    path = _copy(trained.dir_a, tmp_path / 'missing')
    tensors = load_file(adapter_weights_path(path))
    del tensors['blocks.1.attn.v_proj.mindpet_delta_lora_b']
    save_file(tensors, adapter_weights_path(path))
    with pytest.raises(CheckpointError, match="lacks tensor 'blocks.1.attn.v_proj.mindpet_delta_lora_b'"):
        PetModel.from_pretrained(GPTLike(), path)

    path = _copy(trained.dir_a, tmp_path / 'shape')
    tensors = load_file(adapter_weights_path(path))
    tensors['blocks.0.attn.q_proj.mindpet_delta_lora_a'] = np.zeros((5, 32), np.float32)
    save_file(tensors, adapter_weights_path(path))
    with pytest.raises(CheckpointError, match=r"'blocks.0.attn.q_proj.mindpet_delta_lora_a' of shape \(5, 32\)"):
        PetModel.from_pretrained(GPTLike(), path)

    path = _copy(trained.dir_a, tmp_path / 'extra')
    tensors = load_file(adapter_weights_path(path))
    tensors['adam_m.blocks.0.attn.q_proj.mindpet_delta_lora_a'] = np.zeros((4, 32), np.float32)
    save_file(tensors, adapter_weights_path(path))
    with pytest.raises(CheckpointError, match="does not describe, first: 'adam_m"):
        PetModel.from_pretrained(GPTLike(), path)

    path = _copy(trained.dir_a, tmp_path / 'torn')
    weights = adapter_weights_path(path)
    with open(weights, 'r+b') as handle:
        handle.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointError, match='could not be read'):
        PetModel.from_pretrained(GPTLike(), path)

    path = _copy(trained.dir_a, tmp_path / 'yaml')
    meta_path = os.path.join(path, ADAPTER_CONFIG_NAME)
    meta = yaml.safe_load(open(meta_path, encoding='utf-8'))
    meta['pet']['lora_rnak'] = meta['pet'].pop('lora_rank')
    open(meta_path, 'w', encoding='utf-8').write(yaml.safe_dump(meta))
    with pytest.raises(ModelConfigKeysInfoError, match="did you mean 'lora_rank'"):
        PetModel.from_pretrained(GPTLike(), path)
    del meta['base_model']
    open(meta_path, 'w', encoding='utf-8').write(yaml.safe_dump(meta))
    with pytest.raises(AdapterConfigError, match=r"lacks the key\(s\) \['base_model'\]"):
        PetModel.from_pretrained(GPTLike(), path)
    with pytest.raises(AdapterConfigError, match='does not exist'):
        PetModel.from_pretrained(GPTLike(), str(tmp_path / 'nowhere'))
    os.remove(meta_path)
    with pytest.raises(AdapterConfigError, match='has no adapter_config.yaml'):
        PetModel.from_pretrained(GPTLike(), path)


def test_modules_to_save_switch_with_their_adapter(graph_mode, tmp_path):
    ids, _ = token_batch('shift', seed=5)
    base_out = GPTLike()(ids).asnumpy()
    pet = get_pet_model(GPTLike(), LoraConfig(target_modules=['v_proj'], lora_rank=2, modules_to_save=['lm_head']),
                        adapter_name='head')
    rng = np.random.RandomState(0)
    head = pet.base_model.lm_head.weight
    head.set_data(Tensor(rng.randn(*head.shape).astype(np.float32)))
    out_head = pet(ids).asnumpy()
    pet.save_pretrained(str(tmp_path))
    assert sorted(load_file(adapter_weights_path(str(tmp_path)))) == sorted(
        ['lm_head.weight'] + [f'blocks.{i}.attn.v_proj.mindpet_delta_lora_{x}' for i in (0, 1) for x in 'ab'])

    pet2 = PetModel.from_pretrained(GPTLike(), str(tmp_path), adapter_name='head')
    np.testing.assert_array_equal(pet2(ids).asnumpy(), out_head)
    pet2.add_adapter('plain', LoraConfig(target_modules=['v_proj'], lora_rank=2))   # untrained: base function
    pet2.set_adapter('plain')
    np.testing.assert_array_equal(pet2(ids).asnumpy(), base_out)                     # head back at base values
    pet2.set_adapter('head')
    np.testing.assert_array_equal(pet2(ids).asnumpy(), out_head)
    with pet2.disable_adapter():
        np.testing.assert_array_equal(pet2(ids).asnumpy(), base_out)
    np.testing.assert_array_equal(pet2(ids).asnumpy(), out_head)
    with pytest.raises(ValueError, match='modules_to_save'):
        pet2.add_weighted_adapter(['head', 'plain'], [0.5, 0.5], 'mix')


def test_training_a_second_adapter_leaves_the_first_untouched(graph_mode):
    ids, _ = token_batch('shift', seed=5)
    pet = get_pet_model(GPTLike(), LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=4), adapter_name='a')
    rng = np.random.RandomState(1)
    for layer in pet.pet_layers.values():
        shape = layer.mindpet_delta_lora_b.shape
        layer.mindpet_delta_lora_b.set_data(Tensor(rng.randn(*shape).astype(np.float32) * 0.1))
    out_a = pet(ids).asnumpy()
    stored_a = _delta_values(pet)
    pet.add_adapter('b', LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=4))
    pet.set_adapter('b')
    names = sorted(p.name for p in pet.trainable_params())
    losses = train(pet, 'double', steps=4)
    assert losses[-1] < losses[0]
    trained_b = _delta_values(pet)
    assert all(not np.array_equal(trained_b[n], stored_a[n]) for n in names)
    pet.set_adapter('a')
    np.testing.assert_array_equal(pet(ids).asnumpy(), out_a)
    for name, value in _delta_values(pet).items():
        np.testing.assert_array_equal(value, stored_a[name])
    pet.set_adapter('b')                       # what training wrote into the live Parameters was kept
    for name, value in _delta_values(pet).items():
        np.testing.assert_array_equal(value, trained_b[name])


def _weight_increment(pet, adapter, key):
    """The increment ``adapter`` adds to layer ``key``'s weight, read by merging (numpy float64)."""
    pet.set_adapter(adapter)
    weight = pet.pet_layers[key].weight
    before = weight.asnumpy().astype(np.float64)
    pet.merge()
    delta = weight.asnumpy().astype(np.float64) - before
    pet.unmerge()
    return delta


def test_weighted_combinations_match_numpy(tmp_path):
    pet = get_pet_model(GPTLike(), LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=4, lora_alpha=8),
                        adapter_name='a')
    pet.add_adapter('b', LoraConfig(target_modules=['q_proj', 'k_proj'], lora_rank=6, lora_alpha=3))
    rng = np.random.RandomState(2)
    for layer in pet.pet_layers.values():   # give both adapters random tensors through their live Parameters
        for param in (layer.mindpet_delta_lora_a, layer.mindpet_delta_lora_b):
            param.set_data(Tensor(rng.randn(*param.shape).astype(np.float32)))
    pet.set_adapter('b')
    for layer in pet.pet_layers.values():
        layer.mindpet_delta_lora_b.set_data(Tensor(rng.randn(*layer.mindpet_delta_lora_b.shape)
                                                   .astype(np.float32)))
    keys = ['blocks.0.attn.q_proj', 'blocks.0.attn.k_proj', 'blocks.0.attn.v_proj']
    inc = {}
    for name in 'ab':
        covered = [k for k in keys if k.rsplit('.', 1)[1] in pet.get_adapter_config(name).target_modules]
        for key in keys:
            inc[name, key] = _weight_increment(pet, name, key) if key in covered else 0.0
    weights = [0.5, -1.5]
    pet.add_weighted_adapter(['a', 'b'], weights, 'cat', combination_type='cat')
    pet.add_weighted_adapter(['a', 'b'], weights, 'svd_full', rank=10)
    pet.add_weighted_adapter(['a', 'b'], weights, 'svd')
    assert pet.get_adapter_config('cat').lora_rank == 10 and pet.get_adapter_config('svd').lora_rank == 6
    for key in keys:
        exact = weights[0] * inc['a', key] + weights[1] * inc['b', key]
        scale = np.abs(exact).max()
        for name in ('cat', 'svd_full'):
            np.testing.assert_allclose(_weight_increment(pet, name, key), exact, atol=1e-5 * scale)
        # Rank 6 < 10: the best rank-6 approximation (Eckart-Young): the error is the tail of the spectrum.
        approx = _weight_increment(pet, 'svd', key)
        tail = np.linalg.svd(exact, compute_uv=False)[6:]
        assert np.linalg.norm(approx - exact) == pytest.approx(np.sqrt((tail ** 2).sum()), rel=1e-3, abs=1e-4)
    # A combined adapter saves and loads like any other (its targets are the exact layer names).
    pet.save_pretrained(str(tmp_path), adapter_name='cat')
    reloaded = PetModel.from_pretrained(GPTLike(), str(tmp_path), adapter_name='cat')
    assert sorted(reloaded.pet_layers) == sorted(pet.pet_layers)     # q, k and v of both blocks
    for key in keys:
        np.testing.assert_allclose(_weight_increment(reloaded, 'cat', key), _weight_increment(pet, 'cat', key),
                                   atol=1e-6)


def test_adapter_management_errors(trained):
    pet = PetModel.from_pretrained(GPTLike(), trained.dir_a, adapter_name='shift')
    with pytest.raises(ValueError, match=r"adapter 'nope' does not exist; adapters: \['shift'\]"):
        pet.set_adapter('nope')
    with pytest.raises(ValueError, match="already exists"):
        pet.load_adapter(trained.dir_b, 'shift')
    with pytest.raises(ValueError, match="'weights' must be a list of 1 numbers"):
        pet.add_weighted_adapter(['shift'], [0.5, 0.5], 'mix')
    with pytest.raises(TypeError, match="'adapters' must be a non-empty list"):
        pet.add_weighted_adapter('shift', [1.0], 'mix')
    with pytest.raises(ValueError, match="combination_type"):
        pet.add_weighted_adapter(['shift'], [1.0], 'mix', combination_type='linear')
    with pytest.raises(ValueError, match="'cat' gives rank 4"):
        pet.add_weighted_adapter(['shift'], [1.0], 'mix', combination_type='cat', rank=3)
    with pytest.raises(TypeError, match="'is_trainable' must be a bool"):
        pet.load_adapter(trained.dir_b, 'double', is_trainable='yes')
    with pytest.raises(TypeError, match="'save_directory' must be a non-empty str"):
        pet.save_pretrained(None)
    with pet.disable_adapter():
        with pytest.raises(RuntimeError, match='already disabled'):
            with pet.disable_adapter():
                pass
    pet.load_adapter(trained.dir_b, 'double')
    pet.delete_adapter('double')
    assert pet.adapters == ['shift'] and pet.active_adapter == 'shift'


def test_an_adapter_of_another_method_is_refused(tmp_path, monkeypatch):
    import dataclasses  # pylint: disable=import-outside-toplevel
    from mindpet.tuners import register_method, registry  # pylint: disable=import-outside-toplevel
    from mindpet.tuners.lora import LoraTuner  # pylint: disable=import-outside-toplevel
    # The registration is undone after the test (a later test lists every registered method).
    monkeypatch.setattr(registry, '_METHODS', dict(registry._METHODS))  # pylint: disable=protected-access

    @dataclasses.dataclass
    class OtherLoraConfig(LoraConfig):
        pass

    register_method('lora_other_test', OtherLoraConfig, LoraTuner)
    other = get_pet_model(GPTLike(), OtherLoraConfig(target_modules=['q_proj'], lora_rank=2))
    other.save_pretrained(str(tmp_path))
    pet = get_pet_model(GPTLike(), LoraConfig(target_modules=['q_proj'], lora_rank=2))
    with pytest.raises(AdapterConfigError, match="is a 'lora_other_test' adapter; this PetModel holds 'lora'"):
        pet.load_adapter(str(tmp_path), 'other')
    # The adapter loads into a fresh model as its own method.
    loaded = PetModel.from_pretrained(GPTLike(), str(tmp_path))
    assert loaded.get_adapter_config().method == 'lora_other_test'
