"""YAML-driven fine-tuning (``mindpet finetune`` / ``mindpet evaluate``): the run-config schema, the task interface
the example models implement, and the runner. See doc/cli.md.

Importing this package prints nothing, changes nothing and loads nothing: the names below are imported on first
use (so that :mod:`mindpet.cli` can read the verbs' arguments from :mod:`mindpet.train.commands` without loading
MindSpore); the runner's functions set the MindSpore context from the run config when they are called.
"""
import importlib

# public name -> the module that defines it
_EXPORTS = {
    'Field': 'mindpet.train.schema', 'REQUIRED': 'mindpet.train.schema',
    'learning_rates': 'mindpet.train.schedule',
    'Task': 'mindpet.train.task', 'KeyValueError': 'mindpet.train.task', 'load_task_class': 'mindpet.train.task',
    'shard_rows': 'mindpet.train.task',
    'load_plan': 'mindpet.train.runner', 'build': 'mindpet.train.runner', 'finetune': 'mindpet.train.runner',
    'evaluate': 'mindpet.train.runner',
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    """Import a public name on first use (PEP 562); sub-modules import as usual."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
