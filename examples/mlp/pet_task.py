"""The ``mlp`` task of ``mindpet finetune``: LoRA (or any method) on a small MLP classifier, all data generated.

Without ``model.base_checkpoint`` the base model is first trained on task A for ``model.pretrain_epochs`` epochs
(standing in for pretrained weights); fine-tuning then learns task B. Runs in seconds on a CPU, so the runner's own
tests use it.
"""
import numpy as np
from mindspore import nn, ops

from examples.common import array_dataset
from examples.mlp.model import MLPConfig, Classifier, TINY_CONFIG, make_tasks
from mindpet.train.schema import Field
from mindpet.train.task import Task, predict_batches, shard_rows, softmax_cross_entropy, train_base


class ClassifierLoss(nn.Cell):
    """``(x, labels) -> mean cross-entropy`` around a classifier (parameter names unchanged)."""

    def __init__(self, network):
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, x, labels):
        return ops.cross_entropy(self.network(x), labels)


class MLPTask(Task):
    """Task B classification with an MLP (see the module docstring)."""
    name = 'mlp'
    sizes = {'tiny': TINY_CONFIG}
    model_fields = {
        'pretrain_epochs': Field('int', 6, min_value=0,
                                 doc='epochs on task A that make the base model when base_checkpoint is null'),
        'pretrain_learning_rate': Field('float', 0.005, min_value=0.0, min_exclusive=True,
                                        doc='Adam learning rate of that pre-training'),
    }
    data_fields = {
        'num_samples': Field('int', 2048, min_value=16, doc='rows generated (both tasks share the inputs)'),
        'eval_fraction': Field('float', 0.2, min_value=0.05, max_value=0.5, doc='share of rows held out'),
        'seed': Field('int', 0, min_value=0, doc='seed of the generated data'),
    }
    metric = 'accuracy'
    metric_higher_is_better = True

    def model_config(self):
        return MLPConfig.from_dict(super().model_config())

    def _arrays(self):
        if not hasattr(self, '_cache'):
            cfg, data = self.config, self.data
            x, y_a, y_b = make_tasks(data['num_samples'], cfg.in_dim, cfg.num_classes, data['seed'])
            split = int(round(len(x) * (1 - data['eval_fraction'])))
            self._cache = (x, y_a, y_b, split)
        return self._cache

    def build_network(self):
        return Classifier(self.config)

    def base_weights_source(self, path):
        if path is None and self.model['pretrain_epochs']:
            return f"pre-trained on task A for {self.model['pretrain_epochs']} epochs at the start of the run"
        return path

    def load_base(self, network, path):
        if path is not None:
            return super().load_base(network, path)
        epochs = self.model['pretrain_epochs']
        if not epochs:
            return None
        x, y_a, _, split = self._arrays()
        batch = 64
        batches = [(x[start:start + batch], y_a[start:start + batch])
                   for _ in range(epochs) for start in range(0, split - batch + 1, batch)]
        train_base(network, ClassifierLoss(network), batches, self.model['pretrain_learning_rate'])
        accuracy = float((predict_batches(network, [x[split:]], 256).argmax(1) == y_a[split:]).mean())
        return f"pre-trained on task A for {epochs} epochs here (task-A accuracy {accuracy:.3f})"

    def num_train_rows(self):
        return self._arrays()[3]

    def train_dataset(self, batch_size, rank=0, group_size=1):
        x, _, y_b, split = self._arrays()
        columns = shard_rows([x[:split], y_b[:split]], rank, group_size)
        return array_dataset(columns, ['x', 'labels'], batch_size, shuffle=True, seed=self.seed,
                             drop_remainder=True)

    def loss_cell(self, network, rdrop_alpha=0.0):
        return ClassifierLoss(network)

    def evaluate(self, network):
        x, _, y_b, split = self._arrays()
        logits = predict_batches(network, [x[split:]], 256)
        return {'accuracy': float((logits.argmax(1) == y_b[split:]).mean()),
                'loss': softmax_cross_entropy(logits, y_b[split:])}


TASK = MLPTask
