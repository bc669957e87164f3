"""LoRA's Hugging Face PEFT options through the lifecycle, each checked with numbers: ``use_rslora`` (scaling
alpha / sqrt(r)), ``rank_pattern`` / ``alpha_pattern`` (per-layer rank and alpha), ``layers_to_transform``,
``init_lora_weights`` ('gaussian', 'pissa', 'olora'): outputs against NumPy, merge -> unmerge round trips in the
compiled graph, save -> load reproducing the outputs, switching, ``mindpet merge`` into the original base
checkpoint, and the errors for bad values."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn
from safetensors.numpy import load_file

from mindpet import LoraConfig, PetModel, get_pet_model
from mindpet.adapter_store import adapter_weights_path, merge_into_checkpoint
from mindpet.tuners.lora import INIT_A_NAME, INIT_B_NAME

from tests.gpt_like import GPTLike, LMLoss, token_batch

QV = ['blocks.0.attn.q_proj', 'blocks.0.attn.v_proj', 'blocks.1.attn.q_proj', 'blocks.1.attn.v_proj']
A, B = 'mindpet_delta_lora_a', 'mindpet_delta_lora_b'


def _config(**changes):
    fields = dict(target_modules=['q_proj', 'v_proj'], lora_rank=4, lora_alpha=8)
    fields.update(changes)
    return LoraConfig(**fields)


def _train(pet, steps=6, lr=0.02):
    ids, labels = token_batch('shift')
    step = nn.TrainOneStepCell(LMLoss(pet), nn.Adam(pet.trainable_params(), learning_rate=lr))
    step.set_train()
    losses = [float(step(ids, labels).asnumpy()) for _ in range(steps)]
    pet.set_train(False)
    return losses


def _np_forward_weights(pet, scalings, w0):
    """Each adapted layer's effective weight W0 + s B A from its live tensors (float64)."""
    out = {}
    for key, layer in pet.pet_layers.items():
        a = layer.mindpet_delta_lora_a.asnumpy().astype(np.float64)
        b = layer.mindpet_delta_lora_b.asnumpy().astype(np.float64)
        out[key] = w0[key] + scalings[key] * b @ a
    return out


def _check_lifecycle(pet, tmp_path, ids, base_out, base_path, want_scaling):
    """Train, then: merged weights = W0 + s B A with ``want_scaling[key]``; merge -> unmerge in the compiled graph;
    save -> from_pretrained reproduces the outputs; ``mindpet merge`` gives the same weights; disabling gives the base
    model; a second (default) adapter switches back and forth exactly."""
    losses = _train(pet)
    assert losses[-1] < losses[0], losses
    out = pet(ids).asnumpy()
    assert np.abs(out - base_out).max() > 1e-4
    w0 = {key: layer.weight.asnumpy().astype(np.float64) for key, layer in pet.pet_layers.items()}
    for key, layer in pet.pet_layers.items():
        assert layer.scaling == pytest.approx(want_scaling[key])
        assert float(layer.mindpet_state_lora_scaling.asnumpy()) == pytest.approx(want_scaling[key])
    expected = _np_forward_weights(pet, want_scaling, w0)
    pet.merge()
    for key, layer in pet.pet_layers.items():
        np.testing.assert_allclose(layer.weight.asnumpy(), expected[key], atol=1e-5, err_msg=key)
    np.testing.assert_allclose(pet(ids).asnumpy(), out, atol=1e-4)
    pet.unmerge()
    for key, layer in pet.pet_layers.items():
        np.testing.assert_allclose(layer.weight.asnumpy(), w0[key], atol=1e-6, err_msg=key)
    np.testing.assert_allclose(pet(ids).asnumpy(), out, atol=1e-5)
    directory = str(tmp_path / 'adapter')
    pet.save_pretrained(directory)
    loaded = PetModel.from_pretrained(GPTLike(), directory, adapter_name='trained')
    np.testing.assert_array_equal(loaded(ids).asnumpy(), out)
    # Branch off: the base model (up to float32 rounding: the compiled graphs of the adapted and the plain model
    # need not sum in the same order).
    with loaded.disable_adapter():
        np.testing.assert_allclose(loaded(ids).asnumpy(), base_out, atol=1e-5)
    loaded.add_adapter('plain', LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=8, lora_alpha=8))
    loaded.set_adapter('plain')
    np.testing.assert_allclose(loaded(ids).asnumpy(), base_out, atol=1e-5)
    loaded.set_adapter('trained')      # now in a rank-8 allocation: zero-padded, same up to summation order
    np.testing.assert_allclose(loaded(ids).asnumpy(), out, atol=1e-5)
    merge_into_checkpoint(base_path, directory, str(tmp_path / 'merged.ckpt'))
    merged = ms.load_checkpoint(str(tmp_path / 'merged.ckpt'))
    for key in pet.pet_layers:
        np.testing.assert_allclose(merged[f'{key}.weight'].asnumpy(), expected[key], atol=1e-5, err_msg=key)
    plain = GPTLike()
    ms.load_param_into_net(plain, merged)
    np.testing.assert_allclose(plain(ids).asnumpy(), out, atol=1e-4)
    return directory, out


