"""Importing code a run config names (``model.task``, ``model.class``, ``model.factory``, ``model.loss``): a
deliberate act.

Importing a module runs its code, so a config may name a module only when

* its top-level package is on the allow-list :data:`TRUSTED_PACKAGES` (``mindpet``, ``mindone``, ``mindformers``:
  installed libraries whose import runs nothing but their own definitions), or
* the config says ``model.trust_code: true``.

Otherwise the run is refused before anything is imported, with a message saying why. Nothing is added to
``sys.path``: a module comes from the installed packages, or (``model.code_dir``) its top-level package is loaded
from that one directory, by name, without making the rest of the directory importable. The shipped example configs
set ``trust_code: true`` and ``code_dir: ..`` (the repository root, relative to the config file): ``examples`` is a
name any directory could provide, so it is not allow-listed.

Example:
    >>> cls = import_object('mindspore.nn:Dense', 'model.class', trust_code=True)  # doctest: +SKIP
"""
import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys

#: top-level packages whose modules a config may name without ``trust_code``
TRUSTED_PACKAGES = ('mindpet', 'mindone', 'mindformers')

_MODULE_RE = re.compile(r'^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$')
_ATTR_RE = re.compile(r'^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$')


class CodeImportError(ValueError):
    """A config names code that cannot or may not be imported (the message says why)."""


def check_module_path(path, what='module'):
    """``path`` if it is a dotted module path (``package.module``), else :class:`CodeImportError`."""
    if not isinstance(path, str) or not _MODULE_RE.match(path):
        raise CodeImportError(f"must be a dotted module path 'package.module' naming the {what}, but got {path!r}")
    return path


def import_module(path, trust_code=False, code_dir=None):
    """Import the module ``path`` named in a config, under the trust rule of this module.

    Args:
        path (str): ``package.module``.
        trust_code (bool): the config's ``model.trust_code``.
        code_dir (str | None): a directory holding ``path``'s top-level package (``model.code_dir``), or None
            (the installed packages). Not used for the allow-listed packages.

    Returns:
        module

    Raises:
        CodeImportError: a malformed path, an untrusted module, or an import that fails (the message names the
            module and the reason).
    """
    check_module_path(path)
    top = path.split('.')[0]
    if not trust_code and top not in TRUSTED_PACKAGES:
        raise CodeImportError(f"importing '{path}' would run its code, and '{top}' is not on the allow-list "
                              f"{list(TRUSTED_PACKAGES)}: set 'model.trust_code: true' if you trust this code")
    if code_dir is not None and top not in TRUSTED_PACKAGES:    # the allow-listed ones are installed libraries
        _load_top_package(top, code_dir)
    try:
        return importlib.import_module(path)
    except ImportError as ex:
        hint = '' if code_dir is not None else (f"; if '{top}' is a directory of your own code, give the directory "
                                                f"that holds it as 'model.code_dir'")
        raise CodeImportError(f"cannot import '{path}': {ex}{hint}") from ex


def import_object(spec, trust_code=False, code_dir=None, what='object'):
    """The object ``spec`` (``'package.module:Name'``, attributes dotted after the colon) names.

    Raises:
        CodeImportError: a malformed spec, an untrusted or missing module, or a missing attribute.
    """
    if not isinstance(spec, str) or spec.count(':') != 1:
        raise CodeImportError(f"must be 'package.module:Name' naming the {what}, but got {spec!r}")
    module_path, attr = spec.split(':')
    check_module_path(module_path, what)
    if not _ATTR_RE.match(attr):
        raise CodeImportError(f"must be 'package.module:Name' naming the {what}, but got {spec!r}")
    target = import_module(module_path, trust_code, code_dir)
    for part in attr.split('.'):
        if not hasattr(target, part):
            raise CodeImportError(f"the module '{module_path}' has no '{attr}'")
        target = getattr(target, part)
    return target


def _load_top_package(top, code_dir):
    """Import the package ``top`` from ``code_dir`` (registered in ``sys.modules``; ``sys.path`` untouched)."""
    code_dir = os.path.realpath(code_dir)
    loaded = sys.modules.get(top)
    if loaded is not None:
        origin = getattr(loaded, '__file__', None) or next(iter(getattr(loaded, '__path__', [])), '')
        if not os.path.realpath(origin).startswith(code_dir + os.sep):
            raise CodeImportError(f"the package '{top}' is already imported from '{origin}', not from the "
                                  f"model.code_dir '{code_dir}'")
        return
    spec = importlib.machinery.PathFinder.find_spec(top, [code_dir])
    if spec is None:
        raise CodeImportError(f"the model.code_dir '{code_dir}' holds no package or module '{top}'")
    module = importlib.util.module_from_spec(spec)
    sys.modules[top] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[top]
        raise


__all__ = ['TRUSTED_PACKAGES', 'CodeImportError', 'check_module_path', 'import_module', 'import_object']
