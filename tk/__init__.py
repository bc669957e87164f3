"""``tk``: MindPet's first name. ``tk.X`` is the very module ``mindpet.X`` (same objects, not copies), so
``from tk.delta import LoRADense`` and ``from tk.graph.freeze_utils import freeze_delta`` keep working."""
import importlib
import importlib.abc
import importlib.util
import sys

import mindpet

__version__ = mindpet.__version__


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Resolve ``tk.<sub>`` to the already-importable ``mindpet.<sub>``."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith('tk.'):
            return None
        real = 'mindpet.' + fullname[len('tk.'):]
        if importlib.util.find_spec(real) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(real))


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())

from tk import delta, graph  # noqa: E402,F401
