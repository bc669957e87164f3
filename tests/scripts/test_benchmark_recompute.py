"""The benchmark's recompute part (scripts/benchmark/recompute.py): a real tiny run, one process per variant; the
recomputed variants train to the same losses as the plain ones, and the table renders the paired ratios."""
import json
import os
import subprocess
import sys

import pytest

from scripts.benchmark import orchestrate
from scripts.benchmark.recompute import RECOMPUTE_MODEL, recompute_table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, 'scripts', 'benchmark.py')


def test_part_is_registered_but_not_run_by_default():
    assert 'recompute' in orchestrate.PARTS and 'recompute' not in orchestrate.DEFAULT_PARTS
    assert RECOMPUTE_MODEL['seq'] >= 512 and RECOMPUTE_MODEL['vocab'] == 1000 and RECOMPUTE_MODEL['layers'] == 6


@pytest.mark.slow
def test_quick_run_of_the_recompute_part(tmp_path):
    out_json = tmp_path / 'b.json'
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, SCRIPT, '--quick', '--parts', 'recompute', '--variants', 'lora_pet',
                           '--repeats', '1', '--steps', '1', '--warmup', '0', '--json', str(out_json), '--no-doc',
                           '--log-dir', str(tmp_path / 'logs')],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    part = json.loads(out_json.read_text(encoding='utf-8'))['recompute']
    assert part['pairs'] == [['lora_pet', 'lora_pet_recompute']]
    plain, recomputed = part['rows']['lora_pet'], part['rows']['lora_pet_recompute']
    # Same model, same batch, same trainable parameters: recompute changes no number of the training.
    assert plain['trainable'] == recomputed['trainable'] == 2 * 2 * 8 * (128 + 128)
    assert recomputed['loss_first'] == pytest.approx(plain['loss_first'], rel=1e-5)
    assert recomputed['loss_last'] == pytest.approx(plain['loss_last'], rel=1e-5)
    ratio = part['ratios']['lora_pet_recompute']
    assert 0.2 < ratio['peak_mb']['median'] < 5 and ratio['peak_mb']['n'] == 1
    assert set(recomputed['phases']) >= {'compiled', 'released', 'first_step', 'steady'}
    table = recompute_table(part)
    assert 'LoRA r=8 on q,v (get_pet_model) + recompute of every block' in table
    assert f"{ratio['peak_mb']['median']:.3f}x" in table
