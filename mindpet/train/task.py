"""What the runner needs from a model to fine-tune it: the :class:`Task` interface, and loading a task module.

A task knows one model family: its size presets, how to build the network, load pretrained weights, make the
training data, the loss, the evaluation metric and (optionally) a demonstration of its outputs. The runner
(:mod:`mindpet.train.runner`) does the rest the same way for every task: validation, the PET method, the optimizer
and schedule, the training loop, checkpoints, the adapter, the summary.

A run config names its task explicitly: ``model.task: package.module``, a module defining ``TASK`` (a
:class:`Task` subclass). Nothing is looked up by a built-in name: the shipped example tasks are
``examples.<name>.pet_task`` modules of the source tree, named like any other (their configs set
``model.code_dir`` and ``model.trust_code``; see :mod:`mindpet.train.imports`). A config with ``model.class`` or
``model.factory`` and no ``task`` uses the built-in :mod:`mindpet.train.generic` task (no code to write).
"""
import numpy as np

from mindpet.naming import is_pet_param
from mindpet.train.imports import CodeImportError, import_module
from mindpet.train.schema import Field
from mindpet.utils.validation import check_int

#: the task of configs that name a model class or factory instead of a task module
GENERIC_TASK = 'mindpet.train.generic'


def load_task_class(path, trust_code=False, code_dir=None):
    """The :class:`Task` subclass ``TASK`` of the module ``path`` (``model.task``).

    Args:
        path (str): ``package.module``.
        trust_code (bool): ``model.trust_code`` (needed unless the package is allow-listed).
        code_dir (str | None): ``model.code_dir``, the directory holding the module's top-level package.

    Raises:
        CodeImportError: a malformed path, an untrusted module, an import failure, or a module without ``TASK``.
    """
    module = import_module(path, trust_code, code_dir)
    task = getattr(module, 'TASK', None)
    if not (isinstance(task, type) and issubclass(task, Task)):
        raise CodeImportError(f"the module '{path}' does not define TASK (a mindpet.train.Task subclass)")
    return task


class Task:
    """Base class of a fine-tuning task. Subclasses set the class attributes and implement the methods.

    Attributes:
        name (str): the task's name in messages and the summary.
        sizes (dict): size preset name -> model config dict (``model.size``).
        model_fields (dict): extra ``model.*`` keys (:class:`mindpet.train.schema.Field`).
        data_fields (dict): the ``data.*`` keys.
        metric (str): name of the main evaluation metric (higher or lower is better: ``metric_higher_is_better``).
        supports_rdrop (bool): whether ``training.rdrop_alpha`` applies.

    The instance holds ``model`` and ``data`` (checked sections, defaults filled in), ``config`` (the model
    dimensions: the preset updated with ``model.overrides``) and ``seed``.
    """
    name = ''
    sizes = {}
    model_fields = {}
    data_fields = {}
    metric = 'loss'
    metric_higher_is_better = False
    supports_rdrop = False

    def __init__(self, model, data, seed=0):
        self.model = model
        self.data = data
        self.seed = seed
        self.config = self.model_config()

    # ----- configuration ---------------------------------------------------------------------------------------
    @classmethod
    def all_model_fields(cls):
        """Every key of the ``model`` section: the common ones, the size-preset ones, the task's own."""
        from mindpet.train.schema import MODEL_FIELDS  # pylint: disable=import-outside-toplevel
        fields = dict(MODEL_FIELDS)
        fields['size'] = Field('str', next(iter(cls.sizes)), choices=tuple(cls.sizes),
                               doc=MODEL_FIELDS['size'].doc)
        fields.update(cls.model_fields)
        return fields

    def label(self):
        """``'bert (minilm)'``: the task and its size, for messages and the summary."""
        size = self.model.get('size')
        return f"{self.name} ({size})" if size else self.name

    def model_config(self):
        """The model dimensions: the size preset with ``model.overrides`` applied. Raise ValueError naming a bad
        override (subclasses check with their config class)."""
        config = dict(self.sizes[self.model['size']])
        config.update(self.model.get('overrides') or {})
        return config

    def check(self):
        """Cross-field checks after the sections passed the schema. Raise ``KeyValueError(key, message)``."""

    def check_pet(self, config):
        """Check the PET config against the model before anything is built (e.g. sizes the method repeats). Raise
        ``KeyValueError('pet.<key>', message)``. Default: nothing to check."""

    def pet_defaults(self, method):
        """Values the ``pet`` section of ``method`` gets from the model when it does not give them (e.g. P-Tuning
        v2's layer and head counts). Default: none."""
        return {}

    # ----- model -----------------------------------------------------------------------------------------------
    def build_network(self):
        """The base network with freshly initialised weights (also called under ``no_init_parameters`` for a dry
        run, so it must not read parameter values)."""
        raise NotImplementedError

    def load_base(self, network, path):
        """Load pretrained weights into ``network`` (``path``: ``model.base_checkpoint``, possibly None). Returns
        a short description (e.g. ``'103 tensors from .../model.safetensors'``) or None when nothing was loaded."""
        if path is None:
            return None
        from mindpet.utils.io_utils import load_checkpoint_file, load_params_checked  # pylint: disable=C0415
        params = load_checkpoint_file(path, what='base checkpoint')
        loaded = load_params_checked(network, params, source=path, require=_base_names(network))
        return f"{len(loaded)} tensors from {path}"

    def base_weights_source(self, path):
        """What :meth:`load_base` would load for ``path`` (``model.base_checkpoint``, possibly None), said without
        reading anything (``--dry-run`` prints it), or None when the network keeps its initial weights. Tasks
        whose ``load_base`` finds weights elsewhere override both."""
        return path

    def base_checkpoint_required(self):
        """Whether the size preset needs ``model.base_checkpoint`` (full-size models: no random-init training)."""
        return False

    # ----- data ------------------------------------------------------------------------------------------------
    def train_dataset(self, batch_size, rank=0, group_size=1):
        """A ``mindspore.dataset`` of training batches (the columns ``loss_cell`` takes); under data parallel
        each rank reads its own shard."""
        raise NotImplementedError

    def loss_cell(self, network, rdrop_alpha=0.0):
        """A Cell ``(*batch) -> scalar loss`` around ``network`` (built with ``auto_prefix=False``)."""
        raise NotImplementedError

    # ----- results ---------------------------------------------------------------------------------------------
    def evaluate(self, network):
        """``{metric: value, ...}`` of ``network`` on held-out data; ``self.metric`` must be a key."""
        raise NotImplementedError

    def demo(self, network):
        """Lines showing the model's behaviour (e.g. generated text), printed before and after training; None."""
        return None

    def notes(self):
        """Lines about the data (e.g. bad rows skipped), printed after the run's header and kept in
        ``metrics.json``. Default: none."""
        return []

    def generate(self, network, prompt, max_new_tokens=None, top_k=0, seed=0):
        """The text the model writes after ``prompt`` (``mindpet generate``); greedy when ``top_k`` is 0.

        Raises:
            ValueError: the task does not generate text (the default).
        """
        raise ValueError(f"the '{self.name}' task does not generate text (mindpet generate needs a causal LM)")

    def write_artifacts(self, network, output_dir):
        """Write task-specific outputs (e.g. sample images) into ``output_dir``; returns the paths written."""
        return []