@pytest.fixture
def base(tmp_path):
    ids, _ = token_batch('shift', seed=3)
    net = GPTLike()
    path = str(tmp_path / 'base.ckpt')
    ms.save_checkpoint(net, path)
    return ids, net(ids).asnumpy(), path


# ----- use_rslora ------------------------------------------------------------------------------------------------
def test_rslora_scales_by_alpha_over_sqrt_rank(graph_mode, tmp_path, base):
    ids, base_out, path = base
    assert _config(use_rslora=True).scaling == 8 / 2 and _config().scaling == 8 / 4
    pet = get_pet_model(GPTLike(), _config(use_rslora=True))
    np.testing.assert_array_equal(pet(ids).asnumpy(), base_out)
    _check_lifecycle(pet, tmp_path, ids, base_out, path, dict.fromkeys(QV, 4.0))


# ----- rank_pattern / alpha_pattern -----------------------------------------------------------------------------
def test_rank_and_alpha_patterns_give_each_layer_its_own(graph_mode, tmp_path, base):
    ids, base_out, path = base
    config = _config(rank_pattern={'v_proj': 2}, alpha_pattern={r'blocks\.1\..*': 3})
    assert [config.for_layer(key).lora_rank for key in QV] == [4, 2, 4, 2]
    pet = get_pet_model(GPTLike(), config)
    assert [pet.pet_layers[key].mindpet_delta_lora_a.shape[0] for key in QV] == [4, 2, 4, 2]
    directory, _ = _check_lifecycle(pet, tmp_path, ids, base_out, path,
                                    {QV[0]: 8 / 4, QV[1]: 8 / 2, QV[2]: 3 / 4, QV[3]: 3 / 2})
    shapes = {name: value.shape for name, value in load_file(adapter_weights_path(directory)).items()}
    assert shapes[f'{QV[1]}.{A}'] == (2, 32) and shapes[f'{QV[0]}.{A}'] == (4, 32) and shapes[f'{QV[3]}.{B}'] == (32, 2)


