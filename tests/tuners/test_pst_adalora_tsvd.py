"""PST, AdaLoRA and the t-SVD adapter through the lifecycle: configs (defaults, YAML, errors), injection by name
into tests/gpt_like.py, GRAPH_MODE training through PetModel with the training hook driving the sparsity schedule
or the rank allocator, save/load round trips, merging (in the compiled graph and by ``mindpet merge``) and
switching between adapters."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
import mindspore as ms
from mindspore import nn
from mindspore.train import Model
from safetensors.numpy import load_file

import mindpet
from mindpet import (PstConfig, AdaLoraConfig, TensorSVDConfig, PetModel, get_pet_model, config_from_dict,
                     config_from_yaml)
from mindpet.adapter_store import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, merge_into_checkpoint
from mindpet.delta.adalora import AdaLoRADense
from mindpet.delta.pst import PSTDense, cubic_sparsity, kept_count
from mindpet.delta.rank_allocation import cubic_budget
from mindpet.delta.tsvd import TSVDDense, tsvd_increments
from mindpet.tuners.tsvd import layer_groups
from mindpet.utils.exceptions import ModelConfigKeysInfoError

from tests.gpt_like import GPTLike, LMLoss, token_batch

TARGETS = ['q_proj', 'v_proj', 'fc_in']
LAYERS = [f'blocks.{b}.{name}' for b in (0, 1) for name in ('attn.q_proj', 'attn.v_proj', 'mlp.fc_in')]
STEPS = 16


def _configs():
    return {
        'pst': PstConfig(target_modules=TARGETS, r_w=4, r_m=4, final_sparsity=0.5, warmup_fraction=0.1,
                         cooldown_fraction=0.25, total_step=STEPS),
        'adalora': AdaLoraConfig(target_modules=TARGETS, init_r=4, target_r=2, lora_alpha=8, t_init=2, t_final=4,
                                 delta_t=2, orth_reg_weight=0.1, total_step=STEPS),
        'tsvd': TensorSVDConfig(target_modules=TARGETS, tsvd_rank=4, tsvd_alpha=8, target_rank=2, t_init=2,
                                t_final=4, orth_reg_weight=0.1, total_step=STEPS),
    }


METHODS = ['pst', 'adalora', 'tsvd']
LAYER_CLASS = {'pst': PSTDense, 'adalora': AdaLoRADense, 'tsvd': TSVDDense}


def _snapshot(net):
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def _is_pet(name):
    return 'mindpet_delta_' in name or 'mindpet_state_' in name


def _train(pet, steps=STEPS, lr=0.02, task='shift'):
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


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Each method trained once (GRAPH_MODE, hook active) from the same base, saved, with what was observed."""
    ms.set_context(mode=ms.GRAPH_MODE)
    root = tmp_path_factory.mktemp('methods')
    ids, _ = token_batch('shift', seed=3)
    base_net = GPTLike()
    base_out = base_net(ids).asnumpy()
    base_path = str(root / 'base.ckpt')
    ms.save_checkpoint(base_net, base_path)
    result = {}
    for method, config in _configs().items():
        pet = get_pet_model(GPTLike(), config)
        init_out = pet(ids).asnumpy()
        before = _snapshot(pet)
        # Adam moves each entry by about lr per step; t-SVD trains few singular-tube entries (k * L per group),
        # so its increment grows more slowly at the same lr.
        losses, hook, seen = _train(pet, lr=0.05 if method == 'tsvd' else 0.02)
        out = pet(ids).asnumpy()
        directory = str(root / method)
        pet.save_pretrained(directory)
        result[method] = SimpleNamespace(pet=pet, hook=hook, losses=losses, seen=seen, before=before,
                                         after=_snapshot(pet), out=out, init_out=init_out, dir=directory)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return SimpleNamespace(methods=result, ids=ids, base_out=base_out, base_path=base_path, root=root)


