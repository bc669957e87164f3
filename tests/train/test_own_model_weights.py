"""`model.weights` of a no-code run: .ckpt, .safetensors and shard directories, the built-in and the configured
name maps, and `factory`/`config.json` model builders; the loaded model computes the source model's function."""
import json

import numpy as np
import pytest
import yaml
import mindspore as ms
from mindspore import Tensor
from safetensors.numpy import save_file

from mindpet.cli import main
from mindpet.train import text_data
from mindpet.train.generic import classification_metrics, map_names
from mindpet.train.runner import build, load_plan
from tests.train.text_fixtures import topic_rows, write_jsonl, train_tokenizer
from tests.train.text_models import NormedClassifier, TinyTextClassifier

HIDDEN = 16


@pytest.fixture(autouse=True)
def _graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(name='files')
def _files(tmp_path):
    rows = topic_rows(40)
    tokenizer, vocab = train_tokenizer(tmp_path / 'tokenizer.json', [r['text'] for r in rows])
    return {'train': write_jsonl(tmp_path / 'train.jsonl', rows), 'tokenizer': tokenizer, 'vocab': vocab}


def _plan(tmp_path, files, **model):
    cfg = {'model': dict({'trust_code': True, 'loss': 'cross_entropy'}, **model),
           'pet': {'type': 'lora', 'target_modules': ['proj'], 'modules_to_save': ['head']},
           'data': {'train': files['train'], 'tokenizer': files['tokenizer'], 'max_length': 12},
           'schedule': {'start_learning_rate': 0.01},
           'training': {'batch_size': 8, 'output_dir': str(tmp_path / 'out')}}
    path = tmp_path / 'run.yaml'
    path.write_text(yaml.safe_dump(cfg), encoding='utf-8')
    return str(path)


def _source(cls, vocab, seed=3):
    net = cls(vocab, HIDDEN, 4)
    rng = np.random.default_rng(seed)
    for param in net.get_parameters():
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32)))
    return net


def _inputs(vocab):
    rng = np.random.default_rng(0)
    return Tensor(rng.integers(0, vocab, (3, 12)).astype(np.int32)), Tensor(np.ones((3, 12), np.int32))


def _assert_same_function(plan, source, vocab):
    built = build(load_plan(plan))
    ids, mask = _inputs(vocab)
    np.testing.assert_allclose(built.model(ids, mask).asnumpy(), source(ids, mask).asnumpy(), rtol=1e-5, atol=1e-5)
    return built


def _arrays(net, rename=lambda n: n):
    return {rename(p.name): p.asnumpy() for p in net.get_parameters()}


def test_a_ckpt_file(tmp_path, files):
    source = _source(TinyTextClassifier, files['vocab'])
    ms.save_checkpoint(source, str(tmp_path / 'base.ckpt'))
    config = {'vocab_size': files['vocab'], 'hidden': HIDDEN, 'num_labels': 4}
    built = _assert_same_function(_plan(tmp_path, files, **{'class': 'tests.train.text_models:TinyTextClassifier'},
                                        config=config, weights=str(tmp_path / 'base.ckpt')), source, files['vocab'])
    assert built.loaded == f"5 tensors from {tmp_path / 'base.ckpt'}"


def test_a_shard_directory_with_a_configured_name_map_and_a_new_head(tmp_path, files):
    source = _source(TinyTextClassifier, files['vocab'])
    arrays = _arrays(source, lambda n: 'model.' + n)
    shards = tmp_path / 'shards'
    shards.mkdir()
    names = sorted(arrays)
    body = [n for n in names if not n.startswith('model.head')]
    save_file({n: arrays[n] for n in body[:2]}, str(shards / 'model-00001-of-00002.safetensors'))
    save_file({n: arrays[n] for n in body[2:]}, str(shards / 'model-00002-of-00002.safetensors'))
    (shards / 'model.safetensors.index.json').write_text('{}')
    path = _plan(tmp_path, files, factory='tests.train.text_models:build_classifier',
                 kwargs={'vocab_size': files['vocab'], 'hidden': HIDDEN, 'num_labels': 4},
                 weights=str(shards), weights_map={r'^model\.': ''})
    built = build(load_plan(path))
    assert built.loaded == f"3 tensors from {shards} (2 kept as initialised: head.bias, head.weight)"
    for name in body:
        np.testing.assert_array_equal(built.network.parameters_dict()[name[len('model.'):]].asnumpy(), arrays[name])


