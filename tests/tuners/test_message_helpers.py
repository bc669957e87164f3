"""The message helpers every error uses: got_text (the "but got ..." of a message, cut to a limit: 80 characters
for argument checks, 60 in run-config messages) and the one "did you mean" helper (mindpet.utils.validation.did_you_mean) and the three message forms built on it:
the run config's (``; did you mean 'x'?`` or the valid keys, cutoff 0.6), its case-insensitive choices, and the
method configs' and registry's aside (`` (did you mean 'x'?)``, cutoff 0.5)."""
import pytest

from mindpet import LoraConfig, config_from_dict
from mindpet.tuners.registry import get_method
from mindpet.utils.exceptions import ModelConfigKeysInfoError
from mindpet.train.schema import Field
from mindpet.utils.validation import check_int, did_you_mean, got_text

KEYS = ['lora_rank', 'lora_alpha', 'type']


@pytest.mark.parametrize('key, kwargs, hint', [
    ('lora_rnak', {}, "; did you mean 'lora_rank'?"),
    ('ranks', {}, ''),                                                  # ratio 0.571 < 0.6
    ('ranks', {'cutoff': 0.5}, "; did you mean 'lora_rank'?"),
    ('ranks', {'list_valid': True}, "; valid keys: ['lora_alpha', 'lora_rank', 'type']"),
    ('lora_rnak', {'list_valid': True}, "; did you mean 'lora_rank'?"),
    ('lora_rnak', {'aside': True}, " (did you mean 'lora_rank'?)"),
    ('LORA_RANK', {}, ''),                                              # case counts by default
    ('LORA_RANK', {'case_insensitive': True}, "; did you mean 'lora_rank'?"),
])
def test_did_you_mean_forms(key, kwargs, hint):
    assert did_you_mean(key, KEYS, **kwargs) == hint


def test_case_insensitive_names_the_candidate_as_spelt():
    assert did_you_mean('graph', ('GRAPH', 'PYNATIVE'), case_insensitive=True) == "; did you mean 'GRAPH'?"


def test_the_method_config_and_the_registry_use_the_aside_at_cutoff_half():
    valid = ['type'] + LoraConfig.field_names()
    with pytest.raises(ModelConfigKeysInfoError) as info:
        config_from_dict({'type': 'lora', 'target_modules': ['q'], 'ranks': 4})
    assert str(info.value) == (f"Unknown key 'ranks' in the 'lora' PET config (did you mean 'lora_rank'?); "
                               f"valid keys: {valid}.")
    with pytest.raises(ValueError, match=r"^Unknown PET method type 'lroa' \(did you mean 'lora'\?\); available: "):
        get_method('lroa')
    with pytest.raises(ValueError, match=r"^Unknown PET method type 'zzzz'; available: "):
        get_method('zzzz')


def test_got_text_cuts_the_repr_at_its_limit():
    assert got_text(1.5) == '1.5 (float)'
    assert got_text('x' * 78) == "'" + 'x' * 78 + "' (str)"                    # 80 characters: kept
    assert got_text('x' * 79) == "'" + 'x' * 76 + "... (str)"                   # 81: cut to 80
    with pytest.raises(TypeError) as info:
        check_int('lora_rank', 'x' * 100, 'LoraConfig')
    assert f"but got '{'x' * 76}... (str)." in str(info.value)
    with pytest.raises(ValueError) as info:
        Field('int', 1).check('x' * 100)
    assert str(info.value).endswith(f"but got '{'x' * 56}... (str)")             # run-config messages: 60
