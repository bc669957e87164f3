"""Adapter-only checkpoints: a ``Model.train`` callback that saves the trainable parameters, and the loader that
puts a base checkpoint and a delta checkpoint into one network with every mismatch reported.
"""
import os
import re
import time
from collections import namedtuple

from mindspore import nn
from mindspore.train.callback import Callback, CheckpointConfig

from mindpet.utils.constants import DELTA_PREFIX
from mindpet.utils.exceptions import CheckpointError
from mindpet.utils.io_utils import (atomic_save_checkpoint, ensure_dir, load_checkpoint_file, check_params_fit,
                                    load_params_checked, is_state_param, checkpoint_format)
from mindpet.utils.validation import check_cell, check_bool

_PREFIX_RE = re.compile(r'^[A-Za-z0-9_.\-]+$')


class TrainableParamsCheckPoint(Callback):
    """Save only the network's trainable parameters during ``Model.train`` (a drop-in for ``ModelCheckpoint``).

    Files are named ``{prefix}-{epoch}_{step_in_epoch}.ckpt`` (or ``.safetensors`` with
    ``CheckpointConfig(format='safetensors')``), written atomically, and pruned to ``keep_checkpoint_max``.
    Optimizer state (Adam moments, step, learning rate) is left out unless ``save_optimizer_state=True``.

    Args:
        directory (str): where to write; relative paths are taken from the current directory; created if needed.
        prefix (str): file name prefix. Default "DELTA_CKP".
        config (CheckpointConfig | None): ``save_checkpoint_steps``, ``save_checkpoint_seconds``,
            ``keep_checkpoint_max``, ``keep_checkpoint_per_n_minutes``, ``saved_network``, ``integrated_save``,
            ``append_info``, ``format`` are honoured. Default ``CheckpointConfig()``.
        save_optimizer_state (bool): also save the optimizer's parameters (for resuming). Default False.

    Example:
        >>> ckpt_cb = TrainableParamsCheckPoint('out', prefix='lora',
        ...                                     config=CheckpointConfig(save_checkpoint_steps=10))  # doctest: +SKIP
        >>> model.train(1, dataset, callbacks=[ckpt_cb])  # doctest: +SKIP
    """

    def __init__(self, directory, prefix="DELTA_CKP", config=None, save_optimizer_state=False):
        super().__init__()
        owner = 'TrainableParamsCheckPoint'
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"For '{owner}', the 'directory' must be a str path, but got {directory!r} "
                            f"({type(directory).__name__}).")
        directory = os.fspath(directory)
        if not directory:
            raise ValueError(f"For '{owner}', the 'directory' must be a non-empty path, but got ''.")
        if not isinstance(prefix, str):
            raise TypeError(f"For '{owner}', the 'prefix' must be a str, but got {prefix!r} "
                            f"({type(prefix).__name__}).")
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"For '{owner}', the 'prefix' must be a non-empty file name of letters, digits, "
                             f"'_', '-' or '.', but got {prefix!r}.")
        if config is None:
            config = CheckpointConfig()
        if not isinstance(config, CheckpointConfig):
            raise TypeError(f"For '{owner}', the 'config' must be a mindspore CheckpointConfig or None, but got "
                            f"{config!r} ({type(config).__name__}).")
        check_bool('save_optimizer_state', save_optimizer_state, owner)
        self.directory = os.path.abspath(directory)
        self.prefix = prefix
        self.config = config
        self.save_optimizer_state = save_optimizer_state
        self.format = getattr(config, 'format', 'ckpt') or 'ckpt'
        self.saved_files = []
        self.latest_ckpt_file_name = None
        self._last_saved_step = 0
        self._last_saved_time = time.time()
        self._name_re = re.compile(r'^' + re.escape(prefix) + r'-(\d+)_(\d+)\.' + re.escape(self.format) + r'$')

    # ----- callback hooks ------------------------------------------------------------------------------------
    def on_train_begin(self, run_context):
        ensure_dir(self.directory, what='checkpoint directory')
        self._last_saved_time = time.time()

    def on_train_step_end(self, run_context):
        cb_params = run_context.original_args()
        step = cb_params.cur_step_num
        steps, seconds = self.config.save_checkpoint_steps, self.config.save_checkpoint_seconds
        due = (steps and step % steps == 0) or (seconds and time.time() - self._last_saved_time >= seconds)
        if due and step != self._last_saved_step:
            self._save(cb_params)

    def on_train_end(self, run_context):
        cb_params = run_context.original_args()
        if cb_params.cur_step_num != self._last_saved_step:
            self._save(cb_params)

    # ----- saving --------------------------------------------------------------------------------------------
    def params_to_save(self, cb_params):
        """The list of Parameters a checkpoint holds for this training state."""
        network = self.config.saved_network or cb_params.network
        # Model(TrainOneStepCell(net, opt)) hands the callback the whole train cell, whose trainable_params()
        # also list the optimizer's moments, step and learning rate: those are optimizer state, not the adapter.
        optimizer_state = _optimizer_state_names(network)
        params = [p for p in network.trainable_params() if p.name not in optimizer_state]
        if self.save_optimizer_state:
            seen = {p.name for p in params}
            train_network = cb_params.train_network or network
            params += [p for p in train_network.get_parameters()
                       if p.name not in seen and p.name in _optimizer_state_names(train_network)]
        return params

    def _save(self, cb_params):
        batch_num = max(int(cb_params.batch_num or 1), 1)
        step_in_epoch = (cb_params.cur_step_num - 1) % batch_num + 1
        name = f"{self.prefix}-{cb_params.cur_epoch_num}_{step_in_epoch}.{self.format}"
        path = os.path.join(self.directory, name)
        append = self.config.append_dict
        params = self.params_to_save(cb_params)
        if not params:
            raise ValueError("For 'TrainableParamsCheckPoint', the network has no trainable parameter to save; "
                             "freeze_delta()/freeze_modules() left nothing trainable.")
        atomic_save_checkpoint(params, path, ckpt_format=self.format,
                               append_dict=append if self.format == 'ckpt' else None,
                               integrated_save=self.config.integrated_save)
        self._last_saved_step = cb_params.cur_step_num
        self._last_saved_time = time.time()
        self.latest_ckpt_file_name = path
        if path in self.saved_files:
            self.saved_files.remove(path)
        self.saved_files.append(path)
        self._prune()

    def _existing(self):
        found = []
        for entry in os.listdir(self.directory):
            match = self._name_re.match(entry)
            if match:
                path = os.path.join(self.directory, entry)
                found.append((os.path.getmtime(path), int(match.group(1)), int(match.group(2)), path))
        return [item[-1] for item in sorted(found)]

    def _prune(self):
        files = self._existing()
        keep_max = self.config.keep_checkpoint_max
        per_minutes = self.config.keep_checkpoint_per_n_minutes
        doomed = []
        if keep_max:
            doomed = files[:-keep_max]
        elif per_minutes:
            last_kept = None
            for path in files[:-1]:
                mtime = os.path.getmtime(path)
                if last_kept is not None and mtime - last_kept < per_minutes * 60:
                    doomed.append(path)
                else:
                    last_kept = mtime
        for path in doomed:
            os.remove(path)
            if path in self.saved_files:
                self.saved_files.remove(path)


