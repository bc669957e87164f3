"""The checks every method of :func:`mindpet.get_pet_model` passes, shared by tests/tuners/test_<method>.py.

A test module describes its method with a :class:`Case` (configs, the expected adapted layers, whether the method is
the identity at init and whether it merges) and runs its own checks (injection, YAML, what only it does);
tests/tuners/test_lifecycle_checks.py runs the training, round-trip, switching and merge checks on every Case, each on
a :func:`trained_pair_once` (two adapters trained in GRAPH_MODE on two toy tasks and saved, built once a session). The network is tests/gpt_like.py's GPTLike,
a model written without mindpet.
"""
import dataclasses
import os
from types import SimpleNamespace
from typing import Callable, List, Optional

import numpy as np
import pytest
import yaml
import mindspore as ms
from mindspore import nn
from safetensors.numpy import load_file

from mindpet import PetModel, get_pet_model, config_from_dict
from mindpet.adapter_store import adapter_weights_path, merge_into_checkpoint
from mindpet.naming import is_pet_param
from mindpet.cli import main as mindpet_command
from mindpet.utils.exceptions import ModelConfigKeysInfoError

from tests.gpt_like import GPTLike, LMLoss, token_batch


@dataclasses.dataclass
class Case:
    """One method under test.

    ``make_net(seed)`` builds the base network (same weights for the same seed); ``config_a``/``config_b`` are two
    adapters' configs (``config_b`` may target more layers or use other sizes); ``keys_a`` the layers ``config_a``
    adapts; ``layer_class`` their new class (None: no layer is replaced). ``identity``: 'exact' / 'close' when the
    adapted model equals the base at init, None when the method starts elsewhere. ``loss(net)`` builds the training
    loss Cell ``(input_ids, labels) -> loss``.
    """
    config_a: object
    config_b: object
    keys_a: List[str]
    layer_class: Optional[type]
    identity: Optional[str] = 'exact'
    mergeable: bool = True
    make_net: Callable = GPTLike
    loss: Callable = LMLoss
    seq: int = 16
    steps: int = 6
    lr: float = 0.02
    #: whether switching between the two adapters reuses the compiled graph
    switch_in_graph: bool = True
    #: whether disabling (and deleting the active adapter) reuses the compiled graph
    disable_in_graph: bool = True
    #: how disabled adapters match the base outputs ('exact' / 'close'); None: as ``identity`` (else 'exact')
    disabled: Optional[str] = None


def batch(case, task='shift', seed=0):
    return token_batch(task, seq=case.seq, seed=seed)


def snapshot(net):
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def delta_values(pet):
    return {p.name: p.asnumpy().copy() for p in pet.get_parameters() if 'mindpet_delta_' in p.name}


def assert_outputs(actual, expected, how):
    if how == 'exact':
        np.testing.assert_array_equal(actual, expected)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def train_steps(case, pet, task):
    """``case.steps`` Adam steps of ``pet``'s trainable parameters on ``task`` (in the current mode)."""
    step = nn.TrainOneStepCell(case.loss(pet), nn.Adam(pet.trainable_params(), learning_rate=case.lr))
    step.set_train()
    ids, labels = batch(case, task)
    losses = [float(step(ids, labels).asnumpy()) for _ in range(case.steps)]
    pet.set_train(False)
    return losses


