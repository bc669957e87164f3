"""Child process of test_no_side_effects.py: import mindpet, fine-tune a tiny LoRA layer with checkpoints, resume,
load; record everything the library might do beyond that.

Usage: ``side_effect_child.py OUT_DIR``. Writes ``OUT_DIR/report.json`` with: Python-level writes outside OUT_DIR
(from an audit hook), exit calls, output printed by ``import mindpet``, MindSpore context and environment changes.
"""
import builtins
import io
import json
import os
import sys
import traceback

OUT = os.path.realpath(sys.argv[1])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
report = {'writes_outside': [], 'exit_calls': [], 'import_output': '', 'context_changed_by_import': {},
          'context_changed_by_use': {}, 'environ_changed_by_import': [], 'logging_handlers_added': 0}
tracking = False


def _outside(path):
    real = os.path.realpath(os.fsdecode(path))
    return not (real == OUT or real.startswith(OUT + os.sep))


def audit(event, args):
    if not tracking:
        return
    path = None
    if event == 'open':
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in 'wax+')) or \
            (isinstance(flags, int) and flags & WRITE_FLAGS)
        if not writes:
            path = None
    elif event in ('os.mkdir', 'os.remove', 'os.rmdir', 'os.rename', 'os.replace', 'os.chmod', 'os.symlink',
                   'os.link', 'os.truncate', 'shutil.rmtree', 'shutil.copyfile', 'shutil.move'):
        path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)) and _outside(path):
        report['writes_outside'].append({'event': event, 'path': os.fsdecode(path), 'by_mindpet': _from_library()})


def _from_library():
    """True when a mindpet (or tk) source file is on the stack."""
    frame = sys._getframe(2)
    while frame is not None:
        parts = frame.f_code.co_filename.split(os.sep)
        if 'mindpet' in parts or 'tk' in parts:
            return True
        frame = frame.f_back
    return False


def trap(name, original):
    def _trapped(*args, **kwargs):
        report['exit_calls'].append({'call': name, 'stack': traceback.format_stack(limit=6)})
        raise RuntimeError(f'{name} was called')
    _trapped.original = original
    return _trapped


sys.addaudithook(audit)
TRAPS = {'sys.exit': (sys, 'exit'), 'os._exit': (os, '_exit'), 'builtins.exit': (builtins, 'exit'),
         'builtins.quit': (builtins, 'quit')}
saved = {name: getattr(obj, attr) for name, (obj, attr) in TRAPS.items()}
for name, (obj, attr) in TRAPS.items():
    setattr(obj, attr, trap(name, saved[name]))

import logging  # noqa: E402

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402

CONTEXT_KEYS = ('mode', 'device_target', 'device_id', 'save_graphs', 'save_graphs_path', 'max_call_depth',
                'deterministic', 'pynative_synchronize', 'jit_config')
PARALLEL_KEYS = ('parallel_mode', 'gradients_mean', 'device_num', 'full_batch')


def context():
    snap = {}
    for key in CONTEXT_KEYS:
        try:
            snap[key] = repr(ms.get_context(key))
        except (ValueError, RuntimeError) as ex:
            snap[key] = f'<{type(ex).__name__}>'
    for key in PARALLEL_KEYS:
        snap['parallel.' + key] = repr(ms.get_auto_parallel_context(key))
    return snap


def diff(before, after):
    return {k: [before[k], after[k]] for k in before if before[k] != after[k]}


tracking = True
before, env_before, handlers = context(), dict(os.environ), len(logging.root.handlers)
captured = io.StringIO()
sys.stdout, sys.stderr = captured, captured
try:
    import mindpet  # noqa: E402,F401
    import mindpet.delta  # noqa: E402,F401
    import mindpet.graph  # noqa: E402,F401
    import tk.delta  # noqa: E402,F401
    import tk.graph  # noqa: E402,F401
finally:
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
report['import_output'] = captured.getvalue()
report['context_changed_by_import'] = diff(before, context())
report['environ_changed_by_import'] = sorted(set(os.environ.items()) ^ set(env_before.items()))
report['logging_handlers_added'] = len(logging.root.handlers) - handlers

# The user's choice; the library must leave it as it is.
ms.set_context(mode=ms.GRAPH_MODE, device_target='CPU')
user_context = context()

from mindspore import nn  # noqa: E402
from mindspore.train.callback import CheckpointConfig  # noqa: E402
import mindspore.dataset as ds  # noqa: E402
from mindpet.delta import LoRADense  # noqa: E402
from mindpet.graph import (TrainableParamsCheckPoint, freeze_delta, freeze_from_config,  # noqa: E402
                           load_base_and_delta, resume_from_checkpoint, save_trainable_params, find_latest_checkpoint)
from mindpet.utils.exceptions import CheckpointError  # noqa: E402

rng = np.random.default_rng(0)
net = nn.SequentialCell(LoRADense(4, 3, lora_rank=2, lora_alpha=4, compute_dtype=ms.float32))
freeze_delta(net, 'lora')
with open(os.path.join(OUT, 'freeze.yaml'), 'w', encoding='utf-8') as handle:
    handle.write("freeze:\n  include: ['*']\n  exclude: ['*mindpet_delta_lora_*']\n")
freeze_from_config(net, os.path.join(OUT, 'freeze.yaml'))
model = ms.Model(net, nn.MSELoss(), nn.Adam(net.trainable_params(), learning_rate=0.05))
data = ds.NumpySlicesDataset((rng.normal(size=(8, 4)).astype(np.float32),
                              rng.normal(size=(8, 3)).astype(np.float32)), column_names=['x', 'y']).batch(4)
cb = TrainableParamsCheckPoint(os.path.join(OUT, 'ckpt'), save_optimizer_state=True,
                               config=CheckpointConfig(save_checkpoint_steps=1, keep_checkpoint_max=2))
model.train(2, data, callbacks=[cb], dataset_sink_mode=False)
save_trainable_params(net, os.path.join(OUT, 'adapter.safetensors'))
ms.save_checkpoint([p for p in net.get_parameters() if 'delta' not in p.name], os.path.join(OUT, 'base.ckpt'))
load_base_and_delta(net, os.path.join(OUT, 'base.ckpt'), find_latest_checkpoint(os.path.join(OUT, 'ckpt')))
state = resume_from_checkpoint(os.path.join(OUT, 'ckpt'), net, model.train_network)
try:
    load_base_and_delta(net, os.path.join(OUT, 'base.ckpt'), os.path.join(OUT, 'missing.ckpt'))
except CheckpointError:
    pass
report['context_changed_by_use'] = diff(user_context, context())
report['resumed_step'] = state.step
report['files_in_out'] = sorted(os.path.relpath(os.path.join(d, f), OUT) for d, _, fs in os.walk(OUT) for f in fs)
tracking = False

for name, (obj, attr) in TRAPS.items():
    setattr(obj, attr, saved[name])
with open(os.path.join(OUT, 'report.json'), 'w', encoding='utf-8') as handle:
    json.dump(report, handle, indent=1)
print('CHILD_DONE', flush=True)
