"""t-SVD with ``tsvd_factor_slices`` (U and V keep P < L frontal slices) through the lifecycle: the adapter file's
shapes, training with the hook in GRAPH_MODE, save -> load reproducing the outputs, switching, merging in the
compiled graph and by ``mindpet merge`` against the NumPy t-product, and the checks of the field."""
import os

import numpy as np
import pytest
import yaml
import mindspore as ms
from mindspore import nn
from safetensors.numpy import load_file

from mindpet import TensorSVDConfig, PetModel, get_pet_model
from mindpet.adapter_store import ADAPTER_CONFIG_NAME, adapter_weights_path, merge_into_checkpoint
from mindpet.delta.tsvd import tsvd_increments

from tests.gpt_like import GPTLike, LMLoss, token_batch

FIRST = ['blocks.0.attn.q_proj', 'blocks.0.attn.v_proj']
LAYERS = ['blocks.0.attn.q_proj', 'blocks.0.attn.v_proj', 'blocks.1.attn.q_proj', 'blocks.1.attn.v_proj']


def _config(**changes):
    fields = dict(target_modules=['q_proj', 'v_proj'], tsvd_rank=4, tsvd_alpha=8, target_rank=2, t_init=2,
                  t_final=4, orth_reg_weight=0.1, total_step=12, tsvd_factor_slices=1)
    fields.update(changes)
    return TensorSVDConfig(**fields)


def test_shared_singular_vectors_train_save_load_switch_and_merge(graph_mode, tmp_path):
    ids, labels = token_batch('shift')
    base = GPTLike()
    base_out = base(ids).asnumpy()
    ms.save_checkpoint(base, str(tmp_path / 'base.ckpt'))
    pet = get_pet_model(GPTLike(), _config())
    np.testing.assert_array_equal(pet(ids).asnumpy(), base_out)
    group = pet.pet_layers[LAYERS[0]].tsvd_group
    assert group.tsvd_factor_slices == 1 and group.mindpet_delta_tsvd_u.shape == (32, 4, 1)
    assert pet.pet_layers[LAYERS[2]].tsvd_group is group

    hook = pet.training_hook()
    step = hook.train_network(LMLoss(pet), nn.Adam(pet.trainable_params(), learning_rate=0.05))
    step.set_train()
    before = {p.name: p.asnumpy().copy() for p in pet.get_parameters()}
    losses = []
    for i in range(12):
        hook.before_step(i)
        outputs = step(ids, labels)
        hook.after_step(i, outputs)
        losses.append(float(hook.loss(outputs).asnumpy()))
    pet.set_train(False)
    assert losses[-1] < losses[0], losses
    changed = {p.name for p in pet.get_parameters() if not np.array_equal(p.asnumpy(), before[p.name])}
    assert all('mindpet_delta_tsvd' in name for name in changed), changed       # the base stays bit-identical
    # The allocator may give a group no tube at all (then its S stays 0 and U, V get no gradient); the kept tubes
    # trained.
    kept = [first for first in FIRST if hook.rank_pattern()[f'{first}.tsvd_group'] > 0]
    assert kept and all(f'{first}.tsvd_group.mindpet_delta_tsvd_{k}' in changed for first in kept for k in 'usv')
    out = pet(ids).asnumpy()
    assert not np.allclose(out, base_out, atol=1e-4)
    pet.save_pretrained(str(tmp_path / 'p1'))

    tensors = load_file(adapter_weights_path(str(tmp_path / 'p1')))
    assert {name: value.shape for name, value in tensors.items()} == {
        f'{first}.tsvd_group.mindpet_delta_tsvd_{key}': shape for first in FIRST
        for key, shape in (('u', (32, 4, 1)), ('s', (4, 2)), ('v', (32, 4, 1)))}
    meta = yaml.safe_load(open(os.path.join(tmp_path / 'p1', ADAPTER_CONFIG_NAME), encoding='utf-8'))
    assert meta['pet']['tsvd_factor_slices'] == 1

    loaded = PetModel.from_pretrained(GPTLike(), str(tmp_path / 'p1'), adapter_name='p1')
    np.testing.assert_array_equal(loaded(ids).asnumpy(), out)
    loaded.add_adapter('fresh', _config())
    loaded.set_adapter('fresh')
    np.testing.assert_array_equal(loaded(ids).asnumpy(), base_out)
    loaded.set_adapter('p1')
    np.testing.assert_array_equal(loaded(ids).asnumpy(), out)

    # Merged weights: W0_l + s * U_0 diag(S[:, l]) V_0^T, in the compiled graph and by `mindpet merge`.
    w0 = {key: layer.weight.asnumpy().copy() for key, layer in loaded.pet_layers.items()}
    loaded.merge()
    np.testing.assert_allclose(loaded(ids).asnumpy(), out, atol=1e-4, rtol=1e-4)
    merge_into_checkpoint(str(tmp_path / 'base.ckpt'), str(tmp_path / 'p1'), str(tmp_path / 'merged.ckpt'))
    cli = ms.load_checkpoint(str(tmp_path / 'merged.ckpt'))
    for first in FIRST:
        u, s, v = (tensors[f'{first}.tsvd_group.mindpet_delta_tsvd_{k}'].astype(np.float64) for k in 'usv')
        np.testing.assert_allclose(tsvd_increments(u, s, v, 2.0)[:, :, 1],
                                   2.0 * u[:, :, 0] @ np.diag(s[:, 1]) @ v[:, :, 0].T, atol=1e-6)
        for index in (0, 1):
            key = first.replace('blocks.0', f'blocks.{index}')
            want = w0[key] + 2.0 * u[:, :, 0] @ np.diag(s[:, index]) @ v[:, :, 0].T
            np.testing.assert_allclose(loaded.pet_layers[key].weight.asnumpy(), want, atol=1e-5)
            np.testing.assert_allclose(cli[f'{key}.weight'].asnumpy(), want, atol=1e-5)
    loaded.unmerge()
    np.testing.assert_allclose(loaded(ids).asnumpy(), out, atol=1e-5)


def test_the_field_is_checked_against_the_groups():
    assert _config().to_dict()['tsvd_factor_slices'] == 1
    assert TensorSVDConfig(target_modules=['q_proj']).tsvd_factor_slices is None
    with pytest.raises(TypeError, match="'tsvd_factor_slices' must be a positive int, but got 1.5"):
        _config(tsvd_factor_slices=1.5)
    with pytest.raises(ValueError, match="'tsvd_factor_slices' must be a positive int, but got 0"):
        _config(tsvd_factor_slices=0)
    net = GPTLike()
    names = [name for name, _ in net.cells_and_names()]
    with pytest.raises(ValueError, match=r"'tsvd_factor_slices' must not exceed the number of layers of a t-SVD "
                                         r"group \(2\), but got 3") as info:
        get_pet_model(net, _config(tsvd_factor_slices=3))
    assert info.value.field == 'tsvd_factor_slices'
    assert [name for name, _ in net.cells_and_names()] == names      # refused before anything was injected
    pet = get_pet_model(GPTLike(), _config())
    with pytest.raises(ValueError, match='must use the same tsvd_factor_slices, but got 2') as info:
        pet.add_adapter('full', _config(tsvd_factor_slices=None))
    assert info.value.field == 'tsvd_factor_slices'
