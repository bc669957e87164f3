"""Exact mid-epoch resume of ``mindpet finetune --resume``: a run SIGKILLed three times part-way through an epoch and
resumed each time ends with the adapter and optimizer state of an uninterrupted run, after the same number of
optimizer steps; a data order that cannot be replayed (shuffled without a seed) gets one warning line."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
import mindspore as ms

from mindpet.graph.ckpt_util import list_checkpoints, split_meta
from mindpet.train.runner import finetune
from mindpet.utils.io_utils import load_checkpoint_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MLP_CONFIG = os.path.join(ROOT, 'configs', 'mlp_lora_tiny.yaml')
STEPS_PER_EPOCH, EPOCHS = 8, 4          # 128 training rows in batches of 16
TOTAL = STEPS_PER_EPOCH * EPOCHS
CKPT_RE = re.compile(r'^lora-(\d+)_(\d+)\.ckpt$')


@pytest.fixture(autouse=True)
def _pynative_afterwards():
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _config(tmp_path, name, **data):
    with open(MLP_CONFIG, encoding='utf-8') as handle:
        cfg = yaml.safe_load(handle)
    cfg['model'].update(task='tests.train.resume_tasks', code_dir=ROOT, trust_code=True, pretrain_epochs=1)
    cfg['data'].update(num_samples=160, eval_fraction=0.2, **data)
    cfg['schedule']['warmup_steps'] = 2
    cfg['training'] = dict(epochs=EPOCHS, batch_size=16, log_interval=1, checkpoint_interval=3, keep_checkpoint_max=2,
                           evaluate=False, plot=False, output_dir=str(tmp_path / name))
    path = tmp_path / f'{name}.yaml'
    path.write_text(yaml.safe_dump(cfg), encoding='utf-8')
    return str(path), str(tmp_path / name)


def _command(path, *extra):
    return [sys.executable, '-B', '-m', 'mindpet', 'finetune', '--config', path] + list(extra)


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith('MS_COMPILER_CACHE')}
    env.update(PYTHONPATH=ROOT, GLOG_v='3', MS_COMPILER_CACHE_ENABLE='0')
    return env


def _checkpoint_steps(ckpt_dir):
    steps = []
    for path in list_checkpoints(ckpt_dir, 'lora'):
        epoch, in_epoch = map(int, CKPT_RE.match(os.path.basename(path)).groups())
        steps.append((epoch - 1) * STEPS_PER_EPOCH + in_epoch)
    return steps


def _final_state(out_dir):
    """Every tensor and the metadata of the run's last checkpoint (written at its last step)."""
    path = list_checkpoints(os.path.join(out_dir, 'checkpoints'), 'lora')[-1]
    params, meta = split_meta(load_checkpoint_file(path))
    return {name: value.asnumpy() for name, value in params.items()}, meta


def _metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.json'), encoding='utf-8') as handle:
        return json.load(handle)


@pytest.mark.slow
def test_killed_three_times_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    ref_path, ref_dir = _config(tmp_path, 'straight', row_delay_ms=3.0)
    done = subprocess.run(_command(ref_path), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    path, out_dir = _config(tmp_path, 'killed', row_delay_ms=3.0)
    ckpt_dir = os.path.join(out_dir, 'checkpoints')
    resumed_from = []
    last = 0
    for cycle in range(3):
        log = open(tmp_path / f'cycle{cycle}.log', 'w', encoding='utf-8')   # pylint: disable=consider-using-with
        proc = subprocess.Popen(_command(path, *(['--resume'] if cycle else [])), cwd=ROOT, env=_env(),
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            # Kill as soon as a checkpoint newer than the last kill's is on disk, at a step inside an epoch.
            while proc.poll() is None:
                newer = [s for s in _checkpoint_steps(ckpt_dir) if s > last and s % STEPS_PER_EPOCH]
                if newer:
                    proc.send_signal(signal.SIGKILL)
                    last = max(newer)
                    break
                time.sleep(0.005)
            assert proc.wait(timeout=600) == -signal.SIGKILL, (tmp_path / f'cycle{cycle}.log').read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        text = (tmp_path / f'cycle{cycle}.log').read_text()
        resumed_from += [int(m) for m in re.findall(r'\[resume\] \S+: step (\d+) of', text)]
    finished = subprocess.run(_command(path, '--resume'), cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=600, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    resumed_from += [int(m) for m in re.findall(r'\[resume\] \S+: step (\d+) of', finished.stdout)]

    # Three resumes, each from a checkpoint inside an epoch, each later than the one before.
    assert len(resumed_from) == 3 and resumed_from == sorted(set(resumed_from)), resumed_from
    assert all(step % STEPS_PER_EPOCH for step in resumed_from), resumed_from
    assert 'warning' not in finished.stdout
    # Nothing a killed writer left behind survives the next run's start.
    assert not [f for f in os.listdir(ckpt_dir) if f.endswith('.tmp') or '.tmp.' in f]

    expected, expected_meta = _final_state(ref_dir)
    got, meta = _final_state(out_dir)
    assert sorted(got) == sorted(expected)
    assert any(name.startswith('moment1.') for name in got) and any('mindpet_delta_lora_b' in name for name in got)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # The same number of optimizer steps: the step counters of the file and of the optimizer itself.
    assert meta['step'] == expected_meta['step'] == TOTAL
    assert int(got['global_step'].reshape(-1)[0]) == int(expected['global_step'].reshape(-1)[0]) == TOTAL
    assert _metrics(out_dir)['summary']['optimizer_steps'] == _metrics(ref_dir)['summary']['optimizer_steps'] == TOTAL
    # The steps after the last resume had the uninterrupted run's losses.
    tail = _metrics(out_dir)['losses']
    assert _metrics(out_dir)['summary']['resumed_from_step'] == resumed_from[-1] == TOTAL - len(tail)
    np.testing.assert_allclose(tail, _metrics(ref_dir)['losses'][-len(tail):], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('order, warned', [('seeded', False), ('unseeded', True)])
def test_resume_warns_once_when_the_data_order_cannot_be_replayed(tmp_path, graph_mode, order, warned):
    path, out_dir = _config(tmp_path, 'run', order=order)
    finetune(path, overrides=['training.max_steps=5', 'training.checkpoint_interval=5'], out=lambda *_: None)
    lines = []
    summary = finetune(path, overrides=['training.max_steps=8', 'training.checkpoint_interval=5'], resume=True,
                       out=lines.append)
    warnings = [line for line in lines if 'warning' in line]
    assert len(warnings) == int(warned), lines
    if warned:
        assert warnings[0].startswith('[resume] warning: batch 5 differs') and '\n' not in warnings[0]
    assert summary['resumed_from_step'] == 5 and summary['optimizer_steps'] == 8
    assert len(_metrics(out_dir)['losses']) == 3
