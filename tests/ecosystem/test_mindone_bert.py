"""mindpet on a real mindone.transformers BERT (tiny config, no download; nn.Dense attention projections), GRAPH_MODE:
inject by module name, train, save/load, switch in a compiled graph, merge; and the Hugging Face PEFT format both
ways against mindone.peft itself. CPU-kernel substitutes: see tests/ecosystem/mindone_models.py."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

pytest.importorskip('mindone')

from mindpet import LoraConfig, PetModel, get_pet_model  # noqa: E402
from mindpet.adapter_store import model_fingerprint  # noqa: E402
from mindpet.delta.dora import DoRADense  # noqa: E402
from mindpet.delta.lora import LoRADense  # noqa: E402

from tests.ecosystem.mindone_models import BertLogits, BertLoss, bert_batch, tiny_bert  # noqa: E402

TARGETS = [f'bert.encoder.layer.{i}.attention.self.{m}' for i in range(2) for m in ('query', 'value')]


@pytest.fixture(scope='module')
def mindone_peft():
    """mindone's imports take ~15 s: once per module, in GRAPH_MODE."""
    ms.set_context(mode=ms.GRAPH_MODE)
    import mindone.peft  # pylint: disable=import-outside-toplevel
    yield mindone.peft
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _values(net):
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def _set_random(params, seed, scale=0.3, around=0.0):
    rng = np.random.RandomState(seed)
    for param in params:
        param.set_data(Tensor((around + scale * rng.randn(*param.shape)).astype(np.float32)))


def test_lora_lifecycle_on_mindone_bert(mindone_peft, tmp_path):  # pylint: disable=unused-argument
    ids, mask, types, labels = bert_batch(batch=8)
    model = tiny_bert()
    fingerprint = model_fingerprint(model)
    base_values = _values(model)
    base_out = BertLogits(model)(ids, mask, types).asnumpy()

    pet = get_pet_model(model, LoraConfig(target_modules=['query', 'value'], lora_rank=4, lora_alpha=8,
                                          modules_to_save=['classifier']))
    assert sorted(pet.pet_layers) == sorted(TARGETS)
    assert all(type(layer) is LoRADense for layer in pet.pet_layers.values())  # pylint: disable=unidiomatic-typecheck
    assert model_fingerprint(model) == fingerprint            # base parameter names and shapes untouched
    trainable = sorted(p.name for p in pet.trainable_params())
    assert trainable == sorted([f'{t}.mindpet_delta_lora_{ab}' for t in TARGETS for ab in 'ab']
                               + ['classifier.weight', 'classifier.bias'])
    logits = BertLogits(pet)
    np.testing.assert_allclose(logits(ids, mask, types).asnumpy(), base_out, rtol=1e-5, atol=1e-6)  # B = 0

    step = nn.TrainOneStepCell(BertLoss(logits), nn.Adam(pet.trainable_params(), learning_rate=5e-2))
    step.set_train(True)
    losses = [float(step(ids, mask, types, labels).asnumpy()) for _ in range(12)]
    step.set_train(False)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))   # measured: 1.099 -> 0.810
    assert losses[-1] < 0.8 * losses[0]
    after = _values(model)
    changed = sorted(name for name, value in base_values.items() if not np.array_equal(after[name], value))
    assert changed == ['classifier.bias', 'classifier.weight']    # every other base parameter bit-identical
    assert all(not np.allclose(pet.pet_layers[t].mindpet_delta_lora_b.asnumpy(), 0) for t in TARGETS)

    trained = logits(ids, mask, types).asnumpy()
    pet.save_pretrained(str(tmp_path / 'a'))
    fresh = PetModel.from_pretrained(tiny_bert(), str(tmp_path / 'a'))
    np.testing.assert_array_equal(BertLogits(fresh)(ids, mask, types).asnumpy(), trained)

    # A second adapter, switched to and back in the graph compiled above.
    pet.add_adapter('b', LoraConfig(target_modules=['query', 'value'], lora_rank=4, lora_alpha=8,
                                    modules_to_save=['classifier']))
    pet.set_adapter('b')
    _set_random([p for p in pet.trainable_params() if 'lora_b' in p.name], seed=5)
    b_out = logits(ids, mask, types).asnumpy()
    assert np.abs(b_out - trained).max() > 1e-3
    pet.save_pretrained(str(tmp_path / 'b'))
    pet.set_adapter('default')
    np.testing.assert_array_equal(logits(ids, mask, types).asnumpy(), trained)
    only_b = PetModel.from_pretrained(tiny_bert(), str(tmp_path / 'b'))
    np.testing.assert_allclose(BertLogits(only_b)(ids, mask, types).asnumpy(), b_out, rtol=1e-5, atol=1e-6)

    merged = pet.merge_and_unload()
    assert all(type(cell) is nn.Dense for name, cell in merged.cells_and_names()  # pylint: disable=unidiomatic-typecheck
               if name in TARGETS)
    np.testing.assert_allclose(BertLogits(merged)(ids, mask, types).asnumpy(), trained, rtol=1e-5, atol=1e-5)


