"""Crash safety and resume of adapter checkpoints, and rank-aware writing (fast, single process).

The multi-process parts (SIGKILL during checkpointing, 2-worker data parallel) are in lifecycle/test_crash_safety.py and
train/test_distributed.py.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor
from mindspore.train.callback import CheckpointConfig, RunContext
import mindspore.dataset as ds

from mindpet.delta import LoRADense
from mindpet.graph import (TrainableParamsCheckPoint, freeze_delta, load_base_and_delta, resume_from_checkpoint,
                           find_latest_checkpoint, list_checkpoints, save_trainable_params)
from mindpet.graph import ckpt_util
from mindpet.utils.exceptions import CheckpointError
from mindpet.utils.io_utils import atomic_save_checkpoint, load_checkpoint_file

IN, OUT, RANK = 6, 4, 2


def _net(seed=0):
    """A LoRA layer with fixed (seeded numpy) initial values, so two builds are bit-identical."""
    rng = np.random.default_rng(seed)
    layer = LoRADense(IN, OUT, lora_rank=RANK, lora_alpha=4, compute_dtype=ms.float32,
                      weight_init=Tensor(rng.normal(size=(OUT, IN)).astype(np.float32)),
                      bias_init=Tensor(rng.normal(size=(OUT,)).astype(np.float32)),
                      lora_a_init=Tensor(rng.normal(size=(RANK, IN)).astype(np.float32)))
    net = nn.SequentialCell(layer)
    freeze_delta(net, 'lora')
    return net


def _data(batches=2, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batches * 4, IN)).astype(np.float32)
    y = rng.normal(size=(batches * 4, OUT)).astype(np.float32)
    return ds.NumpySlicesDataset((x, y), column_names=['x', 'y'], shuffle=False).batch(4)


def _model(net):
    return ms.Model(net, nn.MSELoss(), nn.Adam(net.trainable_params(), learning_rate=0.05))


def _adapter(net):
    return {p.name: p.asnumpy().copy() for p in net.trainable_params()}


class _Args(dict):
    """What Model.train hands to callbacks: a dict with attribute access."""
    __getattr__ = dict.__getitem__


def _fake_run_context(net, step, epoch=1, batch_num=4):
    return RunContext(_Args(cur_step_num=step, cur_epoch_num=epoch, batch_num=batch_num, network=net,
                            train_network=net))


def test_resume_continues_exactly_in_compiled_graph(tmp_path, graph_mode):
    """3 epochs straight == 2 epochs, checkpoint, (state disturbed), resume into the compiled graph, 1 more epoch."""
    ref = _net()
    _model(ref).train(3, _data(), dataset_sink_mode=False)
    expected = _adapter(ref)

    net = _net()
    model = _model(net)
    cb = TrainableParamsCheckPoint(str(tmp_path), prefix='run', save_optimizer_state=True,
                                   config=CheckpointConfig(save_checkpoint_steps=1, keep_checkpoint_max=3))
    model.train(2, _data(), callbacks=[cb], dataset_sink_mode=False)
    names = [os.path.basename(p) for p in list_checkpoints(str(tmp_path), 'run')]
    assert names == ['run-1_2.ckpt', 'run-2_1.ckpt', 'run-2_2.ckpt']
    # Disturb the adapter and the optimizer state (more training, no checkpoint): resume must undo both.
    model.train(2, _data(seed=7), dataset_sink_mode=False)
    assert not np.allclose(_adapter(net)['0.mindpet_delta_lora_b'], expected['0.mindpet_delta_lora_b'])

    state = resume_from_checkpoint(str(tmp_path), net, model.train_network, prefix='run')
    assert os.path.basename(state.path) == 'run-2_2.ckpt'
    assert (state.epoch, state.step_in_epoch, state.step, state.batch_num, state.initial_epoch) == (2, 2, 4, 2, 2)
    assert sorted(state.adapter_loaded) == ['0.mindpet_delta_lora_a', '0.mindpet_delta_lora_b']
    assert {'global_step', 'beta1_power', 'moment1.0.mindpet_delta_lora_b'} <= set(state.optimizer_loaded)
    assert int(model.train_network.optimizer.global_step.asnumpy().reshape(-1)[0]) == 4
    model.train(3, _data(), callbacks=[cb], dataset_sink_mode=False, initial_epoch=state.initial_epoch)
    for name, value in _adapter(net).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-7)
    # The continued run numbered its files by global position, and pruned to keep_checkpoint_max.
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path), 'run')] == \
        ['run-2_2.ckpt', 'run-3_1.ckpt', 'run-3_2.ckpt']
    assert load_checkpoint_file(str(tmp_path / 'run-3_2.ckpt'))['mindpet_meta_step'].asnumpy().item() == 6


def test_resume_without_optimizer_state_differs(tmp_path):
    """Resuming only the adapter (fresh Adam moments) does not reproduce the uninterrupted run: the state matters."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ref = _net()
    _model(ref).train(2, _data(), dataset_sink_mode=False)
    net = _net()
    cb = TrainableParamsCheckPoint(str(tmp_path), config=CheckpointConfig(save_checkpoint_steps=2))
    _model(net).train(1, _data(), callbacks=[cb], dataset_sink_mode=False)
    fresh = _net(seed=5)
    model = _model(fresh)
    state = resume_from_checkpoint(str(tmp_path), fresh, model.train_network)
    assert state.optimizer_loaded == [] and state.step == 2
    np.testing.assert_array_equal(_adapter(fresh)['0.mindpet_delta_lora_b'], _adapter(net)['0.mindpet_delta_lora_b'])
    model.train(2, _data(), dataset_sink_mode=False, initial_epoch=state.initial_epoch)
    assert np.abs(_adapter(fresh)['0.mindpet_delta_lora_b'] - _adapter(ref)['0.mindpet_delta_lora_b']).max() > 1e-4


