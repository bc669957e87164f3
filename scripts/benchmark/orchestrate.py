"""The benchmark's command line and orchestration: starts every measurement in its own worker process
(``scripts/benchmark.py --worker KIND``), interleaves variants over rounds, turns the workers' figures into paired
ratios, and writes the JSON and the results block of the markdown page (the rendering is in report.py)."""
import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time

from .measure import median
from .models import ADAPTER, GPT, GPT_V1000, GPT2_SMALL, LAYER, LORA, PREFIX, QUICK, SWITCH_INPUT, TRAIN_VARIANTS
from .report import evaluate_targets, render_markdown, update_doc
from .workers_ms import (worker_ckpt, worker_forward, worker_layer, worker_mixed, worker_reference, worker_switch,
                         worker_train, worker_train_ab)
from .workers_torch import worker_torch_forward, worker_torch_train, worker_torch_train_ab
from .workers_mindone import MINDONE_BERT, MINDONE_QUICK, MINDONE_VARIANTS, worker_mindone
from .race import RACE_SIDES, prepare_race, race_settings, worker_race_mindpet, worker_race_peft
from .recompute import run_recompute


DESCRIPTION = ('Benchmark suite for mindpet: what parameter-efficient tuning promises (step time, memory, checkpoint '
               'size, switching time, inference overhead), measured side by side in one run and reported as ratios.')
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The command every worker process runs (with --worker KIND).
SCRIPT = os.path.join(ROOT, 'scripts', 'benchmark.py')
BENCH_DIR = os.path.join(ROOT, '.bench')
RESULT_TAG = '@@BENCH_RESULT '


# Virtualenvs: 'main' is the interpreter running this script; the others are created under .bench/ when needed.
MINDSPORE_PIN = 'mindspore==2.10.0'
VENVS = {
    'mindpet104': ['numpy<2', MINDSPORE_PIN, 'pyyaml', '--no-deps mindpet==1.0.4'],
    'peft': ['torch==2.13.0', 'numpy<2', 'peft'],
    # The MiniLM race's PyTorch side: transformers' BertModel loads the weights package's safetensors.
    'race': ['torch==2.13.0', 'numpy<2', 'peft', 'transformers', 'safetensors'],
}


