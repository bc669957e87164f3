"""Half-precision frozen base (get_pet_model(..., base_dtype=...)): the dtype of every parameter, float32 adapters
and optimiser state, training in GRAPH_MODE, merge within the base dtype's rounding, bad input; with
modules_to_save, the saved cells train, compute, store and switch in float32 beside the half base."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Tensor
from safetensors.numpy import load_file

from mindpet import BitFitConfig, LoraConfig, get_pet_model
from mindpet.adapter_store import adapter_weights_path
from mindpet.delta.lora import lora_increment


class SmallNet(nn.Cell):
    """Dense -> LayerNorm -> ReLU -> Dense, float32 as built."""

    def __init__(self, seed=0):
        super().__init__()
        ms.set_seed(seed)
        self.fc1 = nn.Dense(8, 16)
        self.ln = nn.LayerNorm((16,))
        self.fc2 = nn.Dense(16, 4)

    def construct(self, x):
        return self.fc2(ops.relu(self.ln(self.fc1(x))))


CONFIG = dict(target_modules=['fc1', 'fc2'], lora_rank=4, lora_alpha=8)


def _data(seed=1):
    rng = np.random.RandomState(seed)
    return Tensor(rng.randn(6, 8).astype(np.float32)), Tensor(rng.randn(6, 4).astype(np.float32))


def _randomise_b(pet, seed=2):
    rng = np.random.RandomState(seed)
    for layer in pet.pet_layers.values():
        layer.mindpet_delta_lora_b.set_data(Tensor(rng.randn(*layer.mindpet_delta_lora_b.shape).astype(np.float32)
                                                   * 0.1))


@pytest.mark.parametrize('base_dtype', [ms.float16, 'float16', ms.bfloat16])
def test_every_parameter_dtype(base_dtype):
    pet = get_pet_model(SmallNet(), LoraConfig(**CONFIG), base_dtype=base_dtype)
    half = ms.bfloat16 if base_dtype == ms.bfloat16 else ms.float16
    dtypes = {p.name: p.dtype for p in pet.get_parameters()}
    assert dtypes == {
        'fc1.weight': half, 'fc1.bias': half, 'ln.gamma': half, 'ln.beta': half, 'fc2.weight': half,
        'fc2.bias': half,
        'fc1.mindpet_delta_lora_a': ms.float32, 'fc1.mindpet_delta_lora_b': ms.float32,
        'fc2.mindpet_delta_lora_a': ms.float32, 'fc2.mindpet_delta_lora_b': ms.float32,
        'fc1.mindpet_state_lora_scaling': ms.float32, 'fc2.mindpet_state_lora_scaling': ms.float32}
    assert sorted(p.name for p in pet.trainable_params()) == sorted(n for n in dtypes if 'delta' in n)
    assert all(layer.compute_dtype == half for layer in pet.pet_layers.values())


def test_float16_base_trains_float32_adapters_and_merges_within_rounding(graph_mode):
    x, y = _data()
    reference = SmallNet()
    ref_out = reference(x).asnumpy()
    pet = get_pet_model(SmallNet(), LoraConfig(**CONFIG), base_dtype=ms.float16)
    out = pet(x)
    assert out.dtype == ms.float16
    # At init the half base computes the float32 model within float16 rounding.
    np.testing.assert_allclose(out.asnumpy().astype(np.float32), ref_out, rtol=2e-2, atol=2e-2)
    base_before = {p.name: p.asnumpy().copy() for p in pet.get_parameters() if 'mindpet' not in p.name}
    adapters_before = {p.name: p.asnumpy().copy() for p in pet.trainable_params()}

    loss_net = nn.WithLossCell(pet, nn.MSELoss())
    opt = nn.Adam(pet.trainable_params(), learning_rate=0.01)
    step = nn.TrainOneStepCell(loss_net, opt)
    step.set_train()
    losses = [float(step(x, y).asnumpy()) for _ in range(5)]
    pet.set_train(False)
    assert losses[-1] < losses[0]
    # The optimiser state is float32 (it follows the float32 adapters).
    assert {p.dtype for p in opt.moment1} == {ms.float32} and {p.dtype for p in opt.moment2} == {ms.float32}
    for p in pet.get_parameters():
        if p.name in base_before:
            assert p.dtype == ms.float16
            np.testing.assert_array_equal(p.asnumpy(), base_before[p.name])
        elif p.name in adapters_before:
            assert p.dtype == ms.float32
            if p.name.endswith('lora_b'):
                assert np.abs(p.asnumpy() - adapters_before[p.name]).max() > 1e-4

    unmerged = pet(x).asnumpy().astype(np.float32)
    expected = {}
    for key, layer in pet.pet_layers.items():
        increment = lora_increment(layer.mindpet_delta_lora_a.asnumpy(), layer.mindpet_delta_lora_b.asnumpy(),
                                   layer.scaling)
        expected[key] = (base_before[f'{key}.weight'].astype(np.float32) + increment).astype(np.float16)
    pet.merge()
    for key, layer in pet.pet_layers.items():
        # The merged weight is W + s B A computed in float32 and rounded once to float16.
        assert layer.weight.dtype == ms.float16
        np.testing.assert_array_equal(layer.weight.asnumpy(), expected[key])
    merged = pet(x).asnumpy().astype(np.float32)
    np.testing.assert_allclose(merged, unmerged, rtol=1e-2, atol=1e-2)
    pet.unmerge()
    for key, layer in pet.pet_layers.items():
        # Unmerging subtracts the increment and rounds again: two half-ulp roundings, at the larger of the base
        # and the merged magnitude, so within one float16 ulp there.
        base = base_before[f'{key}.weight']
        ulp = np.spacing(np.maximum(np.abs(base), np.abs(expected[key]))).astype(np.float32)
        diff = np.abs(layer.weight.asnumpy().astype(np.float32) - base.astype(np.float32))
        assert (diff <= ulp).all()


def test_bfloat16_base_merges_within_its_rounding():
    # bf16 matmuls have no CPU kernel: the weights, their dtypes and merge arithmetic are checked, not a forward.
    pet = get_pet_model(SmallNet(), LoraConfig(**CONFIG), base_dtype='bfloat16')
    _randomise_b(pet)
    layer = pet.pet_layers['fc1']
    before = layer.weight.asnumpy().astype(np.float32)
    increment = layer.delta_weight()
    pet.merge()
    assert layer.weight.dtype == ms.bfloat16
    merged = layer.weight.asnumpy().astype(np.float32)
    exact = before + increment
    # bfloat16 keeps 8 significant bits: a relative rounding error of at most 2^-8.
    assert np.abs(merged - exact).max() > 0
    assert (np.abs(merged - exact) <= np.abs(exact) * 2 ** -8 + 1e-30).all()


def test_bad_base_dtype_is_refused_before_anything_changes():
    net = SmallNet()
    for bad in ('int8', ms.int32, 16):
        with pytest.raises(ValueError, match=r"'base_dtype' must be None or one of \['float32', 'float16', "
                                             r"'bfloat16'\].*but got"):
            get_pet_model(net, LoraConfig(**CONFIG), base_dtype=bad)
    assert {p.dtype for p in net.get_parameters()} == {ms.float32}
    assert not [p.name for p in net.get_parameters() if 'mindpet' in p.name]
    assert all(p.requires_grad for p in net.get_parameters())


class HeadNet(SmallNet):
    """SmallNet with fc2 widened and a classifier head: the head is what modules_to_save trains in full."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.fc2 = nn.Dense(16, 16)
        self.head = nn.Dense(16, 4)

    def construct(self, x):
        return self.head(ops.relu(self.fc2(self.ln(self.fc1(x)))))


