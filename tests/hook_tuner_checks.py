"""Checks shared by the methods whose training needs the training hook (PST's sparsity schedule, the rank
allocator of AdaLoRA and t-SVD), used by tests/tuners/test_pst.py, test_adalora.py and test_tsvd.py.

Each module trains its method once (:func:`train_once`: GRAPH_MODE, hook active, saved) from tests/gpt_like.py's
GPTLike and runs the ``check_*`` functions on it; what only one method does (its trainable names, what merging
writes) is passed in by the module.
"""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
import mindspore as ms
from mindspore import nn
from safetensors.numpy import load_file

import mindpet
from mindpet import (PstConfig, AdaLoraConfig, TensorSVDConfig, PetModel, get_pet_model, config_from_dict,
                     config_from_yaml)
from mindpet.adapter_store import ADAPTER_CONFIG_NAME, adapter_weights_path, merge_into_checkpoint
from mindpet.delta.adalora import AdaLoRADense
from mindpet.delta.pst import PSTDense
from mindpet.delta.rank_allocation import cubic_budget
from mindpet.delta.tsvd import TSVDDense
from mindpet.utils.exceptions import ModelConfigKeysInfoError

from tests.gpt_like import GPTLike, LMLoss, token_batch

TARGETS = ['q_proj', 'v_proj', 'fc_in']
LAYERS = [f'blocks.{b}.{name}' for b in (0, 1) for name in ('attn.q_proj', 'attn.v_proj', 'mlp.fc_in')]
STEPS = 16
# t-SVD trains few singular-tube entries and its budget falls to the target early; measured on this machine's
# kernels, 16 steps took the loss only to 0.903 of its start (32 steps: 0.836), so it trains for longer.
METHOD_STEPS = {'pst': STEPS, 'adalora': STEPS, 'tsvd': 2 * STEPS}
LAYER_CLASS = {'pst': PSTDense, 'adalora': AdaLoRADense, 'tsvd': TSVDDense}


def config(method):
    """The config every check of ``method`` uses (schedules over ``METHOD_STEPS[method]`` steps)."""
    steps = METHOD_STEPS[method]
    if method == 'pst':
        return PstConfig(target_modules=TARGETS, r_w=4, r_m=4, final_sparsity=0.5, warmup_fraction=0.1,
                         cooldown_fraction=0.25, total_step=steps)
    if method == 'adalora':
        return AdaLoraConfig(target_modules=TARGETS, init_r=4, target_r=2, lora_alpha=8, t_init=2, t_final=4,
                             delta_t=2, orth_reg_weight=0.1, total_step=steps)
    return TensorSVDConfig(target_modules=TARGETS, tsvd_rank=4, tsvd_alpha=8, target_rank=2, t_init=2,
                           t_final=4, orth_reg_weight=0.1, total_step=steps)


def snapshot(net):
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def is_pet(name):
    return 'mindpet_delta_' in name or 'mindpet_state_' in name


def train_with_hook(pet, steps=STEPS, lr=0.02, task='shift'):
    """GRAPH_MODE training of the active adapter through the training hook; returns (losses, hook, seen) where
    ``seen`` records the schedule's state at every step."""
    ids, labels = token_batch(task)
    hook = pet.training_hook()
    step = hook.train_network(LMLoss(pet), nn.Adam(pet.trainable_params(), learning_rate=lr))
    step.set_train()
    losses, seen = [], []
    for i in range(steps):
        hook.before_step(i)
        outputs = step(ids, labels)
        hook.after_step(i, outputs)
        losses.append(float(hook.loss(outputs).asnumpy()))
        # PST: the sparsity the step ran at; AdaLoRA / t-SVD: the budget after the step's allocation.
        seen.append(hook.budget if hasattr(hook, 'budget') else pet.pet_layers[LAYERS[0]].sparsity)
    pet.set_train(False)
    return losses, hook, seen