def test_callback_file_loads_with_load_base_and_delta(tmp_path):
    """Metadata and optimizer state in a callback file are skipped (and reported) by load_base_and_delta."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    net = _net()
    cb = TrainableParamsCheckPoint(str(tmp_path), save_optimizer_state=True,
                                   config=CheckpointConfig(append_info=['epoch_num', 'step_num']))
    _model(net).train(1, _data(), callbacks=[cb], dataset_sink_mode=False)
    raw = load_checkpoint_file(cb.latest_ckpt_file_name)
    assert raw['epoch_num'].asnumpy().item() == 1 and raw['step_num'].asnumpy().item() == 2
    base = str(tmp_path / 'base.ckpt')
    atomic_save_checkpoint([p for p in net.get_parameters() if 'delta' not in p.name], base)
    other = _net(seed=3)
    report = load_base_and_delta(other, base, cb.latest_ckpt_file_name)
    assert sorted(report.delta_loaded) == ['0.mindpet_delta_lora_a', '0.mindpet_delta_lora_b']
    assert 'moment1.0.mindpet_delta_lora_a' in report.delta_ignored and 'epoch_num' in report.delta_ignored
    assert not any(n.startswith('mindpet_meta_') for n in report.delta_ignored)
    for name, value in _adapter(net).items():
        np.testing.assert_array_equal(_adapter(other)[name], value)


def test_newest_unreadable_checkpoint_is_passed_over(tmp_path):
    net = _net()
    cb = TrainableParamsCheckPoint(str(tmp_path), prefix='p', config=CheckpointConfig(keep_checkpoint_max=5))
    cb.on_train_begin(_fake_run_context(net, 0))
    saved = {}
    for step in (1, 2, 3):
        net[0].mindpet_delta_lora_b.set_data(Tensor(np.full((OUT, RANK), step, np.float32)))
        cb.on_train_step_end(_fake_run_context(net, step))
        saved[step] = cb.latest_ckpt_file_name
    # One flipped byte in the newest file: the CRC check refuses it, resume falls back to step 2.
    blob = bytearray(open(saved[3], 'rb').read())
    blob[len(blob) // 2] ^= 0x10
    with open(saved[3], 'wb') as handle:
        handle.write(blob)
    with pytest.raises(CheckpointError, match='p-1_3.ckpt'):
        load_checkpoint_file(saved[3])
    assert find_latest_checkpoint(str(tmp_path), 'p') == saved[2]
    assert find_latest_checkpoint(str(tmp_path), 'p', verify=False) == saved[3]
    net[0].mindpet_delta_lora_b.set_data(Tensor(np.zeros((OUT, RANK), np.float32)))
    state = resume_from_checkpoint(str(tmp_path), net, prefix='p')
    assert state.path == saved[2] and state.step == 2 and [p for p, _ in state.skipped] == [saved[3]]
    np.testing.assert_array_equal(net[0].mindpet_delta_lora_b.asnumpy(), np.full((OUT, RANK), 2, np.float32))
    for path in saved.values():
        with open(path, 'wb') as handle:
            handle.write(b'\0' * 64)
    with pytest.raises(CheckpointError, match="None of the 3 checkpoint"):
        resume_from_checkpoint(str(tmp_path), net, prefix='p')
    assert resume_from_checkpoint(str(tmp_path / 'never_written'), net, prefix='p') is None


def test_temp_files_are_ignored_and_stale_ones_removed(tmp_path):
    net = _net()
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    stale = tmp_path / f'.p-1_9.ckpt.{dead.pid}.abc123.tmp.ckpt'
    live = tmp_path / f'.p-1_8.ckpt.{os.getppid()}.abc123.tmp.ckpt'
    for path in (stale, live):
        path.write_bytes(b'partial')
    assert list_checkpoints(str(tmp_path), 'p') == [] and find_latest_checkpoint(str(tmp_path), 'p') is None
    assert resume_from_checkpoint(str(tmp_path), net, prefix='p') is None
    cb = TrainableParamsCheckPoint(str(tmp_path), prefix='p')
    cb.on_train_begin(_fake_run_context(net, 0))
    assert not stale.exists() and live.exists()
    cb.on_train_step_end(_fake_run_context(net, 1))
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, 'p-1_1.ckpt'])


def test_failed_write_prunes_nothing(tmp_path, monkeypatch):
    """Older files are removed only after the new one is durable: a write that fails keeps all of them."""
    net = _net()
    cb = TrainableParamsCheckPoint(str(tmp_path), prefix='p', config=CheckpointConfig(keep_checkpoint_max=2))
    cb.on_train_begin(_fake_run_context(net, 0))
    for step in (1, 2):
        cb.on_train_step_end(_fake_run_context(net, step))
    before = list_checkpoints(str(tmp_path), 'p')

    def disk_full(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(ms, 'save_checkpoint', disk_full)
    with pytest.raises(CheckpointError, match=r"^Cannot write the checkpoint '.*p-1_3\.ckpt': No space left on "
                                              r"device \(errno 28\)\.$"):
        cb.on_train_step_end(_fake_run_context(net, 3))
    assert list_checkpoints(str(tmp_path), 'p') == before
    assert sorted(os.listdir(tmp_path)) == ['p-1_1.ckpt', 'p-1_2.ckpt']


@pytest.mark.parametrize('rank, rank_dirs, expect', [
    (0, False, ''), (1, False, None), (0, True, 'rank_0'), (1, True, 'rank_1')])
def test_rank_aware_writing(tmp_path, monkeypatch, rank, rank_dirs, expect):
    """Distributed (faked 2-rank group): only rank 0 writes, or every rank into its own rank_<id> directory."""
    monkeypatch.setattr(ckpt_util, 'distributed_rank', lambda: (rank, 2))
    net = _net()
    cb = TrainableParamsCheckPoint(str(tmp_path / 'out'), prefix='p', rank_dirs=rank_dirs)
    cb.on_train_begin(_fake_run_context(net, 0))
    cb.on_train_step_end(_fake_run_context(net, 1))
    cb.on_train_end(_fake_run_context(net, 2))
    if expect is None:
        assert not cb.is_writer and not (tmp_path / 'out').exists() and cb.latest_ckpt_file_name is None
    else:
        where = tmp_path / 'out' / expect
        assert cb.save_dir == str(where)
        assert sorted(os.listdir(where)) == ['p-1_1.ckpt', 'p-1_2.ckpt']


def test_sliced_parallel_mode_requires_rank_dirs(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_util, 'distributed_rank', lambda: (0, 2))
    net = _net()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.SEMI_AUTO_PARALLEL)
    try:
        with pytest.raises(ValueError, match="'semi_auto_parallel'.*rank_dirs=True"):
            TrainableParamsCheckPoint(str(tmp_path)).on_train_begin(_fake_run_context(net, 0))
        cb = TrainableParamsCheckPoint(str(tmp_path), rank_dirs=True)
        cb.on_train_begin(_fake_run_context(net, 0))
        assert cb.save_dir == str(tmp_path / 'rank_0')
    finally:
        ms.reset_auto_parallel_context()
    assert ms.get_auto_parallel_context('parallel_mode') == 'stand_alone'


def test_safetensors_metadata_and_resume(tmp_path):
    net = _net()
    cb = TrainableParamsCheckPoint(str(tmp_path), prefix='s', config=CheckpointConfig(format='safetensors'))
    cb.on_train_begin(_fake_run_context(net, 0))
    net[0].mindpet_delta_lora_b.set_data(Tensor(np.full((OUT, RANK), 3, np.float32)))
    cb.on_train_step_end(_fake_run_context(net, 3, epoch=2, batch_num=4))
    assert os.path.basename(cb.latest_ckpt_file_name) == 's-2_3.safetensors'
    net[0].mindpet_delta_lora_b.set_data(Tensor(np.zeros((OUT, RANK), np.float32)))
    state = resume_from_checkpoint(str(tmp_path), net, prefix='s')
    assert (state.epoch, state.step_in_epoch, state.step, state.initial_epoch) == (2, 3, 7, 1)
    np.testing.assert_array_equal(net[0].mindpet_delta_lora_b.asnumpy(), np.full((OUT, RANK), 3, np.float32))


def test_resume_refuses_a_file_of_another_model(tmp_path):
    net = _net()
    save_trainable_params(nn.SequentialCell(LoRADense(IN, OUT, lora_rank=RANK + 1, lora_alpha=4)),
                          str(tmp_path / 'DELTA_CKP-1_1.ckpt'))
    with pytest.raises(CheckpointError, match=r"shape \(3, 6\)"):
        resume_from_checkpoint(str(tmp_path), net)


@pytest.mark.parametrize('kwargs, exc, fragment', [
    (dict(directory=3), TypeError, "'directory'"),
    (dict(directory=''), ValueError, "'directory'"),
    (dict(prefix='a/b'), ValueError, "'prefix'"),
    (dict(network='net'), TypeError, "'network'"),
    (dict(optimizer=[1]), TypeError, "'optimizer'"),
])
def test_resume_bad_arguments(tmp_path, kwargs, exc, fragment):
    args = dict(directory=str(tmp_path), network=_net())
    args.update(kwargs)
    with pytest.raises(exc, match=fragment):
        resume_from_checkpoint(**args)


def test_callback_bad_rank_dirs(tmp_path):
    with pytest.raises(TypeError, match="'rank_dirs'"):
        TrainableParamsCheckPoint(str(tmp_path), rank_dirs='yes')