HEAD_CONFIG = dict(target_modules=['fc1', 'fc2'], lora_rank=4, lora_alpha=8, modules_to_save=['head'])
HALF_NAMES = ('fc1.weight', 'fc1.bias', 'ln.gamma', 'ln.beta', 'fc2.weight', 'fc2.bias')


def _head_pet(base_dtype=ms.float16, seed=0, **extra):
    return get_pet_model(HeadNet(seed), LoraConfig(**HEAD_CONFIG, **extra), base_dtype=base_dtype)


def _train(pet, steps, x, y):
    """``steps`` GRAPH_MODE Adam steps on the trainable parameters; returns the step Cell and the optimiser."""
    opt = nn.Adam(pet.trainable_params(), learning_rate=0.01)
    step = nn.TrainOneStepCell(nn.WithLossCell(pet, nn.MSELoss()), opt)
    step.set_train()
    for _ in range(steps):
        step(x, y)
    return step, opt


@pytest.mark.parametrize('base_dtype', [ms.float16, ms.bfloat16])
def test_modules_to_save_stay_float32_on_a_half_base(base_dtype):
    # bfloat16: storage and dtypes only (bf16 MatMul has no CPU kernel).
    pet = _head_pet(base_dtype)
    dtypes = {p.name: p.dtype for p in pet.get_parameters()}
    expected = {name: base_dtype for name in HALF_NAMES}
    expected.update({name: ms.float32 for name in dtypes if 'mindpet' in name})
    expected.update({'head.weight': ms.float32, 'head.bias': ms.float32})
    assert dtypes == expected
    assert sorted(p.name for p in pet.trainable_params()) == sorted(
        [n for n in dtypes if 'delta' in n] + ['head.weight', 'head.bias'])
    # The head's stored base values (restored by disable_adapter) are float32 too.
    assert {v.dtype for v in pet._state.module_base.values()} == {np.dtype(np.float32)}


