"""Quick start: pretrain a small classifier on task A, then LoRA-fine-tune it on task B from a YAML config.

    python examples/quickstart/finetune.py --config configs/quickstart_lora.yaml

Prints the trainable share, loss and accuracy before/after, the adapter file size against a full checkpoint,
and the time taken.
"""
import argparse
import fnmatch
import os
import sys
import time

import numpy as np
import mindspore as ms
from mindspore import nn, Tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mindpet.delta import LoRADense  # noqa: E402
from mindpet.graph import freeze_delta, save_trainable_params, load_base_and_delta  # noqa: E402
from mindpet.utils.io_utils import read_yaml_file, atomic_save_checkpoint  # noqa: E402


class Classifier(nn.Cell):
    """An MLP: ``num_layers`` hidden Dense+ReLU layers and a head. ``layers`` holds the hidden layers."""

    def __init__(self, in_dim, hidden, num_layers, num_classes):
        super().__init__()
        dims = [in_dim] + [hidden] * num_layers
        self.layers = nn.CellList([nn.Dense(a, b) for a, b in zip(dims[:-1], dims[1:])])
        self.relu = nn.ReLU()
        self.head = nn.Dense(hidden, num_classes)

    def construct(self, x):
        for layer in self.layers:
            x = self.relu(layer(x))
        return self.head(x)


def make_tasks(num_samples, in_dim, num_classes, seed):
    """Two related classification tasks on the same inputs: B is A with a rotated decision rule."""
    rng = np.random.RandomState(seed)
    x = rng.randn(num_samples, in_dim).astype(np.float32)
    proj_a = rng.randn(in_dim, num_classes).astype(np.float32)
    rotation = np.linalg.qr(rng.randn(in_dim, in_dim))[0].astype(np.float32)
    y_a = (x @ proj_a).argmax(1).astype(np.int32)
    y_b = (x @ (0.5 * proj_a + rotation @ proj_a)).argmax(1).astype(np.int32)
    return x, y_a, y_b


