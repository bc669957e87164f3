"""Prefix tuning through the lifecycle API: PrefixTuningConfig gives prefix-less PrefixAttention blocks a trainable
PrefixLayer (GatedPrefixAttention); shared checks in tests/tuner_checks.py."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindpet import PetModel, PrefixTuningConfig, get_pet_model
from mindpet.delta import PrefixAttention
from mindpet.delta.prefix_layer import GatedPrefixAttention

from tests import tuner_checks as checks
from tests.delta_nets import TinyCausalLM, LMLoss, dense_weights, np_attention, causal_mask


def make_lm(seed=0):
    """A Pangu-shaped causal LM whose blocks use PrefixAttention without a prefix (TinyCausalLM seeds itself)."""
    del seed
    return TinyCausalLM(vocab=64, hidden=16, heads=2, layers=2, seq=8, batch=8)


ATTN = ['blocks.0.attention', 'blocks.1.attention']
CASE = checks.Case(config_a=PrefixTuningConfig(target_modules=['attention'], num_virtual_tokens=4, mid_dim=16),
                   config_b=PrefixTuningConfig(target_modules=['attention'], num_virtual_tokens=4, mid_dim=16),
                   keys_a=ATTN, layer_class=GatedPrefixAttention, identity=None, mergeable=False, make_net=make_lm,
                   loss=LMLoss, seq=8, lr=0.02, disabled='close')


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    return checks.trained_pair_once(CASE, tmp_path_factory)


def test_injection(tmp_path):
    pet = checks.check_injection(CASE, tmp_path)
    layer = pet.pet_layers['blocks.1.attention']
    assert layer.dense1.weight.name == 'blocks.1.attention.dense1.weight'
    assert layer.prefix.mindpet_delta_prefixtuning_embedding.name == \
        'blocks.1.attention.prefix.mindpet_delta_prefixtuning_embedding'
    assert layer.prefix.mindpet_delta_prefixtuning_embedding.shape == (4, 16)


def test_block_matches_numpy_and_the_gate_masks_the_prefix_after_compilation(graph_mode):
    pet = get_pet_model(make_lm(), CASE.config_a)
    attn = pet.pet_layers['blocks.0.attention']
    x = np.random.RandomState(3).uniform(-1, 1, (8, 8, 16)).astype(np.float32)
    mask = causal_mask(8, 8)
    pk, pv = attn.prefix.prefix_numpy()       # (checked against the formula in tests/delta/test_prefix_tuning.py)
    weights = dense_weights(attn)
    np.testing.assert_allclose(attn(Tensor(x), mask).asnumpy(), np_attention(x, mask.asnumpy(), weights, 2, pk, pv),
                               rtol=1e-5, atol=1e-5)
    attn.mindpet_state_prefix_gate.set_data(Tensor(0.0, ms.float32))
    np.testing.assert_allclose(attn(Tensor(x), mask).asnumpy(), np_attention(x, mask.asnumpy(), weights, 2),
                               rtol=1e-5, atol=1e-5)





def test_an_adapter_of_other_sizes_on_fewer_blocks_switches_with_a_recompilation(pair, graph_mode):
    pet = PetModel.from_pretrained(make_lm(), pair.dir_a, adapter_name='a')
    partial = PrefixTuningConfig(target_modules=[r'blocks\.1\.attention'], num_virtual_tokens=6, embed_dim=8,
                                 mid_dim=12)
    pet.add_adapter('partial', partial)
    np.testing.assert_array_equal(pet(pair.ids).asnumpy(), pair.out_a)
    alone = get_pet_model(make_lm(), partial)
    tensors = {p.name: p.asnumpy() for p in alone.get_parameters() if 'prefixtuning' in p.name}
    pet.set_adapter('partial')
    for param in pet.get_parameters():
        if param.name in tensors:
            param.set_data(Tensor(tensors[param.name]))
    # blocks.0 keeps adapter a's prefix masked out by its gate: equal to the plain block up to float32 rounding.
    np.testing.assert_allclose(pet(pair.ids).asnumpy(), alone(pair.ids).asnumpy(), rtol=1e-5, atol=1e-5)
    pet.set_adapter('a')
    np.testing.assert_array_equal(pet(pair.ids).asnumpy(), pair.out_a)



def test_yaml():
    checks.check_yaml(CASE.config_a, ('mid_dimm', 'mid_dim'),
                      [('num_virtual_tokens', 0, ValueError), ('embed_dim', 2.5, TypeError),
                       ('prefix_dropout', 1.0, ValueError), ('target_modules', None, ValueError)])


def test_only_prefix_less_prefix_attention_is_a_target():
    with pytest.raises(ValueError, match=r"cannot adapt: \['blocks.0.attention.dense1 \(Dense\)"):
        get_pet_model(make_lm(), PrefixTuningConfig(target_modules=[r'.*\.dense1']))
    pet = get_pet_model(make_lm(), CASE.config_a)
    assert isinstance(pet.pet_layers['blocks.0.attention'], PrefixAttention)