# One forward worker per group: its variants are built in one process and timed interleaved; the first is the base.
FORWARD_GROUPS = {
    'train': dict(env='main', variants=['full', 'lora', 'adapter', 'bitfit', 'prefix']),
    'reference': dict(env='mindpet104', variants=['full', 'lora', 'lora_mindpet104']),
    'peers': dict(env='peft', variants=['peft_full', 'peft_lora']),
}
# Training steps of several variants built in one process and stepped in turn: each round's ratio compares steps
# taken seconds apart under the same load, which per-process runs cannot (their memory figures need them, though).
TRAIN_AB_GROUPS = {
    'train': dict(env='main', variants=['full', 'lora', 'adapter', 'bitfit', 'prefix', 'floor']),
    'reference': dict(env='mindpet104', variants=['lora_mindpet104', 'lora', 'floor']),
    'peers': dict(env='peft', variants=['peft_full', 'peft_lora']),
    # Issue 17's model (vocab 1,000; MEMORY_MODELS): LoRA as users apply it, against full and the floor.
    'issue17': dict(env='main', variants=['full', 'lora_pet', 'floor'], model='gpt_v1000'),
}
# Part 1c (memory): one process per (model, setting, variant). The models: issue 17's (vocab 1,000) and part 1's.
MEMORY_MODELS = {'gpt_v1000': GPT_V1000, 'gpt': GPT}
MEMORY_VARIANTS = ['full', 'lora_pet', 'lora_fp16', 'floor']
# Settings tried against MindSpore's defaults: 'settings' is applied inside the worker (mallopt before MindSpore
# is imported; the MindSpore ones after set_context), 'env' is added to the worker's environment. 'mindpet' is
# what the runner does by default (mindpet.utils.ms_settings); every setting but 'mindspore' includes it, so each
# A/B row is that setting on top of the runner's default. 'needs' names a file the setting needs (else skipped).
MEMORY_SETTINGS = {
    'mindspore': dict(label='MindSpore and glibc defaults (no mindpet setting)', settings={}),
    'mindpet': dict(label='mindpet run default: compile, then gc + malloc_trim(0) before the first step',
                    settings=dict(release=True)),
    'arena2_env': dict(label='+ MALLOC_ARENA_MAX=2 (environment)', settings=dict(release=True),
                       env=dict(MALLOC_ARENA_MAX='2')),
    'arena2_mallopt': dict(label='+ mallopt(M_ARENA_MAX, 2) before import mindspore',
                           settings=dict(release=True, mallopt=dict(M_ARENA_MAX=2))),
    'trim_threshold': dict(label='+ mallopt M_TRIM_THRESHOLD 128 KB, M_MMAP_THRESHOLD 128 KB (no dynamic growth)',
                           settings=dict(release=True, mallopt=dict(M_TRIM_THRESHOLD=131072,
                                                                    M_MMAP_THRESHOLD=131072))),
    'jit_o1': dict(label="+ jit_config={'jit_level': 'O1'} (default on CPU: O0)",
                   settings=dict(release=True, jit_level='O1')),
    'somas': dict(label="+ ms.runtime.set_memory(optimize_level='O1') (static SOMAS reuse)",
                  settings=dict(release=True, set_memory=dict(optimize_level='O1'))),
    'threads2': dict(label='+ runtime_num_threads=2', settings=dict(release=True, runtime_num_threads=2)),
    # Two processes: the first fills a compile cache of its own, the second (measured) loads the graph from it.
    'compile_cache': dict(label='+ MindSpore compile cache, second run (graph loaded from the cache)',
                          settings=dict(release=True), compile_cache=True),
    'jemalloc': dict(label='+ LD_PRELOAD jemalloc (Debian libjemalloc2)', settings=dict(release=True),
                     env=dict(LD_PRELOAD='/usr/lib/x86_64-linux-gnu/libjemalloc.so.2'),
                     needs='/usr/lib/x86_64-linux-gnu/libjemalloc.so.2'),
    'tcmalloc': dict(label='+ LD_PRELOAD tcmalloc (Debian libtcmalloc-minimal4)', settings=dict(release=True),
                     env=dict(LD_PRELOAD='/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4'),
                     needs='/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4'),
}
# The phase breakdown runs every MEMORY_VARIANT on both models under these; the A/B candidates (all other
# settings) run full and LoRA on issue 17's model only.
MEMORY_BREAKDOWN = ('mindspore', 'mindpet')
MEMORY_AB_VARIANTS = ('full', 'lora_pet')
PARTS = ('train', 'memory', 'train_ab', 'forward', 'layer', 'ckpt', 'switch', 'mixed', 'reference', 'mindone', 'cli', 'race',
         'recompute')
# 'mindone' needs the optional mindone extra and 'race' (MiniLM LoRA: mindpet vs PEFT on PyTorch, minutes of real
# training) the bert extra and a PyTorch virtualenv: both are asked for by name (--parts race), not run by default.
# 'recompute' (seq 512, minutes per process) is asked for by name too.
DEFAULT_PARTS = tuple(p for p in PARTS if p not in ('mindone', 'race', 'recompute'))
# Start-up of the mindpet command, side by side with what loading MindSpore alone costs (one process per call).
CLI_CALLS = {'help': ['-m', 'mindpet', '--help'], 'version': ['-m', 'mindpet', '--version'],
             'finetune_help': ['-m', 'mindpet', 'finetune', '--help'], 'import_mindspore': ['-c', 'import mindspore']}


WORKERS = {'train': worker_train, 'train_ab': worker_train_ab, 'torch_train_ab': worker_torch_train_ab,
           'forward': worker_forward, 'layer': worker_layer, 'ckpt': worker_ckpt, 'switch': worker_switch,
           'reference': worker_reference, 'torch_train': worker_torch_train, 'torch_forward': worker_torch_forward,
           'mindone': worker_mindone, 'mixed': worker_mixed, 'race_mindpet': worker_race_mindpet,
           'race_peft': worker_race_peft}


def run_as_worker(kind, cfg_json):
    cfg = json.loads(cfg_json)
    load = os.getloadavg()[0]
    result = WORKERS[kind](cfg)
    result['loadavg_start'] = load
    print(RESULT_TAG + json.dumps(result), flush=True)