def train_once(method, root):
    """``method`` trained once (GRAPH_MODE, hook active) from the base GPTLike, saved under ``root``, with what was
    observed (``run``) and the base model's output and checkpoint."""
    ms.set_context(mode=ms.GRAPH_MODE)
    ids, _ = token_batch('shift', seed=3)
    base_net = GPTLike()
    base_out = base_net(ids).asnumpy()
    base_path = os.path.join(root, 'base.ckpt')
    ms.save_checkpoint(base_net, base_path)
    pet = get_pet_model(GPTLike(), config(method))
    init_out = pet(ids).asnumpy()
    before = snapshot(pet)
    # Adam moves each entry by about lr per step; t-SVD trains few singular-tube entries (k * L per group),
    # so its increment grows more slowly at the same lr.
    losses, hook, seen = train_with_hook(pet, steps=METHOD_STEPS[method], lr=0.05 if method == 'tsvd' else 0.02)
    out = pet(ids).asnumpy()
    directory = os.path.join(root, method)
    pet.save_pretrained(directory)
    run = SimpleNamespace(pet=pet, hook=hook, losses=losses, seen=seen, before=before, after=snapshot(pet), out=out,
                          init_out=init_out, dir=directory)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return SimpleNamespace(method=method, run=run, ids=ids, base_out=base_out, base_path=base_path)


def check_config_defaults_and_yaml(tmp_path, cls, method, defaults):
    """Only target_modules is required; the defaults; the dict and YAML round trips; misspelt keys are named."""
    cfg = cls(target_modules=['q_proj'])
    for key, value in defaults.items():
        assert getattr(cfg, key) == value, key
    assert getattr(mindpet, cls.__name__) is cls and cls.__name__ in mindpet.__all__
    data = cfg.to_dict()
    assert data['type'] == method
    assert config_from_dict(data) == cfg
    path = tmp_path / 'job.yaml'
    path.write_text(yaml.safe_dump({'pet': dict(data, target_modules=['q_proj', 'v_proj'])}))
    loaded = config_from_yaml(str(path))
    assert type(loaded) is cls and loaded.target_modules == ['q_proj', 'v_proj']
    with pytest.raises(ValueError, match='target_modules'):
        cls()
    with pytest.raises(ModelConfigKeysInfoError, match='did you mean'):
        config_from_dict({'type': method, 'target_modules': ['q'], 'total_steps': 10})


def check_config_error(call, exc, fragments):
    with pytest.raises(exc) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def check_injection(method, tmp_path, trainable_names):
    """The matched layers are replaced by the method's layer, every base Parameter is kept (the same object), the
    added Parameters are PET ones, exactly ``trainable_names`` train, and a base checkpoint loads with nothing left
    over. Returns (pet, cells by name, parameters by name) for the method's own checks."""
    net = GPTLike()
    before = {p.name: p for p in net.get_parameters()}
    pet = get_pet_model(net, config(method))
    assert sorted(pet.pet_layers) == sorted(LAYERS)
    cells = dict(net.cells_and_names())
    for key in LAYERS:
        assert type(cells[key]) is LAYER_CLASS[method]  # pylint: disable=unidiomatic-typecheck
    after = {p.name: p for p in pet.get_parameters()}
    for name, param in before.items():
        assert after[name] is param
    added = sorted(set(after) - set(before))
    assert all(is_pet(name) for name in added)
    assert sorted(p.name for p in pet.trainable_params()) == sorted(trainable_names)
    path = str(tmp_path / 'base.ckpt')
    ms.save_checkpoint(GPTLike(seed=3), path)
    not_loaded, unused = ms.load_param_into_net(pet, ms.load_checkpoint(path))
    assert unused == [] and all(is_pet(name) for name in not_loaded)
    return pet, cells, after


def check_second_adapter_must_fit(method, change, fragment):
    pet = get_pet_model(GPTLike(), config(method))
    with pytest.raises(ValueError, match=fragment):
        pet.add_adapter('other', config(method).replace(**change))
    assert pet.adapters == ['default']


def check_training_trains_only_the_adapter(trained):
    """Starts as the base model, the loss falls, W0 and the rest are bit-identical, most delta tensors moved."""
    run = trained.run
    np.testing.assert_array_equal(run.init_out, trained.base_out)
    assert run.losses[-1] < 0.9 * run.losses[0], run.losses
    for name, value in run.before.items():
        if 'mindpet_delta_' in name:
            continue
        if name.endswith('mindpet_state_pst_sparsity'):
            assert float(run.after[name]) == 0.5
        else:
            np.testing.assert_array_equal(run.after[name], value, err_msg=name)
    changed = [name for name in run.before if 'mindpet_delta_' in name
               and np.abs(run.after[name] - run.before[name]).max() > 0]
    assert len(changed) >= 0.5 * sum('mindpet_delta_' in name for name in run.before)