def test_float16_base_with_modules_to_save_trains_only_the_trainable_in_graph_mode(graph_mode):
    x, y = _data()
    y = y * 3
    reference = HeadNet()
    ref_out = reference(x).asnumpy()
    pet = _head_pet()
    out = pet(x)
    # The head runs in float32: its output is float32; the whole is the float32 model within float16 rounding.
    assert out.dtype == ms.float32
    np.testing.assert_allclose(out.asnumpy(), ref_out, rtol=2e-2, atol=2e-2)
    step, opt = _train(pet, 1, x, y)        # compiles the training graph
    assert {p.dtype for p in opt.moment1} == {ms.float32} and {p.dtype for p in opt.moment2} == {ms.float32}
    assert sorted(p.name.split('.', 1)[1] for p in opt.moment1) == sorted(p.name for p in pet.trainable_params())
    before = {p.name: p.asnumpy().copy() for p in pet.get_parameters()}
    losses = [float(step(x, y).asnumpy()) for _ in range(3)]
    assert losses[-1] < losses[0]
    trainable = {p.name for p in pet.trainable_params()}
    for p in pet.get_parameters():
        now = p.asnumpy()
        if p.name in trainable:
            assert p.dtype == ms.float32
            assert np.abs(now - before[p.name]).max() > 1e-5, p.name
        else:
            np.testing.assert_array_equal(now, before[p.name])
            assert p.dtype == (ms.float32 if 'mindpet' in p.name else ms.float16)


def test_merge_and_unload_with_a_float32_head_writes_the_base_dtype(graph_mode):
    x, y = _data()
    pet = _head_pet()
    _train(pet, 4, x, y * 3)
    pet.set_train(False)
    unmerged = pet(x).asnumpy()
    head = {p.name: p.asnumpy().copy() for p in pet.get_parameters() if p.name.startswith('head.')}
    expected = {}
    for key, layer in pet.pet_layers.items():
        increment = lora_increment(layer.mindpet_delta_lora_a.asnumpy(), layer.mindpet_delta_lora_b.asnumpy(),
                                   layer.scaling)
        assert np.abs(increment).max() > 1e-4
        expected[key] = (layer.weight.asnumpy().astype(np.float32) + increment).astype(np.float16)
    pet.merge()
    merged = pet(x).asnumpy()
    np.testing.assert_allclose(merged, unmerged, rtol=1e-2, atol=1e-2)
    net = pet.merge_and_unload()
    params = {p.name: p for p in net.get_parameters()}
    assert sorted(params) == sorted(list(HALF_NAMES) + ['head.weight', 'head.bias'])
    for key, weight in expected.items():
        # W + s B A computed in float32, rounded once to float16.
        assert params[f'{key}.weight'].dtype == ms.float16
        np.testing.assert_array_equal(params[f'{key}.weight'].asnumpy(), weight)
    for name, value in head.items():
        assert params[name].dtype == ms.float32
        np.testing.assert_array_equal(params[name].asnumpy(), value)
    plain = net(x)
    assert plain.dtype == ms.float32
    np.testing.assert_array_equal(plain.asnumpy(), merged)


