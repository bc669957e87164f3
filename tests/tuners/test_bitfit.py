"""BitFit through the lifecycle API: BitFitConfig trains the selected bias Parameters in place (no new layer);
shared checks in tests/tuner_checks.py."""
import pytest

from mindpet import BitFitConfig, get_pet_model

from tests import tuner_checks as checks
from tests.gpt_like import GPTLike

ATTN_BIASES = [f'blocks.{i}.attn.{p}_proj.bias' for i in range(2) for p in ('q', 'k', 'v', 'out')]
CASE = checks.Case(config_a=BitFitConfig(target_modules=['attn']),
                   config_b=BitFitConfig(modules_to_save=['lm_head']),         # every bias, and the LM head
                   keys_a=[], layer_class=None, identity='exact', lr=0.05)


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    return checks.trained_pair_once(CASE, tmp_path_factory)


def test_injection_adds_nothing_and_trains_the_selected_biases(tmp_path):
    pet = checks.check_injection(CASE, tmp_path)
    assert pet.pet_layers == {}
    assert sorted(p.name for p in pet.trainable_params()) == sorted(ATTN_BIASES)
    every = get_pet_model(GPTLike(), CASE.config_b)
    names = sorted(p.name for p in every.trainable_params())
    assert names == sorted([p.name for p in GPTLike().get_parameters() if p.name.endswith('bias')]
                           + ['lm_head.weight'])
    excluded = get_pet_model(GPTLike(), BitFitConfig(target_modules=[r'blocks\.0\..*'], exclude_modules=['mlp']))
    assert sorted(p.name for p in excluded.trainable_params()) == sorted(ATTN_BIASES[:4])


def test_training_trains_exactly_the_selected_biases(pair):
    # (the loss falling, every trainable parameter moving and the rest staying bit-identical:
    # tests/tuners/test_lifecycle_checks.py)
    assert sorted(n for n in pair.trainable_a) == sorted(ATTN_BIASES)


def test_yaml():
    checks.check_yaml(BitFitConfig(target_modules=['attn'], modules_to_save=['lm_head']),
                      ('target_module', 'target_modules'),
                      [('target_modules', [1], TypeError), ('exclude_modules', '[', ValueError)])


def test_a_config_selecting_no_bias_is_refused():
    with pytest.raises(ValueError, match="select no bias parameter.*cells with a bias: \\['blocks.0.attn.q_proj'"):
        get_pet_model(GPTLike(), BitFitConfig(target_modules=['lm_head']))
