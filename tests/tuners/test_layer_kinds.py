"""LoRA, DoRA and IA3 on every layer type of mindpet.delta.layer_kinds (mint.nn.Linear, GPT-2 Conv1D, nn/mint
Conv2d, nn/mint Embedding), through get_pet_model in GRAPH_MODE after a first run: outputs against NumPy references
of each method's formula on the layer's canonical (out, in) view, merge equivalence, untouched base parameter names,
unloading to the original layer object, save/load/switch, `mindpet merge` on the stored layout, refusals, training.

Two base layers have no CPU kernel in MindSpore 2.10: mindone's Conv1D (mint.addmm) and mint.nn.Conv2d (Conv2DExt).
For them the tests use subclasses whose construct computes the same function with CPU-capable ops (same
Parameters, same layout, matched by the same dispatch entry); the delta branch itself never uses those kernels.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, mint, ops, Tensor

from mindpet import LoraConfig, IA3Config, get_pet_model, PetModel
from mindpet.adapter_store import merge_into_checkpoint, read_adapter_meta
from mindpet.delta.layer_kinds import DeltaLayer
from mindpet.utils.io_utils import load_checkpoint_file


def _conv1d_class():
    module = pytest.importorskip('mindone.transformers.mindspore_utils')
    return module.Conv1D


class CpuConv1D:  # filled in lazily (mindone imports slowly)
    cls = None


def make_conv1d(nf, nx):
    if CpuConv1D.cls is None:
        base = _conv1d_class()

        class _CpuConv1D(base):
            """mindone's Conv1D computed with ops.matmul (its mint.addmm has no CPU kernel)."""

            def construct(self, x):
                return ops.matmul(x, self.weight) + self.bias

        CpuConv1D.cls = _CpuConv1D
    return CpuConv1D.cls(nf, nx)


class CpuMintConv2d(mint.nn.Conv2d):
    """mint.nn.Conv2d computed with ops.conv2d (Conv2DExt has no CPU kernel)."""

    def construct(self, x):
        if isinstance(self.padding, str):
            out = ops.conv2d(x, self.weight, None, self.stride, self.padding, 0, self.dilation)
        else:
            pad_h, pad_w = self.padding
            out = ops.conv2d(x, self.weight, None, self.stride, 'pad', (pad_h, pad_w), self.dilation)
        return out + ops.reshape(self.bias, (1, -1, 1, 1))


