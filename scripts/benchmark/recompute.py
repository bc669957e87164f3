"""Benchmark part ``recompute``: activation recompute (``mindpet.recompute.apply_recompute`` on every block) on
issue 17's GPT-like model at a long sequence, with and without, one process per variant (the part-1 training
worker: peak RSS, anonymous memory, memory by phase, step wall and CPU time). Ratios are paired within a round:
each round runs the plain variant, then the recomputed one, seconds apart under the same load."""
from .measure import median
from .models import GPT_V1000, QUICK, TRAIN_VARIANTS

# Issue 17's model (6 blocks, hidden 768, vocab 1,000) at sequence length 512, batch 2: activations grow with
# batch x sequence (the attention scores with its square), so this is where recompute is meant to pay.
RECOMPUTE_MODEL = dict(GPT_V1000, batch=2, seq=512)
# (plain variant, its recomputed twin): the ratio of each pair is recomputed / plain
RECOMPUTE_PAIRS = (('lora_pet', 'lora_pet_recompute'), ('full', 'full_recompute'))
METRICS = ('peak_mb', 'peak_anon_mb', 'step_s', 'step_cpu_s', 'compile_s')
# the runner's default memory setting (orchestrate.MEMORY_SETTINGS['mindpet']): what a `mindpet finetune` run does
RUN_SETTINGS = dict(release=True)


def run_recompute(runner, args, common):
    """Every pair of :data:`RECOMPUTE_PAIRS` (``--variants`` narrows to the pairs it names), ``args.repeats``
    rounds. Returns ``dict(model, rows, ratios, runs)``: per variant the medians of :data:`METRICS`, the memory by
    phase and the losses; per pair the paired ratios recomputed / plain."""
    model = dict(QUICK['gpt'], vocab=1000) if args.quick else dict(RECOMPUTE_MODEL)
    pairs = [pair for pair in RECOMPUTE_PAIRS if args.variants is None or set(pair) & set(args.variants)]
    runs = {name: [] for pair in pairs for name in pair}
    for _ in range(args.repeats):
        for pair in pairs:
            for name in pair:
                runs[name].append(runner.run('main', 'train', dict(common, variant=name, model=model,
                                                                    settings=RUN_SETTINGS)))
    rows = {}
    for name, results in runs.items():
        row = {key: median([r[key] for r in results]) for key in METRICS}
        row.update(label=TRAIN_VARIANTS[name]['label'], phases=results[0]['memory_phases'],
                   trainable=results[0]['trainable'], loss_first=results[0]['loss_first'],
                   loss_last=results[0]['loss_last'])
        rows[name] = row
    ratios = {}
    for plain, recomputed in pairs:
        ratios[recomputed] = {}
        for key in METRICS:
            each = [b[key] / a[key] for a, b in zip(runs[plain], runs[recomputed])]
            ratios[recomputed][key] = dict(median=median(each), min=min(each), max=max(each), n=len(each))
    return dict(model=model, pairs=[list(p) for p in pairs], rows=rows, ratios=ratios, runs=runs)


def recompute_table(part):
    """The markdown table of a ``run_recompute`` result (for doc/benchmarks.md's recompute section)."""
    lines = ['| variant | peak RSS (MB) | peak anon (MB) | anon growth in the first step (MB) | step CPU (s) | '
             'step wall (s) | compile + first step (s) | loss first -> last |',
             '|---|---|---|---|---|---|---|---|']
    for plain, recomputed in part['pairs']:
        for name in (plain, recomputed):
            row = part['rows'][name]
            growth = row['phases']['first_step']['anon'] - row['phases']['released']['anon'] \
                if 'released' in row['phases'] else float('nan')
            lines.append(f"| {row['label']} | {row['peak_mb']:,.0f} | {row['peak_anon_mb']:,.0f} | {growth:,.0f} | "
                         f"{row['step_cpu_s']:.3f} | {row['step_s']:.3f} | {row['compile_s']:.1f} | "
                         f"{row['loss_first']:.4f} -> {row['loss_last']:.4f} |")
        ratio = part['ratios'][recomputed]
        cells = ' | '.join(f"{ratio[key]['median']:.3f}x ({ratio[key]['min']:.3f}-{ratio[key]['max']:.3f})"
                           for key in ('peak_mb', 'peak_anon_mb'))
        lines.append(f"| ratio recompute / without (paired rounds, median (min-max)) | {cells} | | "
                     f"{ratio['step_cpu_s']['median']:.3f}x | {ratio['step_s']['median']:.3f}x | "
                     f"{ratio['compile_s']['median']:.3f}x | |")
    return '\n'.join(lines)