# ----- configs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('cls,method,defaults', [
    (PstConfig, 'pst', dict(r_w=8, r_m=8, initial_sparsity=0.0, final_sparsity=0.9, warmup_fraction=0.1,
                            cooldown_fraction=0.1, total_step=None)),
    (AdaLoraConfig, 'adalora', dict(init_r=12, target_r=8, lora_alpha=8, t_init=0, t_final=0, delta_t=1,
                                    beta1=0.85, beta2=0.85, orth_reg_weight=0.5, total_step=None,
                                    rank_pattern=None)),
    (TensorSVDConfig, 'tsvd', dict(tsvd_rank=8, tsvd_alpha=8, target_rank=4, group_by='name', t_init=0, t_final=0,
                                   delta_t=1, orth_reg_weight=0.5, total_step=None, rank_pattern=None)),
])
def test_configs_need_only_target_modules_and_read_from_yaml(tmp_path, cls, method, defaults):
    config = cls(target_modules=['q_proj'])
    for key, value in defaults.items():
        assert getattr(config, key) == value, key
    assert getattr(mindpet, cls.__name__) is cls and cls.__name__ in mindpet.__all__
    data = config.to_dict()
    assert data['type'] == method
    assert config_from_dict(data) == config
    path = tmp_path / 'job.yaml'
    path.write_text(yaml.safe_dump({'pet': dict(data, target_modules=['q_proj', 'v_proj'])}))
    loaded = config_from_yaml(str(path))
    assert type(loaded) is cls and loaded.target_modules == ['q_proj', 'v_proj']
    with pytest.raises(ValueError, match='target_modules'):
        cls()
    with pytest.raises(ModelConfigKeysInfoError, match='did you mean'):
        config_from_dict({'type': method, 'target_modules': ['q'], 'total_steps': 10})


@pytest.mark.parametrize('call,exc,fragments', [
    (lambda: PstConfig(target_modules=['q'], final_sparsity=1.0), ValueError, ['final_sparsity', '1.0']),
    (lambda: PstConfig(target_modules=['q'], r_w=0), ValueError, ['r_w', '0']),
    (lambda: PstConfig(target_modules=['q'], warmup_fraction=0.5, cooldown_fraction=0.5), ValueError,
     ['cooldown_fraction']),
    (lambda: PstConfig(target_modules=['q'], compute_dtype='float64'), ValueError, ['compute_dtype', 'float64']),
    (lambda: AdaLoraConfig(target_modules=['q'], init_r=4, target_r=5), ValueError, ['target_r', '5']),
    (lambda: AdaLoraConfig(target_modules=['q'], beta1=1.0), ValueError, ['beta1', '1.0']),
    (lambda: AdaLoraConfig(target_modules=['q'], t_init=5, t_final=5, total_step=10), ValueError, ['t_final']),
    (lambda: AdaLoraConfig(target_modules=['q'], orth_reg_weight=-1), ValueError, ['orth_reg_weight', '-1']),
    (lambda: AdaLoraConfig(target_modules=['q'], rank_pattern={'a': -1}), ValueError, ['rank_pattern', '-1']),
    (lambda: AdaLoraConfig(target_modules=['q'], rank_pattern=[1]), TypeError, ['rank_pattern']),
    (lambda: TensorSVDConfig(target_modules=['q'], group_by='block'), ValueError, ['group_by', 'block']),
    (lambda: TensorSVDConfig(target_modules=['q'], tsvd_rank=2.0), TypeError, ['tsvd_rank', '2.0']),
    (lambda: TensorSVDConfig(target_modules=['q'], tsvd_rank=2, target_rank=3), ValueError, ['target_rank', '3']),
    (lambda: TensorSVDConfig(target_modules=['q'], total_step=0), ValueError, ['total_step', '0']),
])
def test_config_errors_name_the_field_and_value(call, exc, fragments):
    with pytest.raises(exc) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


