"""scripts/benchmark.py (the package scripts/benchmark/): its report logic (ratios, targets, the doc block) and,
marked slow, a tiny real run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scripts.benchmark import models, orchestrate, report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, 'scripts', 'benchmark.py')


def test_paired_ratio_pairs_rounds():
    runs = {'lora': [{'t': 1.0}, {'t': 3.0}, {'t': 2.0}], 'full': [{'t': 2.0}, {'t': 4.0}, {'t': 5.0}]}
    ratio = orchestrate._paired_ratio(runs, 'lora', 'full', 't')  # pylint: disable=protected-access
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
    rows = {r['what']: r for r in report.evaluate_targets(_results(0.55, 0.60))}
    step = rows['LoRA step time / full fine-tuning (one process each)']
    assert step['met'] and step['value'] == 0.55 and step['wall'] == 0.7
    assert rows['LoRA peak memory (ru_maxrss) / full fine-tuning']['met']
    layer = rows['LoRADense forward (unmerged) / nn.Dense']
    assert not layer['met'] and layer['value'] == 1.06
    assert rows['LoRA/full step ratio: ours vs PyTorch+PEFT']['met']
    assert not rows['LoRA/full peak anonymous memory ratio: ours vs PyTorch+PEFT']['met']
    # Parts that did not run produce no row.
    assert not any('MindPet' in what for what in rows)
    rows = {r['what']: r for r in report.evaluate_targets(_results(0.62, 0.60))}
    assert not rows['LoRA step time / full fine-tuning (one process each)']['met']
    assert not rows['LoRA/full step ratio: ours vs PyTorch+PEFT']['met']


def test_new_parts_have_target_rows():
    results = {'train_ab': {'train': {'adapter': {'cpu_ratio': 0.6, 'ratio': 0.62},
                                      'prefix': {'cpu_ratio': 1.05, 'ratio': 1.1}}},
               'switch': {'ops': {'set_adapter_trainable': {'cpu_ms': 9.0, 'median_ms': 12.0},
                                  'set_adapter_inference': {'cpu_ms': 60.0, 'median_ms': 70.0}}}}
    rows = {r['what']: r for r in report.evaluate_targets(results)}
    assert rows['Adapter step time / full fine-tuning (same process, interleaved)']['met']
    assert not rows['prefix tuning step time / full fine-tuning (same process, interleaved)']['met']
    trainable = rows['set_adapter between trainable LoRA adapters, GPT-2 small (ms)']
    assert trainable['met'] and trainable['value'] == 9.0 and trainable['wall'] == 12.0
    assert not rows['set_adapter between LoRA adapters loaded for inference, GPT-2 small (ms)']['met']


def test_variants_option_selects_variants_and_keeps_each_base():
    args = orchestrate.parse_args(['--variants', 'adapter,prefix'])
    assert args.variants == ['adapter', 'prefix']
    assert orchestrate._group_variants(orchestrate.TRAIN_AB_GROUPS, 'train', args) == ['full', 'adapter', 'prefix']
    assert orchestrate._group_variants(orchestrate.TRAIN_AB_GROUPS, 'reference', args) == []   # nothing to compare
    everything = orchestrate.parse_args([])
    assert orchestrate._group_variants(orchestrate.FORWARD_GROUPS, 'train', everything) == \
        orchestrate.FORWARD_GROUPS['train']['variants']
    with pytest.raises(SystemExit):
        orchestrate.parse_args(['--variants', 'adapter,nonsense'])


def _attention_numpy(attn, x, mask, prefix=None):
    """The benchmark attention's formula in NumPy; ``prefix``: (key, value), each (heads, P, head_dim)."""
    def dense(cell, h):
        return h @ cell.weight.asnumpy().T + cell.bias.asnumpy()
    b, s, hidden = x.shape
    heads, hd = attn.heads, attn.head_dim
    q, k, v = (dense(cell, x).reshape(b, s, heads, hd).transpose(0, 2, 1, 3) for cell in (attn.q, attn.k, attn.v))
    if prefix is not None:
        pk, pv = (np.broadcast_to(t, (b,) + t.shape) for t in prefix)
        k, v = np.concatenate([pk, k], 2), np.concatenate([pv, v], 2)
        mask = np.concatenate([np.zeros(mask.shape[:-1] + (pk.shape[2],), np.float32), mask], -1)
    scores = q @ k.transpose(0, 1, 3, 2) * attn.scale + mask
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return dense(attn.o, (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, hidden))


