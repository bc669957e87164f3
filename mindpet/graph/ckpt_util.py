"""Adapter-only checkpoints: a ``Model.train`` callback that saves the trainable parameters, the loader that puts a
base checkpoint and a delta checkpoint into one network with every mismatch reported, and resuming a killed run
from the newest complete checkpoint.

Crash safety: every file is written to a temporary name, fsynced and renamed (io_utils.atomic_write), so a killed
writer leaves the previous files intact; older files are pruned only after the new one is durable; ``.ckpt`` files
carry a CRC that is verified on load.
"""
import os
import re
import time
import zlib
from collections import namedtuple

import mindspore as ms
from mindspore import nn
from mindspore.train.callback import Callback, CheckpointConfig

from mindpet.naming import is_delta, is_state
from mindpet.utils.constants import META_PREFIX
from mindpet.utils.exceptions import CheckpointError
from mindpet.utils.io_utils import (atomic_save_checkpoint, ensure_dir, load_checkpoint_file, check_params_fit,
                                    load_params_checked, checkpoint_format, CKPT_FORMATS,
                                    remove_stale_temp_files, checkpoint_write_errors)
from mindpet.utils.validation import check_cell, check_bool, check_safe_name

# Parallel modes in which every rank holds the whole adapter, so rank 0 alone can write it. In (semi-)auto and
# hybrid parallel a parameter may be sliced across ranks and saving it is a collective operation.
_REPLICATED_MODES = ('stand_alone', 'data_parallel')


def distributed_rank():
    """``(rank, group_size)`` of this process: ``(0, 1)`` unless ``mindspore.communication.init()`` has run.

    Example:
        >>> distributed_rank()
        (0, 1)
    """
    from mindspore.communication import GlobalComm, get_rank, get_group_size
    if not GlobalComm.INITED:
        return 0, 1
    return get_rank(), get_group_size()


def _check_directory(owner, directory):
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"For '{owner}', the 'directory' must be a str path, but got {directory!r} "
                        f"({type(directory).__name__}).")
    directory = os.fspath(directory)
    if not directory:
        raise ValueError(f"For '{owner}', the 'directory' must be a non-empty path, but got ''.")
    return directory


def _name_re(prefix, ckpt_format=None):
    formats = [ckpt_format] if ckpt_format else list(CKPT_FORMATS)
    return re.compile(r'^' + re.escape(prefix) + r'-(\d+)_(\d+)\.(' + '|'.join(map(re.escape, formats)) + r')$')


def list_checkpoints(directory, prefix="DELTA_CKP", ckpt_format=None):
    """The complete checkpoint files ``{prefix}-{epoch}_{step}.{ckpt|safetensors}`` in ``directory``, oldest first.

    Temporary files of unfinished writes are never listed. Order: modification time, then epoch and step.

    Example:
        >>> list_checkpoints('out', prefix='lora')  # doctest: +SKIP
        ['out/lora-1_8.ckpt', 'out/lora-1_10.ckpt']
    """
    pattern = _name_re(prefix, ckpt_format)
    found = []
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return []
    for entry in entries:
        match = pattern.match(entry)
        if not match:
            continue
        path = os.path.join(directory, entry)
        try:
            mtime = os.stat(path).st_mtime_ns
        except FileNotFoundError:  # pruned by a writer meanwhile
            continue
        found.append((mtime, int(match.group(1)), int(match.group(2)), path))
    return [item[-1] for item in sorted(found)]


