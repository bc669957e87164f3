"""What a fine-tuning run prints and writes: progress lines, the summary table, metrics.json, the loss curve."""
import json
import os
from collections import OrderedDict

import numpy as np
import yaml

from mindpet.adapter_store import ADAPTER_CONFIG_NAME, adapter_weights_path
from mindpet.utils.io_utils import atomic_write


def duration(seconds):
    """``'1h02m03s'``, ``'2m05s'`` or ``'12.3s'``."""
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def size_text(num_bytes):
    """``'296.3 KB'``, ``'86.9 MB'``, ``'3.4 GB'`` (powers of 1024)."""
    value = float(num_bytes)
    for unit in ('B', 'KB', 'MB', 'GB'):
        if value < 1024 or unit == 'GB':
            return f"{value:.0f} {unit}" if unit == 'B' else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def steady_step_time(step_times):
    """Mean step time without the first step (which includes graph compilation); the first step alone if only one
    ran."""
    if not step_times:
        return 0.0
    rest = step_times[1:] or step_times
    return float(np.mean(rest))


def progress_line(step, total, steps_per_epoch, loss, rate, step_times):
    """``step 10/75 (epoch 1/3) | loss 1.2345 | lr 9.6e-04 | 1.02 s/step | ETA 1m06s``.

    The ETA uses the mean time of the steps after the first (the first includes compilation).
    """
    per_step = steady_step_time(step_times)
    epoch = (step - 1) // steps_per_epoch + 1
    epochs = -(-total // steps_per_epoch)
    if step == 1 and total > 1:
        # The first step includes compiling the graph: it says nothing about the time left.
        timing = f"first step {step_times[0]:.1f} s (compiling) | ETA after step 2"
    else:
        timing = f"{per_step:.3f} s/step | ETA {duration(per_step * (total - step))}"
    return (f"step {step:>{len(str(total))}}/{total} (epoch {epoch}/{epochs}) | loss {loss:.4f} | lr {rate:.2e} | "
            f"{timing}")


def format_metrics(metrics):
    """``'accuracy 0.9812, loss 0.0712'``."""
    return ', '.join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _method_text(plan):
    if plan.pet_config is None:
        return 'full fine-tuning'
    cfg = plan.pet_config.to_dict()
    shown = {k: v for k, v in cfg.items() if k not in ('type', 'target_modules', 'exclude_modules',
                                                         'modules_to_save') and v is not None}
    inner = ', '.join(f"{k}={v}" for k, v in shown.items())
    return f"{cfg['type']} ({inner})" if inner else cfg['type']


def header(plan, loaded, trainable, total, total_steps, epochs, steps_per_epoch, group_size, dry_run=False):
    """The lines printed before training: model, method, parameters, data and steps."""
    model = plan.model
    # A dry run reads no weights: it says what a real run would load.
    source = plan.task.base_weights_source(model.get('base_checkpoint')) if dry_run else loaded
    lines = [f"[model] {plan.task.label()}; base weights: {source or 'initial (random) weights'}",
             f"[pet] {_method_text(plan)}; trainable {trainable:,} of {total:,} parameters "
             f"({100.0 * trainable / max(total, 1):.3f}%)"]
    if total_steps is not None:
        dp = f" x {group_size} workers (data parallel)" if group_size > 1 else ''
        lines.append(f"[train] {total_steps} steps = {epochs} epoch(s) x {steps_per_epoch} steps, batch "
                     f"{plan.training['batch_size']}{dp}; {plan.optimizer['type']}, lr "
                     f"{plan.schedule['start_learning_rate']:g} -> {plan.schedule['end_learning_rate']:g} "
                     f"({plan.schedule['decay']}, warm-up {plan.schedule['warmup_steps']}); "
                     f"{plan.context['mode']} mode on {plan.context['device_target']}")
    else:
        lines.append(f"[train] batch {plan.training['batch_size']}, {plan.training['epochs']} epoch(s)"
                     f"{', at most ' + str(plan.training['max_steps']) + ' steps' if plan.training['max_steps'] else ''}"
                     f"; {plan.optimizer['type']}, lr {plan.schedule['start_learning_rate']:g} -> "
                     f"{plan.schedule['end_learning_rate']:g}; {plan.context['mode']} mode on "
                     f"{plan.context['device_target']}")
    return '\n'.join(lines)


def _dir_bytes(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def summary(plan, built, losses, step_times, results, files, output_dir, peak_memory_mb, wall_time, total_steps,
            demo=(None, None)):
    """The run's facts as a dict (what ``metrics.json`` holds under ``summary`` and the table shows)."""
    trainable, total = built.counts()
    out = OrderedDict()
    out['model'] = plan.task.label()
    out['method'] = _method_text(plan)
    out['trainable_params'] = trainable
    out['total_params'] = total
    out['trainable_percent'] = 100.0 * trainable / max(total, 1)
    out['steps'] = total_steps
    out['loss_first'] = losses[0] if losses else None
    out['loss_last'] = losses[-1] if losses else None
    # Per-step losses are noisy: the mean of the last tenth says more about where training ended.
    tail = max(1, len(losses) // 10)
    out['loss_last_mean'] = float(np.mean(losses[-tail:])) if losses else None
    metric = plan.task.metric
    out['metric'] = metric
    out['metric_higher_is_better'] = bool(plan.task.metric_higher_is_better)
    out['metric_before'] = results.get('before', {}).get(metric)
    out['metric_after'] = results.get('after', {}).get(metric)
    out['step_time_s'] = steady_step_time(step_times)
    out['first_step_s'] = step_times[0] if step_times else None
    out['peak_memory_mb'] = peak_memory_mb
    adapter_dir = os.path.join(output_dir, 'adapter')
    weights = (adapter_weights_path(adapter_dir) if os.path.isfile(os.path.join(adapter_dir, ADAPTER_CONFIG_NAME))
               else None)
    out['adapter_bytes'] = os.path.getsize(weights) if weights and os.path.isfile(weights) else None
    out['adapter_dir_bytes'] = _dir_bytes(adapter_dir) if os.path.isdir(adapter_dir) else None
    full_path = os.path.join(output_dir, 'model.ckpt')
    out['full_checkpoint_bytes'] = os.path.getsize(full_path) if os.path.isfile(full_path) else built.base_bytes()
    out['full_checkpoint_measured'] = os.path.isfile(full_path)
    out['wall_time_s'] = wall_time
    out['files'] = [os.path.relpath(f, output_dir) for f in files]
    out['output_dir'] = output_dir
    if demo and demo[1]:
        out['demo_after'] = list(demo[1])
    return out


def summary_table(summary_dict):
    """The summary as an aligned two-column table (what ``mindpet finetune`` prints at the end)."""
    s = summary_dict
    rows = [('model', s['model']), ('method', s['method']),
            ('trainable params', f"{s['trainable_params']:,} / {s['total_params']:,} "
                                 f"({s['trainable_percent']:.3f}%)")]
    if s['loss_first'] is not None:
        rows.append(('loss first -> last', f"{s['loss_first']:.4f} -> {s['loss_last']:.4f} (mean of the last "
                                           f"10%: {s['loss_last_mean']:.4f}; {s['steps']} steps)"))
    if s['metric_after'] is not None:
        before = f"{s['metric_before']:.4f} -> " if s['metric_before'] is not None else ''
        better = 'higher' if s['metric_higher_is_better'] else 'lower'
        rows.append((f"eval {s['metric']}", f"{before}{s['metric_after']:.4f} ({better} is better)"))
    if s['first_step_s'] is not None:
        rows.append(('step time', f"{s['step_time_s']:.3f} s (first step, with compilation: "
                                  f"{s['first_step_s']:.1f} s)"))
    rows.append(('peak memory', f"{s['peak_memory_mb']:,.0f} MB (max RSS of the process)"))
    full = size_text(s['full_checkpoint_bytes'])
    if s['adapter_bytes'] is not None:
        share = 100.0 * s['adapter_bytes'] / max(s['full_checkpoint_bytes'], 1)
        rows.append(('adapter file', f"{size_text(s['adapter_bytes'])} ({share:.2f}% of the full checkpoint)"))
    measured = 'model.ckpt' if s['full_checkpoint_measured'] else 'the base parameters\' bytes'
    rows.append(('full checkpoint', f"{full} ({measured})"))
    rows.append(('wall time', duration(s['wall_time_s'])))
    rows.append(('output', f"{s['output_dir']}: {', '.join(s['files'] + ['metrics.json', 'config.yaml'])}"))
    width = max(len(key) for key, _ in rows)
    lines = ['summary', '-' * (width + 2 + max(len(v) for _, v in rows))]
    lines += [f"{key:<{width}}  {value}" for key, value in rows]
    return '\n'.join(lines)


def plot_losses(path, losses, rates=None, title=''):
    """Write the loss curve (and the learning rate, on a second axis) as a PNG when matplotlib is installed.

    Returns:
        str | None: ``path``, or None without matplotlib (or with nothing to plot).
    """
    if not losses:
        return None
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    fig, axis = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    steps = np.arange(1, len(losses) + 1)
    axis.plot(steps, losses, color='tab:blue', linewidth=1.2, label='loss')
    axis.set_xlabel('step')
    axis.set_ylabel('training loss')
    axis.grid(alpha=0.3)
    if rates is not None and len(rates) == len(losses):
        second = axis.twinx()
        second.plot(steps, rates, color='tab:orange', linewidth=1.0, alpha=0.7, label='learning rate')
        second.set_ylabel('learning rate')
    if title:
        axis.set_title(title)
    return write_figure(path, fig)


def write_figure(path, fig):
    """Lay out the matplotlib figure ``fig``, write it to ``path`` as a PNG atomically and close it; returns
    ``path``."""
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    fig.tight_layout()

    def _write(tmp_path):
        fig.savefig(tmp_path, format='png')
    try:
        atomic_write(path, _write, suffix='.png')
    finally:
        plt.close(fig)
    return path


def write_json(path, data):
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=1, default=_plain) + '\n'

    def _write(tmp_path):
        with open(tmp_path, 'w', encoding='utf-8') as handle:
            handle.write(text)
    return atomic_write(path, _write)


def write_yaml(path, data):
    """Write ``data`` as YAML (keys in their order), atomically."""
    text = yaml.safe_dump(json.loads(json.dumps(data, default=_plain)), sort_keys=False, default_flow_style=None,
                          width=120)

    def _write(tmp_path):
        with open(tmp_path, 'w', encoding='utf-8') as handle:
            handle.write(text)
    return atomic_write(path, _write)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


__all__ = ['duration', 'size_text', 'progress_line', 'format_metrics', 'header', 'summary', 'summary_table',
           'plot_losses', 'write_figure', 'write_json', 'write_yaml', 'steady_step_time']
