#!/usr/bin/env python
"""The BERT task's loss curve with a float32 frozen base against a float16 frozen base (issue 17).

    PYTHONPATH=. nice -n 5 python scripts/half_base_curve.py                    # configs/bert_lora.yaml, 75 steps
    PYTHONPATH=. python scripts/half_base_curve.py --quick --out /tmp/hb        # a tiny random BERT, 3 steps
    PYTHONPATH=. nice -n 5 python scripts/half_base_curve.py --noise-floor      # + a second float32 run

Each side is one ``mindpet finetune`` of the same config (same seed, so the same data order, head initialisation
and dropout masks), run in its own child process so that its peak RSS is its own; the sides differ only by
``--set model.base_dtype=float32`` / ``float16``. With ``--noise-floor`` a second float32 run with the same seed
shows how far two float32 runs are apart (the reference for the float16 difference). The children run one after
the other (never two at once on the shared cores). A child records, besides what the runner writes to ``metrics.json``, the CPU time of each step (this
process, all threads): the runner prints one progress line per step (``training.log_interval=1``), and the CPU
clock is read at each line.

After each side, a second child builds the same network without mindpet, stores it in the side's dtype the way
``base_dtype`` does (``Parameter.set_dtype`` + ``Cell.to_float``) and runs two forward passes: its peak RSS and CPU
time show what a half-precision network costs in MindSpore itself on this device.

Prints a table (loss at steps 1/10/25/50/75, the mean and largest absolute per-step loss difference, the final
evaluation, peak RSS, step times, the forward-only figures) and writes ``--out``/``half_base_curve.json`` and ``half_base_curve.png``.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from scripts.benchmark.measure import median, memory_figures  # noqa: E402  pylint: disable=wrong-import-position

CONFIG = os.path.join('configs', 'bert_lora.yaml')
SIDES = ('float32', 'float16')
AGAIN = 'float32_again'    # --noise-floor: float32 once more, same seed
REPORT_STEPS = (1, 10, 25, 50, 75)
# --quick: the same task on the 2-layer random-weight BERT for a few steps (what the test runs).
QUICK_SETS = ('model.size=tiny', 'training.max_steps=3')


def run_side(name, dtype, out_dir, extra_sets):
    """Fine-tune the config with ``model.base_dtype=dtype`` in this process, into ``out_dir/name``; returns the
    side's record."""
    from mindpet.train.runner import finetune  # pylint: disable=import-outside-toplevel
    marks = []

    def out(line):
        if line.startswith('step '):
            marks.append((time.perf_counter(), time.process_time()))
    side_dir = os.path.join(out_dir, name)
    sets = [f'model.base_dtype={dtype}', f'training.output_dir={side_dir}', 'training.log_interval=1',
            'training.plot=false'] + list(extra_sets)
    start = (time.perf_counter(), time.process_time())
    summary = finetune(os.path.join(ROOT, CONFIG), sets, out=out, overwrite=True)
    with open(os.path.join(side_dir, 'metrics.json'), encoding='utf-8') as handle:
        metrics = json.load(handle)
    # The first mark also holds the time from the start of finetune (evaluation before training, compilation):
    # only the differences between consecutive step lines are step CPU times.
    cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    after = metrics['eval'].get('after', {})
    return dict(base_dtype=dtype, sets=sets, losses=metrics['losses'], step_times=metrics['step_times'],
                step_cpu_times=cpu, step_cpu_s=median(cpu), step_s=median(metrics['step_times'][1:]),
                eval_accuracy=after.get('accuracy'), eval_loss=after.get('loss'),
                trainable_params=summary['trainable_params'], total_params=summary['total_params'],
                run_cpu_s=time.process_time() - start[1], **memory_figures())


