"""The runner's memory default (mindpet.utils.ms_settings): compile before the first step, then gc + malloc_trim.
It must be applied by default, be switchable off by MINDPET_RELEASE_MEMORY=0, hand freed heap pages back, and leave
every number of a run unchanged."""
import ctypes
import ctypes.util
import json
import os

import numpy as np
import pytest
import mindspore as ms

from mindpet.train import runner
from mindpet.utils import ms_settings
from mindpet.utils.ms_settings import RELEASE_ENV, release_enabled, release_free_memory
from tests.train.test_runner import small_config

GLIBC = ctypes.util.find_library('c') is not None and hasattr(ctypes.CDLL(ctypes.util.find_library('c')),
                                                               'malloc_trim')


@pytest.fixture(autouse=True)
def _pynative_afterwards():
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.parametrize('value, expected', [(None, True), ('1', True), ('on', True), (' TRUE ', True),
                                             ('0', False), ('off', False), ('No', False)])
def test_release_switch_reads_the_environment(value, expected):
    environ = {} if value is None else {RELEASE_ENV: value}
    assert release_enabled(environ) is expected


def test_a_malformed_switch_is_refused_naming_variable_and_value():
    with pytest.raises(ValueError, match=r"'MINDPET_RELEASE_MEMORY' must be one of .*'1'.*'0'.*but got 'maybe'"):
        release_enabled({RELEASE_ENV: 'maybe'})


def _rss_mb():
    with open('/proc/self/status', encoding='utf-8') as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith('VmRSS:')) / 1024.0


@pytest.mark.skipif(not GLIBC or not os.path.exists('/proc/self/status'), reason='glibc malloc_trim and /proc')
def test_release_hands_freed_heap_pages_back():
    """80 MB of 4 KB blocks freed below a block still in use stay resident (glibc does not trim the middle of its
    heap by itself); release_free_memory gives them back."""
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    blocks = []
    for _ in range(20000):
        block = libc.malloc(4096)
        libc.memset(block, 1, 4096)
        blocks.append(block)
    pinned = libc.malloc(64)            # keeps the freed blocks below the top of the heap
    for block in blocks:
        libc.free(block)
    before = _rss_mb()
    assert release_free_memory() is True
    after = _rss_mb()
    libc.free(pinned)
    assert before - after > 40, (before, after)
    assert release_free_memory() in (True, False)   # a second call has (almost) nothing left to give


def _run(tmp_path, monkeypatch, value):
    """A small mlp LoRA run (GRAPH_MODE, 6 steps) with MINDPET_RELEASE_MEMORY=value; returns its metrics and what
    compile_then_release answered each time the runner called it."""
    if value is None:
        monkeypatch.delenv(RELEASE_ENV, raising=False)
    else:
        monkeypatch.setenv(RELEASE_ENV, value)
    calls = []

    def spy(cell, *inputs):
        calls.append(ms_settings.compile_then_release(cell, *inputs))
        return calls[-1]
    monkeypatch.setattr(runner, 'compile_then_release', spy)
    tmp_path.mkdir()
    path = small_config(tmp_path, training__checkpoint_interval=0)
    runner.finetune(path, out=lambda *_: None)
    with open(os.path.join(tmp_path, 'out', 'metrics.json'), encoding='utf-8') as fh:
        return json.load(fh), calls


@pytest.mark.skipif(not GLIBC, reason='glibc malloc_trim')
def test_run_applies_release_by_default_and_computes_the_same_losses(tmp_path, monkeypatch):
    default, calls_on = _run(tmp_path / 'on', monkeypatch, None)
    off, calls_off = _run(tmp_path / 'off', monkeypatch, '0')
    # Applied once, before the first step (malloc_trim answered), and not at all when switched off.
    assert len(calls_on) == 1 and isinstance(calls_on[0], bool)
    assert calls_off == [None]
    assert len(default['losses']) == len(off['losses']) == 6
    np.testing.assert_array_equal(default['losses'], off['losses'])
    assert default['eval']['after'] == off['eval']['after']
    # The compilation moved in front of the first step is still counted in the first step's reported time.
    for metrics in (default, off):
        assert metrics['step_times'][0] > 10 * np.median(metrics['step_times'][1:])


def test_a_malformed_switch_stops_the_run_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv(RELEASE_ENV, 'sometimes')
    with pytest.raises(ValueError, match="MINDPET_RELEASE_MEMORY"):
        runner.finetune(small_config(tmp_path), out=lambda *_: None)
    assert not os.path.exists(os.path.join(tmp_path, 'out', 'metrics.json'))
