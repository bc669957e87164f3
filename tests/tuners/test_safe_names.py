"""Names that become part of file or parameter names (an adapter's name, a checkpoint prefix) are checked by one
helper (mindpet.utils.validation.check_safe_name): a str of letters, digits, '_', '-' or '.', else a
FieldTypeError/FieldValueError naming the argument, with nothing changed."""
import pytest

from mindpet import LoraConfig, PetModel, get_pet_model
from mindpet.graph import TrainableParamsCheckPoint
from mindpet.utils.validation import FieldTypeError, FieldValueError, check_safe_name
from tests.nets import PlainMLP

RULE = "letters, digits, '_', '-' or '.'"


def test_the_helper_accepts_safe_names_and_names_the_argument():
    assert check_safe_name('adapter_name', 'task-a.v2_1', 'x') == 'task-a.v2_1'
    with pytest.raises(FieldTypeError) as info:
        check_safe_name('adapter_name', 3, 'x')
    assert str(info.value) == "For 'x', the 'adapter_name' must be a str, but got 3 (int)." and \
        info.value.field == 'adapter_name'
    for bad in ('', 'a b', 'a/b', '../a', 'a\n'):
        with pytest.raises(FieldValueError) as info:
            check_safe_name('prefix', bad, 'x', what='file name')
        assert str(info.value) == f"For 'x', the 'prefix' must be a non-empty file name of {RULE}, but got {bad!r}."


def test_adapter_names_and_checkpoint_prefixes_use_it(tmp_path):
    config = LoraConfig(target_modules=['fc1'])
    with pytest.raises(ValueError) as info:
        get_pet_model(PlainMLP(), config, adapter_name='a b')
    assert info.value.field == 'adapter_name' and f"non-empty name of {RULE}, but got 'a b'." in str(info.value)
    pet = get_pet_model(PlainMLP(), config)
    with pytest.raises(TypeError) as info:
        pet.add_adapter(None, config)
    assert info.value.field == 'adapter_name' and pet.adapters == ['default']
    with pytest.raises(ValueError) as info:
        PetModel.from_pretrained(PlainMLP(), str(tmp_path), adapter_name='x/y')
    assert info.value.field == 'adapter_name'
    with pytest.raises(ValueError) as info:
        pet.add_adapter('b\n', config)         # a trailing newline would end up in a directory name
    assert info.value.field == 'adapter_name' and pet.adapters == ['default']
    with pytest.raises(ValueError) as info:
        TrainableParamsCheckPoint(str(tmp_path), prefix='a/b')
    assert str(info.value) == ("For 'TrainableParamsCheckPoint', the 'prefix' must be a non-empty file name of "
                               f"{RULE}, but got 'a/b'.") and info.value.field == 'prefix'
    assert not any(tmp_path.iterdir())