class TrainableParamsCheckPoint(Callback):
    """Save only the network's trainable parameters during ``Model.train`` (a drop-in for ``ModelCheckpoint``).

    Files are named ``{prefix}-{epoch}_{step_in_epoch}.ckpt`` (or ``.safetensors`` with
    ``CheckpointConfig(format='safetensors')``), written atomically (a killed run leaves the previous files whole),
    and pruned to ``keep_checkpoint_max`` only after the new file is on disk. Each file also holds the scalars
    ``mindpet_meta_epoch``, ``mindpet_meta_step_in_epoch``, ``mindpet_meta_step`` (global step),
    ``mindpet_meta_batch_num`` and ``mindpet_meta_optimizer_state`` that :func:`resume_from_checkpoint` reads;
    loaders skip them. Optimizer state (Adam moments, step, learning rate) is left out unless
    ``save_optimizer_state=True``.

    In a distributed job (``mindspore.communication.init()`` done) only rank 0 writes, into ``directory``; the
    other ranks hold the same adapter under data parallel and write nothing. With ``rank_dirs=True`` every rank
    writes into ``directory/rank_<id>`` instead; that is required under (semi-)auto or hybrid parallel, where
    parameters may be sliced across ranks.

    Args:
        directory (str): where to write; relative paths are taken from the current directory; created if needed.
        prefix (str): file name prefix. Default "DELTA_CKP".
        config (CheckpointConfig | None): ``save_checkpoint_steps``, ``save_checkpoint_seconds``,
            ``keep_checkpoint_max``, ``keep_checkpoint_per_n_minutes``, ``saved_network``, ``integrated_save``,
            ``append_info``, ``format`` are honoured. Default ``CheckpointConfig()``.
        save_optimizer_state (bool): also save the training state outside the network (optimizer moments, global
            step, learning rate, loss scale) so that :func:`resume_from_checkpoint` can continue the run exactly.
            Default False.
        rank_dirs (bool): every rank writes into its own ``rank_<id>`` sub-directory. Default False (rank 0 only).

    Raises:
        CheckpointError: a checkpoint cannot be written (disk full, no permission, read-only file system): one line
            naming the file. The files already written stay as they were.
        ValueError: (at train begin) a multi-rank job in a parallel mode that slices parameters without
            ``rank_dirs=True``.

    Example:
        >>> ckpt_cb = TrainableParamsCheckPoint('out', prefix='lora', save_optimizer_state=True,
        ...                                     config=CheckpointConfig(save_checkpoint_steps=10))  # doctest: +SKIP
        >>> model.train(1, dataset, callbacks=[ckpt_cb])  # doctest: +SKIP
    """

    def __init__(self, directory, prefix="DELTA_CKP", config=None, save_optimizer_state=False, rank_dirs=False):
        super().__init__()
        owner = 'TrainableParamsCheckPoint'
        directory = _check_directory(owner, directory)
        check_safe_name('prefix', prefix, owner, what='file name')
        if config is None:
            config = CheckpointConfig()
        if not isinstance(config, CheckpointConfig):
            raise TypeError(f"For '{owner}', the 'config' must be a mindspore CheckpointConfig or None, but got "
                            f"{config!r} ({type(config).__name__}).")
        check_bool('save_optimizer_state', save_optimizer_state, owner)
        check_bool('rank_dirs', rank_dirs, owner)
        self.directory = os.path.abspath(directory)
        self.prefix = prefix
        self.config = config
        self.save_optimizer_state = save_optimizer_state
        self.rank_dirs = rank_dirs
        self.format = getattr(config, 'format', 'ckpt') or 'ckpt'
        # Resolved at train begin, when the communication group is known.
        self.rank, self.group_size = 0, 1
        self.save_dir = os.path.join(self.directory, 'rank_0') if rank_dirs else self.directory
        self.is_writer = True
        self.saved_files = []
        self.latest_ckpt_file_name = None
        self._last_saved_step = 0
        self._last_saved_time = time.time()

    # ----- callback hooks ------------------------------------------------------------------------------------
    def on_train_begin(self, run_context):
        self.rank, self.group_size = distributed_rank()
        if self.rank_dirs:
            self.save_dir = os.path.join(self.directory, f'rank_{self.rank}')
            self.is_writer = True
        else:
            mode = ms.get_auto_parallel_context('parallel_mode')
            if self.group_size > 1 and mode not in _REPLICATED_MODES:
                raise ValueError(f"For 'TrainableParamsCheckPoint', parallel_mode {mode!r} may slice parameters "
                                 f"across the {self.group_size} ranks, so rank 0 alone cannot save them; pass "
                                 f"'rank_dirs=True' (one directory per rank).")
            self.save_dir = self.directory
            self.is_writer = self.rank == 0
        if self.is_writer:
            ensure_dir(self.save_dir, what='checkpoint directory')
            remove_stale_temp_files(self.save_dir, self.prefix + '-')
        self._last_saved_time = time.time()

    def on_train_step_end(self, run_context):
        cb_params = run_context.original_args()
        step = self._position(cb_params)[2]
        steps, seconds = self.config.save_checkpoint_steps, self.config.save_checkpoint_seconds
        due = (steps and step % steps == 0) or (seconds and time.time() - self._last_saved_time >= seconds)
        if due and step != self._last_saved_step:
            self._save(cb_params)

    def on_train_end(self, run_context):
        cb_params = run_context.original_args()
        if cb_params.cur_step_num and self._position(cb_params)[2] != self._last_saved_step:
            self._save(cb_params)

    # ----- saving --------------------------------------------------------------------------------------------
    @staticmethod
    def _position(cb_params):
        """(epoch, step_in_epoch, global_step, batch_num); the global step counts from the first epoch even when
        Model.train was started with initial_epoch (its cur_step_num restarts at 0)."""
        batch_num = max(int(cb_params.batch_num or 1), 1)
        step_in_epoch = (int(cb_params.cur_step_num) - 1) % batch_num + 1
        epoch = int(cb_params.cur_epoch_num)
        return epoch, step_in_epoch, (epoch - 1) * batch_num + step_in_epoch, batch_num

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
        if not self.is_writer:
            return
        epoch, step_in_epoch, step, batch_num = self._position(cb_params)
        name = f"{self.prefix}-{epoch}_{step_in_epoch}.{self.format}"
        path = os.path.join(self.save_dir, name)
        params = self.params_to_save(cb_params)
        if not params:
            raise ValueError("For 'TrainableParamsCheckPoint', the network has no trainable parameter to save; "
                             "freeze_delta()/freeze_modules() left nothing trainable.")
        # User append_info may hold str values, which safetensors cannot store.
        append = dict(self.config.append_dict or {}) if self.format == 'ckpt' else {}
        if 'epoch_num' in append:
            append['epoch_num'] = epoch
        if 'step_num' in append:
            append['step_num'] = step
        append.update({META_PREFIX + 'epoch': epoch, META_PREFIX + 'step_in_epoch': step_in_epoch,
                       META_PREFIX + 'step': step, META_PREFIX + 'batch_num': batch_num,
                       META_PREFIX + 'optimizer_state': int(self.save_optimizer_state)})
        batch = cb_params.get('train_dataset_element') if isinstance(cb_params, dict) else None
        if batch is not None:
            # Lets a resumed run check that replaying the data pipeline gives the batches this run saw.
            append[META_PREFIX + 'batch_crc'] = batch_checksum(batch)
        with checkpoint_write_errors(path):
            atomic_save_checkpoint(params, path, ckpt_format=self.format, append_dict=append,
                                   integrated_save=self.config.integrated_save)
        self._last_saved_step = step
        self._last_saved_time = time.time()
        self.latest_ckpt_file_name = path
        if path in self.saved_files:
            self.saved_files.remove(path)
        self.saved_files.append(path)
        # Only now, with the new file renamed into place and the directory synced, may older files go.
        self._prune()

    def _prune(self):
        files = list_checkpoints(self.save_dir, self.prefix, self.format)
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
            with checkpoint_write_errors(path):
                os.remove(path)
            if path in self.saved_files:
                self.saved_files.remove(path)