def test_rslora_with_patterns_and_combining(graph_mode):
    config = _config(use_rslora=True, rank_pattern={'v_proj': 16}, alpha_pattern={'q_proj': 2})
    assert config.for_layer(QV[1]).scaling == pytest.approx(8 / 4) and config.for_layer(QV[0]).scaling == 1.0
    pet = get_pet_model(GPTLike(), config, adapter_name='a')
    pet.add_adapter('b', _config())
    ids, _ = token_batch('shift', seed=3)
    rng = np.random.RandomState(0)
    for name in ('a', 'b'):
        pet.set_adapter(name)
        for layer in pet.pet_layers.values():
            layer.mindpet_delta_lora_b.set_data(ms.Tensor(rng.randn(*layer.mindpet_delta_lora_b.shape)
                                                          .astype(np.float32) * 0.1))
    increments = {}
    for name in ('a', 'b'):
        pet.set_adapter(name)
        increments[name] = {key: layer.scaling * layer.mindpet_delta_lora_b.asnumpy().astype(np.float64)
                            @ layer.mindpet_delta_lora_a.asnumpy() for key, layer in pet.pet_layers.items()}
    pet.add_weighted_adapter(['a', 'b'], [0.5, 2.0], 'cat', combination_type='cat')
    combined = pet.get_adapter_config('cat')
    # cat: per layer the sum of the ranks (v: 16 + 4, q: 4 + 4), scaling 1 everywhere (alpha = rank).
    assert combined.lora_rank == 20 and combined.lora_alpha == 20 and not combined.use_rslora
    assert combined.rank_pattern == combined.alpha_pattern == {r'blocks\.0\.attn\.q_proj': 8,
                                                               r'blocks\.1\.attn\.q_proj': 8}
    pet.set_adapter('cat')
    for key, layer in pet.pet_layers.items():
        got = layer.scaling * layer.mindpet_delta_lora_b.asnumpy().astype(np.float64) @ \
            layer.mindpet_delta_lora_a.asnumpy()
        np.testing.assert_allclose(got, 0.5 * increments['a'][key] + 2.0 * increments['b'][key], atol=1e-5)


# ----- layers_to_transform -----------------------------------------------------------------------------------------
def test_layers_to_transform_adapts_only_the_listed_blocks(graph_mode, tmp_path, base):
    ids, base_out, path = base
    pet = get_pet_model(GPTLike(), _config(layers_to_transform=1, layers_pattern='blocks'))
    assert sorted(pet.pet_layers) == QV[2:]
    assert sorted(get_pet_model(GPTLike(), _config(layers_to_transform=[0])).pet_layers) == QV[:2]
    _check_lifecycle(pet, tmp_path, ids, base_out, path, dict.fromkeys(QV[2:], 2.0))
    net = GPTLike()
    names = [name for name, _ in net.cells_and_names()]
    with pytest.raises(ValueError, match=r"layers_to_transform \[5\].*keeps none of the 4 matched layers"):
        get_pet_model(net, _config(layers_to_transform=[5]))
    with pytest.raises(ValueError, match="keeps none"):
        get_pet_model(net, _config(layers_to_transform=[0], layers_pattern='layers'))
    assert [name for name, _ in net.cells_and_names()] == names


# ----- init_lora_weights ---------------------------------------------------------------------------------------------
def test_gaussian_init_draws_a_from_n_0_1_over_r(graph_mode):
    ms.set_seed(1)
    pet = get_pet_model(GPTLike(), _config(target_modules=['fc_in'], lora_rank=4, init_lora_weights='gaussian'))
    ids, _ = token_batch('shift', seed=3)
    np.testing.assert_array_equal(pet(ids).asnumpy(), GPTLike()(ids).asnumpy())
    a = np.concatenate([layer.mindpet_delta_lora_a.asnumpy().ravel() for layer in pet.pet_layers.values()])
    assert a.size == 2 * 4 * 32 and abs(a.mean()) < 0.03 and 0.22 < a.std() < 0.28    # std 1/r = 0.25
    # Kaiming-uniform (the default) stays inside 1/sqrt(in) = 0.177; the Gaussian does not.
    assert np.abs(a).max() > 0.5
    for layer in pet.pet_layers.values():
        np.testing.assert_array_equal(layer.mindpet_delta_lora_b.asnumpy(), 0)
    default = get_pet_model(GPTLike(), _config(target_modules=['fc_in']))
    assert max(np.abs(layer.mindpet_delta_lora_a.asnumpy()).max() for layer in default.pet_layers.values()) < 0.18


