"""Writing a directory of files as one unit: a writer lock on the directory, files written beside their final name
and renamed into place, and the removal of what a killed writer left behind.

Two protocols. (1) Content-named payload (:mod:`mindpet.adapter_store`'s own format): payload files get names
derived from their content, so writing one never changes a file a reader may be reading; one small file, written last
with a rename, names them and is the single commit point. (2) Fixed names (Hugging Face PEFT's
``adapter_config.json`` + ``adapter_model.safetensors``, :func:`commit_directory`): the new directory is built beside
the target (``.<name>.<pid>.<random>.tmp``, its other files carried over as hard links) and exchanged with it in one
``renameat2(RENAME_EXCHANGE)``; readers pin the directory they read from (:func:`read_unit`). Either way a reader
that opens the unit sees one complete save, the old one or the new one.

Writers are serialised with ``flock`` on the directory itself (no lock file is left behind; the kernel releases the
lock of a killed writer). Without ``fcntl`` (Windows) writers are not serialised.
"""
import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import stat
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


# A reader retries this many times when writers replace the unit it is reading; each retry needs another save.
READ_ATTEMPTS = 100


def _storage_error(path, ex, what):
    reason = write_failure_reason(ex) or ex.strerror or str(ex)
    return CheckpointError(f"Cannot write the {what} '{path}': {reason}.")


def _write_new(path, data):
    """Create ``path`` (which must not exist) holding ``data``, flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


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
        _write_new(tmp_path, data)
        os.replace(tmp_path, path)
    except BaseException as ex:
        with contextlib.suppress(OSError):   # FileNotFoundError when it could not even be created
            os.remove(tmp_path)
        if isinstance(ex, OSError):
            raise _storage_error(path, ex, what) from ex
        raise
    fsync_dir(os.path.dirname(path) or '.')
    return path


def remove_temp_files(directory, names):
    """Remove the temporary files of :func:`write_file` (and the staging directories of :func:`commit_directory`)
    for the final ``names`` (exact names, or compiled regular expressions) in ``directory``, whoever wrote them: call
    it while holding :func:`directory_lock`, when no other writer can be at work. Returns the removed paths."""
    removed = []
    for entry in _listing(directory):
        match = _TEMP_RE.match(entry)
        if match and any(n == match.group('name') if isinstance(n, str) else n.match(match.group('name'))
                         for n in names):
            path = os.path.join(directory, entry)
            with contextlib.suppress(OSError):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
                removed.append(path)
    return removed


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=1)
def _renameat2():
    """glibc's ``renameat2`` (Linux; None elsewhere or with an older C library)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):   # TypeError: Windows has no CDLL(None)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(first, second):
    """Swap two paths in one atomic step (``renameat2(RENAME_EXCHANGE)``): no moment without either.

    Raises:
        OSError: the system or the file system cannot do it (``ENOSYS``, ``EINVAL``; ``EXDEV`` across file systems).
    """
    function = _renameat2()
    if function is None:
        raise OSError(errno.ENOSYS, 'renameat2 is not available here')
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), first)


def _swappable(directory):
    """Whether :func:`commit_directory` may replace ``directory`` by another one: not where this process works (its
    working directory would be left in the deleted old one), not read-only to this user (a swap would ignore the
    directory's own permissions; the in-place writes then fail as they should), and owned by this user unless it is
    root (the new directory would change hands)."""
    real = os.path.realpath(directory)
    cwd = os.path.realpath(os.getcwd())
    euid = os.geteuid() if hasattr(os, 'geteuid') else None
    return (cwd != real and not cwd.startswith(real.rstrip(os.sep) + os.sep) and not os.path.ismount(real)
            and os.access(real, os.W_OK) and euid in (0, os.stat(real).st_uid) and _renameat2() is not None)


def _carry_over(directory, staging, skip):
    """Hard-link (copy where links fail) every entry of ``directory`` but ``skip`` into ``staging``, so that a swap
    keeps the user's other files."""
    for entry in _listing(directory):
        if entry in skip:
            continue
        source, target = os.path.join(directory, entry), os.path.join(staging, entry)
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
        elif os.path.isdir(source):
            shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, target)


