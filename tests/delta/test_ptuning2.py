"""P-Tuning v2 PrefixEncoder against its formula, per-layer layout, a tiny causal LM trained through it, shard and
bad input."""
from types import SimpleNamespace

import numpy as np
import pytest
import mindspore as ms

from mindpet.delta import PrefixEncoder

from tests.delta_nets import LMLoss, TinyCausalLM, assert_bad_args, lm_data, randomise, train_checked

NAME = 'mindpet_delta_ptuning2_'


def np_prefix_encoder(enc, batch, out_perm=(2, 0, 3, 1, 4)):
    """List of num_layers arrays, the formula in float64."""
    x = enc.mindpet_delta_ptuning2_embedding.asnumpy().astype(np.float64)
    if enc.prefix_projection:
        p = {n: getattr(enc, NAME + n).asnumpy().astype(np.float64)
             for n in ('dense_in_weight', 'dense_in_bias', 'dense_out_weight', 'dense_out_bias')}
        x = np.tanh(x @ p['dense_in_weight'].T + p['dense_in_bias']) @ p['dense_out_weight'].T + p['dense_out_bias']
    x = x.reshape(1, enc.pre_seq_len, 2 * enc.num_layers, enc.num_heads, enc.kv_channels)
    x = np.broadcast_to(x, (batch,) + x.shape[1:]).transpose(out_perm)
    return np.split(x, enc.num_layers, axis=0)


def make(prefix_projection=True, **kwargs):
    args = dict(pre_seq_len=3, num_layers=2, num_heads=2, kv_channels=4, prefix_projection=prefix_projection,
                projection_dim=6, dropout_prob=0.0)
    return PrefixEncoder(**dict(args, **kwargs))


@pytest.mark.parametrize('dtype,tol', [(ms.float32, 1e-5), (ms.float16, 1e-2)])
@pytest.mark.parametrize('prefix_projection', [True, False])
def test_matches_formula_after_graph_ran(ms_mode, dtype, tol, prefix_projection):
    enc = make(prefix_projection)
    out = enc(2, dtype)
    assert isinstance(out, tuple) and len(out) == 2
    for got, want in zip(out, np_prefix_encoder(enc, 2)):
        assert got.shape == (2, 2, 2, 3, 4) and got.dtype == dtype
        np.testing.assert_allclose(got.asnumpy().astype(np.float64), want, atol=tol, rtol=tol)
    # Scale 0.3 keeps the MLP's pre-activations within |x| < 3: MindSpore's CPU Tanh kernel is approximate beyond
    # that (measured: up to 1e-4 absolute error for 4 < |x| < 6), which would hide the formula check at 1e-5.
    randomise(enc.get_parameters(), seed=3, scale=0.3)
    out = enc(5, dtype)
    for got, want in zip(out, np_prefix_encoder(enc, 5)):
        assert got.shape == (2, 5, 2, 3, 4)
        np.testing.assert_allclose(got.asnumpy().astype(np.float64), want, atol=tol, rtol=tol)
    # prefix_numpy is the same data as (layer, key/value, heads, P, kv), e.g. for export.
    exported = enc.prefix_numpy()
    assert exported.shape == (2, 2, 2, 3, 4)
    np.testing.assert_allclose(exported[1], np_prefix_encoder(enc, 1)[1][:, 0], atol=1e-5)


def test_default_dtype_is_float16_and_out_perm_is_honoured(ms_mode):
    enc = make(out_perm=(2, 0, 1, 3, 4))
    out = enc(3)
    assert out[0].dtype == ms.float16
    assert out[0].shape == (2, 3, 3, 2, 4)  # (2, batch, P, heads, kv)
    np.testing.assert_allclose(out[1].asnumpy(), np_prefix_encoder(enc, 3, (2, 0, 1, 3, 4))[1], atol=1e-2)


def test_contract_names_and_dropout_only_while_training(graph_mode):
    enc = make(dropout_prob=0.5)
    assert {p.name: tuple(p.shape) for p in enc.get_parameters()} == {
        NAME + 'embedding': (3, 32), NAME + 'dense_in_weight': (6, 32), NAME + 'dense_in_bias': (6,),
        NAME + 'dense_out_weight': (32, 6), NAME + 'dense_out_bias': (32,)}
    assert [p.name for p in make(False).get_parameters()] == [NAME + 'embedding']
    want = np_prefix_encoder(enc, 2)[0]
    enc.set_train(False)
    np.testing.assert_allclose(enc(2, ms.float32)[0].asnumpy(), want, atol=1e-5)
    enc.set_train(True)
    assert np.abs(enc(2, ms.float32)[0].asnumpy() - want).max() > 1e-4