def venv_python(env, log):
    """The interpreter of virtualenv ``env``, created under .bench/ (and its packages installed) when missing."""
    if env == 'main':
        return sys.executable
    path = os.path.join(BENCH_DIR, f'venv-{env}')
    python = os.path.join(path, 'bin', 'python')
    stamp = os.path.join(path, '.installed')
    if not os.path.isfile(stamp):
        log(f'[setup] creating {path} ({", ".join(VENVS[env])}); this downloads packages once')
        subprocess.run([sys.executable, '-m', 'venv', path], check=True)
        for spec in VENVS[env]:
            subprocess.run([python, '-m', 'pip', 'install', '-q', *spec.split()], check=True)
        with open(stamp, 'w', encoding='utf-8') as fh:
            fh.write('\n'.join(VENVS[env]) + '\n')
    return python


class Runner:
    """Starts worker processes and collects their JSON results; stderr of each goes to a log file."""

    def __init__(self, args):
        self.args = args
        self.log_dir = args.log_dir or os.path.join(ROOT, 'outputs', 'benchmark-logs')
        os.makedirs(self.log_dir, exist_ok=True)
        self.count = 0
        self.loads = []

    def log(self, message):
        print(message, file=sys.stderr, flush=True)

    def run(self, env, kind, cfg, extra_env=None):
        """Run worker ``kind`` in virtualenv ``env`` with ``cfg``; ``extra_env``: variables added to its
        environment (allocator settings that must exist before the process starts)."""
        cfg = dict(cfg, device=self.args.device)
        python = venv_python(env, self.log)
        child_env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v='3', MS_COMPILER_CACHE_ENABLE='0',
                         PYTHONUNBUFFERED='1')
        child_env.update(extra_env or {})
        self.count += 1
        tag = cfg.get('variant', env) + (f'-{cfg["setting"]}' if cfg.get('setting') else '')
        log_path = os.path.join(self.log_dir, f'{self.count:03d}-{kind}-{tag}.log')
        self.log(f'[run {self.count}] {kind} {tag} ({env}) load={os.getloadavg()[0]:.2f}')
        start = time.perf_counter()
        proc = subprocess.run([python, SCRIPT, '--worker', kind, '--args', json.dumps(cfg)],
                              capture_output=True, text=True, env=child_env, cwd=ROOT,
                              timeout=self.args.timeout, check=False)
        with open(log_path, 'w', encoding='utf-8') as fh:
            fh.write(proc.stdout + '\n--- stderr ---\n' + proc.stderr)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
        if proc.returncode != 0 or not lines:
            tail = '\n'.join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f'worker {kind} {cfg.get("variant", "")} failed (exit {proc.returncode}); '
                               f'log {log_path}:\n{tail}')
        result = json.loads(lines[-1][len(RESULT_TAG):])
        result['wall_s'] = time.perf_counter() - start
        self.loads.append(result['loadavg_start'])
        return result


def _paired_ratio(results, name, base, key):
    """Median and range over repeats of results[name][r][key] / results[base][r][key] (same round)."""
    ratios = [a[key] / b[key] for a, b in zip(results[name], results[base]) if a.get(key) and b.get(key)]
    if not ratios:
        return None
    return dict(median=median(ratios), min=min(ratios), max=max(ratios), n=len(ratios))


def _group_variants(table, group, args):
    """The variants of ``table[group]`` selected by ``--variants`` (its first, the base, always kept), or [] when
    the selection leaves nothing to compare with the base."""
    names = table[group]['variants']
    chosen = [v for i, v in enumerate(names) if i == 0 or args.variants is None or v in args.variants]
    return chosen if len(chosen) > 1 or args.variants is None else []


def _run_groups(runner, table, groups, args, kind, payload):
    """Run every selected group of ``table`` (its variants built in one worker process and timed in turn)
    ``args.repeats`` times, groups interleaved within a round: ``{group: (variants, [worker result per round])}``.
    PyTorch groups use the ``torch_<kind>`` worker."""
    results = {}
    for _ in range(args.repeats):
        for group in sorted(g for g in groups if g in table):
            chosen = _group_variants(table, group, args)
            if not chosen:
                continue
            env = table[group]['env']
            cfg = dict(payload, variants=chosen)
            if 'model' in table[group] and not args.quick:     # --quick: every group on the tiny model
                cfg['model'] = MEMORY_MODELS[table[group]['model']]
            result = runner.run(env, f'torch_{kind}' if env == 'peft' else kind, cfg)
            results.setdefault(group, (chosen, []))[1].append(result)
    return results


