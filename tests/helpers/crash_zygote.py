"""Fork server for test_crash_safety.py: imports MindSpore once, then forks short-lived training processes on demand.

Importing MindSpore costs seconds; forking a process that has imported it (and run nothing yet) costs
milliseconds, so the test can SIGKILL dozens of training runs within its time budget.

Protocol (one line per message). stdin: ``run DIR STEPS [DUMP]``  -> stdout: ``PID <pid>`` then ``EXIT <status>``;
``quit``. A run resumes from the newest checkpoint in DIR (adapter, Adam state, step), trains up to global step
STEPS saving a checkpoint after every step, and, if DUMP is given, writes the final adapter there (.npz).
"""
import os
import sys

import numpy as np
import mindspore as ms

from mindpet.delta import LoRADense
from mindpet.graph import TrainableParamsCheckPoint, freeze_delta, resume_from_checkpoint

PREFIX = 'crash'
KEEP = 3


def train(directory, steps, dump=None):
    from mindspore import nn, Tensor
    from mindspore.train.callback import CheckpointConfig
    import mindspore.dataset as ds
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target='CPU')
    rng = np.random.default_rng(0)
    layer = LoRADense(4, 3, lora_rank=2, lora_alpha=4, compute_dtype=ms.float32,
                      weight_init=Tensor(rng.normal(size=(3, 4)).astype(np.float32)),
                      lora_a_init=Tensor(rng.normal(size=(2, 4)).astype(np.float32)))
    net = nn.SequentialCell(layer)
    freeze_delta(net, 'lora')
    model = ms.Model(net, nn.MSELoss(), nn.Adam(net.trainable_params(), learning_rate=0.01))
    state = resume_from_checkpoint(directory, net, model.train_network, prefix=PREFIX)
    start = state.initial_epoch if state else 0
    x = rng.normal(size=(4, 4)).astype(np.float32)
    y = rng.normal(size=(4, 3)).astype(np.float32)
    # One batch per epoch, so the epoch number is the global step.
    data = ds.NumpySlicesDataset((x, y), column_names=['x', 'y'], shuffle=False).batch(4)
    ckpt = TrainableParamsCheckPoint(directory, prefix=PREFIX, save_optimizer_state=True,
                                     config=CheckpointConfig(save_checkpoint_steps=1, keep_checkpoint_max=KEEP))
    if start < steps:
        model.train(steps, data, callbacks=[ckpt], dataset_sink_mode=False, initial_epoch=start)
    if dump:
        np.savez(dump, **{p.name: p.asnumpy() for p in net.trainable_params()})


def main():
    print('READY', flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == 'quit':
            break
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                train(words[1], int(words[2]), words[3] if len(words) > 3 else None)
            except BaseException as ex:  # report, then leave without running the parent's cleanup
                print(f'CHILD_ERROR {type(ex).__name__}: {ex}', file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        print(f'PID {pid}', flush=True)
        _, status = os.waitpid(pid, 0)
        print(f'EXIT {status}', flush=True)


if __name__ == '__main__':
    main()