@pytest.mark.parametrize('prefix_projection', [True, False])
def test_causal_lm_trains_through_the_encoder(graph_mode, prefix_projection):
    enc = PrefixEncoder(3, num_layers=2, num_heads=2, kv_channels=8, prefix_projection=prefix_projection,
                        projection_dim=8, dropout_prob=0.0)
    lm = TinyCausalLM(prefix_encoder=enc)
    ids, labels = lm_data()
    names = ['embedding'] + (['dense_in_weight', 'dense_in_bias', 'dense_out_weight', 'dense_out_bias']
                             if prefix_projection else [])
    _, _, after = train_checked(lm, LMLoss(lm), 'ptuning2', (ids, labels), lr=0.02,
                                expect_trainable=[f'prefix_encoder.{NAME}{n}' for n in names])
    kv = lm.prefix_encoder.prefix_numpy()
    assert np.abs(kv[:, 0] - kv[:, 1]).mean() > 1e-3  # keys and values are separate data per layer


def test_shard_and_parallel_config():
    enc = make()
    assert enc.shard(2, 3) is enc
    assert enc.matmul_in.in_strategy == ((2, 1), (3, 1))
    assert enc.matmul_out.in_strategy == ((2, 3), (1, 3))
    assert enc.transpose.in_strategy == ((2, 1, 1, 1, 1),)
    assert enc.split_layers.in_strategy == ((1, 2, 1, 1, 1),)
    from_config = make(parallel_config=SimpleNamespace(data_parallel=2, model_parallel=1, vocab_emb_dp=True))
    assert from_config.dropout.dropout.in_strategy == ((2, 1, 1, 1, 1),)
    assert make(False).shard(4, 5).cast.in_strategy == ((4, 1),)  # no MLP: model_parallel has nothing to divide


@pytest.mark.parametrize('args,exc,fragments', [
    ((0, 1), ValueError, ['data_parallel', '0']),
    ((1, 1.5), TypeError, ['model_parallel', '1.5']),
    ((1, 4), ValueError, ['model_parallel', 'projection_dim']),
])
def test_shard_bad_arguments(args, exc, fragments):
    with pytest.raises(exc) as info:
        make().shard(*args)
    assert all(f in str(info.value) for f in fragments), str(info.value)


_GOOD = dict(pre_seq_len=3, num_layers=2, num_heads=2, kv_channels=4, prefix_projection=True, projection_dim=6,
             dropout_prob=0.1)


@pytest.mark.parametrize('override,exc,fragments', [
    (dict(pre_seq_len=0), ValueError, ['pre_seq_len', '0']),
    (dict(pre_seq_len='3'), TypeError, ['pre_seq_len', "'3'"]),
    (dict(num_layers=-2), ValueError, ['num_layers', '-2']),
    (dict(num_heads=2.0), TypeError, ['num_heads', '2.0']),
    (dict(kv_channels=0), ValueError, ['kv_channels', '0']),
    (dict(prefix_projection=1), TypeError, ['prefix_projection', '1']),
    (dict(projection_dim=0), ValueError, ['projection_dim', '0']),
    (dict(projection_dim=None), TypeError, ['projection_dim', 'None']),
    (dict(dropout_prob=1.5), ValueError, ['dropout_prob', '1.5']),
    (dict(dropout_prob=0), TypeError, ['dropout_prob', '0']),
    (dict(parallel_config=object()), TypeError, ['parallel_config', 'data_parallel']),
    (dict(parallel_config=SimpleNamespace(data_parallel=1, model_parallel=0)), ValueError,
     ['parallel_config.model_parallel', '0']),
    (dict(out_perm=[2, 0, 3, 1, 4]), TypeError, ['out_perm', 'list']),
    (dict(out_perm=(0, 2, 3, 1, 4)), ValueError, ['out_perm', '(0, 2, 3, 1, 4)']),
    (dict(out_perm=(2, 0, 3, 1)), ValueError, ['out_perm']),
])
def test_bad_arguments(override, exc, fragments):
    assert_bad_args(PrefixEncoder, _GOOD, override, exc, fragments)


def test_projection_dim_ignored_without_projection():
    assert make(False, projection_dim=None).projection_dim is None
