"""A data-parallel run under msrun whose worker dies: the other worker ends soon after with one line naming the lost
rank (instead of waiting for MindSpore's cluster timeout and ending in tracebacks); and the watch itself, on
processes started here."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from mindpet.train.peers import PeerWatch
from tests.train.test_runner_distributed import MSRUN, ROOT, _free_port


_WORKER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from peers import PeerWatch
watch = PeerWatch(0, 2, job=sys.argv[2], interval=0.05).start()
print('started', flush=True)
time.sleep(600)
"""


def test_watcher_ends_the_worker_with_one_line_naming_the_lost_rank(tmp_path):
    """A worker (rank 0) whose peer (rank 1, another process) is killed: its watcher prints the line on the worker's
    stderr and ends it. A peer that finished is not taken for lost."""
    job = f'test-{os.getpid()}-{tmp_path.name}'
    peer = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
    worker = None
    try:
        entry = PeerWatch(1, 2, job=job)
        entry.register('running', pid=peer.pid)
        worker = subprocess.Popen([sys.executable, '-c', _WORKER, os.path.join(ROOT, 'mindpet', 'train'), job],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert worker.stdout.readline().strip() == 'started'
        assert PeerWatch(0, 2, job=job).lost() is None
        peer.send_signal(signal.SIGKILL)
        peer.wait()
        assert PeerWatch(0, 2, job=job).lost() == (1, peer.pid)
        worker.wait(timeout=120)
        assert worker.returncode == -signal.SIGTERM
        lines = worker.stderr.read().strip().splitlines()
        assert lines == [f"mindpet finetune: error: worker rank 1 (pid {peer.pid}) was lost: its process ended "
                         f"before the run finished; rank 0 stops too"]
        assert PeerWatch(0, 2, job=job).recorded_lost() == {'rank': 1, 'pid': peer.pid}
        entry.register('done', pid=peer.pid)
        assert PeerWatch(0, 2, job=job).lost() is None
    finally:
        for proc in (peer, worker):
            if proc is not None and proc.poll() is None:
                proc.kill()
        shutil.rmtree(PeerWatch(0, 2, job=job).directory, ignore_errors=True)


def test_a_killed_worker_is_recorded_as_the_lost_one_by_its_own_watcher(tmp_path):
    """msrun kills the survivors' process groups within a second of a loss: the lost worker's watcher (in its own
    session) records which worker went first, so the survivors' watchers can name it."""
    job = f'test-{os.getpid()}-{tmp_path.name}'
    peer = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
    worker = None
    try:
        PeerWatch(1, 2, job=job).register('running', pid=peer.pid)
        worker = subprocess.Popen([sys.executable, '-c', _WORKER, os.path.join(ROOT, 'mindpet', 'train'), job],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert worker.stdout.readline().strip() == 'started'
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        watch = PeerWatch(1, 2, job=job)
        for _ in range(600):
            if watch.recorded_lost() is not None:
                break
            time.sleep(0.1)
        assert watch.recorded_lost() == {'rank': 0, 'pid': worker.pid}
        assert worker.stderr.read() == ''
    finally:
        for proc in (peer, worker):
            if proc is not None and proc.poll() is None:
                proc.kill()
        shutil.rmtree(PeerWatch(0, 2, job=job).directory, ignore_errors=True)


@pytest.mark.slow
def test_msrun_worker_lost_ends_the_other_with_one_line(tmp_path):
    cfg = {'context': {'mode': 'GRAPH', 'device_target': 'CPU', 'seed': 0},
           'model': {'task': 'tests.train.resume_tasks', 'code_dir': ROOT, 'trust_code': True, 'size': 'tiny',
                     'pretrain_epochs': 1},
           'pet': {'type': 'lora', 'target_modules': [r'layers\.\d+'], 'lora_rank': 4, 'lora_alpha': 8},
           'data': {'num_samples': 320, 'row_delay_ms': 2.0},
           'optimizer': {'type': 'adam'},
           'schedule': {'start_learning_rate': 0.005},
           'training': {'epochs': 4, 'batch_size': 16, 'evaluate': False, 'plot': False,
                        'output_dir': str(tmp_path / 'out')},
           'parallel': {'data_parallel': True}}
    path = tmp_path / 'dp.yaml'
    path.write_text(yaml.safe_dump(cfg), encoding='utf-8')
    env = dict(os.environ, GLOG_v='3', MS_COMPILER_CACHE_ENABLE='0', PYTHONPATH=ROOT,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
    port = _free_port()
    cmd = [MSRUN, '--worker_num=2', '--local_worker_num=2', f'--master_port={port}',
           f'--log_dir={tmp_path}/logs', '--join=True', '--cluster_time_out=300',
           os.path.join(ROOT, 'mindpet', '__main__.py'), 'finetune', '--config', str(path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        # Once rank 0 trains, kill rank 1 from outside (as the OOM killer would), by the pid it registered.
        log0 = tmp_path / 'logs' / 'worker_0.log'
        victim = None
        while proc.poll() is None and victim is None:
            entries = glob.glob(os.path.join(tempfile.gettempdir(), f'mindpet-workers-{port}-*', 'rank_1.json'))
            if entries and log0.exists() and '[train]' in log0.read_text(errors='replace'):
                with open(entries[0], encoding='utf-8') as handle:
                    victim = json.load(handle)['pid']
                os.kill(victim, signal.SIGKILL)
            time.sleep(0.2)
        assert victim is not None, 'msrun ended before rank 1 could be killed'
        # The cluster timeout is 300 s: ending well before it means the loss was noticed, not timed out.
        assert proc.wait(timeout=240) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for directory in glob.glob(os.path.join(tempfile.gettempdir(), f'mindpet-workers-{port}-*')):
            shutil.rmtree(directory, ignore_errors=True)
    log = open(tmp_path / 'logs' / 'worker_0.log', encoding='utf-8', errors='replace').read()
    lines = [line for line in log.splitlines() if 'was lost' in line]
    assert len(lines) == 1, log[-3000:]
    assert lines[0] == (f"mindpet finetune: error: worker rank 1 (pid {victim}) was lost: its process ended before "
                        f"the run finished; rank 0 stops too")
    assert 'Traceback' not in log
