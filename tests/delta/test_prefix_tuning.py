"""Prefix-Tuning: PrefixLayer vs its MLP formula, concat_prefix, PrefixAttention vs NumPy attention, a tiny causal LM
trained through the shipped attention Cell, export of the final prefix, shard and bad input."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

from mindpet.delta import PrefixAttention, PrefixLayer, StaticPrefix, concat_prefix, export_prefixes

from tests.delta_nets import (LMLoss, TinyCausalLM, assert_bad_args, assert_formula_after_graph_ran, causal_mask,
                              dense_weights, lm_data, np_attention, randomise, train_checked)

NAME = 'mindpet_delta_prefixtuning_'


def np_prefix(layer):
    """(key, value), each (heads, P, head_dim), from the reparametrisation MLP (float64)."""
    p = {n: getattr(layer, NAME + n).asnumpy().astype(np.float64)
         for n in ('embedding', 'mlp_in_weight', 'mlp_in_bias', 'mlp_out_weight', 'mlp_out_bias')}
    kv = np.tanh(p['embedding'] @ p['mlp_in_weight'].T + p['mlp_in_bias']) @ p['mlp_out_weight'].T + p['mlp_out_bias']
    hidden = layer.hidden_dim
    heads, d, prefix_len = layer.num_heads, hidden // layer.num_heads, kv.shape[0]
    key = kv[:, :hidden].reshape(prefix_len, heads, d).transpose(1, 0, 2)
    value = kv[:, hidden:].reshape(prefix_len, heads, d).transpose(1, 0, 2)
    return key, value


def small_prefix(dropout_rate=0.0, batch_size=3):
    return PrefixLayer(prefix_token_num=4, batch_size=batch_size, num_heads=2, hidden_dim=8, embed_dim=6, mid_dim=10,
                       dropout_rate=dropout_rate)


def test_prefix_layer_matches_formula_after_graph_ran(ms_mode):
    prefix = small_prefix()
    key, value = prefix()
    assert key.shape == value.shape == (3, 2, 4, 4)
    ref_key, ref_value = np_prefix(prefix)
    np.testing.assert_allclose(key.asnumpy()[1], ref_key, atol=1e-5, rtol=1e-5)
    randomise([p for p in prefix.get_parameters()], seed=2)
    key, value = prefix(5)  # another batch size than the constructor's
    ref_key, ref_value = np_prefix(prefix)
    assert key.shape == (5, 2, 4, 4)
    for b in range(5):
        np.testing.assert_allclose(key.asnumpy()[b], ref_key, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(value.asnumpy()[b], ref_value, atol=1e-5, rtol=1e-5)
    # Keys and values are distinct tensors (MindPet 1.0.4 returned the same slice for both).
    assert np.abs(key.asnumpy() - value.asnumpy()).max() > 0.1
    np.testing.assert_allclose(prefix.prefix_numpy()[0], ref_key, atol=1e-5)


def test_prefix_dropout_only_while_training(graph_mode):
    prefix = small_prefix(dropout_rate=0.5)
    ref_key, _ = np_prefix(prefix)
    prefix.set_train(False)
    np.testing.assert_allclose(prefix()[0].asnumpy()[0], ref_key, atol=1e-5)
    prefix.set_train(True)
    assert np.abs(prefix()[0].asnumpy()[0] - ref_key).max() > 1e-3


def test_export_drops_the_mlp_and_keeps_the_prefix(ms_mode):
    prefix = small_prefix(dropout_rate=0.3)
    prefix.set_train(False)
    key, value = prefix()
    static = prefix.to_static()
    assert isinstance(static, StaticPrefix)
    assert {p.name: tuple(p.shape) for p in static.get_parameters()} == {NAME + 'key': (2, 4, 4),
                                                                       NAME + 'value': (2, 4, 4)}
    static_key, static_value = static()
    np.testing.assert_allclose(static_key.asnumpy(), key.asnumpy(), atol=1e-6)
    np.testing.assert_allclose(static_value.asnumpy(), value.asnumpy(), atol=1e-6)
    # After the graph ran, new prefix data is used.
    new_key = np.full((2, 4, 4), 0.25, np.float32)
    static.mindpet_delta_prefixtuning_key.set_data(Tensor(new_key))
    np.testing.assert_array_equal(static(2)[0].asnumpy(), np.broadcast_to(new_key, (2, 2, 4, 4)))


class _Concat(nn.Cell):
    def __init__(self, key_transposed):
        super().__init__()
        self.key_transposed = key_transposed

    def construct(self, pk, pv, k, v, mask):
        return concat_prefix(pk, pv, k, v, mask, key_transposed=self.key_transposed)


@pytest.mark.parametrize('key_transposed', [False, True])
def test_concat_prefix_extends_keys_values_and_mask(ms_mode, key_transposed):
    rng = np.random.RandomState(4)
    pk, pv = rng.randn(2, 3, 4, 5).astype(np.float32), rng.randn(2, 3, 4, 5).astype(np.float32)
    k, v = rng.randn(2, 3, 6, 5).astype(np.float32), rng.randn(2, 3, 6, 5).astype(np.float32)
    mask = np.tril(np.ones((2, 6, 6), np.float32))
    k_in = k.transpose(0, 1, 3, 2) if key_transposed else k
    key, value, new_mask = _Concat(key_transposed)(*(Tensor(a) for a in (pk, pv, k_in, v, mask)))
    expected_key = np.concatenate([pk, k], 2)
    np.testing.assert_array_equal(key.asnumpy(), expected_key.transpose(0, 1, 3, 2) if key_transposed
                                  else expected_key)
    np.testing.assert_array_equal(value.asnumpy(), np.concatenate([pv, v], 2))
    np.testing.assert_array_equal(new_mask.asnumpy(), np.concatenate([np.ones((2, 6, 4)), mask], -1))


@pytest.mark.parametrize('compute_dtype,tol', [(ms.float32, 1e-5), (ms.float16, 1e-2)])
@pytest.mark.parametrize('with_prefix', [True, False])
def test_prefix_attention_matches_numpy_after_graph_ran(ms_mode, compute_dtype, tol, with_prefix):
    ms.set_seed(1)
    prefix = small_prefix(batch_size=2) if with_prefix else None
    attn = PrefixAttention(8, 2, prefix=prefix, compute_dtype=compute_dtype)
    x = np.random.RandomState(5).uniform(-1, 1, (2, 5, 8)).astype(np.float32)
    mask = causal_mask(2, 5)

    def reference():
        pk, pv = np_prefix(prefix) if with_prefix else (None, None)
        return np_attention(x, mask.asnumpy(), dense_weights(attn), 2, pk, pv)

    out = assert_formula_after_graph_ran(attn, [x, mask.asnumpy()], reference, attn.get_parameters(), tol, seed=6,
                                         scale=0.4)
    assert out.shape == (2, 5, 8) and out.dtype == ms.float32


def test_prefix_attention_takes_prefix_from_outside(ms_mode):
    attn = PrefixAttention(8, 2)
    rng = np.random.RandomState(7)
    x = rng.randn(2, 5, 8).astype(np.float32)
    pk, pv = rng.randn(2, 3, 4).astype(np.float32), rng.randn(2, 3, 4).astype(np.float32)
    batched = [Tensor(np.broadcast_to(a, (2, 2, 3, 4)).copy()) for a in (pk, pv)]
    mask = causal_mask(2, 5)
    out = attn(Tensor(x), mask, *batched)
    np.testing.assert_allclose(out.asnumpy(), np_attention(x, mask.asnumpy(), dense_weights(attn), 2, pk, pv),
                               atol=1e-5, rtol=1e-5)


def test_causal_lm_trains_prefixes_through_attention(graph_mode):
    lm = TinyCausalLM(make_prefix=lambda i: PrefixLayer(3, 4, 2, 16, embed_dim=8, mid_dim=16, dropout_rate=0.0))
    ids, labels = lm_data()
    expected = [f'blocks.{i}.attention.prefix.{NAME}{n}' for i in range(2)
                for n in ('embedding', 'mlp_in_weight', 'mlp_in_bias', 'mlp_out_weight', 'mlp_out_bias')]
    losses, _, _ = train_checked(lm, LMLoss(lm), 'prefixtuning', (ids, labels), lr=0.02, expect_trainable=expected)
    for block in lm.blocks:
        key, value = block.attention.prefix.prefix_numpy()
        assert np.abs(key - value).mean() > 0.1  # keys and values ended up different

    # Export: every trained PrefixLayer becomes a StaticPrefix (MLP dropped) under its full name; called through
    # a NEW top-level Cell (a compiled graph keeps its old sub-Cells), the LM's output is unchanged.
    before = lm(ids).asnumpy()
    assert export_prefixes(lm) == ['blocks.0.attention.prefix', 'blocks.1.attention.prefix']
    static_names = sorted(f'blocks.{i}.attention.prefix.{NAME}{n}' for i in range(2) for n in ('key', 'value'))
    assert sorted(p.name for p in lm.get_parameters() if NAME in p.name) == static_names
    np.testing.assert_allclose(_Wrap(lm)(ids).asnumpy(), before, atol=1e-5)
    assert sorted(p.name for p in lm.get_parameters() if NAME in p.name) == static_names
    with pytest.raises(ValueError, match='no PrefixLayer'):
        export_prefixes(lm)


class _Wrap(nn.Cell):
    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, x):
        return self.net(x)


def test_shard():
    attn = PrefixAttention(8, 2, prefix=small_prefix())
    assert attn.shard(data_parallel=2, model_parallel=2) is attn
    assert attn.dense1.matmul.in_strategy == ((2, 1), (2, 1))
    assert attn.score_matmul.in_strategy == ((2, 2, 1, 1), (2, 2, 1, 1))
    assert attn.projection.matmul.in_strategy == ((2, 2), (1, 2))
    assert attn.prefix.matmul_in.in_strategy == ((1, 1), (2, 1))
    with pytest.raises(ValueError, match="'model_parallel'"):
        PrefixAttention(8, 2).shard(1, 4)
    with pytest.raises(TypeError, match="'data_parallel'"):
        PrefixAttention(8, 2).shard(2.0, 1)
    with pytest.raises(ValueError, match="'model_parallel'.*'mid_dim'"):
        small_prefix().shard(model_parallel=3)
    assert small_prefix().to_static().shard(2) is not None


_PREFIX = dict(prefix_token_num=4, batch_size=2, num_heads=2, hidden_dim=8, embed_dim=6, mid_dim=10,
               dropout_rate=0.1)


@pytest.mark.parametrize('override,exc,fragments', [
    (dict(prefix_token_num=0), ValueError, ['prefix_token_num', '0']),
    (dict(prefix_token_num=4.0), TypeError, ['prefix_token_num', '4.0']),
    (dict(batch_size=-1), ValueError, ['batch_size', '-1']),
    (dict(batch_size=None), TypeError, ['batch_size', 'None']),
    (dict(num_heads=0), ValueError, ['num_heads', '0']),
    (dict(num_heads=3), ValueError, ['hidden_dim', 'num_heads', '3']),
    (dict(hidden_dim='8'), TypeError, ['hidden_dim', "'8'"]),
    (dict(embed_dim=0), ValueError, ['embed_dim', '0']),
    (dict(mid_dim=True), TypeError, ['mid_dim', 'True']),
    (dict(dropout_rate=1.0), ValueError, ['dropout_rate', '1.0']),
    (dict(dropout_rate=0), TypeError, ['dropout_rate', '0']),
])
def test_prefix_layer_bad_arguments(override, exc, fragments):
    assert_bad_args(PrefixLayer, _PREFIX, override, exc, fragments)


@pytest.mark.parametrize('override,exc,fragments', [
    (dict(hidden_size=0), ValueError, ['hidden_size', '0']),
    (dict(num_heads=3), ValueError, ['hidden_size', 'num_heads']),
    (dict(num_heads='2'), TypeError, ['num_heads', "'2'"]),
    (dict(prefix=nn.Dense(2, 2)), TypeError, ['prefix', 'Dense']),
    (dict(prefix=PrefixLayer(2, 2, 4, 8, 4)), ValueError, ['prefix', 'num_heads=4']),
    (dict(attention_dropout=-0.5), ValueError, ['attention_dropout', '-0.5']),
    (dict(compute_dtype=ms.float64), TypeError, ['compute_dtype', 'mindspore.float64']),
])
def test_prefix_attention_bad_arguments(override, exc, fragments):
    assert_bad_args(PrefixAttention, dict(hidden_size=8, num_heads=2), override, exc, fragments)


@pytest.mark.parametrize('override,exc,fragments', [
    (dict(key=[[[1.0]]]), TypeError, ['key', 'list']),
    (dict(value=np.zeros((2, 3), np.float32)), ValueError, ['value', '(2, 3)']),
    (dict(value=np.zeros((2, 3, 5), np.float32)), ValueError, ['key', 'value', '(2, 3, 5)']),
    (dict(batch_size=0), ValueError, ['batch_size', '0']),
])
def test_static_prefix_bad_arguments(override, exc, fragments):
    good = dict(key=np.zeros((2, 3, 4), np.float32), value=np.zeros((2, 3, 4), np.float32), batch_size=2)
    assert_bad_args(StaticPrefix, good, override, exc, fragments)
