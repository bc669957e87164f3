"""Refusals raised while injecting (after the config's own checks passed) name the config field they are about:
a FieldValueError whose ``field`` the runner turns into ``pet.<field>``. One row per refusal: a single config that
does not fit the model, or a second adapter that disagrees with the first one on a shared layer. Every refusal
leaves the model as it was (same parameter names, same adapters)."""
import pytest

from mindpet import (AdaLoraConfig, AdapterConfig, IA3Config, LoraConfig, PstConfig, TensorSVDConfig,
                     get_pet_model)
from mindpet.utils.validation import FieldValueError
from tests.gpt_like import GPTLike

Q = ['q_proj']

SINGLE = [
    # (id, config, field, message fragment)
    ('ia3-feedforward-none-matched', IA3Config(target_modules=['q_proj', 'v_proj'], feedforward_modules=['fc']),
     'feedforward_modules', "feedforward_modules pattern 'fc' matches none of the target_modules' cells"),
    ('lora-pissa-not-dense', LoraConfig(target_modules=['embed'], lora_rank=4, init_lora_weights='pissa'),
     'init_lora_weights', 'PiSSA/OLoRA adapt nn.Dense layers only'),
    ('lora-layers-none-kept', LoraConfig(target_modules=Q, lora_rank=4, layers_to_transform=[7]),
     'layers_to_transform', 'keeps none of the 2 matched layers'),
]

SECOND = [
    # (id, first config, second config, field, message fragment)
    ('lora-dora-variant', LoraConfig(target_modules=Q, lora_rank=4), LoraConfig(target_modules=Q, lora_rank=4,
                                                                                use_dora=True),
     'use_dora', 'one layer holds one variant'),
    ('ia3-feedforward', IA3Config(target_modules=Q), IA3Config(target_modules=Q, feedforward_modules=Q),
     'feedforward_modules', 'ia3_feedforward=False by an earlier adapter'),
    ('adapter-non-linearity', AdapterConfig(target_modules=Q, bottleneck_size=4),
     AdapterConfig(target_modules=Q, bottleneck_size=4, non_linearity='relu'), 'non_linearity',
     "was adapted with 'gelu' by an earlier adapter"),
    ('adalora-init-r', AdaLoraConfig(target_modules=Q, init_r=4, target_r=2),
     AdaLoraConfig(target_modules=Q, init_r=6, target_r=2), 'init_r', 'must use the same init_r, but got 6'),
    ('pst-r-w', PstConfig(target_modules=Q, r_w=4, r_m=4), PstConfig(target_modules=Q, r_w=2, r_m=4), 'r_w',
     'must use the same ranks, but got r_w=2, r_m=4'),
    ('pst-r-m', PstConfig(target_modules=Q, r_w=4, r_m=4), PstConfig(target_modules=Q, r_w=4, r_m=2), 'r_m',
     'must use the same ranks, but got r_w=4, r_m=2'),
    ('tsvd-rank', TensorSVDConfig(target_modules=Q, tsvd_rank=4, target_rank=2),
     TensorSVDConfig(target_modules=Q, tsvd_rank=6, target_rank=2), 'tsvd_rank',
     'must use the same tsvd_rank, but got 6'),
]


def _state(net):
    return sorted(p.name for p in net.get_parameters())


@pytest.mark.parametrize('config, field, fragment', [row[1:] for row in SINGLE], ids=[row[0] for row in SINGLE])
def test_a_config_that_does_not_fit_names_its_field(config, field, fragment):
    net = GPTLike()
    before = _state(net)
    with pytest.raises(ValueError) as info:
        get_pet_model(net, config)
    assert type(info.value) is FieldValueError and info.value.field == field   # pylint: disable=unidiomatic-typecheck
    assert fragment in str(info.value), str(info.value)
    assert _state(net) == before


@pytest.mark.parametrize('first, second, field, fragment', [row[1:] for row in SECOND],
                         ids=[row[0] for row in SECOND])
def test_a_second_adapter_that_disagrees_names_its_field(first, second, field, fragment):
    pet = get_pet_model(GPTLike(), first)
    before, layers = _state(pet), dict(pet.pet_layers)
    with pytest.raises(ValueError) as info:
        pet.add_adapter('second', second)
    assert type(info.value) is FieldValueError and info.value.field == field   # pylint: disable=unidiomatic-typecheck
    assert fragment in str(info.value), str(info.value)
    assert _state(pet) == before and dict(pet.pet_layers) == layers
