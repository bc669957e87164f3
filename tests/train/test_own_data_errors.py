"""Every bad row kind and every bad `model:`/`data:` key of a no-code run gives one line naming the file and line
or the key; nothing is trained or written. `on_bad_rows: skip` drops the bad rows and reports them."""
import json

import pytest
import yaml
import mindspore as ms

from mindpet.cli import main
from tests.train.text_fixtures import topic_rows, write_jsonl, train_tokenizer

MODEL = {'class': 'tests.train.text_models:TinyTextClassifier', 'trust_code': True,
         'config': {'vocab_size': 64, 'hidden': 8, 'num_labels': 4}, 'loss': 'cross_entropy'}


@pytest.fixture(autouse=True)
def _pynative_afterwards():
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(name='files')
def _files(tmp_path):
    rows = topic_rows(40)
    tokenizer, _ = train_tokenizer(tmp_path / 'tokenizer.json', [r['text'] for r in rows])
    return {'rows': rows, 'tokenizer': tokenizer, 'train': write_jsonl(tmp_path / 'train.jsonl', rows)}


def _config(tmp_path, files, model=None, data=None, epochs=1):
    cfg = {'model': dict(MODEL, **(model or {})),
           'pet': {'type': 'lora', 'target_modules': ['proj'], 'modules_to_save': ['head']},
           'data': dict({'train': files['train'], 'tokenizer': files['tokenizer'], 'max_length': 12}, **(data or {})),
           'optimizer': {'type': 'adam'}, 'schedule': {'start_learning_rate': 0.01},
           'training': {'epochs': epochs, 'batch_size': 8, 'output_dir': str(tmp_path / 'out'), 'plot': False}}
    for section in ('model', 'data'):
        cfg[section] = {k: v for k, v in cfg[section].items() if v is not None}
    path = tmp_path / 'run.yaml'
    path.write_text(yaml.safe_dump(cfg), encoding='utf-8')
    return str(path)


def _one_line_error(capsys, path, argv=('finetune',)):
    assert main(list(argv) + ['--config', path]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"mindpet {argv[0]}: error: {path}: "), err
    return err


# ----- bad rows ------------------------------------------------------------------------------------------------------
BAD_ROWS = [
    ('{"text": "goal match", "label": "sports"', 'not valid JSON'),
    ('["goal", "sports"]', 'not a JSON object (a list)'),
    ({'label': 'sports'}, "missing field 'text'"),
    ({'text': 'goal match team'}, "missing field 'label'"),
    ({'text': '   ', 'label': 'sports'}, "empty field 'text'"),
    ({'text': 'goal match', 'label': 'weather'}, "label 'weather' is not in the label set"),
    ({'text': ' '.join(['goal'] * 20), 'label': 'sports'}, '22 tokens, more than max_length 12'),
]


@pytest.mark.parametrize('bad, reason', BAD_ROWS)
def test_a_bad_row_is_named_by_file_and_line(tmp_path, files, capsys, bad, reason):
    rows = files['rows'][:6] + [bad] + files['rows'][6:]
    train = write_jsonl(tmp_path / 'bad.jsonl', rows)
    labels = ['food', 'sports', 'tech', 'travel']
    path = _config(tmp_path, files, data={'train': train, 'labels': labels})
    err = _one_line_error(capsys, path)
    assert f"'data.train': 1 bad row(s) of 41: {train}:7: {reason}" in err, err
    assert 'on_bad_rows: skip' in err
    assert not (tmp_path / 'out').exists()


