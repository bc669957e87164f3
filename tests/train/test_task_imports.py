"""Tasks and model code come from modules a config names explicitly (``model.task: package.module``); importing
one is deliberate (``model.trust_code`` or the allow-list), and nothing is put on ``sys.path``."""
import os
import sys

import pytest
import yaml

from mindpet.cli import main
from mindpet.train.imports import CodeImportError, TRUSTED_PACKAGES, import_module, import_object
from mindpet.train.runner import load_plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MLP_CONFIG = os.path.join(ROOT, 'configs', 'mlp_lora_tiny.yaml')

TASK_SOURCE = '''
import os
open(os.environ['MINDPET_TEST_MARKER'], 'w').close()     # proves the module ran
from examples.mlp.pet_task import MLPTask


class MyTask(MLPTask):
    name = 'my_mlp'


TASK = MyTask
'''


def _package(root, name):
    """A package ``name`` in ``root`` whose task module leaves a marker file when imported."""
    pkg = root / name
    pkg.mkdir()
    (pkg / '__init__.py').write_text('')
    (pkg / 'task.py').write_text(TASK_SOURCE)
    return pkg


def _config(tmp_path, **model):
    with open(MLP_CONFIG, encoding='utf-8') as handle:
        cfg = yaml.safe_load(handle)
    for key in ('task', 'code_dir', 'trust_code'):
        cfg['model'].pop(key)
    cfg['model'].update(model)
    cfg['training']['output_dir'] = str(tmp_path / 'out')
    path = tmp_path / 'configs' / 'run.yaml'
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(cfg), encoding='utf-8')
    return str(path)


@pytest.fixture(name='marker')
def _marker(tmp_path, monkeypatch):
    path = tmp_path / 'imported'
    monkeypatch.setenv('MINDPET_TEST_MARKER', str(path))
    yield path
    for name in [n for n in sys.modules if n == 'runner_code' or n.startswith('runner_code.')]:
        del sys.modules[name]


def test_an_untrusted_module_is_refused_before_it_runs(tmp_path, marker, capsys):
    _package(tmp_path, 'runner_code')
    path = _config(tmp_path, task='runner_code.task', code_dir='..')
    assert main(['finetune', '--config', path, '--dry-run']) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{path}: 'model.task': importing 'runner_code.task' would run its code" in err
    assert "allow-list ['mindpet', 'mindone', 'mindformers']" in err and "'model.trust_code: true'" in err
    assert not marker.exists() and 'runner_code' not in sys.modules


def test_trust_code_imports_the_task_from_code_dir_without_touching_sys_path(tmp_path, marker, monkeypatch):
    _package(tmp_path, 'runner_code')
    path = _config(tmp_path, task='runner_code.task', code_dir='..', trust_code=True)
    monkeypatch.chdir(ROOT)     # code_dir is relative to the config file, not to the current directory
    before = list(sys.path)
    plan = load_plan(path)
    assert plan.task.name == 'my_mlp' and marker.exists()
    assert sys.path == before
    assert plan.model['code_dir'] == str(tmp_path / 'configs' / '..')


def test_the_current_directory_is_not_put_on_sys_path(tmp_path, marker, monkeypatch, capsys):
    _package(tmp_path, 'runner_code')
    path = _config(tmp_path, task='runner_code.task', trust_code=True)
    monkeypatch.chdir(tmp_path)  # runner_code/ is right here, but the cwd is not an import location
    before = list(sys.path)
    if '' in sys.path or '.' in sys.path:
        monkeypatch.setattr(sys, 'path', [p for p in sys.path if p not in ('', '.')])
        before = list(sys.path)
    assert main(['finetune', '--config', path, '--dry-run']) == 1
    err = capsys.readouterr().err
    assert "'model.task': cannot import 'runner_code.task'" in err and "'model.code_dir'" in err
    assert sys.path == before and not marker.exists()


def test_the_shipped_configs_run_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = load_plan(MLP_CONFIG, [f'training.output_dir={tmp_path / "out"}'])
    assert plan.task.name == 'mlp'
    assert os.path.realpath(plan.model['code_dir']) == os.path.realpath(ROOT)


@pytest.mark.parametrize('model, key, message', [
    ({'name': 'mlp'}, 'model.name', "replaced by 'model.task'"),
    ({}, 'model.task', "missing: name the task module"),
    ({'task': 'examples/mlp/pet_task.py', 'trust_code': True}, 'model.task', "must be a dotted module path"),
    ({'task': 'mindpet.train.schema'}, 'model.task', "does not define TASK"),
    ({'task': 'examples.mlp.pet_task', 'trust_code': 'yes'}, 'model.trust_code', 'must be true or false'),
    ({'task': 'examples.mlp.pet_task', 'code_dir': 'nowhere'}, 'model.code_dir', 'does not exist'),
])
def test_bad_task_keys_name_the_key(tmp_path, capsys, model, key, message):
    path = _config(tmp_path, **model)
    assert main(['finetune', '--config', path, '--dry-run']) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}: '{key}': " in err and message in err, err


def test_import_rules():
    assert TRUSTED_PACKAGES == ('mindpet', 'mindone', 'mindformers')
    assert import_module('mindpet.train.schema').__name__ == 'mindpet.train.schema'
    assert import_object('mindpet.train.schema:Field.check').__name__ == 'check'
    with pytest.raises(CodeImportError, match=r"importing 'json' would run its code"):
        import_module('json')
    assert import_object('json:dumps', trust_code=True)([1]) == '[1]'
    for spec, message in [('json.dumps', "must be 'package.module:Name'"), ('json:', "must be 'package.module:Name'"),
                          ('json:nothing', "the module 'json' has no 'nothing'")]:
        with pytest.raises(CodeImportError, match=message):
            import_object(spec, trust_code=True)


def test_a_model_module_beside_the_config(tmp_path):
    """doc/cli.md's own-Cell recipe: my_models.py beside the config, `code_dir: .`, `trust_code: true`."""
    from mindpet.train.runner import build
    from tests.train.text_fixtures import topic_rows, write_jsonl, train_tokenizer
    folder = tmp_path / 'project'
    folder.mkdir()
    (folder / 'runner_models.py').write_text(
        'from tests.train.text_models import TinyTextClassifier as BagOfWords  # noqa: F401\n')
    rows = topic_rows(20)
    tokenizer, vocab = train_tokenizer(folder / 'tokenizer.json', [r['text'] for r in rows])
    cfg = {'model': {'class': 'runner_models:BagOfWords', 'code_dir': '.', 'trust_code': True,
                     'config': {'vocab_size': vocab, 'hidden': 8, 'num_labels': 4}, 'loss': 'cross_entropy'},
           'pet': {'type': 'lora', 'target_modules': ['proj'], 'modules_to_save': ['head']},
           'data': {'train': write_jsonl(folder / 'train.jsonl', rows), 'tokenizer': tokenizer},
           'schedule': {'start_learning_rate': 0.01},
           'training': {'batch_size': 4, 'output_dir': str(tmp_path / 'out')}}
    path = folder / 'run.yaml'
    path.write_text(yaml.safe_dump(cfg), encoding='utf-8')
    before = list(sys.path)
    try:
        built = build(load_plan(str(path)), lazy=True)
        assert sorted(built.pet_model.pet_layers) == ['proj']
        assert sys.modules['runner_models'].__file__ == str(folder / 'runner_models.py')
        assert sys.path == before
    finally:
        sys.modules.pop('runner_models', None)
