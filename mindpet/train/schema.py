"""The run-config schema: sections, fields, defaults, and the checks that run before anything else.

A run config is a YAML mapping with the sections ``context``, ``model``, ``pet``, ``data``, ``optimizer``,
``schedule``, ``training`` and (optional) ``parallel``. The runner's own fields are declared here; a task (the
example model being fine-tuned) adds its ``model`` and ``data`` fields, and the ``pet`` section is checked by the
method's config class (:func:`mindpet.config_from_dict`).

Every error names the file and the key, on one line::

    configs/bert_lora.yaml: 'training.batch_sise': unknown key; did you mean 'batch_size'?

Unknown and missing keys raise :class:`ModelConfigKeysInfoError`; wrong types, values and missing files raise
:class:`ModelConfigParamsInfoError` (both are :class:`MindPetError`, which the ``mindpet`` command reports as one
line with exit code 1).
"""
import copy
import numbers
import os

import yaml

from mindpet.utils.exceptions import ModelConfigKeysInfoError, ModelConfigParamsInfoError, MindPetError
from mindpet.utils.io_utils import read_yaml_file, load_yaml_text
from mindpet.utils.validation import did_you_mean, got_text

REQUIRED = object()
#: how much of a bad value's repr a run-config message quotes
QUOTE_LIMIT = 60
#: the most optimizer steps a run may take (``training.max_steps``, or epochs x steps per epoch): the learning rate
#: is computed from the step number in float32, exact up to 2**24 steps
MAX_STEPS = 10 ** 7
#: the most epochs a run may ask for
MAX_EPOCHS = 10 ** 6
SECTIONS = ('context', 'model', 'pet', 'data', 'optimizer', 'schedule', 'training', 'parallel')


def one_line(text):
    """``text`` with every run of whitespace (newlines included) folded into one space."""
    return ' '.join(str(text).split())


class Field:
    """One config key: its type(s), default, and range.

    Args:
        kind (str): 'int', 'float' (an int is accepted), 'bool', 'str', 'str_list' (a str is one item), 'dict',
            'path' (a str naming an existing file), 'dir' (a str naming an existing directory), 'any'. Relative
            paths are taken from the current directory (the shipped configs are run from the repository root).
        default: the value when the key is absent; ``REQUIRED`` makes the key mandatory. A ``None`` default also
            accepts an explicit ``null``.
        choices (tuple | None): allowed values (compared case-sensitively).
        min_value, max_value (number | None): inclusive bounds for 'int'/'float'; ``min_exclusive`` makes the lower
            bound exclusive.
        doc (str): one line for ``doc/cli.md`` and ``--help``.
    """

    def __init__(self, kind, default=REQUIRED, choices=None, min_value=None, max_value=None, min_exclusive=False,
                 doc=''):
        self.kind = kind
        self.default = default
        self.choices = tuple(choices) if choices else None
        self.min_value = min_value
        self.max_value = max_value
        self.min_exclusive = min_exclusive
        self.doc = doc

    def expected(self):
        """What the value must be, for messages."""
        text = {'int': 'an int', 'float': 'a number', 'bool': 'true or false', 'str': 'a string',
                'str_list': 'a list of strings', 'dict': 'a mapping', 'path': 'the path of an existing file',
                'dir': 'the path of an existing directory', 'any': 'a value'}[self.kind]
        if self.choices:
            text = f"one of {list(self.choices)}"
        if self.min_value is not None:
            text += f" {'>' if self.min_exclusive else '>='} {self.min_value}"
        if self.max_value is not None:
            text += f" <= {self.max_value}"
        if self.default is None:
            text += " (or null)"
        return text

    def check(self, value):
        """Return the normalised value or raise ``ValueError`` (message: what was expected and received)."""
        if value is None and self.default is None:
            return None
        bad = ValueError(f"must be {self.expected()}, but got {got_text(value, QUOTE_LIMIT)}")
        kind = self.kind
        if kind == 'int':
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise bad
            value = int(value)
        elif kind == 'float':
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or value != value:
                raise bad
            value = float(value)
        elif kind == 'bool':
            if not isinstance(value, bool):
                raise bad
        elif kind in ('str', 'path', 'dir'):
            if not isinstance(value, str) or not value:
                raise bad
        elif kind == 'str_list':
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise bad
        elif kind == 'dict':
            if not isinstance(value, dict):
                raise bad
        if self.choices and value not in self.choices:
            raise ValueError(f"must be one of {list(self.choices)}, but got {got_text(value, QUOTE_LIMIT)}"
                             f"{did_you_mean(value, self.choices, case_insensitive=True)}")
        if kind in ('int', 'float'):
            low, high = self.min_value, self.max_value
            if low is not None and (value < low or (self.min_exclusive and value == low)):
                raise bad
            if high is not None and value > high:
                raise bad
        if kind in ('path', 'dir'):
            value = os.path.expanduser(value)
        return value

    def exists(self, value):
        """Whether the file or directory a 'path'/'dir' value names exists (True for other kinds and null)."""
        if value is None or self.kind not in ('path', 'dir'):
            return True
        return os.path.isfile(value) if self.kind == 'path' else os.path.isdir(value)


