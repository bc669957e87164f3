"""Injection by name into a model written without mindpet (tests/gpt_like.py), configs and the method registry."""
import dataclasses

import numpy as np
import pytest
import yaml
import mindspore as ms
from mindspore import nn, Tensor

import mindpet
from mindpet import LoraConfig, PetConfig, PetModel, get_pet_model, config_from_dict, config_from_yaml
from mindpet.delta import LoRADense
from mindpet.tuners import BaseTuner, register_method, get_method, name_matches
from mindpet.utils.exceptions import ModelConfigKeysInfoError, ModelConfigParamsInfoError
from mindpet.utils.io_utils import load_params_checked

from tests.gpt_like import GPTLike, token_batch, train

QV = ['q_proj', 'v_proj']
QV_LAYERS = ['blocks.0.attn.q_proj', 'blocks.0.attn.v_proj', 'blocks.1.attn.q_proj', 'blocks.1.attn.v_proj']


def _types(net):
    return {name: type(cell) for name, cell in net.cells_and_names()}


def _randomise_lora(pet, seed=0):
    rng = np.random.RandomState(seed)
    for layer in pet.pet_layers.values():
        shape = layer.mindpet_delta_lora_b.shape
        layer.mindpet_delta_lora_b.set_data(Tensor(rng.randn(*shape).astype(np.float32) * 0.1))


def test_only_matched_layers_change_type_and_parameters_are_the_originals():
    net = GPTLike()
    before_types = _types(net)
    before_params = {p.name: p for p in net.get_parameters()}
    pet = get_pet_model(net, LoraConfig(target_modules=QV, lora_rank=4, lora_alpha=8))
    after_types = _types(net)
    # Only the LoRA layers' own sub-Cells (their dropout) are new.
    assert sorted(set(after_types) - set(before_types)) == [f'{layer}.lora_dropout' for layer in QV_LAYERS]
    assert set(before_types) <= set(after_types)
    changed = sorted(name for name in before_types if after_types[name] is not before_types[name])
    assert changed == QV_LAYERS
    assert all(after_types[name] is LoRADense for name in changed)
    assert all(before_types[name] is nn.Dense for name in changed)
    assert pet.base_model is net
    after_params = {p.name: p for p in pet.get_parameters()}
    # The same Parameter objects under the same names (no copy, no re-init); only LoRA parameters are new.
    for name, param in before_params.items():
        assert after_params[name] is param
    added = sorted(set(after_params) - set(before_params))
    assert added == sorted(f'{layer}.{suffix}' for layer in QV_LAYERS for suffix in
                           ('mindpet_delta_lora_a', 'mindpet_delta_lora_b', 'mindpet_state_lora_scaling'))
    assert after_params['blocks.0.attn.q_proj.mindpet_delta_lora_a'].shape == (4, 32)
    assert after_params['blocks.0.attn.q_proj.mindpet_delta_lora_b'].shape == (32, 4)
    assert [p.name for p in pet.trainable_params()] == [
        f'{layer}.{suffix}' for layer in QV_LAYERS for suffix in ('mindpet_delta_lora_a', 'mindpet_delta_lora_b')]


def test_base_checkpoint_loads_with_nothing_left_over(tmp_path):
    pretrained = GPTLike(seed=7)
    path = str(tmp_path / 'base.ckpt')
    ms.save_checkpoint(pretrained, path)
    pet = get_pet_model(GPTLike(seed=0), LoraConfig(target_modules=QV, lora_rank=4))
    params = ms.load_checkpoint(path)
    param_not_load, ckpt_not_load = ms.load_param_into_net(pet, params, strict_load=True)
    assert ckpt_not_load == []
    assert all('mindpet_delta_lora_' in n or 'mindpet_state_lora_' in n for n in param_not_load)
    assert len(param_not_load) == 3 * len(QV_LAYERS)
    loaded = load_params_checked(pet, ms.load_checkpoint(path), path)
    assert loaded == sorted(p.name for p in pretrained.get_parameters())
    expected = {p.name: p.asnumpy() for p in pretrained.get_parameters()}
    for param in pet.get_parameters():
        if param.name in expected:
            np.testing.assert_array_equal(param.asnumpy(), expected[param.name])


