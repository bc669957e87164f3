"""Storage errors while writing checkpoints become one CheckpointError line naming the file: a real size limit
(``RLIMIT_FSIZE``: the kernel refuses the write with EFBIG, as a full disk refuses it with ENOSPC) and a directory
the process may not write into. The checkpoint written before stays; no temporary file is left."""
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Root ignores permission bits; without these capabilities it does not.
SETPRIV = ['setpriv', '--bounding-set=-dac_override,-dac_read_search,-fowner', '--']

_CHILD = r'''
import json, os, resource, signal, sys
import numpy as np
import mindspore as ms
from mindspore import nn, Tensor
from mindspore.train.callback import CheckpointConfig, RunContext
from mindpet.delta import LoRADense
from mindpet.graph import TrainableParamsCheckPoint, freeze_delta, save_trainable_params
from mindpet.utils.exceptions import CheckpointError

directory, mode = sys.argv[1], sys.argv[2]
net = nn.SequentialCell(LoRADense(64, 64, lora_rank=32, lora_alpha=4, compute_dtype=ms.float32,
                                  lora_b_init=Tensor(np.ones((64, 32), np.float32))))
freeze_delta(net, 'lora')


class Args(dict):
    __getattr__ = dict.__getitem__


def context(step):
    return RunContext(Args(cur_step_num=step, cur_epoch_num=1, batch_num=10, network=net, train_network=net))


cb = TrainableParamsCheckPoint(directory, prefix='p', config=CheckpointConfig(save_checkpoint_steps=1))
report = {}
if mode == 'fsize':
    cb.on_train_begin(context(0))
    cb.on_train_step_end(context(1))                          # written while there is room
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)             # EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
calls = {'callback': lambda: (cb.on_train_begin(context(1)), cb.on_train_step_end(context(2))),
         'save_trainable': lambda: save_trainable_params(net, os.path.join(directory, 'adapter.ckpt'))}
for name, call in calls.items():
    try:
        call()
        report[name] = ['no error', '']
    except Exception as ex:  # pylint: disable=broad-except
        report[name] = [type(ex).__name__, str(ex)]
print(json.dumps(report))
'''


def _run(prefix, directory, mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith('MS_COMPILER_CACHE')}
    env.update(PYTHONPATH=ROOT, GLOG_v='3')
    proc = subprocess.run(prefix + [sys.executable, '-B', '-c', _CHILD, directory, mode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_file_size_limit_gives_one_checkpoint_error_and_keeps_the_earlier_file(tmp_path):
    directory = str(tmp_path / 'ckpt')
    report = _run([], directory, 'fsize')
    for name, target in (('callback', 'p-1_2.ckpt'), ('save_trainable', 'adapter.ckpt')):
        kind, message = report[name]
        assert kind == 'CheckpointError', report
        assert message.startswith(f"Cannot write the checkpoint '{os.path.join(directory, target)}': File too "
                                  f"large (errno 27)"), message
        assert '\n' not in message and '.tmp' not in message
    assert os.listdir(directory) == ['p-1_1.ckpt']             # the earlier file, no temporary file


def test_unwritable_directory_gives_one_checkpoint_error(tmp_path):
    if os.geteuid() == 0 and not shutil.which('setpriv'):
        pytest.skip('running as root without setpriv: permission bits cannot be enforced')
    prefix = SETPRIV if os.geteuid() == 0 else []
    directory = tmp_path / 'readonly'
    directory.mkdir()
    directory.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        report = _run(prefix, str(directory), 'readonly')
    finally:
        directory.chmod(stat.S_IRWXU)
    for name, target in (('callback', 'p-1_2.ckpt'), ('save_trainable', 'adapter.ckpt')):
        kind, message = report[name]
        assert kind == 'CheckpointError', report
        assert message.startswith(f"Cannot write the checkpoint '{os.path.join(str(directory), target)}': "), message
        assert 'Permission denied' in message and '\n' not in message
    assert os.listdir(directory) == []
