"""SIGKILL a training run at random moments while it checkpoints after every step, again and again.

A quarter of the kills come at any moment after the fork (start-up and resume included); the others once the run
has saved, half of those aimed into a write (the test waits until a checkpoint's temporary file appears). After
every kill: every complete checkpoint left in the directory loads (CRC verified), the newest one is at least
as new as before the kill, and the newest ``keep_checkpoint_max`` steps are all there (pruning happens only after
the new file is durable). Each next run resumes from the newest checkpoint (adapter, Adam state, step); at the end
the adapter equals that of one uninterrupted run of the same number of steps.
"""
import os
import random
import re
import signal
import time

import numpy as np
import pytest

from mindpet.graph import list_checkpoints, find_latest_checkpoint
from mindpet.utils.io_utils import load_checkpoint_file

from tests.helpers.fork_client import ROOT, ForkServerClient

ZYGOTE = os.path.join(ROOT, 'tests', 'helpers', 'crash_zygote.py')
KILLS = 24
KEEP = 3  # crash_zygote.KEEP


def _temp_files(directory):
    try:
        return {name for name in os.listdir(directory) if name.startswith('.crash-')}
    except FileNotFoundError:
        return set()


def _wait_for_write_in_progress(directory, old, deadline):
    """Poll until a new checkpoint temporary file exists (a write is under way), to aim the kill into it."""
    while time.time() < deadline:
        if _temp_files(directory) - old:
            return
        time.sleep(0.0005)


def _wait_for_progress(directory, newest, deadline):
    """Poll until a checkpoint newer than step ``newest`` exists."""
    while time.time() < deadline:
        steps = _steps(list_checkpoints(directory, 'crash'))
        if steps and steps[-1] > newest:
            return
        time.sleep(0.002)


def _steps(paths):
    return [int(re.search(r'-(\d+)_1\.ckpt$', p).group(1)) for p in paths]


@pytest.mark.slow
def test_sigkill_during_checkpointing_never_loses_the_newest_complete_checkpoint(tmp_path):
    start = time.time()
    ckpt_dir = str(tmp_path / 'ckpt')
    rng = random.Random(7)
    zygote = ForkServerClient(ZYGOTE, str(tmp_path / 'zygote.log'))
    kills, torn_writes, newest, seen_temp = 0, 0, 0, set()
    try:
        zygote.expect('READY', 300)
        # No wall-clock budget (it failed on loaded machines): every wait below has its own timeout, so a hung
        # zygote or run fails the test instead of hanging it, and the loop makes exactly KILLS rounds. The timeouts
        # only catch hangs, so they are generous: the zygote's start-up is one MindSpore import (8-11 s measured on
        # a loaded machine), and the whole test takes 20-27 s on an idle one (doc/checkpoints.md).
        while kills < KILLS:
            zygote.send(f'run {ckpt_dir} 100000')
            pid = int(zygote.expect('PID', 60))
            if kills % 4 == 0:  # any moment, start-up and resume included
                time.sleep(rng.uniform(0.05, 0.8))
            else:  # once this run has saved (start-up takes ~0.5 s, longer on a busy machine), at a random moment
                _wait_for_progress(ckpt_dir, newest, deadline=time.time() + 5.0)
                time.sleep(rng.uniform(0.0, 0.3))
                if kills % 2:  # aimed into a write
                    _wait_for_write_in_progress(ckpt_dir, seen_temp, deadline=time.time() + 1.0)
            os.kill(pid, signal.SIGKILL)
            status = int(zygote.expect('EXIT', 60))
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
                f"the run ended by itself (status {status}); see {tmp_path / 'zygote.log'}"
            kills += 1
            # A new temporary file left behind means the kill landed inside a checkpoint write.
            left = _temp_files(ckpt_dir)
            torn_writes += bool(left - seen_temp)
            seen_temp |= left
            files = list_checkpoints(ckpt_dir, 'crash')
            steps = _steps(files)
            if not files:
                assert newest == 0, "every checkpoint vanished after a kill"
                continue
            for path in files:  # every complete file is whole (CRC checked)
                load_checkpoint_file(path)
            assert find_latest_checkpoint(ckpt_dir, 'crash') == files[-1]
            assert steps[-1] >= newest, f"the newest checkpoint went back from step {newest} to {steps[-1]}"
            newest = steps[-1]
            assert steps == list(range(newest - len(steps) + 1, newest + 1)), f"a step is missing: {steps}"
            assert min(KEEP, newest) <= len(steps) <= KEEP + 1, f"pruned early or not at all: {steps}"

        # Finish the interrupted run, and run the same number of steps in one go: same adapter.
        total = newest + 3
        zygote.send(f'run {ckpt_dir} {total} {tmp_path / "resumed.npz"}')
        assert zygote.expect('EXIT', 300) == '0'
        zygote.send(f'run {tmp_path / "straight"} {total} {tmp_path / "straight.npz"}')
        assert zygote.expect('EXIT', 300) == '0'
    finally:
        zygote.close()
    resumed, straight = np.load(tmp_path / 'resumed.npz'), np.load(tmp_path / 'straight.npz')
    assert sorted(resumed.files) == ['0.mindpet_delta_lora_a', '0.mindpet_delta_lora_b']
    for name in resumed.files:
        np.testing.assert_allclose(resumed[name], straight[name], rtol=1e-6, atol=1e-7)
    assert _steps(list_checkpoints(ckpt_dir, 'crash'))[-1] == total
    assert _temp_files(ckpt_dir) == set(), "temporary files of killed writers were not cleaned up"
    elapsed = time.time() - start
    print(f"\n{kills} SIGKILLs, {torn_writes} inside a checkpoint write, newest step {newest}, {elapsed:.1f} s")
    assert newest >= KILLS // 2, f"the runs hardly progressed between kills (newest step {newest})"
    assert torn_writes >= KILLS // 4, f"only {torn_writes} kills landed inside a checkpoint write"