# ----- the runner's own sections -----------------------------------------------------------------------------------
CONTEXT_FIELDS = {
    'mode': Field('str', 'GRAPH', choices=('GRAPH', 'PYNATIVE'), doc='MindSpore execution mode'),
    'device_target': Field('str', 'CPU', choices=('CPU', 'Ascend', 'GPU'), doc='device to run on'),
    'device_id': Field('int', None, min_value=0, doc='device index (single-device runs)'),
    'seed': Field('int', 0, min_value=0, doc='seed of the initial weights, data order and dropout'),
}

#: the ``model`` keys of every config: where the task's code comes from
CODE_FIELDS = {
    'task': Field('str', None, doc="the task module 'package.module' defining TASK (e.g. examples.mlp.pet_task); "
                                   "null with class/factory: the built-in task (no code)"),
    'trust_code': Field('bool', False, doc="allow importing modules outside the allow-list (mindpet, mindone, "
                                           "mindformers) named in this section"),
    'code_dir': Field('dir', None, doc="directory holding the named modules' top-level package, relative to the "
                                       "config file (not added to sys.path)"),
}

MODEL_FIELDS = dict(CODE_FIELDS, **{
    'size': Field('str', 'tiny', doc="a size preset of the model (e.g. tiny, full); the task lists its presets"),
    'base_checkpoint': Field('path', None, doc='pretrained weights to load before fine-tuning (.ckpt/.safetensors)'),
    'overrides': Field('dict', None, doc='model dimensions replacing the preset\'s (e.g. {num_layers: 2})'),
    'base_dtype': Field('str', None, choices=('float32', 'float16', 'bfloat16'),
                        doc='store the frozen base weights in this dtype (adapters stay float32); null: as built'),
})

OPTIMIZER_FIELDS = {
    'type': Field('str', 'adamw', choices=('adamw', 'adam', 'momentum', 'sgd'), doc='optimizer'),
    'weight_decay': Field('float', 0.0, min_value=0.0, doc='decoupled weight decay (adamw) / L2 (others)'),
    'beta1': Field('float', 0.9, min_value=0.0, max_value=1.0, doc='Adam first-moment decay'),
    'beta2': Field('float', 0.999, min_value=0.0, max_value=1.0, doc='Adam second-moment decay'),
    'eps': Field('float', 1e-8, min_value=0.0, min_exclusive=True, doc='Adam epsilon'),
    'momentum': Field('float', 0.9, min_value=0.0, doc='momentum (type: momentum)'),
}

SCHEDULE_FIELDS = {
    'start_learning_rate': Field('float', min_value=0.0, min_exclusive=True,
                                 doc='learning rate reached at the end of warm-up (the peak)'),
    'end_learning_rate': Field('float', 0.0, min_value=0.0, doc='learning rate at the last step'),
    'warmup_steps': Field('int', 0, min_value=0, doc='steps of linear warm-up from 0 to start_learning_rate'),
    'decay': Field('str', 'linear', choices=('linear', 'cosine', 'polynomial', 'constant'),
                   doc='decay from start_learning_rate to end_learning_rate after warm-up'),
    'power': Field('float', 1.0, min_value=0.0, min_exclusive=True, doc='exponent of the polynomial decay'),
}

