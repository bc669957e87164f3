"""Activation recompute per block: keep a block's inputs instead of its intermediate activations during the forward
pass, and recompute the activations in the backward pass (MindSpore's ``Cell.recompute()``).

Training memory then holds the activations of one block at a time instead of all of them, for one more forward
pass of each block per step. For LoRA this is the memory that grows with the sequence length; the frozen weights
and the adapters are unchanged. Gradients are the same (see ``doc/recompute.md`` for what was measured).

Two MindSpore behaviours shape this module:

* ``Cell.recompute()`` can be set once per Cell, and not on a Cell whose parent is set. So
  :func:`apply_recompute` skips blocks already covered and refuses a block holding a recomputed one.
* In PYNATIVE_MODE the default (``use_reentrant=True``) recompute takes the list of trainable Parameters when it is
  set: an adapter injected afterwards gets wrong gradients (measured: 0.05 off on a LoRA ``B``). The saved-tensors
  form (``use_reentrant=False``) has no such list, so it is the one used here; GRAPH_MODE ignores the argument.
"""
from mindpet.tuners.config import check_patterns
from mindpet.tuners.inject import matches_any
from mindpet.utils.validation import FieldTypeError, FieldValueError, check_cell

_OWNER = 'apply_recompute'
#: modules whose Cells are mindpet's delta layers (LoRADense, LoraLayer, adapters, prefixes, mixed-batch views)
_DELTA_MODULES = ('mindpet.delta.', 'mindpet.serving')
#: how many names an error lists
_SHOWN = 6


def _network(model):
    """The adapted network of a PetModel (names as ``target_modules`` sees them), else ``model`` itself."""
    from mindpet.model import PetModel  # pylint: disable=import-outside-toplevel
    return model.base_model if isinstance(model, PetModel) else model


def _is_delta_layer(cell):
    return type(cell).__module__.startswith(_DELTA_MODULES)


def _is_recomputed(cell):
    # Set only by Cell.recompute() itself (children of a recomputed Cell get flags, not this).
    return getattr(cell, '_recompute_cell', None) is not None


def _inside(name, parent):
    return parent == '' or name.startswith(parent + '.')


def repeated_blocks(model):
    """The names of the items of the largest ``nn.CellList``/``nn.SequentialCell`` in ``model`` (most parameter
    elements; ties: more items, then the first found): a transformer's blocks. Empty when there is no such list
    with at least two items that are not delta layers.

    Example:
        >>> from mindspore import nn
        >>> repeated_blocks(nn.SequentialCell([nn.Dense(4, 4), nn.ReLU(), nn.Dense(4, 4)]))
        ['0', '1', '2']
    """
    from mindspore import nn  # pylint: disable=import-outside-toplevel
    best, best_key = [], None
    for name, cell in _network(model).cells_and_names():
        if not isinstance(cell, (nn.CellList, nn.SequentialCell)) or _is_delta_layer(cell):
            continue
        items = [(f'{name}.{key}' if name else key, item) for key, item in cell.name_cells().items()]
        items = [(n, c) for n, c in items if not _is_delta_layer(c)]
        if len(items) < 2:
            continue
        size = sum(int(p.size) for _, c in items for p in c.get_parameters())
        key = (size, len(items))
        if best_key is None or key > best_key:
            best, best_key = [n for n, _ in items], key
    return best


def recomputed_blocks(model):
    """The names of the Cells of ``model`` set to recompute (outermost ones; names as in ``cells_and_names()`` of
    the network, the PetModel's ``base_model`` for a PetModel).

    Example:
        >>> from mindspore import nn
        >>> net = nn.SequentialCell([nn.Dense(4, 4), nn.Dense(4, 4)])
        >>> _ = apply_recompute(net, '0')
        >>> recomputed_blocks(net)
        ['0']
    """
    found = []
    for name, cell in _network(model).cells_and_names():
        if _is_recomputed(cell) and not any(_inside(name, outer) for outer in found):
            found.append(name)
    return found


def _select(network, cells, blocks):
    """The outermost cells matching ``blocks`` (names and cells), or the detected blocks for None."""
    if blocks is None:
        wanted = set(repeated_blocks(network))
        if not wanted:
            raise FieldValueError(
                f"For '{_OWNER}', 'blocks' is None, so the blocks are the items of the model's largest nn.CellList "
                f"or nn.SequentialCell, but the model has no such list of at least two Cells; name the blocks with "
                f"a pattern (cell names look like {_candidates(cells)}).", field='blocks')
        return [(n, c) for n, c in cells if n in wanted]
    chosen = []
    for name, cell in cells:
        if name and matches_any(name, blocks) and not any(_inside(name, outer) for outer, _ in chosen):
            chosen.append((name, cell))
    if not chosen:
        raise FieldValueError(f"For '{_OWNER}', the 'blocks' patterns {blocks} match no cell of the model; cell "
                              f"names look like {_candidates(cells)}.", field='blocks')
    return chosen


