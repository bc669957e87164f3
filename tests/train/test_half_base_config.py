"""``model.base_dtype`` in the run YAML: `mindpet finetune`'s model stores its frozen base in float16 with float32
adapters, and bad values are refused naming the key."""
import os

import numpy as np
import pytest
import yaml
import mindspore as ms
from mindspore import Tensor

from mindpet.train.runner import build, load_plan
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
    path, cfg = _config(tmp_path, base_dtype='float16')
    cfg['pet']['modules_to_save'] = ['head']
    with open(path, 'w', encoding='utf-8') as handle:
        yaml.safe_dump(cfg, handle)
    with pytest.raises(MindPetError, match=r"pet\.modules_to_save.*cannot be combined with 'modules_to_save'"):
        build(load_plan(path))
