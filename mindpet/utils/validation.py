"""Argument checks shared by every public Cell and function.

Each check raises ``TypeError`` for a value of the wrong type and ``ValueError`` for a value out of range, with a
message naming the owner (Cell or function), the argument, what was expected and what was received::

    For 'LoRADense', the 'lora_rank' must be a positive int, but got 0 (int).

The errors are :class:`FieldTypeError` / :class:`FieldValueError`: still a ``TypeError`` / ``ValueError`` for every
caller, with ``field`` naming the argument (or config field) the error is about, so that a caller can point at
the YAML key without reading the message.
"""
import difflib
import numbers
import re

from mindspore import dtype as mstype

FLOAT_DTYPES = (mstype.float16, mstype.float32, mstype.bfloat16)
_SAFE_NAME = re.compile(r'[A-Za-z0-9_.\-]+')


class FieldTypeError(TypeError):
    """A ``TypeError`` about one argument or config field, named by ``field`` (None when not known).

    Example:
        >>> try:
        ...     check_int('lora_rank', 'eight', 'LoraConfig')
        ... except TypeError as ex:
        ...     ex.field
        'lora_rank'
    """

    def __init__(self, *args, field=None):
        super().__init__(*args)
        self.field = field


class FieldValueError(ValueError):
    """A ``ValueError`` about one argument or config field, named by ``field`` (None when not known)."""

    def __init__(self, *args, field=None):
        super().__init__(*args)
        self.field = field


def got_text(value, limit=80):
    """``"<repr> (<type>)"``, the "but got ..." of an error message, the repr cut to ``limit`` characters.

    Example:
        >>> got_text(1.5), got_text('x' * 100, limit=10)
        ('1.5 (float)', "'xxxxxx... (str)")
    """
    text = repr(value)
    if len(text) > limit:
        text = text[:limit - 3] + '...'
    return f"{text} ({type(value).__name__})"


def _fail(exc_type, owner, name, expected, value):
    field_type = FieldTypeError if issubclass(exc_type, TypeError) else FieldValueError
    raise field_type(f"For '{owner}', the '{name}' must be {expected}, but got {got_text(value)}.", field=name)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name, value, owner, min_value=1, max_value=None):
    """Check ``value`` is an int (not bool) within ``[min_value, max_value]`` and return it as ``int``."""
    if min_value == 1 and max_value is None:
        expected = "a positive int"
    elif min_value == 0 and max_value is None:
        expected = "a non-negative int"
    elif max_value is None:
        expected = f"an int >= {min_value}"
    else:
        expected = f"an int in [{min_value}, {max_value}]"
    if not _is_int(value):
        _fail(TypeError, owner, name, expected, value)
    if (min_value is not None and value < min_value) or (max_value is not None and value > max_value):
        _fail(ValueError, owner, name, expected, value)
    return int(value)


def check_real(name, value, owner, nonzero=False, min_value=None, min_inclusive=True):
    """Check ``value`` is a finite int or float (not bool); optionally non-zero or bounded below. Returns it."""
    expected = "a finite int or float"
    if nonzero:
        expected = "a non-zero, finite int or float"
    if min_value is not None:
        expected += f" {'>=' if min_inclusive else '>'} {min_value}"
    if not _is_real(value):
        _fail(TypeError, owner, name, expected, value)
    if value != value or value in (float('inf'), float('-inf')):  # NaN or infinite: scales become NaN/inf
        _fail(ValueError, owner, name, expected, value)
    if nonzero and value == 0:
        _fail(ValueError, owner, name, expected, value)
    if min_value is not None and (value < min_value or (not min_inclusive and value == min_value)):
        _fail(ValueError, owner, name, expected, value)
    return value


def check_rate(name, value, owner):
    """Check a dropout-like probability: a float in [0, 1). Returns it."""
    expected = "a float in [0.0, 1.0)"
    if not isinstance(value, float):
        _fail(TypeError, owner, name, expected, value)
    if not 0.0 <= value < 1.0:
        _fail(ValueError, owner, name, expected, value)
    return value


def check_beta(name, value, owner):
    """Check an exponential-moving-average factor: a finite int or float in [0, 1). Returns it as a float."""
    check_real(name, value, owner)
    if not 0.0 <= value < 1.0:
        raise FieldValueError(f"For '{owner}', the '{name}' must be in [0.0, 1.0), but got {value!r}.", field=name)
    return float(value)


