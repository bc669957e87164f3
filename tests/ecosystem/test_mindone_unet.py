"""mindpet on a real mindone.diffusers UNet2DConditionModel (tiny config, no download): LoRA on the attention
projections (``mint.nn.Linear``) and the ResBlocks' ``conv1`` (``mint.nn.Conv2d``).

The UNet's forward pass cannot run on the CPU in MindSpore 2.10 (no CPU kernel for ``Conv2DExt``, nor for ``Arange``
in its timestep embedding), so this tests what does not need it: which cells were adapted, base parameter names
untouched, the trainable set, adapter save/load (mindpet's format and PEFT's, the latter also read by
mindone.peft) and the merged weights against a NumPy reference. The numerics of the same layer classes run on the
CPU in tests/tuners/test_layer_kinds.py."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import mint, Tensor

pytest.importorskip('mindone')

from mindpet import LoraConfig, PetModel, get_pet_model  # noqa: E402
from mindpet.adapter_store import model_fingerprint  # noqa: E402

TARGETS = ['to_q', 'to_k', 'to_v', 'to_out.0', 'conv1']


@pytest.fixture(scope='module')
def unet_class():
    from mindone.diffusers import UNet2DConditionModel  # pylint: disable=import-outside-toplevel
    return UNet2DConditionModel


def _unet(unet_class, seed=0):
    ms.set_seed(seed)
    return unet_class(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                      down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=8,
                      attention_head_dim=2, norm_num_groups=4)


def _values(net):
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def _lora(unet):
    pet = get_pet_model(unet, LoraConfig(target_modules=TARGETS, lora_rank=2, lora_alpha=4))
    rng = np.random.RandomState(0)
    for param in pet.trainable_params():
        param.set_data(Tensor((0.5 * rng.randn(*param.shape)).astype(np.float32)))
    return pet


def test_unet_lora_on_mint_linear_and_conv2d(unet_class, tmp_path):
    unet = _unet(unet_class)
    linear = sorted(n for n, c in unet.cells_and_names() if isinstance(c, mint.nn.Linear)
                    and n.endswith(('to_q', 'to_k', 'to_v', 'to_out.0')))
    convs = sorted(n for n, c in unet.cells_and_names() if isinstance(c, mint.nn.Conv2d) and n.endswith('conv1'))
    assert len(linear) == 32 and len(convs) == 8   # 8 attention blocks x 4 projections; 8 ResBlocks
    fingerprint = model_fingerprint(unet)
    base = _values(unet)

    pet = _lora(unet)
    assert sorted(pet.pet_layers) == sorted(linear + convs)
    assert model_fingerprint(unet) == fingerprint               # the base checkpoint still loads unchanged
    trainable = sorted(p.name for p in pet.trainable_params())
    assert trainable == sorted(f'{k}.mindpet_delta_lora_{ab}' for k in linear + convs for ab in 'ab')
    live = {p.name: p.asnumpy().copy() for p in pet.trainable_params()}

    pet.save_pretrained(str(tmp_path / 'mindpet'))
    pet.save_pretrained(str(tmp_path / 'peft'), format='peft')
    for directory in ('mindpet', 'peft'):
        fresh_unet = _unet(unet_class)
        loaded = PetModel.from_pretrained(fresh_unet, str(tmp_path / directory))
        got = {p.name: p.asnumpy() for p in fresh_unet.get_parameters() if 'mindpet_delta' in p.name}
        assert sorted(got) == sorted(live)
        for name, value in live.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f'{directory}: {name}')
        assert loaded.active_adapter == 'default'

    conv = convs[0]
    lora_a, lora_b = live[f'{conv}.mindpet_delta_lora_a'], live[f'{conv}.mindpet_delta_lora_b']
    merged = pet.merge_and_unload()
    merged_cells = dict(merged.cells_and_names())
    assert type(merged_cells[linear[0]]) is mint.nn.Linear    # pylint: disable=unidiomatic-typecheck
    assert type(merged_cells[conv]) is mint.nn.Conv2d         # pylint: disable=unidiomatic-typecheck
    after = _values(merged)
    assert sorted(after) == sorted(base)
    # LoRA on a Conv2d: delta W = (alpha / r) * B @ A in the (out, in*kh*kw) view of the kernel.
    w0 = base[f'{conv}.weight']
    expected = w0 + (4 / 2) * (lora_b @ lora_a).reshape(w0.shape)
    np.testing.assert_allclose(after[f'{conv}.weight'], expected, rtol=1e-5, atol=1e-5)
    q = linear[0]
    expected = base[f'{q}.weight'] + 2.0 * live[f'{q}.mindpet_delta_lora_b'] @ live[f'{q}.mindpet_delta_lora_a']
    np.testing.assert_allclose(after[f'{q}.weight'], expected, rtol=1e-5, atol=1e-5)
    untouched = [n for n in base if not n.endswith(('to_q.weight', 'to_k.weight', 'to_v.weight', 'to_out.0.weight',
                                                    'conv1.weight'))]
    for name in untouched:
        np.testing.assert_array_equal(after[name], base[name], err_msg=name)


def test_unet_peft_directory_is_read_by_mindone_peft(unet_class, tmp_path):
    from mindone import peft  # pylint: disable=import-outside-toplevel
    pet = _lora(_unet(unet_class))
    live = {p.name: p.asnumpy().copy() for p in pet.trainable_params()}
    pet.save_pretrained(str(tmp_path), format='peft')
    loaded = peft.PeftModel.from_pretrained(_unet(unet_class), str(tmp_path))
    params = dict(loaded.parameters_and_names())
    conv = 'down_blocks.0.resnets.0.conv1'
    a = params[f'base_model.model.{conv}.lora_A.default.weight'].asnumpy()
    b = params[f'base_model.model.{conv}.lora_B.default.weight'].asnumpy()
    assert a.shape == (2, 8, 3, 3) and b.shape == (8, 2, 1, 1)   # PEFT's Conv2d LoRA kernels (8 -> 8 channels, 3x3)
    np.testing.assert_array_equal(a.reshape(2, -1), live[f'{conv}.mindpet_delta_lora_a'])
    np.testing.assert_array_equal(b.reshape(8, 2), live[f'{conv}.mindpet_delta_lora_b'])
    q = 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'
    np.testing.assert_array_equal(params[f'base_model.model.{q}.lora_A.default.weight'].asnumpy(),
                                  live[f'{q}.mindpet_delta_lora_a'])
    np.testing.assert_array_equal(params[f'base_model.model.{q}.lora_B.default.weight'].asnumpy(),
                                  live[f'{q}.mindpet_delta_lora_b'])