# ----- injection -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('method', METHODS)
def test_injection_replaces_matched_layers_keeping_base_parameters(method, tmp_path):
    net = GPTLike()
    before = {p.name: p for p in net.get_parameters()}
    pet = get_pet_model(net, _configs()[method])
    assert sorted(pet.pet_layers) == sorted(LAYERS)
    cells = dict(net.cells_and_names())
    for key in LAYERS:
        assert type(cells[key]) is LAYER_CLASS[method]  # pylint: disable=unidiomatic-typecheck
    after = {p.name: p for p in pet.get_parameters()}
    for name, param in before.items():
        assert after[name] is param
    added = sorted(set(after) - set(before))
    assert all(_is_pet(name) for name in added)
    trainable = sorted(p.name for p in pet.trainable_params())
    if method == 'pst':
        assert trainable == sorted(f'{k}.mindpet_delta_pst_{s}' for k in LAYERS for s in 'uvabrc')
    elif method == 'adalora':
        assert trainable == sorted(f'{k}.mindpet_delta_adalora_{s}' for k in LAYERS for s in ('p', 'lambda', 'q'))
    else:
        # One group per layer name across the blocks, named after its first layer.
        owners = [k for k in LAYERS if k.startswith('blocks.0.')]
        assert trainable == sorted(f'{k}.tsvd_group.mindpet_delta_tsvd_{s}' for k in owners for s in 'usv')
        assert cells['blocks.1.attn.q_proj'].tsvd_group is cells['blocks.0.attn.q_proj'].tsvd_group
        assert [cells[f'blocks.{b}.attn.q_proj'].tsvd_index for b in (0, 1)] == [0, 1]
        assert after['blocks.0.mlp.fc_in.tsvd_group.mindpet_delta_tsvd_u'].shape == (128, 4, 2)
    # A base checkpoint loads into the adapted model with nothing left over.
    path = str(tmp_path / 'base.ckpt')
    ms.save_checkpoint(GPTLike(seed=3), path)
    not_loaded, unused = ms.load_param_into_net(pet, ms.load_checkpoint(path))
    assert unused == [] and all(_is_pet(name) for name in not_loaded)


def test_tsvd_grouping_by_shape_and_the_group_rule():
    shapes = {'b.0.q': (8, 8), 'b.0.up': (16, 8), 'b.1.q': (8, 8), 'b.1.up': (16, 8), 'head': (8, 8)}
    keys = list(shapes)
    assert layer_groups(keys, shapes) == [['b.0.q', 'b.1.q'], ['b.0.up', 'b.1.up'], ['head']]
    assert layer_groups(keys, shapes, 'shape') == [['b.0.q', 'b.1.q', 'head'], ['b.0.up', 'b.1.up']]
    pet = get_pet_model(GPTLike(), TensorSVDConfig(target_modules=['q_proj', 'v_proj'], tsvd_rank=2, target_rank=1,
                                                   group_by='shape'))
    groups = {id(layer.tsvd_group) for layer in pet.pet_layers.values()}
    assert len(groups) == 1
    group = pet.pet_layers['blocks.0.attn.q_proj'].tsvd_group
    assert group.num_layers == 4 and group.mindpet_delta_tsvd_s.shape == (2, 4)
    order = ['blocks.0.attn.q_proj', 'blocks.0.attn.v_proj', 'blocks.1.attn.q_proj', 'blocks.1.attn.v_proj']
    assert [pet.pet_layers[k].tsvd_index for k in order] == [0, 1, 2, 3]
    assert group.mindpet_delta_tsvd_u.name == 'blocks.0.attn.q_proj.tsvd_group.mindpet_delta_tsvd_u'


@pytest.mark.parametrize('method,change,fragment', [
    ('pst', dict(r_w=2), 'r_w=4'),
    ('adalora', dict(init_r=6, target_r=2), 'init_r=4'),
    ('tsvd', dict(tsvd_rank=2, target_rank=1), 'tsvd_rank=4'),
    ('tsvd', dict(group_by='shape'), 'share a tensor'),
])
def test_second_adapter_must_fit_the_live_layers(method, change, fragment):
    pet = get_pet_model(GPTLike(), _configs()[method])
    with pytest.raises(ValueError, match=fragment):
        pet.add_adapter('other', _configs()[method].replace(**change))
    assert pet.adapters == ['default']