def _optimizer_state_names(network):
    """Names of the optimizer-owned state (moments, step, learning rate) inside ``network``."""
    names = set()
    for _, cell in network.cells_and_names():
        if isinstance(cell, nn.Optimizer):
            trained = {p.name for p in cell.parameters}
            names.update(p.name for p in cell.get_parameters() if p.name not in trained)
    return names


LoadReport = namedtuple('LoadReport', ['base_loaded', 'delta_loaded', 'base_ignored'])


def load_base_and_delta(net, base_ckpt, delta_ckpt, strict_base=False):
    """Load a base checkpoint, then a delta (adapter) checkpoint, into ``net``, checking both first.

    Nothing is loaded unless both files fit: every delta parameter of ``net`` (``*mindpet_delta_*``) must be in the
    delta file with its shape, the delta file may hold no name the network lacks, and every other parameter must
    come from one of the two files. Names in the base file that the network lacks (e.g. optimizer state saved by
    ``ModelCheckpoint``) are ignored and reported, unless ``strict_base``.

    Args:
        net (nn.Cell): the network, already built with its delta Cells.
        base_ckpt (str): path of the base model's ``.ckpt``/``.safetensors``.
        delta_ckpt (str): path of the file written by :class:`TrainableParamsCheckPoint` (or ``save_checkpoint``).
        strict_base (bool): refuse base files holding names the network does not have.

    Returns:
        LoadReport: names loaded from each file and base names ignored.

    Raises:
        CheckpointError: a file is missing/corrupt, or a name or shape does not fit.

    Example:
        >>> report = load_base_and_delta(net, 'base.ckpt', 'out/DELTA_CKP-1_20.ckpt')  # doctest: +SKIP
    """
    owner = 'load_base_and_delta'
    check_cell('net', net, owner)
    check_bool('strict_base', strict_base, owner)
    base = load_checkpoint_file(base_ckpt, what='base checkpoint')
    delta = load_checkpoint_file(delta_ckpt, what='delta checkpoint')
    net_names = [p.name for p in net.get_parameters()]
    delta_required = [n for n in net_names if DELTA_PREFIX in n.rsplit('.', 1)[-1]]
    check_params_fit(net, delta, delta_ckpt, require=delta_required)
    check_params_fit(net, base, base_ckpt, allow_unexpected=not strict_base)
    missing = [n for n in net_names if n not in base and n not in delta and not is_state_param(n)]
    if missing:
        raise CheckpointError(f"Neither '{base_ckpt}' nor '{delta_ckpt}' holds {len(missing)} parameter(s) of the "
                              f"network, first: {missing[:5]}.")
    ignored = sorted(n for n in base if n not in set(net_names))
    base_loaded = load_params_checked(net, {k: v for k, v in base.items() if k not in delta}, base_ckpt,
                                      allow_unexpected=True)
    delta_loaded = load_params_checked(net, delta, delta_ckpt)
    return LoadReport(base_loaded, delta_loaded, ignored)


def save_trainable_params(net, path, ckpt_format=None):
    """Save ``net``'s trainable parameters to ``path`` atomically (format from the extension unless given).

    Example:
        >>> save_trainable_params(net, 'out/adapter.ckpt')  # doctest: +SKIP
    """
    check_cell('net', net, 'save_trainable_params')
    params = net.trainable_params()
    if not params:
        raise ValueError("For 'save_trainable_params', the network has no trainable parameter to save.")
    return atomic_save_checkpoint(params, path, ckpt_format=ckpt_format or checkpoint_format(path))