def test_save_load_and_switch_keep_the_saved_head_float32(graph_mode, tmp_path):
    x, y = _data()
    pet = _head_pet()
    _train(pet, 3, x, y * 3)
    pet.set_train(False)
    trained = pet(x).asnumpy()
    pet.save_pretrained(str(tmp_path / 'a'))
    stored = load_file(adapter_weights_path(str(tmp_path / 'a')))
    assert {name: value.dtype for name, value in stored.items() if 'head' in name} == {
        'head.weight': np.float32, 'head.bias': np.float32}
    assert {value.dtype for value in stored.values()} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(stored['head.weight'], pet.base_model.head.weight.asnumpy())

    # Loaded into a fresh half base, as a second adapter that is then switched to: the same function.
    other = _head_pet(seed=0)
    other(x)                                     # the graph ran once before the switch
    other.load_adapter(str(tmp_path / 'a'), 'a')
    other.set_adapter('a')
    assert other.base_model.head.weight.dtype == ms.float32
    np.testing.assert_array_equal(other(x).asnumpy(), trained)
    # Switching back restores the default adapter's untrained head (the base values, float32).
    other.set_adapter('default')
    np.testing.assert_array_equal(other.base_model.head.weight.asnumpy(), HeadNet().head.weight.asnumpy())
    with other.disable_adapter():
        np.testing.assert_allclose(other(x).asnumpy(), HeadNet()(x).asnumpy(), rtol=2e-2, atol=2e-2)
    assert {p.dtype for p in other.trainable_params()} == {ms.float32}


def test_a_later_adapter_with_modules_to_save_upcasts_its_cells(graph_mode):
    x, _ = _data()
    pet = get_pet_model(HeadNet(), LoraConfig(**CONFIG), base_dtype=ms.float16)
    assert pet(x).dtype == ms.float16
    assert pet.base_model.head.weight.dtype == ms.float16
    pet.add_adapter('with_head', LoraConfig(**HEAD_CONFIG))
    pet.set_adapter('with_head')
    assert pet.base_model.head.weight.dtype == ms.float32 and pet.base_model.head.bias.dtype == ms.float32
    # The head's base value is the float16 one, exactly, in float32.
    np.testing.assert_array_equal(pet.base_model.head.weight.asnumpy(),
                                  HeadNet().head.weight.asnumpy().astype(np.float16).astype(np.float32))
    assert pet(x).dtype == ms.float32
    assert {p.dtype for p in pet.trainable_params()} == {ms.float32}


def test_bitfit_biases_train_in_float32_on_a_half_base(graph_mode):
    x, y = _data()
    pet = get_pet_model(SmallNet(), BitFitConfig(), base_dtype=ms.float16)
    dtypes = {p.name: p.dtype for p in pet.get_parameters()}
    assert dtypes == {'fc1.weight': ms.float16, 'fc1.bias': ms.float32, 'ln.gamma': ms.float16,
                      'ln.beta': ms.float16, 'fc2.weight': ms.float16, 'fc2.bias': ms.float32}
    before = {p.name: p.asnumpy().copy() for p in pet.get_parameters()}
    _train(pet, 2, x, y)
    for p in pet.get_parameters():
        changed = np.abs(p.asnumpy() - before[p.name]).max() > 0
        assert changed == p.name.endswith('.bias'), p.name


def test_the_serving_page_snippet_prints_what_it_says(tmp_path):
    from tests.tuners.test_docs import check_page_sections  # pylint: disable=import-outside-toplevel
    assert check_page_sections(tmp_path, ['serving'], '# Half-precision frozen base') == 2