def _link_or_copy(source, target):
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def commit_directory(directory, files, what):
    """Replace the files ``files`` (final name -> bytes, in writing order) of ``directory`` as one unit; other
    entries of the directory stay. Call it holding :func:`directory_lock` of ``directory``.

    The new directory is built beside it (``.<name>.<pid>.<random>.tmp``, removed by the next save if the writer is
    killed), fsynced and exchanged with ``directory`` in one step (:func:`exchange`); the old one is then removed.
    Where that cannot be done (no ``renameat2``, a file system without it, a mount point, the process's working
    directory, a directory or parent directory this user cannot write), each file is replaced atomically by
    :func:`write_file` in turn, and a crash between two files leaves a mix. ``what`` maps each name to how messages call the file. Returns ``directory``.

    Raises:
        CheckpointError: a storage error (disk full, permission, read-only file system), naming the final path of
            the file that could not be written; ``directory`` is as it was, and no staging directory is left.
    """
    directory = os.path.abspath(directory)
    parent, name = os.path.split(directory)
    remove_temp_files(parent, [name])
    remove_temp_files(directory, list(files))      # of an in-place save (below) that was killed
    staging = temp_name(directory) if _swappable(directory) else None
    if staging is not None:
        try:
            os.mkdir(staging, 0o700)
        except OSError:   # e.g. a parent this user cannot write into
            staging = None
    if staging is None:
        return _commit_in_place(directory, files, what)
    try:
        _carry_over(directory, staging, set(files))
        for entry, data in files.items():
            try:
                _write_new(os.path.join(staging, entry), data)
            except OSError as ex:   # named by its final path: the staging directory means nothing to the user
                raise _storage_error(os.path.join(directory, entry), ex, what[entry]) from ex
        old = os.stat(directory)
        if (old.st_uid, old.st_gid) != (os.stat(staging).st_uid, os.stat(staging).st_gid):
            with contextlib.suppress(OSError):    # root, or a group of this user: keep them; else the caller's
                os.chown(staging, old.st_uid, old.st_gid)
        os.chmod(staging, stat.S_IMODE(old.st_mode))     # after chown, which clears set-id bits
        fsync_dir(staging)
        exchange(staging, directory)
    except BaseException as ex:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(ex, OSError) and ex.errno in (errno.ENOSYS, errno.EINVAL, errno.EXDEV, errno.EBUSY):
            return _commit_in_place(directory, files, what)
        if isinstance(ex, OSError):
            raise _storage_error(directory, ex, 'directory') from ex
        raise
    fsync_dir(parent)
    shutil.rmtree(staging, ignore_errors=True)      # the old directory now; the next save removes what is left
    return directory


def _commit_in_place(directory, files, what):
    """The fallback of :func:`commit_directory`: each file replaced atomically by :func:`write_file`, in order."""
    for entry, data in files.items():
        write_file(os.path.join(directory, entry), data, what=what[entry])
    return directory


def _same_directory(directory, pinned):
    try:
        now = os.stat(directory)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (pinned.st_dev, pinned.st_ino)


def read_unit(directory, read):
    """``read(directory)``, with every file it opens taken from one committed unit: the directory is held open
    (so that its inode cannot be reused) and, if :func:`commit_directory` swapped it meanwhile, read again.

    Raises:
        CheckpointError: the directory was replaced :data:`READ_ATTEMPTS` times while being read.
        Whatever ``read`` raises on an unchanged directory.
    """
    for _ in range(READ_ATTEMPTS):
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:      # not a readable directory (or Windows): ``read`` reports it
            return read(directory)
        try:
            pinned = os.fstat(fd)
            try:
                result = read(directory)
            except Exception:  # pylint: disable=broad-except
                if _same_directory(directory, pinned):
                    raise
                continue     # a half-swapped view: read the new unit
            if _same_directory(directory, pinned):
                return result
        finally:
            os.close(fd)
    raise saved_while_read(directory)


def saved_while_read(directory):
    """The error of a reader that found ``directory`` saved again on each of its :data:`READ_ATTEMPTS` reads."""
    return CheckpointError(f"The adapter in '{directory}' was saved again {READ_ATTEMPTS} times while being read; "
                           f"try again when the writers pause.")


def _listing(directory):
    try:
        return os.listdir(directory)
    except OSError:
        return []


@contextlib.contextmanager
def directory_lock(directory, timeout=None):
    """Hold the writer lock of ``directory`` (``flock`` on the directory) for the block; waits for another writer
    up to ``timeout`` seconds (None: :data:`LOCK_TIMEOUT_S`). A lock taken on a directory that
    :func:`commit_directory` has meanwhile swapped out is dropped and taken again on the one now at the path.

    Raises:
        CheckpointError: the directory cannot be opened, or another writer held it for ``timeout`` seconds.
    """
    if fcntl is None:
        yield
        return
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while True:
        fd = _locked(directory, deadline, timeout)
        if _same_directory(directory, os.fstat(fd)):
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)   # also releases the lock


def _locked(directory, deadline, timeout):
    """An open descriptor of ``directory`` holding its ``flock``."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as ex:
        raise CheckpointError(f"Cannot lock the directory '{directory}' for writing: {ex.strerror or ex}.") from ex
    pause = 0.001
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError as ex:
                if ex.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise CheckpointError(f"Cannot lock the directory '{directory}' for writing: "
                                          f"{ex.strerror or ex}.") from ex
                if time.monotonic() > deadline:
                    raise CheckpointError(f"Another process has been writing into '{directory}' for more than "
                                          f"{timeout:.0f} s; not saving over it.") from ex
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
    except BaseException:
        os.close(fd)
        raise
