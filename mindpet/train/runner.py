"""YAML-driven fine-tuning: ``mindpet finetune`` and ``mindpet evaluate`` (see doc/cli.md).

:func:`load_plan` reads and checks the whole run config before anything runs (unknown keys, types, ranges,
missing files, the PET method's own config); :func:`build` builds the network, loads the pretrained weights and
only then applies the PET method (load first, then adapt: base-dependent state such as DoRA's magnitude comes from
the loaded weights; a target pattern that matches nothing fails here); only then does :func:`finetune` create the
output directory, train and write the results. A config that fails leaves the output directory as it
was. A dry run (``finetune(..., dry_run=True)``) builds the model without allocating its weights
(``no_init_parameters``), so a full-size config validates on a laptop.

These functions set the MindSpore context (mode, device) from the config's ``context`` section: they are the body
of a command, not library calls to mix with other work in one process.
"""
import contextlib
import json
import math
import os
import resource
import shutil
import time
from collections import OrderedDict

import numpy as np
import mindspore as ms
from mindspore import nn
from mindspore.nn.utils import no_init_parameters
from mindspore.train.callback import Callback, CheckpointConfig, RunContext

from mindpet.graph.ckpt_util import (TrainableParamsCheckPoint, batch_checksum, distributed_rank,
                                     resume_from_checkpoint)
from mindpet.model import PetModel, get_pet_model, parameter_counts
from mindpet.naming import is_pet_param
from mindpet.recompute import apply_recompute
from mindpet.train import report
from mindpet.train.peers import PeerWatch
from mindpet.train.schedule import WarmupDecayLR, learning_rate_at
from mindpet.train.schema import CODE_FIELDS, RUNNER_FIELDS, MAX_EPOCHS, MAX_STEPS, check_section, read_run_config
from mindpet.train.imports import CodeImportError
from mindpet.train.task import GENERIC_TASK, KeyValueError, load_task_class
from mindpet.tuners.config import check_patterns
from mindpet.tuners.registry import available_methods, get_method
from mindpet.utils.exceptions import CheckpointError, MindPetError
from mindpet.utils.ms_settings import compile_then_release, release_enabled
from mindpet.utils.validation import check_bool, did_you_mean, memory_shortfall
from mindpet.utils.io_utils import (ensure_dir, atomic_save_checkpoint, load_checkpoint_file,
                                    load_params_checked)

FULL = 'full'      # pet type: train every parameter (no adapter)
ADAPTER_DIR = 'adapter'
FULL_CHECKPOINT = 'model.ckpt'
CHECKPOINT_DIR = 'checkpoints'
METRICS = 'metrics.json'
# What --overwrite removes: the entries every run writes (also when it was killed before writing metrics.json),
# and the files an earlier run's metrics.json lists (task artifacts such as sample images).
_RUN_ENTRIES = ('config.yaml', METRICS, 'loss.png', ADAPTER_DIR, FULL_CHECKPOINT, CHECKPOINT_DIR)
# Output directories refused: system trees (and anything inside them), and directories that hold other things.
_SYSTEM_TREES = ('/bin', '/boot', '/dev', '/etc', '/lib', '/lib32', '/lib64', '/libx32', '/proc', '/run', '/sbin',
                 '/sys', '/usr')
_SHARED_DIRS = ('/', '/home', '/root', '/tmp', '/var', '/var/tmp', '/opt', '/mnt', '/media', '/srv')


