"""Variants of the ``mlp`` task for the resume tests (``model.task: tests.train.resume_tasks``).

``data.order`` picks how the training rows are ordered: ``seeded`` (the shipped task's order), or ``unseeded``
(a fresh permutation from OS entropy on every build: what a dataset shuffled without a seed does, so a resumed run
cannot replay the interrupted run's batches). ``data.row_delay_ms`` makes each row slower to produce, so a test can
kill a run part-way through an epoch. ``data.kill_rank`` / ``data.kill_after_rows``: the worker of that rank
SIGKILLs itself after reading that many rows (a worker lost in a data-parallel run).
"""
import os
import signal
import time

import numpy as np
import mindspore.dataset as ds

from examples.mlp.pet_task import MLPTask
from mindpet.train.schema import Field
from mindpet.train.task import shard_rows


class _SlowRows:
    def __init__(self, columns, delay, kill_after=0):
        self.columns = columns
        self.delay = delay
        self.kill_after = kill_after
        self.rows_read = 0

    def __getitem__(self, index):
        if self.delay:
            time.sleep(self.delay)
        self.rows_read += 1
        if self.kill_after and self.rows_read >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return tuple(col[index] for col in self.columns)

    def __len__(self):
        return len(self.columns[0])


class ResumeMLPTask(MLPTask):
    """The mlp task with a configurable row order and a per-row delay."""
    name = 'resume_mlp'
    data_fields = dict(MLPTask.data_fields,
                       order=Field('str', 'seeded', choices=('seeded', 'unseeded'), doc='row order'),
                       row_delay_ms=Field('float', 0.0, min_value=0.0, doc='sleep per row read'),
                       kill_rank=Field('int', -1, min_value=-1, doc='the worker that kills itself (-1: none)'),
                       kill_after_rows=Field('int', 0, min_value=0, doc='rows it reads before that'))

    def train_dataset(self, batch_size, rank=0, group_size=1):
        x, _, y_b, split = self._arrays()
        x, y = shard_rows([x[:split], y_b[:split]], rank, group_size)
        split = len(x)
        if self.data['order'] == 'unseeded':
            order = np.random.default_rng().permutation(split)
        else:
            order = np.random.RandomState(self.seed).permutation(split)
        kill_after = self.data['kill_after_rows'] if rank == self.data['kill_rank'] else 0
        source = _SlowRows([x[order], y[order]], self.data['row_delay_ms'] / 1000.0, kill_after)
        dataset = ds.GeneratorDataset(source, column_names=['x', 'labels'], shuffle=False)
        return dataset.batch(batch_size, drop_remainder=True)


TASK = ResumeMLPTask
