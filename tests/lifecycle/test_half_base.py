"""Half-precision frozen base (get_pet_model(..., base_dtype=...)): the dtype of every parameter, float32 adapters
and optimiser state, training in GRAPH_MODE, merge within the base dtype's rounding, bad input."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Tensor

from mindpet import LoraConfig, get_pet_model
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
    with pytest.raises(ValueError, match="'base_dtype'.*cannot be combined with 'modules_to_save'"):
        get_pet_model(net, LoraConfig(**CONFIG, modules_to_save=['ln']), base_dtype=ms.float16)
    assert {p.dtype for p in net.get_parameters()} == {ms.float32}
    assert not [p.name for p in net.get_parameters() if 'mindpet' in p.name]
    assert all(p.requires_grad for p in net.get_parameters())