def _mindone_lora(peft, model, seed, use_dora=False):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=['query', 'value'], use_dora=use_dora)
    peft_model = peft.get_peft_model(model, config)
    names = [n for n, _ in peft_model.parameters_and_names()]
    params = dict(peft_model.parameters_and_names())
    _set_random([params[n] for n in names if 'lora_A' in n or 'lora_B' in n], seed)
    if use_dora:
        _set_random([params[n] for n in names if 'lora_magnitude_vector' in n], seed + 1, scale=0.2, around=1.0)
    return peft_model


# mindone.peft 0.5.0 has no DoRA (its LoraLayer.dora_init raises NotImplementedError): DoRA's PEFT layout is
# tested on plain networks in test_peft_format.py.
@pytest.mark.parametrize('use_dora', [False], ids=['lora'])
def test_adapter_written_by_mindone_peft_loads_with_same_outputs(mindone_peft, use_dora, tmp_path):
    ids, mask, types, _ = bert_batch()
    base_out = BertLogits(tiny_bert())(ids, mask, types).asnumpy()
    peft_model = _mindone_lora(mindone_peft, tiny_bert(), seed=1, use_dora=use_dora)
    peft_model.save_pretrained(str(tmp_path))
    expected = BertLogits(peft_model)(ids, mask, types).asnumpy()
    assert np.abs(expected - base_out).max() > 0.05            # the adapter changes the outputs

    pet = PetModel.from_pretrained(tiny_bert(), str(tmp_path))
    layer_class = DoRADense if use_dora else LoRADense
    assert sorted(pet.pet_layers) == sorted(TARGETS)
    assert all(isinstance(layer, layer_class) for layer in pet.pet_layers.values())
    np.testing.assert_allclose(BertLogits(pet)(ids, mask, types).asnumpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('use_dora', [False], ids=['lora'])
def test_adapter_written_by_mindpet_loads_in_mindone_peft_with_same_outputs(mindone_peft, use_dora, tmp_path):
    ids, mask, types, _ = bert_batch()
    pet = get_pet_model(tiny_bert(), LoraConfig(target_modules=['query', 'value'], lora_rank=4, lora_alpha=8,
                                                use_dora=use_dora))
    _set_random([p for p in pet.trainable_params() if 'magnitude' not in p.name], seed=2)
    if use_dora:
        _set_random([p for p in pet.trainable_params() if 'magnitude' in p.name], seed=3, scale=0.2, around=1.0)
    expected = BertLogits(pet)(ids, mask, types).asnumpy()
    pet.save_pretrained(str(tmp_path), format='peft')

    loaded = mindone_peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path))
    layer = loaded.base_model.model.bert.encoder.layer[0].attention.self.query
    assert type(layer).__module__.startswith('mindone.peft')
    assert layer.use_dora['default'] is use_dora
    np.testing.assert_allclose(BertLogits(loaded)(ids, mask, types).asnumpy(), expected, rtol=1e-5, atol=1e-5)
