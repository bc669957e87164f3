"""Bad input to the checkpoint callback, base+delta loading and resuming, adapter save/load and the ``mindpet`` CLI
(exit code 1 and a one-line message): one table of bad calls (runner, Row and Files in tests/bad_input.py). The adapter
store's refusals (edited config, escaping ``weights_file``, format clashes, disk full, permission denied) also check,
through :func:`_refused`, that the PetModel and the directory are exactly as before the call.

Separate tests check that a failed load, save or merge leaves the network and the target directory exactly as they
were, and that unreadable paths (chmod 000; as root the check runs in a child without the capabilities that bypass
permissions) give one clear error each.
"""
import contextlib
import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
from mindspore import nn, Tensor

from mindpet import LoraConfig, PetModel, cli, get_pet_model
from mindpet.graph import freeze_delta, TrainableParamsCheckPoint
from mindpet.graph.ckpt_util import load_base_and_delta, resume_from_checkpoint, save_trainable_params
from mindpet.adapter_store import ADAPTER_CONFIG_NAME, adapter_weights_path, load_adapter_dir, merge_into_checkpoint
from mindpet.peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from mindpet.utils import dir_commit
from mindpet.utils.exceptions import (AdapterConfigError, CheckpointError, LinkPathError, MakeDirError,
                                      ModelConfigKeysInfoError,
                                      ReadYamlFileError)

from tests.bad_input import (CliError, Files, Row, assert_same_state, check_row, check_table, pet, rows, run_cli,
                             state)
from tests.nets import LoRAMLP, PlainMLP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETPRIV = ['setpriv', '--bounding-set=-dac_override,-dac_read_search,-fowner', '--']


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    f = Files(str(tmp_path_factory.mktemp('bad_input')))
    _add_store_files(f)
    return f


def _add_store_files(f):
    """The adapter directories of the store rows, and ``f.model``, a PetModel with one trained adapter that the
    refused loads must leave alone."""
    j = lambda *parts: os.path.join(f.root, *parts)  # noqa: E731
    f.model = get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1', 'fc2'], lora_rank=2, lora_alpha=8))
    rng = np.random.RandomState(7)
    for param in f.model.trainable_params():
        param.set_data(Tensor(rng.randn(*param.shape).astype(np.float32)))
    meta = open(os.path.join(f.adapter, ADAPTER_CONFIG_NAME), encoding='utf-8').read()
    assert 'lora_alpha: 4\n' in meta
    f.adapter_alpha = f._adapter_copy('adapter_alpha', meta=meta.replace('lora_alpha: 4\n', 'lora_alpha: 400\n'))
    f.adapter_dotdot = f._adapter_copy('adapter_dotdot', meta=re.sub(r'weights_file: \S+',
                                                                      'weights_file: ../x.safetensors', meta))
    f.adapter_absolute = f._adapter_copy('adapter_absolute', meta=re.sub(r'weights_file: \S+',
                                                                          'weights_file: /etc/passwd', meta))
    f.adapter_symlink = f._adapter_copy('adapter_symlink')
    weights = adapter_weights_path(f.adapter_symlink)
    shutil.move(weights, j('outside.safetensors'))
    os.symlink(j('outside.safetensors'), weights)          # the name the config records, leading out of the dir
    f.peft = j('peft')
    get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1', 'fc2'], lora_rank=2)).save_pretrained(
        f.peft, format='peft')
    f.adapter_two_formats = f._adapter_copy('adapter_two_formats')
    shutil.copy(os.path.join(f.peft, PEFT_CONFIG_NAME), f.adapter_two_formats)
    f.adapter_peft_tensors = f._adapter_copy('adapter_peft_tensors')
    shutil.copy(os.path.join(f.peft, PEFT_WEIGHTS_NAME), adapter_weights_path(f.adapter_peft_tensors))
    f.peft_own_tensors = j('peft_own_tensors')
    shutil.copytree(f.peft, f.peft_own_tensors)
    shutil.copy(adapter_weights_path(f.adapter), os.path.join(f.peft_own_tensors, PEFT_WEIGHTS_NAME))
    f.save_target = f._adapter_copy('save_target')
    f.merged_dir = j('merged')
    os.makedirs(f.merged_dir)
    merge_into_checkpoint(f.base, f.adapter, os.path.join(f.merged_dir, 'merged.ckpt'))