def _ratios_to_first(chosen, runs, keys, range_tag):
    """Per variant: for each ``(key, tag)`` the median of ``run[key][variant]`` over the rounds and its ratio to
    the group's first variant (median, min and max over the rounds, named ``<tag>ratio`` and
    ``<tag><range_tag>min/max``)."""
    base = chosen[0]
    rows = {}
    for name in chosen:
        row = dict(base=base)
        for key, tag in keys:
            ratios = [r[key][name] / r[key][base] for r in runs]
            row.update({key: median([r[key][name] for r in runs]), f'{tag}ratio': median(ratios),
                        f'{tag}{range_tag}min': min(ratios), f'{tag}{range_tag}max': max(ratios)})
        rows[name] = row
    return rows


def run_benchmarks(args):
    runner = Runner(args)
    sizes = QUICK if args.quick else dict(gpt=GPT, gpt2=GPT2_SMALL, layer=LAYER, switch_input=SWITCH_INPUT)
    parts = set(args.parts)
    groups = {'train', 'issue17'} | ({'reference'} if 'reference' in parts else set()) | \
        ({'peers'} if args.peers else set())
    common = dict(warmup=args.warmup, steps=args.steps)
    out = dict(parts=sorted(parts), peers=args.peers, repeats=args.repeats, layer_repeats=args.layer_repeats,
               sizes=sizes, lora=dict(LORA), adapter=dict(ADAPTER), prefix=dict(PREFIX), variants=args.variants,
               device=args.device)

    if 'train' in parts:
        wanted = set(TRAIN_VARIANTS) if args.variants is None else set(args.variants)
        wanted |= {TRAIN_VARIANTS[v]['base'] for v in wanted}
        variants = [v for v, spec in TRAIN_VARIANTS.items() if spec['group'] in groups and v in wanted]
        train = {v: [] for v in variants}
        for _ in range(args.repeats):
            for name in variants:
                spec = TRAIN_VARIANTS[name]
                kind = 'torch_train' if spec['apply'].startswith('torch_') else 'train'
                train[name].append(runner.run(spec['env'], kind, dict(common, variant=name, model=sizes['gpt'])))
        summary = {}
        for name in variants:
            base = TRAIN_VARIANTS[name]['base']
            runs = train[name]
            summary[name] = dict(label=TRAIN_VARIANTS[name]['label'], base=base,
                                 compile_s=median([r['compile_s'] for r in runs]),
                                 trainable=runs[0]['trainable'], total=runs[0]['total'],
                                 loss_first=runs[0]['loss_first'], loss_last=runs[0]['loss_last'])
            for key in ('step_s', 'step_cpu_s', 'peak_mb', 'peak_anon_mb'):
                summary[name][key] = median([r[key] for r in runs if r.get(key)])
                summary[name][key.replace('_s', '').replace('_mb', '') + '_ratio'] = \
                    _paired_ratio(train, name, base, key)
            summary[name]['rss_phases'] = runs[0].get('rss_phases')
        out['train'] = dict(summary=summary, runs=train)

    if 'memory' in parts:
        out['memory'] = run_memory(runner, args, common)

    if 'train_ab' in parts:
        out['train_ab'] = {}
        for group, (chosen, runs) in _run_groups(runner, TRAIN_AB_GROUPS, groups, args, 'train_ab',
                                                 dict(common, model=sizes['gpt'])).items():
            rows = _ratios_to_first(chosen, runs, (('time_s', ''), ('cpu_s', 'cpu_')), range_tag='')
            for name, row in rows.items():
                paired = [r['paired_cpu'][name] for r in runs]
                row.update(paired_ratio=median(paired), paired_min=min(paired), paired_max=max(paired))
            out['train_ab'][group] = rows

    if 'forward' in parts:
        out['forward'] = {}
        for group, (chosen, runs) in _run_groups(runner, FORWARD_GROUPS, groups, args, 'forward',
                                                 dict(model=sizes['gpt'], iterations=args.iterations)).items():
            out['forward'][group] = _ratios_to_first(chosen, runs, (('forward_s', ''), ('forward_cpu_s', 'cpu_')),
                                                     range_tag='ratio_')

    if 'layer' in parts:
        runs = [runner.run('main', 'layer', dict(layer=sizes['layer'], iterations=args.iterations * 2))
                for _ in range(args.layer_repeats)]
        out['layer'] = _ratio_table(runs, {
            'fwd_unmerged': ('fwd:lora', 'fwd:dense'),
            'fwd_merged_in_place': ('fwd:lora_merged_in_place', 'fwd:dense'),
            'fwd_to_dense': ('fwd:lora_to_dense', 'fwd:dense'),
            'fwdbwd_vs_dense_full': ('fwdbwd:lora_grad', 'fwdbwd:dense_full_grad'),
            'fwdbwd_vs_dense_input_only': ('fwdbwd:lora_grad', 'fwdbwd:dense_input_grad')})
        out['layer']['merge_max_abs_diff'] = max(r['merge_max_abs_diff'] for r in runs)

    if 'ckpt' in parts:
        out['ckpt'] = runner.run('main', 'ckpt', dict(model=sizes['gpt2']))

    if 'switch' in parts:
        out['switch'] = runner.run('main', 'switch', dict(model=dict(sizes['gpt2'], **sizes['switch_input']),
                                                          iterations=args.iterations))

    if 'mixed' in parts:
        # The GPT-like model (vocab 1,000), a batch of 8 rows over 4 adapters.
        payload = dict(model=dict(sizes['gpt'], vocab=1000, batch=8), iterations=args.iterations)
        runs = [runner.run('main', 'mixed', payload) for _ in range(args.repeats)]
        out['mixed'] = dict(model=payload['model'], checks=runs[0]['checks'], mix=runs[0]['mix'],
                            rows=_ratio_table(runs, {'mixed_vs_petmodel': ('view_mixed', 'petmodel_single'),
                                                     'mixed_vs_view_single': ('view_mixed', 'view_single'),
                                                     'view_single_vs_petmodel': ('view_single', 'petmodel_single')}))

    if 'reference' in parts:
        dtypes = ['float32', 'float16']
        runs = [runner.run('mindpet104', 'reference', dict(layer=sizes['layer'], iterations=args.iterations * 2,
                                                             dtypes=dtypes))
                for _ in range(args.layer_repeats)]
        pairs = {}
        for d in dtypes:
            for kind in ('fwd', 'fwdbwd'):
                pairs[f'{kind}_{d}'] = (f'{kind}:{d}:ours', f'{kind}:{d}:mindpet104')
        out['reference'] = _ratio_table(runs, pairs)
        out['reference']['max_abs_diff'] = runs[0]['max_abs_diff']

    if 'mindone' in parts:
        payload = dict(common, bert=MINDONE_QUICK if args.quick else MINDONE_BERT, variants=list(MINDONE_VARIANTS),
                       iterations=args.iterations)
        runs = [runner.run('main', 'mindone', payload) for _ in range(args.repeats)]
        rows = _ratios_to_first(list(MINDONE_VARIANTS), runs, (('step_s', 'step_'), ('step_cpu_s', 'step_cpu_'),
                                                               ('forward_s', 'forward_'),
                                                               ('forward_cpu_s', 'forward_cpu_')), range_tag='')
        for name, row in rows.items():
            row['trainable'] = runs[0]['trainable'][name]
        out['mindone'] = dict(bert=payload['bert'], rows=rows)

    if 'cli' in parts:
        out['cli'] = measure_cli(args.repeats, args.timeout)

    if 'race' in parts:
        out['race'] = run_race(runner, args)

    if 'recompute' in parts:
        out['recompute'] = run_recompute(runner, args, common)

    out['machine'] = machine_info()
    out['load'] = dict(min=min(runner.loads, default=None), max=max(runner.loads, default=None),
                       median=median(runner.loads) if runner.loads else None)
    return out


