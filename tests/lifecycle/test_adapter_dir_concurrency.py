"""An adapter directory is one unit: SIGKILLed saves (mindpet's format and PEFT's), two concurrent writers and a reader,
leftovers of killed saves.
Every wait has a generous timeout so that a hang fails the test; nothing asserts on wall-clock time.

The writers are processes forked by tests/helpers/adapter_writer.py that call ``PetModel.save_pretrained`` into one
directory in a loop (PyNative, no graph compiled); each save is recognisable from its name, its ``lora_alpha`` and
its tensors alike, so a load that mixed two saves is caught even if the checksums did not refuse it.
"""
import os
import random
import signal
import time

import pytest

from mindpet.adapter_store import ADAPTER_CONFIG_NAME, adapter_weights_path, load_adapter_dir
from mindpet.peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME

from tests.helpers.adapter_writer import identify, new_pet, save_version
from tests.helpers.fork_client import ROOT, ForkServerClient

SERVER = os.path.join(ROOT, 'tests', 'helpers', 'adapter_writer.py')
KILLS = 24
LOADS = 2000
PEFT_LOADS = 500      # a PEFT load reads through MindSpore's checkpoint loader: slower


def _leftovers(directory):
    """(temporary files, tensor files) in ``directory``."""
    names = os.listdir(directory)
    return ([n for n in names if n.endswith('.tmp')],
            [n for n in names if n.startswith('adapter_model.') and n.endswith('.safetensors')])


def _kill(server, pid):
    os.kill(pid, signal.SIGKILL)
    server.send(f'wait {pid}')
    # SIGKILL takes effect when the writer leaves the kernel: an fsync on a busy disk can hold it there for long.
    status = int(server.expect('EXIT', 300))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the writer ended by itself: {status}"


def _kill_saves_in_a_loop(tmp_path, fmt, leftovers):
    """SIGKILL :data:`KILLS` processes looping over ``save_pretrained(directory, format=fmt)``, at random moments.
    After each kill the directory must load as one save (of one writer, never older than before) and
    ``leftovers(directory)`` (which asserts that at most one killed save's files remain) says whether the kill left a
    partial save. Then one more save must clean up. Returns ``(saves committed, kills that left a partial save)``."""
    directory = str(tmp_path / 'adapter')
    save_version(new_pet(), directory, 0, 0, fmt)
    rng = random.Random(11)
    server = ForkServerClient(SERVER, str(tmp_path / 'server.log'))
    newest, torn = 0, 0
    try:
        server.expect('READY', 300)
        for kill in range(KILLS):
            server.send(f'loop {directory} 0 {newest + 1} {fmt}')
            pid = int(server.expect('PID', 60))
            if kill % 4 == 0:     # at any moment, start-up included
                time.sleep(rng.uniform(0.0, 0.5))
            else:                 # once this writer has saved, at a random moment of its loop
                server.expect('SAVED', 300)
                time.sleep(rng.uniform(0.0, 0.05))
            _kill(server, pid)
            adapter = load_adapter_dir(directory)          # loads, checksums and all
            writer, n = identify(adapter)                  # one save, not a mix
            assert writer == 0 and n >= newest, f"went back from save {newest} to save {n}"
            newest = n
            torn += leftovers(directory)
        save_version(new_pet(), directory, 0, newest + 1, fmt)
    finally:
        server.close()
    assert identify(load_adapter_dir(directory)) == (0, newest + 1)
    print(f"\n{fmt}: {KILLS} SIGKILLs, {torn} left a partial save behind, {newest} saves committed")
    assert newest >= KILLS // 2, f"the writers hardly saved between kills ({newest} saves)"
    return directory