def test_gaussian_adapter_merges_saves_and_switches(graph_mode, tmp_path, base):
    ids, base_out, path = base
    pet = get_pet_model(GPTLike(), _config(init_lora_weights='gaussian'))
    np.testing.assert_array_equal(pet(ids).asnumpy(), base_out)       # B = 0: the base model at init
    directory, _ = _check_lifecycle(pet, tmp_path, ids, base_out, path, dict.fromkeys(QV, 2.0))
    assert PetModel.from_pretrained(GPTLike(), directory).get_adapter_config().init_lora_weights == 'gaussian'


def _np_pissa(w, rank, scaling):
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return u[:, :rank] * s[:rank] @ vt[:rank]        # = s * B0 A0: the best rank-r part of W


def _np_olora(w, rank, scaling):
    q, r = np.linalg.qr(w.astype(np.float64))
    return scaling * q[:, :rank] @ r[:rank]


@pytest.mark.parametrize('kind,reference', [('pissa', _np_pissa), ('olora', _np_olora)])
def test_pissa_and_olora_start_from_the_base_weight_and_restore_it(graph_mode, tmp_path, base, kind, reference):
    ids, base_out, path = base
    w0 = {key: layer.weight.asnumpy().copy() for key, layer in
          get_pet_model(GPTLike(), _config()).pet_layers.items()}
    pet = get_pet_model(GPTLike(), _config(init_lora_weights=kind))
    for key, layer in pet.pet_layers.items():
        start = reference(w0[key], 4, 2.0)
        a, b = layer.mindpet_delta_lora_a.asnumpy(), layer.mindpet_delta_lora_b.asnumpy()
        np.testing.assert_allclose(2.0 * b.astype(np.float64) @ a, start, atol=1e-5)
        # While active, the base weight holds the residual W0 - s B0 A0.
        np.testing.assert_allclose(layer.weight.asnumpy(), w0[key] - start, atol=1e-5)
        if kind == 'pissa':    # A's rows are orthogonal (sqrt(S/s) V^T), B's columns too
            gram = a @ a.T
            np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-5)
    np.testing.assert_allclose(pet(ids).asnumpy(), base_out, atol=1e-5)
    with pet.disable_adapter():                    # the base weight itself comes back, bit for bit
        for key, layer in pet.pet_layers.items():
            np.testing.assert_array_equal(layer.weight.asnumpy(), w0[key])
        np.testing.assert_allclose(pet(ids).asnumpy(), base_out, atol=1e-5)

    directory, out = _check_lifecycle_residual(pet, tmp_path, ids, base_out, path, w0)
    tensors = load_file(adapter_weights_path(directory))
    for key in QV:
        np.testing.assert_allclose(2.0 * tensors[f'{key}.{INIT_B_NAME}'].astype(np.float64)
                                   @ tensors[f'{key}.{INIT_A_NAME}'], reference(w0[key], 4, 2.0), atol=1e-5)


