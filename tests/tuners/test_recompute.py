"""Activation recompute (mindpet.recompute.apply_recompute): the same loss and gradients as without it (1e-5), the
compiled graph really recomputes, LoRA injected before or after, training leaves frozen weights bit-identical,
idempotence, and bad input refused with the model unchanged."""
import glob
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

from mindpet import LoraConfig, get_pet_model
from mindpet.recompute import apply_recompute, recomputed_blocks, repeated_blocks
from tests.gpt_like import GPTLike, LMLoss, token_batch

BLOCKS = ['blocks.0', 'blocks.1']


class GradStep(nn.Cell):
    """``(ids, labels) -> (loss, grads of the trainable parameters)`` in one graph."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.weights = ms.ParameterTuple(net.trainable_params())
        self.grad = ms.value_and_grad(LMLoss(net), None, self.weights)

    def construct(self, ids, labels):
        return self.grad(ids, labels)


def _lora_gpt(recompute, order='after', dropout=0.0):
    """GPTLike with LoRA on q/v (B random, so every adapter gradient is non-zero); recompute set before or after
    the LoRA injection, or not at all."""
    net = GPTLike(seed=0)
    if recompute and order == 'before':
        apply_recompute(net)
    pet = get_pet_model(net, LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=4, lora_dropout=dropout))
    rng = np.random.RandomState(3)
    for layer in pet.pet_layers.values():
        b = layer.mindpet_delta_lora_b
        b.set_data(ms.Tensor(rng.randn(*b.shape).astype(np.float32) * 0.1))
    if recompute and order == 'after':
        apply_recompute(pet)
    return pet


def _loss_and_grads(pet):
    step = GradStep(pet)
    step.set_train(True)
    ids, labels = token_batch('shift')
    step(ids, labels)                       # the graph has run once: the second call is the cached graph
    loss, grads = step(ids, labels)
    names = [p.name for p in pet.trainable_params()]
    return float(loss.asnumpy()), dict(zip(names, (g.asnumpy() for g in grads)))


@pytest.mark.parametrize('order', ['after', 'before'])
def test_gradients_equal_without_recompute(graph_mode, order):
    loss_ref, grads_ref = _loss_and_grads(_lora_gpt(False))
    pet = _lora_gpt(True, order)
    assert recomputed_blocks(pet) == BLOCKS
    loss, grads = _loss_and_grads(pet)
    assert loss == pytest.approx(loss_ref, abs=1e-6)
    assert sorted(grads) == sorted(grads_ref) and len(grads) == 8      # A and B of q, v in 2 blocks
    for name, ref in grads_ref.items():
        assert np.abs(ref).max() > 1e-4, name                           # a real gradient, not zeros on both sides
        np.testing.assert_allclose(grads[name], ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_dropout_mask_is_recomputed_identically(graph_mode):
    # The recomputed forward must draw the same dropout mask as the first one, or the gradients would not match.
    loss_ref, grads_ref = _loss_and_grads(_lora_gpt(False, dropout=0.3))
    loss, grads = _loss_and_grads(_lora_gpt(True, dropout=0.3))
    assert loss == pytest.approx(loss_ref, abs=1e-6)
    for name, ref in grads_ref.items():
        np.testing.assert_allclose(grads[name], ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_pynative_lora_injected_after_recompute_gets_its_gradients():
    # MindSpore's default PyNative recompute (use_reentrant=True) lists the trainable Parameters when it is set, so an
    # adapter injected afterwards got wrong gradients (0.05 off, measured); apply_recompute uses the other form.
    ms.set_context(mode=ms.PYNATIVE_MODE)
    loss_ref, grads_ref = _loss_and_grads(_lora_gpt(False))
    loss, grads = _loss_and_grads(_lora_gpt(True, 'before'))
    assert loss == pytest.approx(loss_ref, abs=1e-6)
    for name, ref in grads_ref.items():
        assert np.abs(ref).max() > 1e-4, name
        np.testing.assert_allclose(grads[name], ref, rtol=1e-5, atol=1e-5, err_msg=name)


def _compiled_matmuls(pet, directory):
    """MatMul nodes in the executed graph of one gradient step (the IR MindSpore saves)."""
    ms.set_context(save_graphs=1, save_graphs_path=str(directory))
    try:
        GradStep(pet)(*token_batch('shift'))
    finally:
        ms.set_context(save_graphs=0)
    (path,) = glob.glob(os.path.join(str(directory), 'graph_build_*.ir'))
    with open(path, encoding='utf-8') as fh:
        return fh.read().count('MatMul(')


def test_graph_recomputes_the_blocks_forward(graph_mode, tmp_path):
    # Without recompute the step's graph holds each forward MatMul once; with it, the blocks' forward MatMuls appear
    # a second time in the backward pass (the equal gradients above would also hold for a no-op).
    plain = _compiled_matmuls(_lora_gpt(False), tmp_path / 'plain')
    recomputed = _compiled_matmuls(_lora_gpt(True), tmp_path / 'recompute')
    # A block's forward has 12 MatMuls (q, k, v, out, fc_in, fc_out, 2 in attention, LoRA's A and B on q and v);
    # those whose results the backward needs are recomputed: 11 per block measured (56 -> 78 for 2 blocks).
    assert recomputed - plain >= 2 * 8, (plain, recomputed)


def test_training_leaves_frozen_weights_bit_identical(graph_mode):
    def trained(recompute):
        pet = _lora_gpt(recompute)
        before = {p.name: p.asnumpy().copy() for p in pet.get_parameters()}
        step = nn.TrainOneStepCell(LMLoss(pet), nn.Adam(pet.trainable_params(), learning_rate=0.01))
        step.set_train(True)
        ids, labels = token_batch('shift')
        losses = [float(step(ids, labels).asnumpy()) for _ in range(4)]
        return pet, before, losses

    _, _, losses_ref = trained(False)
    pet, before, losses = trained(True)
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-5)
    assert losses[-1] < losses[0]
    trainable = {p.name for p in pet.trainable_params()}
    for param in pet.get_parameters():
        if param.name in trainable:
            assert not np.array_equal(param.asnumpy(), before[param.name]), param.name
        else:
            assert np.array_equal(param.asnumpy(), before[param.name]), param.name


def test_detects_the_largest_list_and_is_idempotent():
    net = GPTLike(seed=0)
    assert repeated_blocks(net) == BLOCKS
    assert recomputed_blocks(net) == []
    assert apply_recompute(net) == BLOCKS
    assert apply_recompute(net, r'blocks\.\d+') == BLOCKS          # already set: nothing changes
    assert apply_recompute(net, 'attn') == BLOCKS                  # inside a recomputed block: covered
    assert [n for n, c in net.cells_and_names() if getattr(c, '_recompute_cell', None) is not None] == BLOCKS


def test_pattern_takes_the_outermost_match():
    net = GPTLike(seed=0)
    assert apply_recompute(net, [r'blocks\.1', r'blocks\.1\.attn']) == ['blocks.1']


BAD = [
    (None, 'blocks', 3, TypeError, "'blocks' must be a str, a list of str or None, but got 3 (int)"),
    (None, 'blocks', ['('], ValueError, "pattern '(' in 'blocks' is not a valid regular expression"),
    (None, 'blocks', [], ValueError, "'blocks' must be a non-empty list of str, but got [] (list)"),
    (None, 'blocks', 'nothing', ValueError, "the 'blocks' patterns ['nothing'] match no cell of the model; cell "
                                            "names look like ['embed', 'blocks', 'blocks.0', 'blocks.1'"),
    ('lora', 'blocks', 'q_proj', ValueError, "'blocks.0.attn.q_proj' is a delta layer"),
    ('lora', 'blocks', r'.*q_proj\.lora_dropout', ValueError,
     "'blocks.0.attn.q_proj.lora_dropout' is inside 'blocks.0.attn.q_proj', which is a delta layer"),
    ('attn', 'blocks', None, ValueError, "'blocks' matches 'blocks.0', which holds 'blocks.0.attn', already set"),
    ('dense', 'blocks', None, ValueError, "'blocks' is None, so the blocks are the items of the model's largest "
                                          "nn.CellList"),
    (None, 'model', 'not a cell', TypeError, "the 'model' must be a mindspore.nn.Cell, but got 'not a cell' (str)"),
]


@pytest.mark.parametrize('setup, arg, value, error, message', BAD, ids=[row[4][:40] for row in BAD])
def test_bad_input_is_refused_and_changes_nothing(setup, arg, value, error, message):
    net = nn.Dense(4, 4) if setup == 'dense' else GPTLike(seed=0)
    if setup == 'lora':
        net = get_pet_model(net, LoraConfig(target_modules=['q_proj', 'v_proj']))
    if setup == 'attn':
        apply_recompute(net, 'attn')
    before = recomputed_blocks(net)
    kwargs = {'model': net, 'blocks': None, arg: value}
    with pytest.raises(error) as info:
        apply_recompute(**kwargs)
    assert message in str(info.value)
    assert getattr(info.value, 'field', None) == arg
    assert recomputed_blocks(net) == before