class KeyValueError(ValueError):
    """A task's complaint about one config key (the runner adds the file name)."""

    def __init__(self, key, message):
        super().__init__(message)
        self.key = key


def _base_names(network):
    """Names a base checkpoint must provide: every parameter except delta/state ones."""
    return [p.name for p in network.get_parameters() if not is_pet_param(p.name)]


def shard_rows(arrays, rank, group_size):
    """Every ``group_size``-th row starting at ``rank`` of each array (a data-parallel shard)."""
    check_int('group_size', group_size, 'shard_rows')
    check_int('rank', rank, 'shard_rows', min_value=0, max_value=group_size - 1)
    if group_size == 1:
        return list(arrays)
    return [array[rank::group_size] for array in arrays]




def train_base(network, loss_net, batches, learning_rate):
    """Train every base parameter of ``network`` (delta/state ones excluded) with Adam on ``batches`` (tuples of
    NumPy arrays for ``loss_net``), for tasks that make their own base model when no pretrained one is given. The
    parameters' ``requires_grad`` flags are restored afterwards (a PET method may have frozen them).

    Returns:
        list[float]: the losses.
    """
    from mindspore import nn, Tensor  # pylint: disable=import-outside-toplevel
    base = [p for p in network.get_parameters() if not is_pet_param(p.name)]
    saved = [p.requires_grad for p in base]
    for param in base:
        param.requires_grad = True
    try:
        step = nn.TrainOneStepCell(loss_net, nn.Adam(base, learning_rate=learning_rate))
        step.set_train()
        losses = [float(step(*[Tensor(a) for a in batch]).asnumpy()) for batch in batches]
    finally:
        for param, flag in zip(base, saved):
            param.requires_grad = flag
        network.set_train(False)
    return losses


def predict_batches(network, arrays, batch_size):
    """Run ``network(*batch)`` over row-aligned NumPy ``arrays`` in batches and concatenate the outputs.

    The last batch is padded (with copies of its last row) to ``batch_size`` so that every call has the same shape
    and one compiled graph serves them all; the padded rows are dropped from the result. The network is put in
    inference mode.

    Returns:
        numpy.ndarray: the outputs for the ``len(arrays[0])`` rows.
    """
    from mindspore import Tensor  # pylint: disable=import-outside-toplevel
    check_int('batch_size', batch_size, 'predict_batches')
    rows = len(arrays[0])
    network.set_train(False)
    outputs = []
    for start in range(0, rows, batch_size):
        chunk = [np.asarray(a[start:start + batch_size]) for a in arrays]
        real = len(chunk[0])
        if real < batch_size:
            chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - real, axis=0)]) for c in chunk]
        outputs.append(network(*[Tensor(c) for c in chunk]).asnumpy()[:real])
    return np.concatenate(outputs)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of float logits ``(N, C)`` against int labels ``(N,)`` (NumPy, float64)."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), np.asarray(labels)].mean())


__all__ = ['Task', 'KeyValueError', 'GENERIC_TASK', 'load_task_class', 'shard_rows', 'train_base',
           'predict_batches', 'softmax_cross_entropy']
