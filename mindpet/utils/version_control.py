"""MindPet 1.0.4's version-dependent constructors, kept at their old import path.

MindFormers (every release since 1.0, pinned to ``mindpet==1.0.4``) imports
``mindpet.utils.version_control.get_dropout`` for its prefix-tuning and P-Tuning v2 adapters, and MindPet 1.0.4's own
delta layers imported ``get_activation`` from here; ``import mindformers`` fails when this module is missing.
MindPet 1.0.4 chose between ``nn.Dropout(keep_prob=...)`` (MindSpore < 1.11) and ``nn.Dropout(p=...)``; this package
needs MindSpore 2.10, so only the second form remains.

Example:
    >>> from mindpet.utils.version_control import get_dropout, get_activation
    >>> get_dropout(0.1)
    Dropout(p=0.1)
    >>> get_activation('relu')
    ReLU<>
"""
from mindspore import nn
# ``_activation`` (the name -> class table) is re-exported because MindPet 1.0.4's delta modules imported it from here.
from mindspore.nn.layer.activation import get_activation as _ms_get_activation, _activation  # noqa: F401

from mindpet.utils.validation import check_real

__all__ = ['get_dropout', 'get_activation']


def get_dropout(dropout_prob):
    """An ``nn.Dropout`` that zeroes each element with probability ``dropout_prob`` while training.

    Args:
        dropout_prob (float): the drop probability, in [0, 1) (an int 0 is accepted, as MindPet 1.0.4 did).

    Returns:
        nn.Dropout: its primitive is ``.dropout`` (MindFormers shards it with ``.dropout.shard(...)``). In training
        mode it keeps an element with probability ``1 - dropout_prob`` and scales kept elements by
        ``1 / (1 - dropout_prob)``; in eval mode it returns its input.

    Raises:
        TypeError: ``dropout_prob`` is not an int or float (bool included).
        ValueError: ``dropout_prob`` is outside [0, 1) or not finite.

    Example:
        >>> layer = get_dropout(0.1)
        >>> layer.dropout.shard(((2, 1),))  # doctest: +SKIP
    """
    check_real('dropout_prob', dropout_prob, 'get_dropout', min_value=0)
    if dropout_prob >= 1:
        raise ValueError(f"For 'get_dropout', the 'dropout_prob' must be in [0.0, 1.0), but got "
                         f"{dropout_prob!r} ({type(dropout_prob).__name__}).")
    return nn.Dropout(p=dropout_prob)


def get_activation(name, prim_name=None):
    """The activation Cell called ``name``, built fresh (MindSpore's table, as MindPet 1.0.4 used).

    Args:
        name (str | None): an activation name, e.g. 'relu', 'gelu', 'fast_gelu', 'silu', 'tanh', 'sigmoid',
            'softmax', 'leakyrelu' (every key of the table); None gives None.
        prim_name (str | None): a Cell name put at the start of the error message. Default None.

    Returns:
        nn.Cell | None: a new activation Cell; it maps a tensor of any shape to the same shape.

    Raises:
        KeyError: ``name`` is not in the table (the error type MindPet 1.0.4 documents); the message lists the
            valid names.

    Example:
        >>> get_activation('gelu')(ms.Tensor([0.0, 1.0])).shape  # doctest: +SKIP
        (2,)
    """
    return _ms_get_activation(name, prim_name)
