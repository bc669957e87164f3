"""The adapter directory: one in-memory form for every format (StoredAdapter), format dispatch, an empty PetModel
and from_pretrained without a throwaway adapter."""
import json
import os
import re
import stat
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
from mindspore import Tensor

from mindpet import LoraConfig, PetModel, get_pet_model
from mindpet.adapter_store import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, StoredAdapter, adapter_weights_path,
                                   detect_format, flat_tensors, group_tensors, load_adapter_dir, save_adapter_dir)
from mindpet.utils.dir_commit import directory_lock
from mindpet.utils.exceptions import AdapterConfigError, CheckpointError

from tests.nets import PlainMLP


def _trained_pet(seed=0, rank=2, alpha=4):
    pet = get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1', 'fc2'], lora_rank=rank, lora_alpha=alpha,
                                               modules_to_save=['head']))
    rng = np.random.RandomState(seed)
    for param in pet.trainable_params():
        param.set_data(Tensor(rng.randn(*param.shape).astype(np.float32)))
    return pet


def _live(net):
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def test_flat_and_grouped_names_are_inverse():
    layers = {'a.fc': {'mindpet_delta_lora_a': np.ones((2, 3)), 'mindpet_delta_lora_b': np.zeros((3, 2))},
              'a.fc2': {'mindpet_delta_lora_a': np.full((2, 3), 2.0), 'mindpet_delta_lora_b': np.ones((3, 2))}}
    modules = {'head.weight': np.arange(6.0).reshape(2, 3)}
    adapter = StoredAdapter('x', None, ['a.fc', 'a.fc2'], layers, modules, None)
    flat = flat_tensors(adapter)
    # 'a.fc.' is a prefix of no name of 'a.fc2': the regrouping splits at the delta-parameter suffix.
    assert list(flat) == ['a.fc.mindpet_delta_lora_a', 'a.fc.mindpet_delta_lora_b', 'a.fc2.mindpet_delta_lora_a',
                          'a.fc2.mindpet_delta_lora_b', 'head.weight']
    back_layers, back_modules = group_tensors(flat, adapter.targets, list(modules))
    assert {k: sorted(v) for k, v in back_layers.items()} == {k: sorted(v) for k, v in layers.items()}
    for key, tensors in layers.items():
        for suffix, value in tensors.items():
            np.testing.assert_array_equal(back_layers[key][suffix], value)
    np.testing.assert_array_equal(back_modules['head.weight'], modules['head.weight'])


def test_load_adapter_dir_returns_what_save_pretrained_held(tmp_path):
    pet = _trained_pet()
    live = _live(pet)
    directory = pet.save_pretrained(str(tmp_path / 'a'))
    assert detect_format(directory) == 'mindpet'
    adapter = load_adapter_dir(directory)
    assert adapter.name == 'default' and adapter.config.lora_rank == 2 and adapter.config.lora_alpha == 4
    assert adapter.targets == ['fc1', 'fc2'] and list(adapter.modules) == ['head.weight', 'head.bias']
    for key in adapter.targets:
        for suffix, value in adapter.layers[key].items():
            np.testing.assert_array_equal(value, live[f'{key}.{suffix}'])
    np.testing.assert_array_equal(adapter.modules['head.weight'], live['head.weight'])
    assert adapter.fingerprint == {n: [int(d) for d in p.shape] for n, p in PlainMLP().parameters_and_names()}
    # The writer is format-agnostic: the StoredAdapter written again loads equal.
    again = save_adapter_dir(str(tmp_path / 'b'), adapter)
    reloaded = load_adapter_dir(again)
    assert reloaded.targets == adapter.targets
    for name, value in flat_tensors(adapter).items():
        np.testing.assert_array_equal(flat_tensors(reloaded)[name], value)


def test_unknown_format_is_refused_before_anything_is_written(tmp_path):
    pet = _trained_pet()
    target = tmp_path / 'out'
    with pytest.raises(ValueError, match=r"'format'.*\['mindpet', 'peft'\].*'onnx'"):
        pet.save_pretrained(str(target), format='onnx')
    assert not target.exists()


def test_directory_without_any_adapter_config_is_refused(tmp_path):
    (tmp_path / 'weights.safetensors').write_bytes(b'')
    with pytest.raises(AdapterConfigError, match=f"'{tmp_path}' has no {ADAPTER_CONFIG_NAME}.*adapter_config.json"):
        load_adapter_dir(str(tmp_path))


