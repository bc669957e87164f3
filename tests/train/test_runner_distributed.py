"""mindpet finetune under msrun with parallel.data_parallel: two CPU workers, rank 0 reports and writes, the other
worker writes nothing; without msrun the same config is refused before anything runs."""
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import yaml

from mindpet.adapter_store import adapter_weights_path
from mindpet.cli import main
from mindpet.utils.io_utils import load_checkpoint_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MSRUN = shutil.which('msrun') or os.path.join(os.path.dirname(sys.executable), 'msrun')
CONFIG = {'context': {'mode': 'GRAPH', 'device_target': 'CPU', 'seed': 0},
          'model': {'task': 'examples.mlp.pet_task', 'code_dir': ROOT, 'trust_code': True, 'size': 'tiny',
                    'pretrain_epochs': 1},
          'pet': {'type': 'lora', 'target_modules': [r'layers\.\d+'], 'lora_rank': 4, 'lora_alpha': 8,
                  'modules_to_save': ['head']},
          'data': {'num_samples': 320},
          'optimizer': {'type': 'adam'},
          'schedule': {'start_learning_rate': 0.005},
          'training': {'epochs': 2, 'batch_size': 32, 'checkpoint_interval': 2},
          'parallel': {'data_parallel': True}}


def _config(tmp_path):
    cfg = dict(CONFIG, training=dict(CONFIG['training'], output_dir=str(tmp_path / 'out')))
    path = tmp_path / 'dp.yaml'
    path.write_text(yaml.safe_dump(cfg), encoding='utf-8')
    return str(path)


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_data_parallel_needs_msrun(tmp_path, capsys):
    path = _config(tmp_path)
    assert main(['finetune', '--config', path]) == 1
    err = capsys.readouterr().err
    assert f"{path}: 'parallel.data_parallel': true needs the workers started by msrun" in err
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_two_workers_rank0_writes(tmp_path):
    path = _config(tmp_path)
    env = dict(os.environ, GLOG_v='3', MS_COMPILER_CACHE_ENABLE='0', PYTHONPATH=ROOT,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
    cmd = [MSRUN, '--worker_num=2', '--local_worker_num=2', f'--master_port={_free_port()}',
           f'--log_dir={tmp_path}/logs', '--join=True', '--cluster_time_out=60',
           os.path.join(ROOT, 'mindpet', '__main__.py'), 'finetune', '--config', path]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        assert proc.wait(timeout=120) == 0, f"msrun failed; logs in {tmp_path}/logs"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    logs = [open(tmp_path / 'logs' / f'worker_{r}.log', encoding='utf-8', errors='replace').read() for r in (0, 1)]
    # 256 training rows, each worker reads every other one: 128 / 32 = 4 steps per epoch.
    assert '8 steps = 2 epoch(s) x 4 steps, batch 32 x 2 workers (data parallel)' in logs[0]
    assert 'summary' in logs[0] and '[pet]' not in logs[1] and 'summary' not in logs[1]
    out = tmp_path / 'out'
    assert set(os.listdir(out)) >= {'adapter', 'checkpoints', 'config.yaml', 'metrics.json'}
    assert sorted(os.listdir(out / 'checkpoints')) == ['lora-1_4.ckpt', 'lora-2_2.ckpt', 'lora-2_4.ckpt']
    adapter = load_checkpoint_file(adapter_weights_path(str(out / 'adapter')))
    last = load_checkpoint_file(str(out / 'checkpoints' / 'lora-2_4.ckpt'))
    for name, value in adapter.items():
        assert (last[name].asnumpy() == value.asnumpy()).all()