def probe_side(dtype, extra_sets):
    """The same network without mindpet, its float32 parameters stored in ``dtype`` and its cells run in it (what
    ``base_dtype`` does to the frozen part), two forward passes of one training-sized batch in evaluation mode:
    tells MindSpore's own cost of a half-precision network on this device from what mindpet adds."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindpet.train.runner import load_plan, set_context  # pylint: disable=import-outside-toplevel
    plan = load_plan(os.path.join(ROOT, CONFIG), list(extra_sets))
    set_context(plan)
    network = plan.task.build_network()
    plan.task.load_base(network, plan.model.get('base_checkpoint'))
    if dtype != 'float32':
        half = getattr(ms, dtype)
        for param in network.get_parameters():
            if param.dtype == ms.float32:
                param.set_dtype(half)
        network.to_float(half)
    network.set_train(False)
    shape = (plan.training['batch_size'], plan.data['max_length'])
    ids = ms.Tensor(np.random.default_rng(0).integers(1, 1000, shape).astype(np.int32))
    mask = ms.Tensor(np.ones(shape, np.int32))
    network(ids, mask).asnumpy()                 # compiles
    start = time.process_time()
    network(ids, mask).asnumpy()
    return dict(base_dtype=dtype, forward_cpu_s=time.process_time() - start, **memory_figures())


def compare(sides, other='float16'):
    """The per-step loss difference of side ``other`` from the float32 side."""
    ref, half = np.array(sides['float32']['losses']), np.array(sides[other]['losses'])
    if len(ref) != len(half) or not len(ref):
        raise ValueError(f"the two sides ran {len(ref)} and {len(half)} steps; they must run the same steps")
    diff = np.abs(half - ref)
    return dict(steps=len(ref), mean_abs=float(diff.mean()), max_abs=float(diff.max()),
                max_at_step=int(diff.argmax()) + 1, final_abs=float(diff[-1]))


def table(result):
    """The markdown table of ``result`` (as written to the JSON)."""
    sides, diff = result['sides'], result['difference']
    names = [name for name in SIDES + (AGAIN,) if name in sides]
    steps = [s for s in REPORT_STEPS if s <= diff['steps']]
    if diff['steps'] not in steps:
        steps.append(diff['steps'])
    rows = [('base dtype', lambda s: f"`{s['base_dtype']}`")]
    rows += [(f'loss at step {k}', lambda s, k=k: f"{s['losses'][k - 1]:.4f}") for k in steps]
    rows += [('eval accuracy after', lambda s: _num(s['eval_accuracy'], '{:.4f}')),
             ('eval loss after', lambda s: _num(s['eval_loss'], '{:.4f}')),
             ('peak RSS (MB)', lambda s: f"{s['peak_mb']:,.0f}"),
             ('peak RSS without file pages (MB)', lambda s: _num(s['peak_anon_mb'], '{:,.0f}')),
             ('step CPU time, median (s)', lambda s: f"{s['step_cpu_s']:.3f}"),
             ('step wall time, median (s)', lambda s: f"{s['step_s']:.3f}")]
    if all('probe' in sides[name] for name in names):
        rows += [('without mindpet, forward only: peak RSS (MB)', lambda s: f"{s['probe']['peak_mb']:,.0f}"),
                 ('without mindpet, forward only: CPU time (s)', lambda s: f"{s['probe']['forward_cpu_s']:.3f}")]
    lines = ['| | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
    lines += [f"| {label} | " + ' | '.join(cell(sides[name]) for name in names) + ' |' for label, cell in rows]
    lines.append('')
    lines.append(f"Loss difference |float16 - float32| over the {diff['steps']} steps: mean {diff['mean_abs']:.4f}, "
                 f"largest {diff['max_abs']:.4f} (step {diff['max_at_step']}), at the last step "
                 f"{diff['final_abs']:.4f}.")
    floor = result.get('noise_floor')
    if floor:
        lines.append(f"Two float32 runs with the same seed, |{AGAIN} - float32|: mean {floor['mean_abs']:.4f}, "
                     f"largest {floor['max_abs']:.4f} (step {floor['max_at_step']}), at the last step "
                     f"{floor['final_abs']:.4f}.")
    return '\n'.join(lines)


def _num(value, fmt):
    return 'n/a' if value is None else fmt.format(value)


def plot(path, result):
    """Both loss curves and their difference, as a PNG (atomic write). Returns ``path``."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    from mindpet.train.report import write_figure  # pylint: disable=import-outside-toplevel
    sides = result['sides']
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.2), dpi=100, sharex=True,
                                      gridspec_kw={'height_ratios': [3, 1]})
    for name, colour in zip(SIDES, ('tab:blue', 'tab:red')):
        losses = sides[name]['losses']
        top.plot(np.arange(1, len(losses) + 1), losses, color=colour, linewidth=1.2, label=f'{name} base')
    top.set_ylabel('training loss')
    top.legend()
    top.grid(alpha=0.3)
    top.set_title(result['title'])
    diff = np.array(sides['float16']['losses']) - np.array(sides['float32']['losses'])
    bottom.plot(np.arange(1, len(diff) + 1), diff, color='tab:gray', linewidth=1.0)
    bottom.axhline(0.0, color='black', linewidth=0.5)
    bottom.set_ylabel('fp16 - fp32')
    bottom.set_xlabel('step')
    bottom.grid(alpha=0.3)
    return write_figure(path, fig)