TRAINING_FIELDS = {
    'output_dir': Field('str', doc='directory for the adapter, checkpoints, metrics and plots (created)'),
    'epochs': Field('int', 1, min_value=1,
                    doc=f'passes over the training data (at most {MAX_EPOCHS:,}, and {MAX_STEPS:,} steps)'),
    'batch_size': Field('int', min_value=1, doc='rows per step (per device under data parallel)'),
    'max_steps': Field('int', None, min_value=1,
                       doc=f'stop after this many steps (null: epochs decide; at most {MAX_STEPS:,})'),
    'checkpoint_interval': Field('int', 0, min_value=0,
                                 doc='save the trainable parameters every N steps into output_dir/checkpoints '
                                     '(0: none during training)'),
    'keep_checkpoint_max': Field('int', 3, min_value=1, doc='checkpoints kept'),
    'log_interval': Field('int', 1, min_value=1, doc='print a progress line every N steps'),
    'evaluate': Field('bool', True, doc='evaluate before and after training'),
    'rdrop_alpha': Field('float', 0.0, min_value=0.0,
                         doc='R-Drop: weight of the symmetric KL of two dropout passes (0: off)'),
    'save_full_checkpoint': Field('bool', False,
                                  doc='also write the whole fine-tuned model (always on for pet type full)'),
    'plot': Field('bool', True, doc='write loss.png when matplotlib is installed'),
    'recompute': Field('any', False,
                       doc="activation recompute (doc/recompute.md): true (the repeated blocks: the items of the "
                           "model's largest CellList/SequentialCell), a cell-name pattern or a list of them, or false"),
}

PARALLEL_FIELDS = {
    'data_parallel': Field('bool', False,
                           doc='data parallel across the workers started by msrun (needs msrun; see '
                               'doc/distributed.md)'),
    'gradients_mean': Field('bool', True, doc='average (not sum) the gradients across workers'),
}

RUNNER_FIELDS = {'context': CONTEXT_FIELDS, 'optimizer': OPTIMIZER_FIELDS, 'schedule': SCHEDULE_FIELDS,
                 'training': TRAINING_FIELDS, 'parallel': PARALLEL_FIELDS}
OPTIONAL_SECTIONS = ('context', 'optimizer', 'parallel', 'data')


class ConfigSource:
    """Where values come from, for messages: the file, and the keys given with ``--set``.

    With ``missing_ok`` (a dry run), a path naming a file that does not exist here is recorded in ``missing``
    instead of refused: a config for another machine (an Ascend server's checkpoint paths) still validates.
    """

    def __init__(self, path, overridden=(), missing_ok=False):
        self.path = os.fspath(path)
        self.overridden = set(overridden)
        self.missing_ok = missing_ok
        self.missing = []

    def where(self, key):
        """``"configs/x.yaml: 'training.epochs'"`` (with ``(--set)`` when the value came from the command line)."""
        origin = ' (from --set)' if key in self.overridden else ''
        return f"{self.path}: '{key}'{origin}"

    def key_error(self, key, problem):
        return ModelConfigKeysInfoError(one_line(f"{self.where(key)}: {problem}"))

    def value_error(self, key, problem):
        return ModelConfigParamsInfoError(one_line(f"{self.where(key)}: {problem}"))


