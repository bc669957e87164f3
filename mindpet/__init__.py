"""mindpet: parameter-efficient fine-tuning for MindSpore.

Importing mindpet prints nothing, writes nothing and leaves the MindSpore context as it was.
"""
__version__ = '1.1.0'

from mindpet import delta, graph  # noqa: E402  (public sub-packages)

__all__ = ['delta', 'graph', '__version__']
