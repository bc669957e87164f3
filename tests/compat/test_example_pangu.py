"""The PanGu-alpha example: attention with prefix keys/values against NumPy, the top query layer, the LM loss,
greedy generation, LoRA on the projections and prefix training, all in GRAPH_MODE; the corpus pipeline."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from examples.pangu_alpha.data import CharTokenizer, lm_arrays, lm_dataset, load_lines, task_prompts
from examples.pangu_alpha.model import (FULL_2_6B_CONFIG, TINY_CONFIG, CausalLMWithLoss, PanguAlphaForCausalLM,
                                        PanguAttention, PanguConfig, greedy_generate)
from mindpet.graph import freeze_delta
from tests.example_helpers import (changed_names, graph, snapshot, swap_dense_for_lora,  # noqa: F401 (fixture)
                                   train_steps, trainable_names)

SMALL = dict(TINY_CONFIG, hidden_size=16, num_heads=2, ffn_hidden_size=32, seq_length=16)


def test_configs():
    full = PanguConfig.from_dict(FULL_2_6B_CONFIG)
    assert (full.num_layers, full.hidden_size, full.num_heads, full.head_dim, full.vocab_size) == \
        (32, 2560, 32, 80, 40000)
    # 2.6B parameters: per layer 12 h^2 + 13 h, plus word/position/top-query embeddings and final LayerNorm.
    h, layers = full.hidden_size, full.num_layers
    total = layers * (12 * h * h + 13 * h) + (full.vocab_size + 2 * full.seq_length) * h + 2 * h
    assert 2.6e9 < total < 2.7e9
    assert CharTokenizer().vocab_size <= TINY_CONFIG['vocab_size']
    with pytest.raises(ValueError, match="'num_layers' must be an int >= 2"):
        PanguConfig(num_layers=1)
    with pytest.raises(ValueError, match="'hidden_size' \\(10\\) must be divisible"):
        PanguConfig(hidden_size=10, num_heads=4)
    with pytest.raises(ValueError, match="unknown key 'num_layer'; did you mean 'num_layers'\\?"):
        PanguConfig.from_dict({'num_layer': 2})


def _numpy_attention(att, q_in, kv_in, mask, prefix):
    heads, dim = att.num_heads, att.head_dim

    def dense(cell, x):
        return x @ cell.weight.asnumpy().T + cell.bias.asnumpy()

    def split(x):
        return x.reshape(x.shape[0], x.shape[1], heads, dim).transpose(0, 2, 1, 3)

    q, k, v = split(dense(att.dense1, q_in)), split(dense(att.dense2, kv_in)), split(dense(att.dense3, kv_in))
    if prefix is not None:
        k, v = np.concatenate([prefix[0], k], axis=2), np.concatenate([prefix[1], v], axis=2)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dim)
    scores = np.where(mask[:, None] > 0, scores, scores - 10000.0)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(q_in.shape[0], q_in.shape[1], heads * dim)
    return dense(att.projection, ctx)


def test_attention_with_prefix_matches_numpy(graph):
    rng = np.random.RandomState(0)
    cfg = PanguConfig.from_dict(SMALL)
    att = PanguAttention(cfg)
    batch, seq, plen = 2, 5, 3
    q_in = rng.randn(batch, seq, 16).astype(np.float32)
    kv_in = rng.randn(batch, seq, 16).astype(np.float32)
    causal = np.tril(np.ones((seq, seq), np.float32))
    causal = np.broadcast_to(causal, (batch, seq, seq)).copy()
    causal[1, :, 4] = 0  # a padded key in the second row
    mask = np.concatenate([np.ones((batch, seq, plen), np.float32), causal], axis=2)
    prefix = rng.randn(2, batch, 2, plen, 8).astype(np.float32)
    out = att(Tensor(q_in), Tensor(kv_in), Tensor(mask), Tensor(prefix)).asnumpy()
    np.testing.assert_allclose(out, _numpy_attention(att, q_in, kv_in, mask, prefix), rtol=1e-5, atol=1e-5)
    # After compilation: new key weights and new prefix values reach the graph.
    att.dense2.weight.set_data(Tensor(rng.randn(16, 16).astype(np.float32) * 0.3))
    prefix = prefix * 2.0
    out = att(Tensor(q_in), Tensor(kv_in), Tensor(mask), Tensor(prefix)).asnumpy()
    np.testing.assert_allclose(out, _numpy_attention(att, q_in, kv_in, mask, prefix), rtol=1e-5, atol=1e-5)
    # Without a prefix.
    out = att(Tensor(q_in), Tensor(kv_in), Tensor(causal)).asnumpy()
    np.testing.assert_allclose(out, _numpy_attention(att, q_in, kv_in, causal, None), rtol=1e-5, atol=1e-5)


def _numpy_lm_loss(logits, ids, pad):
    targets = ids[:, 1:]
    shifted = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    weights = (targets != pad).astype(np.float32)
    return float((nll * weights).sum() / weights.sum())


@pytest.fixture(scope='module')
def lm_batch():
    tok = CharTokenizer()
    return lm_arrays(load_lines('corpus')[:4], tok, TINY_CONFIG['seq_length'])


def test_model_loss_top_query_prefix_and_generation(graph, lm_batch):
    ms.set_seed(1)
    net = PanguAlphaForCausalLM(TINY_CONFIG)
    ids = Tensor(lm_batch)
    logits = net(ids).asnumpy()
    assert logits.shape == (4, 64, 64)
    loss = float(CausalLMWithLoss(net)(ids).asnumpy())
    assert abs(loss - _numpy_lm_loss(logits, lm_batch, 0)) < 1e-5
    assert abs(loss - np.log(64)) < 0.1  # near-uniform predictions at initialisation

    # The top query layer's queries come from top_query_embedding: changing row 5 changes position 5 only.
    table = net.backbone.top_query_embedding.embedding_table
    original = table.asnumpy().copy()
    edited = original.copy()
    edited[5] += 20.0 * np.random.RandomState(5).randn(64).astype(np.float32)
    table.set_data(Tensor(edited))
    moved = net(ids).asnumpy()
    table.set_data(Tensor(original))
    diff = np.abs(moved - logits).max(axis=(0, 2))
    assert diff[5] > 1e-4 and np.all(np.delete(diff, 5) == 0)

    # Prefix keys/values: a tuple per layer and one stacked tensor are the same thing; they change the outputs.
    rng = np.random.RandomState(0)
    stacked = rng.randn(3, 2, 4, 4, 2, 16).astype(np.float32)
    with_tuple = net(ids, tuple(Tensor(x) for x in stacked)).asnumpy()
    with_tensor = net(ids, Tensor(stacked)).asnumpy()
    np.testing.assert_allclose(with_tuple, with_tensor, atol=1e-6)
    assert np.abs(with_tensor - logits).max() > 1e-3

    # Greedy generation: each new token is the argmax of the logits at the previous position.
    prompts = [[2] + CharTokenizer().encode('the cat'), [2, 20]]
    generated = greedy_generate(net, prompts, max_new_tokens=4)
    assert [len(g) for g in generated] == [4, 4]
    full = np.zeros((2, 64), np.int32)
    for row, (prompt, gen) in enumerate(zip(prompts, generated)):
        full[row, :len(prompt) + 4] = prompt + gen
    check = net(Tensor(full)).asnumpy()
    for row, (prompt, gen) in enumerate(zip(prompts, generated)):
        for step, token in enumerate(gen):
            assert int(np.argmax(check[row, len(prompt) + step - 1])) == token
    assert greedy_generate(net, prompts, max_new_tokens=4) == generated


class _PrefixLM(nn.Cell):
    """Trainable prefix keys/values (one per layer, shared over the batch) in front of a frozen LM."""

    def __init__(self, net, prefix_len):
        super().__init__()
        cfg = net.config
        self.net = CausalLMWithLoss(net)
        init = np.random.RandomState(0).randn(cfg.num_layers, 2, 1, cfg.num_heads, prefix_len, cfg.head_dim)
        self.mindpet_delta_prefix = Parameter(Tensor(init.astype(np.float32) * 0.5), name='mindpet_delta_prefix')

    def construct(self, input_ids):
        shape = self.mindpet_delta_prefix.shape
        prefix = ops.broadcast_to(self.mindpet_delta_prefix, shape[:2] + (input_ids.shape[0],) + shape[3:])
        return self.net(input_ids, prefix)


def test_lora_swap_and_prefix_training(graph, lm_batch):
    ms.set_seed(2)
    net = PanguAlphaForCausalLM(TINY_CONFIG)
    ids = Tensor(lm_batch)
    loss = float(CausalLMWithLoss(net)(ids).asnumpy())
    swapped = swap_dense_for_lora(net, {'dense1', 'dense3'}, rank=4, alpha=8)
    assert len(swapped) == 6 and 'backbone.top_query_layer.attention.dense1' in swapped

    # The swap is seen by a newly compiled Cell (the training step): its first loss is the unchanged model's.
    freeze_delta(net, 'lora')
    assert len(trainable_names(net)) == 12
    before = snapshot(net)
    losses = train_steps(CausalLMWithLoss(net), [(ids,)] * 10, learning_rate=3e-2)
    assert abs(losses[0] - loss) < 1e-5
    assert losses[-1] < losses[0] - 0.5, losses
    assert changed_names(before) == trainable_names(net)

    # Prefix training through the prefix_key_values input: only the prefix moves, and the loss falls.
    base = PanguAlphaForCausalLM(TINY_CONFIG)
    for param in base.get_parameters():
        param.requires_grad = False
    model = _PrefixLM(base, prefix_len=4)
    assert [p.name for p in model.trainable_params()] == ['mindpet_delta_prefix']
    before = snapshot(model)
    losses = train_steps(model, [(ids,)] * 10, learning_rate=0.3)
    # A random frozen base gives a prefix little leverage: the fall is steady but modest.
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.15, losses
    assert changed_names(before) == ['mindpet_delta_prefix']


# ----- data -----------------------------------------------------------------------------------------------------
def test_corpus_pipeline():
    tok = CharTokenizer()
    assert tok.decode(tok.encode('The Cat, 7!')) == 'the cat, 7!'
    assert tok.encode('é') == [tok.unk_id]
    lines = load_lines('corpus')
    assert len(lines) == 95 and all(len(line) + 2 <= TINY_CONFIG['seq_length'] for line in lines)
    ids = lm_arrays(lines[:2], tok, 64)
    assert ids[0, 0] == tok.bos_id and ids[0, len(lines[0]) + 1] == tok.eos_id and ids[0, -1] == tok.pad_id
    assert tok.decode(ids[0].tolist()) == lines[0]
    with pytest.raises(ValueError, match='more than seq_length 8'):
        lm_arrays(lines[:1], tok, 8)
    ds = lm_dataset('task', tok, seq_length=64, batch_size=8, seed=1)
    batches = [b[0].asnumpy() for b in ds.create_tuple_iterator(num_epochs=1)]
    assert len(batches) == 3 and all(b.shape == (8, 64) for b in batches)
    again = [b[0].asnumpy() for b in lm_dataset('task', tok, 64, 8, seed=1).create_tuple_iterator(num_epochs=1)]
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    prompts = task_prompts()
    assert len(prompts) == 26 and prompts[0] == ('q: what colour is the sky? a:', ' the sky is blue.')