# ----- training through PetModel with the hook -------------------------------------------------------------------
@pytest.mark.parametrize('method', METHODS)
def test_training_hook_trains_in_graph_mode_and_freezes_the_base(trained, method):
    run = trained.methods[method]
    np.testing.assert_array_equal(run.init_out, trained.base_out)      # every method starts as the base model
    assert run.losses[-1] < 0.9 * run.losses[0], run.losses
    for name, value in run.before.items():
        if 'mindpet_delta_' in name:
            continue
        if name.endswith('mindpet_state_pst_sparsity'):
            assert float(run.after[name]) == 0.5
        else:
            np.testing.assert_array_equal(run.after[name], value, err_msg=name)   # W0 and the rest: untouched
    changed = [name for name in run.before if 'mindpet_delta_' in name
               and np.abs(run.after[name] - run.before[name]).max() > 0]
    assert len(changed) >= 0.5 * sum('mindpet_delta_' in name for name in run.before)


def test_pst_schedule_and_masks_after_training(trained):
    run = trained.methods['pst']
    want = [cubic_sparsity(i, STEPS, 0.0, 0.5, 0.1, 0.25) for i in range(STEPS)]
    assert run.seen == pytest.approx(want)
    report = run.hook.report()
    assert sorted(report) == sorted(LAYERS)
    for key, (kept, total, sparsity) in report.items():
        assert kept == kept_count(0.5, total) and sparsity == 0.5
        exported = run.pet.pet_layers[key].export_weight()
        assert int((exported == 0).sum()) == total - kept


@pytest.mark.parametrize('method', ['adalora', 'tsvd'])
def test_rank_allocation_follows_the_budget_and_prunes(trained, method):
    run = trained.methods[method]
    units = 6 * 4 if method == 'adalora' else 3 * 4          # initial singular values / tubes
    target = 6 * 2 if method == 'adalora' else 3 * 2
    want = [cubic_budget(i, STEPS, units, target, 2, 4, 2 if method == 'adalora' else 1)[0] for i in range(STEPS)]
    assert run.seen == want and want[0] == units and want[-1] == target
    pattern = run.hook.rank_pattern()
    assert sum(pattern.values()) == target
    for name, rank in pattern.items():
        if method == 'adalora':
            lam = run.after[f'{name}.mindpet_delta_adalora_lambda']
            assert np.count_nonzero(lam) == rank
        else:
            s = run.after[f'{name}.mindpet_delta_tsvd_s']
            assert np.count_nonzero(np.any(s != 0, axis=1)) == rank


def test_model_train_uses_the_hook_as_callback(graph_mode):
    pet = get_pet_model(GPTLike(), AdaLoraConfig(target_modules=['q_proj', 'v_proj'], init_r=2, target_r=1,
                                                 t_init=1, t_final=2))
    hook = pet.training_hook(total_steps=6)
    ids, labels = token_batch('shift')
    data = ms.dataset.NumpySlicesDataset({'ids': np.tile(ids.asnumpy(), (3, 1)),
                                          'labels': np.tile(labels.asnumpy(), (3, 1))}, shuffle=False).batch(8)
    budgets = []

    class _Record(ms.train.Callback):
        def on_train_step_end(self, run_context):
            budgets.append(hook.budget)

    model = Model(hook.train_network(LMLoss(pet), nn.Adam(pet.trainable_params(), 0.01)))
    model.train(2, data, callbacks=[hook, _Record()], dataset_sink_mode=False)
    assert budgets == [cubic_budget(i, 6, 8, 4, 1, 2)[0] for i in range(6)]
    assert sum(hook.rank_pattern().values()) == 4
    assert sum(layer.rank for layer in pet.pet_layers.values()) == 4
    with pytest.raises(ValueError, match='total_step'):
        pet.training_hook()