def _memory_plan(args):
    """The (model, setting, variant) processes of one round of the memory part, in run order."""
    models = {'gpt_v1000': QUICK['gpt']} if args.quick else MEMORY_MODELS
    # --quick checks the script: the A/B candidates only when asked for by name.
    chosen = args.memory_settings or ([] if args.quick else MEMORY_SETTINGS)
    candidates = [s for s in chosen if s not in MEMORY_BREAKDOWN
                  and os.path.exists(MEMORY_SETTINGS[s].get('needs', os.sep))]
    # --variants narrows the rows (full, the base of every ratio, always runs).
    variants = [v for v in MEMORY_VARIANTS if v == 'full' or args.variants is None or v in args.variants]
    plan = [(m, s, v) for m in models for s in MEMORY_BREAKDOWN for v in variants]
    plan += [('gpt_v1000', s, v) for s in candidates for v in MEMORY_AB_VARIANTS if v in variants]
    return models, plan


def run_memory(runner, args, common):
    """Part 1c: memory by phase for MEMORY_VARIANTS on MEMORY_MODELS, without and with mindpet's run default,
    and the A/B settings on issue 17's model. Ratios (peak / full) are paired within a round."""
    models, plan = _memory_plan(args)
    runs = {}
    for _ in range(args.repeats):
        for model, setting, variant in plan:
            spec = MEMORY_SETTINGS[setting]
            cfg = dict(common, variant=variant, model=models[model], setting=setting, settings=spec['settings'])
            extra_env = dict(spec.get('env') or {})
            if spec.get('compile_cache'):
                cache = os.path.join(runner.log_dir, 'compile-cache', f'{model}-{variant}')
                shutil.rmtree(cache, ignore_errors=True)
                extra_env.update(MS_COMPILER_CACHE_ENABLE='1', MS_COMPILER_CACHE_PATH=cache)
                runner.run('main', 'train', cfg, extra_env=extra_env)     # fills the cache
            runs.setdefault(f'{model}/{setting}/{variant}', []).append(
                runner.run('main', 'train', cfg, extra_env=extra_env))
    rows = {}
    for key, results in runs.items():
        model, setting, variant = key.split('/')
        base = runs[f'{model}/{setting}/full']
        row = dict(model=model, setting=setting, variant=variant, label=TRAIN_VARIANTS[variant]['label'],
                   setting_label=MEMORY_SETTINGS[setting]['label'], trainable=results[0]['trainable'],
                   total=results[0]['total'], phases=results[0]['memory_phases'],
                   settings_applied=results[0]['settings_applied'],
                   loss_first=results[0]['loss_first'], loss_last=results[0]['loss_last'])
        for metric in ('peak_mb', 'peak_anon_mb', 'step_cpu_s', 'step_s'):
            row[metric] = median([r[metric] for r in results])
            ratio = _paired_ratio({'a': results, 'b': base}, 'a', 'b', metric)
            row[metric.rsplit('_', 1)[0] + '_ratio'] = ratio
        rows[key] = row
    return dict(models=models, rows=rows, runs=runs)


