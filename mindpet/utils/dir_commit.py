"""Writing a directory of files as one unit: a writer lock on the directory, files written beside their final name
and renamed into place, and the removal of what a killed writer left behind.

The protocol (used by :mod:`mindpet.adapter_store`): payload files get names derived from their content, so writing
one never changes a file a reader may be reading; one small file, written last with a rename, names them and is the
single commit point. A reader that opens the commit file sees one complete unit, the old one or the new one.
Writers are serialised with ``flock`` on the directory itself (no lock file is left behind; the kernel releases the
lock of a killed writer). Without ``fcntl`` (Windows) writers are not serialised.
"""
import contextlib
import errno
import os
import re
import time
import uuid

from mindpet.utils.exceptions import CheckpointError
from mindpet.utils.io_utils import fsync_dir, write_failure_reason

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# A writer waits this long for another writer of the same directory before giving up with a clear error.
LOCK_TIMEOUT_S = 300.0
_TEMP_RE = re.compile(r'^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp$')


def temp_name(path):
    """A fresh temporary path beside ``path``: ``.<name>.<pid>.<random>.tmp`` (hidden, never a final name)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f'.{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp')


def _storage_error(path, ex, what):
    reason = write_failure_reason(ex) or ex.strerror or str(ex)
    return CheckpointError(f"Cannot write the {what} '{path}': {reason}.")


def write_file(path, data, what='file'):
    """Write ``data`` (bytes) to ``path`` atomically: a temporary file beside it is written, fsynced and renamed
    onto ``path``; the directory is then fsynced. The file gets the permissions ``open()`` gives (0666 minus the
    umask). Returns ``path``.

    Raises:
        CheckpointError: a storage error (disk full, permission, read-only file system), naming ``path``; no
            temporary file is left.
    """
    tmp_path = temp_name(path)
    try:
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as ex:
        raise _storage_error(path, ex, what) from ex
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, path)
    except BaseException as ex:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        if isinstance(ex, OSError):
            raise _storage_error(path, ex, what) from ex
        raise
    fsync_dir(os.path.dirname(path) or '.')
    return path


def remove_temp_files(directory, names):
    """Remove the temporary files of :func:`write_file` for the final ``names`` (exact names, or compiled regular
    expressions) in ``directory``, whoever wrote them: call it while holding :func:`directory_lock`, when no other
    writer can be at work. Returns the removed paths."""
    removed = []
    for entry in _listing(directory):
        match = _TEMP_RE.match(entry)
        if match and any(n == match.group('name') if isinstance(n, str) else n.match(match.group('name'))
                         for n in names):
            path = os.path.join(directory, entry)
            with contextlib.suppress(OSError):
                os.remove(path)
                removed.append(path)
    return removed


def _listing(directory):
    try:
        return os.listdir(directory)
    except OSError:
        return []


@contextlib.contextmanager
def directory_lock(directory, timeout=None):
    """Hold the writer lock of ``directory`` (``flock`` on the directory) for the block; waits for another writer
    up to ``timeout`` seconds (None: :data:`LOCK_TIMEOUT_S`).

    Raises:
        CheckpointError: the directory cannot be opened, or another writer held it for ``timeout`` seconds.
    """
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as ex:
        raise CheckpointError(f"Cannot lock the directory '{directory}' for writing: {ex.strerror or ex}.") from ex
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    try:
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as ex:
                if ex.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise CheckpointError(f"Cannot lock the directory '{directory}' for writing: "
                                          f"{ex.strerror or ex}.") from ex
                if time.monotonic() > deadline:
                    raise CheckpointError(f"Another process has been writing into '{directory}' for more than "
                                          f"{timeout:.0f} s; not saving over it.") from ex
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
        yield
    finally:
        os.close(fd)   # also releases the lock
