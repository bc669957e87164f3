"""File I/O in one place: atomic checkpoint writes, checked checkpoint reads, and safe YAML reads.

Every writer here goes to a temporary file in the destination directory, is flushed to disk, then renamed over the
destination, so a crash (or SIGKILL) mid-write leaves either the previous file or the new one, never a torn file.
"""
import contextlib
import errno
import logging
import os
import re
import tempfile

import yaml

from mindpet.utils.constants import MAX_YAML_MB_SIZE, MAX_YAML_DEPTH, MB_SIZE
from mindpet.utils.exceptions import (CheckpointError, LinkPathError, ReadYamlFileError, FileOversizeError,
                                      MakeDirError, MindPetError)

CKPT_FORMATS = ('ckpt', 'safetensors')


def fsync_dir(directory):
    """Make the directory's entries (a rename, an unlink) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_dir(directory, what='directory'):
    """Create ``directory`` (and parents) if needed; raise :class:`MakeDirError` naming it on failure."""
    if os.path.islink(directory):
        raise LinkPathError(f"The {what} '{directory}' is a symbolic link; give the real path.")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise MakeDirError(f"The {what} '{directory}' exists but is not a directory.")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as ex:
        raise MakeDirError(f"Could not create the {what} '{directory}': {ex.strerror or ex}.") from ex
    if not os.path.isdir(directory):
        raise MakeDirError(f"The {what} '{directory}' exists but is not a directory.")
    return directory


def current_umask():
    """The process's file-creation mask, read without changing it (``os.umask`` can only be read by setting it,
    which would race with other threads creating files)."""
    try:
        with open('/proc/self/status', encoding='ascii') as handle:
            for line in handle:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write_fn, suffix=''):
    """Write ``path`` atomically: ``write_fn(tmp_path)`` writes a temporary file beside it, which is fsynced and
    renamed onto ``path``. ``suffix`` is kept on the temporary name for writers that insist on an extension."""
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"Cannot write '{path}': it is a directory; give a file path")
    directory = os.path.dirname(os.path.abspath(path))
    ensure_dir(directory)
    # The writer's pid is part of the temporary name so that remove_stale_temp_files() can tell a file left by a
    # killed writer from one that a live process is still writing.
    try:
        fd, tmp_path = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.{os.getpid()}.', suffix='.tmp' + suffix,
                                        dir=directory)
    except OSError as ex:  # name the destination, not the temporary file
        raise type(ex)(ex.errno, f"Cannot write '{path}': {ex.strerror} (directory '{directory}')") from ex
    os.close(fd)
    try:
        write_fn(tmp_path)
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        # mkstemp creates 0600; the destination gets what open() would have given it (0666 minus the umask).
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    fsync_dir(directory)
    return path


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_temp_files(directory, name_prefix=''):
    """Remove temporary files that :func:`atomic_write` left in ``directory`` when its writer was killed.

    Only files for destinations starting with ``name_prefix`` whose writing process no longer exists (on this host)
    are removed; a file still being written by a live process is kept. Returns the removed paths.
    """
    pattern = re.compile(r'^\.' + re.escape(name_prefix) + r'.*\.(\d+)\.[^.]+\.tmp(\.[A-Za-z0-9]+)?$')
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            path = os.path.join(directory, entry)
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def atomic_save_checkpoint(save_obj, path, ckpt_format='ckpt', append_dict=None, integrated_save=True,
                           **kwargs):
    """Save ``save_obj`` (list of Parameters, dict name->Parameter/Tensor, or Cell) with
    :func:`mindspore.save_checkpoint`, atomically. Returns ``path``.

    ``.ckpt`` files carry MindSpore's CRC (``crc_check=True`` unless given), which :func:`load_checkpoint_file`
    verifies, so a file damaged after it was written is refused instead of loading wrong numbers.

    A failed write leaves the previous file at ``path`` as it was and no temporary file behind (MindSpore's own
    ``.tmp`` included); the error propagates unchanged (:func:`checkpoint_write_errors` turns storage errors into
    :class:`CheckpointError`).

    Example:
        >>> atomic_save_checkpoint(net.trainable_params(), "out/adapter.ckpt")  # doctest: +SKIP
    """
    import mindspore as ms
    if ckpt_format not in CKPT_FORMATS:
        raise ValueError(f"For 'atomic_save_checkpoint', the 'ckpt_format' must be one of {list(CKPT_FORMATS)}, "
                         f"but got {ckpt_format!r}.")
    ext = '.' + ckpt_format
    if ckpt_format == 'ckpt':
        kwargs.setdefault('crc_check', True)

    def _write(tmp_path):
        try:
            ms.save_checkpoint(save_obj, tmp_path, integrated_save=integrated_save, append_dict=append_dict,
                               format=ckpt_format, **kwargs)
        finally:
            # MindSpore writes '<name>.tmp' first and renames it; a failed write leaves that file behind.
            own_tmp = os.path.splitext(tmp_path)[0] + '.tmp'
            if own_tmp != tmp_path and os.path.exists(own_tmp):
                os.remove(own_tmp)
        # save_checkpoint appends the extension when it is missing; keep whatever name it actually wrote.
        if not os.path.exists(tmp_path) and os.path.exists(tmp_path + ext):
            os.replace(tmp_path + ext, tmp_path)

    with _mindspore_errors_muted():     # its "Failed to save the checkpoint" line would double the error
        return atomic_write(path, _write, suffix=ext)


def write_failure_reason(error):
    """Why a write failed, as one line, for errors of the storage (disk full, permission, read-only file system,
    file too large); None for any other error, which should propagate as it is.

    safetensors reports I/O errors as ``SafetensorError`` with the OS error code inside its text.
    """
    if isinstance(error, (IsADirectoryError, NotADirectoryError)):
        return None   # a wrong path argument, not a storage failure
    if isinstance(error, OSError):
        text = error.strerror or str(error)
        return f"{text} (errno {error.errno})" if error.errno else text
    if type(error).__name__ == 'SafetensorError':
        match = re.search(r'code: (\d+)', str(error))
        if match:
            code = int(match.group(1))
            return f"{os.strerror(code)} (errno {code})"
        return ' '.join(str(error).split())
    return None


@contextlib.contextmanager
def checkpoint_write_errors(path):
    """Turn a storage error inside the block (see :func:`write_failure_reason`) into one
    :class:`CheckpointError` line naming ``path``; other errors pass unchanged.

    Example:
        >>> with checkpoint_write_errors('out/a.ckpt'):  # doctest: +SKIP
        ...     atomic_save_checkpoint(params, 'out/a.ckpt')
    """
    try:
        yield
    except (MindPetError, TypeError, ValueError):
        raise
    except Exception as ex:  # pylint: disable=broad-except
        reason = write_failure_reason(ex)
        if reason is None:
            raise
        raise CheckpointError(f"Cannot write the checkpoint '{os.fspath(path)}': {reason}.") from ex


def checkpoint_format(path):
    """'safetensors' for ``*.safetensors`` files, otherwise 'ckpt'."""
    return 'safetensors' if str(path).endswith('.safetensors') else 'ckpt'


def _check_readable_file(path, what, error):
    """Raise ``error`` naming ``path`` when it is missing, a directory, or cannot be opened for reading (MindSpore's
    own message for an unreadable checkpoint suggests corruption)."""
    if os.path.isdir(path):
        raise error(f"The {what} file '{path}' is a directory, not a file.")
    if not os.path.isfile(path):
        raise error(f"The {what} file '{path}' does not exist.")
    try:
        with open(path, 'rb'):
            pass
    except OSError as ex:
        raise error(f"The {what} file '{path}' cannot be read: {ex.strerror or ex}.") from ex


class _DropErrors(logging.Filter):
    def filter(self, record):
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def _mindspore_errors_muted():
    """MindSpore logs an ERROR line to stderr before raising on a corrupt checkpoint; the raised error is reported
    (as CheckpointError, with its text) instead, so a failed load prints one message, not two."""
    try:
        from mindspore import log as ms_log  # pylint: disable=import-outside-toplevel
        logger = ms_log._get_logger()  # pylint: disable=protected-access
    except (ImportError, AttributeError):
        yield
        return
    muted = _DropErrors()
    logger.addFilter(muted)
    try:
        yield
    finally:
        logger.removeFilter(muted)


def load_checkpoint_file(path, what='checkpoint'):
    """Read a checkpoint (``.ckpt`` or ``.safetensors``) into a dict name -> Parameter.

    Raises :class:`CheckpointError` naming the file when it is missing, a link, empty, truncated or corrupt (for
    ``.ckpt`` files written with a CRC, any changed byte is detected).
    """
    import mindspore as ms
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"The {what} path must be a str or os.PathLike, but got {path!r} ({type(path).__name__}).")
    path = os.fspath(path)
    if os.path.islink(path):
        raise LinkPathError(f"The {what} file '{path}' is a symbolic link; give the real path.")
    _check_readable_file(path, what, CheckpointError)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"The {what} file '{path}' is empty.")
    try:
        ckpt_format = checkpoint_format(path)
        # crc_check=True verifies files that carry a CRC and is a no-op for files written without one.
        extra = {'crc_check': True} if ckpt_format == 'ckpt' else {}
        with _mindspore_errors_muted():
            params = ms.load_checkpoint(path, format=ckpt_format, **extra)
    except Exception as ex:  # MindSpore raises ValueError/RuntimeError/OSError for torn or foreign files
        raise CheckpointError(f"The {what} file '{path}' could not be read (truncated or corrupt?): "
                              f"{str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__}") \
            from ex
    if not params:
        raise CheckpointError(f"The {what} file '{path}' holds no parameters.")
    return params


def check_params_fit(net, param_dict, source, require=None, allow_unexpected=False):
    """Check that ``param_dict`` fits ``net`` before loading anything.

    Args:
        net (Cell): the network.
        param_dict (dict): name -> Parameter/Tensor, as read from ``source``.
        source (str): what to call the dict in messages (usually the file path).
        require (Iterable[str] | None): names that must be present in ``param_dict``.
        allow_unexpected (bool): accept names the network does not have.

    Raises:
        CheckpointError: a required name is missing, a name is unknown to the network, or a shape differs.
    """
    net_params = {p.name: p for p in net.get_parameters()}
    unexpected = [name for name in param_dict if name not in net_params]
    if unexpected and not allow_unexpected:
        raise CheckpointError(f"'{source}' holds {len(unexpected)} parameter(s) the network does not have, "
                              f"first: {sorted(unexpected)[:5]}.")
    for name, value in param_dict.items():
        if name in net_params and tuple(value.shape) != tuple(net_params[name].shape):
            raise CheckpointError(f"Parameter '{name}' in '{source}' has shape {tuple(value.shape)}, "
                                  f"but the network's has shape {tuple(net_params[name].shape)}.")
    if require is not None:
        missing = [name for name in require if name not in param_dict]
        if missing:
            raise CheckpointError(f"'{source}' lacks {len(missing)} parameter(s) the network needs, "
                                  f"first: {sorted(missing)[:5]}.")


def load_params_checked(net, param_dict, source, require=None, allow_unexpected=False):
    """:func:`check_params_fit`, then ``load_param_into_net``; returns the list of names loaded."""
    import mindspore as ms
    check_params_fit(net, param_dict, source, require=require, allow_unexpected=allow_unexpected)
    net_names = {p.name for p in net.get_parameters()}
    to_load = {k: v for k, v in param_dict.items() if k in net_names}
    not_loaded, _ = ms.load_param_into_net(net, to_load, strict_load=True)
    failed = [n for n in not_loaded if n in to_load]
    if failed:
        raise CheckpointError(f"Parameters from '{source}' could not be loaded: {failed[:5]}.")
    return sorted(to_load)


class _CheckedYamlLoader(yaml.SafeLoader):  # pylint: disable=too-many-ancestors
    """``yaml.SafeLoader`` that refuses duplicate mapping keys (PyYAML keeps the last one silently) and nesting
    deeper than :data:`MAX_YAML_DEPTH` (PyYAML's composer recurses once per level, so a deep file would otherwise end
    in a RecursionError thousands of lines long)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"nesting deeper than {MAX_YAML_DEPTH} levels at line {mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_nodes = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                try:
                    first = first_nodes.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader reports it itself
                    continue
                if first is not key_node:
                    raise yaml.YAMLError(f"duplicate key {key!r} at lines {first.start_mark.line + 1} and "
                                         f"{key_node.start_mark.line + 1} (the second would silently replace the "
                                         f"first)")
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text):
    """Parse YAML (a str or a text stream) like ``yaml.safe_load``, but refuse duplicate keys and nesting deeper
    than :data:`MAX_YAML_DEPTH` with a one-line ``yaml.YAMLError`` naming the key and both lines, or the depth.

    Example:
        >>> load_yaml_text('a: 1')
        {'a': 1}
    """
    loader = _CheckedYamlLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml_file(path, what='config'):
    """Read a YAML file with :func:`load_yaml_text` (``yaml.safe_load`` plus the duplicate-key and depth checks).

    Raises :class:`ReadYamlFileError` (or :class:`LinkPathError` / :class:`FileOversizeError`) naming the file when
    it is missing, a link, larger than ``MAX_YAML_MB_SIZE`` MB, nested deeper than ``MAX_YAML_DEPTH`` levels,
    holds a duplicate key, or is not valid YAML.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"The {what} path must be a str or os.PathLike, but got {path!r} ({type(path).__name__}).")
    path = os.fspath(path)
    if not path:
        raise ValueError(f"The {what} path must be a non-empty str, but got ''.")
    if os.path.islink(path):
        raise LinkPathError(f"The {what} file '{path}' is a symbolic link; give the real path.")
    _check_readable_file(path, what, ReadYamlFileError)
    if os.path.getsize(path) > MAX_YAML_MB_SIZE * MB_SIZE:
        raise FileOversizeError(f"The {what} file '{path}' is larger than {MAX_YAML_MB_SIZE} MB.")
    try:
        with open(path, 'r', encoding='utf-8') as handle:
            return load_yaml_text(handle)
    except (OSError, UnicodeDecodeError) as ex:
        raise ReadYamlFileError(f"The {what} file '{path}' could not be read: {ex}.") from ex
    except yaml.YAMLError as ex:
        raise ReadYamlFileError(f"The {what} file '{path}' is not valid YAML: "
                                f"{str(ex).splitlines()[0]}.") from None