def batch_checksum(batch):
    """CRC-32 of a training batch (a Tensor/array or a sequence of them): the bytes, shapes and dtypes.

    Example:
        >>> batch_checksum([np.zeros((2, 3), np.float32)])  # doctest: +SKIP
        1781943285
    """
    import numpy as np  # pylint: disable=import-outside-toplevel
    items = batch if isinstance(batch, (list, tuple)) else [batch]
    crc = 0
    for item in items:
        array = np.ascontiguousarray(item.asnumpy() if hasattr(item, 'asnumpy') else np.asarray(item))
        crc = zlib.crc32(f"{array.dtype}{array.shape}".encode(), crc)
        crc = zlib.crc32(array.tobytes(), crc)
    return crc


def _optimizer_state_names(network):
    """Names of the optimizer-owned state (moments, step, learning rate) inside ``network``."""
    names = set()
    for _, cell in network.cells_and_names():
        if isinstance(cell, nn.Optimizer):
            trained = {p.name for p in cell.parameters}
            names.update(p.name for p in cell.get_parameters() if p.name not in trained)
    return names


class ResumeState(namedtuple('ResumeState', ['path', 'epoch', 'step_in_epoch', 'step', 'batch_num',
                                             'adapter_loaded', 'optimizer_loaded', 'skipped', 'batch_crc'],
                             defaults=(None,))):
    """What :func:`resume_from_checkpoint` restored.

    Attributes:
        path (str): the checkpoint loaded.
        epoch, step_in_epoch (int): its position (from the file, else from its name).
        step (int | None): global step (None for files not written by :class:`TrainableParamsCheckPoint`).
        batch_num (int | None): steps per epoch of the run that wrote it.
        adapter_loaded (list[str]): network parameter names loaded.
        optimizer_loaded (list[str]): training-state names loaded into ``optimizer`` (empty when the file has none).
        skipped (list[tuple[str, str]]): newer files that could not be read, with the reason.
        batch_crc (int | None): :func:`batch_checksum` of the last batch trained before the file was written (None
            when the writer did not see the batch).
    """
    __slots__ = ()

    @property
    def initial_epoch(self):
        """Epochs completed: pass as ``Model.train(..., initial_epoch=state.initial_epoch)``."""
        if self.batch_num and self.step_in_epoch < self.batch_num:
            return self.epoch - 1
        return self.epoch