def test_outputs_equal_base_at_init_and_lora_acts_after_compilation(ms_mode):
    ids, _ = token_batch('shift')
    base_out = GPTLike()(ids).asnumpy()
    net = GPTLike()
    pet = get_pet_model(net, LoraConfig(target_modules=QV, lora_rank=4, lora_alpha=8))
    np.testing.assert_array_equal(pet(ids).asnumpy(), base_out)
    # The graph has run: a change of Parameter data (B) must show, and match a reference network that has the
    # same weights folded into plain Dense layers.
    _randomise_lora(pet)
    out = pet(ids).asnumpy()
    assert np.abs(out - base_out).max() > 1e-2
    ref = GPTLike()
    for key, layer in pet.pet_layers.items():
        dense = ref.blocks[int(key.split('.')[1])].attn
        dense = getattr(dense, key.rsplit('.', 1)[1])
        dense.weight.set_data(Tensor(layer.weight.asnumpy() + layer.delta_weight()))
    np.testing.assert_allclose(out, ref(ids).asnumpy(), atol=1e-5, rtol=1e-5)


def test_model_compiled_before_injection_runs_the_new_graph(graph_mode):
    net = GPTLike()
    ids, _ = token_batch('shift')
    base_out = net(ids).asnumpy()          # the base network's own graph is compiled first
    pet = get_pet_model(net, LoraConfig(target_modules=QV, lora_rank=4))
    _randomise_lora(pet)
    lora_out = pet(ids).asnumpy()
    assert np.abs(lora_out - base_out).max() > 1e-2
    # Calling the base network itself also runs the adapted graph (mindpet drops its stale compiled graph).
    np.testing.assert_allclose(net(ids).asnumpy(), lora_out, atol=1e-6)


@pytest.mark.parametrize('targets,exclude,expected', [
    ([r'blocks\.0\.attn\.[qv]_proj'], None, QV_LAYERS[:2]),
    (['attn.q_proj'], None, ['blocks.0.attn.q_proj', 'blocks.1.attn.q_proj']),
    (QV, ['blocks.1.attn.q_proj'], ['blocks.0.attn.q_proj', 'blocks.0.attn.v_proj', 'blocks.1.attn.v_proj']),
    (r'.*mlp\.fc_(in|out)', None, ['blocks.0.mlp.fc_in', 'blocks.0.mlp.fc_out', 'blocks.1.mlp.fc_in',
                                   'blocks.1.mlp.fc_out']),
])
def test_regex_suffix_and_exclude_matching(targets, exclude, expected):
    pet = get_pet_model(GPTLike(), LoraConfig(target_modules=targets, exclude_modules=exclude, lora_rank=2))
    assert sorted(pet.pet_layers) == expected
    assert pet.pet_layers[expected[0]].mindpet_delta_lora_a.name == expected[0] + '.mindpet_delta_lora_a'


def test_name_matching_rule():
    assert name_matches('blocks.0.attn.q_proj', 'q_proj')
    assert name_matches('blocks.0.attn.q_proj', 'attn.q_proj')
    assert not name_matches('blocks.0.attn.q_proj', 'proj')          # suffixes are whole name components
    assert not name_matches('blocks.0.attn.q_proj', 'blocks.0')      # a regex must match the whole name
    assert name_matches('blocks.0.attn.q_proj', r'blocks\.\d+\.attn\.q_proj')


def test_config_matching_nothing_lists_patterns_and_candidates():
    with pytest.raises(ValueError) as info:
        get_pet_model(GPTLike(), LoraConfig(target_modules=['query', 'value']))
    message = str(info.value)
    assert "['query', 'value']" in message
    assert 'blocks.0.attn.q_proj' in message and 'lm_head' in message
    # A pattern that selects only non-Dense cells says so.
    with pytest.raises(ValueError, match=r"cannot adapt: \['blocks.0.attn \(Attention\)"):
        get_pet_model(GPTLike(), LoraConfig(target_modules=[r'blocks\.\d\.attn']))