def check_bool(name, value, owner):
    """Check ``value`` is a bool. Returns it."""
    if not isinstance(value, bool):
        _fail(TypeError, owner, name, "a bool", value)
    return value


def check_dtype(name, value, owner, allowed=FLOAT_DTYPES):
    """Check ``value`` is one of the MindSpore dtypes in ``allowed``. Returns it."""
    names = ", ".join(repr(d) for d in allowed)
    if not isinstance(value, mstype.Type):
        _fail(TypeError, owner, name, f"one of {names}", value)
    if value not in allowed:
        _fail(TypeError, owner, name, f"one of {names}", value)
    return value


def did_you_mean(key, candidates, cutoff=0.6, case_insensitive=False, list_valid=False, aside=False):
    """The hint that ends an "unknown name" message: ``"; did you mean 'x'?"`` naming the candidate closest to
    ``key`` (difflib's similarity ratio at least ``cutoff``; compared lower-cased when ``case_insensitive``, the
    candidate named as spelt), else ``"; valid keys: [...]"`` (sorted) when ``list_valid``, else ``''``. ``aside``
    gives the form ``" (did you mean 'x'?)"``, for a message that goes on after the hint.

    Example:
        >>> did_you_mean('lora_rnak', ['lora_rank', 'lora_alpha'])
        "; did you mean 'lora_rank'?"
        >>> did_you_mean('graph', ['GRAPH', 'PYNATIVE'], case_insensitive=True, aside=True)
        " (did you mean 'GRAPH'?)"
        >>> did_you_mean('zzz', ['b', 'a'], list_valid=True)
        "; valid keys: ['a', 'b']"
    """
    spelt = {(str(c).lower() if case_insensitive else str(c)): str(c) for c in candidates}
    close = difflib.get_close_matches(str(key).lower() if case_insensitive else str(key), list(spelt), n=1,
                                      cutoff=cutoff)
    if close:
        return f" (did you mean '{spelt[close[0]]}'?)" if aside else f"; did you mean '{spelt[close[0]]}'?"
    return f"; valid keys: {sorted(candidates)}" if list_valid else ''


def check_safe_name(name, value, owner, what='name'):
    """Check ``value`` is a non-empty str of letters, digits, '_', '-' or '.' (no path separator or space: it
    becomes part of a file or parameter name; ``what`` says which in the message). Returns it.

    Example:
        >>> check_safe_name('adapter_name', 'task-a.v2', 'add_adapter')
        'task-a.v2'
    """
    if not isinstance(value, str):
        raise FieldTypeError(f"For '{owner}', the '{name}' must be a str, but got {value!r} "
                             f"({type(value).__name__}).", field=name)
    if not _SAFE_NAME.fullmatch(value):     # (match with '$' would let a trailing newline through)
        raise FieldValueError(f"For '{owner}', the '{name}' must be a non-empty {what} of letters, digits, '_', '-' "
                              f"or '.', but got {value!r}.", field=name)
    return value


def check_choice(name, value, owner, choices, case_insensitive=False):
    """Check ``value`` is a str in ``choices``; returns it (lower-cased when ``case_insensitive``)."""
    expected = f"one of {list(choices)}"
    if not isinstance(value, str):
        _fail(TypeError, owner, name, f"a str, {expected}", value)
    key = value.lower() if case_insensitive else value
    if key not in choices:
        _fail(ValueError, owner, name, expected, value)
    return key


def check_str_list(name, value, owner, allow_none=True, allow_empty=False):
    """Check ``value`` is a list/tuple of str (or None when allowed). Returns a list (or None)."""
    if value is None:
        if allow_none:
            return None
        _fail(TypeError, owner, name, "a list of str", value)
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        _fail(TypeError, owner, name, "a list of str", value)
    for item in value:
        if not isinstance(item, str):
            raise FieldTypeError(f"For '{owner}', every item of '{name}' must be a str, but got {got_text(item)}.",
                                 field=name)
    if not value and not allow_empty:
        _fail(ValueError, owner, name, "a non-empty list of str", value)
    return list(value)


