"""Variants of the ``mlp`` task for the resume tests (``model.task: tests.train.resume_tasks``).

``data.order`` picks how the training rows are ordered: ``seeded`` (the shipped task's order), or ``unseeded``
(a fresh permutation from OS entropy on every build: what a dataset shuffled without a seed does, so a resumed run
cannot replay the interrupted run's batches). ``data.row_delay_ms`` makes each row slower to produce, so a test can
kill a run part-way through an epoch.
"""
import time

import numpy as np
import mindspore.dataset as ds

from examples.mlp.pet_task import MLPTask
from mindpet.train.schema import Field


class _SlowRows:
    def __init__(self, columns, delay):
        self.columns = columns
        self.delay = delay

    def __getitem__(self, index):
        if self.delay:
            time.sleep(self.delay)
        return tuple(col[index] for col in self.columns)

    def __len__(self):
        return len(self.columns[0])


class ResumeMLPTask(MLPTask):
    """The mlp task with a configurable row order and a per-row delay."""
    name = 'resume_mlp'
    data_fields = dict(MLPTask.data_fields,
                       order=Field('str', 'seeded', choices=('seeded', 'unseeded'), doc='row order'),
                       row_delay_ms=Field('float', 0.0, min_value=0.0, doc='sleep per row read'))

    def train_dataset(self, batch_size, rank=0, group_size=1):
        x, _, y_b, split = self._arrays()
        x, y = x[:split], y_b[:split]
        if self.data['order'] == 'unseeded':
            order = np.random.default_rng().permutation(split)
        else:
            order = np.random.RandomState(self.seed).permutation(split)
        source = _SlowRows([x[order], y[order]], self.data['row_delay_ms'] / 1000.0)
        dataset = ds.GeneratorDataset(source, column_names=['x', 'labels'], shuffle=False)
        return dataset.batch(batch_size, drop_remainder=True)


TASK = ResumeMLPTask