# ----- save / load, switching, merging (one loaded model per method: its graph compiles once) ---------------------
@pytest.mark.parametrize('method', METHODS)
def test_saved_adapter_loads_exactly_switches_and_merges(trained, method, graph_mode, tmp_path):
    run = trained.methods[method]
    ids = trained.ids
    # The file holds exactly the adapter's live tensors (PST: and each layer's sparsity), nothing else.
    tensors = load_file(os.path.join(run.dir, ADAPTER_WEIGHTS_NAME))
    live = {name: value for name, value in run.after.items() if 'mindpet_delta_' in name}
    if method == 'pst':
        live.update({n: v.reshape(()) for n, v in run.after.items() if n.endswith('mindpet_state_pst_sparsity')})
    assert sorted(tensors) == sorted(live)
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, live[name], err_msg=name)
    meta = yaml.safe_load(open(os.path.join(run.dir, ADAPTER_CONFIG_NAME)))
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
    pet.add_adapter('fresh', _configs()[method])
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
    if method == 'pst':
        # The weight becomes the sparse export M * (W0 + U V).
        for key, weight in merged.items():
            assert int((weight == 0).sum()) == weight.size - kept_count(0.5, weight.size)
    elif method == 'adalora':
        for key, layer in pet.pet_layers.items():
            np.testing.assert_allclose(merged[key], w0[key] + layer.delta_weight(), atol=1e-6)
    else:
        for first in ('blocks.0.attn.q_proj', 'blocks.0.attn.v_proj', 'blocks.0.mlp.fc_in'):
            get = lambda s, first=first: tensors[f'{first}.tsvd_group.mindpet_delta_tsvd_{s}']  # noqa: E731
            increments = tsvd_increments(get('u'), get('s'), get('v'), 8 / 4)
            for index in (0, 1):
                key = first.replace('blocks.0', f'blocks.{index}')
                np.testing.assert_allclose(merged[key], w0[key] + increments[:, :, index], atol=1e-6)
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


def test_every_method_gets_a_hook_lora_a_plain_train_step(graph_mode, tmp_path):
    pet = get_pet_model(GPTLike(), mindpet.LoraConfig(target_modules=['q_proj'], lora_rank=2))
    hook = pet.training_hook()                       # no schedule: total_steps not needed
    step = hook.train_network(LMLoss(pet), nn.Adam(pet.trainable_params(), 0.01))
    assert type(step) is nn.TrainOneStepCell  # pylint: disable=unidiomatic-typecheck
    ids, labels = token_batch('shift')
    hook.before_step(0)
    outputs = step(ids, labels)
    hook.after_step(0, outputs)
    assert hook.loss(outputs) is outputs
    pet.save_pretrained(str(tmp_path / 'lora'))
    loaded = PetModel.from_pretrained(GPTLike(), str(tmp_path / 'lora'))
    with pytest.raises(ValueError, match='not trainable'):
        loaded.training_hook()
    ada = get_pet_model(GPTLike(), AdaLoraConfig(target_modules=['q_proj'], init_r=2, target_r=1))
    with pytest.raises(ValueError, match="'total_steps' or set 'total_step'"):
        ada.training_hook()
    with pytest.raises(TypeError, match='total_steps'):
        ada.training_hook(total_steps=2.5)
    rank_hook = ada.training_hook(total_steps=4)
    with pytest.raises(TypeError, match='outputs'):
        rank_hook.after_step(0, 1.0)


def test_the_allocator_works_on_the_active_adapters_layers_only():
    pet = get_pet_model(GPTLike(), AdaLoraConfig(target_modules=['q_proj'], init_r=4, target_r=2))
    pet.add_adapter('other', AdaLoraConfig(target_modules=['v_proj', 'fc_in'], init_r=4, target_r=1))
    pet.set_adapter('other')
    allocator = pet.training_hook(total_steps=10).allocator
    assert [name for name, _ in allocator.layers] == ['blocks.0.attn.v_proj', 'blocks.0.mlp.fc_in',
                                                      'blocks.1.attn.v_proj', 'blocks.1.mlp.fc_in']
    assert (allocator.init_budget, allocator.target_budget) == (16, 4)
