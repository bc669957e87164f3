"""The README's first command (examples/quickstart/finetune.py on configs/quickstart_lora.yaml) end to end."""
import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_config_runs_and_reports(tmp_path):
    with open(os.path.join(ROOT, 'configs', 'quickstart_lora.yaml'), encoding='utf-8') as handle:
        cfg = yaml.safe_load(handle)
    cfg['training']['output_dir'] = str(tmp_path / 'out')
    cfg['training']['pretrain_epochs'] = 2
    cfg['training']['epochs'] = 4
    cfg['data']['num_samples'] = 512
    path = tmp_path / 'cfg.yaml'
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'examples', 'quickstart', 'finetune.py'),
                           '--config', str(path)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, GLOG_v='3'), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert 'frozen weights bit-identical     True' in out
    assert 'base + adapter reload exact      True' in out
    assert 'trainable / total params' in out and 'ETA' in out
    files = sorted(os.listdir(tmp_path / 'out'))
    assert files == ['adapter.ckpt', 'base.ckpt', 'full_model.ckpt']
    adapter = os.path.getsize(tmp_path / 'out' / 'adapter.ckpt')
    full = os.path.getsize(tmp_path / 'out' / 'full_model.ckpt')
    assert adapter < 0.12 * full
