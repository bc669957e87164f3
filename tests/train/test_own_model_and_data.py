"""`mindpet finetune` with no code written: the user's own Cell (``model.class``) or a mindone BERT on a JSONL
classification file with a tokenizer.json; a causal LM on instruction rows; `mindpet generate`."""
import json
import os

import numpy as np
import pytest
import yaml
import mindspore as ms

from mindpet.adapter_store import adapter_weights_path
from mindpet.cli import main
from mindpet.utils.io_utils import load_checkpoint_file
from tests.train.text_fixtures import (TOPICS, topic_rows, instruction_rows, write_jsonl, train_tokenizer)


@pytest.fixture(autouse=True)
def _pynative_afterwards():
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def classification_files(tmp_path):
    rows = topic_rows(200)
    train = write_jsonl(tmp_path / 'topics.jsonl', rows)
    tokenizer, vocab = train_tokenizer(tmp_path / 'tokenizer.json', [r['text'] for r in rows])
    return train, tokenizer, vocab


def write_config(tmp_path, model, data, pet, epochs=6, lr=0.01, batch=16, name='run.yaml'):
    cfg = {'context': {'mode': 'GRAPH', 'device_target': 'CPU', 'seed': 0},
           'model': model, 'pet': pet, 'data': data,
           'optimizer': {'type': 'adam'},
           'schedule': {'start_learning_rate': lr, 'decay': 'constant'},
           'training': {'epochs': epochs, 'batch_size': batch, 'log_interval': 20,
                        'output_dir': str(tmp_path / 'out'), 'plot': False}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg), encoding='utf-8')
    return str(path)