def trained_pair(case, root):
    """Two adapters from the same base, saved under ``root`` with their outputs: 'a' (``config_a``) trained in
    GRAPH_MODE on the 'shift' task (parameters kept before/after), 'b' (``config_b``) with randomised values."""
    ms.set_context(mode=ms.GRAPH_MODE)
    ids, _ = batch(case, seed=5)
    base_out = case.make_net()(ids).asnumpy()
    pet_a = get_pet_model(case.make_net(), case.config_a, adapter_name='a')
    trainable_a = sorted(p.name for p in pet_a.trainable_params())
    before_a = snapshot(pet_a)
    losses_a = train_steps(case, pet_a, 'shift')
    after_a = snapshot(pet_a)
    out_a = pet_a(ids).asnumpy()
    pet_a.save_pretrained(os.path.join(root, 'a'))
    # The second adapter only has to differ: random values instead of a second (compiled) training run.
    pet_b = get_pet_model(case.make_net(), case.config_b, adapter_name='b')
    rng = np.random.RandomState(3)
    for param in pet_b.trainable_params():
        param.set_data(ms.Tensor(param.asnumpy() + rng.randn(*param.shape).astype(np.float32) * 0.1, param.dtype))
    out_b = pet_b(ids).asnumpy()
    pet_b.save_pretrained(os.path.join(root, 'b'))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return SimpleNamespace(ids=ids, base_out=base_out, out_a=out_a, out_b=out_b, losses_a=losses_a,
                           trainable_a=trainable_a, before_a=before_a, after_a=after_a,
                           saved_a=delta_values(pet_a) if case.layer_class else None, root=root,
                           dir_a=os.path.join(root, 'a'), dir_b=os.path.join(root, 'b'))


_TRAINED = {}


def trained_pair_once(case, tmp_path_factory):
    """:func:`trained_pair` of ``case``, built once a test session: the shared checks and the method's own tests
    use the same pair."""
    if id(case) not in _TRAINED:
        _TRAINED[id(case)] = (case, trained_pair(case, str(tmp_path_factory.mktemp('pair'))))
    return _TRAINED[id(case)][1]


# ----- the checks ----------------------------------------------------------------------------------------------
def check_injection(case, tmp_path):
    """Only the matched layers change type, holding the original Parameter objects under their names; a base
    checkpoint loads with nothing left over; outputs equal the base model's at init (when the method is the
    identity at init) in the graph compiled after injection."""
    net = case.make_net()
    ids, _ = batch(case)
    base_out = net(ids).asnumpy()          # the base network's own graph compiles first
    types = {name: type(cell) for name, cell in net.cells_and_names()}
    params = {p.name: p for p in net.get_parameters()}
    pet = get_pet_model(net, case.config_a)
    after = {name: type(cell) for name, cell in net.cells_and_names()}
    changed = sorted(name for name in types if after.get(name) is not types[name])
    if case.layer_class is None:
        assert changed == [] and after == types
    else:
        assert changed == sorted(case.keys_a) == sorted(pet.pet_layers)
        assert all(issubclass(after[name], case.layer_class) for name in changed)
        # New cells only inside the adapted layers (their own sub-cells).
        assert all(any(name.startswith(key + '.') for key in changed) for name in set(after) - set(types))
    live = {p.name: p for p in pet.get_parameters()}
    for name, param in params.items():
        assert live[name] is param, name
    assert all(is_pet_param(name) for name in set(live) - set(params))
    path = str(tmp_path / 'base.ckpt')
    ms.save_checkpoint(case.make_net(seed=7), path)
    param_not_load, ckpt_not_load = ms.load_param_into_net(pet, ms.load_checkpoint(path), strict_load=True)
    assert ckpt_not_load == []
    assert sorted(param_not_load) == sorted(set(live) - set(params))
    if case.identity:
        fresh = get_pet_model(case.make_net(), case.config_a)
        assert_outputs(fresh(ids).asnumpy(), base_out, case.identity)
    return pet


def check_training(case, pair):
    """GRAPH_MODE steps through the PetModel: the loss falls, every trainable parameter changed, every other one
    is bit-identical."""
    assert pair.losses_a[-1] < pair.losses_a[0]
    assert pair.trainable_a
    for name, before in pair.before_a.items():
        if name in pair.trainable_a:
            assert not np.array_equal(before, pair.after_a[name]), name
        else:
            np.testing.assert_array_equal(before, pair.after_a[name], err_msg=name)
    if pair.out_a.shape == pair.base_out.shape:      # (prompt tuning lengthens the output)
        assert np.abs(pair.out_a - pair.base_out).max() > 1e-3
    assert np.abs(pair.out_a - pair.out_b).max() > 1e-3