def test_prefix_variant_attention_matches_numpy_in_compiled_graph(graph_mode):
    """The prefix wiring of the benchmark's attention: keys/values [P_k; K], [P_v; V], prefix columns visible to
    every query; checked again after the prefix changes by set_data in the already-compiled graph."""
    import mindspore as ms
    cfg = dict(model=dict(models.QUICK['gpt'], layers=1, hidden=16, heads=2, vocab=50, batch=2, seq=5))
    net = models.apply_prefix(models.build_gpt(cfg['model']), cfg)
    attn = net.blocks[0].attn
    assert sorted(p.name for p in net.trainable_params()) == sorted(
        f'blocks.0.attn.prefix.mindpet_delta_prefixtuning_{w}'
        for w in ('embedding', 'mlp_in_weight', 'mlp_in_bias', 'mlp_out_weight', 'mlp_out_bias'))
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    mask = net.mask.asnumpy()[:, :, :5, :5]
    out = attn(ms.Tensor(x), ms.Tensor(mask)).asnumpy()
    expected = _attention_numpy(attn, x, mask, attn.prefix.prefix_numpy())
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected - _attention_numpy(attn, x, mask)).max() > 1e-3   # the prefix matters
    emb = attn.prefix.mindpet_delta_prefixtuning_embedding
    emb.set_data(ms.Tensor(emb.asnumpy() * 3.0 + 1.0))
    out = attn(ms.Tensor(x), ms.Tensor(mask)).asnumpy()
    np.testing.assert_allclose(out, _attention_numpy(attn, x, mask, attn.prefix.prefix_numpy()), rtol=1e-5,
                               atol=1e-5)


def test_update_doc_replaces_only_the_results_block(tmp_path):
    page = tmp_path / 'doc' / 'benchmarks.md'
    report.update_doc(str(page), 'first table')
    text = page.read_text(encoding='utf-8')
    assert text.startswith('# Benchmarks') and 'first table' in text
    page.write_text(text.replace('# Benchmarks\n', '# Benchmarks\n\nintro by hand\n') + '\nanalysis by hand\n',
                    encoding='utf-8')
    report.update_doc(str(page), 'second table')
    text = page.read_text(encoding='utf-8')
    assert 'first table' not in text and 'second table' in text
    assert text.index('intro by hand') < text.index(report.DOC_BEGIN) < text.index('second table') \
        < text.index(report.DOC_END) < text.index('analysis by hand')


def test_every_variant_names_an_existing_function_and_env():
    for name, spec in models.TRAIN_VARIANTS.items():
        assert callable(getattr(models, spec['apply'])), name
        assert spec['env'] == 'main' or spec['env'] in orchestrate.VENVS, name
        assert spec['base'] in models.TRAIN_VARIANTS, name
    for group in orchestrate.FORWARD_GROUPS.values():
        assert all(v in models.TRAIN_VARIANTS for v in group['variants'])


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        orchestrate.parse_args(['--parts', 'train,nonsense'])
    with pytest.raises(SystemExit):
        orchestrate.parse_args(['--repeats', '0'])


@pytest.mark.slow
def test_quick_run_of_layer_and_ckpt_parts(tmp_path):
    """A real (tiny) run: worker processes, JSON, and the markdown page with the measured rows."""
    out_json, page = tmp_path / 'b.json', tmp_path / 'b.md'
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, SCRIPT, '--quick', '--parts', 'layer,ckpt', '--layer-repeats', '1',
                           '--iterations', '2', '--json', str(out_json), '--doc', str(page),
                           '--log-dir', str(tmp_path / 'logs')],
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
    assert report.DOC_BEGIN in text and '### 2. Layer overhead' in text and '### 3. Checkpoint size' in text


