"""mindpet finetune / evaluate on the mlp task: the schema and its messages, --set, the schedule, a whole run (files,
counts, checkpoints, frozen base, adapter reload), and bad configs failing before anything is written."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import yaml
import mindspore as ms

from mindpet.adapter_store import adapter_weights_path
from mindpet.cli import main
from mindpet.train import learning_rates
from mindpet.train.runner import finetune, evaluate, load_plan, build
from mindpet.train.schema import Field, ConfigSource, check_section, apply_overrides, parse_override
from mindpet.utils.exceptions import ModelConfigKeysInfoError, ModelConfigParamsInfoError, MindPetError
from mindpet.utils.io_utils import load_checkpoint_file

# The loss curve is drawn only when matplotlib is installed (the 'plot' extra).
PLOT = ['loss.png'] if importlib.util.find_spec('matplotlib') else []

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MLP_CONFIG = os.path.join(ROOT, 'configs', 'mlp_lora_tiny.yaml')
try:
    import matplotlib  # noqa: F401  pylint: disable=unused-import
    PLOT = ['loss.png']
except ImportError:   # the loss curve is written only with matplotlib (mindpet[plot])
    PLOT = []


@pytest.fixture(autouse=True)
def _pynative_afterwards():
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def small_config(tmp_path, **changes):
    """The shipped mlp config made small (256 rows, 1 pre-training epoch, 2 epochs = 6 steps), written to tmp."""
    with open(MLP_CONFIG, encoding='utf-8') as handle:
        cfg = yaml.safe_load(handle)
    cfg['model']['code_dir'] = ROOT      # the shipped config says '..' (relative to configs/)
    cfg['data']['num_samples'] = 256
    cfg['model']['pretrain_epochs'] = 1
    cfg['training'].update(epochs=2, log_interval=1, checkpoint_interval=4, output_dir=str(tmp_path / 'out'))
    cfg['schedule']['warmup_steps'] = 2
    for key, value in changes.items():
        section, name = key.split('__')
        cfg[section][name] = value
    path = tmp_path / 'run.yaml'
    path.write_text(yaml.safe_dump(cfg), encoding='utf-8')
    return str(path)


# ----- schema --------------------------------------------------------------------------------------------------------
def test_check_section_messages_name_file_and_key():
    source = ConfigSource('cfg.yaml', overridden={'training.epochs'})
    fields = {'epochs': Field('int', 1, min_value=1), 'batch_size': Field('int'),
              'mode': Field('str', 'GRAPH', choices=('GRAPH', 'PYNATIVE')), 'ckpt': Field('path', None)}
    assert check_section(source, 'training', {'batch_size': 4}, fields) == \
        {'epochs': 1, 'batch_size': 4, 'mode': 'GRAPH', 'ckpt': None}
    with pytest.raises(ModelConfigKeysInfoError, match=r"^cfg\.yaml: 'training\.batch_sise': unknown key; did you "
                                                       r"mean 'batch_size'\?$"):
        check_section(source, 'training', {'batch_sise': 4}, fields)
    with pytest.raises(ModelConfigKeysInfoError, match=r"'training\.batch_size': missing"):
        check_section(source, 'training', {}, fields)
    with pytest.raises(ModelConfigParamsInfoError, match=r"^cfg\.yaml: 'training\.epochs' \(from --set\): must be "
                                                         r"an int >= 1, but got 1\.5 \(float\)$"):
        check_section(source, 'training', {'batch_size': 4, 'epochs': 1.5}, fields)
    with pytest.raises(ModelConfigParamsInfoError, match=r"but got True \(bool\)"):
        check_section(source, 'training', {'batch_size': True}, fields)
    with pytest.raises(ModelConfigParamsInfoError, match=r"one of \['GRAPH', 'PYNATIVE'\], but got 'graph' \(str\); "
                                                         r"did you mean 'GRAPH'\?"):
        check_section(source, 'training', {'batch_size': 4, 'mode': 'graph'}, fields)
    with pytest.raises(ModelConfigParamsInfoError, match=r"'training\.ckpt': the file '/no/such\.ckpt' does not "
                                                         r"exist"):
        check_section(source, 'training', {'batch_size': 4, 'ckpt': '/no/such.ckpt'}, fields)
    # A dry run records the missing file instead.
    lenient = ConfigSource('cfg.yaml', missing_ok=True)
    assert check_section(lenient, 'training', {'batch_size': 4, 'ckpt': '/no/such.ckpt'}, fields)['ckpt'] == \
        '/no/such.ckpt'
    assert lenient.missing == [('training.ckpt', '/no/such.ckpt')]


def test_overrides_parse_yaml_values_and_dotted_keys():
    assert parse_override('training.epochs=3') == (['training', 'epochs'], 3)
    assert parse_override('pet.target_modules=[q, v]') == (['pet', 'target_modules'], ['q', 'v'])
    assert parse_override('model.base_checkpoint=null') == (['model', 'base_checkpoint'], None)
    assert parse_override('pet={type: full}') == (['pet'], {'type': 'full'})
    cfg = {'training': {'epochs': 1}, 'pet': {'type': 'lora', 'lora_rank': 8}}
    changed = apply_overrides(cfg, ['training.epochs=4', 'pet.lora_rank=2', 'schedule.decay=cosine'])
    assert cfg == {'training': {'epochs': 4}, 'pet': {'type': 'lora', 'lora_rank': 2},
                   'schedule': {'decay': 'cosine'}}
    assert changed == {'training.epochs', 'pet.lora_rank', 'schedule.decay'}
    with pytest.raises(ValueError, match='KEY=VALUE'):
        parse_override('training.epochs')
    with pytest.raises(ValueError, match="'training.epochs' holds 4"):
        apply_overrides(cfg, ['training.epochs.x=1'])


def test_learning_rates_follow_the_formulas():
    rates = learning_rates(10, 1e-3, 1e-5, warmup_steps=3, decay='linear')
    expected = [1e-3 / 3, 2e-3 / 3, 1e-3] + [1e-3 + (1e-5 - 1e-3) * j / 6 for j in range(7)]
    np.testing.assert_allclose(rates, expected, rtol=1e-12)
    cosine = learning_rates(5, 2.0, 0.0, decay='cosine')
    np.testing.assert_allclose(cosine, [2.0 * (1 + math.cos(math.pi * j / 4)) / 2 for j in range(5)], atol=1e-12)
    poly = learning_rates(4, 1.0, 0.1, decay='polynomial', power=2.0)
    np.testing.assert_allclose(poly, [0.1 + 0.9 * (1 - j / 3) ** 2 for j in range(4)], rtol=1e-12)
    assert learning_rates(3, 0.5, decay='constant', warmup_steps=1) == [0.5, 0.5, 0.5]
    assert learning_rates(2, 1.0, 0.0, warmup_steps=5) == [0.2, 0.4]   # warm-up longer than the run
    with pytest.raises(ValueError, match="'start_learning_rate'"):
        learning_rates(3, 0.0)


# ----- a whole run ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def mlp_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp('mlp_run')
    path = small_config(tmp_path)
    lines = []
    summary = finetune(path, out=lines.append)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return path, str(tmp_path / 'out'), summary, lines


def test_finetune_writes_adapter_checkpoints_and_reports(mlp_run):
    path, out_dir, summary, lines = mlp_run
    assert sorted(os.listdir(out_dir)) == sorted(['adapter', 'checkpoints', 'config.yaml', 'metrics.json'] + PLOT)
    # LoRA r=8 on layers.0 (32 -> 256), layers.1/2 (256 -> 256) and the whole head (256 -> 8, with bias).
    lora = 8 * (32 + 256) + 2 * 8 * (256 + 256)
    head = 256 * 8 + 8
    base = 32 * 256 + 256 + 2 * (256 * 256 + 256) + head
    assert summary['trainable_params'] == lora + head
    assert summary['total_params'] == base + lora
    assert summary['steps'] == 6   # 204 training rows // 64 = 3 steps per epoch, 2 epochs
    metrics = json.load(open(os.path.join(out_dir, 'metrics.json'), encoding='utf-8'))
    assert len(metrics['losses']) == len(metrics['step_times']) == 6
    np.testing.assert_allclose(metrics['learning_rates'], learning_rates(6, 0.005, 0.0005, 2, 'cosine'))
    assert metrics['summary']['loss_first'] == metrics['losses'][0]
    assert metrics['eval']['after']['accuracy'] == summary['metric_after']
    # Adapter file: the LoRA factors and the head, nothing else; the size reported is the file's.
    weights = adapter_weights_path(os.path.join(out_dir, 'adapter'))
    tensors = load_checkpoint_file(weights)
    assert sorted(tensors) == sorted(
        [f'layers.{i}.mindpet_delta_lora_{ab}' for i in range(3) for ab in 'ab'] + ['head.weight', 'head.bias'])
    assert summary['adapter_bytes'] == os.path.getsize(weights)
    assert summary['full_checkpoint_bytes'] == 4 * base
    # Checkpoints every 4 steps and at the end: the trainable tensors + optimizer state + run position.
    ckpts = sorted(os.listdir(os.path.join(out_dir, 'checkpoints')))
    assert ckpts == ['lora-2_1.ckpt', 'lora-2_3.ckpt']
    saved = load_checkpoint_file(os.path.join(out_dir, 'checkpoints', 'lora-2_3.ckpt'))
    for name in tensors:
        np.testing.assert_array_equal(saved[name].asnumpy(), tensors[name].asnumpy())
    assert int(saved['mindpet_meta_step'].asnumpy()) == 6
    # Printed: the header, one progress line per step with loss/lr/time/ETA, the evaluation, the table.
    text = '\n'.join(lines)
    assert text.count('| loss ') == 6 and 'ETA' in text and 's/step' in text
    assert '[eval] before: accuracy' in text and '[eval] after: accuracy' in text
    for row in ('trainable params', 'loss first -> last', 'eval accuracy', 'step time', 'peak memory',
                'adapter file', 'full checkpoint', 'wall time'):
        assert row in text
    for png in PLOT:
        with open(os.path.join(out_dir, png), 'rb') as handle:
            assert handle.read(8) == b'\x89PNG\r\n\x1a\n'


def test_training_moves_only_the_adapter_and_evaluate_reproduces_it(mlp_run):
    path, out_dir, summary, _ = mlp_run
    # Rebuild the run's base model (same seed, same pre-training) and compare with the adapter's base values.
    plan = load_plan(path)
    from mindpet.train.runner import set_context
    set_context(plan)
    network = plan.task.build_network()
    plan.task.load_base(network, None)
    base = {p.name: p.asnumpy().copy() for p in network.get_parameters()}
    adapter = load_checkpoint_file(adapter_weights_path(os.path.join(out_dir, 'adapter')))
    assert not np.array_equal(adapter['head.weight'].asnumpy(), base['head.weight'])
    assert np.abs(adapter['layers.0.mindpet_delta_lora_b'].asnumpy()).max() > 0   # B starts at 0
    # evaluate: base + adapter in a new process state gives exactly the run's accuracy.
    lines = []
    metrics = evaluate(path, os.path.join(out_dir, 'adapter'), out=lines.append)
    assert metrics['accuracy'] == summary['metric_after']
    assert 'with adapter' in lines[0]
    # The frozen layers of the adapted model are still the base values (only LoRA factors and the head moved).
    from mindpet.model import PetModel
    pet = PetModel.from_pretrained(network, os.path.join(out_dir, 'adapter'))
    for param in pet.base_model.get_parameters():
        if param.name in base and not param.name.startswith('head.'):
            np.testing.assert_array_equal(param.asnumpy(), base[param.name])


def test_full_finetuning_and_pynative(tmp_path):
    path = small_config(tmp_path, context__mode='PYNATIVE', training__checkpoint_interval=0,
                        training__epochs=1)
    summary = finetune(path, overrides=['pet={type: full}'], out=lambda *_: None)
    out_dir = str(tmp_path / 'out')
    assert sorted(os.listdir(out_dir)) == sorted(['config.yaml', 'metrics.json', 'model.ckpt'] + PLOT)
    assert summary['trainable_params'] == summary['total_params'] == 32 * 256 + 256 + 2 * (256 * 256 + 256) + \
        256 * 8 + 8
    assert summary['full_checkpoint_measured'] and summary['adapter_bytes'] is None
    recorded = yaml.safe_load(open(os.path.join(out_dir, 'config.yaml'), encoding='utf-8'))
    assert recorded['pet'] == {'type': 'full'} and recorded['context']['mode'] == 'PYNATIVE'
    metrics = evaluate(path, os.path.join(out_dir, 'model.ckpt'), overrides=['pet={type: full}'],
                       out=lambda *_: None)
    assert metrics['accuracy'] == summary['metric_after']


def test_dry_run_builds_without_weights_and_writes_nothing(tmp_path, capsys):
    path = small_config(tmp_path, model__base_checkpoint=None)
    code = main(['finetune', '--config', path, '--dry-run', '--set', 'model.base_checkpoint=/elsewhere/base.ckpt'])
    out = capsys.readouterr().out
    assert code == 0
    assert 'valid' in out and "'model.base_checkpoint' names '/elsewhere/base.ckpt', which does not exist here" in out
    assert 'trainable 12,552 of 152,584 parameters' in out
    assert not os.path.exists(tmp_path / 'out')


# ----- bad configs -----------------------------------------------------------------------------------------------
BAD = [
    (['training.batch_sise=3'], r"'training\.batch_sise' \(from --set\): unknown key; did you mean 'batch_size'\?"),
    (['pet.lora_rnak=4'], r"'pet\.lora_rnak' \(from --set\): unknown key of the 'lora' method; did you mean "
                          r"'lora_rank'\?"),
    (['trainig.epochs=2'], r"'trainig' \(from --set\): unknown section; did you mean 'training'\?"),
    (['pet.ranks=4'], r"'pet\.ranks' \(from --set\): unknown key of the 'lora' method; valid keys: \["),
    (['zzz.epochs=2'], r"'zzz' \(from --set\): unknown section; valid keys: \['context', "),
    (['training.epochs=two'], r"'training\.epochs' \(from --set\): must be an int >= 1, but got 'two' \(str\)"),
    (['pet.lora_rank=1.5'], r"'pet\.lora_rank' \(from --set\): For 'LoraConfig', the 'lora_rank' must be a positive "
                            r"int, but got 1\.5 \(float\)"),
    (['model.base_checkpoint=/no/base.ckpt'], r"'model\.base_checkpoint' \(from --set\): the file '/no/base\.ckpt' "
                                              r"does not exist"),
    (['pet.target_modules=[attention]'], r"'pet\.target_modules' \(from --set\): For 'get_pet_model', the 'lora' "
                                         r"config's target_modules \['attention'\] .* match no adaptable cell"),
    # Refusals at injection name the field too (FieldValueError.field), not target_modules.
    (["pet={type: ia3, target_modules: ['layers\\.\\d+'], feedforward_modules: [head]}"],
     r"'pet\.feedforward_modules'( \(from --set\))?: For 'get_pet_model', the 'ia3' config's feedforward_modules "
     r"pattern 'head' matches none"),
    (['pet.layers_to_transform=[7]'], r"'pet\.layers_to_transform' \(from --set\): For 'get_pet_model', the 'lora' "
                                      r"config's layers_to_transform \[7\]"),
    (["pet={type: tsvd, target_modules: ['layers\\.\\d+'], tsvd_rank: 4, target_rank: 2, tsvd_factor_slices: 9}"],
     r"'pet\.tsvd_factor_slices'( \(from --set\))?: For '.*the 'tsvd_factor_slices' must not exceed"),
    (['pet.init_lora_weights=loftq'], r"'pet\.init_lora_weights' \(from --set\): For 'LoraConfig', the "
                                      r"'init_lora_weights' must be one of"),
    (['pet.type=lorra'], r"'pet\.type' \(from --set\): Unknown PET method type 'lorra' \(did you mean 'lora'\?\)"),
    (['model.overrides={hiden: 3}'], r"'model\.overrides' \(from --set\): For 'MLPConfig', unknown key 'hiden'; "
                                     r"did you mean 'hidden'\?"),
    (['schedule.end_learning_rate=0.1'], r"'schedule\.end_learning_rate' \(from --set\): must not exceed "
                                         r"start_learning_rate"),
    (['training.rdrop_alpha=4'], r"'training\.rdrop_alpha' \(from --set\): R-Drop is not available"),
]


@pytest.mark.parametrize('sets, message', BAD, ids=[s[0][0].split('=')[0] for s in BAD])
def test_bad_config_fails_before_anything_with_one_line(tmp_path, capsys, sets, message):
    path = small_config(tmp_path)
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    (out_dir / 'keep.txt').write_text('previous run')
    before = {p: os.stat(os.path.join(out_dir, p)).st_mtime_ns for p in os.listdir(out_dir)}
    args = ['finetune', '--config', path]
    for item in sets:
        args += ['--set', item]
    assert main(args) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"mindpet finetune: error: {path}: ")
    assert __import__('re').search(message, err), err
    assert captured.out == ''            # nothing ran
    assert {p: os.stat(os.path.join(out_dir, p)).st_mtime_ns for p in os.listdir(out_dir)} == before


def test_bad_config_files(tmp_path, capsys):
    broken = tmp_path / 'broken.yaml'
    broken.write_text('model: [unclosed\n')
    assert main(['finetune', '--config', str(broken)]) == 1
    assert 'is not valid YAML' in capsys.readouterr().err
    assert main(['finetune', '--config', str(tmp_path / 'missing.yaml')]) == 1
    assert 'missing.yaml' in capsys.readouterr().err
    no_pet = tmp_path / 'no_pet.yaml'
    cfg = yaml.safe_load(open(small_config(tmp_path), encoding='utf-8'))
    del cfg['pet']
    no_pet.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ModelConfigKeysInfoError, match=r"'pet': missing section"):
        load_plan(str(no_pet))
    with pytest.raises(MindPetError, match=r"'model\.task' \(from --set\): cannot import 'examples\.mlpp\.pet_task'"):
        load_plan(small_config(tmp_path), ['model.task=examples.mlpp.pet_task'])


def test_build_refuses_a_config_matching_nothing_without_touching_the_model(tmp_path):
    plan = load_plan(small_config(tmp_path), ['pet.target_modules=[head.nothing]'])
    with pytest.raises(ModelConfigParamsInfoError, match=r"'pet\.target_modules'.*match no adaptable cell"):
        build(plan, lazy=True)


def test_a_base_checkpoint_that_does_not_fit_fails_before_the_output_dir(tmp_path, capsys):
    from examples.mlp.model import Classifier
    other = tmp_path / 'other.ckpt'
    ms.save_checkpoint(Classifier(dict(in_dim=32, hidden=128, num_layers=3, num_classes=8)), str(other))
    path = small_config(tmp_path)
    assert main(['finetune', '--config', path, '--set', f'model.base_checkpoint={other}']) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and 'layers.0.weight' in err and str(other) in err, err
    assert not (tmp_path / 'out').exists()
