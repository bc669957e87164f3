"""The runner names the YAML key of a bad PET value from the error's ``field`` (no message matching): the keys are
checked once, the method looked up once, and a value error points at ``pet.<field>``."""
import re

import pytest

from mindpet.train.runner import load_plan
from mindpet.utils.exceptions import ModelConfigKeysInfoError, ModelConfigParamsInfoError
from tests.train.test_runner import small_config

TARGETS = "target_modules: ['layers\\.\\d+']"
BAD_PET = [
    # The message quotes "'rank_pattern['layers.0']'", not the key: only the field attribute gives pet.rank_pattern.
    (f"pet={{type: adalora, {TARGETS}, rank_pattern: {{layers.0: -1}}}}", 'pet.rank_pattern'),
    # The message quotes two keys; the field says which one is reported.
    (f"pet={{type: pst, {TARGETS}, warmup_fraction: 0.6, cooldown_fraction: 0.5}}", 'pet.cooldown_fraction'),
    ('pet.lora_rank=0', 'pet.lora_rank'),
    ("pet.exclude_modules=['(']", 'pet.exclude_modules'),
]


@pytest.mark.parametrize('override, key', BAD_PET, ids=[b[1] + str(i) for i, b in enumerate(BAD_PET)])
def test_bad_pet_value_names_its_yaml_key(tmp_path, override, key):
    path = small_config(tmp_path)
    with pytest.raises(ModelConfigParamsInfoError) as info:
        load_plan(path, [override])
    # '(from --set)' follows the key only when the override set that key itself (not the whole section).
    assert re.match(rf"{re.escape(path)}: '{re.escape(key)}'( \(from --set\))?: For '", str(info.value)), \
        str(info.value)


def test_unknown_pet_key_is_reported_once_by_the_runner(tmp_path):
    path = small_config(tmp_path)
    with pytest.raises(ModelConfigKeysInfoError) as info:
        load_plan(path, ['pet.lora_rnak=4'])
    assert "'pet.lora_rnak' (from --set): unknown key of the 'lora' method; did you mean 'lora_rank'?" in \
        str(info.value)