def check_round_trip(case, pair, tmp_path):
    """save_pretrained -> from_pretrained gives the trained outputs bit for bit; the file holds exactly the trained
    adapter tensors; a re-save writes the same tensors."""
    ms.set_context(mode=ms.GRAPH_MODE)
    stored = load_file(adapter_weights_path(pair.dir_a))
    if pair.saved_a is not None:
        assert sorted(n for n in stored if 'mindpet_delta_' in n) == sorted(pair.saved_a)
        for name, value in pair.saved_a.items():
            np.testing.assert_array_equal(stored[name], value)
    for name, value in stored.items():
        if name in pair.after_a:
            np.testing.assert_array_equal(value, pair.after_a[name], err_msg=name)
    pet = PetModel.from_pretrained(case.make_net(), pair.dir_a)
    assert pet.trainable_params() == []
    np.testing.assert_array_equal(pet(pair.ids).asnumpy(), pair.out_a)
    pet.save_pretrained(str(tmp_path / 'again'))
    again = load_file(adapter_weights_path(str(tmp_path / 'again')))
    assert sorted(again) == sorted(stored)
    for name, value in again.items():
        np.testing.assert_array_equal(value, stored[name])
    ms.set_context(mode=ms.PYNATIVE_MODE)


def check_switching(case, pair):
    """Two adapters in one PetModel, switched in an already-compiled graph: each adapter's own outputs, and the base
    model's outputs with the adapters disabled or the active one deleted.

    Outputs are exact until a larger adapter is loaded. After that, a smaller adapter runs zero-padded to the larger
    size (see ``write_padded``): the zeros add exact zeros, but a longer inner dimension changes how the CPU matmul
    kernel blocks its sums, so on some processors (AVX-512 here) the outputs move by an ulp. They are then compared
    to 1e-6, far below the difference between the two adapters, which is checked to be large.
    """
    ms.set_context(mode=ms.GRAPH_MODE)
    ids = pair.ids
    assert np.abs(pair.out_a - pair.out_b).max() > 1e-3    # the switch is visible far above the tolerance
    same = lambda actual, expected: np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)  # noqa: E731
    pet = PetModel.from_pretrained(case.make_net(), pair.dir_a, adapter_name='a')
    np.testing.assert_array_equal(pet(ids).asnumpy(), pair.out_a)
    pet.load_adapter(pair.dir_b, 'b')
    same(pet(ids).asnumpy(), pair.out_a)
    pet.set_adapter('b')
    same(pet(ids).asnumpy(), pair.out_b)
    compiled = len(pet.compile_cache)
    for _ in range(2):
        pet.set_adapter('a')
        same(pet(ids).asnumpy(), pair.out_a)
        pet.set_adapter('b')
        same(pet(ids).asnumpy(), pair.out_b)
    if case.switch_in_graph:
        assert len(pet.compile_cache) == compiled
    with pet.disable_adapter():
        assert_outputs(pet(ids).asnumpy(), pair.base_out, case.disabled or case.identity or 'exact')
    same(pet(ids).asnumpy(), pair.out_b)
    if case.switch_in_graph and case.disable_in_graph:
        assert len(pet.compile_cache) == compiled
    pet.delete_adapter('b')
    assert pet.active_adapter is None
    assert_outputs(pet(ids).asnumpy(), pair.base_out, case.disabled or case.identity or 'exact')
    ms.set_context(mode=ms.PYNATIVE_MODE)


