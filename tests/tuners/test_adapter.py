"""Adapters and low-rank adapters through the lifecycle API (AdapterConfig -> AdapterDense,
LowRankAdapterConfig -> LowRankAdapterDense): shared checks in tests/tuner_checks.py; merging is refused."""
import numpy as np
import pytest
from mindspore import Tensor

from mindpet import AdapterConfig, LowRankAdapterConfig, get_pet_model
from mindpet.delta import AdapterDense, LowRankAdapterDense

from tests import tuner_checks as checks
from tests.gpt_like import GPTLike

OUT = [f'blocks.{i}.{name}' for i in range(2) for name in ('attn.out_proj', 'mlp.fc_out')]
# The 'b' adapters also adapt q_proj and have larger bottlenecks / factors (shared layers are zero-padded).
CASES = {
    'adapter': checks.Case(
        config_a=AdapterConfig(target_modules=['out_proj', 'fc_out'], bottleneck_size=8),
        config_b=AdapterConfig(target_modules=['q_proj', 'out_proj', 'fc_out'], bottleneck_size=16),
        keys_a=OUT, layer_class=AdapterDense, identity=None, mergeable=False),
    'low_rank_adapter': checks.Case(
        config_a=LowRankAdapterConfig(target_modules=['out_proj', 'fc_out'], reduction_factor=4, low_rank_size=2),
        config_b=LowRankAdapterConfig(target_modules=['q_proj', 'out_proj', 'fc_out'], reduction_factor=2,
                                      low_rank_size=4, non_linearity='gelu'),
        keys_a=OUT, layer_class=LowRankAdapterDense, identity=None, mergeable=False, lr=0.01),
}


@pytest.mark.parametrize('method', sorted(CASES))
def test_injection(method, tmp_path):
    pet = checks.check_injection(CASES[method], tmp_path)
    layer = pet.pet_layers['blocks.0.attn.out_proj']
    assert layer.weight.name == 'blocks.0.attn.out_proj.weight'
    assert all(p.name.startswith('blocks.0.attn.out_proj.adapter.mindpet_delta_') for p in layer.adapter.get_parameters())


def test_adapter_forward_matches_numpy_after_compilation(graph_mode):
    pet = get_pet_model(GPTLike(), AdapterConfig(target_modules=['fc_out'], bottleneck_size=8, non_linearity='relu'))
    layer = pet.pet_layers['blocks.1.mlp.fc_out']
    x = np.random.RandomState(0).randn(2, 3, 128).astype(np.float32)
    layer(Tensor(x))
    rng = np.random.RandomState(1)
    for param in layer.adapter.get_parameters():
        param.set_data(Tensor(rng.randn(*param.shape).astype(np.float32) * 0.3))
    a = layer.adapter
    h = x @ layer.weight.asnumpy().T + layer.bias.asnumpy()
    inner = np.maximum(h @ a.mindpet_delta_adapter_down_weight.asnumpy().T + a.mindpet_delta_adapter_down_bias.asnumpy(), 0)
    ref = h + inner @ a.mindpet_delta_adapter_up_weight.asnumpy().T + a.mindpet_delta_adapter_up_bias.asnumpy()
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('config,typo,bad', [
    (CASES['adapter'].config_a, ('bottleneck', 'bottleneck_size'),
     [('bottleneck_size', 0, ValueError), ('bottleneck_size', 8.0, TypeError), ('non_linearity', 'swish2', ValueError)]),
    (CASES['low_rank_adapter'].config_a, ('low_rank', 'low_rank_size'),
     [('reduction_factor', True, TypeError), ('low_rank_w_init', 'nope', ValueError),
      ('compute_dtype', 'int8', ValueError)]),
])
def test_yaml(config, typo, bad):
    checks.check_yaml(config, typo, bad)


def test_adapters_sharing_a_layer_must_agree_on_the_non_linearity_and_sizes_must_fit():
    pet = get_pet_model(GPTLike(), CASES['adapter'].config_a)
    with pytest.raises(ValueError, match="'blocks.0.attn.out_proj' was adapted with 'gelu'"):
        pet.add_adapter('relu', AdapterConfig(target_modules=['q_proj', 'out_proj'], non_linearity='relu'))
    assert 'blocks.0.attn.q_proj' not in pet.pet_layers
    with pytest.raises(ValueError, match="'reduction_factor' must be <= 'hidden_size' \\(32\\)"):
        get_pet_model(GPTLike(), LowRankAdapterConfig(target_modules=['out_proj'], reduction_factor=64))