class RunPlan:
    """A checked run config: every section with defaults filled in, the task, and the PET config."""

    def __init__(self, path, source, sections, task, pet_config):
        self.path = path
        self.source = source
        self.sections = sections
        self.task = task
        self.pet_config = pet_config     # None for full fine-tuning

    def __getattr__(self, name):
        sections = self.__dict__.get('sections', {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    @property
    def method(self):
        return FULL if self.pet_config is None else self.pet_config.method

    def to_dict(self):
        """The resolved config (what ``config.yaml`` in the output directory records)."""
        out = OrderedDict()
        for name in ('context', 'model', 'pet', 'data', 'optimizer', 'schedule', 'training', 'parallel'):
            out[name] = self.sections[name]
        out['pet'] = {'type': FULL} if self.pet_config is None else self.pet_config.to_dict()
        return out


def load_plan(path, overrides=(), missing_ok=False):
    """Read, override and check a run config. Nothing is built, written or changed.

    Args:
        path (str): the YAML file.
        overrides (list[str]): ``--set`` strings, ``'section.key=value'`` (YAML values).
        missing_ok (bool): record files that do not exist in ``plan.source.missing`` instead of failing (dry run).

    Returns:
        RunPlan

    Raises:
        ReadYamlFileError: the file is missing or not YAML.
        ModelConfigKeysInfoError: an unknown, missing or misspelt key (the message names the file and key).
        ModelConfigParamsInfoError: a wrong type or value, or a missing file.
    """
    raw, source = read_run_config(path, overrides, missing_ok=missing_ok)
    sections = {}
    model_raw = raw.get('model')
    if not isinstance(model_raw, dict):
        raise source.value_error('model', f"must be a mapping with 'task' (a task module) or 'class'/'factory' "
                                 f"(a model), but got {model_raw!r}")
    task_class, model_raw = _task_class(source, model_raw)
    sections['model'] = check_section(source, 'model', model_raw, task_class.all_model_fields())
    sections['data'] = check_section(source, 'data', raw.get('data'), task_class.data_fields)
    for name, fields in RUNNER_FIELDS.items():
        sections[name] = check_section(source, name, raw.get(name), fields)
    sections['pet'] = raw.get('pet')
    _check_runner_rules(source, sections, task_class)
    try:
        task = task_class(sections['model'], sections['data'], seed=sections['context']['seed'])
        task.check()
    except KeyValueError as ex:
        raise source.value_error(ex.key, str(ex)) from None
    except (TypeError, ValueError) as ex:
        raise source.value_error('model.overrides', str(ex)) from None
    if task.base_checkpoint_required() and sections['model'].get('base_checkpoint') is None:
        raise source.key_error('model.base_checkpoint', f"missing: the '{sections['model']['size']}' size of "
                               f"'{task.name}' is fine-tuned from pretrained weights; give their path")
    pet = sections['pet']
    if isinstance(pet, dict) and isinstance(pet.get('type'), str):
        sections['pet'] = pet = dict(task.pet_defaults(pet['type']), **pet)
    pet_config = _pet_config(source, pet)
    if pet_config is not None:
        try:
            task.check_pet(pet_config)
        except KeyValueError as ex:
            raise source.value_error(ex.key, str(ex)) from None
    return RunPlan(os.fspath(path), source, sections, task, pet_config)


def _task_class(source, model_raw):
    """The task class the ``model`` section names, and the section with ``code_dir`` made absolute.

    ``model.task`` names it; without it, a section naming a ``class`` or ``factory`` gets the built-in task.
    ``model.code_dir`` is taken relative to the config file (the shipped configs say ``..``, the repository root).
    """
    code = {}
    for key, field in CODE_FIELDS.items():
        value = model_raw.get(key, field.default)
        if key == 'code_dir' and isinstance(value, str) and value:
            value = os.path.join(os.path.dirname(os.path.abspath(source.path)), os.path.expanduser(value))
        try:
            code[key] = field.check(value)
        except ValueError as ex:
            raise source.value_error(f'model.{key}', str(ex)) from None
        if not field.exists(code[key]):
            raise source.value_error(f'model.{key}', f"the directory '{code[key]}' does not exist")
    task = code['task']
    if task is None:
        if 'class' in model_raw or 'factory' in model_raw:
            task = GENERIC_TASK
        elif 'name' in model_raw:
            raise source.key_error('model.name', "replaced by 'model.task', the task module 'package.module' "
                                   "(the shipped tasks: examples.<name>.pet_task, with code_dir and trust_code as "
                                   "in configs/; see doc/cli.md)")
        else:
            raise source.key_error('model.task', "missing: name the task module ('package.module' defining TASK) or "
                                   "the model ('class: package.module:ClassName' or 'factory: "
                                   "package.module:function')")
    try:
        task_class = load_task_class(task, code['trust_code'], code['code_dir'])
    except CodeImportError as ex:
        raise source.value_error('model.task' if code['task'] else 'model', str(ex)) from None
    if code['code_dir'] is not None:
        model_raw = dict(model_raw, code_dir=code['code_dir'])
    return task_class, model_raw


def _check_runner_rules(source, sections, task_class):
    schedule, training = sections['schedule'], sections['training']
    problem = output_dir_problem(training['output_dir'])
    if problem:
        raise source.value_error('training.output_dir', problem)
    for key, cap in (('epochs', MAX_EPOCHS), ('max_steps', MAX_STEPS)):
        if training[key] is not None and training[key] > cap:
            raise source.value_error(f'training.{key}', f"must be at most {cap:,} (doc/cli.md), but got "
                                     f"{training[key]:,}")
    if schedule['end_learning_rate'] > schedule['start_learning_rate']:
        raise source.value_error('schedule.end_learning_rate',
                                 f"must not exceed start_learning_rate ({schedule['start_learning_rate']}), but got "
                                 f"{schedule['end_learning_rate']}")
    _recompute_blocks(source, training['recompute'])
    if training['rdrop_alpha'] and not task_class.supports_rdrop:
        raise source.value_error('training.rdrop_alpha', f"R-Drop is not available for the '{task_class.name}' "
                                 f"task (a classification loss is needed); use 0")


def _recompute_blocks(source, value):
    """``training.recompute`` as ``apply_recompute``'s ``blocks`` (None: the repeated blocks), or False: off."""
    if value is None or value is False:
        return False
    if value is True:
        return None
    try:
        return check_patterns('training.recompute', 'recompute', value, allow_none=False)
    except (TypeError, ValueError):
        raise source.value_error('training.recompute', f"must be true, false, a cell-name pattern (a regular "
                                 f"expression) or a list of them, but got {value!r}") from None


def _pet_config(source, pet):
    """The PET method's config from the ``pet`` section (None for ``type: full``)."""
    if not isinstance(pet, dict):
        raise source.value_error('pet', f"must be a mapping with a 'type' key (a method, or '{FULL}' for full "
                                 f"fine-tuning), but got {pet!r}")
    kind = pet.get('type')
    if kind is None:
        raise source.key_error('pet.type', f"missing: name the method (one of {available_methods()}) or "
                               f"'{FULL}' for full fine-tuning")
    if kind == FULL:
        extra = sorted(set(pet) - {'type'})
        if extra:
            raise source.key_error(f'pet.{extra[0]}', f"unknown key: full fine-tuning ('type: {FULL}') takes no "
                                   f"other key")
        return None
    try:
        config_class = get_method(kind)[0]
    except (TypeError, ValueError) as ex:
        raise source.value_error('pet.type', f"{ex} (or '{FULL}' for full fine-tuning)") from None
    valid = config_class.field_names() + ['type']
    for key in pet:
        if key not in valid:
            raise source.key_error(f'pet.{key}', f"unknown key of the '{kind}' method"
                                   f"{did_you_mean(key, valid, list_valid=True)}") from None
    try:
        # The keys are checked above and the class looked up once: build it directly.
        return config_class(**{key: value for key, value in pet.items() if key != 'type'})
    except (TypeError, ValueError) as ex:
        # The config's checks name the field in the error (FieldTypeError/FieldValueError; 'rank_pattern[...]'
        # for an entry of a mapping field).
        field = (getattr(ex, 'field', None) or '').split('[', 1)[0]
        raise source.value_error(f'pet.{field}' if field in valid else 'pet', str(ex)) from None


def output_dir_problem(path):
    """Why ``path`` cannot be a run's output directory (``/``, a system directory, a shared top-level directory
    such as ``/tmp``, or the user's home itself), or None when it can.

    Example:
        >>> output_dir_problem('/etc')
        "'/etc' is a system directory; give a directory of its own (e.g. outputs/my_run)"
    """
    real = os.path.realpath(os.path.abspath(os.path.expanduser(path)))
    own = f"; give a directory of its own (e.g. outputs/my_run)"
    if real == os.path.realpath(os.path.expanduser('~')):
        return f"'{path}' is the home directory itself{own}"
    if real in _SHARED_DIRS:
        return f"'{path}' is {'the root directory' if real == '/' else 'a shared system directory'}{own}"
    if any(real == tree or real.startswith(tree + os.sep) for tree in _SYSTEM_TREES):
        return f"'{path}' is {'a system directory' if real in _SYSTEM_TREES else 'inside a system directory'}{own}"
    return None


def prepare_output_dir(plan, resume=False, overwrite=False):
    """Check the output directory before a run writes into it; with ``overwrite``, remove what an earlier run
    wrote there (the files every run writes, and those its ``metrics.json`` lists). Nothing else is touched.

    Raises:
        ModelConfigParamsInfoError: the directory holds files (of another run) and neither ``resume`` nor
            ``overwrite`` was given; or a path of the directory exists but is not a directory.
    """
    output_dir = plan.training['output_dir']
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise plan.source.value_error('training.output_dir', f"'{output_dir}' exists and is not a directory")
    entries = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    if not entries or resume:
        return []
    if not overwrite:
        shown = ', '.join(entries[:5]) + (', ...' if len(entries) > 5 else '')
        raise plan.source.value_error('training.output_dir', f"'{output_dir}' is not empty ({shown}); pass "
                                      f"--overwrite to replace what an earlier mindpet run wrote there, or --resume "
                                      f"to continue that run from its newest checkpoint")
    removed = []
    for name in _listed_entries(output_dir) | set(_RUN_ENTRIES):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return sorted(removed)


def _listed_entries(output_dir):
    """The top-level entries an earlier run's ``metrics.json`` lists (names only: nothing outside ``output_dir``)."""
    try:
        with open(os.path.join(output_dir, METRICS), encoding='utf-8') as handle:
            listed = json.load(handle)['summary']['files']
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    names = set()
    for name in listed if isinstance(listed, list) else ():
        top = os.path.normpath(str(name)).split(os.sep)[0]
        if top not in ('', '.', '..') and not os.path.isabs(str(name)):
            names.add(top)
    return names


# ----- building --------------------------------------------------------------------------------------------------
class Built:
    """The network, the PET wrapper around it (None for full fine-tuning) and parameter counts."""

    def __init__(self, network, pet_model, loaded=None):
        self.network = network
        self.pet_model = pet_model
        self.loaded = loaded          # what the task loaded into the base (a description), None: nothing
        self.checkpoint_dir = None

    @property
    def model(self):
        """What to train and evaluate: the PetModel, or the network itself."""
        return self.pet_model if self.pet_model is not None else self.network

    def counts(self):
        """``(trainable, total)`` parameter counts (run-time state excluded)."""
        return parameter_counts(self.network)

    def base_bytes(self):
        """Bytes of the base model's parameters (what a full checkpoint of it holds)."""
        return sum(int(np.prod(p.shape)) * p.itemsize for p in self.network.get_parameters()
                   if not is_pet_param(p.name))


def set_context(plan, dry_run=False):
    """Set the MindSpore mode (and, unless ``dry_run``, the device) from the ``context`` section.

    Raises:
        ModelConfigParamsInfoError: the device is not available in this MindSpore installation.
    """
    context = plan.context
    ms.set_context(mode=ms.GRAPH_MODE if context['mode'] == 'GRAPH' else ms.PYNATIVE_MODE)
    if dry_run:
        return
    kwargs = {'device_target': context['device_target']}
    if context['device_id'] is not None:
        kwargs['device_id'] = context['device_id']
    try:
        ms.set_context(**kwargs)
    except (RuntimeError, ValueError) as ex:
        raise plan.source.value_error('context.device_target', f"{context['device_target']} cannot be used here: "
                                      f"{str(ex).splitlines()[0]}") from None
    ms.set_seed(context['seed'])


def build(plan, lazy=False):
    """Build the task's network, load its pretrained weights, then apply the PET method; nothing is written.

    The order is the one every entry point uses (load first, then adapt): a method whose initial state derives
    from the base weights (DoRA's magnitude: the row norms of the weight) computes it from the loaded weights, so
    the adapted model starts out computing exactly the loaded base model.

    Args:
        plan (RunPlan): from :func:`load_plan`.
        lazy (bool): build under ``mindspore.nn.utils.no_init_parameters`` (no weight memory, nothing loaded; a
            dry run).

    Returns:
        Built: ``loaded`` holds the task's description of what was loaded (None: nothing).

    Raises:
        ModelConfigParamsInfoError: the method's config does not fit the model (e.g. target patterns matching
            nothing), or the model dimensions are invalid; the message names the key and the file.
        CheckpointError: the base checkpoint does not fit the model.
    """
    scope = no_init_parameters() if lazy else contextlib.nullcontext()
    with scope:
        try:
            network = plan.task.build_network()
        except (TypeError, ValueError) as ex:
            raise plan.source.value_error(getattr(ex, 'key', 'model'), str(ex)) from None
        loaded = None if lazy else plan.task.load_base(network, plan.model.get('base_checkpoint'))
        if plan.pet_config is None:
            return Built(_recompute(plan, network), None, loaded)
        try:
            # Lazily built (no weights yet): parameters are counted as built, the half-precision copy comes with
            # the real build.
            pet_model = get_pet_model(network, plan.pet_config,
                                      base_dtype=None if lazy else plan.model.get('base_dtype'))
        except (MindPetError, TypeError, ValueError) as ex:
            # An error about a config field names it (FieldValueError); any other refusal is about what the
            # target_modules selected.
            field = getattr(ex, 'field', None)
            key = field if field in plan.pet_config.field_names() else 'target_modules'
            raise plan.source.value_error(f'pet.{key}', str(ex)) from None
    _recompute(plan, network)
    return Built(network, pet_model, loaded)


def _recompute(plan, network):
    """Set ``training.recompute`` on the network's blocks (after the adapters are in: either order works);
    returns the network."""
    blocks = _recompute_blocks(plan.source, plan.training['recompute'])
    if blocks is not False:
        try:
            apply_recompute(network, blocks)
        except (TypeError, ValueError) as ex:
            raise plan.source.value_error('training.recompute', str(ex)) from None
    return network


def check_memory(plan):
    """Refuse, before any weight is allocated, a base model whose parameters (with gradients and optimizer moments
    under full fine-tuning) would not fit into the memory available, e.g. a hidden size of 10**9 in
    ``model.overrides``. The network is built once without weights to count them; the seed is set again
    afterwards, so the real build draws the same numbers. (Adapters are bounded by their layers: a rank above a
    layer's size is refused by the method.)

    Raises:
        ModelConfigParamsInfoError: naming ``model.overrides`` (or ``model.size``), with the estimate.
    """
    with no_init_parameters():
        try:
            network = plan.task.build_network()
        except (TypeError, ValueError) as ex:
            raise plan.source.value_error(getattr(ex, 'key', 'model'), str(ex)) from None
    total = sum(int(np.prod(p.shape, dtype=object)) * p.itemsize for p in network.get_parameters())
    needed = total * (4 if plan.pet_config is None else 1)
    problem = memory_shortfall(needed)
    if problem:
        key = 'model.overrides' if plan.model.get('overrides') else 'model.size'
        state = ", gradients and optimizer moments" if plan.pet_config is None else ""
        raise plan.source.value_error(key, f"the model's parameters{state} need {problem}; choose smaller "
                                      f"dimensions")
    ms.set_seed(plan.context['seed'])


# ----- training --------------------------------------------------------------------------------------------------
def _optimizer(plan, params, rates):
    opt = plan.optimizer
    decay = opt['weight_decay']
    if decay:
        # Biases and normalisation scales/shifts are not decayed (the usual recipe for transformers).
        # (Split by name: `param in list` would compare tensors element-wise.)
        plain = [p.name.rsplit('.', 1)[-1] in ('bias', 'beta', 'gamma') for p in params]
        groups = [{'params': [p for p, skip in zip(params, plain) if not skip], 'weight_decay': decay},
                  {'params': [p for p, skip in zip(params, plain) if skip], 'weight_decay': 0.0}]
        groups = [g for g in groups if g['params']]
    else:
        groups = params
    if opt['type'] == 'adamw':
        return nn.AdamWeightDecay(groups, learning_rate=rates, beta1=opt['beta1'], beta2=opt['beta2'],
                                  eps=opt['eps'], weight_decay=decay)
    if opt['type'] == 'adam':
        return nn.Adam(groups, learning_rate=rates, beta1=opt['beta1'], beta2=opt['beta2'], eps=opt['eps'],
                       weight_decay=decay)
    if opt['type'] == 'momentum':
        return nn.Momentum(groups, learning_rate=rates, momentum=opt['momentum'], weight_decay=decay)
    return nn.SGD(groups, learning_rate=rates, weight_decay=decay)


def _init_parallel(plan):
    """Start data parallel when the config asks for it; returns ``(rank, group_size)``.

    Raises:
        ModelConfigParamsInfoError: data parallel asked for, but the process was not started by msrun.
    """
    if not plan.parallel['data_parallel']:
        return 0, 1
    if not (os.environ.get('MS_ROLE') or os.environ.get('RANK_TABLE_FILE')):
        raise plan.source.value_error('parallel.data_parallel', "true needs the workers started by msrun "
                                      "(e.g. msrun --worker_num=2 --local_worker_num=2 --join=True "
                                      "$(which mindpet) finetune --config ...); see doc/cli.md")
    from mindspore.communication import init  # pylint: disable=import-outside-toplevel
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL,
                                 gradients_mean=plan.parallel['gradients_mean'])
    return distributed_rank()


class _Progress(Callback):
    """A training callback: per-step loss and time, a progress line every ``log_interval`` steps (and the first
    and last), and a stop at ``total_steps``. Steps are counted over the whole run (a resumed run continues the
    count)."""

    def __init__(self, total_steps, steps_per_epoch, rate_at, log_interval, out, first_step=0):
        super().__init__()
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.rate_at = rate_at
        self.log_interval = log_interval
        self.out = out
        self.first_step = first_step
        self.losses, self.step_times = [], []
        self._start = None

    def on_train_step_begin(self, run_context):
        self._start = time.perf_counter()

    def on_train_step_end(self, run_context):
        loss = float(np.asarray(run_context.original_args().net_outputs.asnumpy()).reshape(-1)[0])
        self.step_times.append(time.perf_counter() - self._start)
        self.losses.append(loss)
        step = self.first_step + len(self.losses)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at step {step}; lower schedule.start_learning_rate")
        if step % self.log_interval == 0 or step in (self.first_step + 1, self.total_steps):
            self.out(report.progress_line(step, self.total_steps, self.steps_per_epoch, loss, self.rate_at(step - 1),
                                          self.step_times))
        if step >= self.total_steps:
            run_context.request_stop()


def plan_steps(plan, steps_per_epoch):
    """``(epochs, total_steps)`` from ``training.epochs``/``max_steps`` and the dataset's steps per epoch.

    Raises:
        ModelConfigParamsInfoError: the run would take more than ``MAX_STEPS`` optimizer steps.
    """
    training = plan.training
    if training['max_steps'] is not None:
        return max(1, math.ceil(training['max_steps'] / steps_per_epoch)), training['max_steps']
    epochs = training['epochs']
    if epochs * steps_per_epoch > MAX_STEPS:
        raise plan.source.value_error('training.epochs', f"{epochs} epochs of {steps_per_epoch} steps are "
                                      f"{epochs * steps_per_epoch:,} steps, more than the maximum of {MAX_STEPS:,} "
                                      f"(doc/cli.md); use fewer epochs or training.max_steps")
    return epochs, epochs * steps_per_epoch


def _rate_at(plan, total_steps):
    """The host-side learning rate of a 0-based step (progress lines, metrics.json)."""
    schedule = plan.schedule
    return lambda step: learning_rate_at(step, total_steps, schedule['start_learning_rate'],
                                         schedule['end_learning_rate'], schedule['warmup_steps'], schedule['decay'],
                                         schedule['power'])


def finetune(path, overrides=(), dry_run=False, out=print, resume=False, overwrite=False):
    """Run a fine-tuning job from a YAML run config (the ``mindpet finetune`` command).

    Args:
        path (str): the run config.
        overrides (list[str]): ``--set`` strings.
        dry_run (bool): check the config and build the model without weights; write nothing, train nothing.
        out (callable): where lines go (default ``print``).
        resume (bool): continue the run in ``training.output_dir`` from its newest checkpoint (exactly: the
            adapter, the optimizer state and the position in the epoch are restored and the batches already seen
            are skipped); a directory without a checkpoint starts from the beginning.
        overwrite (bool): the output directory may hold an earlier run: what that run wrote is removed first.

    Returns:
        dict: the summary (see ``metrics.json``); for a dry run, the plan's facts.

    Raises:
        MindPetError, TypeError, ValueError: a bad config or file, or an output directory holding another run
            without ``resume``/``overwrite`` (nothing written to the output directory).
    """
    t_start = time.time()
    check_bool('resume', resume, 'finetune')
    check_bool('overwrite', overwrite, 'finetune')
    if resume and overwrite:
        raise ValueError("For 'finetune', 'resume' and 'overwrite' exclude each other: --resume continues the run in "
                         "the output directory, --overwrite replaces it.")
    plan = load_plan(path, overrides, missing_ok=dry_run)
    set_context(plan, dry_run=dry_run)
    if dry_run:
        return _dry_run(plan, out)
    rank, group_size = _init_parallel(plan)
    watch = PeerWatch(rank, group_size).start()      # a lost worker ends the others with one line
    writer = rank == 0
    output_dir = plan.training['output_dir']
    check_memory(plan)
    built = build(plan)
    loaded = built.loaded
    dataset = plan.task.train_dataset(plan.training['batch_size'], rank, group_size)
    steps_per_epoch = dataset.get_dataset_size()
    if steps_per_epoch < 1:
        raise plan.source.value_error('training.batch_size', f"{plan.training['batch_size']} is larger than the "
                                      f"training data: no full batch")
    epochs, total_steps = plan_steps(plan, steps_per_epoch)
    rate_at = _rate_at(plan, total_steps)
    # Everything was checked and loaded: from here on the output directory is written.
    say = out if writer else (lambda *_: None)
    if writer:
        removed = prepare_output_dir(plan, resume=resume, overwrite=overwrite)
        if removed:
            say(f"[overwrite] removed the earlier run's {', '.join(removed)} from {output_dir}")
        ensure_dir(output_dir, what='output directory')
        report.write_yaml(os.path.join(output_dir, 'config.yaml'), plan.to_dict())
    trainable, total = built.counts()
    say(report.header(plan, loaded, trainable, total, total_steps, epochs, steps_per_epoch, group_size))
    data_notes = plan.task.notes()
    for line in data_notes:
        say(f"[data] {line}")

    model = built.model
    results = OrderedDict()
    do_eval = plan.training['evaluate']
    if do_eval:
        results['before'] = plan.task.evaluate(model)
        say(f"[eval] before: {report.format_metrics(results['before'])}")
    demo_before = _demo(plan, model, 'before', say)

    losses, step_times, steps_done = _train(plan, built, dataset, epochs, total_steps, steps_per_epoch, say, resume)

    if do_eval:
        results['after'] = plan.task.evaluate(model)
        say(f"[eval] after: {report.format_metrics(results['after'])}")
    demo_after = _demo(plan, model, 'after', say)
    watch.finish()
    if not writer:
        return {}
    files = _save_results(plan, built, output_dir)
    if built.checkpoint_dir:
        files.append(built.checkpoint_dir)
    files += plan.task.write_artifacts(model, output_dir)
    first_step = steps_done - len(losses)
    rates = [rate_at(first_step + i) for i in range(len(losses))]
    if plan.training['plot']:
        png = report.plot_losses(os.path.join(output_dir, 'loss.png'), losses, rates,
                                 title=f"{plan.task.name} {plan.method}")
        if png:
            files.append(png)
    summary = report.summary(plan, built, losses, step_times, results, files, output_dir,
                             peak_memory_mb=peak_memory_mb(), wall_time=time.time() - t_start,
                             total_steps=len(losses), demo=(demo_before, demo_after))
    summary['optimizer_steps'] = steps_done
    summary['resumed_from_step'] = first_step
    report.write_json(os.path.join(output_dir, METRICS),
                      dict(summary=summary, losses=losses, step_times=step_times, learning_rates=rates,
                           eval=results, data=data_notes))
    out('')
    out(report.summary_table(summary))
    return summary


def _demo(plan, model, when, say):
    """Print the task's demonstration lines (e.g. generated answers); returns them."""
    lines = plan.task.demo(model)
    if lines:
        say(f'[demo] {when} fine-tuning:')
        for line in lines:
            say(f'  {line}')
    return lines


class _StepArgs(dict):
    """What training callbacks receive from ``run_context.original_args()`` (as from ``Model.train``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def _train(plan, built, dataset, epochs, total_steps, steps_per_epoch, say, resume=False):
    """Train up to ``total_steps`` optimizer steps; returns ``(losses, step_times, steps_done)`` (the losses and
    times of the steps this call ran; ``steps_done`` counts the steps of the whole run, a resumed one included)."""
    release_enabled()   # a malformed MINDPET_RELEASE_MEMORY is refused before anything is built
    model = built.model
    params = model.trainable_params()
    if not params:
        raise plan.source.value_error('pet', "leaves no parameter trainable")
    schedule = plan.schedule
    rates = WarmupDecayLR(total_steps, schedule['start_learning_rate'], schedule['end_learning_rate'],
                          schedule['warmup_steps'], schedule['decay'], schedule['power'])
    loss_net = plan.task.loss_cell(model, plan.training['rdrop_alpha'])
    optimizer = _optimizer(plan, params, rates)
    train_step = nn.TrainOneStepCell(loss_net, optimizer)
    train_step.set_train()
    checkpoint_dir = os.path.join(plan.training['output_dir'], CHECKPOINT_DIR)
    start, expected_crc = 0, None
    if resume:
        start, expected_crc = _resume(plan, model, train_step, checkpoint_dir, steps_per_epoch, total_steps, say)
    progress = _Progress(total_steps, steps_per_epoch, _rate_at(plan, total_steps), plan.training['log_interval'],
                         say, first_step=start)
    callbacks = [progress]
    interval = plan.training['checkpoint_interval']
    if interval:
        built.checkpoint_dir = checkpoint_dir
        config = CheckpointConfig(save_checkpoint_steps=interval, keep_checkpoint_max=plan.training[
            'keep_checkpoint_max'], saved_network=model)
        callbacks.append(TrainableParamsCheckPoint(checkpoint_dir, prefix=plan.method, config=config,
                                                   save_optimizer_state=True))
    steps_done = _run_steps(train_step, model, dataset, epochs, total_steps, steps_per_epoch, callbacks, start,
                            expected_crc, say)
    model.set_train(False)
    return progress.losses, progress.step_times, steps_done


def _resume(plan, model, train_step, checkpoint_dir, steps_per_epoch, total_steps, say):
    """Load the newest checkpoint of the run (adapter and optimizer state); returns ``(steps_done, batch_crc)``."""
    state = resume_from_checkpoint(checkpoint_dir, model, train_step, prefix=plan.method)
    if state is None:
        say(f"[resume] no checkpoint in {checkpoint_dir}: starting from the beginning")
        return 0, None
    if state.step is None or not state.optimizer_loaded:
        raise CheckpointError(f"The checkpoint '{state.path}' does not record the optimizer state and the step, so "
                              f"the run cannot be resumed exactly; start again with --overwrite.")
    if state.batch_num != steps_per_epoch:
        raise plan.source.value_error('training.batch_size', f"the run being resumed had {state.batch_num} steps "
                                      f"per epoch, this one has {steps_per_epoch} (other data or batch size): "
                                      f"its position cannot be continued")
    if state.step > total_steps:
        raise plan.source.value_error('training.epochs', f"the run being resumed already did {state.step} steps, "
                                      f"more than this run's {total_steps}")
    say(f"[resume] {state.path}: step {state.step} of {total_steps} (epoch {state.epoch}, step "
        f"{state.step_in_epoch} of {steps_per_epoch}); the {state.step} batches already seen are skipped")
    return state.step, state.batch_crc


def _run_steps(train_step, model, dataset, epochs, total_steps, steps_per_epoch, callbacks, start, expected_crc,
               say):
    """The training loop: ``train_step(*batch)`` per batch, with the ``Model.train`` callback protocol.

    Resuming at global step ``start`` replays the data pipeline from its beginning and skips (does not train) the
    first ``start`` batches, so every later step sees the batch it would have seen without the interruption. The
    last replayed batch is compared with the checkpoint's record of it; a mismatch (a data order that depends on
    something else than the seed and the epoch) gets one warning line.
    """
    args = _StepArgs(train_network=train_step, network=model, batch_num=steps_per_epoch, epoch_num=epochs,
                     cur_epoch_num=0, cur_step_num=start, net_outputs=None, train_dataset=dataset,
                     train_dataset_element=None, optimizer=train_step.optimizer, mode='train',
                     dataset_sink_mode=False)
    run_context = RunContext(args)
    for callback in callbacks:
        callback.on_train_begin(run_context)
    iterator = dataset.create_tuple_iterator(num_epochs=epochs)
    step = 0
    compiled = False
    for epoch in range(1, epochs + 1):
        args.cur_epoch_num = epoch
        began = False
        for batch in iterator:
            step += 1
            if step <= start:
                if step == start and expected_crc is not None and batch_checksum(batch) != expected_crc:
                    say(f"[resume] warning: batch {step} differs from the one the interrupted run trained on (data "
                        f"shuffled without a seed?): the resumed run is not an exact continuation")
                continue
            if not began:
                began = True
                for callback in callbacks:
                    callback.on_train_epoch_begin(run_context)
            args.cur_step_num = step
            args.train_dataset_element = batch
            for callback in callbacks:
                callback.on_train_step_begin(run_context)
            if not compiled:
                # Compile before the first step and hand the memory compilation freed back to the OS, so the
                # first step's allocations do not add to it (MINDPET_RELEASE_MEMORY=0 turns it off). Inside the
                # step's callbacks: the first step's reported time still includes the compilation.
                compiled = True
                compile_then_release(train_step, *batch)
            args.net_outputs = train_step(*batch)
            for callback in callbacks:
                callback.on_train_step_end(run_context)
            if run_context.get_stop_requested() or step >= total_steps:
                break
        if began:
            for callback in callbacks:
                callback.on_train_epoch_end(run_context)
        if run_context.get_stop_requested() or step >= total_steps:
            break
    for callback in callbacks:
        callback.on_train_end(run_context)
    return max(step, start)


def _save_results(plan, built, output_dir):
    """Write the adapter (PET) or the whole model (full fine-tuning); returns the paths."""
    files = []
    if built.pet_model is not None:
        adapter_dir = os.path.join(output_dir, ADAPTER_DIR)
        built.pet_model.save_pretrained(adapter_dir)
        files.append(adapter_dir)
    if built.pet_model is None or plan.training['save_full_checkpoint']:
        params = [p for p in built.network.get_parameters() if not is_pet_param(p.name)]
        path = os.path.join(output_dir, FULL_CHECKPOINT)
        atomic_save_checkpoint(params, path)
        files.append(path)
    return files


def peak_memory_mb():
    """Peak resident memory of this process so far (``ru_maxrss``), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _dry_run(plan, out):
    built = build(plan, lazy=True)
    trainable, total = built.counts()
    out(f"{plan.path}: valid")
    out(report.header(plan, None, trainable, total, None, None, None, 1, dry_run=True))
    for key, path in plan.source.missing:
        out(f"  note: '{key}' names '{path}', which does not exist here (a real run refuses to start)")
    out(f"  nothing was written; a real run writes into {plan.training['output_dir']}")
    return {'valid': True, 'trainable_params': trainable, 'total_params': total,
            'missing_files': [key for key, _ in plan.source.missing]}