def add_lora(net, pet):
    """Swap every hidden Dense named by ``target_modules`` for a LoRADense holding the same weight and bias."""
    replaced = 0
    for name, cell in list(net.cells_and_names()):
        for child_name, child in list(cell.name_cells().items()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Dense and any(fnmatch.fnmatchcase(full, p) for p in pet['target_modules']):
                lora = LoRADense(child.in_channels, child.out_channels, lora_rank=pet['lora_rank'],
                                 lora_alpha=pet['lora_alpha'], lora_dropout=float(pet['lora_dropout']),
                                 compute_dtype=ms.float32, weight_init=Tensor(child.weight.asnumpy()),
                                 bias_init=Tensor(child.bias.asnumpy()))
                cell.insert_child_to_cell(child_name, lora)
                if isinstance(cell, nn.CellList):
                    cell._cells[child_name] = lora  # pylint: disable=protected-access
                replaced += 1
    # Re-prefix parameter names after the swap so checkpoints use the cell paths.
    for name, cell in net.cells_and_names():
        for pname, param in cell.parameters_and_names(expand=False):
            param.name = f"{name}.{pname}" if name else pname
    return replaced


def train(net, x, y, epochs, batch_size, lr, label):
    loss_net = nn.WithLossCell(net, nn.CrossEntropyLoss())
    opt = nn.Adam(net.trainable_params(), learning_rate=lr)
    step = nn.TrainOneStepCell(loss_net, opt)
    step.set_train()
    steps_per_epoch = len(x) // batch_size
    total = epochs * steps_per_epoch
    losses, start = [], time.time()
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            sl = slice(i * batch_size, (i + 1) * batch_size)
            losses.append(float(step(Tensor(x[sl]), Tensor(y[sl])).asnumpy()))
            done = epoch * steps_per_epoch + i + 1
            if done % max(total // 6, 1) == 0 or done == total:
                elapsed = time.time() - start
                eta = elapsed / done * (total - done)
                print(f"  [{label}] step {done:4d}/{total}  loss {losses[-1]:.4f}  "
                      f"{1000 * elapsed / done:6.1f} ms/step  ETA {eta:5.1f}s", flush=True)
    net.set_train(False)
    return losses, (time.time() - start) / total


class Inference(nn.Cell):
    """A fresh top-level Cell around ``net``: a graph compiled before the LoRA layers were swapped in would
    otherwise keep running the old layers. ``auto_prefix=False`` keeps the parameter names."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, x):
        return self.net(x)


def accuracy(net, x, y):
    return float((Inference(net)(Tensor(x)).asnumpy().argmax(1) == y).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default='configs/quickstart_lora.yaml')
    args = parser.parse_args(argv)
    cfg = read_yaml_file(args.config)
    ctx, mcfg, pet, dcfg, tcfg = (cfg[k] for k in ('context', 'model', 'pet', 'data', 'training'))
    ms.set_context(mode=ms.GRAPH_MODE if ctx['mode'] == 'GRAPH' else ms.PYNATIVE_MODE,
                   device_target=ctx['device_target'])
    out_dir = tcfg['output_dir']
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    x, y_a, y_b = make_tasks(dcfg['num_samples'], mcfg['in_dim'], mcfg['num_classes'], dcfg['seed'])
    split = int(0.8 * len(x))
    ms.set_seed(dcfg['seed'])
    net = Classifier(mcfg['in_dim'], mcfg['hidden'], mcfg['num_layers'], mcfg['num_classes'])
    print(f"[1/3] pretraining the base model on task A ({ctx['mode']} mode, {ctx['device_target']})")
    train(net, x[:split], y_a[:split], tcfg['pretrain_epochs'], tcfg['batch_size'], tcfg['learning_rate'], 'base')
    base_path = os.path.join(out_dir, 'base.ckpt')
    atomic_save_checkpoint(net, base_path)
    acc_before = accuracy(net, x[split:], y_b[split:])

    print(f"[2/3] LoRA fine-tuning on task B (rank {pet['lora_rank']}, alpha {pet['lora_alpha']}, "
          f"targets {pet['target_modules']})")
    replaced = add_lora(net, pet)
    freeze_delta(net, 'lora', exclude=[f"{m}.*" for m in pet.get('modules_to_save') or []])
    total = sum(p.size for p in net.get_parameters() if 'mindpet_state' not in p.name)
    trainable = sum(p.size for p in net.trainable_params())
    frozen = {p.name: p.asnumpy().copy() for p in net.get_parameters() if not p.requires_grad}
    losses, step_time = train(net, x[:split], y_b[:split], tcfg['epochs'], tcfg['batch_size'],
                              tcfg['learning_rate'], 'lora')
    acc_after = accuracy(net, x[split:], y_b[split:])
    unchanged = all(np.array_equal(net.parameters_dict()[n].asnumpy(), v) for n, v in frozen.items())
    adapter_path = os.path.join(out_dir, 'adapter.ckpt')
    save_trainable_params(net, adapter_path)

    print("[3/3] reloading base + adapter into a fresh model")
    fresh = Classifier(mcfg['in_dim'], mcfg['hidden'], mcfg['num_layers'], mcfg['num_classes'])
    add_lora(fresh, pet)
    load_base_and_delta(fresh, base_path, adapter_path)
    reload_ok = np.array_equal(Inference(fresh)(Tensor(x[split:])).asnumpy(),
                               Inference(net)(Tensor(x[split:])).asnumpy())

    full_path = os.path.join(out_dir, 'full_model.ckpt')
    atomic_save_checkpoint(net, full_path)
    rows = [
        ("LoRA layers", f"{replaced} (rank {pet['lora_rank']})"),
        ("trainable / total params", f"{trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"),
        ("loss first -> last", f"{losses[0]:.4f} -> {losses[-1]:.4f}"),
        ("task-B accuracy before -> after", f"{acc_before:.3f} -> {acc_after:.3f}"),
        ("frozen weights bit-identical", str(unchanged)),
        ("adapter file", f"{os.path.getsize(adapter_path) / 1024:.1f} KiB ({adapter_path})"),
        ("full checkpoint", f"{os.path.getsize(full_path) / 1024:.1f} KiB"),
        ("base + adapter reload exact", str(reload_ok)),
        ("LoRA step time", f"{1000 * step_time:.2f} ms"),
        ("total time", f"{time.time() - t0:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nSummary")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0 if unchanged and reload_ok and losses[-1] < losses[0] else 1


if __name__ == '__main__':
    sys.exit(main())