def run(args):
    """Both sides, one child process each, then the comparison; returns the result dict."""
    from mindpet.train.report import write_json  # pylint: disable=import-outside-toplevel
    extra = list(QUICK_SETS if args.quick else ()) + list(args.set)
    load_before = os.getloadavg()
    sides = {}
    runs = [(dtype, dtype) for dtype in SIDES] + ([(AGAIN, 'float32')] if args.noise_floor else [])
    for name, dtype in runs:
        record = os.path.join(args.out, f'{name}.side.json')
        cmd = [sys.executable, os.path.abspath(__file__), '--worker', dtype, '--side', name, '--out', args.out]
        for item in extra:
            cmd += ['--set', item]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
        env.setdefault('GLOG_v', '3')
        print(f"[{name}] model.base_dtype={dtype} ...", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"the {name} side failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(record, encoding='utf-8') as handle:
            sides[name] = json.load(handle)
        proc = subprocess.run(cmd + ['--probe'], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"the {name} probe failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(os.path.join(args.out, f'{name}.probe.json'), encoding='utf-8') as handle:
            sides[name]['probe'] = json.load(handle)
        print(f"[{name}] {len(sides[name]['losses'])} steps, last loss {sides[name]['losses'][-1]:.4f}", flush=True)
    result = dict(config=CONFIG, sets=extra, quick=args.quick,
                  command=' '.join(['PYTHONPATH=. nice -n 5 python scripts/half_base_curve.py'] +
                                   (['--quick'] if args.quick else []) +
                                   (['--noise-floor'] if args.noise_floor else [])),
                  title=f"{CONFIG}{' (quick)' if args.quick else ''}: float32 vs float16 frozen base",
                  load_before=list(load_before), load_after=list(os.getloadavg()), cpus=os.cpu_count(),
                  sides=sides, difference=compare(sides),
                  noise_floor=compare(sides, AGAIN) if AGAIN in sides else None)
    result['table'] = table(result)
    result['png'] = plot(os.path.join(args.out, 'half_base_curve.png'), result)
    result['json'] = write_json(os.path.join(args.out, 'half_base_curve.json'), result)
    return result


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=os.path.join('outputs', 'half_base_curve'),
                        help='directory for the runs, the JSON and the PNG (default outputs/half_base_curve)')
    parser.add_argument('--quick', action='store_true',
                        help=f"a tiny random BERT for a few steps ({' '.join(QUICK_SETS)}): checks the script")
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='another override for both sides (repeatable), e.g. training.max_steps=20')
    parser.add_argument('--noise-floor', action='store_true',
                        help='also run float32 a second time, to show how far two float32 runs are apart')
    parser.add_argument('--worker', choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument('--side', help=argparse.SUPPRESS)
    parser.add_argument('--probe', action='store_true', help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        from mindpet.train.report import write_json  # pylint: disable=import-outside-toplevel
        name = args.side or args.worker
        if args.probe:
            write_json(os.path.join(args.out, f'{name}.probe.json'), probe_side(args.worker, args.set))
        else:
            write_json(os.path.join(args.out, f'{name}.side.json'), run_side(name, args.worker, args.out, args.set))
        return 0
    result = run(args)
    print(result['table'])
    print(f"load average (1, 5, 15 min) before: {result['load_before']}, after: {result['load_after']}")
    print(f"wrote {result['json']} and {result['png']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