def run_race(runner, args):
    """The MiniLM race: one mindpet process and one PEFT process per round, on the inputs fixed once by
    :func:`prepare_race` (``--race-steps`` caps the steps; default all of configs/bert_lora.yaml's)."""
    from examples.bert.model import minilm_model_dir  # pylint: disable=import-outside-toplevel
    settings = race_settings(ROOT, args.race_steps)
    inputs = prepare_race(ROOT, settings, runner.log_dir)
    payload = dict(settings=settings, inputs=inputs, package_dir=minilm_model_dir())
    runs = {side: [] for side in RACE_SIDES}
    for _ in range(args.repeats):
        runs['mindpet'].append(runner.run('main', 'race_mindpet', payload))
        runs['peft'].append(runner.run('race', 'race_peft', payload))
    rows = {}
    for side, results in runs.items():
        rows[side] = {key: median([r[key] for r in results if r.get(key) is not None])
                      for key in ('step_s', 'step_cpu_s', 'first_step_s', 'train_s', 'peak_mb', 'peak_anon_mb',
                                  'accuracy', 'loss_last')}
        rows[side].update(trainable=results[0]['trainable'], total=results[0]['total'], steps=results[0]['steps'],
                          accuracies=[r['accuracy'] for r in results])
    rows['peft']['torch_threads'] = runs['peft'][0].get('torch_threads')
    everyone = runs['mindpet'] + runs['peft']
    ratios = {key: median([a[key] / b[key] for a, b in zip(runs['mindpet'], runs['peft'])])
              for key in ('step_s', 'step_cpu_s', 'peak_mb', 'peak_anon_mb')
              if all(r.get(key) for r in everyone)}
    return dict(settings=settings, rows=rows, ratios=ratios, runs=runs)


