"""Data-parallel LoRA fine-tuning with MindSpore's own distributed engine (CPU or Ascend).

Every worker holds the whole model, trains on its own shard of the data, and the gradients of the LoRA parameters
are averaged across workers after each step (``ParallelMode.DATA_PARALLEL`` with ``gradients_mean=True``), so the
adapters stay identical on all ranks. Only rank 0 writes adapter checkpoints.

2 CPU workers on one machine::

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=out/logs --join=True \\
        examples/distributed/train_dp.py --output out

8 Ascend devices: the same with ``--worker_num=8 --local_worker_num=8`` and ``--device Ascend``. Continue a
killed run from its newest checkpoint with ``--resume``. See doc/distributed.md.

The model is a tiny 2-layer MLP whose Dense layers carry LoRA; the data is synthetic regression (a fixed
"teacher" network), different on every rank.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))

import mindspore as ms  # noqa: E402
from mindspore import nn, Tensor  # noqa: E402
from mindspore.train.callback import CheckpointConfig  # noqa: E402
import mindspore.dataset as ds  # noqa: E402

from mindpet.delta import LoRADense  # noqa: E402
from mindpet.graph import (TrainableParamsCheckPoint, freeze_delta, resume_from_checkpoint,  # noqa: E402
                           save_trainable_params, distributed_rank)

IN, HIDDEN, OUT, RANK = 8, 16, 4, 4


def build_network(seed=0):
    """The base MLP with LoRA on both Dense layers; every rank builds bit-identical initial values from ``seed``."""
    rng = np.random.default_rng(seed)

    def lora(n_in, n_out):
        return LoRADense(n_in, n_out, lora_rank=RANK, lora_alpha=2 * RANK, compute_dtype=ms.float32,
                         weight_init=Tensor(rng.normal(0, n_in ** -0.5, (n_out, n_in)).astype(np.float32)),
                         bias_init=Tensor(np.zeros(n_out, np.float32)),
                         lora_a_init=Tensor(rng.normal(0, 0.1, (RANK, n_in)).astype(np.float32)))
    net = nn.SequentialCell(lora(IN, HIDDEN), nn.ReLU(), lora(HIDDEN, OUT))
    freeze_delta(net, 'lora')
    return net


def rank_data(rank, rows, seed=0):
    """This rank's shard: ``rows`` inputs and the targets of a fixed teacher network (same teacher on all ranks)."""
    teacher = np.random.default_rng(seed + 12345).normal(size=(IN, OUT)).astype(np.float32)
    x = np.random.default_rng(seed + 1000 * (rank + 1)).normal(size=(rows, IN)).astype(np.float32)
    return x, np.tanh(x @ teacher).astype(np.float32)


def global_batches(world, steps, batch, seed=0):
    """What one process would see if it trained on all ranks' shards at once: step i = every rank's batch i."""
    shards = [rank_data(r, steps * batch, seed) for r in range(world)]
    xs = [np.concatenate([s[0][i * batch:(i + 1) * batch] for s in shards]) for i in range(steps)]
    ys = [np.concatenate([s[1][i * batch:(i + 1) * batch] for s in shards]) for i in range(steps)]
    return np.concatenate(xs), np.concatenate(ys)


def make_model(net, lr):
    return ms.Model(net, nn.MSELoss(), nn.Adam(net.trainable_params(), learning_rate=lr))


def dataset(x, y, batch):
    return ds.NumpySlicesDataset((x, y), column_names=['x', 'y'], shuffle=False).batch(batch)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--output', required=True, help='output directory (checkpoints in <output>/ckpt)')
    parser.add_argument('--device', default='CPU', choices=['CPU', 'Ascend', 'GPU'])
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--steps-per-epoch', type=int, default=4)
    parser.add_argument('--batch', type=int, default=4, help='per-rank batch size')
    parser.add_argument('--lr', type=float, default=0.05)
    parser.add_argument('--save-steps', type=int, default=2)
    parser.add_argument('--keep', type=int, default=3, help='keep_checkpoint_max')
    parser.add_argument('--no-data-parallel', action='store_true',
                        help='control run: every rank trains alone on its shard (no gradient averaging)')
    parser.add_argument('--resume', action='store_true', help='continue from the newest checkpoint in <output>/ckpt')
    parser.add_argument('--dump-final', action='store_true',
                        help='every rank also writes its final adapter to <output>/final/rank_<id>.ckpt (for checks)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE, device_target=args.device)
    from mindspore.communication import init
    init()
    if not args.no_data_parallel:
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    rank, world = distributed_rank()

    net = build_network()
    model = make_model(net, args.lr)
    ckpt_dir = os.path.join(args.output, 'ckpt')
    ckpt_cb = TrainableParamsCheckPoint(ckpt_dir, prefix='lora', save_optimizer_state=True,
                                        config=CheckpointConfig(save_checkpoint_steps=args.save_steps,
                                                                keep_checkpoint_max=args.keep))
    initial_epoch = 0
    if args.resume:
        # Every rank loads the same file, so the replicas start identical again.
        state = resume_from_checkpoint(ckpt_dir, net, model.train_network, prefix='lora')
        initial_epoch = state.initial_epoch if state else 0
    x, y = rank_data(rank, args.steps_per_epoch * args.batch)
    if initial_epoch < args.epochs:
        model.train(args.epochs, dataset(x, y, args.batch), callbacks=[ckpt_cb], dataset_sink_mode=False,
                    initial_epoch=initial_epoch)
    if args.dump_final:
        save_trainable_params(net, os.path.join(args.output, 'final', f'rank_{rank}.ckpt'))
    summary = {'rank': rank, 'world': world, 'parallel_mode': ms.get_auto_parallel_context('parallel_mode'),
               'is_writer': ckpt_cb.is_writer, 'saved_files': [os.path.basename(p) for p in ckpt_cb.saved_files],
               'lora_b_sum': float(sum(p.asnumpy().sum() for p in net.trainable_params() if 'lora_b' in p.name))}
    print('MINDPET_RESULT ' + json.dumps(summary), flush=True)


if __name__ == '__main__':
    main()
