"""The bad-input table's shared parts: a ``Row`` (a call, the exception it must raise, the message fragments that
must all appear: the argument's name and, where there is one, the value received; for files, the file and what is
wrong with it), the one runner every area's table uses (:func:`rows` + :func:`check_row`), the good, corrupted and
foreign files the rows read (:class:`Files`), and the helpers several areas' rows call.

The tables live with their area: tests/delta/test_bad_input.py (every delta Cell constructor and ``shard()``),
tests/tuners/test_bad_input.py (configs, injection, property-based tests of the config parser),
tests/lifecycle/test_bad_input.py (checkpoint callback, base+delta loading and resuming, adapter save/load, the
``mindpet`` CLI, failed calls that must change nothing, unreadable paths) and tests/train/test_bad_input.py
(freezing).
"""
import contextlib
import io
import os
import shutil
from collections import namedtuple

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindpet import LoraConfig, cli, get_pet_model
from mindpet.graph import freeze_delta
from mindpet.graph.ckpt_util import save_trainable_params
from mindpet.adapter_store import ADAPTER_CONFIG_NAME, adapter_weights_path

from tests.nets import LoRAMLP, PlainMLP

Row = namedtuple('Row', ['id', 'call', 'exc', 'fragments'])


def rows(table):
    """``@rows(TABLE)`` parametrises a test over the table's rows, named by their ids."""
    return pytest.mark.parametrize('row', table, ids=[row.id for row in table])


def check_row(row, files=None):
    """Run one row: the call (given the :class:`Files`; None for rows that read none) must raise ``row.exc`` with
    every fragment in its message."""
    with pytest.raises(row.exc) as info:
        row.call(files)
    message = str(info.value)
    missing = [fragment for fragment in row.fragments if fragment not in message]
    assert not missing, f"{row.id}: {missing} not in {message!r}"


def check_table(table, expected_rows):
    """The table has ``expected_rows`` rows (none lost in an edit) with unique ids."""
    assert len(table) == expected_rows, len(table)
    assert len({row.id for row in table}) == len(table)


class CliError(Exception):
    """The one-line stderr message of a ``mindpet`` command that exited with code 1."""