def measure_cli(repeats, timeout):
    """Wall and CPU time (the child's user + system seconds) of each :data:`CLI_CALLS` process, the calls of a round
    run back to back; ``wall_over_import`` is the per-round ratio to ``python -c 'import mindspore'``."""
    runs = {name: [] for name in CLI_CALLS}
    loads = []
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), GLOG_v='3')
    for _ in range(repeats):
        loads.append(os.getloadavg()[0])
        for name, argv in CLI_CALLS.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, env=env,
                                  timeout=timeout, check=False)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if proc.returncode != 0:
                raise RuntimeError(f"'python {' '.join(argv)}' failed ({proc.returncode}): {proc.stderr[-500:]}")
            runs[name].append(dict(wall_s=wall, cpu_s=(after.ru_utime - before.ru_utime)
                                   + (after.ru_stime - before.ru_stime)))
    out = {}
    for name, rows in runs.items():
        walls = [r['wall_s'] for r in rows]
        out[name] = dict(command=shlex.join(['python', *CLI_CALLS[name]]), wall_s=median(walls), wall_min=min(walls),
                         wall_max=max(walls), cpu_s=median([r['cpu_s'] for r in rows]))
        ratios = [r['wall_s'] / base['wall_s'] for r, base in zip(rows, runs['import_mindspore'])]
        out[name].update(wall_over_import=median(ratios), wall_over_import_min=min(ratios),
                         wall_over_import_max=max(ratios), loadavg=loads)
    return out


def _ratio_table(runs, pairs):
    """name -> median/min/max over runs of wall (ratio) and CPU (cpu_ratio) time of a / b, and median times."""
    table = {}
    for name, (num, den) in pairs.items():
        row = dict(of=num, vs=den)
        for key, tag in (('time_s', ''), ('cpu_s', 'cpu_')):
            ratios = [r[key][num] / r[key][den] for r in runs]
            row.update({f'{tag}ratio': median(ratios), f'{tag}min': min(ratios), f'{tag}max': max(ratios),
                        key: median([r[key][num] for r in runs]),
                        f'{tag}base_s': median([r[key][den] for r in runs])})
        table[name] = row
    return table