# ----- evaluation ------------------------------------------------------------------------------------------------
def _trained_model(plan, adapter):
    """The config's network with its base weights, then the adapter directory or fine-tuned checkpoint
    ``adapter`` (None: the base model). Returns ``(model, what was loaded as base, what was added)``."""
    network = plan.task.build_network()
    loaded = plan.task.load_base(network, plan.model.get('base_checkpoint'))
    model, what = network, 'the base model'
    if adapter is not None:
        adapter = os.fspath(adapter)
        if os.path.isdir(adapter):
            model = PetModel.from_pretrained(network, adapter)
            what = f"adapter {adapter} ({model.get_adapter_config().method})"
        else:
            params = load_checkpoint_file(adapter, what='fine-tuned checkpoint')
            load_params_checked(network, params, source=adapter,
                                require=[p.name for p in network.get_parameters()])
            what = f"fine-tuned checkpoint {adapter}"
    return model, loaded, what


def merge(path, adapter, out_path, base=None, overrides=()):
    """Merge the adapter directory ``adapter`` into the config's base weights and write ``out_path`` (``mindpet
    merge --config``): the task's own loader reads the base checkpoint (``base``, else ``model.base_checkpoint``,
    else the task's default weights), so a checkpoint in another naming that the model maps (e.g. a Hugging Face
    ``model.safetensors`` for the BERT task) is accepted. The output holds every parameter of the network under
    the network's own names, the adapter merged in: ``mindpet evaluate --adapter OUT`` scores it.

    Returns:
        tuple: the :class:`mindpet.adapter_store.MergeReport` and what was loaded as base.

    Raises:
        MindPetError, TypeError, ValueError: a bad config, base checkpoint or adapter.
    """
    from mindpet.adapter_store import merge_into_checkpoint  # pylint: disable=import-outside-toplevel
    if base is not None:
        overrides = list(overrides) + [f'model.base_checkpoint={base}']
    plan = load_plan(path, overrides)
    set_context(plan)
    network = plan.task.build_network()
    loaded = plan.task.load_base(network, plan.model.get('base_checkpoint'))
    params = [(p.name, p) for p in network.get_parameters()]
    arrays = {name: (param.astype(ms.float32) if param.dtype == ms.bfloat16 else param).asnumpy()
              for name, param in params}
    report = merge_into_checkpoint(loaded or 'the initial weights', adapter, out_path, base_params=arrays)
    return report, loaded


