"""scripts/benchmark.py: its report logic (ratios, targets, the doc block) and, marked slow, a tiny real run."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'benchmark.py')


def _load():
    spec = importlib.util.spec_from_file_location('mindpet_benchmark_script', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_paired_ratio_pairs_rounds():
    runs = {'lora': [{'t': 1.0}, {'t': 3.0}, {'t': 2.0}], 'full': [{'t': 2.0}, {'t': 4.0}, {'t': 5.0}]}
    ratio = bench._paired_ratio(runs, 'lora', 'full', 't')  # pylint: disable=protected-access
    assert ratio == {'median': 0.5, 'min': 0.4, 'max': 0.75, 'n': 3}


def _results(lora_cpu_ratio, peft_ratio):
    row = lambda r: {'median': r, 'min': r, 'max': r, 'n': 1}  # noqa: E731
    return {'train': {'summary': {
        'lora': {'step_cpu_ratio': row(lora_cpu_ratio), 'step_ratio': row(0.7), 'peak_ratio': row(0.59),
                 'peak_anon_ratio': row(0.5)},
        'peft_lora': {'step_cpu_ratio': row(peft_ratio), 'step_ratio': row(0.5), 'peak_ratio': row(0.6),
                      'peak_anon_ratio': row(0.45)}}},
        'layer': {'fwd_unmerged': {'cpu_ratio': 1.06, 'ratio': 1.01}}}


def test_targets_judged_on_cpu_time_and_relative_to_peers():
    rows = {r['what']: r for r in bench.evaluate_targets(_results(0.55, 0.60))}
    step = rows['LoRA step time / full fine-tuning (one process each)']
    assert step['met'] and step['value'] == 0.55 and step['wall'] == 0.7
    assert rows['LoRA peak memory (ru_maxrss) / full fine-tuning']['met']
    layer = rows['LoRADense forward (unmerged) / nn.Dense']
    assert not layer['met'] and layer['value'] == 1.06
    assert rows['LoRA/full step ratio: ours vs PyTorch+PEFT']['met']
    assert not rows['LoRA/full peak anonymous memory ratio: ours vs PyTorch+PEFT']['met']
    # Parts that did not run produce no row.
    assert not any('MindPet' in what for what in rows)
    rows = {r['what']: r for r in bench.evaluate_targets(_results(0.62, 0.60))}
    assert not rows['LoRA step time / full fine-tuning (one process each)']['met']
    assert not rows['LoRA/full step ratio: ours vs PyTorch+PEFT']['met']


def test_update_doc_replaces_only_the_results_block(tmp_path):
    page = tmp_path / 'doc' / 'benchmarks.md'
    bench.update_doc(str(page), 'first table')
    text = page.read_text(encoding='utf-8')
    assert text.startswith('# Benchmarks') and 'first table' in text
    page.write_text(text.replace('# Benchmarks\n', '# Benchmarks\n\nintro by hand\n') + '\nanalysis by hand\n',
                    encoding='utf-8')
    bench.update_doc(str(page), 'second table')
    text = page.read_text(encoding='utf-8')
    assert 'first table' not in text and 'second table' in text
    assert text.index('intro by hand') < text.index(bench.DOC_BEGIN) < text.index('second table') \
        < text.index(bench.DOC_END) < text.index('analysis by hand')


def test_every_variant_names_an_existing_function_and_env():
    for name, spec in bench.TRAIN_VARIANTS.items():
        assert callable(getattr(bench, spec['apply'])), name
        assert spec['env'] == 'main' or spec['env'] in bench.VENVS, name
        assert spec['base'] in bench.TRAIN_VARIANTS, name
    for group in bench.FORWARD_GROUPS.values():
        assert all(v in bench.TRAIN_VARIANTS for v in group['variants'])


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(['--parts', 'train,nonsense'])
    with pytest.raises(SystemExit):
        bench.parse_args(['--repeats', '0'])


@pytest.mark.slow
def test_quick_run_of_layer_and_ckpt_parts(tmp_path):
    """A real (tiny) run: worker processes, JSON, and the markdown page with the measured rows."""
    out_json, page = tmp_path / 'b.json', tmp_path / 'b.md'
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, SCRIPT, '--quick', '--parts', 'layer,ckpt', '--layer-repeats', '1',
                           '--iterations', '2', '--json', str(out_json), '--doc', str(page)],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out_json.read_text(encoding='utf-8'))
    ckpt = results['ckpt']
    # Quick GPT: 2 blocks x 2 LoRA layers (q, v) x r (in + out) with r=8, hidden 128.
    assert ckpt['params_adapter'] == 2 * 2 * 8 * (128 + 128)
    assert ckpt['raw_adapter_bytes'] == 4 * ckpt['params_adapter']
    for files in ckpt['files'].values():
        assert ckpt['raw_adapter_bytes'] < files['adapter_bytes'] < 1.1 * ckpt['raw_adapter_bytes']
    assert results['layer']['merge_max_abs_diff'] < 1e-4
    assert 0.3 < results['layer']['fwd_to_dense']['cpu_ratio'] < 3.0
    text = page.read_text(encoding='utf-8')
    assert bench.DOC_BEGIN in text and '### 2. Layer overhead' in text and '### 3. Checkpoint size' in text
