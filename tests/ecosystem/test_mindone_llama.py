"""mindpet on a real mindone.transformers LLaMA (decoder LLM, tiny config, no download; nn.Dense projections), in
GRAPH_MODE: LoRA by module name, next-token training (only the adapter changes), save/load, switch in a compiled
graph, merge; IA3 with a feed-forward layer through the PEFT format. CPU-kernel substitutes: mindone_models.py."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

pytest.importorskip('mindone')

from mindpet import IA3Config, LoraConfig, PetModel, get_pet_model  # noqa: E402
from mindpet.adapter_store import model_fingerprint  # noqa: E402
from mindpet.delta.ia3 import IA3Dense  # noqa: E402
from mindpet.delta.lora import LoRADense  # noqa: E402

from tests.ecosystem.mindone_models import LlamaLogits, NextTokenLoss, llama_batch, tiny_llama  # noqa: E402

TARGETS = [f'model.layers.{i}.self_attn.{m}' for i in range(2) for m in ('q_proj', 'v_proj')]


@pytest.fixture(scope='module')
def mindone_graph():
    ms.set_context(mode=ms.GRAPH_MODE)
    import mindone.transformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _values(net):
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def test_lora_lifecycle_on_mindone_llama(mindone_graph, tmp_path):  # pylint: disable=unused-argument
    batch = llama_batch()
    model = tiny_llama()
    fingerprint = model_fingerprint(model)
    base_values = _values(model)
    base_out = LlamaLogits(model)(*batch).asnumpy()

    pet = get_pet_model(model, LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=4, lora_alpha=8))
    assert sorted(pet.pet_layers) == sorted(TARGETS)
    assert all(type(layer) is LoRADense for layer in pet.pet_layers.values())  # pylint: disable=unidiomatic-typecheck
    assert model_fingerprint(model) == fingerprint
    assert sorted(p.name for p in pet.trainable_params()) == sorted(
        f'{t}.mindpet_delta_lora_{ab}' for t in TARGETS for ab in 'ab')
    logits = LlamaLogits(pet)
    np.testing.assert_allclose(logits(*batch).asnumpy(), base_out, rtol=1e-5, atol=1e-5)

    step = nn.TrainOneStepCell(NextTokenLoss(logits), nn.Adam(pet.trainable_params(), learning_rate=2e-2))
    step.set_train(True)
    losses = [float(step(*batch).asnumpy()) for _ in range(10)]
    step.set_train(False)
    assert losses[-1] < 0.9 * losses[0]
    after = _values(model)
    assert [n for n, v in base_values.items() if not np.array_equal(after[n], v)] == []   # base bit-identical

    trained = logits(*batch).asnumpy()
    assert np.abs(trained - base_out).max() > 1e-2
    pet.save_pretrained(str(tmp_path / 'a'))
    fresh = PetModel.from_pretrained(tiny_llama(), str(tmp_path / 'a'))
    np.testing.assert_array_equal(LlamaLogits(fresh)(*batch).asnumpy(), trained)

    # Switch to a second adapter and back, in the graph compiled above.
    pet.add_adapter('b', LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=4, lora_alpha=8))
    pet.set_adapter('b')
    rng = np.random.RandomState(7)
    for param in pet.trainable_params():
        param.set_data(Tensor((0.3 * rng.randn(*param.shape)).astype(np.float32)))
    b_out = logits(*batch).asnumpy()
    pet.save_pretrained(str(tmp_path / 'b'))
    pet.set_adapter('default')
    np.testing.assert_array_equal(logits(*batch).asnumpy(), trained)
    only_b = PetModel.from_pretrained(tiny_llama(), str(tmp_path / 'b'))
    np.testing.assert_allclose(LlamaLogits(only_b)(*batch).asnumpy(), b_out, rtol=1e-5, atol=1e-5)
    assert np.abs(b_out - trained).max() > 1e-2

    merged = pet.merge_and_unload()
    assert all(type(cell) is nn.Dense for name, cell in merged.cells_and_names()  # pylint: disable=unidiomatic-typecheck
               if name in TARGETS)
    np.testing.assert_allclose(LlamaLogits(merged)(*batch).asnumpy(), trained, rtol=1e-4, atol=1e-4)


def test_ia3_with_feedforward_layer_through_peft_format(mindone_graph, tmp_path):  # pylint: disable=unused-argument
    batch = llama_batch(seed=1)
    config = IA3Config(target_modules=['k_proj', 'v_proj', 'down_proj'], feedforward_modules=['down_proj'])
    pet = get_pet_model(tiny_llama(), config)
    assert all(isinstance(layer, IA3Dense) for layer in pet.pet_layers.values())
    assert [k for k, layer in pet.pet_layers.items() if layer.ia3_feedforward] == [
        'model.layers.0.mlp.down_proj', 'model.layers.1.mlp.down_proj']
    rng = np.random.RandomState(3)
    for param in pet.trainable_params():
        param.set_data(Tensor((1 + 0.5 * rng.randn(*param.shape)).astype(np.float32)))
    expected = LlamaLogits(pet)(*batch).asnumpy()
    pet.save_pretrained(str(tmp_path), format='peft')
    loaded = PetModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert loaded.get_adapter_config().method == 'ia3'
    np.testing.assert_allclose(LlamaLogits(loaded)(*batch).asnumpy(), expected, rtol=1e-5, atol=1e-5)
