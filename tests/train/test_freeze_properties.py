"""Property-based tests (hypothesis) of the freezing rules against a pure-Python model of them.

The rule (MindPet's): ``include`` globs freeze what they match, ``exclude`` globs make trainable what they match, a
name matched by both (or neither) keeps its state; run-time state parameters (``mindpet_state_*``) never become
trainable; a pattern matching no parameter, or no pattern at all, is a ValueError. ``freeze_delta(mode)`` first
makes exactly the mode's delta parameters trainable, then applies the same rule; ``freeze_from_config`` reads the
same lists from YAML.
"""
import os
import tempfile
from fnmatch import fnmatchcase

import numpy as np
import pytest
import yaml
from hypothesis import given, settings, strategies as st, HealthCheck
from mindspore import nn, Parameter, Tensor

from mindpet.graph import freeze_modules, freeze_delta, freeze_from_config

SEGMENTS = ['enc', 'dec', 'layer0', 'layer1', 'dense', 'attn']
LEAVES = ['weight', 'bias', 'gamma', 'mindpet_delta_lora_a', 'mindpet_delta_lora_b', 'mindpet_delta_adapter_w',
          'mindpet_state_lora_scaling']
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def models(draw):
    """(names, initial requires_grad) of a Cell tree: dotted paths of SEGMENTS ending in a LEAVES parameter."""
    paths = draw(st.lists(st.tuples(st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=3),
                                    st.sampled_from(LEAVES)), min_size=1, max_size=10))
    names = sorted({'.'.join(cells + [leaf]) for cells, leaf in paths})
    # A name cannot be both a parameter and a sub-Cell path.
    names = [n for n in names if not any(other.startswith(n + '.') for other in names)]
    initial = {n: draw(st.booleans()) and 'mindpet_state_' not in n for n in names}
    return names, initial


def patterns_for(names):
    """Globs built from the names' own pieces, plus a few generic and non-matching ones."""
    pieces = sorted({piece for name in names for piece in name.split('.')})
    return st.one_of(
        st.sampled_from(['*', '*bias', '*weight', '*mindpet_delta_*', '*lora_?', '*.[wb]*', 'nomatch*', '*enc.*']),
        st.sampled_from(names),
        st.sampled_from(pieces).map(lambda p: f'*{p}*'),
        st.sampled_from(pieces).map(lambda p: f'{p}.*'),
    )


def build(names, initial):
    root = nn.Cell()
    for name in names:
        *cells, leaf = name.split('.')
        node = root
        for cell in cells:
            if cell not in node._cells:
                node.insert_child_to_cell(cell, nn.Cell())
            node = node._cells[cell]
        node.insert_param_to_cell(leaf, Parameter(Tensor(np.zeros(1, np.float32)), name=leaf,
                                                  requires_grad=initial[name]))
    return root


def state(cell):
    return {name: param.requires_grad for name, param in cell.parameters_and_names()}


def rule(names, current, include, exclude):
    """The freezing rule, in plain Python. Returns the new states, or raises ValueError."""
    if include is None and exclude is None:
        raise ValueError('no pattern')
    for patterns in (include, exclude):
        if patterns is not None and not patterns:
            raise ValueError('empty list')
        for pattern in patterns or ():
            if not any(fnmatchcase(n, pattern) for n in names):
                raise ValueError(f'{pattern} matches nothing')
    result = dict(current)
    for name in names:
        frozen = any(fnmatchcase(name, p) for p in include or ())
        thawed = any(fnmatchcase(name, p) for p in exclude or ())
        if frozen and not thawed:
            result[name] = False
        elif thawed and not frozen and 'mindpet_state_' not in name:
            result[name] = True
    return result


@st.composite
def cases(draw):
    names, initial = draw(models())
    pattern_lists = st.one_of(st.none(), st.lists(patterns_for(names), min_size=0, max_size=3))
    return names, initial, draw(pattern_lists), draw(pattern_lists)


@SETTINGS
@given(cases())
def test_freeze_modules_follows_the_rule(case):
    names, initial, include, exclude = case
    cell = build(names, initial)
    assert sorted(state(cell)) == names
    try:
        expected = rule(names, initial, include, exclude)
    except ValueError:
        with pytest.raises(ValueError):
            freeze_modules(cell, include=include, exclude=exclude)
        assert state(cell) == initial  # a refused call changes nothing
        return
    freeze_modules(cell, include=include, exclude=exclude)
    assert state(cell) == expected


@SETTINGS
@given(cases(), st.sampled_from(['lora', 'adapter', 'LoRA']))
def test_freeze_delta_follows_the_rule(case, mode):
    names, initial, include, exclude = case
    include, exclude = include or None, exclude or None  # an empty list is refused like for freeze_modules
    marker = f'mindpet_delta_{mode.lower()}_'
    cell = build(names, initial)
    base = {n: marker in n.rsplit('.', 1)[-1] for n in names}
    if not any(base.values()):
        with pytest.raises(ValueError, match='found no parameter'):
            freeze_delta(cell, mode, include=include, exclude=exclude)
        assert state(cell) == initial
        return
    try:
        expected = rule(names, base, include, exclude) if (include or exclude) else base
    except ValueError:
        with pytest.raises(ValueError, match='matches no parameter'):
            freeze_delta(cell, mode, include=include, exclude=exclude)
        assert state(cell) == initial  # a mistyped pattern is refused before anything is frozen
        return
    freeze_delta(cell, mode, include=include, exclude=exclude)
    assert state(cell) == expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_freeze_from_config_equals_freeze_modules(case):
    names, initial, include, exclude = case
    if not include and not exclude:
        return
    section = {key: value for key, value in (('include', include), ('exclude', exclude)) if value}
    try:
        expected = rule(names, initial, section.get('include'), section.get('exclude'))
    except ValueError:
        expected = ValueError
    cell = build(names, initial)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, 'freeze.yaml')
        with open(path, 'w', encoding='utf-8') as handle:
            yaml.safe_dump({'freeze': section}, handle)
        if expected is ValueError:
            with pytest.raises(ValueError):
                freeze_from_config(cell, path)
        else:
            freeze_from_config(cell, path)
            assert state(cell) == expected