def test_a_safetensors_file_through_the_built_in_map(tmp_path, files):
    source = _source(NormedClassifier, files['vocab'])
    hf_names = {'norm.gamma': 'norm.weight', 'norm.beta': 'norm.bias'}
    arrays = _arrays(source, lambda n: 'encoder_model.' + hf_names.get(n, n))
    assert 'encoder_model.norm.weight' in arrays
    save_file(arrays, str(tmp_path / 'model.safetensors'))
    config_json = tmp_path / 'config.json'
    config_json.write_text(json.dumps({'vocab_size': files['vocab'], 'hidden': HIDDEN, 'num_labels': 4}))
    _assert_same_function(_plan(tmp_path, files, **{'class': 'tests.train.text_models:NormedClassifier'},
                                config=str(config_json), weights=str(tmp_path / 'model.safetensors')),
                          source, files['vocab'])
    # 'none' takes the names as they are: nothing matches.
    assert map_names(['encoder_model.norm.weight'], {'norm.gamma'}, 'none') == {
        'encoder_model.norm.weight': 'encoder_model.norm.weight'}
    assert map_names(['encoder_model.norm.weight'], {'norm.gamma'}, 'auto', 'encoder_model') == {
        'encoder_model.norm.weight': 'norm.gamma'}


def test_weights_that_do_not_fit_give_one_line(tmp_path, files, capsys):
    other = TinyTextClassifier(files['vocab'], HIDDEN * 2, 4)
    ms.save_checkpoint(other, str(tmp_path / 'wide.ckpt'))
    config = {'vocab_size': files['vocab'], 'hidden': HIDDEN, 'num_labels': 4}
    path = _plan(tmp_path, files, **{'class': 'tests.train.text_models:TinyTextClassifier'}, config=config,
                 weights=str(tmp_path / 'wide.ckpt'))
    assert main(['finetune', '--config', path]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / 'wide.ckpt') in err and "shape (" in err, err
    save_file({'unrelated.weight': np.zeros((2, 2), np.float32)}, str(tmp_path / 'other.safetensors'))
    path = _plan(tmp_path, files, **{'class': 'tests.train.text_models:TinyTextClassifier'}, config=config,
                 weights=str(tmp_path / 'other.safetensors'))
    assert main(['finetune', '--config', path]) == 1
    err = capsys.readouterr().err.strip()
    assert 'No tensor of the weights' in err and "'model.weights_map'" in err
    assert not (tmp_path / 'out').exists()


def test_plain_text_is_packed_into_blocks(tmp_path):
    text = tmp_path / 'corpus.txt'
    text.write_text('goal match team\n\nbread cheese\nlaptop code chip server\n', encoding='utf-8')
    tokenizer_path, _ = train_tokenizer(tmp_path / 'tok.json', ['goal match team bread cheese laptop code chip '
                                                                'server'], cls_sep=False)
    tokenizer = text_data.load_tokenizer(tokenizer_path)
    rows, bad = text_data.read_rows(str(text))
    assert [r.line for r in rows] == [1, 3, 4] and not bad
    eos = tokenizer.token_to_id('</s>')
    encoded = text_data.packed_text_arrays(rows, tokenizer, 4, eos)
    stream = []
    for line in ('goal match team', 'bread cheese', 'laptop code chip server'):
        stream += tokenizer.encode(line).ids + [eos]
    assert len(stream) == 12
    np.testing.assert_array_equal(encoded.columns[0], np.asarray(stream, np.int32).reshape(3, 4))
    assert encoded.columns[2].sum() == 12


def test_classification_metrics_by_hand():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    labels = np.array([0, 1, 0, 0, 1])
    metrics = classification_metrics(logits, labels, ['a', 'b', 'c'])
    assert metrics['accuracy'] == pytest.approx(3 / 5)
    # class a: tp 2, predicted 2, actual 3 -> F1 0.8; b: tp 1, predicted 2, actual 2 -> 0.5; c: tp 0 -> 0.
    assert metrics['macro_f1'] == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    assert metrics['accuracy[a]'] == pytest.approx(2 / 3) and metrics['accuracy[b]'] == pytest.approx(1 / 2)
    assert 'accuracy[c]' not in metrics          # no row of class c
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert metrics['loss'] == pytest.approx(-log_probs[np.arange(5), labels].mean())
    with pytest.raises(ValueError, match=r"logits of shape \(5, 3\), but the data has 2 labels"):
        classification_metrics(logits, labels, ['a', 'b'])