# ----- files every file/config row reads (built once) ----------------------------------------------------------
class Files:
    """Paths of good, corrupted and foreign files in one temporary directory."""

    def __init__(self, root):
        self.root = root
        j = lambda *parts: os.path.join(root, *parts)  # noqa: E731
        self.not_a_dir = _write(j('not_a_dir.txt'), b'plain text\n')
        self.a_dir = j('a_dir.ckpt')
        os.makedirs(self.a_dir)
        self.missing = j('missing.ckpt')
        self.base = j('base.ckpt')
        ms.save_checkpoint(PlainMLP(), self.base)
        net = LoRAMLP()
        freeze_delta(net, 'lora')
        self.delta = save_trainable_params(net, j('delta.ckpt'))
        other = LoRAMLP(rank=2)
        freeze_delta(other, 'lora')
        self.delta_other = save_trainable_params(other, j('delta_other.ckpt'))
        self.base_other = j('base_other.ckpt')
        ms.save_checkpoint(PlainMLP(hidden=8), self.base_other)
        data = open(self.delta, 'rb').read()
        self.delta_trunc = _write(j('delta_trunc.ckpt'), data[:len(data) // 2])
        self.delta_flip = _write(j('delta_flip.ckpt'), _flip(data, len(data) - 20))
        self.empty = _write(j('empty.ckpt'), b'')
        self.resume_dir = j('resume')
        os.makedirs(self.resume_dir)
        _write(os.path.join(self.resume_dir, 'DELTA_CKP-1_1.ckpt'), data[:len(data) // 3])

        pet = get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1', 'fc2'], lora_rank=2, lora_alpha=4))
        rng = np.random.RandomState(0)
        for param in pet.trainable_params():
            param.set_data(Tensor(rng.randn(*param.shape).astype(np.float32)))
        self.adapter = j('adapter')
        pet.save_pretrained(self.adapter)
        weights = open(adapter_weights_path(self.adapter), 'rb').read()
        meta_text = open(os.path.join(self.adapter, ADAPTER_CONFIG_NAME), encoding='utf-8').read()
        self.adapter_flip = self._adapter_copy('adapter_flip', weights=_flip(weights, len(weights) - 10))
        self.adapter_trunc = self._adapter_copy('adapter_trunc', weights=weights[:len(weights) // 2])
        self.adapter_typo = self._adapter_copy('adapter_typo', meta=meta_text.replace('lora_rank:', 'lora_rnak:'))
        self.adapter_wrongtype = self._adapter_copy('adapter_wrongtype',
                                                    meta=meta_text.replace('lora_rank: 2', 'lora_rank: two'))
        self.adapter_badyaml = self._adapter_copy('adapter_badyaml', meta='pet: [unclosed\n')
        self.adapter_noweights = self._adapter_copy('adapter_noweights')
        os.remove(adapter_weights_path(self.adapter_noweights))
        other_pet = get_pet_model(PlainMLP(hidden=8), LoraConfig(target_modules=['fc1'], lora_rank=2))
        self.adapter_other = j('adapter_other')
        other_pet.save_pretrained(self.adapter_other)

        self.pet_typo = _write(j('pet_typo.yaml'), b'pet:\n  type: lora\n  target_modules: [fc1]\n  lora_ranks: 4\n')
        self.pet_wrongtype = _write(j('pet_wrongtype.yaml'),
                                    b'pet:\n  type: lora\n  target_modules: [fc1]\n  lora_rank: four\n')
        self.pet_dropout = _write(j('pet_dropout.yaml'),
                                  b'pet:\n  type: lora\n  target_modules: [fc1]\n  lora_dropout: "0.1"\n')
        self.pet_bad = _write(j('pet_bad.yaml'), b'pet: [unclosed\n')
        self.pet_nosection = _write(j('pet_nosection.yaml'), b'model: {}\n')
        self.pet_list = _write(j('pet_list.yaml'), b'pet: [lora, 4]\n')
        self.freeze_typo = _write(j('freeze_typo.yaml'), b'freeze:\n  includ: ["*"]\n')
        self.freeze_str = _write(j('freeze_str.yaml'), b'freeze:\n  include: "*"\n')
        self.freeze_nosection = _write(j('freeze_nosection.yaml'), b'pet: {}\n')
        self.freeze_nomatch = _write(j('freeze_nomatch.yaml'), b'freeze:\n  include: ["*zzz*"]\n')
        self.out_dir_ckpt = j('out_is_dir.ckpt')
        os.makedirs(self.out_dir_ckpt)

    def _adapter_copy(self, name, weights=None, meta=None):
        path = os.path.join(self.root, name)
        shutil.copytree(self.adapter, path)
        if weights is not None:
            _write(adapter_weights_path(path), weights)
        if meta is not None:
            _write(os.path.join(path, ADAPTER_CONFIG_NAME), meta.encode())
        return path


def _write(path, data):
    with open(path, 'wb') as handle:
        handle.write(data)
    return path


def _flip(data, index):
    data = bytearray(data)
    data[index] ^= 0xFF
    return bytes(data)


# ----- helpers used in rows -------------------------------------------------------------------------------------
def run_cli(*argv):
    """Run ``mindpet argv`` in-process; require exit code 1 and exactly one stderr line, then raise it."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli.main(list(argv))
    text = err.getvalue()
    assert code == 1, (code, text)
    assert text.startswith(f'mindpet {argv[0]}: error: ') and text.count('\n') == 1, text
    assert 'Traceback' not in text and out.getvalue() == ''
    raise CliError(text)


def pet(**kw):
    return get_pet_model(PlainMLP(), LoraConfig(target_modules=['fc1'], lora_rank=2, **kw))


def state(net):
    """name -> (value, requires_grad) of every Parameter."""
    return {p.name: (p.asnumpy().copy(), p.requires_grad) for p in net.get_parameters()}


def assert_same_state(before, after):
    assert list(before) == list(after)
    for name, (value, grad) in before.items():
        np.testing.assert_array_equal(after[name][0], value, err_msg=name)
        assert after[name][1] == grad, name