def test_modules_to_save_stay_trainable_and_everything_else_frozen_during_training(graph_mode):
    net = GPTLike()
    pet = get_pet_model(net, LoraConfig(target_modules=QV, lora_rank=4, modules_to_save=['lm_head']))
    trainable = sorted(p.name for p in pet.trainable_params())
    assert trainable == sorted([f'{layer}.mindpet_delta_lora_{x}' for layer in QV_LAYERS for x in 'ab']
                               + ['lm_head.weight'])
    before = {p.name: p.asnumpy().copy() for p in pet.get_parameters()}
    losses = train(pet, 'shift', steps=4)
    assert losses[-1] < losses[0]
    after = {p.name: p.asnumpy() for p in pet.get_parameters()}
    for name in before:
        if name in trainable and not name.endswith('lora_a'):
            assert not np.array_equal(before[name], after[name]), name
        elif name not in trainable:
            np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def test_print_trainable_parameters(capsys):
    pet = get_pet_model(GPTLike(), LoraConfig(target_modules=QV, lora_rank=4))
    base_total = sum(int(np.prod(p.shape)) for p in GPTLike().get_parameters())
    trainable, total, percent = pet.print_trainable_parameters()
    assert trainable == 4 * 4 * (32 + 32)
    assert total == base_total + trainable
    assert percent == pytest.approx(100.0 * trainable / total)
    assert capsys.readouterr().out.strip() == (f"trainable params: {trainable:,} || all params: {total:,} || "
                                               f"trainable%: {percent:.4f}")
    # The runner's counts come from the same function (state Parameters such as the LoRA scaling excluded).
    from mindpet.model import parameter_counts  # pylint: disable=import-outside-toplevel
    assert any('mindpet_state_' in p.name for p in pet.get_parameters())
    assert parameter_counts(pet.base_model) == (trainable, total)


class _Seq(nn.Cell):
    def __init__(self):
        super().__init__()
        self.body = nn.SequentialCell([nn.Dense(8, 8), nn.ReLU(), nn.Dense(8, 4)])
        shared = nn.Dense(4, 4)
        self.left = shared
        self.right = shared

    def construct(self, x):
        h = self.body(x)
        return self.left(h) + self.right(h)


def test_sequential_children_and_shared_cells_are_replaced_everywhere(graph_mode):
    net = _Seq()
    x = Tensor(np.random.RandomState(0).randn(3, 8).astype(np.float32))
    base = net(x).asnumpy()
    pet = get_pet_model(net, LoraConfig(target_modules=[r'body\.0', 'left'], lora_rank=2))
    # Layers are keyed by their parameters' names: the shared cell's are 'right.*' (MindSpore names a shared
    # cell's parameters after the attribute assigned last).
    assert sorted(pet.pet_layers) == ['body.0', 'right'] and net.left.weight.name == 'right.weight'
    assert net.left is net.right and isinstance(net.right, LoRADense)
    assert isinstance(net.body[0], LoRADense) and net.body.cell_list[0] is net.body[0]
    np.testing.assert_array_equal(pet(x).asnumpy(), base)
    _randomise_lora(pet)
    w0 = net.body[0].weight.asnumpy() + net.body[0].delta_weight()
    h = np.maximum(x.asnumpy() @ w0.T + net.body[0].bias.asnumpy(), 0) @ net.body[2].weight.asnumpy().T \
        + net.body[2].bias.asnumpy()
    shared = net.left.weight.asnumpy() + net.left.delta_weight()
    ref = 2 * (h @ shared.T + net.left.bias.asnumpy())
    np.testing.assert_allclose(pet(x).asnumpy(), ref, atol=1e-5)


def test_refuses_bad_arguments_and_double_injection():
    with pytest.raises(TypeError, match="'model' must be a mindspore.nn.Cell"):
        get_pet_model('net', LoraConfig(target_modules=QV))
    with pytest.raises(TypeError, match="'config' must be a PetConfig"):
        get_pet_model(GPTLike(), {'type': 'lora'})
    with pytest.raises(ValueError, match="'adapter_name'"):
        get_pet_model(GPTLike(), LoraConfig(target_modules=QV), adapter_name='a b')
    net = GPTLike()
    pet = get_pet_model(net, LoraConfig(target_modules=QV))
    with pytest.raises(ValueError, match="already has PET parameters"):
        get_pet_model(net, LoraConfig(target_modules=['k_proj']))
    with pytest.raises(TypeError, match="already a PetModel"):
        get_pet_model(pet, LoraConfig(target_modules=['k_proj']))
    with pytest.raises(ValueError, match="modules_to_save"):
        get_pet_model(GPTLike(), LoraConfig(target_modules=QV, modules_to_save=['classifier']))


# ----- configs --------------------------------------------------------------------------------------------------
def test_config_round_trip_and_yaml_section(tmp_path):
    cfg = LoraConfig(target_modules='q_proj', lora_rank=4, lora_alpha=8.0, lora_dropout=0.1,
                     modules_to_save=['lm_head'], compute_dtype='float16')
    data = cfg.to_dict()
    assert data == {'type': 'lora', 'target_modules': ['q_proj'], 'exclude_modules': None,
                    'modules_to_save': ['lm_head'], 'lora_rank': 4, 'lora_alpha': 8.0, 'lora_dropout': 0.1,
                    'compute_dtype': 'float16', 'use_dora': False, 'dora_detach_norm': True, 'use_rslora': False,
                    'init_lora_weights': True, 'rank_pattern': None, 'alpha_pattern': None,
                    'layers_to_transform': None, 'layers_pattern': None}
    assert config_from_dict(data) == cfg and LoraConfig.from_dict(data) == cfg
    path = tmp_path / 'job.yaml'
    path.write_text(yaml.safe_dump({'model': {'hidden': 32}, 'pet': data}))
    assert config_from_yaml(str(path)) == cfg
    path.write_text(yaml.safe_dump({'model': {}}))
    with pytest.raises(ModelConfigKeysInfoError, match="no 'pet' section"):
        config_from_yaml(str(path))