def check_classification_run(tmp_path, capsys, path):
    assert main(['finetune', '--config', path]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    out = tmp_path / 'out'
    metrics = json.loads((out / 'metrics.json').read_text())
    before, after = metrics['eval']['before'], metrics['eval']['after']
    assert after['accuracy'] > 0.5 and after['accuracy'] > before['accuracy'], (before, after)  # chance: 0.25
    assert set(after) == {'accuracy', 'loss', 'macro_f1'} | {f'accuracy[{t}]' for t in TOPICS}
    assert after['macro_f1'] > 0.4
    assert metrics['data'][0].startswith('train: 180 rows of classification data from ')
    assert (out / 'adapter' / 'adapter_config.yaml').is_file()
    assert os.path.isfile(adapter_weights_path(str(out / 'adapter')))
    assert 'eval accuracy' in printed and 'adapter file' in printed
    return metrics


def test_own_cell_by_class_on_a_jsonl_file(tmp_path, capsys):
    train, tokenizer, vocab = classification_files(tmp_path)
    path = write_config(
        tmp_path,
        model={'class': 'tests.train.text_models:TinyTextClassifier', 'trust_code': True,
               'config': {'vocab_size': vocab, 'hidden': 32, 'num_labels': 4}, 'loss': 'cross_entropy'},
        data={'train': train, 'tokenizer': tokenizer, 'max_length': 12, 'split': 0.1},
        pet={'type': 'lora', 'target_modules': ['proj'], 'lora_rank': 4, 'lora_alpha': 8,
             'modules_to_save': ['head', 'embedding']})
    metrics = check_classification_run(tmp_path, capsys, path)
    tensors = load_checkpoint_file(adapter_weights_path(str(tmp_path / 'out' / 'adapter')))
    assert sorted(tensors) == ['embedding.embedding_table', 'head.bias', 'head.weight',
                               'proj.mindpet_delta_lora_a', 'proj.mindpet_delta_lora_b']
    assert metrics['summary']['model'] == 'tests.train.text_models:TinyTextClassifier'
    # The same config evaluates the saved adapter (same held-out rows, same numbers) and validates dry.
    assert main(['evaluate', '--config', path, '--adapter', str(tmp_path / 'out' / 'adapter')]) == 0
    printed = capsys.readouterr().out
    assert f"accuracy {metrics['eval']['after']['accuracy']:.4f}" in printed
    assert main(['finetune', '--config', path, '--dry-run', '--set', f'training.output_dir={tmp_path / "dry"}']) == 0
    assert f'{path}: valid' in capsys.readouterr().out and not (tmp_path / 'dry').exists()


def test_mindone_bert_by_class_on_a_jsonl_file(tmp_path, capsys):
    pytest.importorskip('mindone')
    train, tokenizer, _ = classification_files(tmp_path)
    path = write_config(
        tmp_path,
        model={'class': 'mindone.transformers:BertForSequenceClassification',
               'config': {'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2,
                          'intermediate_size': 64, 'max_position_embeddings': 32, 'hidden_act': 'gelu'}},
        data={'train': train, 'tokenizer': tokenizer, 'max_length': 12},
        pet={'type': 'lora', 'target_modules': ['query', 'value'], 'lora_rank': 8, 'lora_alpha': 16,
             'modules_to_save': ['classifier']}, epochs=20, lr=0.005)
    metrics = check_classification_run(tmp_path, capsys, path)
    assert metrics['summary']['model'] == 'mindone.transformers:BertForSequenceClassification'


def test_mindone_class_from_an_hf_config_json(tmp_path, capsys):
    """An HF-style config.json (with model_type, architectures, ...) builds the class's own config object; the
    data's label set gives num_labels and the tokenizer the vocabulary size."""
    pytest.importorskip('mindone')
    from mindpet.train.runner import build, load_plan
    train, tokenizer, vocab = classification_files(tmp_path)
    config_json = tmp_path / 'config.json'
    config_json.write_text(json.dumps({
        'architectures': ['BertForSequenceClassification'], 'model_type': 'bert', 'hidden_size': 32,
        'num_hidden_layers': 1, 'num_attention_heads': 2, 'intermediate_size': 64, 'max_position_embeddings': 32,
        'hidden_act': 'relu', 'transformers_version': '4.57.1'}))
    path = write_config(tmp_path, model={'class': 'mindone.transformers:BertForSequenceClassification',
                                         'config': str(config_json)},
                        data={'train': train, 'tokenizer': tokenizer, 'max_length': 12},
                        pet={'type': 'lora', 'target_modules': ['query', 'value'], 'modules_to_save': ['classifier']})
    ms.set_context(mode=ms.GRAPH_MODE)
    built = build(load_plan(path), lazy=True)
    shapes = {p.name: tuple(p.shape) for p in built.network.get_parameters()}
    assert shapes['classifier.weight'] == (len(TOPICS), 32)
    assert shapes['bert.embeddings.word_embeddings.weight'] == (vocab, 32)
    assert not any(name.startswith('bert.encoder.layer.1.') for name in shapes)


def test_a_dry_run_lists_data_files_missing_here(tmp_path, capsys):
    """A config written for another machine validates: its data files are listed as notes, nothing is read."""
    path = write_config(
        tmp_path,
        model={'class': 'tests.train.text_models:TinyTextClassifier', 'trust_code': True,
               'config': {'vocab_size': 50, 'num_labels': 3}, 'loss': 'cross_entropy'},
        data={'train': '/data/elsewhere/train.jsonl', 'tokenizer': '/data/elsewhere/tokenizer.json',
              'labels': ['a', 'b', 'c']},
        pet={'type': 'lora', 'target_modules': ['proj'], 'modules_to_save': ['head']})
    assert main(['finetune', '--config', path, '--dry-run']) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "note: 'data.train' names '/data/elsewhere/train.jsonl', which does not exist here" in printed
    assert "note: 'data.tokenizer' names '/data/elsewhere/tokenizer.json'" in printed
    assert main(['finetune', '--config', path]) == 1                # a real run refuses
    assert "'data.train': the file '/data/elsewhere/train.jsonl' does not exist" in capsys.readouterr().err


def test_own_cell_in_pynative_mode(tmp_path, capsys):
    train, tokenizer, vocab = classification_files(tmp_path)
    path = write_config(
        tmp_path,
        model={'class': 'tests.train.text_models:TinyTextClassifier', 'trust_code': True,
               'config': {'vocab_size': vocab, 'hidden': 32, 'num_labels': 4}, 'loss': 'cross_entropy'},
        data={'train': train, 'tokenizer': tokenizer, 'max_length': 12},
        pet={'type': 'lora', 'target_modules': ['proj'], 'lora_rank': 4, 'lora_alpha': 8,
             'modules_to_save': ['head', 'embedding']}, epochs=3)
    assert main(['finetune', '--config', path, '--set', 'context.mode=PYNATIVE']) == 0, capsys.readouterr().err
    assert 'PYNATIVE mode on CPU' in capsys.readouterr().out
    metrics = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    assert metrics['eval']['after']['accuracy'] > max(0.4, metrics['eval']['before']['accuracy'])