def test_empty_pet_model_takes_its_method_from_the_first_adapter(tmp_path, graph_mode):
    saved = _trained_pet(seed=3)
    x = Tensor(np.random.RandomState(1).randn(2, 8).astype(np.float32))
    expected = saved(x).asnumpy()
    directory = saved.save_pretrained(str(tmp_path / 'a'))
    base = PlainMLP()
    base_out = base(x).asnumpy()
    pet = PetModel(base)
    assert pet.adapters == [] and pet.active_adapter is None and pet.pet_layers == {}
    assert all(not p.requires_grad for p in base.get_parameters())
    np.testing.assert_array_equal(pet(x).asnumpy(), base_out)            # the graph ran once, empty
    pet.load_adapter(directory, 'a')
    pet.set_adapter('a')
    np.testing.assert_allclose(pet(x).asnumpy(), expected, rtol=1e-6, atol=1e-6)
    # The method is fixed now: an IA3 adapter is refused.
    from mindpet import IA3Config  # pylint: disable=import-outside-toplevel
    with pytest.raises(AdapterConfigError, match="'ia3' adapter; this PetModel holds 'lora'"):
        pet.add_adapter('b', IA3Config(target_modules=['fc1']))


def test_from_pretrained_failure_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    saved = _trained_pet()
    directory = saved.save_pretrained(str(tmp_path / 'a'))
    model = PlainMLP()
    model.fc2.weight.requires_grad = False
    before = {p.name: p.requires_grad for p in model.get_parameters()}
    cells_before = {name: type(cell) for name, cell in model.cells_and_names()}
    # A failure after layers were injected: the adapter names other layers than its target_modules select.
    real = load_adapter_dir

    def other_targets(path):
        return real(path)._replace(targets=['fc1'])

    monkeypatch.setattr('mindpet.model.load_adapter_dir', other_targets)
    with pytest.raises(AdapterConfigError, match="first difference: 'fc2'"):
        PetModel.from_pretrained(model, directory)
    assert {p.name: p.requires_grad for p in model.get_parameters()} == before
    assert {name: type(cell) for name, cell in model.cells_and_names()} == cells_before
    assert not [p.name for p in model.get_parameters() if 'mindpet_' in p.name]
    monkeypatch.undo()
    pet = PetModel.from_pretrained(model, directory)          # the same model still loads the adapter
    assert pet.active_adapter == 'default'
    np.testing.assert_array_equal(pet.base_model.fc1.mindpet_delta_lora_a.asnumpy(),
                                  saved.base_model.fc1.mindpet_delta_lora_a.asnumpy())


def test_save_pretrained_returns_the_directory(tmp_path):
    pet = _trained_pet()
    target = str(tmp_path / 'x')
    assert pet.save_pretrained(target) == target
    assert os.path.isfile(os.path.join(target, ADAPTER_CONFIG_NAME))


def _config_text(directory):
    with open(os.path.join(directory, ADAPTER_CONFIG_NAME), encoding='utf-8') as handle:
        return handle.read()


def _write_config(directory, text):
    with open(os.path.join(directory, ADAPTER_CONFIG_NAME), 'w', encoding='utf-8') as handle:
        handle.write(text)


def test_an_edited_config_is_refused_naming_the_file(tmp_path):
    directory = _trained_pet(alpha=8).save_pretrained(str(tmp_path / 'a'))
    text = _config_text(directory)
    assert 'lora_alpha: 8\n' in text
    _write_config(directory, text.replace('lora_alpha: 8\n', 'lora_alpha: 800\n'))
    with pytest.raises(AdapterConfigError, match=r"adapter_config.yaml' was edited after saving.*'adapter_sha256'\) "
                                                 r"\(edited: 'pet.lora_alpha'\)"):
        PetModel.from_pretrained(PlainMLP(), directory)
    # Two fields edited: both named. The per-field digests edited to match: still refused, without a name.
    assert 'adapter_name: default\n' in text
    _write_config(directory, text.replace('lora_alpha: 8\n', 'lora_alpha: 800\n').replace('adapter_name: default\n',
                                                                                            'adapter_name: other\n'))
    with pytest.raises(AdapterConfigError, match=r"\(edited: 'adapter_name', 'pet.lora_alpha'\)"):
        load_adapter_dir(directory)
    digests = re.search(r'pet\.lora_alpha: (\w+)', text).group(1)
    edited = text.replace('lora_alpha: 8\n', 'lora_alpha: 800\n').replace(
        f'pet.lora_alpha: {digests}', "pet.lora_alpha: " + _sha8(800))
    _write_config(directory, edited)
    with pytest.raises(AdapterConfigError, match=r"'adapter_sha256'\)\. Change an adapter"):
        load_adapter_dir(directory)
    # Dropping the checksum does not switch the check off.
    _write_config(directory, ''.join(line for line in text.splitlines(True) if not line.startswith('adapter_sha256')))
    with pytest.raises(AdapterConfigError, match="lacks 'adapter_sha256'"):
        load_adapter_dir(directory)
    # The config names its tensor file by a plain name: no path leads out of the directory.
    _write_config(directory, re.sub(r'weights_file: \S+', 'weights_file: ../../etc/passwd', text))
    with pytest.raises(AdapterConfigError, match="'weights_file' must be a name like"):
        load_adapter_dir(directory)
    _write_config(directory, text)
    assert load_adapter_dir(directory).config.lora_alpha == 8