def machine_info():
    info = dict(python=platform.python_version(), platform=platform.platform(), cores=os.cpu_count())
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as fh:
            info['cpu'] = next((ln.split(':', 1)[1].strip() for ln in fh if ln.startswith('model name')), '?')
        with open('/proc/meminfo', encoding='utf-8') as fh:
            info['memory_gb'] = round(int(fh.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    try:
        from importlib.metadata import version
        info['mindspore'] = version('mindspore')
        info['numpy'] = version('numpy')
    except Exception:  # pylint: disable=broad-except
        pass
    peft_python = os.path.join(BENCH_DIR, 'venv-peft', 'bin', 'python')
    if os.path.isfile(peft_python):
        proc = subprocess.run([peft_python, '-c', 'import torch, peft; print(torch.__version__, peft.__version__)'],
                              capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            info['torch'], info['peft'] = proc.stdout.split()
    return info


def parse_args(argv):
    parser = argparse.ArgumentParser(description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='CPU', choices=['CPU', 'Ascend', 'GPU'],
                        help='MindSpore device for the MindSpore parts (PyTorch peers always run on CPU).')
    parser.add_argument('--parts', default=','.join(DEFAULT_PARTS),
                        help=f'comma-separated subset of {",".join(PARTS)} (default: all but mindone, which needs '
                             f'the mindone extra).')
    parser.add_argument('--peers', action='store_true', help='also run Hugging Face PEFT on PyTorch (own venv).')
    parser.add_argument('--variants', default=None,
                        help=f'comma-separated subset of the part-1 variants {",".join(TRAIN_VARIANTS)} (default: '
                             f'all of the selected groups; each one\'s base is always run).')
    parser.add_argument('--repeats', type=int, default=3, help='rounds of every measurement (default 3).')
    parser.add_argument('--layer-repeats', type=int, default=5,
                        help='processes for the layer and reference parts (cheap, so more of them; default 5).')
    parser.add_argument('--steps', type=int, default=8, help='timed training steps per process (default 8).')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps after the compiling one (default 2).')
    parser.add_argument('--iterations', type=int, default=10,
                        help='timed calls per candidate in forward/layer workers (layer/reference: twice this).')
    parser.add_argument('--race-steps', type=int, default=None,
                        help='race part: training steps (default all of configs/bert_lora.yaml: epochs x rows // '
                             'batch).')
    parser.add_argument('--memory-settings', default=None,
                        help=f'memory part: comma-separated A/B settings to try besides '
                             f'{",".join(MEMORY_BREAKDOWN)} (default all of {",".join(MEMORY_SETTINGS)}).')
    parser.add_argument('--quick', action='store_true', help='tiny shapes, to check the script itself.')
    parser.add_argument('--json', default=None, help='where to write the JSON (default doc/benchmarks.json; '
                                                     'outputs/benchmark-quick.json with --quick).')
    parser.add_argument('--doc', default=None, help='markdown page to update (default doc/benchmarks.md; '
                                                    'none with --quick).')
    parser.add_argument('--no-doc', action='store_true', help='do not update the markdown page.')
    parser.add_argument('--reuse', default=None,
                        help='JSON of an earlier run: keep its parts that this run does not measure.')
    parser.add_argument('--log-dir', default=None,
                        help='where each worker\'s output goes (default outputs/benchmark-logs).')
    parser.add_argument('--timeout', type=int, default=3600, help='seconds allowed per worker process.')
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--args', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(',') if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f'unknown part(s) {unknown}; choose from {list(PARTS)}')
    if args.variants is not None:
        args.variants = [v.strip() for v in args.variants.split(',') if v.strip()]
        unknown = sorted(set(args.variants) - set(TRAIN_VARIANTS))
        if unknown or not args.variants:
            parser.error(f'unknown variant(s) {unknown or args.variants}; choose from {list(TRAIN_VARIANTS)}')
    if args.memory_settings is not None:
        args.memory_settings = [v.strip() for v in args.memory_settings.split(',') if v.strip()]
        unknown = sorted(set(args.memory_settings) - set(MEMORY_SETTINGS))
        if unknown:
            parser.error(f'unknown memory setting(s) {unknown}; choose from {list(MEMORY_SETTINGS)}')
    if args.repeats < 1 or args.steps < 1 or args.iterations < 1 or args.warmup < 0:
        parser.error('--repeats, --steps and --iterations must be >= 1 and --warmup >= 0')
    if args.race_steps is not None and args.race_steps < 2:
        parser.error(f'--race-steps must be >= 2 (the first step compiles), got {args.race_steps}')
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        run_as_worker(args.worker, args.args)
        return 0
    command = 'PYTHONPATH=. python scripts/benchmark.py' + (' ' + ' '.join(argv) if argv else '')
    started = time.time()
    results = run_benchmarks(args)
    if args.reuse:
        with open(args.reuse, encoding='utf-8') as fh:
            earlier = json.load(fh)
        for key in PARTS:
            if key not in results and key in earlier:
                results[key] = earlier[key]
        results['reused'] = dict(path=args.reuse, date=earlier.get('date'), command=earlier.get('command'),
                                 load=earlier.get('load'),
                                 parts=sorted(k for k in earlier if k in PARTS and k not in args.parts))
        if 'train' in earlier and 'train' not in args.parts:
            results['sizes'] = earlier.get('sizes', results['sizes'])
    results['date'] = datetime.datetime.now().strftime('%Y-%m-%d %H:%M')
    results['command'] = command
    results['duration_s'] = time.time() - started
    results['targets'] = evaluate_targets(results)
    json_path = args.json or os.path.join(ROOT, 'outputs/benchmark-quick.json' if args.quick
                                          else 'doc/benchmarks.json')
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, 'w', encoding='utf-8') as fh:
        json.dump(results, fh, indent=1)
    block = render_markdown(results, command)
    print(block)
    doc = args.doc or (None if args.quick else os.path.join(ROOT, 'doc', 'benchmarks.md'))
    if doc and not args.no_doc:
        update_doc(doc, block)
        print(f'\n(updated {doc}; JSON in {json_path})', file=sys.stderr)
    return 0
