"""Process memory settings of a training run: the graph is compiled before the first step and the host memory
that compilation freed is handed back to the operating system before the first step allocates its own.

Why: compiling a training graph in MindSpore 2.10 on CPU leaves freed blocks in glibc's heap (tens of MB for a
6-block GPT); the first step's allocations are then added on top of that high-water mark. Calling ``malloc_trim``
between the two lowers the run's peak by that amount without touching a single number the step computes
(doc/benchmarks.md, part 1c, measures it beside the allocator and MindSpore settings that did not help).

``MINDPET_RELEASE_MEMORY=0`` in the environment turns it off (the run then compiles inside its first step, as
MindSpore does by default).
"""
import ctypes
import ctypes.util
import gc
import os

import mindspore as ms

RELEASE_ENV = 'MINDPET_RELEASE_MEMORY'
_ON = ('1', 'true', 'yes', 'on')
_OFF = ('0', 'false', 'no', 'off')
_LIBC = []


def release_enabled(environ=None):
    """Whether :func:`compile_then_release` acts: the ``MINDPET_RELEASE_MEMORY`` variable (default on).

    Args:
        environ (Mapping | None): the environment to read (default ``os.environ``).

    Returns:
        bool

    Raises:
        ValueError: the variable holds something other than 1/0, true/false, yes/no, on/off.

    Example:
        >>> release_enabled({'MINDPET_RELEASE_MEMORY': '0'})
        False
    """
    raw = (os.environ if environ is None else environ).get(RELEASE_ENV)
    if raw is None or raw.strip().lower() in _ON:
        return True
    if raw.strip().lower() in _OFF:
        return False
    raise ValueError(f"The environment variable '{RELEASE_ENV}' must be one of {list(_ON + _OFF)}, but got "
                     f"{raw!r}.")


def _malloc_trim():
    """glibc's ``malloc_trim`` (None where the C library has none, e.g. musl or macOS)."""
    if not _LIBC:
        name = ctypes.util.find_library('c')
        try:
            trim = getattr(ctypes.CDLL(name), 'malloc_trim') if name else None
        except (OSError, AttributeError):
            trim = None
        if trim is not None:
            trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        _LIBC.append(trim)
    return _LIBC[0]


def release_free_memory():
    """Collect Python garbage, then return the C heap's free pages to the operating system (``malloc_trim(0)``).

    Returns:
        bool | None: True when memory was returned, False when there was none to return, None when the C
        library has no ``malloc_trim``.

    Example:
        >>> release_free_memory() in (True, False, None)
        True
    """
    gc.collect()
    trim = _malloc_trim()
    return None if trim is None else bool(trim(0))


def compile_then_release(cell, *inputs):
    """Compile ``cell``'s graph for ``inputs`` (GRAPH_MODE) and release the host memory compilation freed, before
    the first call runs; the first call then reuses the compiled graph (it computes exactly what it would have).

    Args:
        cell (nn.Cell): e.g. the ``nn.TrainOneStepCell`` of a run.
        *inputs (Tensor): the first call's inputs (their shapes and dtypes select the graph).

    Returns:
        bool | None: :func:`release_free_memory`'s answer; None also when nothing was done (PyNative mode, or
        ``MINDPET_RELEASE_MEMORY=0``).

    Example:
        >>> compile_then_release(train_step, ids, labels)  # doctest: +SKIP
        >>> loss = train_step(ids, labels)  # doctest: +SKIP
    """
    if not release_enabled() or ms.get_context('mode') != ms.GRAPH_MODE:
        return None
    cell.compile(*inputs)
    return release_free_memory()