def _sha8(value):
    import hashlib  # pylint: disable=import-outside-toplevel
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:8]


def test_saved_files_get_the_umask_permissions(tmp_path):
    pet = _trained_pet()
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(umask)
        try:
            directory = pet.save_pretrained(str(tmp_path / oct(umask)))
        finally:
            os.umask(old)
        modes = {name: stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode) for name in os.listdir(directory)}
        assert sorted(modes.values()) == [mode, mode], (umask, modes)


def test_adapters_saved_before_content_named_files_still_load(tmp_path):
    pet = _trained_pet()
    directory = pet.save_pretrained(str(tmp_path / 'a'))
    # The layout of mindpet <= 1.1.0: adapter_model.safetensors, its SHA-256, no weights_file or adapter_sha256.
    os.rename(adapter_weights_path(directory), os.path.join(directory, ADAPTER_WEIGHTS_NAME))
    _write_config(directory, ''.join(line for line in _config_text(directory).splitlines(True)
                                     if not line.startswith(('weights_file', 'adapter_sha256'))))
    adapter = load_adapter_dir(directory)
    np.testing.assert_array_equal(adapter.layers['fc1']['mindpet_delta_lora_a'],
                                  pet.base_model.fc1.mindpet_delta_lora_a.asnumpy())
    with open(os.path.join(directory, ADAPTER_WEIGHTS_NAME), 'r+b') as handle:   # its SHA-256 is still checked
        handle.seek(-4, os.SEEK_END)
        handle.write(b'\x00\x00\x80\x7f')
    with pytest.raises(CheckpointError, match='SHA-256'):
        load_adapter_dir(directory)
    pet.save_pretrained(directory)            # saving into it replaces the old layout
    assert sorted(os.listdir(directory)) == sorted([ADAPTER_CONFIG_NAME, os.path.basename(adapter_weights_path(
        directory))])


def test_the_next_save_removes_what_killed_saves_left(tmp_path):
    pet = _trained_pet()
    directory = pet.save_pretrained(str(tmp_path / 'a'))
    current = os.path.basename(adapter_weights_path(directory))
    left = ['.adapter_model.0123456789abcdef.safetensors.999999.0123456789ab.tmp',
            '.adapter_config.yaml.999999.ba9876543210.tmp', 'adapter_model.fedcba9876543210.safetensors']
    kept = ['notes.txt', '.hidden.tmp', 'adapter_model.other.safetensors']     # not files a save writes
    for name in left + kept:
        (tmp_path / 'a' / name).write_bytes(b'partial')
    assert load_adapter_dir(directory).targets == ['fc1', 'fc2']      # leftovers do not disturb readers
    pet.base_model.fc1.mindpet_delta_lora_a.set_data(Tensor(np.ones((2, 8), np.float32)))
    pet.save_pretrained(directory)
    new = os.path.basename(adapter_weights_path(directory))
    assert new != current
    assert sorted(os.listdir(directory)) == sorted([ADAPTER_CONFIG_NAME, new] + kept)