def check_rank_allocation(trained, units, target, delta_t, live_rank):
    """The budget after every step follows the cubic schedule from ``units`` to ``target``; the final rank pattern
    spends exactly the target and each layer keeps ``live_rank(after, name)`` non-zero ranks."""
    run = trained.run
    steps = METHOD_STEPS[trained.method]
    want = [cubic_budget(i, steps, units, target, 2, 4, delta_t)[0] for i in range(steps)]
    assert run.seen == want and want[0] == units and want[-1] == target
    pattern = run.hook.rank_pattern()
    assert sum(pattern.values()) == target
    for name, rank in pattern.items():
        assert live_rank(run.after, name) == rank, name


def check_saved_adapter_loads_switches_and_merges(trained, tmp_path, check_merged):
    """The saved file holds exactly the live tensors; loading reproduces the output; switching and disabling are
    exact; merge/unmerge in the compiled graph keep the output (``check_merged(pet, merged, w0, tensors)`` checks
    the merged weights against the method's formula); ``mindpet merge`` writes the same weights; merge_and_unload
    leaves no method layer. Needs GRAPH_MODE."""
    method, run, ids = trained.method, trained.run, trained.ids
    tensors = load_file(adapter_weights_path(run.dir))
    live = {name: value for name, value in run.after.items() if 'mindpet_delta_' in name}
    if method == 'pst':
        live.update({n: v.reshape(()) for n, v in run.after.items() if n.endswith('mindpet_state_pst_sparsity')})
    assert sorted(tensors) == sorted(live)
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, live[name], err_msg=name)
    with open(os.path.join(run.dir, ADAPTER_CONFIG_NAME)) as handle:
        meta = yaml.safe_load(handle)
    assert meta['pet']['type'] == method and meta['target_layers'] == LAYERS
    if method in ('adalora', 'tsvd'):
        assert meta['pet']['rank_pattern'] == run.hook.rank_pattern()

    pet = PetModel.from_pretrained(GPTLike(), run.dir, adapter_name='trained')
    np.testing.assert_array_equal(pet(ids).asnumpy(), run.out)
    assert pet.trainable_params() == []
    if method == 'pst':
        assert all(layer.sparsity == 0.5 for layer in pet.pet_layers.values())
    cache = len(pet.compile_cache)

    # Switching: a fresh adapter is the base function; back and forth and disabling are exact.
    pet.add_adapter('fresh', config(method))
    pet.set_adapter('fresh')
    np.testing.assert_array_equal(pet(ids).asnumpy(), trained.base_out)
    pet.set_adapter('trained')
    np.testing.assert_array_equal(pet(ids).asnumpy(), run.out)
    with pet.disable_adapter():
        np.testing.assert_array_equal(pet(ids).asnumpy(), trained.base_out)
    np.testing.assert_array_equal(pet(ids).asnumpy(), run.out)

    # Merging in the compiled graph.
    w0 = {key: layer.weight.asnumpy().copy() for key, layer in pet.pet_layers.items()}
    pet.merge()
    np.testing.assert_allclose(pet(ids).asnumpy(), run.out, atol=1e-4, rtol=1e-4)
    merged = {key: layer.weight.asnumpy().copy() for key, layer in pet.pet_layers.items()}
    check_merged(pet, merged, w0, tensors)
    pet.unmerge()
    for key, layer in pet.pet_layers.items():
        if method == 'pst':
            np.testing.assert_array_equal(layer.weight.asnumpy(), w0[key])    # restored from the host copy
        else:
            np.testing.assert_allclose(layer.weight.asnumpy(), w0[key], atol=1e-6)
    np.testing.assert_allclose(pet(ids).asnumpy(), run.out, atol=1e-5)
    assert len(pet.compile_cache) == cache     # switching, merging, unmerging: Parameter data only

    # `mindpet merge` writes the same weights into a base checkpoint, without model code.
    out_path = str(tmp_path / 'merged.ckpt')
    merge_into_checkpoint(trained.base_path, run.dir, out_path)
    cli = ms.load_checkpoint(out_path)
    for key, weight in merged.items():
        np.testing.assert_allclose(cli[f'{key}.weight'].asnumpy(), weight, atol=1e-5)
    plain = pet.merge_and_unload()
    assert not any(isinstance(c, LAYER_CLASS[method]) for _, c in plain.cells_and_names())
    np.testing.assert_allclose(plain(ids).asnumpy(), run.out, atol=1e-4, rtol=1e-4)