def _model_state(model):
    return model.adapters, model.active_adapter, sorted(model.pet_layers), state(model)


def _loaded(directory):
    """The tensors of the adapter in ``directory``, or the type of the error its load raises."""
    try:
        adapter = load_adapter_dir(directory)
    except Exception as ex:  # pylint: disable=broad-except
        return type(ex)
    return {(key, name): value for key, tensors in adapter.layers.items() for name, value in tensors.items()}


def _assert_same_loaded(before, after):
    if isinstance(before, type):
        assert after is before
        return
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=str(key))


def _refused(call, directory=None):
    """A row's call that also checks the state after the refusal: ``f.model`` (adapters, active adapter, adapted
    layers, every parameter's value) and ``directory(f)`` (every file's bytes; it loads bit-identically, or fails
    as before) are as they were."""
    def run(f):
        path = directory(f) if directory else None
        before = _model_state(f.model), path and _listing(path), path and _loaded(path)
        try:
            call(f)
        finally:
            adapters, active, layers, params = _model_state(f.model)
            assert (adapters, active, layers) == before[0][:3]
            assert_same_state(before[0][3], params)
            if path:
                assert _listing(path) == before[1]
                _assert_same_loaded(before[2], _loaded(path))
    return run


class _OsProxy:
    """Stands in for the ``os`` module of ``mindpet.utils.dir_commit`` (see the subclasses)."""

    def __getattr__(self, name):
        return getattr(os, name)


class _NoPermission(_OsProxy):
    """Creating a file fails as in a directory without write permission."""

    def open(self, path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, 'Permission denied', path)
        return os.open(path, flags, *args, **kwargs)