def test_a_second_writer_waits_for_the_lock_and_gives_up_with_a_clear_error(tmp_path):
    pet = _trained_pet()
    directory = pet.save_pretrained(str(tmp_path / 'a'))
    before = _config_text(directory)
    with directory_lock(directory):
        with pytest.raises(CheckpointError, match=f"Another process has been writing into '{directory}'"):
            with directory_lock(directory, timeout=0.05):
                pass
        # save_pretrained waits for the lock: it is not held by this thread's save, so run it with a short timeout.
        with mock.patch('mindpet.utils.dir_commit.LOCK_TIMEOUT_S', 0.05):
            for fmt in ('mindpet', 'peft'):       # every format's writers are serialised
                with pytest.raises(CheckpointError, match='Another process'):
                    pet.save_pretrained(directory, format=fmt)
    assert _config_text(directory) == before and len(os.listdir(directory)) == 2
    pet.save_pretrained(directory)   # the lock is free again


def test_a_peft_save_removes_what_a_killed_peft_save_left(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])   # a process id that no longer runs
    dead.wait()
    directory = tmp_path / 'p'
    directory.mkdir()
    left = [f'.adapter_model.safetensors.{dead.pid}.k2j4h5g6.tmp.safetensors',
            f'.adapter_config.json.{dead.pid}.a1b2c3d4.tmp']
    alive = f'.adapter_config.json.{os.getppid()}.e5f6a7b8.tmp'         # its writer still runs: kept
    for name in left + [alive]:
        (directory / name).write_bytes(b'partial')
    _trained_pet().save_pretrained(str(directory), format='peft')
    assert sorted(os.listdir(directory)) == sorted([alive, 'adapter_config.json', 'adapter_model.safetensors'])


def test_a_directory_holds_one_format(tmp_path):
    pet = _trained_pet()
    mine = pet.save_pretrained(str(tmp_path / 'm'))
    peft = pet.save_pretrained(str(tmp_path / 'p'), format='peft')
    before = {d: sorted(os.listdir(d)) for d in (mine, peft)}
    with pytest.raises(AdapterConfigError, match=f"'{mine}' holds a 'mindpet' adapter .*adapter_config.yaml.*'peft'"):
        pet.save_pretrained(mine, format='peft')
    with pytest.raises(AdapterConfigError, match=f"'{peft}' holds a 'peft' adapter .*adapter_config.json"):
        pet.save_pretrained(peft)
    assert {d: sorted(os.listdir(d)) for d in (mine, peft)} == before
    assert detect_format(mine) == 'mindpet' and detect_format(peft) == 'peft'


# ----- PEFT's fixed file names: the directory is built beside the target and swapped in ---------------------------
def _peft_values(directory):
    adapter = load_adapter_dir(directory)
    return {key: dict(tensors) for key, tensors in adapter.layers.items()}, adapter.config.lora_alpha


def _assert_values(directory, pet, alpha):
    layers, loaded_alpha = _peft_values(directory)
    assert loaded_alpha == alpha
    for key in ('fc1', 'fc2'):
        np.testing.assert_array_equal(layers[key]['mindpet_delta_lora_a'],
                                      getattr(pet.base_model, key).mindpet_delta_lora_a.asnumpy())


def test_a_peft_save_swaps_in_a_new_directory_and_keeps_the_other_files(tmp_path):
    directory = str(tmp_path / 'p')
    _trained_pet(seed=0).save_pretrained(directory, format='peft')
    before = os.stat(directory).st_ino
    (tmp_path / 'p' / 'README.md').write_text('mine')
    (tmp_path / 'p' / 'notes').mkdir()
    (tmp_path / 'p' / 'notes' / 'a.txt').write_text('kept')
    os.symlink('README.md', str(tmp_path / 'p' / 'link'))
    os.chmod(directory, 0o750)
    pet = _trained_pet(seed=1, alpha=6)
    assert pet.save_pretrained(directory, format='peft') == directory
    assert os.stat(directory).st_ino != before                             # another directory: swapped in
    assert sorted(os.listdir(directory)) == ['README.md', 'adapter_config.json', 'adapter_model.safetensors',
                                             'link', 'notes']
    assert (tmp_path / 'p' / 'README.md').read_text() == 'mine' and os.readlink(str(tmp_path / 'p' / 'link')) == \
        'README.md' and (tmp_path / 'p' / 'notes' / 'a.txt').read_text() == 'kept'
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o750
    assert os.listdir(str(tmp_path)) == ['p']                              # the old directory is gone
    _assert_values(directory, pet, 6)


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() != 0, reason='only root can give a directory away')
def test_a_peft_save_by_root_keeps_the_directory_owner(tmp_path):
    directory = str(tmp_path / 'p')
    _trained_pet(seed=0).save_pretrained(directory, format='peft')
    os.chown(directory, 12345, 12346)
    os.chmod(directory, 0o2770)                     # set-gid: chown would clear it if done after chmod
    before = os.stat(directory).st_ino
    _trained_pet(seed=1).save_pretrained(directory, format='peft')
    after = os.stat(directory)
    assert after.st_ino != before and (after.st_uid, after.st_gid) == (12345, 12346)
    assert stat.S_IMODE(after.st_mode) == 0o2770