@pytest.mark.slow
def test_quick_run_of_adapter_prefix_and_switch(tmp_path):
    """A real (tiny) run of the new rows: Adapter and prefix tuning per process, in the same-process group and in
    the forward group, and part 4 (switching and merging), whose worker fails unless its output checks pass."""
    out_json, page = tmp_path / 'b.json', tmp_path / 'b.md'
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, SCRIPT, '--quick', '--parts', 'train,train_ab,forward,switch',
                           '--variants', 'adapter,prefix', '--repeats', '1', '--steps', '1', '--warmup', '0',
                           '--iterations', '2', '--json', str(out_json), '--doc', str(page),
                           '--log-dir', str(tmp_path / 'logs')],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out_json.read_text(encoding='utf-8'))
    summary = results['train']['summary']
    assert sorted(summary) == ['adapter', 'full', 'prefix']
    hidden, layers = 128, 2
    # Adapter: down (64 x h + 64) and up (h x 64 + h) after attn.o and fc2 of each block.
    assert summary['adapter']['trainable'] == layers * 2 * (64 * hidden + 64 + hidden * 64 + hidden)
    # Prefix: embedding (10 x h), MLP in (512 x h + 512), MLP out (2h x 512 + 2h) per block.
    assert summary['prefix']['trainable'] == layers * (10 * hidden + 512 * hidden + 512 + 2 * hidden * 512
                                                       + 2 * hidden)
    assert summary['adapter']['total'] == summary['full']['total'] + summary['adapter']['trainable']
    assert list(results['train_ab']['train']) == ['full', 'adapter', 'prefix']
    assert list(results['forward']['train']) == ['full', 'adapter', 'prefix']
    for name in ('adapter', 'prefix'):
        assert summary[name]['step_ratio']['n'] == 1
        assert 0.1 < results['forward']['train'][name]['cpu_ratio'] < 10
    switch = results['switch']
    checks = switch['checks']
    assert checks['switch_change'] > 1e-3 and checks['vs_model_built_with_b'] <= 1e-5
    assert checks['switch_back'] == 0.0 and checks['loaded_vs_trained'] == 0.0 and checks['merged'] < 1e-4
    assert switch['lora_layers'] == 4 and switch['adapter_params'] == 4 * 8 * (128 + 128)
    for op in ('set_adapter_trainable', 'set_adapter_inference', 'merge', 'unmerge'):
        row = switch['ops'][op]
        assert row['n'] >= 2 and row['x_forward'] == pytest.approx(
            row['median_ms'] / switch['ops']['forward']['median_ms'])
    text = page.read_text(encoding='utf-8')
    assert '### 4. Switching and merging' in text and 'Adapter (Houlsby' in text and 'prefix tuning (10' in text
    assert 'set_adapter between trainable LoRA adapters' in text


@pytest.mark.slow
def test_quick_run_of_the_mixed_adapter_part(tmp_path):
    """A real (tiny) run of the mixed-adapter part: its worker fails unless every row of the mixed batch equals
    its adapter alone and the mixes share one compiled graph; the page gets the table and the target row."""
    out_json, page = tmp_path / 'b.json', tmp_path / 'b.md'
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, SCRIPT, '--quick', '--parts', 'mixed', '--repeats', '1',
                           '--iterations', '2', '--json', str(out_json), '--doc', str(page),
                           '--log-dir', str(tmp_path / 'logs')],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mixed = json.loads(out_json.read_text(encoding='utf-8'))['mixed']
    assert mixed['model']['batch'] == 8 and mixed['model']['vocab'] == 1000 and mixed['mix'] == list('abcdabcd')
    assert mixed['checks']['row_max_abs_diff'] <= 1e-5 < mixed['checks']['adapters_differ']
    assert mixed['checks']['graphs'] == 1
    assert 0.1 < mixed['rows']['mixed_vs_petmodel']['cpu_ratio'] < 10
    text = page.read_text(encoding='utf-8')
    assert '### 4b. Mixed-adapter batches' in text and 'mixed-adapter batch (8 rows over 4 LoRA adapters)' in text