def generate(path, prompts, adapter=None, overrides=(), max_new_tokens=None, top_k=0, seed=0, out=print):
    """Write text after each prompt with the config's causal LM, its base weights and ``adapter`` (``mindpet
    generate``): greedy decoding, or top-k sampling when ``top_k`` > 0.

    Returns:
        list[str]: the generated texts.

    Raises:
        MindPetError, TypeError, ValueError: a bad config or adapter, or a model that does not generate text.
    """
    plan = load_plan(path, overrides)
    set_context(plan)
    model, _, what = _trained_model(plan, adapter)
    texts = []
    for prompt in prompts:
        text = plan.task.generate(model, prompt, max_new_tokens=max_new_tokens, top_k=top_k, seed=seed)
        texts.append(text)
        out(f"[generate] {plan.task.label()} with {what}")
        out(f"{prompt}{text}" if prompt.endswith((' ', '\n')) else f"{prompt} {text}")
    return texts


def evaluate(path, adapter=None, overrides=(), out=print):
    """Evaluate the config's model with an adapter directory or a full fine-tuned checkpoint (``mindpet
    evaluate``). Without ``adapter``, the base model is evaluated.

    Returns:
        dict: the task's metrics.

    Raises:
        MindPetError, TypeError, ValueError: a bad config, adapter or checkpoint.
    """
    plan = load_plan(path, overrides)
    set_context(plan)
    model, loaded, what = _trained_model(plan, adapter)
    out(f"[evaluate] {plan.task.label()}, base: {loaded or 'initial weights'}; with {what}")
    metrics = plan.task.evaluate(model)
    out(f"[evaluate] {report.format_metrics(metrics)}")
    lines = plan.task.demo(model)
    for line in lines or ():
        out(f'  {line}')
    return metrics


__all__ = ['RunPlan', 'Built', 'load_plan', 'build', 'finetune', 'evaluate', 'merge', 'generate', 'plan_steps', 'peak_memory_mb', 'FULL']
