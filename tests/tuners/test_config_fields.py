"""Config field errors carry the field: every check a config runs raises a TypeError/ValueError subclass whose
``field`` names the config field, so callers (the runner) point at the YAML key without reading the message."""
import pytest

from mindpet import (AdaLoraConfig, LoraConfig, LowRankAdapterConfig, PromptTuningConfig, PstConfig,
                     TensorSVDConfig, config_from_dict)
from mindpet.utils.validation import FieldTypeError, FieldValueError, check_int, check_str_list, check_beta

CASES = [
    # (config class, keyword arguments, builtin type, field)
    (LoraConfig, dict(target_modules=['q'], lora_rank=1.5), TypeError, 'lora_rank'),
    (LoraConfig, dict(target_modules=['q'], lora_rank=0), ValueError, 'lora_rank'),
    (LoraConfig, dict(target_modules=None), ValueError, 'target_modules'),
    (LoraConfig, dict(target_modules=['q', 3]), TypeError, 'target_modules'),
    (LoraConfig, dict(target_modules=['q'], exclude_modules=['(']), ValueError, 'exclude_modules'),
    (AdaLoraConfig, dict(target_modules=['q'], beta1=1.0), ValueError, 'beta1'),
    (AdaLoraConfig, dict(target_modules=['q'], rank_pattern=[1]), TypeError, 'rank_pattern'),
    (AdaLoraConfig, dict(target_modules=['q'], rank_pattern={'q': -1}), ValueError, "rank_pattern['q']"),
    (AdaLoraConfig, dict(target_modules=['q'], t_init=5, t_final=5, total_step=10), ValueError, 'total_step'),
    (TensorSVDConfig, dict(target_modules=['q'], compute_dtype='float64'), ValueError, 'compute_dtype'),
    (PstConfig, dict(target_modules=['q'], final_sparsity=1.5), ValueError, 'final_sparsity'),
    (PstConfig, dict(target_modules=['q'], warmup_fraction=0.6, cooldown_fraction=0.5), ValueError,
     'cooldown_fraction'),
    (PromptTuningConfig, dict(target_modules=['emb'], num_virtual_tokens=2, prompt_init='vocab',
                             prompt_init_token_ids=[]), ValueError,
     'prompt_init_token_ids'),
    (LowRankAdapterConfig, dict(target_modules=['q'], low_rank_w_init=3), TypeError, 'low_rank_w_init'),
    (LowRankAdapterConfig, dict(target_modules=['q'], low_rank_w_init='nope'), ValueError, 'low_rank_w_init'),
]


@pytest.mark.parametrize('config_class, kwargs, builtin, field', CASES,
                         ids=[f"{c[0].__name__}-{c[3]}" for c in CASES])
def test_config_errors_name_their_field(config_class, kwargs, builtin, field):
    with pytest.raises(builtin) as info:
        config_class(**kwargs)
    assert type(info.value) in (FieldTypeError, FieldValueError)
    assert info.value.field == field
    # The same from a dict (the YAML path): the type and the field survive.
    with pytest.raises(builtin) as info:
        config_from_dict(dict(kwargs, type=config_class.method))
    assert info.value.field == field


def test_validation_helpers_raise_field_errors():
    with pytest.raises(TypeError) as info:
        check_int('lora_rank', 'eight', 'LoRADense')
    assert isinstance(info.value, FieldTypeError) and info.value.field == 'lora_rank'
    assert str(info.value) == "For 'LoRADense', the 'lora_rank' must be a positive int, but got 'eight' (str)."
    with pytest.raises(TypeError) as info:
        check_str_list('include', ['a', 1], 'freeze_modules')
    assert info.value.field == 'include'
    with pytest.raises(ValueError) as info:
        check_beta('beta2', -0.1, 'AdaLoRAAllocator')
    assert isinstance(info.value, FieldValueError) and info.value.field == 'beta2'
    # Re-raising by type with a new message (as error wrappers do) still works; the field is then unknown.
    assert FieldValueError('again').field is None