def test_bad_rows_of_every_kind_are_skipped_counted_and_reported(tmp_path, files, capsys):
    rows = list(files['rows'])
    for index, (bad, _) in enumerate(BAD_ROWS):
        rows.insert(3 * index + 1, bad)
    train = write_jsonl(tmp_path / 'bad.jsonl', rows)
    path = _config(tmp_path, files, data={'train': train, 'labels': ['food', 'sports', 'tech', 'travel'],
                                          'on_bad_rows': 'skip', 'split': 0.25})
    assert main(['finetune', '--config', path]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    notes = json.loads((tmp_path / 'out' / 'metrics.json').read_text())['data']
    assert notes[0] == f'train: 30 rows of classification data from {train}'
    assert notes[-1].startswith(f'skipped 7 bad row(s): {train}:2: not valid JSON')
    assert notes[-1].endswith('and 2 more')
    assert f'[data] skipped 7 bad row(s): {train}:2:' in printed


def test_csv_and_tsv_rows_with_configurable_columns(tmp_path, files, capsys):
    rows = files['rows']
    csv_path = tmp_path / 'train.csv'
    csv_path.write_text('sentence,topic\n' + ''.join(f'"{r["text"]}",{r["label"]}\n' for r in rows[:30])
                        + 'a,b,c\n', encoding='utf-8')
    tsv_path = tmp_path / 'eval.tsv'
    tsv_path.write_text('sentence\ttopic\n' + ''.join(f'{r["text"]}\t{r["label"]}\n' for r in rows[30:]),
                        encoding='utf-8')
    data = {'train': str(csv_path), 'eval': str(tsv_path), 'text_column': 'sentence', 'label_column': 'topic'}
    err = _one_line_error(capsys, _config(tmp_path, files, data=data))
    assert f"{csv_path}:32: 3 cells, but the header has 2" in err
    path = _config(tmp_path, files, data=dict(data, on_bad_rows='skip'))
    assert main(['finetune', '--config', path]) == 0, capsys.readouterr().err
    notes = json.loads((tmp_path / 'out' / 'metrics.json').read_text())['data']
    assert notes[:2] == [f'train: 30 rows of classification data from {csv_path}',
                         f'eval: 10 rows of classification data from {tsv_path}']


# ----- bad keys ------------------------------------------------------------------------------------------------------
BAD_MODEL = [
    ({'clas': 'x'}, 'model.clas', "unknown key; did you mean 'class'?"),
    ({'class': None}, 'model.task', "missing: name the task module ('package.module' defining TASK) or the model"),
    ({'factory': 'tests.train.text_models:build_classifier'}, 'model.factory', 'give exactly one of'),
    ({'class': 'tests.train.text_models.TinyTextClassifier'}, 'model.class', "must be 'package.module:Name'"),
    ({'class': 'tests.train.text_models:Nothing'}, 'model.class', "the module 'tests.train.text_models' has no"),
    ({'class': 'tests.nowhere:Net'}, 'model.class', "cannot import 'tests.nowhere'"),
    ({'trust_code': False}, 'model.class', "importing 'tests.train.text_models' would run its code"),
    ({'config': 'missing.json'}, 'model.config', 'must be a mapping or the path of an existing config.json'),
    ({'config': {'vocab_size': 64, 'width': 3}}, 'model.config', "could not be built from it"),
    ({'class': None, 'factory': 'tests.train.text_models:build_classifier'}, 'model.config',
     "belongs to 'class'; a factory takes 'kwargs'"),
    ({'kwargs': [1]}, 'model.kwargs', 'must be a mapping'),
    ({'weights': 'missing.ckpt'}, 'model.weights', "'missing.ckpt' does not exist"),
    ({'weights_map': {'(': 'x'}}, 'model.weights_map', 'is not a regular expression'),
    ({'weights_map': 'hf'}, 'model.weights_map', "must be 'auto', 'none' or a mapping"),
    ({'head': 'classifier'}, 'model.head', "must be one of ['auto', 'sequence_classification'"),
    ({'loss': None}, 'model.loss', 'missing: a plain model'),
    ({'loss': 'mse'}, 'model.loss', "must be one of ['cross_entropy', 'next_token']"),
    ({'head': 'causal_lm'}, 'model.loss', 'the causal_lm head has its own loss'),
    ({'trust_code': 'yes'}, 'model.trust_code', 'must be true or false'),
]


@pytest.mark.parametrize('model, key, message', BAD_MODEL)
def test_bad_model_keys(tmp_path, files, capsys, model, key, message):
    err = _one_line_error(capsys, _config(tmp_path, files, model=model))
    assert f"'{key}': " in err and message in err, err
    assert not (tmp_path / 'out').exists()


def test_a_bad_config_json_names_the_key(tmp_path, files, capsys):
    broken = tmp_path / 'config.json'
    broken.write_text('{"vocab_size": ')
    err = _one_line_error(capsys, _config(tmp_path, files, model={'config': str(broken)}))
    assert "'model.config': " in err and 'is not a JSON file' in err


BAD_DATA = [
    ({'trian': 'x'}, 'data.trian', "unknown key; did you mean 'train'?"),
    ({'train': None}, 'data.train', 'missing (required'),
    ({'train': 'missing.jsonl'}, 'data.train', "the file 'missing.jsonl' does not exist"),
    ({'tokenizer': None}, 'data.tokenizer', 'missing (required'),
    ({'kind': 'instruction'}, 'data.kind', "'instruction' data does not fit the plain head with loss cross_entropy"),
    ({'kind': 'poetry'}, 'data.kind', "must be one of ['classification', 'instruction', 'text']"),
    ({'eval': 'EVAL', 'split': 0.2}, 'data.split', 'give either an eval file or a split of train, not both'),
    ({'split': 0.7}, 'data.split', 'must be a number > 0.0 <= 0.5'),
    ({'max_length': 1}, 'data.max_length', 'must be an int >= 2'),
    ({'format': 'parquet'}, 'data.format', "must be one of ['jsonl', 'csv', 'tsv', 'txt']"),
    ({'train': 'TRAIN.data'}, 'data.format', "cannot tell the format of"),
    ({'train': 'TRAIN.txt'}, 'data.train', "a .txt file holds plain text ('kind: text'), not classification rows"),
    ({'labels': ['sports']}, 'data.labels', 'needs at least 2 labels'),
    ({'labels': 'sports'}, 'data.labels', 'must be a list of label names (str or int)'),
    ({'labels': ['sports', 'food', 'sports']}, 'data.labels', 'lists a label twice'),
    ({'pad_token': '<nothing>'}, 'data.pad_token', "the padding token '<nothing>' is not in the tokenizer's"),
    ({'eos_token': '<nothing>'}, 'data.eos_token', "the end-of-sequence token '<nothing>' is not in"),
    ({'prompt_template': 'Q: {question}'}, 'data.prompt_template', "must contain '{prompt}'"),
    ({'on_bad_rows': 'ignore'}, 'data.on_bad_rows', "must be one of ['error', 'skip']"),
    ({'tokenizer': 'TRAIN'}, 'data.tokenizer', 'is not a tokenizer.json'),
    ({'text_column': 'sentence'}, 'data.train', "missing field 'sentence'"),
]


@pytest.mark.parametrize('data, key, message', BAD_DATA)
def test_bad_data_keys(tmp_path, files, capsys, data, key, message):
    data = dict(data)
    for name, value in list(data.items()):
        if value == 'TRAIN':
            data[name] = files['train']
        elif value == 'EVAL':
            data[name] = files['train']
        elif isinstance(value, str) and value.startswith('TRAIN.'):
            data[name] = str(tmp_path / f'copy.{value.split(".")[1]}')
            with open(data[name], 'w', encoding='utf-8') as handle:
                handle.write(open(files['train'], encoding='utf-8').read())
    err = _one_line_error(capsys, _config(tmp_path, files, data=data))
    assert f"'{key}': " in err and message in err, err
    assert not (tmp_path / 'out').exists()


def test_int_labels_map_by_the_labels_list(tmp_path, files):
    from mindpet.train.runner import load_plan
    names = ['food', 'sports', 'tech', 'travel']
    rows = [{'text': r['text'], 'label': names.index(r['label'])} for r in files['rows']]
    train = write_jsonl(tmp_path / 'ints.jsonl', rows)
    plan = load_plan(_config(tmp_path, files, data={'train': train, 'eval': train, 'labels': [3, 2, 1, 0]}))
    assert plan.task.labels == ['3', '2', '1', '0']
    encoded = plan.task._splits['train']          # pylint: disable=protected-access
    assert encoded.columns[2].tolist() == [3 - r['label'] for r in rows]     # label 3 is index 0, ...