class Block(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def construct(self, x):
        return self.proj(x)


class Net(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.block = Block(layer)

    def construct(self, x):
        return self.block(x)


RNG = np.random.RandomState(0)
X_FEAT = RNG.randn(2, 3, 6).astype(np.float32)
X_IMG = RNG.randn(2, 3, 7, 7).astype(np.float32)
X_IDS = np.array([[1, 2, 8, 0], [3, 3, 5, 7]], np.int32)

# kind name -> (base layer factory, input, conv geometry (kernel, stride, pad) or None)
KINDS = {
    'mint_linear': (lambda: mint.nn.Linear(6, 5), X_FEAT, None),
    'conv1d': (lambda: make_conv1d(5, 6), X_FEAT, None),
    'nn_conv2d': (lambda: nn.Conv2d(3, 4, 3, stride=2, pad_mode='pad', padding=1, has_bias=True,
                                    bias_init='normal'), X_IMG, (3, 2, 1)),
    'mint_conv2d': (lambda: CpuMintConv2d(3, 4, 3, padding=1), X_IMG, (3, 1, 1)),
    'nn_embedding': (lambda: nn.Embedding(9, 5), X_IDS, None),
    'mint_embedding': (lambda: mint.nn.Embedding(9, 5), X_IDS, None),
}
WEIGHT_ATTR = {'nn_embedding': 'embedding_table'}


def canonical(kind, weight):
    if kind in ('conv1d', 'nn_embedding', 'mint_embedding'):
        return weight.T
    return weight.reshape(weight.shape[0], -1)


def im2col(x, kernel, stride, pad):
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_h, out_w = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
    cols = np.empty((n, c, kernel, kernel, out_h, out_w), np.float64)
    for i in range(kernel):
        for j in range(kernel):
            cols[:, :, i, j] = padded[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
    return cols.reshape(n, c * kernel * kernel, out_h * out_w), out_h, out_w


def reference(kind, matrix, bias, x):
    """NumPy: the layer computing ``h = matrix x + bias`` on the kind's inputs (matrix in the (out, in) view)."""
    matrix = matrix.astype(np.float64)
    geometry = KINDS[kind][2]
    if geometry:
        cols, out_h, out_w = im2col(x.astype(np.float64), *geometry)
        out = np.einsum('oc,ncl->nol', matrix, cols).reshape(x.shape[0], -1, out_h, out_w)
        return out + (0 if bias is None else bias[None, :, None, None])
    if kind.endswith('embedding'):
        return matrix.T[x]
    return x.astype(np.float64) @ matrix.T + (0 if bias is None else bias)


def per_out(kind, vector):
    return vector[None, :, None, None] if KINDS[kind][2] else vector


def run(net, x):
    return net(Tensor(x)).asnumpy()


def base_weight(layer, kind):
    return getattr(layer, WEIGHT_ATTR.get(kind, 'weight'))


CASES = [(kind, method) for kind in KINDS for method in ('lora', 'dora', 'ia3')
         if not (method == 'dora' and kind.endswith('embedding'))]
CASES += [('mint_linear', 'ia3_ff'), ('conv1d', 'ia3_ff')]


def config_for(method, rank=2, alpha=4):
    if method.startswith('ia3'):
        return IA3Config(target_modules=['proj'], feedforward_modules=['proj'] if method == 'ia3_ff' else None)
    return LoraConfig(target_modules=['proj'], lora_rank=rank, lora_alpha=alpha, use_dora=method == 'dora')


def randomize(layer, method, rng):
    """Give the live adapter of ``layer`` non-trivial values; returns them (NumPy)."""
    values = {}
    for name, param in layer.parameters_and_names():
        if not name.startswith('mindpet_delta_'):
            continue
        if name.endswith(('magnitude', 'vector')):
            value = rng.uniform(0.5, 1.5, param.shape).astype(np.float32)
        else:
            value = (0.5 * rng.randn(*param.shape)).astype(np.float32)
        param.set_data(Tensor(value))
        values[name.rsplit('_', 1)[-1]] = value
    return values


def effective(kind, method, layer, weight, bias, values):
    """NumPy: the (out, in) matrix and bias the adapted layer computes with, from the method's formula."""
    if method in ('lora', 'dora'):
        direction = weight + layer.scaling * values['b'] @ values['a']
        if method == 'lora':
            return direction, bias
        norm = np.linalg.norm(direction.astype(np.float64), axis=1)
        return values['magnitude'][:, None] / norm[:, None] * direction, bias
    vector = values['vector']
    if method == 'ia3_ff':
        return weight * vector[None, :], bias
    return vector[:, None] * weight, None if bias is None else vector * bias


@pytest.mark.parametrize('kind,method', CASES)
def test_method_on_layer_kind(graph_mode, kind, method):
    factory, x, _ = KINDS[kind]
    base = factory()
    net = Net(base)
    names = [p.name for p in net.get_parameters()]
    params = {p.name: p for p in net.get_parameters()}
    base_out = run(net, x)

    pet = get_pet_model(net, config_for(method))
    layer = pet.pet_layers['block.proj']
    assert isinstance(layer, DeltaLayer) and layer.base_layer is base
    # Base parameter names and objects are untouched: the same checkpoint loads before and after.
    assert [p.name for p in net.get_parameters() if 'mindpet_' not in p.name] == names
    assert all(params[name] is p for name, p in ((p.name, p) for p in net.get_parameters()) if name in params)
    np.testing.assert_allclose(run(pet, x), base_out, rtol=1e-6, atol=1e-6)      # first run: graph compiled

    weight = canonical(kind, base_weight(base, kind).asnumpy())
    bias = base.bias.asnumpy() if getattr(base, 'bias', None) is not None else None
    values = randomize(layer, method, np.random.RandomState(1))
    matrix, eff_bias = effective(kind, method, layer, weight, bias, values)
    expected = reference(kind, matrix, eff_bias, x)
    adapted = run(pet, x)
    np.testing.assert_allclose(adapted, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(adapted - base_out).max() > 0.05 * np.abs(base_out).max()

    pet.merge()                                       # same compiled graph: only Parameter data changed
    np.testing.assert_allclose(run(pet, x), adapted, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(canonical(kind, base_weight(base, kind).asnumpy()), matrix, rtol=1e-5, atol=1e-5)
    pet.unmerge()
    np.testing.assert_allclose(canonical(kind, base_weight(base, kind).asnumpy()), weight, rtol=1e-5, atol=1e-6)
    with pet.disable_adapter():
        np.testing.assert_allclose(run(pet, x), base_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run(pet, x), adapted, rtol=1e-5, atol=1e-5)

    plain = pet.merge_and_unload()
    assert plain.block.proj is base and type(plain.block.proj) is type(base)    # the original layer object
    assert [p.name for p in plain.get_parameters()] == names
    assert all(params[p.name] is p for p in plain.get_parameters())
    np.testing.assert_allclose(run(plain, x), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind,config', [
    ('nn_conv2d', LoraConfig(target_modules=['proj'], lora_rank=2, use_dora=True)),
    ('nn_embedding', LoraConfig(target_modules=['proj'], use_dora=True)),
    ('nn_conv2d', IA3Config(target_modules=['proj'], feedforward_modules=['proj'])),
])
def test_refused_configurations_name_the_layer_and_leave_the_model(kind, config):
    if config.method == 'lora' and kind == 'nn_conv2d':
        base = nn.Conv2d(4, 4, 3, group=2)
    else:
        base = KINDS[kind][0]()
    net = Net(base)
    with pytest.raises(ValueError, match=r"layer 'block\.proj' cannot be adapted: .*"
                                         r"(groups=2|DoRA cannot adapt|ia3_feedforward)"):
        get_pet_model(net, config)
    assert net.block.proj is base
    assert not [p.name for p in net.get_parameters() if 'mindpet_' in p.name]


@pytest.mark.parametrize('kind,use_dora', [('conv1d', False), ('nn_conv2d', True), ('mint_embedding', False)])
def test_save_load_switch_and_checkpoint_merge(graph_mode, tmp_path, kind, use_dora):
    factory, x, _ = KINDS[kind]
    ms.set_seed(3)
    net = Net(factory())
    base_out = run(net, x)
    base_ckpt = str(tmp_path / 'base.ckpt')
    ms.save_checkpoint(net, base_ckpt)
    config = LoraConfig(target_modules=['proj'], lora_rank=2, lora_alpha=4, use_dora=use_dora)
    pet = get_pet_model(net, config, adapter_name='a')
    pet.add_adapter('b', config)
    rng = np.random.RandomState(2)
    randomize(pet.pet_layers['block.proj'], 'lora', rng)
    out_a = run(pet, x)
    pet.set_adapter('b')
    randomize(pet.pet_layers['block.proj'], 'lora', rng)
    out_b = run(pet, x)
    assert np.abs(out_a - out_b).max() > 1e-2
    pet.set_adapter('a')                       # switching in the compiled graph
    np.testing.assert_allclose(run(pet, x), out_a, rtol=1e-6, atol=1e-6)
    pet.set_adapter('b')
    np.testing.assert_allclose(run(pet, x), out_b, rtol=1e-6, atol=1e-6)

    pet.save_pretrained(str(tmp_path / 'a'), 'a')
    _, meta = read_adapter_meta(str(tmp_path / 'a'))
    assert meta['layer_types'] == {'block.proj': pet.pet_layers['block.proj'].kind.name}

    ms.set_seed(3)
    fresh = Net(factory())
    np.testing.assert_allclose(run(fresh, x), base_out, rtol=0, atol=0)
    loaded = PetModel.from_pretrained(fresh, str(tmp_path / 'a'))
    np.testing.assert_allclose(run(loaded, x), out_a, rtol=1e-6, atol=1e-6)

    # `mindpet merge` works on the stored layout ((in, out) for Conv1D, (num, dim) for embeddings, 4-D kernels).
    merged_ckpt = str(tmp_path / 'merged.ckpt')
    merge_into_checkpoint(base_ckpt, str(tmp_path / 'a'), merged_ckpt)
    loaded.merge()
    weight_name = 'block.proj.' + WEIGHT_ATTR.get(kind, 'weight')
    merged = load_checkpoint_file(merged_ckpt)[weight_name].asnumpy()
    live = {p.name: p for p in loaded.get_parameters()}[weight_name].asnumpy()
    assert merged.shape == live.shape
    np.testing.assert_allclose(merged, live, rtol=1e-5, atol=1e-6)


def test_training_changes_only_the_adapter(graph_mode):
    net = Net(KINDS['nn_conv2d'][0]())
    pet = get_pet_model(net, LoraConfig(target_modules=['proj'], lora_rank=2, lora_alpha=2))
    layer = pet.pet_layers['block.proj']
    layer.mindpet_delta_lora_b.set_data(Tensor(np.full(layer.mindpet_delta_lora_b.shape, 0.1, np.float32)))
    target = Tensor(np.zeros((2, 4, 4, 4), np.float32))
    loss_net = nn.WithLossCell(pet, nn.MSELoss())
    step = nn.TrainOneStepCell(loss_net, nn.SGD(pet.trainable_params(), learning_rate=0.05))
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    losses = [float(step(Tensor(X_IMG), target).asnumpy()) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert sorted(p.name for p in pet.trainable_params()) == ['block.proj.mindpet_delta_lora_a',
                                                             'block.proj.mindpet_delta_lora_b']
    for p in net.get_parameters():
        changed = not np.array_equal(before[p.name], p.asnumpy())
        assert changed == (p.name in ('block.proj.mindpet_delta_lora_a', 'block.proj.mindpet_delta_lora_b')), p.name


def test_base_layer_shard_strategies_are_kept():
    conv = nn.Conv2d(3, 4, 3)
    conv.conv2d.shard(((1, 1, 1, 1), (1, 1, 1, 1)))
    pet = get_pet_model(Net(conv), LoraConfig(target_modules=['proj'], lora_rank=2))
    layer = pet.pet_layers['block.proj']
    # The base path runs the base layer's own primitives, strategies included.
    assert layer.base_layer.conv2d is conv.conv2d
    assert conv.conv2d.in_strategy == ((1, 1, 1, 1), (1, 1, 1, 1))


@pytest.mark.parametrize('make_base', [
    # nn.Conv2d's (top, bottom, left, right) padding: the branch pads the input itself where ops.conv2d cannot.
    lambda: nn.Conv2d(3, 4, 3, pad_mode='pad', padding=(0, 2, 1, 0)),
    lambda: CpuMintConv2d(3, 4, 3, padding='same'),
    lambda: CpuMintConv2d(3, 4, (3, 1), stride=2, padding='valid', dilation=(1, 2)),
])
def test_conv_padding_modes_merge_exactly(graph_mode, make_base):
    base = make_base()
    pet = get_pet_model(Net(base), LoraConfig(target_modules=['proj'], lora_rank=2, lora_alpha=4))
    randomize(pet.pet_layers['block.proj'], 'lora', np.random.RandomState(4))
    adapted = run(pet, X_IMG)
    pet.merge()
    merged_net = pet.merge_and_unload()
    assert type(merged_net.block.proj) is type(base)
    np.testing.assert_allclose(run(merged_net, X_IMG), adapted, rtol=1e-5, atol=1e-5)


def test_layer_type_sections_of_the_method_pages_run_and_print_what_they_say(tmp_path):
    from tests.tuners.test_docs import check_page_sections  # pylint: disable=import-outside-toplevel
    assert check_page_sections(tmp_path, ['lora', 'dora', 'ia3'], '## Layer types') == 8


def test_adapter_without_recorded_layer_types_is_checked_on_the_models_view():
    # Formats that record no layer types (e.g. PEFT's): the model's own layer types give the (out, in) view.
    from mindpet.adapter_store import StoredAdapter, check_adapter_fits, model_fingerprint  # pylint: disable=C0415
    from mindpet.delta.layer_kinds import model_layer_types  # pylint: disable=import-outside-toplevel
    from mindpet.utils.exceptions import CheckpointError  # pylint: disable=import-outside-toplevel
    net = Net(make_conv1d(5, 6))                    # weight stored (in=6, out=5)
    assert model_layer_types(net) == {'block.proj': 'conv1d'}
    tensors = {'mindpet_delta_lora_a': np.zeros((2, 6), np.float32), 'mindpet_delta_lora_b': np.zeros((5, 2),
                                                                                                       np.float32)}
    adapter = StoredAdapter(None, LoraConfig(target_modules=['proj'], lora_rank=2), ['block.proj'],
                            {'block.proj': tensors}, {}, None)
    check_adapter_fits(adapter, model_fingerprint(net), 'peft_dir', layer_types=model_layer_types(net))
    with pytest.raises(CheckpointError, match='mindpet_delta_lora_a'):
        check_adapter_fits(adapter, model_fingerprint(net), 'peft_dir')
    pet = get_pet_model(net, LoraConfig(target_modules=['proj'], lora_rank=2))
    assert model_layer_types(pet.base_model) == {'block.proj': 'conv1d'}


def test_a_real_mindone_gpt2_is_adapted_on_its_conv1d_layers():
    # mindone's GPT-2 forward needs mint.addmm (no CPU kernel in MindSpore 2.10): checked here are the cells adapted,
    # the base parameter names, and merge_and_unload on the parameters; the numerics are test_method_on_layer_kind's.
    transformers = pytest.importorskip('transformers')
    gpt2 = pytest.importorskip('mindone.transformers').GPT2Model
    net = gpt2(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    conv1d = _conv1d_class()
    originals = {name: cell for name, cell in net.cells_and_names() if isinstance(cell, conv1d)}
    names = [p.name for p in net.get_parameters()]
    weights = {name: cell.weight.asnumpy().copy() for name, cell in originals.items()}
    pet = get_pet_model(net, LoraConfig(target_modules=['c_attn', 'c_proj', 'c_fc'], lora_rank=2, lora_alpha=4))
    layers = pet.pet_layers
    assert sorted(layers) == sorted(originals) == ['h.0.attn.c_attn', 'h.0.attn.c_proj', 'h.0.mlp.c_fc',
                                                   'h.0.mlp.c_proj']
    assert {key: (layer.kind.name, layer.mindpet_delta_lora_b.shape) for key, layer in layers.items()} == {
        'h.0.attn.c_attn': ('conv1d', (48, 2)), 'h.0.attn.c_proj': ('conv1d', (16, 2)),
        'h.0.mlp.c_fc': ('conv1d', (64, 2)), 'h.0.mlp.c_proj': ('conv1d', (16, 2))}
    assert [p.name for p in net.get_parameters() if 'mindpet' not in p.name] == names
    values = {key: randomize(layer, 'lora', np.random.RandomState(5)) for key, layer in layers.items()}
    plain = pet.merge_and_unload()
    for key, cell in plain.cells_and_names():
        if key in originals:
            assert cell is originals[key]
            # Conv1D stores (in, out): the merged weight is W0 + (s B A)^T.
            increment = 2.0 * (values[key]['b'] @ values[key]['a'])
            np.testing.assert_allclose(cell.weight.asnumpy(), weights[key] + increment.T, rtol=1e-5, atol=1e-6)
    assert [p.name for p in plain.get_parameters()] == names
