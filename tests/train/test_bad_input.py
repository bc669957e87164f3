"""Bad input to the freezing functions (freeze_modules, freeze_delta, freeze_from_config): one table of bad calls
(runner, Row and Files in tests/bad_input.py), and a failed freeze leaves every requires_grad as it was."""
import pytest

from mindpet.graph import freeze_modules, freeze_delta, freeze_from_config
from mindpet.utils.exceptions import ModelConfigFreezeInfoError, ReadYamlFileError

from tests.bad_input import Files, Row, assert_same_state, check_row, check_table, rows, state
from tests.nets import LoRAMLP


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    return Files(str(tmp_path_factory.mktemp('bad_input')))


# Each call takes the Files; fragments must all be in str(exception).
ROWS = [
    # ----- freezing ------------------------------------------------------------------------------------------------
    Row('freeze-modules-not-cell', lambda f: freeze_modules(None, include=['*']), TypeError,
        ["'model'", 'None (NoneType)']),
    Row('freeze-modules-nothing', lambda f: freeze_modules(LoRAMLP()), ValueError, ["'include'", "'exclude'"]),
    Row('freeze-modules-str', lambda f: freeze_modules(LoRAMLP(), include='*'), TypeError,
        ["'include'", "'*' (str)"]),
    Row('freeze-modules-no-match', lambda f: freeze_modules(LoRAMLP(), include=['*nothing*']), ValueError,
        ["'*nothing*'", "'include'", 'matches no parameter']),
    Row('freeze-modules-item', lambda f: freeze_modules(LoRAMLP(), exclude=['*', 3]), TypeError,
        ["'exclude'", '3 (int)']),
    Row('freeze-delta-mode', lambda f: freeze_delta(LoRAMLP(), 'lorra'), ValueError, ["'mode'", "'lorra' (str)"]),
    Row('freeze-delta-mode-int', lambda f: freeze_delta(LoRAMLP(), 1), TypeError, ["'mode'", '1 (int)']),
    Row('freeze-delta-absent', lambda f: freeze_delta(LoRAMLP(), 'adapter'), ValueError,
        ["'adapter'", '*mindpet_delta_adapter_*']),
    Row('freeze-delta-exclude', lambda f: freeze_delta(LoRAMLP(), 'lora', exclude=['*nohead*']), ValueError,
        ["'*nohead*'", "'exclude'"]),
    Row('freeze-config-path-int', lambda f: freeze_from_config(LoRAMLP(), 3), TypeError,
        ["'config_path'", '3 (int)']),
    Row('freeze-config-missing', lambda f: freeze_from_config(LoRAMLP(), f.missing), ReadYamlFileError,
        ['missing.ckpt', 'does not exist']),
    Row('freeze-config-typo', lambda f: freeze_from_config(LoRAMLP(), f.freeze_typo), ModelConfigFreezeInfoError,
        ['freeze_typo.yaml', "['includ']"]),
    Row('freeze-config-str', lambda f: freeze_from_config(LoRAMLP(), f.freeze_str), ModelConfigFreezeInfoError,
        ["'freeze.include'", "'*'"]),
    Row('freeze-config-no-section', lambda f: freeze_from_config(LoRAMLP(), f.freeze_nosection),
        ModelConfigFreezeInfoError, ['freeze_nosection.yaml', "no 'freeze' section"]),
    Row('freeze-config-no-match', lambda f: freeze_from_config(LoRAMLP(), f.freeze_nomatch), ValueError,
        ["'*zzz*'", "'include'"]),
]

EXPECTED_ROWS = 15


def test_table_size():
    check_table(ROWS, EXPECTED_ROWS)


@rows(ROWS)
def test_bad_call(row, files):
    check_row(row, files)


def test_failed_freeze_leaves_requires_grad_unchanged(files):
    net = LoRAMLP()
    freeze_delta(net, 'lora', exclude=['head.*'])
    before = state(net)
    calls = [lambda: freeze_delta(net, 'lora', exclude=['*nohead*']),
             lambda: freeze_delta(net, 'adapter'),
             lambda: freeze_modules(net, include=['*'], exclude=['*nohead*']),
             lambda: freeze_modules(net, include=['*', 3]),
             lambda: freeze_from_config(net, files.freeze_nomatch),
             lambda: freeze_from_config(net, files.freeze_typo),
             lambda: freeze_from_config(net, files.pet_bad)]
    for call in calls:
        with pytest.raises((TypeError, ValueError, ModelConfigFreezeInfoError, ReadYamlFileError)):
            call()
        assert_same_state(before, state(net))
