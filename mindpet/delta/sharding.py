"""Shared mechanics of the delta Cells' ``shard(...)`` methods and non-linearities.

Every ``shard`` method builds a list of ``(target, argument name, strategy, input ranks)`` entries and hands it
to :func:`apply_strategies`, which checks every strategy first (so a bad call changes nothing) and then shards.
"""
from mindspore import nn, ops
from mindspore.nn.layer.activation import get_activation, _activation
from mindspore.ops.primitive import Primitive

from mindpet.utils.validation import check_choice, check_strategy

ACTIVATION_NAMES = tuple(_activation.keys())


def _primitives_of(cell):
    return [p for p in getattr(cell, '_primitives', {}).values() if isinstance(p, Primitive)]


def apply_strategies(owner, entries):
    """Check, then apply, per-operator shard strategies.

    Args:
        owner (str): the Cell name used in error messages.
        entries (list): ``(target, name, strategy, ndims)``. ``target`` is a Primitive, or an activation Cell whose
            primitives all get the (one-input) strategy; ``strategy`` None leaves it as it is; ``ndims`` is the
            tuple of input ranks the strategy must match (see ``check_strategy``).

    Raises:
        TypeError, ValueError: a strategy of the wrong form (naming its argument), or a strategy for an
            activation with no operator that can be sharded. Nothing is sharded then.
    """
    for target, name, strategy, ndims in entries:
        check_strategy(name, strategy, owner, ndims)
        if strategy is not None and isinstance(target, nn.Cell) and not _primitives_of(target):
            raise ValueError(f"For '{owner}', '{name}' cannot be applied: the activation {type(target).__name__} "
                             f"has no operator that can be sharded; pass '{name}=None'.")
    for target, _, strategy, _ in entries:
        if strategy is None:
            continue
        for prim in _primitives_of(target) if isinstance(target, nn.Cell) else [target]:
            prim.shard(strategy)


def dense_entries(owner, layer, strategy_bias, strategy_activation, bias_name='strategy_org_bias_add',
                  activation_name='strategy_activation'):
    """The :func:`apply_strategies` entries of a Dense's own bias add and activation (keywords ``bias_name`` and
    ``activation_name``).

    Raises:
        ValueError: a strategy for a bias or an activation the layer does not have.
    """
    if strategy_bias is not None and not layer.has_bias:
        raise ValueError(f"For '{owner}', '{bias_name}' was given but the layer has no bias (has_bias=False).")
    if strategy_activation is not None and not layer.activation_flag:
        raise ValueError(f"For '{owner}', '{activation_name}' was given but the layer has no activation.")
    return [(getattr(layer, 'bias_add', None), bias_name, strategy_bias, (2, 1)),
            (layer.activation, activation_name, strategy_activation, (2,))]


def apply_dense_strategies(owner, layer, entries, strategy_org_bias_add=None, strategy_activation=None):
    """:func:`apply_strategies` for a delta Dense ``layer``: its ``entries`` plus the Dense's own bias add and
    activation (MindPet's keywords). Nothing is sharded when any strategy is refused. Returns ``layer``."""
    apply_strategies(owner, list(entries) + dense_entries(owner, layer, strategy_org_bias_add, strategy_activation))
    return layer


class _PrimitiveActivation(nn.Cell):
    """An activation that is a single primitive, so ``shard`` can reach it."""

    def __init__(self, primitive):
        super().__init__()
        self.op = primitive

    def construct(self, x):
        return self.op(x)


def make_activation(owner, name, arg='non_linearity'):
    """The activation Cell for ``name`` (one of MindSpore's ``get_activation`` names).

    'gelu' is built on the ``GeLU`` primitive (the same tanh approximation as ``nn.GELU``) because MindSpore
    2.x's ``nn.GELU`` calls a functional op that no shard strategy can reach.
    """
    name = check_choice(arg, name, owner, ACTIVATION_NAMES)
    if name == 'gelu':
        return _PrimitiveActivation(ops.GeLU())
    return get_activation(name)
