"""PromptTuningEmbedding: [P; E] vs NumPy, mask/label extension, vocab init, GRAPH_MODE training of P only."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Tensor

from mindpet.delta.prompt_tuning import PromptTuningEmbedding
from mindpet.graph import freeze_delta

from tests.nets import snapshot


class _PromptNet(nn.Cell):
    """Frozen embedding -> prompt -> frozen relu layer -> masked mean pool -> frozen head; also returns the
    extended mask and labels so the test can check them in the same compiled graph."""

    def __init__(self, vocab=20, dim=8, n_virtual=3, out_dim=2):
        super().__init__()
        rng = np.random.RandomState(0)
        self.embed = nn.Embedding(vocab, dim, embedding_table=Tensor(rng.randn(vocab, dim).astype(np.float32)))
        self.prompt = PromptTuningEmbedding(n_virtual, dim)
        self.enc = nn.Dense(dim, dim, activation='relu', weight_init=Tensor(rng.randn(dim, dim).astype(np.float32)))
        self.head = nn.Dense(dim, out_dim, weight_init=Tensor(rng.randn(out_dim, dim).astype(np.float32)))

    def features(self, ids, mask):
        hidden = self.enc(self.prompt(self.embed(ids)))
        mask = self.prompt.extend_attention_mask(mask)
        weights = ops.expand_dims(mask.astype(ms.float32), -1)
        return self.head((hidden * weights).sum(1) / weights.sum(1)), mask

    def construct(self, ids, mask):
        return self.features(ids, mask)[0]


class _Probe(nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, ids, mask, labels):
        out, ext_mask = self.net.features(ids, mask)
        return out, ext_mask, self.net.prompt.extend_labels(labels)


def _np_forward(net, ids, mask):
    table = net.embed.embedding_table.asnumpy()
    prompt = net.prompt.mindpet_delta_prompt_tuning_embedding.asnumpy()
    emb = np.concatenate([np.broadcast_to(prompt, (ids.shape[0],) + prompt.shape), table[ids]], axis=1)
    hidden = np.maximum(emb @ net.enc.weight.asnumpy().T + net.enc.bias.asnumpy(), 0)
    full_mask = np.concatenate([np.ones((ids.shape[0], prompt.shape[0])), mask], axis=1)[..., None]
    pooled = (hidden * full_mask).sum(1) / full_mask.sum(1)
    return pooled @ net.head.weight.asnumpy().T + net.head.bias.asnumpy()


def _batch():
    rng = np.random.RandomState(1)
    ids = rng.randint(0, 20, (4, 5)).astype(np.int32)
    mask = np.ones((4, 5), np.int32)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    return ids, mask


def test_names_shape_and_prepending(ms_mode):
    prompt = PromptTuningEmbedding(3, 4)
    assert [(p.name, tuple(p.shape)) for p in prompt.get_parameters()] == [
        ('mindpet_delta_prompt_tuning_embedding', (3, 4))]
    assert 0 < prompt.mindpet_delta_prompt_tuning_embedding.asnumpy().std() < 0.05
    x = np.random.RandomState(0).randn(2, 5, 4).astype(np.float32)
    out = prompt(Tensor(x))
    new = np.random.RandomState(1).randn(3, 4).astype(np.float32)
    prompt.mindpet_delta_prompt_tuning_embedding.set_data(Tensor(new))
    out = prompt(Tensor(x)).asnumpy()
    assert out.shape == (2, 8, 4)
    np.testing.assert_array_equal(out[:, :3], np.broadcast_to(new, (2, 3, 4)))
    np.testing.assert_array_equal(out[:, 3:], x)
    out16 = prompt(Tensor(x.astype(np.float16)))
    assert out16.dtype == ms.float16


def test_model_matches_numpy_and_masks_after_graph_ran(graph_mode):
    net = _PromptNet()
    probe = _Probe(net)
    ids, mask = _batch()
    labels = np.arange(20, dtype=np.int32).reshape(4, 5)
    probe(Tensor(ids), Tensor(mask), Tensor(labels))
    net.prompt.mindpet_delta_prompt_tuning_embedding.set_data(
        Tensor(np.random.RandomState(2).randn(3, 8).astype(np.float32)))
    out, ext_mask, ext_labels = probe(Tensor(ids), Tensor(mask), Tensor(labels))
    np.testing.assert_allclose(out.asnumpy(), _np_forward(net, ids, mask), atol=1e-5)
    np.testing.assert_array_equal(ext_mask.asnumpy(), np.concatenate([np.ones((4, 3), np.int32), mask], 1))
    assert ext_mask.dtype == ms.int32
    np.testing.assert_array_equal(ext_labels.asnumpy(), np.concatenate([np.full((4, 3), -100), labels], 1))
    # Masked-out (padding) tokens do not change the result.
    ids2 = ids.copy()
    ids2[2, 1:] = 7
    np.testing.assert_allclose(probe(Tensor(ids2), Tensor(mask), Tensor(labels))[0].asnumpy(), out.asnumpy(),
                               atol=1e-6)


def test_init_from_vocab_cycles_ids():
    prompt = PromptTuningEmbedding(5, 3)
    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    prompt.init_from_vocab(Tensor(table), [4, 7])
    np.testing.assert_array_equal(prompt.mindpet_delta_prompt_tuning_embedding.asnumpy(), table[[4, 7, 4, 7, 4]])
    with pytest.raises(ValueError, match=r'token_ids.*\[0, 10\).*12'):
        prompt.init_from_vocab(table, [1, 12])
    with pytest.raises(TypeError, match='token_ids'):
        prompt.init_from_vocab(table, [])
    with pytest.raises(ValueError, match=r'embedding_table.*\(vocab, 3\)'):
        prompt.init_from_vocab(table[:, :2], [1])


def test_training_graph_mode_changes_only_prompt(graph_mode):
    net = _PromptNet()
    freeze_delta(net, 'prompt_tuning')
    assert [p.name for p in net.trainable_params()] == ['prompt.mindpet_delta_prompt_tuning_embedding']
    ids, mask = _batch()
    target = Tensor(np.random.RandomState(3).randn(4, 2).astype(np.float32))

    class _Loss(nn.Cell):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def construct(self, ids, mask, target):
            return ops.mse_loss(self.inner(ids, mask), target)

    step = nn.TrainOneStepCell(_Loss(net), nn.Adam(net.trainable_params(), learning_rate=0.1))
    before = snapshot(net)
    losses = [float(step(Tensor(ids), Tensor(mask), target).asnumpy()) for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0], losses
    after = snapshot(net)
    for name, value in before.items():
        if 'prompt_tuning' in name:
            assert np.abs(after[name] - value).max() > 1e-2
        else:
            np.testing.assert_array_equal(after[name], value, err_msg=name)


@pytest.mark.parametrize('kwargs,exc,fragments', [
    (dict(num_virtual_tokens=0, token_dim=4), ValueError, ['num_virtual_tokens', '0']),
    (dict(num_virtual_tokens=2.0, token_dim=4), TypeError, ['num_virtual_tokens', '2.0']),
    (dict(num_virtual_tokens=2, token_dim=-4), ValueError, ['token_dim', '-4']),
    (dict(num_virtual_tokens=2, token_dim=4, prompt_init=Tensor(np.zeros((3, 4), np.float32))), ValueError,
     ['prompt_init', '(3, 4)']),
    (dict(num_virtual_tokens=2, token_dim=4, param_init_type=ms.int32), TypeError, ['param_init_type']),
])
def test_bad_arguments(kwargs, exc, fragments):
    with pytest.raises(exc) as info:
        PromptTuningEmbedding(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_rejects_2d_input(ms_mode):
    with pytest.raises((ValueError, RuntimeError)):
        PromptTuningEmbedding(2, 4)(Tensor(np.zeros((3, 4), np.float32)))
