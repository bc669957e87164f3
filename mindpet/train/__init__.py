"""YAML-driven fine-tuning (``mindpet finetune`` / ``mindpet evaluate``): the run-config schema, the task interface
the example models implement, and the runner. See doc/cli.md.

Importing this package prints nothing and changes nothing; the runner's functions set the MindSpore context from
the run config when they are called.
"""
from mindpet.train.schema import Field, REQUIRED
from mindpet.train.schedule import learning_rates
from mindpet.train.task import Task, KeyValueError, load_task_class, shard_rows
from mindpet.train.runner import load_plan, build, finetune, evaluate

__all__ = ['Field', 'REQUIRED', 'learning_rates', 'Task', 'KeyValueError', 'load_task_class',
           'shard_rows', 'load_plan', 'build', 'finetune', 'evaluate']
