"""``training.recompute`` in the run YAML: the runner sets recompute on the model's blocks (built-in tasks and the
generic ``model.class`` path, LoRA and full fine-tuning), a run with it takes the same losses as without it, and bad
values are refused naming the key."""
import json
import os

import pytest
import mindspore as ms

from mindpet.recompute import recomputed_blocks
from mindpet.train.runner import build, finetune, load_plan
from mindpet.utils.exceptions import MindPetError
from tests.train.test_own_model_and_data import classification_files, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PANGU = os.path.join(ROOT, 'configs', 'pangu_lora_tiny.yaml')
PANGU_BLOCKS = ['backbone.blocks.0', 'backbone.blocks.1']


@pytest.fixture(autouse=True)
def _pynative_afterwards():
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _built(tmp_path, *overrides):
    return build(load_plan(PANGU, [f'training.output_dir={tmp_path / "out"}', *overrides]))


@pytest.mark.parametrize('value, expected', [('true', PANGU_BLOCKS), (r'backbone\.blocks\.1', ['backbone.blocks.1']),
                                             ('[blocks.0, top_query_layer]',
                                              ['backbone.blocks.0', 'backbone.top_query_layer']),
                                             ('false', []), ('null', [])])
def test_the_key_sets_recompute_on_the_blocks(tmp_path, value, expected):
    assert recomputed_blocks(_built(tmp_path, f'training.recompute={value}').model) == expected


def test_default_is_off_and_full_fine_tuning_gets_it_too(tmp_path):
    assert recomputed_blocks(_built(tmp_path).model) == []
    built = _built(tmp_path, 'training.recompute=true', 'pet={type: full}')
    assert built.pet_model is None and recomputed_blocks(built.network) == PANGU_BLOCKS


def _losses(tmp_path, name, recompute):
    out = tmp_path / name
    finetune(PANGU, [f'training.output_dir={out}', f'training.recompute={recompute}', 'training.max_steps=3',
                     'training.evaluate=false', 'training.plot=false'], out=lambda *_: None)
    metrics = json.loads((out / 'metrics.json').read_text(encoding='utf-8'))
    return metrics['losses']


def test_a_run_with_recompute_takes_the_same_losses(tmp_path):
    # GRAPH_MODE (the config's), LoRA on dense1/dense3, AdamW: three optimizer steps each.
    plain = _losses(tmp_path, 'plain', 'false')
    recomputed = _losses(tmp_path, 'recompute', 'true')
    assert len(plain) == 3 and plain[0] != plain[-1]
    assert recomputed == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_generic_model_class_path(tmp_path):
    pytest.importorskip('mindone')
    train, tokenizer, _ = classification_files(tmp_path)
    bert = {'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2, 'intermediate_size': 64,
            'max_position_embeddings': 32}
    model = {'class': 'mindone.transformers:BertForSequenceClassification', 'config': bert}
    data = {'train': train, 'tokenizer': tokenizer, 'max_length': 12}
    path = write_config(tmp_path, model, data, {'type': 'lora', 'target_modules': ['query', 'value']})
    built = build(load_plan(path, ['training.recompute=true']))
    assert recomputed_blocks(built.model) == ['bert.encoder.layer.0', 'bert.encoder.layer.1']


@pytest.mark.parametrize('value, message', [
    ('3', r"'training\.recompute' \(from --set\): must be true, false, a cell-name pattern \(a regular "
          r"expression\) or a list of them, but got 3"),
    ('"("', r"'training\.recompute' \(from --set\): must be true, false, a cell-name pattern .* but got '\('"),
    ('nothing', r"'training\.recompute' \(from --set\): For 'apply_recompute', the 'blocks' patterns \['nothing'\] "
                r"match no cell of the model; cell names look like \["),
    ('dense1', r"'training\.recompute' \(from --set\): .* 'backbone\.blocks\.0\.attention\.dense1' is a delta layer"),
])
def test_bad_values_name_the_key(tmp_path, value, message):
    with pytest.raises(MindPetError, match=message):
        _built(tmp_path, f'training.recompute={value}')
    # A dry run (the model built without weights) refuses it the same way, and nothing is written.
    with pytest.raises(MindPetError, match=message):
        finetune(PANGU, [f'training.output_dir={tmp_path / "dry"}', f'training.recompute={value}'], dry_run=True,
                 out=lambda *_: None)
    assert not (tmp_path / 'dry').exists()
