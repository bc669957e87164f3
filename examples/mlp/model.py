"""The smallest example: an MLP classifier and two related synthetic classification tasks.

Task A trains the "pretrained" base model; task B (A's decision rule mixed with a rotated copy of it) is the
fine-tuning task. Everything is generated from a seed, so runs are reproducible and need no files.
"""
from dataclasses import dataclass

import numpy as np
from mindspore import nn

from examples.common import ExampleConfig


@dataclass
class MLPConfig(ExampleConfig):
    """MLP dimensions.

    Example:
        >>> MLPConfig.from_dict(TINY_CONFIG).hidden
        256
    """
    in_dim: int = 32
    hidden: int = 256
    num_layers: int = 3
    num_classes: int = 8

    def __post_init__(self):
        self.check_positive_ints(('in_dim', 'hidden', 'num_layers', 'num_classes'))


TINY_CONFIG = dict(in_dim=32, hidden=256, num_layers=3, num_classes=8)


class Classifier(nn.Cell):
    """``num_layers`` Dense + ReLU layers (``layers.0`` ... ``layers.N``) and a ``head``: ``(B, in_dim) ->
    (B, num_classes)`` logits.

    Example:
        >>> net = Classifier(TINY_CONFIG)
        >>> net(ms.Tensor(np.zeros((2, 32), np.float32))).shape
        (2, 8)
    """

    def __init__(self, config):
        super().__init__()
        self.config = config if isinstance(config, MLPConfig) else MLPConfig.from_dict(config)
        cfg = self.config
        dims = [cfg.in_dim] + [cfg.hidden] * cfg.num_layers
        self.layers = nn.CellList([nn.Dense(a, b) for a, b in zip(dims[:-1], dims[1:])])
        self.relu = nn.ReLU()
        self.head = nn.Dense(cfg.hidden, cfg.num_classes)

    def construct(self, x):
        for layer in self.layers:
            x = self.relu(layer(x))
        return self.head(x)


def make_tasks(num_samples, in_dim, num_classes, seed):
    """Inputs ``x`` ``(N, in_dim)`` and the labels of task A and task B (int32 ``(N,)``).

    Task A: ``argmax(x @ P)``; task B: ``argmax(x @ (0.5 P + R P))`` with a random rotation ``R``.
    """
    rng = np.random.RandomState(seed)
    x = rng.randn(num_samples, in_dim).astype(np.float32)
    proj_a = rng.randn(in_dim, num_classes).astype(np.float32)
    rotation = np.linalg.qr(rng.randn(in_dim, in_dim))[0].astype(np.float32)
    y_a = (x @ proj_a).argmax(1).astype(np.int32)
    y_b = (x @ (0.5 * proj_a + rotation @ proj_a)).argmax(1).astype(np.int32)
    return x, y_a, y_b


__all__ = ['MLPConfig', 'TINY_CONFIG', 'Classifier', 'make_tasks']