def _scalar(value):
    return int(value.asnumpy().reshape(-1)[0])


def split_meta(param_dict):
    """Split a loaded checkpoint into (parameters, metadata ints): ``mindpet_meta_*`` entries are metadata."""
    params = {k: v for k, v in param_dict.items() if not k.startswith(META_PREFIX)}
    meta = {k[len(META_PREFIX):]: _scalar(v) for k, v in param_dict.items() if k.startswith(META_PREFIX)}
    return params, meta


def find_latest_checkpoint(directory, prefix="DELTA_CKP", verify=True):
    """The newest complete checkpoint ``{prefix}-{epoch}_{step}.*`` in ``directory``, or None if there is none.

    Temporary files of interrupted writes are ignored. With ``verify`` each candidate is read (CRC checked for
    ``.ckpt``) and an unreadable one is passed over for the next older one.

    Example:
        >>> find_latest_checkpoint('out', prefix='lora')  # doctest: +SKIP
        'out/lora-3_10.ckpt'
    """
    owner = 'find_latest_checkpoint'
    directory = _check_directory(owner, directory)
    check_safe_name('prefix', prefix, owner, what='file name')
    check_bool('verify', verify, owner)
    if not verify:
        files = list_checkpoints(directory, prefix)
        return files[-1] if files else None
    path, _, _ = _newest_readable(directory, prefix)
    return path


def _newest_readable(directory, prefix):
    skipped = []
    for path in reversed(list_checkpoints(directory, prefix)):
        try:
            return path, load_checkpoint_file(path, what='checkpoint'), skipped
        except CheckpointError as ex:
            skipped.append((path, str(ex)))
    return None, None, skipped


def resume_from_checkpoint(directory, network, optimizer=None, prefix="DELTA_CKP"):
    """Load the newest complete checkpoint of ``directory`` into ``network`` (and ``optimizer``) to continue a run.

    The adapter (every trainable parameter of ``network``) must be in the file with its shape. When the file was
    written with ``save_optimizer_state=True`` and ``optimizer`` is given, the training state (moments, global
    step, learning rate, ...) is loaded into ``optimizer`` too; all of it must be present.

    Args:
        directory (str): the checkpoint directory (with ``rank_dirs=True``: ``directory/rank_<id>``).
        network (nn.Cell): the network with its delta Cells, frozen as for training.
        optimizer (nn.Cell | None): the optimizer, or a Cell holding it (``TrainOneStepCell``,
            ``model.train_network``).
        prefix (str): the file prefix given to :class:`TrainableParamsCheckPoint`.

    Returns:
        ResumeState | None: None when the directory holds no checkpoint (start from scratch).

    Raises:
        CheckpointError: checkpoints exist but none can be read, or the newest readable one does not fit.

    Example:
        >>> state = resume_from_checkpoint('out', net, model.train_network)  # doctest: +SKIP
        >>> model.train(10, ds, callbacks=[cb], initial_epoch=state.initial_epoch if state else 0)  # doctest: +SKIP
    """
    owner = 'resume_from_checkpoint'
    directory = _check_directory(owner, directory)
    check_cell('network', network, owner)
    if optimizer is not None:
        check_cell('optimizer', optimizer, owner)
    check_safe_name('prefix', prefix, owner, what='file name')
    path, loaded, skipped = _newest_readable(directory, prefix)
    if path is None:
        if skipped:
            raise CheckpointError(f"None of the {len(skipped)} checkpoint(s) '{prefix}-*' in '{directory}' can be "
                                  f"read; newest: {skipped[0][1]}")
        return None
    params, meta = split_meta(loaded)
    net_names = {p.name for p in network.get_parameters()}
    adapter = {k: v for k, v in params.items() if k in net_names}
    adapter_loaded = load_params_checked(network, adapter, path,
                                         require=[p.name for p in network.trainable_params()])
    optimizer_loaded = []
    if optimizer is not None and meta.get('optimizer_state'):
        opt_names = {p.name for p in optimizer.get_parameters()}
        state = {k: v for k, v in params.items() if k in opt_names and k not in net_names}
        optimizer_loaded = load_params_checked(optimizer, state, path,
                                               require=sorted(opt_names - net_names))
    match = _name_re(prefix).match(os.path.basename(path))
    return ResumeState(path, meta.get('epoch', int(match.group(1))), meta.get('step_in_epoch', int(match.group(2))),
                       meta.get('step'), meta.get('batch_num'), adapter_loaded, optimizer_loaded, skipped,
                       meta.get('batch_crc'))


