"""Compile and run one training step of sharded ``LoRADense`` layers under ``SEMI_AUTO_PARALLEL``.

Each entry of ``STRATEGIES`` is a set of ``LoRADense.shard()`` keywords for ``world`` devices; every set is applied
to a fresh layer, which then runs one forward and one training step. The outcome per set (the output, or the exact
MindSpore error) is printed as one ``MINDPET_RESULT`` JSON line and written to ``<output>/semi_auto_rank_<id>.json``.

Ascend, 2 devices::

    msrun --worker_num=2 --local_worker_num=2 --master_port=8119 --log_dir=out/logs --join=True \\
        examples/distributed/semi_auto_lora.py --device Ascend --output out

On CPU MindSpore 2.10 refuses semi-auto parallel at compile time ("Invalid communication backend: CPU for
semi_auto_parallel/auto_parallel mode, currently only support Ascend/GPU backend."); the script records that.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))

import mindspore as ms  # noqa: E402
from mindspore import nn, Tensor  # noqa: E402

from mindpet.delta import LoRADense  # noqa: E402
from mindpet.graph import freeze_delta, distributed_rank  # noqa: E402

IN, OUT, RANK, ROWS = 8, 8, 2, 8


def strategies(world):
    """Named ``LoRADense.shard()`` keyword sets for ``world`` devices (see doc/distributed.md)."""
    dp, mp = world, world
    return {
        # Rows of x split across devices; every weight replicated (data parallel expressed as strategies).
        'data_parallel': dict(strategy_org_dense_matmul=((dp, 1), (1, 1)), strategy_org_bias_add=((dp, 1), (1,)),
                              strategy_lora_dropout=((dp, 1),), strategy_lora_a_matmul=((dp, 1), (1, 1)),
                              strategy_lora_mul=((dp, 1), ()), strategy_lora_b_matmul=((dp, 1), (1, 1)),
                              strategy_lora_add=((dp, 1), (dp, 1)), strategy_activation=((dp, 1),)),
        # Output features split (Megatron column parallel): W and B sliced by rows, A replicated.
        'column_parallel': dict(strategy_org_dense_matmul=((1, 1), (mp, 1)), strategy_org_bias_add=((1, mp), (mp,)),
                                strategy_lora_a_matmul=((1, 1), (1, 1)), strategy_lora_mul=((1, 1), ()),
                                strategy_lora_b_matmul=((1, 1), (mp, 1)), strategy_lora_add=((1, mp), (1, mp)),
                                strategy_activation=((1, mp),)),
        # Input features split (row parallel): W and A sliced by columns, partial sums all-reduced.
        'row_parallel': dict(strategy_org_dense_matmul=((1, mp), (1, mp)), strategy_org_bias_add=((1, 1), (1,)),
                             strategy_lora_a_matmul=((1, mp), (1, mp)), strategy_lora_mul=((1, 1), ()),
                             strategy_lora_b_matmul=((1, 1), (1, 1)), strategy_lora_add=((1, 1), (1, 1)),
                             strategy_activation=((1, 1),)),
    }


def build_layer(seed=0):
    """A LoRADense with fixed values (B non-zero so the LoRA branch contributes) and a ReLU."""
    rng = np.random.default_rng(seed)
    return LoRADense(IN, OUT, lora_rank=RANK, lora_alpha=4, compute_dtype=ms.float32, activation='relu',
                     weight_init=Tensor(rng.normal(size=(OUT, IN)).astype(np.float32)),
                     bias_init=Tensor(rng.normal(size=(OUT,)).astype(np.float32)),
                     lora_a_init=Tensor(rng.normal(size=(RANK, IN)).astype(np.float32)),
                     lora_b_init=Tensor(rng.normal(size=(OUT, RANK)).astype(np.float32)))


def inputs(seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(ROWS, IN)).astype(np.float32), rng.normal(size=(ROWS, OUT)).astype(np.float32)


def run_one(kwargs, x, y):
    layer = build_layer().shard(**kwargs)
    net = nn.SequentialCell(layer)
    freeze_delta(net, 'lora')
    out = net(Tensor(x)).asnumpy()
    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), nn.SGD(net.trainable_params(), 0.1))
    loss = float(step(Tensor(x), Tensor(y)).asnumpy())
    return {'status': 'ok', 'output': out.tolist(), 'loss': loss,
            'lora_b': layer.mindpet_delta_lora_b.asnumpy().tolist()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--output', required=True)
    parser.add_argument('--device', default='CPU', choices=['CPU', 'Ascend', 'GPU'])
    args = parser.parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE, device_target=args.device)
    from mindspore.communication import init
    init()
    rank, world = distributed_rank()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.SEMI_AUTO_PARALLEL, device_num=world,
                                 full_batch=True)
    x, y = inputs()
    results = {}
    for name, kwargs in strategies(world).items():
        try:
            results[name] = run_one(kwargs, x, y)
        except (RuntimeError, ValueError, TypeError) as ex:
            text = str(ex).strip()
            results[name] = {'status': 'error', 'type': type(ex).__name__,
                             'message': text.split('\n')[0] if text else ''}
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, f'semi_auto_rank_{rank}.json'), 'w', encoding='utf-8') as handle:
        json.dump({'rank': rank, 'world': world, 'results': results}, handle)
    print('MINDPET_RESULT ' + json.dumps({'rank': rank, 'status': {k: v['status'] for k, v in results.items()}}),
          flush=True)


if __name__ == '__main__':
    main()
