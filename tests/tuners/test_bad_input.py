"""Bad input to the configs and to injection: one table of bad calls (runner, Row and Files in
tests/bad_input.py), and property-based tests (hypothesis) of the config parser."""
import math
import os

import pytest
import yaml
from hypothesis import given, settings, strategies as st, HealthCheck

from mindpet import LoraConfig, config_from_dict, config_from_yaml, get_pet_model
from mindpet.utils.exceptions import ModelConfigKeysInfoError, ModelConfigParamsInfoError, ReadYamlFileError

from tests.bad_input import Files, Row, check_row, check_table, pet, rows
from tests.nets import LoRAMLP, PlainMLP


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    return Files(str(tmp_path_factory.mktemp('bad_input')))


def lora_cfg(**kw):
    data = {'type': 'lora', 'target_modules': ['fc1']}
    data.update(kw)
    return data


# Each call takes the Files; fragments must all be in str(exception).
ROWS = [
    # ----- configs ---------------------------------------------------------------------------------------------------
    Row('config-no-targets', lambda f: LoraConfig(), ValueError, ["'target_modules'", 'None']),
    Row('config-targets-int', lambda f: LoraConfig(target_modules=3), TypeError, ["'target_modules'", '3 (int)']),
    Row('config-targets-regex', lambda f: LoraConfig(target_modules=['fc[']), ValueError,
        ["'fc['", "'target_modules'", 'regular expression']),
    Row('config-rank-str', lambda f: LoraConfig(target_modules=['fc1'], lora_rank='8'), TypeError,
        ["'lora_rank'", "'8' (str)"]),
    Row('config-dropout-range', lambda f: LoraConfig(target_modules=['fc1'], lora_dropout=1.5), ValueError,
        ["'lora_dropout'", '1.5 (float)']),
    Row('config-dtype-name', lambda f: LoraConfig(target_modules=['fc1'], compute_dtype='fp16'), ValueError,
        ["'compute_dtype'", "'fp16' (str)"]),
    Row('config-unknown-keyword', lambda f: LoraConfig(target_modules=['fc1'], lora_rnk=8), TypeError, ["'lora_rnk'"]),
    Row('dict-unknown-key', lambda f: config_from_dict(lora_cfg(lora_rnk=8)), ModelConfigKeysInfoError,
        ["'lora_rnk'", "did you mean 'lora_rank'"]),
    Row('dict-no-type', lambda f: config_from_dict({'target_modules': ['fc1']}), ModelConfigKeysInfoError,
        ["'type'", "['target_modules']"]),
    Row('dict-type-typo', lambda f: config_from_dict(lora_cfg(type='lorra')), ValueError,
        ["'lorra'", "did you mean 'lora'"]),
    Row('dict-not-mapping', lambda f: config_from_dict(['lora']), ModelConfigParamsInfoError, ["['lora']", '(list)']),
    Row('dict-rank-float', lambda f: config_from_dict(lora_cfg(lora_rank=4.0)), TypeError,
        ["'lora_rank'", '4.0 (float)']),
    Row('dict-other-method', lambda f: LoraConfig.from_dict(lora_cfg(type='ia3')), ModelConfigParamsInfoError,
        ["'type: lora'", "'type: ia3'"]),
    Row('yaml-typo', lambda f: config_from_yaml(f.pet_typo), ModelConfigKeysInfoError,
        ["'lora_ranks'", "did you mean 'lora_rank'"]),
    Row('yaml-wrong-type', lambda f: config_from_yaml(f.pet_wrongtype), TypeError, ["'lora_rank'", "'four' (str)"]),
    Row('yaml-quoted-float', lambda f: config_from_yaml(f.pet_dropout), TypeError,
        ["'lora_dropout'", "'0.1' (str)"]),
    Row('yaml-invalid', lambda f: config_from_yaml(f.pet_bad), ReadYamlFileError, ['pet_bad.yaml', 'not valid YAML']),
    Row('yaml-missing', lambda f: config_from_yaml(f.missing), ReadYamlFileError, ['missing.ckpt', 'does not exist']),
    Row('yaml-no-section', lambda f: config_from_yaml(f.pet_nosection), ModelConfigKeysInfoError,
        ['pet_nosection.yaml', "'pet'"]),
    Row('yaml-section-list', lambda f: config_from_yaml(f.pet_list), ModelConfigParamsInfoError,
        ["['lora', 4]", '(list)']),
    Row('yaml-dir', lambda f: config_from_yaml(f.a_dir), ReadYamlFileError, ['a_dir.ckpt', 'is a directory']),
    Row('yaml-path-int', lambda f: config_from_yaml(3), TypeError, ['config path', '3 (int)']),
    # ----- injection -------------------------------------------------------------------------------------------------
    Row('inject-not-cell', lambda f: get_pet_model('net', LoraConfig(target_modules=['fc1'])), TypeError,
        ["'model'", "'net' (str)"]),
    Row('inject-config-dict', lambda f: get_pet_model(PlainMLP(), {'type': 'lora'}), TypeError,
        ["'config'", "{'type': 'lora'} (dict)"]),
    Row('inject-no-match', lambda f: get_pet_model(PlainMLP(), LoraConfig(target_modules=['q_proj'])), ValueError,
        ["['q_proj']", 'match no adaptable cell', 'fc1']),
    Row('inject-not-dense', lambda f: get_pet_model(PlainMLP(), LoraConfig(target_modules=['act'])), ValueError,
        ["['act']", 'act (ReLU)']),
    Row('inject-name-space', lambda f: get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1']),
                                                     adapter_name='a b'), ValueError, ["'adapter_name'", "'a b'"]),
    Row('inject-name-int', lambda f: get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1']), adapter_name=1),
        TypeError, ["'adapter_name'", '1 (int)']),
    Row('inject-twice', lambda f: get_pet_model(LoRAMLP(), LoraConfig(target_modules=['head'])), ValueError,
        ["'model'", "'fc1.mindpet_delta_lora_a'"]),
    Row('inject-modules-to-save', lambda f: pet(modules_to_save=['nohead']), ValueError,
        ['modules_to_save', "['nohead']"]),
]