def _check_lifecycle_residual(pet, tmp_path, ids, base_out, base_path, w0):
    losses = _train(pet)
    assert losses[-1] < losses[0], losses
    out = pet(ids).asnumpy()
    assert np.abs(out - base_out).max() > 1e-4
    residual = {key: layer.weight.asnumpy().copy() for key, layer in pet.pet_layers.items()}
    for key in pet.pet_layers:
        np.testing.assert_array_equal(pet.pet_layers[key].weight.asnumpy(), residual[key])   # base stays frozen
    # W0 + s (B A - B0 A0): what the model computes now, relative to the original base weight.
    want = {}
    for key, layer in pet.pet_layers.items():
        a, b = (p.asnumpy().astype(np.float64) for p in (layer.mindpet_delta_lora_a, layer.mindpet_delta_lora_b))
        want[key] = residual[key] + 2.0 * b @ a
    pet.merge()
    for key, layer in pet.pet_layers.items():
        np.testing.assert_allclose(layer.weight.asnumpy(), want[key], atol=1e-5)
    np.testing.assert_allclose(pet(ids).asnumpy(), out, atol=1e-4)
    pet.unmerge()
    for key, layer in pet.pet_layers.items():
        np.testing.assert_allclose(layer.weight.asnumpy(), residual[key], atol=1e-6)
    directory = str(tmp_path / 'adapter')
    pet.save_pretrained(directory)
    # Onto the ORIGINAL base model: the residual is rebuilt from the stored initial factors.
    loaded = PetModel.from_pretrained(GPTLike(), directory, adapter_name='trained')
    np.testing.assert_allclose(loaded(ids).asnumpy(), out, atol=1e-5)
    loaded.add_adapter('plain', LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=4, lora_alpha=8))
    loaded.set_adapter('plain')
    for key, layer in loaded.pet_layers.items():
        np.testing.assert_array_equal(layer.weight.asnumpy(), w0[key])
    np.testing.assert_allclose(loaded(ids).asnumpy(), base_out, atol=1e-5)
    loaded.set_adapter('trained')
    np.testing.assert_allclose(loaded(ids).asnumpy(), out, atol=1e-5)
    merge_into_checkpoint(base_path, directory, str(tmp_path / 'merged.ckpt'))
    merged = ms.load_checkpoint(str(tmp_path / 'merged.ckpt'))
    for key in QV:
        np.testing.assert_allclose(merged[f'{key}.weight'].asnumpy(), want[key], atol=1e-5)
    plain = GPTLike()
    ms.load_param_into_net(plain, merged)
    np.testing.assert_allclose(plain(ids).asnumpy(), out, atol=1e-4)
    unloaded = loaded.merge_and_unload()
    np.testing.assert_allclose(unloaded(ids).asnumpy(), out, atol=1e-4)
    return directory, out


def test_pissa_reinit_after_loading_the_base_and_no_combining(graph_mode, tmp_path):
    ids, _ = token_batch('shift', seed=3)
    pretrained = GPTLike()
    for param in pretrained.get_parameters():     # a "pretrained" base that differs from GPTLike()'s own
        param.set_data(ms.Tensor(param.asnumpy() * 1.5))
    ms.save_checkpoint(pretrained, str(tmp_path / 'pretrained.ckpt'))
    pet = get_pet_model(GPTLike(), _config(init_lora_weights='pissa'))
    ms.load_param_into_net(pet.base_model, ms.load_checkpoint(str(tmp_path / 'pretrained.ckpt')))
    pet.reinit_from_base()
    np.testing.assert_allclose(pet(ids).asnumpy(), pretrained(ids).asnumpy(), atol=1e-5)
    layer = pet.pet_layers[QV[0]]
    w0 = pretrained.blocks[0].attn.q_proj.weight.asnumpy()
    np.testing.assert_allclose(layer.weight.asnumpy(), w0 - _np_pissa(w0, 4, 2.0), atol=1e-5)
    pet.add_adapter('other', _config(init_lora_weights='olora'))
    with pytest.raises(NotImplementedError, match='PiSSA/OLoRA adapters cannot be combined'):
        pet.add_weighted_adapter(['default', 'other'], [0.5, 0.5], 'mix')


@pytest.mark.parametrize('changes,exc,fragment', [
    (dict(use_rslora=1), TypeError, "'use_rslora' must be a bool"),
    (dict(init_lora_weights='loftq'), ValueError, "'init_lora_weights' must be one of [True, 'gaussian', 'pissa', "
                                                  "'olora'], but got 'loftq'"),
    (dict(init_lora_weights=False), ValueError, "but got False"),
    (dict(init_lora_weights=1.0), TypeError, "'init_lora_weights'"),
    (dict(init_lora_weights='pissa', use_dora=True), ValueError, "must be True with use_dora=True"),
    (dict(rank_pattern=['v_proj']), TypeError, "'rank_pattern' must be None or a mapping"),
    (dict(rank_pattern={'v_proj': 0}), ValueError, "rank_pattern['v_proj']' must be a positive int, but got 0"),
    (dict(rank_pattern={'(': 2}), ValueError, "not a valid regular expression"),
    (dict(alpha_pattern={'v_proj': 0}), ValueError, "alpha_pattern['v_proj']' must be a non-zero"),
    (dict(layers_to_transform=[0, -1]), ValueError, "'layers_to_transform[1]' must be a non-negative int"),
    (dict(layers_to_transform='0'), TypeError, "'layers_to_transform' must be None, an int or a non-empty list"),
    (dict(layers_pattern='blocks'), ValueError, "'layers_pattern' ('blocks') only applies with"),
])
def test_bad_values_name_the_field(changes, exc, fragment):
    with pytest.raises(exc) as info:
        _config(**changes)
    assert fragment in str(info.value), str(info.value)
    assert info.value.field.split('[', 1)[0] in changes     # the runner reports it at pet.<field>