def test_config_errors_name_the_key_and_suggest():
    with pytest.raises(ModelConfigKeysInfoError, match=r"'lora_rnak'.*did you mean 'lora_rank'"):
        config_from_dict({'type': 'lora', 'target_modules': ['q'], 'lora_rnak': 4})
    with pytest.raises(ModelConfigKeysInfoError, match=r"'targets'.*did you mean 'target_modules'"):
        config_from_dict({'type': 'lora', 'targets': ['q']})
    with pytest.raises(ModelConfigKeysInfoError, match="needs a 'type' key"):
        config_from_dict({'target_modules': ['q']})
    with pytest.raises(ValueError, match=r"'lroa' \(did you mean 'lora'\?\)"):
        config_from_dict({'type': 'lroa', 'target_modules': ['q']})
    with pytest.raises(ModelConfigParamsInfoError, match='mapping'):
        config_from_dict(['lora'])
    with pytest.raises(TypeError, match=r"'lora_rank' must be a positive int, but got 4.0"):
        config_from_dict({'type': 'lora', 'target_modules': ['q'], 'lora_rank': 4.0})
    with pytest.raises(ValueError, match=r"'lora_dropout' must be a float in \[0.0, 1.0\), but got 1.5"):
        LoraConfig(target_modules=['q'], lora_dropout=1.5)
    assert LoraConfig(target_modules=['q'], lora_dropout=0).lora_dropout == 0.0   # YAML's 'lora_dropout: 0'
    with pytest.raises(TypeError, match="'lora_dropout' must be a float"):
        LoraConfig(target_modules=['q'], lora_dropout=True)
    with pytest.raises(ValueError, match="'lora_alpha' must be a non-zero"):
        LoraConfig(target_modules=['q'], lora_alpha=0)
    with pytest.raises(ValueError, match="'target_modules' must be a non-empty list"):
        LoraConfig()
    with pytest.raises(TypeError, match="every item of 'target_modules' must be a str"):
        LoraConfig(target_modules=['q', 3])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        LoraConfig(target_modules=['q_proj('])
    with pytest.raises(ValueError, match="'compute_dtype' must be one of"):
        LoraConfig(target_modules=['q'], compute_dtype='fp16')


@dataclasses.dataclass
class _ScaleConfig(PetConfig):
    gain: float = 1.0


class _ScaleTuner(BaseTuner):
    """A toy method for the registry test: it adapts nothing by itself (inject is overridden)."""

    def inject(self, model, config, layers):
        return [], False


def test_register_method_plugs_a_new_method_in():
    register_method('toyscale', _ScaleConfig, _ScaleTuner)
    assert get_method('toyscale') == (_ScaleConfig, _ScaleTuner)
    cfg = config_from_dict({'type': 'toyscale', 'gain': 2.0})
    assert isinstance(cfg, _ScaleConfig) and cfg.to_dict() == {
        'type': 'toyscale', 'target_modules': None, 'exclude_modules': None, 'modules_to_save': None, 'gain': 2.0}
    assert 'toyscale' in mindpet.tuners.available_methods()
    with pytest.raises(ValueError, match='already registered'):
        register_method('toyscale', LoraConfig, _ScaleTuner)
    with pytest.raises(TypeError, match='config_class'):
        register_method('other', dict, _ScaleTuner)
    with pytest.raises(TypeError, match='tuner_class'):
        register_method('other', _ScaleConfig, object)
    with pytest.raises(ValueError, match='lower-case identifier'):
        register_method('Bad Name', _ScaleConfig, _ScaleTuner)


def test_public_names_exported():
    for name in ('LoraConfig', 'PetConfig', 'get_pet_model', 'PetModel', 'config_from_dict', 'config_from_yaml',
                 'register_method'):
        assert name in mindpet.__all__ and getattr(mindpet, name) is not None
    assert mindpet.PetModel is PetModel and issubclass(PetModel, nn.Cell)