@contextlib.contextmanager
def _read_only(directory):
    """``directory`` cannot be written into: chmod 0555, or (as root, which chmod does not stop) creating a file
    fails with EACCES."""
    if os.geteuid() != 0:
        os.chmod(directory, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        try:
            yield
        finally:
            os.chmod(directory, stat.S_IRWXU)
        return
    real = dir_commit.os
    dir_commit.os = _NoPermission()
    try:
        yield
    finally:
        dir_commit.os = real


@contextlib.contextmanager
def _disk_full(ok=0):
    """The disk fills up after ``ok`` file writes of ``mindpet.utils.dir_commit``."""
    real = dir_commit.os
    dir_commit.os = _DiskFullAfter(ok)
    try:
        yield
    finally:
        dir_commit.os = real


def _merge_with_full_disk(f):
    """``merge_into_checkpoint`` over an earlier output, with MindSpore's writer finding the disk full halfway."""
    out = os.path.join(f.merged_dir, 'merged.ckpt')

    def half_then_full(save_obj, path, **kwargs):   # pylint: disable=unused-argument
        with open(path, 'wb') as handle:
            handle.write(b'\0' * 100)
        raise OSError(errno.ENOSPC, 'No space left on device')

    with mock.patch('mindspore.save_checkpoint', half_then_full):
        merge_into_checkpoint(f.base, f.adapter, out)


def _save_with(context, directory, fmt='mindpet'):
    def call(f):
        with context(directory(f)) if context is _read_only else context():
            f.model.save_pretrained(directory(f), format=fmt)
    return call


# Each call takes the Files; fragments must all be in str(exception).
ROWS = [
    # ----- checkpoint callback -------------------------------------------------------------------------------------
    Row('callback-dir-int', lambda f: TrainableParamsCheckPoint(3), TypeError, ["'directory'", '3 (int)']),
    Row('callback-dir-empty', lambda f: TrainableParamsCheckPoint(''), ValueError, ["'directory'", "''"]),
    Row('callback-prefix-slash', lambda f: TrainableParamsCheckPoint(f.root, prefix='a/b'), ValueError,
        ["'prefix'", "'a/b'"]),
    Row('callback-config-dict', lambda f: TrainableParamsCheckPoint(f.root, config={'save_checkpoint_steps': 1}),
        TypeError, ["'config'", '(dict)']),
    Row('callback-optimizer-int', lambda f: TrainableParamsCheckPoint(f.root, save_optimizer_state=1), TypeError,
        ["'save_optimizer_state'", '1 (int)']),
    Row('callback-rank-dirs-str', lambda f: TrainableParamsCheckPoint(f.root, rank_dirs='yes'), TypeError,
        ["'rank_dirs'", "'yes' (str)"]),
    Row('callback-dir-is-file', lambda f: TrainableParamsCheckPoint(f.not_a_dir).on_train_begin(None),
        MakeDirError, ['not_a_dir.txt', 'not a directory']),
    # ----- base + delta loading, resume, saving ----------------------------------------------------------------------
    Row('load-net-str', lambda f: load_base_and_delta('net', f.base, f.delta), TypeError, ["'net'", "'net' (str)"]),
    Row('load-strict-str', lambda f: load_base_and_delta(LoRAMLP(), f.base, f.delta, strict_base='yes'), TypeError,
        ["'strict_base'", "'yes' (str)"]),
    Row('load-base-missing', lambda f: load_base_and_delta(LoRAMLP(), f.missing, f.delta), CheckpointError,
        ['missing.ckpt', 'does not exist']),
    Row('load-base-path-int', lambda f: load_base_and_delta(LoRAMLP(), 3, f.delta), TypeError,
        ['base checkpoint path', '3 (int)']),
    Row('load-base-dir', lambda f: load_base_and_delta(LoRAMLP(), f.a_dir, f.delta), CheckpointError,
        ['a_dir.ckpt', 'is a directory']),
    Row('load-delta-empty', lambda f: load_base_and_delta(LoRAMLP(), f.base, f.empty), CheckpointError,
        ['empty.ckpt', 'is empty']),
    Row('load-delta-truncated', lambda f: load_base_and_delta(LoRAMLP(), f.base, f.delta_trunc), CheckpointError,
        ['delta_trunc.ckpt', 'truncated or corrupt']),
    Row('load-delta-byte-flipped', lambda f: load_base_and_delta(LoRAMLP(), f.base, f.delta_flip), CheckpointError,
        ['delta_flip.ckpt', 'truncated or corrupt']),
    Row('load-delta-other-model', lambda f: load_base_and_delta(LoRAMLP(), f.base, f.delta_other), CheckpointError,
        ["'fc1.mindpet_delta_lora_a'", 'delta_other.ckpt', '(2, 8)', '(4, 8)']),
    Row('load-base-other-model', lambda f: load_base_and_delta(LoRAMLP(), f.base_other, f.delta), CheckpointError,
        ["'fc1.weight'", 'base_other.ckpt', '(8, 8)', '(16, 8)']),
    Row('load-files-swapped', lambda f: load_base_and_delta(LoRAMLP(), f.delta, f.base), CheckpointError,
        ['base.ckpt', "'fc1.mindpet_delta_lora_a'"]),
    Row('resume-network-str', lambda f: resume_from_checkpoint(f.resume_dir, 'x'), TypeError,
        ["'network'", "'x' (str)"]),
    Row('resume-dir-int', lambda f: resume_from_checkpoint(3, LoRAMLP()), TypeError, ["'directory'", '3 (int)']),
    Row('resume-optimizer-int', lambda f: resume_from_checkpoint(f.resume_dir, LoRAMLP(), optimizer=3), TypeError,
        ["'optimizer'", '3 (int)']),
    Row('resume-prefix-empty', lambda f: resume_from_checkpoint(f.resume_dir, LoRAMLP(), prefix=''), ValueError,
        ["'prefix'", "''"]),
    Row('resume-only-corrupt', lambda f: resume_from_checkpoint(f.resume_dir, LoRAMLP()), CheckpointError,
        ['None of the 1 checkpoint', 'DELTA_CKP-1_1.ckpt', 'truncated or corrupt']),
    Row('save-trainable-path-int', lambda f: save_trainable_params(LoRAMLP(), 3), TypeError, ["'path'", '3 (int)']),
    Row('save-trainable-format', lambda f: save_trainable_params(LoRAMLP(), f.missing, ckpt_format='npz'),
        ValueError, ["'ckpt_format'", "'npz'"]),
    Row('save-trainable-to-dir', lambda f: save_trainable_params(LoRAMLP(), f.a_dir), IsADirectoryError,
        ['a_dir.ckpt', 'is a directory']),
    # ----- adapter save / load --------------------------------------------------------------------------------------
    Row('adapter-dir-missing', lambda f: PetModel.from_pretrained(PlainMLP(), f.missing), AdapterConfigError,
        ['missing.ckpt', 'does not exist']),
    Row('adapter-dir-is-file', lambda f: PetModel.from_pretrained(PlainMLP(), f.base), AdapterConfigError,
        ['base.ckpt', 'is a file']),
    Row('adapter-other-model', lambda f: PetModel.from_pretrained(PlainMLP(), f.adapter_other), AdapterConfigError,
        ["'fc1.weight'", '(16, 8)', '(8, 8)']),
    Row('adapter-byte-flipped', lambda f: PetModel.from_pretrained(PlainMLP(), f.adapter_flip), CheckpointError,
        ['adapter_flip', 'SHA-256']),
    Row('adapter-truncated', lambda f: PetModel.from_pretrained(PlainMLP(), f.adapter_trunc), CheckpointError,
        ['adapter_trunc', 'truncated or corrupt']),
    Row('adapter-no-weights', lambda f: PetModel.from_pretrained(PlainMLP(), f.adapter_noweights), CheckpointError,
        ['adapter_noweights', 'adapter_model.', '.safetensors', 'does not exist']),
    Row('adapter-yaml-typo', lambda f: PetModel.from_pretrained(PlainMLP(), f.adapter_typo), ModelConfigKeysInfoError,
        ['adapter_typo', "'lora_rnak'", "did you mean 'lora_rank'"]),
    Row('adapter-yaml-wrong-type', lambda f: PetModel.from_pretrained(PlainMLP(), f.adapter_wrongtype),
        AdapterConfigError, ['adapter_wrongtype', "'lora_rank'", "'two' (str)"]),
    Row('adapter-yaml-invalid', lambda f: PetModel.from_pretrained(PlainMLP(), f.adapter_badyaml), ReadYamlFileError,
        ['adapter_badyaml', 'not valid YAML']),
    Row('adapter-load-name-taken', lambda f: pet().load_adapter(f.adapter, 'default'), ValueError,
        ["'default'", 'already exists']),
    Row('adapter-load-trainable-str', lambda f: pet().load_adapter(f.adapter, 'x', is_trainable='y'), TypeError,
        ["'is_trainable'", "'y' (str)"]),
    Row('adapter-set-unknown', lambda f: pet().set_adapter('nope'), ValueError, ["'nope'", 'does not exist']),
    Row('adapter-delete-unknown', lambda f: pet().delete_adapter('zz'), ValueError, ["'zz'", 'does not exist']),
    Row('adapter-save-unknown', lambda f: pet().save_pretrained(f.missing, adapter_name='nope'), ValueError,
        ["'nope'", 'does not exist']),
    Row('adapter-save-dir-int', lambda f: pet().save_pretrained(3), TypeError, ["'save_directory'", '3 (int)']),
    Row('adapter-save-into-file', lambda f: pet().save_pretrained(f.not_a_dir), MakeDirError,
        ['not_a_dir.txt', 'not a directory']),
    Row('adapter-weighted-lengths', lambda f: pet().add_weighted_adapter(['default'], [1.0, 2.0], 'm'), ValueError,
        ["'weights'", '[1.0, 2.0]']),
    Row('adapter-weighted-type', lambda f: pet().add_weighted_adapter(['default'], [1.0], 'm', combination_type='avg'),
        ValueError, ["'combination_type'", "'avg'"]),
    # ----- adapter store refusals: the PetModel and the directory stay as they were ----------------------------------
    Row('adapter-config-edited', _refused(lambda f: f.model.load_adapter(f.adapter_alpha, 'new'),
                                          lambda f: f.adapter_alpha), AdapterConfigError,
        [os.path.join('adapter_alpha', ADAPTER_CONFIG_NAME), 'edited after saving', "'adapter_sha256'",
         "(edited: 'pet.lora_alpha')"]),
    Row('adapter-weights-file-dotdot', _refused(lambda f: f.model.load_adapter(f.adapter_dotdot, 'new'),
                                                lambda f: f.adapter_dotdot), AdapterConfigError,
        [os.path.join('adapter_dotdot', ADAPTER_CONFIG_NAME), "'weights_file'", "'../x.safetensors'"]),
    Row('adapter-weights-file-absolute', _refused(lambda f: f.model.load_adapter(f.adapter_absolute, 'new'),
                                                  lambda f: f.adapter_absolute), AdapterConfigError,
        [os.path.join('adapter_absolute', ADAPTER_CONFIG_NAME), "'weights_file'", "'/etc/passwd'"]),
    Row('adapter-weights-file-symlink', _refused(lambda f: f.model.load_adapter(f.adapter_symlink, 'new'),
                                                 lambda f: f.adapter_symlink), LinkPathError,
        [os.path.join('adapter_symlink', 'adapter_model.'), 'symbolic link']),
    Row('adapter-weights-file-missing', _refused(lambda f: f.model.load_adapter(f.adapter_noweights, 'new'),
                                                 lambda f: f.adapter_noweights), CheckpointError,
        [os.path.join('adapter_noweights', 'adapter_model.'), 'does not exist']),
    Row('adapter-two-formats', _refused(lambda f: f.model.load_adapter(f.adapter_two_formats, 'new'),
                                        lambda f: f.adapter_two_formats), AdapterConfigError,
        ['adapter_two_formats', ADAPTER_CONFIG_NAME, PEFT_CONFIG_NAME, 'one adapter per directory']),
    Row('adapter-peft-tensor-file', _refused(lambda f: f.model.load_adapter(f.adapter_peft_tensors, 'new'),
                                             lambda f: f.adapter_peft_tensors), CheckpointError,
        [os.path.join('adapter_peft_tensors', 'adapter_model.'), "'base_model.model.fc1.lora_A.weight'",
         "Hugging Face PEFT's"]),
    Row('peft-own-tensor-file', _refused(lambda f: f.model.load_adapter(f.peft_own_tensors, 'new'),
                                         lambda f: f.peft_own_tensors), CheckpointError,
        [os.path.join('peft_own_tensors', PEFT_WEIGHTS_NAME), "'fc1.mindpet_delta_lora_a'", "mindpet's own format"]),
    Row('adapter-save-peft-over-mindpet',
        _refused(lambda f: f.model.save_pretrained(f.save_target, format='peft'), lambda f: f.save_target),
        AdapterConfigError, ['save_target', f"'mindpet' adapter ({ADAPTER_CONFIG_NAME})", "'peft'"]),
    Row('adapter-save-mindpet-over-peft', _refused(lambda f: f.model.save_pretrained(f.peft), lambda f: f.peft),
        AdapterConfigError, [f"'{os.sep}", f"peft' holds a 'peft' adapter ({PEFT_CONFIG_NAME})", "'mindpet'"]),
    Row('adapter-save-disk-full', _refused(_save_with(_disk_full, lambda f: f.save_target), lambda f: f.save_target),
        CheckpointError, [os.path.join('save_target', 'adapter_model.'), 'No space left on device', 'errno 28']),
    Row('adapter-save-permission', _refused(_save_with(_read_only, lambda f: f.save_target),
                                            lambda f: f.save_target),
        CheckpointError, [os.path.join('save_target', 'adapter_model.'), 'Permission denied']),
    Row('peft-save-disk-full-weights', _refused(_save_with(_disk_full, lambda f: f.peft, 'peft'), lambda f: f.peft),
        CheckpointError, [os.path.join('peft', PEFT_WEIGHTS_NAME), 'No space left on device', 'errno 28']),
    # The tensor file is written, the config is not: the directory still holds the old pair, not a mix.
    Row('peft-save-disk-full-config', _refused(_save_with(lambda: _disk_full(ok=1), lambda f: f.peft, 'peft'),
                                               lambda f: f.peft),
        CheckpointError, [os.path.join('peft', PEFT_CONFIG_NAME), 'No space left on device']),
    Row('peft-save-permission', _refused(_save_with(_read_only, lambda f: f.peft, 'peft'), lambda f: f.peft),
        CheckpointError, [os.path.join('peft', PEFT_WEIGHTS_NAME), 'Permission denied']),
    Row('merge-disk-full', _refused(_merge_with_full_disk, lambda f: f.merged_dir), CheckpointError,
        [os.path.join('merged', 'merged.ckpt'), 'No space left on device', 'errno 28']),
    Row('merge-out-path-int', lambda f: merge_into_checkpoint(f.base, f.adapter, 3), TypeError,
        ["'out_path'", '3 (int)']),
    # ----- the mindpet command ---------------------------------------------------------------------------------------
    Row('cli-inspect-missing', lambda f: run_cli('inspect', f.missing), CliError, ['missing.ckpt', 'does not exist']),
    Row('cli-inspect-truncated', lambda f: run_cli('inspect', f.delta_trunc), CliError,
        ['delta_trunc.ckpt', 'truncated or corrupt']),
    Row('cli-inspect-byte-flipped', lambda f: run_cli('inspect', f.delta_flip), CliError,
        ['delta_flip.ckpt', 'truncated or corrupt']),
    Row('cli-inspect-adapter-yaml', lambda f: run_cli('inspect', f.adapter_badyaml), CliError,
        ['adapter_badyaml', 'not valid YAML']),
    Row('cli-inspect-adapter-flipped', lambda f: run_cli('inspect', f.adapter_flip), CliError,
        ['adapter_flip', 'SHA-256']),
    Row('cli-merge-adapter-missing', lambda f: run_cli('merge', '--base', f.base, '--adapter', f.missing,
                                                       '--out', f.missing), CliError, ['missing.ckpt', 'does not exist']),
    Row('cli-merge-base-truncated', lambda f: run_cli('merge', '--base', f.delta_trunc, '--adapter', f.adapter,
                                                      '--out', f.missing), CliError,
        ['delta_trunc.ckpt', 'truncated or corrupt']),
    Row('cli-merge-base-other-model', lambda f: run_cli('merge', '--base', f.base_other, '--adapter', f.adapter,
                                                        '--out', f.missing), CliError,
        ["'fc1.weight'", 'base_other.ckpt']),
    Row('cli-merge-out-extension', lambda f: run_cli('merge', '--base', f.base, '--adapter', f.adapter,
                                                     '--out', os.path.join(f.root, 'merged.npz')), CliError,
        ["'out_path'", 'merged.npz']),
    Row('cli-merge-out-is-dir', lambda f: run_cli('merge', '--base', f.base, '--adapter', f.adapter,
                                                  '--out', f.out_dir_ckpt), CliError,
        ['out_is_dir.ckpt', 'is a directory']),
]

EXPECTED_ROWS = 71


def test_table_size():
    check_table(ROWS, EXPECTED_ROWS)


@rows(ROWS)
def test_bad_call(row, files):
    check_row(row, files)


def _listing(directory):
    """name -> bytes of every file under ``directory`` (temporary files included)."""
    out = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, 'rb') as handle:
                out[os.path.relpath(path, directory)] = handle.read()
    return out


