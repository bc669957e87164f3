"""DoRA through the lifecycle API: LoraConfig(use_dora=True) injects DoRADense (tests/tuner_checks.py)."""
import numpy as np
import pytest
from mindspore import Tensor

from mindpet import LoraConfig, get_pet_model
from mindpet.delta import LoRADense
from mindpet.delta.dora import DoRADense, dora_weight

from tests import tuner_checks as checks
from tests.gpt_like import GPTLike

QV = ['blocks.0.attn.q_proj', 'blocks.0.attn.v_proj', 'blocks.1.attn.q_proj', 'blocks.1.attn.v_proj']
# 'b' adapts k_proj too and has a larger rank: loading it adds layers and widens the live rank.
CASE = checks.Case(config_a=LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=4, lora_alpha=8, use_dora=True),
                   config_b=LoraConfig(target_modules=['q_proj', 'k_proj', 'v_proj'], lora_rank=8, lora_alpha=8,
                                       use_dora=True),
                   keys_a=QV, layer_class=DoRADense, identity='close')


def test_injection(tmp_path):
    pet = checks.check_injection(CASE, tmp_path)
    layer = pet.pet_layers['blocks.0.attn.q_proj']
    assert layer.mindpet_delta_dora_a.shape == (4, 32) and layer.mindpet_delta_dora_magnitude.shape == (32,)


def test_magnitude_starts_at_the_row_norms_and_the_forward_matches_numpy(graph_mode):
    net = GPTLike()
    pet = get_pet_model(net, CASE.config_a)
    layer = pet.pet_layers['blocks.1.attn.v_proj']
    w0 = layer.weight.asnumpy()
    np.testing.assert_allclose(layer.mindpet_delta_dora_magnitude.asnumpy(), np.linalg.norm(w0, axis=1), rtol=1e-6)
    rng = np.random.RandomState(0)
    for name in ('mindpet_delta_dora_b', 'mindpet_delta_dora_magnitude'):
        param = getattr(layer, name)
        param.set_data(Tensor(param.asnumpy() + rng.randn(*param.shape).astype(np.float32) * 0.1))
    x = rng.randn(3, 32).astype(np.float32)
    ref = x @ dora_weight(w0, layer.mindpet_delta_dora_a.asnumpy(), layer.mindpet_delta_dora_b.asnumpy(),
                          layer.mindpet_delta_dora_magnitude.asnumpy(), 2.0).T + layer.bias.asnumpy()
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), ref, rtol=1e-5, atol=1e-5)






def test_yaml():
    checks.check_yaml(CASE.config_a, ('use_dorra', 'use_dora'), [('use_dora', 'yes', TypeError),
                                                                  ('lora_rank', 0, ValueError)])


def test_lora_and_dora_adapters_do_not_share_a_layer():
    pet = get_pet_model(GPTLike(), CASE.config_a)
    with pytest.raises(ValueError, match="layer 'blocks.0.attn.q_proj' was adapted as DoRADense"):
        pet.add_adapter('plain', LoraConfig(target_modules=['q_proj', 'k_proj'], lora_rank=4))
    assert 'blocks.0.attn.k_proj' not in pet.pet_layers      # refused before anything was injected
    pet.add_adapter('plain', LoraConfig(target_modules=['k_proj'], lora_rank=4))
    assert isinstance(pet.pet_layers['blocks.0.attn.k_proj'], LoRADense)
    with pytest.raises(NotImplementedError, match='DoRA adapters cannot be combined'):
        pet.add_weighted_adapter(['default', 'plain'], [0.5, 0.5], 'mix')