EXPECTED_ROWS = 30


def test_table_size():
    check_table(ROWS, EXPECTED_ROWS)


@rows(ROWS)
def test_bad_call(row, files):
    check_row(row, files)


# ----- property-based tests of the config parser ---------------------------------------------------------------------
PROPERTIES = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LORA_KEYS = ['type'] + LoraConfig.field_names()
PATTERN = st.from_regex(r'[a-z_][a-z0-9_]{0,8}(\.[a-z0-9_]{1,5}){0,2}', fullmatch=True)
PATTERNS = st.lists(PATTERN, min_size=1, max_size=4)
FINITE = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def lora_configs(draw):
    """Keyword arguments of a valid LoraConfig, in the forms users write (a str for one pattern, 0 for dropout)."""
    kwargs = {'target_modules': draw(st.one_of(PATTERNS, PATTERN))}
    if draw(st.booleans()):
        kwargs['exclude_modules'] = draw(st.one_of(st.none(), PATTERNS))
    if draw(st.booleans()):
        kwargs['modules_to_save'] = draw(st.one_of(st.none(), PATTERNS))
    if draw(st.booleans()):
        kwargs['lora_rank'] = draw(st.integers(1, 4096))
    if draw(st.booleans()):
        kwargs['lora_alpha'] = draw(st.one_of(st.integers(-10 ** 6, 10 ** 6), FINITE).filter(lambda v: v != 0))
    if draw(st.booleans()):
        kwargs['lora_dropout'] = draw(st.one_of(st.just(0), st.floats(0.0, 1.0, exclude_max=True)))
    if draw(st.booleans()):
        kwargs['compute_dtype'] = draw(st.sampled_from([None, 'float32', 'float16', 'bfloat16']))
    return kwargs


@PROPERTIES
@given(kwargs=lora_configs())
def test_property_valid_configs_round_trip(kwargs, tmp_path_factory):
    config = LoraConfig(**kwargs)
    data = config.to_dict()
    assert list(data) == LORA_KEYS
    assert config_from_dict(data) == config
    assert config_from_dict(data).to_dict() == data                     # to_dict is a fixed point
    text = yaml.safe_dump({'pet': data})                                # what save_pretrained / users write
    assert config_from_dict(yaml.safe_load(text)['pet']) == config
    path = os.path.join(str(tmp_path_factory.getbasetemp()), 'property_round_trip.yaml')
    with open(path, 'w', encoding='utf-8') as handle:
        handle.write(text)
    assert config_from_yaml(path) == config
    # the normal forms: one pattern becomes a list, an int 0 dropout a float
    target = kwargs['target_modules']
    assert data['target_modules'] == ([target] if isinstance(target, str) else target)
    assert isinstance(data['lora_dropout'], float)


