"""A data-parallel run under msrun whose worker dies: the other worker ends soon after with one line naming the lost
rank (instead of waiting for MindSpore's cluster timeout and ending in tracebacks); and the watch itself, on
processes started here."""
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import yaml

from mindpet.train.peers import PeerWatch
from tests.train.test_runner_distributed import MSRUN, ROOT, _free_port


def test_watch_names_the_rank_whose_process_ended(tmp_path):
    job = f'test-{os.getpid()}-{tmp_path.name}'
    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
    seen = threading.Event()
    messages = []
    try:
        peer = PeerWatch(1, 2, job=job)
        peer._write('running')  # pylint: disable=protected-access
        with open(peer._path(1), encoding='utf-8') as handle:  # pylint: disable=protected-access
            entry = json.load(handle)
        entry['pid'] = child.pid            # rank 1 is the child process
        with open(peer._path(1), 'w', encoding='utf-8') as handle:  # pylint: disable=protected-access
            json.dump(entry, handle)
        watch = PeerWatch(0, 2, job=job, interval=0.05,
                          on_lost=lambda message: (messages.append(message), seen.set())).start()
        assert watch.lost() is None
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert seen.wait(timeout=60), 'the lost worker was not noticed'
        assert messages == [f"mindpet finetune: error: worker rank 1 (pid {child.pid}) was lost: its process ended "
                            f"before the run finished; rank 0 stops too"]
        # A worker that finished is not lost.
        peer._write('done')  # pylint: disable=protected-access
        assert watch.lost() is None
        watch.finish()
        assert not os.path.exists(watch.directory)
    finally:
        if child.poll() is None:
            child.kill()


@pytest.mark.slow
def test_msrun_worker_lost_ends_the_other_with_one_line(tmp_path):
    cfg = {'context': {'mode': 'GRAPH', 'device_target': 'CPU', 'seed': 0},
           'model': {'task': 'tests.train.resume_tasks', 'code_dir': ROOT, 'trust_code': True, 'size': 'tiny',
                     'pretrain_epochs': 1},
           'pet': {'type': 'lora', 'target_modules': [r'layers\.\d+'], 'lora_rank': 4, 'lora_alpha': 8},
           'data': {'num_samples': 320, 'kill_rank': 1, 'kill_after_rows': 100},
           'optimizer': {'type': 'adam'},
           'schedule': {'start_learning_rate': 0.005},
           'training': {'epochs': 4, 'batch_size': 16, 'evaluate': False, 'plot': False,
                        'output_dir': str(tmp_path / 'out')},
           'parallel': {'data_parallel': True}}
    path = tmp_path / 'dp.yaml'
    path.write_text(yaml.safe_dump(cfg), encoding='utf-8')
    env = dict(os.environ, GLOG_v='3', MS_COMPILER_CACHE_ENABLE='0', PYTHONPATH=ROOT,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
    cmd = [MSRUN, '--worker_num=2', '--local_worker_num=2', f'--master_port={_free_port()}',
           f'--log_dir={tmp_path}/logs', '--join=True', '--cluster_time_out=300',
           os.path.join(ROOT, 'mindpet', '__main__.py'), 'finetune', '--config', str(path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        # The cluster timeout is 300 s: ending well before it means the loss was noticed, not timed out.
        assert proc.wait(timeout=240) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = open(tmp_path / 'logs' / 'worker_0.log', encoding='utf-8', errors='replace').read()
    lines = [line for line in log.splitlines() if 'was lost' in line]
    assert len(lines) == 1, log[-3000:]
    assert lines[0].startswith('mindpet finetune: error: worker rank 1 (pid ') and lines[0].endswith('rank 0 stops too')
    assert 'Traceback' not in log