def check_merge(case, pair, tmp_path):
    """Mergeable: merge() == unmerged (1e-5) in the compiled graph, unmerge() restores it, merge_and_unload()
    gives plain layers, ``mindpet merge`` gives the same checkpoint. Otherwise: a clear error, nothing changed,
    and unload() gives back the base network."""
    ms.set_context(mode=ms.GRAPH_MODE)
    ids = pair.ids
    pet = PetModel.from_pretrained(case.make_net(), pair.dir_a)
    np.testing.assert_array_equal(pet(ids).asnumpy(), pair.out_a)
    if case.mergeable:
        weights = snapshot(pet)
        pet.merge()
        np.testing.assert_allclose(pet(ids).asnumpy(), pair.out_a, rtol=1e-5, atol=1e-5)
        pet.unmerge()
        np.testing.assert_allclose(pet(ids).asnumpy(), pair.out_a, rtol=1e-5, atol=1e-5)
        for name, value in snapshot(pet).items():
            np.testing.assert_allclose(value, weights[name], rtol=1e-5, atol=1e-6, err_msg=name)
        plain = pet.merge_and_unload()
        assert not any(is_pet_param(p.name) for p in plain.get_parameters())
        if case.layer_class is not None:
            assert not any(isinstance(c, case.layer_class) for _, c in plain.cells_and_names())
        np.testing.assert_allclose(plain(ids).asnumpy(), pair.out_a, rtol=1e-5, atol=1e-5)
        base_path, merged_path = str(tmp_path / 'base.ckpt'), str(tmp_path / 'merged.ckpt')
        ms.save_checkpoint(case.make_net(), base_path)
        merge_into_checkpoint(base_path, pair.dir_a, merged_path)
        merged = {name: value.asnumpy() for name, value in ms.load_checkpoint(merged_path).items()}
        plain_params = snapshot(plain)
        assert sorted(merged) == sorted(plain_params)
        for name, value in merged.items():      # the same weights as merging in the network
            np.testing.assert_allclose(value, plain_params[name], rtol=1e-5, atol=1e-6, err_msg=name)
    else:
        weights = snapshot(pet)
        with pytest.raises(NotImplementedError, match=f"'{case.config_a.method}' method cannot be merged"):
            pet.merge()
        with pytest.raises(NotImplementedError, match='cannot be merged'):
            pet.merge_and_unload()
        assert not pet.merged
        for name, value in snapshot(pet).items():
            np.testing.assert_array_equal(value, weights[name], err_msg=name)
        np.testing.assert_array_equal(pet(ids).asnumpy(), pair.out_a)
        base_path = str(tmp_path / 'base.ckpt')
        ms.save_checkpoint(case.make_net(), base_path)
        with pytest.raises(NotImplementedError, match='cannot be merged'):
            merge_into_checkpoint(base_path, pair.dir_a, str(tmp_path / 'out.ckpt'))
        # The command line reports it in one line (status 1), writing nothing.
        assert mindpet_command(['merge', '--base', base_path, '--adapter', pair.dir_a, '--out',
                                str(tmp_path / 'out.ckpt')]) == 1
        assert not os.path.exists(tmp_path / 'out.ckpt')
        net = pet.unload()
        assert not any(is_pet_param(p.name) for p in net.get_parameters())
        assert_outputs(net(ids).asnumpy(), pair.base_out, 'exact')
    ms.set_context(mode=ms.PYNATIVE_MODE)


def check_yaml(config, typo, bad_values):
    """The config as a YAML ``pet:`` section reads back equal; a misspelt key is refused with a suggestion; bad
    values are refused naming the field. ``typo``: (wrong key, the key it should suggest); ``bad_values``: list of
    (field, value, exception type)."""
    text = yaml.safe_dump({'model': {'hidden': 32}, 'pet': config.to_dict()})
    section = yaml.safe_load(text)['pet']
    assert section['type'] == config.method
    assert config_from_dict(section) == config
    wrong, right = typo
    data = dict(section)
    data[wrong] = data.pop(right)
    with pytest.raises(ModelConfigKeysInfoError, match=f"did you mean '{right}'"):
        config_from_dict(data)
    for field, value, error in bad_values:
        with pytest.raises(error, match=f"'{field}'"):
            config_from_dict(dict(section, **{field: value}))
