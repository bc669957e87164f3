"""DoRA's gradient against a NumPy reference, for both settings of ``dora_detach_norm`` (detached row norms, as
PEFT, the default; and the exact gradient through the norms), on DoRADense and through ``LoraConfig``."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, ParameterTuple, Tensor

from mindpet import LoraConfig, get_pet_model
from mindpet.delta.dora import DoRADense

from tests.gpt_like import GPTLike


def np_dora_grads(w0, lora_a, lora_b, magnitude, scaling, x, upstream, detach):
    """dL/dA, dL/dB, dL/dm of L = sum(upstream * (m / ||W'||_row * (x W'^T) + bias)), W' = W0 + s B A (float64).

    With ``detach`` the norms ||W'||_row are constants (no term through them); without, the chain rule also runs
    through n_i = ||W'_i||: dn_i/dW'_i = W'_i / n_i."""
    w0, lora_a, lora_b, magnitude, x, upstream = (np.asarray(v, np.float64)
                                                  for v in (w0, lora_a, lora_b, magnitude, x, upstream))
    direction = w0 + scaling * lora_b @ lora_a
    norm = np.linalg.norm(direction, axis=1)
    factor = magnitude / norm
    y = x @ direction.T                                       # (N, out)
    d_factor = (upstream * y).sum(0)                          # (out,)
    d_magnitude = d_factor / norm
    d_direction = (upstream * factor).T @ x                   # (out, in): through x W'^T only
    if not detach:
        d_norm = d_factor * (-magnitude / norm ** 2)
        d_direction = d_direction + (d_norm / norm)[:, None] * direction
    return scaling * lora_b.T @ d_direction, scaling * d_direction @ lora_a.T, d_magnitude


class _WeightedSum(nn.Cell):
    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, x, upstream):
        return ops.reduce_sum(self.net(x) * upstream)


class _Grads(nn.Cell):
    """Gradients of sum(net(x) * upstream) w.r.t. ``params``, in one compiled graph."""

    def __init__(self, net, params):
        super().__init__(auto_prefix=False)
        self.loss = _WeightedSum(net)
        self.params = ParameterTuple(params)
        self.grad = ops.GradOperation(get_by_list=True)

    def construct(self, x, upstream):
        return self.grad(self.loss, self.params)(x, upstream)


def _randomise(layer, rng):
    """Non-zero B and a magnitude away from the row norms: otherwise dL/dA = 0 and the norm term vanishes."""
    layer.mindpet_delta_dora_b.set_data(Tensor(rng.randn(*layer.mindpet_delta_dora_b.shape).astype(np.float32)))
    m = layer.mindpet_delta_dora_magnitude.asnumpy()
    layer.mindpet_delta_dora_magnitude.set_data(Tensor((m * rng.uniform(0.5, 1.5, m.shape)).astype(np.float32)))


def _check_layer_grads(layer, grads_cell, rng, detach):
    x = rng.randn(6, layer.in_channels).astype(np.float32)
    upstream = rng.randn(6, layer.out_channels).astype(np.float32)
    got = [g.asnumpy() for g in grads_cell(Tensor(x), Tensor(upstream))]
    want = np_dora_grads(layer.weight.asnumpy(), layer.mindpet_delta_dora_a.asnumpy(),
                         layer.mindpet_delta_dora_b.asnumpy(), layer.mindpet_delta_dora_magnitude.asnumpy(),
                         layer.scaling, x, upstream, detach)
    for name, g, w in zip(('A', 'B', 'm'), got, want):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5 * np.abs(w).max(), err_msg=name)
    return x, upstream, want


@pytest.mark.parametrize('detach', [True, False])
def test_layer_gradient_matches_numpy(ms_mode, detach):
    rng = np.random.RandomState(0)
    layer = DoRADense(12, 6, lora_rank=3, lora_alpha=6, compute_dtype=ms.float32, dora_detach_norm=detach)
    assert layer.dora_detach_norm is detach
    params = [layer.mindpet_delta_dora_a, layer.mindpet_delta_dora_b, layer.mindpet_delta_dora_magnitude]
    grads = _Grads(layer, params)
    _randomise(layer, rng)
    _check_layer_grads(layer, grads, rng, detach)
    _randomise(layer, rng)          # new Parameter data in the already-compiled graph
    x, upstream, want = _check_layer_grads(layer, grads, rng, detach)
    # The other setting's gradient differs clearly (for A and B; dL/dm is the same), so the check can fail.
    other = np_dora_grads(layer.weight.asnumpy(), layer.mindpet_delta_dora_a.asnumpy(),
                          layer.mindpet_delta_dora_b.asnumpy(), layer.mindpet_delta_dora_magnitude.asnumpy(),
                          layer.scaling, x, upstream, not detach)
    for index in (0, 1):
        assert np.abs(other[index] - want[index]).max() > 0.05 * np.abs(want[index]).max()
    np.testing.assert_allclose(other[2], want[2])


def test_default_is_detached_and_the_flag_is_checked():
    assert DoRADense(4, 4, lora_rank=2, lora_alpha=2).dora_detach_norm is True
    with pytest.raises(TypeError, match="'dora_detach_norm' must be a bool, but got 1"):
        DoRADense(4, 4, lora_rank=2, lora_alpha=2, dora_detach_norm=1)
    assert LoraConfig(target_modules=['q_proj'], use_dora=True).dora_detach_norm is True
    with pytest.raises(TypeError, match="'dora_detach_norm'"):
        LoraConfig(target_modules=['q_proj'], use_dora=True, dora_detach_norm='no')


def test_config_setting_reaches_the_layer_and_switching_follows_the_adapter(graph_mode, tmp_path):
    rng = np.random.RandomState(1)
    exact = LoraConfig(target_modules=['blocks.0.attn.q_proj'], lora_rank=4, lora_alpha=8, use_dora=True,
                       dora_detach_norm=False)
    pet = get_pet_model(GPTLike(), exact, adapter_name='exact')
    layer = pet.pet_layers['blocks.0.attn.q_proj']
    assert layer.dora_detach_norm is False
    _randomise(layer, rng)
    pet.save_pretrained(str(tmp_path / 'exact'))
    params = [layer.mindpet_delta_dora_a, layer.mindpet_delta_dora_b, layer.mindpet_delta_dora_magnitude]
    _check_layer_grads(layer, _Grads(layer, params), rng, detach=False)

    pet.add_adapter('detached', exact.replace(dora_detach_norm=True))
    pet.set_adapter('detached')
    assert layer.dora_detach_norm is True
    _randomise(layer, rng)
    _check_layer_grads(layer, _Grads(layer, params), rng, detach=True)
    pet.set_adapter('exact')
    assert layer.dora_detach_norm is False
    _check_layer_grads(layer, _Grads(layer, params), rng, detach=False)
    # Saved with the adapter, and read back.
    loaded = get_pet_model(GPTLike(), LoraConfig(target_modules=['k_proj'], use_dora=True))
    loaded.load_adapter(str(tmp_path / 'exact'), 'exact')
    assert loaded.get_adapter_config('exact').dora_detach_norm is False
