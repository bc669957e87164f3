"""Finding and replacing the cells an adapter targets: name matching, the one walk of a model, the layer-type
dispatch, layer keys, putting a delta Cell in place of a base cell, and making a compiled graph see the change.

Tuners call these from :meth:`mindpet.tuners.base.BaseTuner.inject`/``match``; :class:`mindpet.PetModel` calls
them when it puts base cells back (unload) or recompiles after a switch.
"""
import re
import time

from mindspore import nn

from mindpet.delta.layer_kinds import kind_of

#: :func:`layer_type` of an exact ``nn.Dense``: the methods' own delta Dense Cells (``LoRADense``, ...) replace it
DENSE = 'dense'


def name_matches(name, pattern):
    """True when ``pattern`` is ``name``, a dot-separated suffix of it, or a regular expression matching all of it.

    Example:
        >>> name_matches('blocks.0.attn.q_proj', 'q_proj'), name_matches('blocks.0.attn.q_proj', r'.*\\.[qv]_proj')
        (True, True)
    """
    if name == pattern or name.endswith('.' + pattern):
        return True
    return re.fullmatch(pattern, name) is not None


def matches_any(name, patterns):
    """True when any of ``patterns`` (or None) matches ``name`` (see :func:`name_matches`)."""
    return bool(patterns) and any(name_matches(name, p) for p in patterns)


def walk(model):
    """One walk of ``model``: ``(cells, holders)`` where ``cells`` is the ordered list of ``(name, cell)`` from
    ``cells_and_names()`` and ``holders`` maps ``id(cell)`` to every ``(parent, key)`` holding it (a Cell shared
    by two parents must be replaced in both)."""
    cells = list(model.cells_and_names())
    holders = {}
    for _, parent in cells:
        # _cells, not name_cells(): the latter lists a Cell held under two names only once.
        for key, child in parent._cells.items():  # pylint: disable=protected-access
            if child is not None:
                holders.setdefault(id(child), []).append((parent, key))
    return cells, holders


def layer_type(cell):
    """The layer-type dispatch: :data:`DENSE` for an exact ``nn.Dense`` (subclasses may compute something else), the
    :class:`~mindpet.delta.layer_kinds.LayerKind` of the other adaptable types (one entry each in
    :data:`mindpet.delta.layer_kinds.LAYER_KINDS`: ``mint.nn.Linear``, GPT-2 ``Conv1D``, ``Conv2d``, ``Embedding``),
    else None. A method's tuner builds its delta Dense Cell for the first, its ``DeltaLayer`` around the layer for
    the second (see :meth:`mindpet.tuners.base.DenseLayerTuner.build_delta`)."""
    if type(cell) is nn.Dense:  # pylint: disable=unidiomatic-typecheck
        return DENSE
    return kind_of(cell)


def layer_key(cell, cell_name, attr='weight'):
    """The name prefix of ``cell``'s parameters as checkpoints see them (``'a.b'`` for ``a.b.weight``); the cell
    name when the parameter carries no prefix. Usually both are the same string."""
    name = getattr(getattr(cell, attr, None), 'name', '') or ''
    if name.endswith('.' + attr):
        return name[:-len(attr) - 1]
    return cell_name


def replace_cell(holders, old, new, prefix):
    """Put ``new`` wherever ``old`` is held and give ``new``'s parameters the names ``prefix + attr``.

    MindSpore's own ``setattr`` only prefixes the attribute name (``q.weight`` instead of ``blocks.0.q.weight``),
    so names are set explicitly from ``prefix``; ``SequentialCell`` also keeps its own list of children.
    """
    for parent, key in holders.get(id(old), ()):
        parent.insert_child_to_cell(key, new)
        if isinstance(parent, nn.SequentialCell):
            parent.cell_list = list(parent._cells.values())  # pylint: disable=protected-access
    new.update_parameters_name(prefix)
    return new


def invalidate_compiled_graph(cell):
    """Make ``cell``'s next call compile a new graph (after its sub-Cells or a Parameter's shape changed).

    A compiled top-level Cell keeps running its old graph after its sub-Cells are swapped. MindSpore keys the
    compiled graphs of a Cell by its creation time, so a new creation time forces a recompilation; the old graphs
    are released.
    """
    from mindspore.graph.api import _cell_graph_executor  # pylint: disable=import-outside-toplevel
    cache = getattr(cell, '_compile_cache', None)
    if cache:
        _cell_graph_executor.del_net_res(cell, set(cache))
        cache.clear()
    object.__setattr__(cell, '_create_time', time.time_ns())