def test_failed_base_and_delta_load_leaves_the_net_unchanged(files):
    net = LoRAMLP(seed=5)
    freeze_delta(net, 'lora')
    rng = np.random.RandomState(1)
    for param in net.get_parameters():
        param.set_data(Tensor(np.asarray(rng.randn(*param.shape), np.float32)))
    before = state(net)
    bad = [(files.base, files.delta_trunc), (files.base, files.delta_flip), (files.base, files.delta_other),
           (files.base_other, files.delta), (files.delta, files.base), (files.base, files.empty),
           (files.missing, files.delta), (files.a_dir, files.delta)]
    for base, delta in bad:
        with pytest.raises(CheckpointError):
            load_base_and_delta(net, base, delta)
        assert_same_state(before, state(net))
    with pytest.raises(CheckpointError):
        resume_from_checkpoint(files.resume_dir, net)
    assert_same_state(before, state(net))
    report = load_base_and_delta(net, files.base, files.delta)             # the good pair still loads
    assert sorted(report.delta_loaded) == sorted(p.name for p in net.trainable_params())
    assert not np.array_equal(net.fc1.mindpet_delta_lora_a.asnumpy(), before['fc1.mindpet_delta_lora_a'][0])


def test_failed_adapter_load_leaves_the_pet_model_unchanged(files):
    model = get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1', 'fc2'], lora_rank=2, lora_alpha=4))
    rng = np.random.RandomState(2)
    for param in model.trainable_params():
        param.set_data(Tensor(rng.randn(*param.shape).astype(np.float32)))
    x = Tensor(rng.randn(3, 8).astype(np.float32))
    out = model(x).asnumpy()
    before, layers = state(model), sorted(model.pet_layers)
    broken = {files.adapter_flip: CheckpointError, files.adapter_trunc: CheckpointError,
              files.adapter_noweights: CheckpointError, files.adapter_typo: ModelConfigKeysInfoError,
              files.adapter_wrongtype: AdapterConfigError, files.adapter_badyaml: ReadYamlFileError,
              files.adapter_other: AdapterConfigError, files.missing: AdapterConfigError,
              files.base: AdapterConfigError}
    for directory, error in broken.items():
        with pytest.raises(error):
            model.load_adapter(directory, 'new')
        assert model.adapters == ['default'] and model.active_adapter == 'default'
        assert sorted(model.pet_layers) == layers
        assert_same_state(before, state(model))
    np.testing.assert_array_equal(model(x).asnumpy(), out)
    model.load_adapter(files.adapter, 'new')                                # the intact copy loads
    assert model.adapters == ['default', 'new']