@pytest.mark.slow
def test_sigkill_during_save_pretrained_leaves_the_old_or_the_new_adapter(tmp_path):
    def leftovers(directory):
        temp, weights = _leftovers(directory)
        # What one killed save can leave: a temporary file, and a tensor file no config names yet. Whatever
        # an earlier kill left is gone (the next save cleans it), so nothing piles up.
        assert len(temp) <= 1 and len(weights) <= 2, (temp, weights)
        return bool(temp or set(weights) - {os.path.basename(adapter_weights_path(directory))})

    directory = _kill_saves_in_a_loop(tmp_path, 'mindpet', leftovers)
    temp, weights = _leftovers(directory)
    assert temp == [] and sorted(os.listdir(directory)) == sorted([ADAPTER_CONFIG_NAME] + weights) and len(weights) == 1


def _staging_dirs(directory):
    """The directories that PEFT-format saves into ``directory`` build beside it (``.adapter.<pid>.<random>.tmp``)."""
    parent, name = os.path.split(directory)
    return [n for n in os.listdir(parent) if n.startswith(f'.{name}.') and n.endswith('.tmp')]


@pytest.mark.slow
def test_sigkill_during_a_peft_format_save_leaves_the_old_or_the_new_adapter(tmp_path):
    """PEFT's fixed file names: the directory is built beside the target and swapped in (dir_commit), so a kill
    between its two files cannot leave the new tensors beside the old config."""
    def leftovers(directory):
        # Inside: PEFT's two files only. Beside: at most the killed save's staging directory (new files not yet
        # swapped in, or the old directory not yet removed).
        assert sorted(os.listdir(directory)) == [PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME]
        staging = _staging_dirs(directory)
        assert len(staging) <= 1, staging
        return bool(staging)

    directory = _kill_saves_in_a_loop(tmp_path, 'peft', leftovers)
    assert _staging_dirs(directory) == [] and sorted(os.listdir(directory)) == [PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME]


def _two_writers_and_a_reader(tmp_path, fmt, loads):
    """Two processes save into one directory in a loop while this one loads it ``loads`` times: every load must be
    one save. Returns the directory."""
    directory = str(tmp_path / 'adapter')
    save_version(new_pet(), directory, 1, 0, fmt)
    server = ForkServerClient(SERVER, str(tmp_path / 'server.log'))
    seen, pids = {}, []
    try:
        server.expect('READY', 300)
        for writer in (1, 2):
            server.send(f'loop {directory} {writer} 1 {fmt}')
            pids.append(int(server.expect('PID', 60)))
        started = set()
        while started != {1, 2}:                       # until both have saved once
            started.add(int(server.expect('SAVED', 300).split()[0]))
        for _ in range(loads):
            writer, n = identify(load_adapter_dir(directory))
            seen.setdefault(writer, set()).add(n)
        for pid in pids:
            _kill(server, pid)
    finally:
        server.close()
    changes = sum(len(v) for v in seen.values())
    print(f"\n{fmt}: {loads} loads, zero mixed, {changes} different saves seen (writer 1: {len(seen.get(1, ()))}, "
          f"writer 2: {len(seen.get(2, ()))})")
    # Both writers' saves were read while the other was writing: the loads above raced with commits.
    assert set(seen) == {1, 2} and changes >= 10, seen
    return directory


@pytest.mark.slow
def test_two_writers_and_a_reader_never_see_a_mixed_adapter(tmp_path):
    directory = _two_writers_and_a_reader(tmp_path, 'mindpet', LOADS)
    temp, weights = _leftovers(directory)
    assert len(temp) <= 2 and len(weights) <= 3, (temp, weights)   # killed mid-save, each at most one file


@pytest.mark.slow
def test_two_peft_format_writers_and_a_reader_never_see_a_mixed_adapter(tmp_path):
    """PEFT's fixed names: the writers swap whole directories (each waits for the lock of the directory now at the
    path), and the reader reads again when the directory was swapped between its two files."""
    directory = _two_writers_and_a_reader(tmp_path, 'peft', PEFT_LOADS)
    assert sorted(os.listdir(directory)) == [PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME]
    assert len(_staging_dirs(directory)) <= 2        # killed mid-save, each at most one staging directory
