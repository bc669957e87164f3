"""IA3 through the lifecycle API: IA3Config injects IA3Dense (input scaling on feedforward_modules, output scaling
on the other targets); shared checks in tests/tuner_checks.py."""
import numpy as np
import pytest
from mindspore import Tensor

from mindpet import IA3Config, get_pet_model
from mindpet.delta import IA3Dense

from tests import tuner_checks as checks
from tests.gpt_like import GPTLike

KVF = [f'blocks.{i}.{name}' for i in range(2) for name in ('attn.k_proj', 'attn.v_proj', 'mlp.fc_out')]
CASE = checks.Case(config_a=IA3Config(target_modules=['k_proj', 'v_proj', 'fc_out'], feedforward_modules=['fc_out']),
                   config_b=IA3Config(target_modules=['q_proj', 'k_proj', 'v_proj', 'fc_out'],
                                      feedforward_modules=[r'blocks\.\d\.mlp\.fc_out']),
                   keys_a=KVF, layer_class=IA3Dense, identity='exact', lr=0.05)


def test_injection(tmp_path):
    pet = checks.check_injection(CASE, tmp_path)
    layers = pet.pet_layers
    assert [layers[k].ia3_feedforward for k in KVF] == [False, False, True] * 2
    assert layers['blocks.0.mlp.fc_out'].mindpet_delta_ia3_vector.shape == (128,)      # the input side
    assert layers['blocks.0.attn.v_proj'].mindpet_delta_ia3_vector.shape == (32,)


@pytest.mark.parametrize('key,feedforward', [('blocks.1.attn.k_proj', False), ('blocks.1.mlp.fc_out', True)])
def test_forward_matches_numpy_after_compilation(graph_mode, key, feedforward):
    pet = get_pet_model(GPTLike(), CASE.config_a)
    layer = pet.pet_layers[key]
    rng = np.random.RandomState(1)
    x = rng.randn(2, 3, layer.in_channels).astype(np.float32)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), x @ layer.weight.asnumpy().T + layer.bias.asnumpy(),
                               rtol=1e-5, atol=1e-5)
    vector = rng.rand(*layer.mindpet_delta_ia3_vector.shape).astype(np.float32) + 0.5
    layer.mindpet_delta_ia3_vector.set_data(Tensor(vector))
    w, b = layer.weight.asnumpy(), layer.bias.asnumpy()
    ref = (x * vector) @ w.T + b if feedforward else (x @ w.T + b) * vector
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), ref, rtol=1e-5, atol=1e-5)






def test_yaml():
    checks.check_yaml(CASE.config_a, ('feedforward_module', 'feedforward_modules'),
                      [('feedforward_modules', [3], TypeError), ('feedforward_modules', ['('], ValueError),
                       ('compute_dtype', 'float64', ValueError), ('target_modules', None, ValueError)])


def test_feedforward_patterns_must_match_targets_and_agree_between_adapters():
    with pytest.raises(ValueError, match="feedforward_modules pattern 'fc_in' matches none"):
        get_pet_model(GPTLike(), IA3Config(target_modules=['k_proj', 'fc_out'], feedforward_modules=['fc_in']))
    pet = get_pet_model(GPTLike(), CASE.config_a)
    with pytest.raises(ValueError, match="'blocks.0.mlp.fc_out' was adapted with ia3_feedforward=True"):
        pet.add_adapter('other', IA3Config(target_modules=['q_proj', 'fc_out']))
    assert 'blocks.0.attn.q_proj' not in pet.pet_layers