def check_section(source, name, data, fields):
    """Check one section against ``fields``; returns a new dict with defaults filled in.

    Raises:
        ModelConfigKeysInfoError: an unknown key (with the closest valid one) or a missing required key.
        ModelConfigParamsInfoError: the section is not a mapping, or a value is of the wrong type/range, or a
            path does not exist.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise source.value_error(name, f"must be a mapping of keys to values, but got {got_text(data, QUOTE_LIMIT)}")
    for key in data:
        if key not in fields:
            raise source.key_error(f'{name}.{key}', f"unknown key{did_you_mean(key, fields, list_valid=True)}")
    out = {}
    for key, field in fields.items():
        if key not in data:
            if field.default is REQUIRED:
                raise source.key_error(f'{name}.{key}', f"missing (required: {field.doc or field.expected()})")
            out[key] = copy.deepcopy(field.default)
            continue
        try:
            out[key] = field.check(data[key])
        except ValueError as ex:
            raise source.value_error(f'{name}.{key}', str(ex)) from None
        if not field.exists(out[key]):
            what = 'file' if field.kind == 'path' else 'directory'
            if not source.missing_ok:
                raise source.value_error(f'{name}.{key}', f"the {what} '{out[key]}' does not exist")
            source.missing.append((f'{name}.{key}', out[key]))
    return out


def parse_override(text):
    """``'training.epochs=3'`` -> ``(['training', 'epochs'], 3)``; the value is read as YAML (numbers, booleans,
    lists, mappings, null). A key without a dot replaces a whole section (``'pet={type: full}'``).

    Raises:
        ValueError: no ``=``, or an empty key part.
    """
    if not isinstance(text, str) or '=' not in text:
        raise ValueError(f"--set expects KEY=VALUE with a dotted key (e.g. training.epochs=3), but got {text!r}.")
    key, raw = text.split('=', 1)
    parts = key.strip().split('.')
    if not all(parts):
        raise ValueError(f"--set expects a dotted key 'section.key' (e.g. training.epochs=3), but got {key!r}.")
    try:
        value = load_yaml_text(raw) if raw.strip() else ''
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(config, overrides):
    """Apply ``--set`` strings to a config dict in place; returns the set of dotted keys changed.

    Raises:
        ValueError: a malformed override, or one that descends into a key holding a non-mapping value.
    """
    changed = set()
    for text in overrides or ():
        parts, value = parse_override(text)
        node = config
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ValueError(f"--set {text!r}: '{'.'.join(parts[:depth + 1])}' holds "
                                 f"{got_text(node[part], QUOTE_LIMIT)}, not a mapping.")
            node = node[part]
        node[parts[-1]] = value
        changed.add('.'.join(parts))
    return changed


def read_run_config(path, overrides=(), missing_ok=False):
    """Read the YAML file, apply ``--set`` overrides, and check the top-level layout.

    Returns:
        (dict, ConfigSource): the raw (unchecked) sections and the source for messages.

    Raises:
        ReadYamlFileError: the file is missing or not YAML.
        ModelConfigKeysInfoError: an unknown or missing section.
        ModelConfigParamsInfoError: the file does not hold a mapping.
        ValueError: a malformed ``--set``.
    """
    raw = read_yaml_file(path, what='run config')
    source = ConfigSource(path, missing_ok=missing_ok)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ModelConfigParamsInfoError(f"{path}: the run config must be a mapping of sections "
                                         f"{list(SECTIONS)}, but holds {got_text(raw, QUOTE_LIMIT)}.")
    try:
        source.overridden = apply_overrides(raw, overrides)
    except ValueError as ex:
        raise ModelConfigParamsInfoError(one_line(f"{path}: {ex}")) from None
    for key in raw:
        if key not in SECTIONS:
            origin = ' (from --set)' if any(k.split('.')[0] == key for k in source.overridden) else ''
            raise ModelConfigKeysInfoError(f"{path}: '{key}'{origin}: unknown section"
                                           f"{did_you_mean(key, SECTIONS, list_valid=True)}")
    for key in SECTIONS:
        if key not in raw and key not in OPTIONAL_SECTIONS:
            raise ModelConfigKeysInfoError(f"{path}: '{key}': missing section (every run config has "
                                           f"{[s for s in SECTIONS if s not in OPTIONAL_SECTIONS]})")
    return raw, source


def schema_rows():
    """``(section, key, kind, default, doc)`` for every runner field (for doc/cli.md)."""
    rows = []
    for section, fields in [('model', MODEL_FIELDS)] + list(RUNNER_FIELDS.items()):
        for key, field in fields.items():
            default = 'required' if field.default is REQUIRED else repr(field.default)
            rows.append((section, key, field.kind, default, field.doc))
    return rows


__all__ = ['Field', 'REQUIRED', 'MAX_STEPS', 'MAX_EPOCHS', 'SECTIONS', 'ConfigSource', 'check_section', 'parse_override', 'apply_overrides',
           'read_run_config', 'one_line', 'MindPetError']
