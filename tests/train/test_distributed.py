"""MindSpore's own distributed engine with LoRA: 2 CPU workers started by msrun.

Data parallel: both ranks train on different data; with DATA_PARALLEL + gradients_mean their adapters end
identical (and equal one process training on both shards at once), only rank 0 writes checkpoints; without data
parallel the two adapters differ. Semi-auto parallel: LoRADense.shard() strategies are applied to the operators;
MindSpore 2.10 refuses semi-auto parallel on the CPU backend, and the test pins that exact refusal (on Ascend/GPU
the same script must compile and match the single-device numbers).
"""
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import mindspore as ms

from mindpet.graph import list_checkpoints
from mindpet.utils.io_utils import load_checkpoint_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, 'examples', 'distributed')
MSRUN = shutil.which('msrun') or os.path.join(os.path.dirname(sys.executable), 'msrun')
# Only a hang guard (_wait_all kills the job and the test fails): over 20x the 24-27 s a job takes on an idle
# machine (doc/distributed.md), so a loaded machine does not fail the test.
JOB_TIMEOUT_S = 600
# What MindSpore 2.10 says when a semi-auto-parallel graph is compiled on the CPU backend; which of the two comes
# first depends on the compile pass (both mean: parallel compilation needs HCCL/NCCL).
CPU_SEMI_AUTO_ERRORS = ('Invalid backend: CPU',
                        'Invalid communication backend: CPU for semi_auto_parallel/auto_parallel mode, currently '
                        'only support Ascend/GPU backend.')


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + '.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _start_msrun(script, out_dir, *args):
    """Start ``msrun`` with 2 local workers in its own session (so a timeout can kill the whole job)."""
    # msrun starts the workers with the first 'python' on PATH: make it this interpreter.
    env = dict(os.environ, GLOG_v='3', MS_COMPILER_CACHE_ENABLE='0', PYTHONPATH=ROOT,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
    cmd = [MSRUN, '--worker_num=2', '--local_worker_num=2', f'--master_port={_free_port()}',
           f'--log_dir={out_dir}/logs', '--join=True', '--cluster_time_out=300', os.path.join(EXAMPLES, script),
           '--output', str(out_dir), *args]
    log = open(os.path.join(str(out_dir) + '.msrun.log'), 'w', encoding='utf-8')
    return subprocess.Popen(cmd, cwd=str(out_dir), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True), log


def _wait_all(jobs, deadline):
    try:
        for proc, _ in jobs:
            proc.wait(timeout=max(deadline - time.time(), 1))
    finally:
        for proc, log in jobs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the session we created: msrun, scheduler and workers
                proc.wait()
            log.close()
    return [proc.returncode for proc, _ in jobs]


def _results(out_dir):
    found = {}
    for rank in (0, 1):
        with open(os.path.join(out_dir, 'logs', f'worker_{rank}.log'), encoding='utf-8', errors='replace') as f:
            lines = [line for line in f if line.startswith('MINDPET_RESULT ')]
        assert lines, f"worker {rank} printed no result; see {out_dir}/logs/worker_{rank}.log"
        found[rank] = json.loads(lines[-1][len('MINDPET_RESULT '):])
    return found


def _adapter(path):
    return {k: v.asnumpy() for k, v in load_checkpoint_file(path).items()}


@pytest.mark.slow
def test_data_parallel_two_workers_keep_identical_adapters(tmp_path):
    start = time.time()
    dp_dir, solo_dir = tmp_path / 'dp', tmp_path / 'solo'
    dp_dir.mkdir()
    solo_dir.mkdir()
    jobs = [_start_msrun('train_dp.py', dp_dir, '--dump-final'),
            _start_msrun('train_dp.py', solo_dir, '--dump-final', '--no-data-parallel')]
    # Meanwhile: the same training in this process on both shards at once (the global batch).
    train_dp = _load('train_dp')
    args = train_dp.parse_args(['--output', 'unused'])
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        ref = train_dp.build_network()
        x, y = train_dp.global_batches(2, args.steps_per_epoch, args.batch)
        train_dp.make_model(ref, args.lr).train(args.epochs, train_dp.dataset(x, y, 2 * args.batch),
                                                dataset_sink_mode=False)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    expected = {p.name: p.asnumpy() for p in ref.trainable_params()}
    initial = {p.name: p.asnumpy() for p in train_dp.build_network().trainable_params()}

    assert _wait_all(jobs, start + JOB_TIMEOUT_S) == [0, 0], f"msrun failed; logs in {tmp_path}"
    dp, solo = _results(dp_dir), _results(solo_dir)
    assert [dp[r]['parallel_mode'] for r in (0, 1)] == ['data_parallel'] * 2
    assert [solo[r]['parallel_mode'] for r in (0, 1)] == ['stand_alone'] * 2

    dp0, dp1 = (_adapter(dp_dir / 'final' / f'rank_{r}.ckpt') for r in (0, 1))
    solo0, solo1 = (_adapter(solo_dir / 'final' / f'rank_{r}.ckpt') for r in (0, 1))
    assert sorted(dp0) == sorted(expected) and len(dp0) == 4
    for name in expected:
        np.testing.assert_array_equal(dp0[name], dp1[name])  # identical replicas
        np.testing.assert_allclose(dp0[name], expected[name], rtol=1e-4, atol=1e-6)  # = global-batch training
        assert np.abs(dp0[name] - initial[name]).max() > 1e-3  # and it did train
    gap = max(np.abs(solo0[n] - solo1[n]).max() for n in expected)
    assert gap > 1e-3, "without data parallel the ranks should drift apart on their different data"
    assert max(np.abs(solo0[n] - dp0[n]).max() for n in expected) > 1e-3

    # Only rank 0 wrote checkpoints (3 kept of 4 saves), each holding the adapter rank 0 had at that step.
    assert [dp[r]['is_writer'] for r in (0, 1)] == [True, False] and dp[1]['saved_files'] == []
    files = [os.path.basename(p) for p in list_checkpoints(str(dp_dir / 'ckpt'), 'lora')]
    assert files == dp[0]['saved_files'] == ['lora-1_4.ckpt', 'lora-2_2.ckpt', 'lora-2_4.ckpt']
    last = _adapter(dp_dir / 'ckpt' / 'lora-2_4.ckpt')
    for name in expected:
        np.testing.assert_array_equal(last[name], dp0[name])
    assert int(last['mindpet_meta_step']) == 8 and 'moment1.0.mindpet_delta_lora_a' in last
    ref_gap = max(np.abs(dp0[n] - expected[n]).max() for n in expected)
    print(f"\n2-worker data-parallel + control run: {time.time() - start:.1f} s, |DP - global batch| {ref_gap:.2g}, "
          f"rank gap without DP {gap:.3g}")
    # No wall-clock limit on the job: a hang is caught by _wait_all's JOB_TIMEOUT_S (it kills the job and fails).


def test_shard_strategies_reach_the_operators():
    """Every LoRADense.shard() strategy set of the semi-auto example lands on the operators it names."""
    semi = _load('semi_auto_lora')
    for name, kwargs in semi.strategies(2).items():
        layer = semi.build_layer().shard(**kwargs)
        ops = {'strategy_org_dense_matmul': layer.matmul, 'strategy_org_bias_add': layer.bias_add,
               'strategy_lora_a_matmul': layer.lora_a_matmul, 'strategy_lora_b_matmul': layer.lora_b_matmul,
               'strategy_lora_mul': layer.mul, 'strategy_lora_add': layer.add,
               'strategy_lora_dropout': layer.lora_dropout.dropout}
        for key, strategy in kwargs.items():
            if key == 'strategy_activation':
                prims = [p for p in layer.activation._primitives.values() if p is not None]
                assert [p.attrs['in_strategy'] for p in prims] == [strategy], name
            else:
                assert ops[key].attrs['in_strategy'] == strategy, (name, key)


@pytest.mark.slow
def test_semi_auto_parallel_two_workers_match_one_device_or_are_refused_on_cpu(tmp_path):
    """On Ascend/GPU every strategy set must compile and match one device; on CPU MindSpore refuses
    SEMI_AUTO_PARALLEL, and this test then only checks that refusal (the strategies' numbers are checked without a
    device by tests/delta/test_shard_simulation.py)."""
    start = time.time()
    out = tmp_path / 'semi'
    out.mkdir()
    job = _start_msrun('semi_auto_lora.py', out)
    semi = _load('semi_auto_lora')
    x, _ = semi.inputs()
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        reference = semi.build_layer()(ms.Tensor(x)).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert _wait_all([job], start + JOB_TIMEOUT_S) == [0], f"msrun failed; logs in {out}/logs"
    for rank in (0, 1):
        with open(out / f'semi_auto_rank_{rank}.json', encoding='utf-8') as handle:
            report = json.load(handle)
        assert sorted(report['results']) == ['column_parallel', 'data_parallel', 'row_parallel']
        for name, result in report['results'].items():
            if result['status'] == 'ok':
                np.testing.assert_allclose(np.array(result['output']), reference, rtol=1e-5, atol=1e-5)
            else:
                assert ms.get_context('device_target') == 'CPU', (name, result)
                assert (result['type'], result['message']) in [('RuntimeError', m) for m in CPU_SEMI_AUTO_ERRORS], \
                    (name, result)
    print(f"\nsemi-auto 2-worker job: {time.time() - start:.1f} s; CPU result: {report['results']['data_parallel']}")
