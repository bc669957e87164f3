"""P-Tuning v2 through get_pet_model: a PrefixEncoder feeds the 'prefix_key_values' of the PanGu-style backbone.

Outputs are compared with the unwrapped model given the encoder's prefixes (computed in NumPy), in GRAPH_MODE, also
after the compiled graph ran and the encoder changed; training moves the encoder only; adapters save, load, switch,
disable and unload; bad configs are refused."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

from examples.pangu_alpha.model import PanguAlphaForCausalLM, CausalLMWithLoss
from mindpet import get_pet_model, PetModel
from mindpet.adapter_store import adapter_weights_path
from mindpet.tuners.ptuning2 import PTuning2Config
from mindpet.utils.io_utils import load_checkpoint_file
from tests.example_helpers import graph  # noqa: F401 (module-scoped GRAPH_MODE fixture)

CFG = dict(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, ffn_hidden_size=32, seq_length=12,
           dropout_rate=0.0, pad_token_id=0)
IDS = np.random.RandomState(0).randint(1, 64, (3, 12)).astype(np.int32)
PREFIX = 'backbone.prefix_encoder.mindpet_delta_ptuning2_'


def base_net(seed=0):
    ms.set_seed(seed)
    return PanguAlphaForCausalLM(CFG)


def config(**changes):
    values = dict(target_modules=['backbone'], num_layers=2, num_heads=2, kv_channels=8, num_virtual_tokens=3,
                  projection_dim=8)
    values.update(changes)
    return PTuning2Config(**values)


def reference(plain, encoder, ids):
    """The unwrapped model called with the encoder's prefixes (from its NumPy export), broadcast to the batch."""
    prefix = encoder.prefix_numpy()                         # (layers, 2, heads, P, kv)
    per_layer = tuple(Tensor(np.broadcast_to(p[:, None], (2, len(ids)) + p.shape[1:]).copy()) for p in prefix)
    return plain(Tensor(ids), per_layer).asnumpy()


def randomise(encoder, rng):
    for param in encoder.get_parameters():
        param.set_data(Tensor(rng.randn(*param.shape).astype(np.float32) * 0.5))


def test_injection_keeps_names_and_matches_the_reference(graph, tmp_path):
    net, plain = base_net(), base_net()
    names = [p.name for p in net.get_parameters()]
    base_out = plain(Tensor(IDS)).asnumpy()
    pet = get_pet_model(net, config())
    assert [p.name for p in pet.base_model.get_parameters() if 'mindpet_' not in p.name] == names
    trainable = sorted(p.name for p in pet.trainable_params())
    assert trainable == sorted(PREFIX + s for s in ('embedding', 'dense_in_weight', 'dense_in_bias',
                                                   'dense_out_weight', 'dense_out_bias'))
    encoder = pet.pet_layers['backbone'].prefix_encoder
    assert encoder.mindpet_delta_ptuning2_embedding.shape == (3, 2 * 2 * 2 * 8)
    out = pet(Tensor(IDS)).asnumpy()
    np.testing.assert_allclose(out, reference(plain, encoder, IDS), rtol=1e-5, atol=1e-5)
    assert np.abs(out - base_out).max() > 1e-3          # the prefix changes the outputs
    # The graph has run: new encoder values (set_data) are used by the same compiled graph.
    randomise(encoder, np.random.RandomState(1))
    out2 = pet(Tensor(IDS)).asnumpy()
    np.testing.assert_allclose(out2, reference(plain, encoder, IDS), rtol=1e-5, atol=1e-5)
    assert np.abs(out2 - out).max() > 1e-3
    # Disabled: exactly the base model; enabled again: the prefixed outputs.
    with pet.disable_adapter():
        np.testing.assert_array_equal(pet(Tensor(IDS)).asnumpy(), base_out)
    np.testing.assert_array_equal(pet(Tensor(IDS)).asnumpy(), out2)
    # Saved adapter: the five encoder tensors under their model names; loaded on a fresh base it reproduces out2.
    pet.save_pretrained(str(tmp_path / 'a'))
    saved = load_checkpoint_file(adapter_weights_path(str(tmp_path / 'a')))
    assert sorted(saved) == trainable
    loaded = PetModel.from_pretrained(base_net(), str(tmp_path / 'a'))
    np.testing.assert_array_equal(loaded(Tensor(IDS)).asnumpy(), out2)
    with pytest.raises(NotImplementedError, match='cannot be merged'):
        loaded.merge()
    plain_again = loaded.unload()
    assert [p.name for p in plain_again.get_parameters()] == names
    np.testing.assert_array_equal(plain_again(Tensor(IDS)).asnumpy(), base_out)


def test_training_moves_only_the_prefix_and_switching(graph):
    net = base_net()
    pet = get_pet_model(net, config(), adapter_name='a')
    before = {p.name: p.asnumpy().copy() for p in pet.base_model.get_parameters()}
    loss_net = CausalLMWithLoss(pet.base_model)
    step = nn.TrainOneStepCell(loss_net, nn.Adam(pet.trainable_params(), learning_rate=0.05))
    step.set_train()
    losses = [float(step(Tensor(IDS)).asnumpy()) for _ in range(8)]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.01, losses
    changed = sorted(n for n, v in before.items() if not np.array_equal(pet.base_model.parameters_dict()[n].asnumpy(),
                                                                            v))
    assert changed == sorted(p.name for p in pet.trainable_params())
    pet.set_train(False)
    trained = pet(Tensor(IDS)).asnumpy()
    # A second adapter of the same sizes: switching copies tensors into the compiled graph.
    pet.add_adapter('b', config())
    pet.set_adapter('b')
    other = pet(Tensor(IDS)).asnumpy()
    assert np.abs(other - trained).max() > 1e-4
    pet.set_adapter('a')
    np.testing.assert_array_equal(pet(Tensor(IDS)).asnumpy(), trained)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match=r"match no adaptable cell of the model\. .*The 1 candidate layers end in "
                                         r"\['backbone'\]"):
        get_pet_model(base_net(), config(target_modules=['blocks']))
    with pytest.raises(TypeError, match="'num_layers' must be a positive int, but got None"):
        PTuning2Config(target_modules=['backbone'], num_heads=2, kv_channels=8)
    with pytest.raises(ValueError, match="'target_modules' must name the Cell"):
        PTuning2Config(num_layers=2, num_heads=2, kv_channels=8)
    # A target that declares its sizes (a MindFormers-style 'config') is checked against the config.
    holder = Holder(base_net())
    with pytest.raises(ValueError, match="'ptuning2' config's 'num_layers' is 3, but 'lm' has 2") as info:
        get_pet_model(holder, config(target_modules=['lm'], num_layers=3))
    assert info.value.field == 'num_layers'
    assert not any('mindpet_' in p.name for p in holder.get_parameters())   # refused before any change
    pet = get_pet_model(base_net(), config())
    names = sorted(p.name for p in pet.get_parameters())
    with pytest.raises(ValueError, match="'backbone' was adapted with kv_channels=8; an adapter with kv_channels=4 "
                                         "cannot share it") as info:
        pet.add_adapter('b', config(kv_channels=4))
    assert info.value.field == 'kv_channels' and sorted(p.name for p in pet.get_parameters()) == names


class Holder(nn.Cell):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def construct(self, ids):
        return self.lm(ids)