def test_memory_part_plan_covers_both_models_variants_and_settings():
    """Part 1c: every variant on both models with and without the runner's default, the A/B settings on issue 17's
    model for full and LoRA only; --variants narrows the rows (full always stays), --memory-settings the A/B."""
    _, plan = orchestrate._memory_plan(orchestrate.parse_args([]))  # pylint: disable=protected-access
    breakdown = [p for p in plan if p[1] in orchestrate.MEMORY_BREAKDOWN]
    assert len(breakdown) == 2 * 2 * 4 and {p[0] for p in breakdown} == {'gpt_v1000', 'gpt'}
    assert orchestrate.MEMORY_MODELS['gpt_v1000']['vocab'] == 1000 and orchestrate.MEMORY_MODELS['gpt']['vocab'] == 50257
    ab = [p for p in plan if p[1] not in orchestrate.MEMORY_BREAKDOWN]
    assert {p[0] for p in ab} == {'gpt_v1000'} and {p[2] for p in ab} == {'full', 'lora_pet'}
    args = orchestrate.parse_args(['--variants', 'lora_fp16', '--memory-settings', 'somas'])
    _, plan = orchestrate._memory_plan(args)  # pylint: disable=protected-access
    assert plan == [(m, s, v) for m in ('gpt_v1000', 'gpt') for s in ('mindspore', 'mindpet')
                    for v in ('full', 'lora_fp16')] + [('gpt_v1000', 'somas', 'full')]
    with pytest.raises(SystemExit):
        orchestrate.parse_args(['--memory-settings', 'nonsense'])


def _memory_row(model, setting, variant, peak, step):
    row = lambda r: {'median': r, 'min': r, 'max': r, 'n': 1}  # noqa: E731
    phases = {key: dict(rss=peak, anon=peak - 300.0, hwm=peak, file=300.0) for key, _ in report.MEMORY_PHASES}
    return {'model': model, 'setting': setting, 'variant': variant, 'label': variant, 'setting_label': setting,
            'trainable': 1, 'total': 2, 'phases': phases, 'peak_mb': peak, 'peak_anon_mb': peak - 300.0,
            'step_cpu_s': step, 'step_s': step, 'peak_ratio': row(peak / 1600.0), 'peak_anon_ratio': row(0.5),
            'step_cpu_ratio': row(step / 2.0), 'step_ratio': row(step / 2.0), 'loss_first': 7.0, 'loss_last': 6.9}


def test_memory_part_targets_and_tables():
    rows = {}
    for setting in ('mindspore', 'mindpet', 'somas'):
        for variant, peak, step in (('full', 1600.0, 2.0), ('lora_pet', 1200.0, 1.0), ('lora_fp16', 790.0, 1.2)):
            rows[f'gpt_v1000/{setting}/{variant}'] = _memory_row('gpt_v1000', setting, variant, peak, step)
    results = {'memory': {'models': {'gpt_v1000': models.GPT_V1000}, 'rows': rows}}
    targets = {r['what']: r for r in report.evaluate_targets(results)}
    fp32 = targets['issue 17 model: LoRA peak RSS / full fine-tuning, float32 base']
    assert fp32['value'] == 0.75 and not fp32['met']
    fp16 = targets['issue 17 model: LoRA peak RSS / full fine-tuning, float16 base']
    assert fp16['value'] == 790.0 / 1600.0 and fp16['met']
    assert targets['issue 17 model: LoRA step time / full fine-tuning (one process each)']['met']
    text = report.render_markdown(dict(results, repeats=1, layer_repeats=1), 'cmd')
    assert '### 1c. Memory by phase' in text and '**gpt_v1000**: 6 blocks, hidden 768, vocab 1,000' in text
    # Phase cells are "RSS / anon"; the A/B table gives each setting's LoRA peak against the runner default's.
    assert '| 1200 / 900 |' in text
    ab = [line for line in text.splitlines() if line.startswith('| somas |')]
    assert ab and '| 1600 | 1200 | 0.750x' in ab[0] and '| +0 |' in ab[0]