@pytest.mark.parametrize('failure', ['no renameat2', 'EINVAL'])
def test_a_peft_save_writes_file_by_file_where_directories_cannot_be_exchanged(tmp_path, failure):
    directory = str(tmp_path / 'p')
    _trained_pet(seed=0).save_pretrained(directory, format='peft')
    before = os.stat(directory).st_ino
    pet = _trained_pet(seed=1, alpha=6)
    if failure == 'no renameat2':
        patch = mock.patch('mindpet.utils.dir_commit._renameat2', lambda: None)
    else:        # e.g. a file system without RENAME_EXCHANGE
        patch = mock.patch('mindpet.utils.dir_commit.exchange', side_effect=OSError(22, 'Invalid argument'))
    with patch:
        pet.save_pretrained(directory, format='peft')
    assert os.stat(directory).st_ino == before and os.listdir(str(tmp_path)) == ['p']
    assert sorted(os.listdir(directory)) == ['adapter_config.json', 'adapter_model.safetensors']
    _assert_values(directory, pet, 6)


def test_a_peft_save_from_inside_the_directory_keeps_the_working_directory(tmp_path, monkeypatch):
    directory = str(tmp_path / 'p')
    _trained_pet(seed=0).save_pretrained(directory, format='peft')
    monkeypatch.chdir(directory)
    before = os.stat('.').st_ino
    pet = _trained_pet(seed=1, alpha=6)
    pet.save_pretrained('.', format='peft')
    assert os.stat('.').st_ino == before == os.stat(directory).st_ino      # written in place, cwd still valid
    _assert_values(directory, pet, 6)


def test_a_lock_taken_on_a_directory_swapped_out_meanwhile_is_taken_again(tmp_path):
    """A writer that waited for the lock of a directory which the previous writer swapped out must lock the one now
    at the path, or a third writer could lock that one and write at the same time."""
    import fcntl  # pylint: disable=import-outside-toplevel
    from mindpet.utils import dir_commit  # pylint: disable=import-outside-toplevel
    directory, other = str(tmp_path / 'p'), str(tmp_path / 'q')
    os.makedirs(directory)
    os.makedirs(other)
    real_locked, calls = dir_commit._locked, []  # pylint: disable=protected-access

    def locked_then_swapped(*args):
        fd = real_locked(*args)
        if not calls:
            dir_commit.exchange(other, directory)      # what a writer does while this one waits
        calls.append(os.fstat(fd).st_ino)
        return fd

    with mock.patch.object(dir_commit, '_locked', locked_then_swapped):
        with directory_lock(directory):
            assert len(calls) == 2 and calls[1] == os.stat(directory).st_ino != calls[0]
            probe = os.open(directory, os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):          # the directory at the path is the locked one
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(probe)


def test_a_peft_reader_reads_both_files_from_one_save(tmp_path):
    """The directory is swapped between the reader's two files: it reads again, and gets the new save whole."""
    from mindpet import peft_format  # pylint: disable=import-outside-toplevel
    old, new = str(tmp_path / 'p'), str(tmp_path / 'new')
    _trained_pet(seed=0, alpha=4).save_pretrained(old, format='peft')
    pet = _trained_pet(seed=1, alpha=6)
    pet.save_pretrained(new, format='peft')
    real_read, reads = peft_format._read_config, []  # pylint: disable=protected-access

    def read_then_swap(directory):
        result = real_read(directory)
        if not reads:
            from mindpet.utils.dir_commit import exchange  # pylint: disable=import-outside-toplevel
            exchange(new, old)                         # after the config was read, before the tensors
        reads.append(result[1]['lora_alpha'])
        return result

    with mock.patch.object(peft_format, '_read_config', read_then_swap):
        layers, alpha = _peft_values(old)
    assert reads == [4, 6] and alpha == 6
    np.testing.assert_array_equal(layers['fc1']['mindpet_delta_lora_a'],
                                  pet.base_model.fc1.mindpet_delta_lora_a.asnumpy())