def check_strategy(name, value, owner, ndims):
    """Check a semi-auto-parallel shard strategy for an operator with inputs of ranks ``ndims``.

    ``value`` may be None (leave the operator unsharded) or a tuple with one tuple of positive ints per input,
    each as long as that input's rank. Returns it.
    """
    if value is None:
        return None
    expected = f"None or a tuple of {len(ndims)} tuple(s) of positive ints with lengths {tuple(ndims)}"
    if not isinstance(value, tuple) or len(value) != len(ndims):
        _fail(ValueError if isinstance(value, tuple) else TypeError, owner, name, expected, value)
    for sub, ndim in zip(value, ndims):
        if not isinstance(sub, tuple) or not all(_is_int(v) and v > 0 for v in sub):
            _fail(TypeError, owner, name, expected, value)
        if len(sub) != ndim:
            _fail(ValueError, owner, name, expected, value)
    return value


def check_initializer(name, value, owner, shape=None, named_only=False):
    """Check a parameter initializer: a MindSpore initializer name (e.g. 'normal', 'zeros') or an ``Initializer``,
    and unless ``named_only`` also a number or a Tensor/numpy array of ``shape``. Returns it.

    A name is looked up now, so a typo fails at construction naming the argument, not deep inside MindSpore.
    """
    import numpy as np  # local: keeps this module light to import
    from mindspore import Tensor
    from mindspore.common.initializer import Initializer, initializer
    if isinstance(value, (Tensor, np.ndarray)) and not named_only:
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise FieldValueError(f"For '{owner}', the '{name}' must have shape {tuple(shape)}, but got a tensor of "
                                  f"shape {tuple(value.shape)}.", field=name)
        return value
    kinds = ("an initializer name (str) or an Initializer" if named_only
             else "an initializer name (str), an Initializer, a number or a Tensor")
    if not isinstance(value, (str, Initializer)) and (named_only or not _is_real(value)):
        _fail(TypeError, owner, name, kinds, value)
    if isinstance(value, str):
        try:
            initializer(value, [1, 1], mstype.float32)   # lazy: looks the name up, computes nothing
        except (ValueError, KeyError, TypeError) as ex:
            raise FieldValueError(f"For '{owner}', the '{name}' must be a MindSpore initializer name such as "
                                  f"'normal', 'zeros' or 'xavier_uniform', but got {got_text(value)}.",
                                  field=name) from ex
    return value


def check_cell(name, value, owner):
    """Check ``value`` is a ``mindspore.nn.Cell``. Returns it."""
    from mindspore import nn  # local: keeps this module importable without building Cells
    if not isinstance(value, nn.Cell):
        _fail(TypeError, owner, name, "a mindspore.nn.Cell", value)
    return value


def available_memory_bytes():
    """Memory this process can still get: ``MemAvailable`` of ``/proc/meminfo``, lowered to the cgroup's limit
    (containers) when that is smaller; the physical memory where neither can be read; None when unknown."""
    import os  # local: keeps this module light to import
    available = None
    try:
        with open('/proc/meminfo', encoding='ascii') as handle:
            for line in handle:
                if line.startswith('MemAvailable:'):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
        except (ValueError, OSError, AttributeError):
            return None
    for path, usage in (('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current'),
                        ('/sys/fs/cgroup/memory/memory.limit_in_bytes', '/sys/fs/cgroup/memory/memory.usage_in_bytes')):
        try:
            with open(path, encoding='ascii') as handle:
                limit = handle.read().strip()
            with open(usage, encoding='ascii') as handle:
                used = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit():
            available = min(available, max(int(limit) - used, 0))
        break
    return available


def size_text(nbytes):
    """``'1.5 GB'``-style size for messages."""
    for unit, scale in (('TB', 1 << 40), ('GB', 1 << 30), ('MB', 1 << 20), ('KB', 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{int(nbytes)} bytes"


def memory_shortfall(nbytes):
    """None when ``nbytes`` fit into the memory available now, else ``'about <estimate>, more than the <available>
    of memory available here'``. Unknown available memory counts as fitting."""
    available = available_memory_bytes()
    if available is None or nbytes <= available:
        return None
    return f"about {size_text(nbytes)}, more than the {size_text(available)} of memory available here"


def check_allocation(owner, what, shape, itemsize):
    """Refuse, before allocating, a tensor of ``shape`` (``itemsize`` bytes per element) that would not fit into the
    available memory: ``ValueError`` naming the owner, ``what`` (the argument(s) that set the size) and the
    estimate. Returns the byte count."""
    nbytes = int(itemsize)
    for dim in shape:
        nbytes *= int(dim)
    problem = memory_shortfall(nbytes)
    if problem:
        raise ValueError(f"For '{owner}', {what} would be a tensor of shape {tuple(int(d) for d in shape)}, which "
                         f"needs {problem}.")
    return nbytes