@pytest.mark.slow
def test_quick_run_of_the_memory_part(tmp_path):
    """A real (tiny) run of part 1c: full and LoRA per process, with and without the runner's default, plus one
    A/B setting; every phase is recorded and the runner's release was applied where asked."""
    out_json, page = tmp_path / 'b.json', tmp_path / 'b.md'
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, SCRIPT, '--quick', '--parts', 'memory', '--variants', 'lora_pet',
                           '--memory-settings', 'arena2_mallopt', '--repeats', '1', '--steps', '1', '--warmup', '0',
                           '--json', str(out_json), '--doc', str(page), '--log-dir', str(tmp_path / 'logs')],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out_json.read_text(encoding='utf-8'))['memory']['rows']
    assert sorted(rows) == sorted(f'gpt_v1000/{s}/{v}' for s in ('mindspore', 'mindpet', 'arena2_mallopt')
                                  for v in ('full', 'lora_pet'))
    for key, row in rows.items():
        phases = row['phases']
        assert ('released' in phases) == (not key.startswith('gpt_v1000/mindspore/'))
        # The kernel's RSS counters are synced lazily: high-water marks agree within 2 MB, not to the byte.
        assert phases['imported']['rss'] < phases['compiled']['hwm'] < phases['steady']['hwm'] + 2
        assert abs(phases['steady']['hwm'] - row['peak_mb']) < 2
        assert phases['steady']['anon'] < phases['steady']['rss']
    assert rows['gpt_v1000/mindpet/lora_pet']['settings_applied']['released'] in (True, False)
    assert rows['gpt_v1000/arena2_mallopt/lora_pet']['settings_applied']['mallopt'] == {'M_ARENA_MAX': 1}
    # The settings change no number: same losses as without them.
    assert len({(r['loss_first'], r['loss_last']) for k, r in rows.items() if k.endswith('/lora_pet')}) == 1
    assert rows['gpt_v1000/mindpet/lora_pet']['trainable'] == 2 * 2 * 8 * (128 + 128)
    text = page.read_text(encoding='utf-8')
    assert '### 1c. Memory by phase' in text and 'issue 17 model: LoRA peak RSS / full fine-tuning' in text


def test_issue17_group_steps_lora_against_full_on_the_vocab_1000_model():
    """train_ab's 'issue17' group runs on issue 17's model (vocab 1,000), the other groups on part 1's; with
    --variants lora_pet only that group has something to compare."""
    class FakeRunner:
        def __init__(self):
            self.calls = []

        def run(self, env, kind, cfg):
            self.calls.append((kind, cfg['variants'], cfg['model']['vocab']))
            return {}

    runner = FakeRunner()
    args = orchestrate.parse_args(['--repeats', '1'])
    orchestrate._run_groups(runner, orchestrate.TRAIN_AB_GROUPS, {'train', 'issue17'}, args, 'train_ab',  # pylint: disable=protected-access
                            dict(model=models.GPT))
    assert ('train_ab', ['full', 'lora_pet', 'floor'], 1000) in runner.calls
    assert ('train_ab', orchestrate.TRAIN_AB_GROUPS['train']['variants'], 50257) in runner.calls
    runner = FakeRunner()
    orchestrate._run_groups(runner, orchestrate.TRAIN_AB_GROUPS, {'train', 'issue17'},  # pylint: disable=protected-access
                            orchestrate.parse_args(['--repeats', '1', '--variants', 'lora_pet']), 'train_ab',
                            dict(model=models.GPT))
    assert runner.calls == [('train_ab', ['full', 'lora_pet'], 1000)]
    # Forward groups have no 'issue17': it is skipped there.
    runner = FakeRunner()
    orchestrate._run_groups(runner, orchestrate.FORWARD_GROUPS, {'train', 'issue17'}, args, 'forward',  # pylint: disable=protected-access
                            dict(model=models.GPT))
    assert [c[0] for c in runner.calls] == ['forward']