LoadReport = namedtuple('LoadReport', ['base_loaded', 'delta_loaded', 'base_ignored', 'delta_ignored'],
                        defaults=((),))


def load_base_and_delta(net, base_ckpt, delta_ckpt, strict_base=False):
    """Load a base checkpoint, then a delta (adapter) checkpoint, into ``net``, checking both first.

    Nothing is loaded unless both files fit: every delta parameter of ``net`` (``*mindpet_delta_*``) must be in the
    delta file with its shape, the delta file may hold no name the network lacks, and every other parameter must
    come from one of the two files. Names in the base file that the network lacks (e.g. optimizer state saved by
    ``ModelCheckpoint``) are ignored and reported, unless ``strict_base``. A delta file written by
    :class:`TrainableParamsCheckPoint` may also hold its metadata and training state (``save_optimizer_state``):
    those are ignored and reported as ``delta_ignored``.

    Args:
        net (nn.Cell): the network, already built with its delta Cells.
        base_ckpt (str): path of the base model's ``.ckpt``/``.safetensors``.
        delta_ckpt (str): path of the file written by :class:`TrainableParamsCheckPoint` (or ``save_checkpoint``).
        strict_base (bool): refuse base files holding names the network does not have.

    Returns:
        LoadReport: names loaded from each file, and names of each file ignored.

    Raises:
        CheckpointError: a file is missing/corrupt, or a name or shape does not fit.

    Example:
        >>> report = load_base_and_delta(net, 'base.ckpt', 'out/DELTA_CKP-1_20.ckpt')  # doctest: +SKIP
    """
    owner = 'load_base_and_delta'
    check_cell('net', net, owner)
    check_bool('strict_base', strict_base, owner)
    base = load_checkpoint_file(base_ckpt, what='base checkpoint')
    delta, meta = split_meta(load_checkpoint_file(delta_ckpt, what='delta checkpoint'))
    net_names = [p.name for p in net.get_parameters()]
    delta_required = [n for n in net_names if is_delta(n)]
    # Files from the callback carry metadata; only those may hold training state next to the adapter.
    delta_ignored = sorted(n for n in delta if n not in set(net_names)) if meta else []
    delta = {k: v for k, v in delta.items() if k not in set(delta_ignored)}
    check_params_fit(net, delta, delta_ckpt, require=delta_required)
    check_params_fit(net, base, base_ckpt, allow_unexpected=not strict_base)
    missing = [n for n in net_names if n not in base and n not in delta and not is_state(n)]
    if missing:
        raise CheckpointError(f"Neither '{base_ckpt}' nor '{delta_ckpt}' holds {len(missing)} parameter(s) of the "
                              f"network, first: {missing[:5]}.")
    ignored = sorted(n for n in base if n not in set(net_names))
    base_loaded = load_params_checked(net, {k: v for k, v in base.items() if k not in delta}, base_ckpt,
                                      allow_unexpected=True)
    delta_loaded = load_params_checked(net, delta, delta_ckpt)
    return LoadReport(base_loaded, delta_loaded, ignored, delta_ignored)


def save_trainable_params(net, path, ckpt_format=None):
    """Save ``net``'s trainable parameters to ``path`` atomically (format from the extension unless given).

    Example:
        >>> save_trainable_params(net, 'out/adapter.ckpt')  # doctest: +SKIP
    """
    check_cell('net', net, 'save_trainable_params')
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"For 'save_trainable_params', the 'path' must be a non-empty str path, but got {path!r} "
                        f"({type(path).__name__}).")
    params = net.trainable_params()
    if not params:
        raise ValueError("For 'save_trainable_params', the network has no trainable parameter to save.")
    with checkpoint_write_errors(path):
        return atomic_save_checkpoint(params, path, ckpt_format=ckpt_format or checkpoint_format(path))