def test_failed_from_pretrained_leaves_the_model_unadapted(files):
    model = PlainMLP()
    before = state(model)
    for directory in (files.adapter_flip, files.adapter_other, files.adapter_typo, files.adapter_trunc):
        with pytest.raises((CheckpointError, AdapterConfigError, ModelConfigKeysInfoError)):
            PetModel.from_pretrained(model, directory)
        assert type(model.fc1) is nn.Dense and type(model.fc2) is nn.Dense  # pylint: disable=unidiomatic-typecheck
        assert_same_state(before, state(model))



class _DiskFullAfter(_OsProxy):
    """The file writes after the first ``ok`` ones put half of their bytes on disk, then fail as a full disk does."""

    def __init__(self, ok):
        self.ok = ok
        self.calls = 0

    def write(self, fd, data):
        self.calls += 1
        if self.calls <= self.ok:
            return os.write(fd, data)
        os.write(fd, bytes(data[:len(data) // 2]))
        raise OSError(28, 'No space left on device')


def test_failed_save_keeps_the_previous_adapter_whole(files, tmp_path, monkeypatch):
    """A save that fails while writing the tensor file, or the config after it, leaves the directory as it was:
    the previous adapter byte-identical and loadable, no temporary file, and a CheckpointError naming the file."""
    import mindpet.utils.dir_commit as dir_commit  # pylint: disable=import-outside-toplevel
    model = get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1'], lora_rank=2))
    target = str(tmp_path / 'adapter')
    model.save_pretrained(target)
    saved = _listing(target)
    model.base_model.fc1.mindpet_delta_lora_b.set_data(Tensor(np.ones((16, 2), np.float32)))
    for ok, failing in ((0, 'adapter_model.'), (1, ADAPTER_CONFIG_NAME)):
        monkeypatch.setattr(dir_commit, 'os', _DiskFullAfter(ok))
        with pytest.raises(CheckpointError, match='No space left') as info:
            model.save_pretrained(target)
        monkeypatch.undo()
        assert os.path.join(target, failing) in str(info.value) and '.tmp' not in str(info.value)
        assert _listing(target) == saved
        loaded = PetModel.from_pretrained(PlainMLP(), target)
        np.testing.assert_array_equal(loaded.base_model.fc1.mindpet_delta_lora_b.asnumpy(), np.zeros((16, 2)))
    model.save_pretrained(target)          # with room again: the new adapter replaces the old one
    loaded = PetModel.from_pretrained(PlainMLP(), target)
    np.testing.assert_array_equal(loaded.base_model.fc1.mindpet_delta_lora_b.asnumpy(), np.ones((16, 2)))
    assert len(_listing(target)) == 2


def test_failed_merge_writes_nothing(files, tmp_path):
    out = str(tmp_path / 'merged.ckpt')
    with pytest.raises(CliError):
        run_cli('merge', '--base', files.base_other, '--adapter', files.adapter, '--out', out)
    assert os.listdir(str(tmp_path)) == []
    assert cli.main(['merge', '--base', files.base, '--adapter', files.adapter, '--out', out]) == 0
    good = _listing(str(tmp_path))
    for base, adapter in ((files.delta_trunc, files.adapter), (files.base, files.adapter_flip),
                          (files.base_other, files.adapter)):
        with pytest.raises(CliError):
            run_cli('merge', '--base', base, '--adapter', adapter, '--out', out)
        assert _listing(str(tmp_path)) == good                             # the earlier output is untouched


# ----- unreadable and unwritable paths -------------------------------------------------------------------------------
_CHILD = r'''
import contextlib, io, json, os, sys
import mindspore as ms
ms.set_context(device_target='CPU')
from mindpet import LoraConfig, PetModel, cli, config_from_yaml, get_pet_model
from mindpet.graph import freeze_from_config
from mindpet.graph.ckpt_util import load_base_and_delta
from tests.nets import LoRAMLP, PlainMLP
paths = json.loads(sys.argv[1])
calls = {
    'ckpt': lambda: load_base_and_delta(LoRAMLP(), paths['base'], paths['delta']),
    'yaml': lambda: config_from_yaml(paths['yaml']),
    'freeze': lambda: freeze_from_config(LoRAMLP(), paths['yaml']),
    'adapter_dir': lambda: PetModel.from_pretrained(PlainMLP(), paths['adapter_dir']),
    'adapter_weights': lambda: PetModel.from_pretrained(PlainMLP(), paths['adapter_weights']),
    'save_into': lambda: get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1'])).save_pretrained(
        paths['readonly']),
    'save_below': lambda: get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1'])).save_pretrained(
        os.path.join(paths['readonly'], 'sub')),
}
report = {}
for name, call in calls.items():
    try:
        call()
        report[name] = ['no error', '']
    except Exception as ex:  # pylint: disable=broad-except
        report[name] = [type(ex).__name__, str(ex)]
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = cli.main(['inspect', paths['base']])
report['cli'] = [code, err.getvalue()]
print(json.dumps(report))
'''


def test_unreadable_and_unwritable_paths_give_one_clear_error(files, tmp_path):
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which('setpriv'):
            pytest.skip('running as root without setpriv: permission bits cannot be enforced')
        prefix = SETPRIV
    root = str(tmp_path)
    paths = {'base': os.path.join(root, 'base.ckpt'), 'delta': files.delta,
             'yaml': os.path.join(root, 'pet.yaml'), 'adapter_dir': os.path.join(root, 'adapter_dir'),
             'adapter_weights': os.path.join(root, 'adapter_weights'), 'readonly': os.path.join(root, 'readonly')}
    shutil.copy(files.base, paths['base'])
    shutil.copy(files.pet_typo, paths['yaml'])
    shutil.copytree(files.adapter, paths['adapter_dir'])
    shutil.copytree(files.adapter, paths['adapter_weights'])
    os.makedirs(paths['readonly'])
    weights = adapter_weights_path(paths['adapter_weights'])
    for path in (paths['base'], paths['yaml'], weights):
        os.chmod(path, 0)
    os.chmod(paths['adapter_dir'], 0)
    os.chmod(paths['readonly'], stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    env = {k: v for k, v in os.environ.items() if not k.startswith('MS_COMPILER_CACHE')}
    env.update(PYTHONPATH=ROOT, GLOG_v='3')
    try:
        proc = subprocess.run(prefix + [sys.executable, '-B', '-c', _CHILD, json.dumps(paths)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
    finally:
        for path in (paths['base'], paths['yaml'], weights,
                     paths['adapter_dir'], paths['readonly']):
            os.chmod(path, stat.S_IRWXU)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    denied = 'Permission denied'
    expected = {'ckpt': ('CheckpointError', ['base.ckpt', 'cannot be read', denied]),
                'yaml': ('ReadYamlFileError', ['pet.yaml', 'cannot be read', denied]),
                'freeze': ('ReadYamlFileError', ['pet.yaml', 'cannot be read', denied]),
                'adapter_dir': ('AdapterConfigError', ['adapter_dir', 'cannot be read', denied]),
                'adapter_weights': ('CheckpointError', ['adapter_weights', os.path.basename(weights), denied]),
                'save_into': ('CheckpointError', [os.path.join('readonly', 'adapter_model.'), denied]),
                'save_below': ('MakeDirError', [os.path.join('readonly', 'sub'), denied])}
    for name, (error, fragments) in expected.items():
        kind, message = report[name]
        assert kind == error, (name, report[name])
        assert all(fragment in message for fragment in fragments), (name, message)
        assert '.tmp' not in message, (name, message)                    # the destination, not a temporary name
    code, err = report['cli']
    assert code == 1 and err.count('\n') == 1 and err.startswith('mindpet inspect: error: '), err
    assert 'base.ckpt' in err and denied in err
    assert os.listdir(paths['readonly']) == []                          # nothing written, not even a temp file