def _candidates(cells):
    """A few names worth matching: the detected blocks' parents' children and the top-level cells."""
    names = [n for n, c in cells if n and n.count('.') <= 1 and not _is_delta_layer(c)]
    return names[:_SHOWN] + (['...'] if len(names) > _SHOWN else [])


def _check_chosen(cells, chosen):
    """Refuse a delta layer, a Cell inside one, and a Cell holding a Cell recomputed on its own."""
    delta_names = [n for n, c in cells if _is_delta_layer(c)]
    recomputed = [n for n, c in cells if _is_recomputed(c)]
    for name, _ in chosen:
        holder = next((d for d in delta_names if _inside(name, d) or name == d), None)
        if holder is not None:
            what = 'is' if holder == name else f"is inside '{holder}', which is"
            raise FieldValueError(
                f"For '{_OWNER}', 'blocks' must name blocks of the model, not mindpet's delta layers, but "
                f"'{name}' {what} a delta layer; recompute the block holding it instead.", field='blocks')
        inner = next((r for r in recomputed if r != name and _inside(r, name)), None)
        if inner is not None and not _is_recomputed(_cell(cells, name)):
            raise FieldValueError(
                f"For '{_OWNER}', 'blocks' matches '{name}', which holds '{inner}', already set to recompute: "
                f"MindSpore sets recompute once, on a Cell or on its parent, not both.", field='blocks')


def _cell(cells, name):
    return next(c for n, c in cells if n == name)


def apply_recompute(model, blocks=None):
    """Set activation recompute on each block of ``model`` (``Cell.recompute()``); returns the names recomputed.

    Call it before the training step is built (a compiled graph keeps what it compiled). It is idempotent: blocks
    already recomputed, or inside a recomputed Cell, are left as they are. Adapters may be injected before or
    after: the recompute covers the block's computation whatever its sub-Cells are when the graph compiles.

    Args:
        model (nn.Cell | PetModel): the network (or its PetModel: names are then the base model's, as for
            ``target_modules``).
        blocks (str | list[str] | None): cell-name patterns matched like ``target_modules`` (a regular-expression
            full match or a dot-separated suffix of a ``cells_and_names()`` name; the outermost match wins), or
            None: the items of the model's largest ``nn.CellList``/``nn.SequentialCell`` (its repeated blocks).

    Returns:
        list[str]: every block of ``model`` set to recompute, this call's and earlier ones (outermost names).

    Raises:
        TypeError: ``model`` is not a Cell, or ``blocks`` is not a str, a list of str or None.
        ValueError: a pattern is not a regular expression or matches nothing; None and no repeated blocks; a
            matched cell is (or is inside) a delta layer, or holds a Cell recomputed on its own. Nothing is changed.

    Example:
        >>> import mindpet
        >>> net = build_gpt()          # blocks.0 ... blocks.N-1 in an nn.CellList  # doctest: +SKIP
        >>> pet = mindpet.get_pet_model(net, mindpet.LoraConfig(target_modules=['q_proj', 'v_proj']))
        >>> apply_recompute(pet)  # doctest: +SKIP
        ['blocks.0', 'blocks.1']
        >>> apply_recompute(pet, r'blocks\\.\\d+')      # again: nothing changes  # doctest: +SKIP
        ['blocks.0', 'blocks.1']
    """
    check_cell('model', model, _OWNER)
    if blocks is not None and not isinstance(blocks, (str, list, tuple)):
        raise FieldTypeError(f"For '{_OWNER}', the 'blocks' must be a str, a list of str or None, but got "
                             f"{blocks!r} ({type(blocks).__name__}).", field='blocks')
    patterns = None if blocks is None else check_patterns(_OWNER, 'blocks', blocks, allow_none=False)
    network = _network(model)
    cells = list(network.cells_and_names())
    chosen = _select(network, cells, patterns)
    _check_chosen(cells, chosen)
    covered = recomputed_blocks(network)
    for name, cell in chosen:
        if _is_recomputed(cell) or any(_inside(name, outer) for outer in covered):
            continue
        cell.recompute(use_reentrant=False)
    return recomputed_blocks(network)


__all__ = ['apply_recompute', 'recomputed_blocks', 'repeated_blocks']