UNKNOWN_KEYS = st.one_of(st.text(min_size=1, max_size=20), st.integers(), st.booleans(), st.none(),
                         st.floats(allow_nan=False)).filter(lambda k: k not in LORA_KEYS)
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(), FINITE, st.text(max_size=5),
                      st.lists(st.integers(), max_size=2))


@PROPERTIES
@given(kwargs=lora_configs(), key=UNKNOWN_KEYS, value=ANY_VALUE)
def test_property_unknown_keys_are_named(kwargs, key, value):
    data = LoraConfig(**kwargs).to_dict()
    data[key] = value
    with pytest.raises(ModelConfigKeysInfoError) as info:
        config_from_dict(data)
    assert f'Unknown key {key!r}' in str(info.value)


@st.composite
def typos(draw):
    """A valid key with one character deleted, doubled or replaced -- the usual YAML typo."""
    key = draw(st.sampled_from(LoraConfig.field_names()))
    index = draw(st.integers(0, len(key) - 1))
    kind = draw(st.sampled_from(['delete', 'double', 'replace']))
    if kind == 'delete':
        typo = key[:index] + key[index + 1:]
    elif kind == 'double':
        typo = key[:index] + key[index] + key[index:]
    else:
        typo = key[:index] + draw(st.sampled_from('abcdefghijklmnopqrstuvwxyz_')) + key[index + 1:]
    return key, typo


@PROPERTIES
@given(kwargs=lora_configs(), pair=typos())
def test_property_typos_suggest_the_key(kwargs, pair):
    key, typo = pair
    data = LoraConfig(**kwargs).to_dict()
    if typo in data:
        return                                                          # the "typo" is the key itself
    data[typo] = data.pop(key)
    with pytest.raises(ModelConfigKeysInfoError) as info:
        config_from_dict(data)
    assert f'Unknown key {typo!r}' in str(info.value) and f"did you mean {key!r}" in str(info.value)


NOT_A_LIST = st.one_of(st.integers(), FINITE, st.booleans(), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                            max_size=2))
BAD_PATTERNS = st.one_of(NOT_A_LIST, st.just([]), st.lists(st.one_of(st.integers(), st.none(), FINITE), min_size=1,
                                                          max_size=3),
                         st.sampled_from(['(', 'fc[', '*q_proj', ['ok', '+x']]))
WRONG = {
    'lora_rank': st.one_of(FINITE, st.text(max_size=5), st.booleans(), st.none(), st.integers(max_value=0),
                           st.lists(st.integers(1, 8), min_size=1, max_size=2)),
    'lora_alpha': st.one_of(st.text(max_size=5), st.booleans(), st.none(), st.sampled_from([0, 0.0, -0.0]),
                            st.sampled_from([math.nan, math.inf, -math.inf]), st.lists(st.integers(), max_size=2)),
    'lora_dropout': st.one_of(st.text(max_size=5), st.booleans(), st.none(), st.integers().filter(lambda v: v != 0),
                              st.floats().filter(lambda v: not 0.0 <= v < 1.0)),
    'compute_dtype': st.one_of(st.text(max_size=8).filter(lambda v: v not in ('float32', 'float16', 'bfloat16')),
                               st.integers(), st.booleans(), st.lists(st.text(max_size=3), max_size=2)),
    'target_modules': st.one_of(BAD_PATTERNS, st.none()),
    'exclude_modules': BAD_PATTERNS,
    'modules_to_save': BAD_PATTERNS,
}


@PROPERTIES
@given(kwargs=lora_configs(), field=st.sampled_from(sorted(WRONG)), data=st.data())
def test_property_wrong_values_name_the_field(kwargs, field, data):
    value = data.draw(WRONG[field], label=field)
    config = LoraConfig(**kwargs).to_dict()
    config[field] = value
    with pytest.raises((TypeError, ValueError)) as info:
        config_from_dict(config)
    assert f"'{field}'" in str(info.value), str(info.value)


@PROPERTIES
@given(data=st.one_of(st.none(), st.integers(), st.text(max_size=10), st.lists(st.text(max_size=3), max_size=3)))
def test_property_non_mappings_are_refused(data):
    with pytest.raises(ModelConfigParamsInfoError) as info:
        config_from_dict(data)
    assert repr(data)[:20] in str(info.value)