def test_pissa_rank_above_the_weight_rank_is_refused():
    from mindpet.delta.lora import lora_init_factors
    with pytest.raises(ValueError, match=r"rank must be at most min\(out, in\) = 3"):
        lora_init_factors('pissa', np.ones((3, 5), np.float32), 4, 1.0)


# ----- modules_to_save: a whole head, every parameter of it, in the saved adapter ----------------------------------
class _Classifier(nn.Cell):
    """An encoder layer plus a nested head (Dense + LayerNorm + Dense, all with biases/affine parameters)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Dense(16, 16)
        self.head = nn.SequentialCell([nn.Dense(16, 8), nn.LayerNorm((8,)), nn.Dense(8, 3)])

    def construct(self, x):
        return self.head(ms.ops.tanh(self.encoder(x)))


def test_modules_to_save_stores_every_parameter_of_a_nested_head(graph_mode, tmp_path):
    ms.set_seed(0)
    x = ms.Tensor(np.random.RandomState(0).randn(4, 16).astype(np.float32))
    base = _Classifier()
    ms.save_checkpoint(base, str(tmp_path / 'base.ckpt'))
    base_out = base(x).asnumpy()

    def fresh():
        net = _Classifier()
        ms.load_param_into_net(net, ms.load_checkpoint(str(tmp_path / 'base.ckpt')))
        return net

    pet = get_pet_model(fresh(), LoraConfig(target_modules=['encoder'], lora_rank=2, modules_to_save=['head']))
    head_names = sorted(p.name for p in pet.base_model.head.get_parameters())
    assert head_names == ['head.0.bias', 'head.0.weight', 'head.1.beta', 'head.1.gamma', 'head.2.bias',
                          'head.2.weight']
    assert sorted(p.name for p in pet.trainable_params()) == sorted(
        head_names + ['encoder.mindpet_delta_lora_a', 'encoder.mindpet_delta_lora_b'])
    rng = np.random.RandomState(1)
    for param in pet.base_model.head.get_parameters():        # every head parameter away from its base value
        param.set_data(ms.Tensor((param.asnumpy() + rng.randn(*param.shape) * 0.2).astype(np.float32)))
    out = pet(x).asnumpy()
    assert np.abs(out - base_out).max() > 1e-3
    pet.save_pretrained(str(tmp_path / 'adapter'))
    stored = load_file(adapter_weights_path(str(tmp_path / 'adapter')))
    assert sorted(name for name in stored if name.startswith('head.')) == head_names
    for param in pet.base_model.head.get_parameters():
        np.testing.assert_array_equal(stored[param.name], param.asnumpy())
    loaded = PetModel.from_pretrained(fresh(), str(tmp_path / 'adapter'))
    np.testing.assert_allclose(loaded(x).asnumpy(), out, atol=1e-6)
    with loaded.disable_adapter():                            # the head's base values come back
        np.testing.assert_allclose(loaded(x).asnumpy(), base_out, atol=1e-6)
    merge_into_checkpoint(str(tmp_path / 'base.ckpt'), str(tmp_path / 'adapter'), str(tmp_path / 'merged.ckpt'))
    merged = _Classifier()
    ms.load_param_into_net(merged, ms.load_checkpoint(str(tmp_path / 'merged.ckpt')))
    np.testing.assert_allclose(merged(x).asnumpy(), out, atol=1e-5)
