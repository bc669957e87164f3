"""AdaLoRA through the lifecycle: AdaLoraConfig (defaults, YAML, errors), injection of AdaLoRADense by name into
tests/gpt_like.py, GRAPH_MODE training through PetModel with the training hook driving the rank allocator (also as a
Model.train callback), save/load, switching and merging (shared checks in tests/hook_tuner_checks.py)."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn
from mindspore.train import Model

from mindpet import AdaLoraConfig, get_pet_model
from mindpet.delta.rank_allocation import cubic_budget

from tests import hook_tuner_checks as checks
from tests.gpt_like import GPTLike, LMLoss, token_batch
from tests.hook_tuner_checks import LAYERS


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    return checks.train_once('adalora', str(tmp_path_factory.mktemp('adalora')))


def test_config_needs_only_target_modules_and_reads_from_yaml(tmp_path):
    checks.check_config_defaults_and_yaml(tmp_path, AdaLoraConfig, 'adalora', dict(
        init_r=12, target_r=8, lora_alpha=8, t_init=0, t_final=0, delta_t=1, beta1=0.85, beta2=0.85,
        orth_reg_weight=0.5, total_step=None, rank_pattern=None))


@pytest.mark.parametrize('call,exc,fragments', [
    (lambda: AdaLoraConfig(target_modules=['q'], init_r=4, target_r=5), ValueError, ['target_r', '5']),
    (lambda: AdaLoraConfig(target_modules=['q'], beta1=1.0), ValueError, ['beta1', '1.0']),
    (lambda: AdaLoraConfig(target_modules=['q'], t_init=5, t_final=5, total_step=10), ValueError, ['t_final']),
    (lambda: AdaLoraConfig(target_modules=['q'], orth_reg_weight=-1), ValueError, ['orth_reg_weight', '-1']),
    (lambda: AdaLoraConfig(target_modules=['q'], rank_pattern={'a': -1}), ValueError, ['rank_pattern', '-1']),
    (lambda: AdaLoraConfig(target_modules=['q'], rank_pattern=[1]), TypeError, ['rank_pattern']),
])
def test_config_errors_name_the_field_and_value(call, exc, fragments):
    checks.check_config_error(call, exc, fragments)


def test_injection_replaces_matched_layers_keeping_base_parameters(tmp_path):
    checks.check_injection('adalora', tmp_path,
                           [f'{k}.mindpet_delta_adalora_{s}' for k in LAYERS for s in ('p', 'lambda', 'q')])


def test_second_adapter_must_fit_the_live_layers():
    checks.check_second_adapter_must_fit('adalora', dict(init_r=6, target_r=2), 'init_r=4')


def test_training_hook_trains_in_graph_mode_and_freezes_the_base(trained):
    checks.check_training_trains_only_the_adapter(trained)


def test_rank_allocation_follows_the_budget_and_prunes(trained):
    # 6 layers x init_r 4 singular values down to 6 x 2; a layer's rank is its count of non-zero lambda entries.
    checks.check_rank_allocation(trained, units=6 * 4, target=6 * 2, delta_t=2,
                                 live_rank=lambda after, name: np.count_nonzero(
                                     after[f'{name}.mindpet_delta_adalora_lambda']))


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


def test_saved_adapter_loads_exactly_switches_and_merges(trained, graph_mode, tmp_path):
    def check_merged(pet, merged, w0, tensors):
        for key, layer in pet.pet_layers.items():
            np.testing.assert_allclose(merged[key], w0[key] + layer.delta_weight(), atol=1e-6)

    checks.check_saved_adapter_loads_switches_and_merges(trained, tmp_path, check_merged)


def test_the_allocator_works_on_the_active_adapters_layers_only():
    pet = get_pet_model(GPTLike(), AdaLoraConfig(target_modules=['q_proj'], init_r=4, target_r=2))
    pet.add_adapter('other', AdaLoraConfig(target_modules=['v_proj', 'fc_in'], init_r=4, target_r=1))
    pet.set_adapter('other')
    allocator = pet.training_hook(total_steps=10).allocator
    assert [name for name, _ in allocator.layers] == ['blocks.0.attn.v_proj', 'blocks.0.mlp.fc_in',
                                                      'blocks.1.attn.v_proj', 'blocks.1.mlp.fc_in']
    assert (allocator.init_budget, allocator.target_budget) == (16, 4)
