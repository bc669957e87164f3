"""Load first, then adapt: right after injection every method that promises identity at initialisation computes
exactly the loaded base model (DoRA's magnitude comes from the loaded weights), in the runner and in the library;
a base loaded into an already-adapted model is fixed by ``PetModel.reinit_from_base``."""
import os

import numpy as np
import pytest
import yaml
import mindspore as ms
from mindspore import nn, Tensor

from mindpet import (get_pet_model, LoraConfig, IA3Config, AdaLoraConfig, TensorSVDConfig, PstConfig,
                     BitFitConfig)
from mindpet.train.runner import build, load_plan

TOL = 1e-5


@pytest.fixture(autouse=True)
def _graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


class ThreeDense(nn.Cell):
    """Two same-shaped hidden layers (a t-SVD group) and a head."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Dense(8, 8)
        self.fc2 = nn.Dense(8, 8)
        self.head = nn.Dense(8, 4)
        self.act = nn.Tanh()

    def construct(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


# Every method whose adapter starts as the identity (the base function), with the float32 compute of the weights.
IDENTITY_AT_INIT = {
    'lora': LoraConfig(target_modules=['fc1', 'fc2'], lora_rank=4, lora_alpha=8),
    'dora': LoraConfig(target_modules=['fc1', 'fc2'], lora_rank=4, lora_alpha=8, use_dora=True),
    'ia3': IA3Config(target_modules=['fc1', 'fc2'], feedforward_modules=['fc2']),
    'adalora': AdaLoraConfig(target_modules=['fc1', 'fc2'], init_r=4, target_r=2, total_step=10),
    'tsvd': TensorSVDConfig(target_modules=['fc1', 'fc2'], tsvd_rank=4, target_rank=2, total_step=10),
    'pst': PstConfig(target_modules=['fc1', 'fc2'], r_w=2, r_m=2),
    'bitfit': BitFitConfig(),
}


def _base_checkpoint(tmp_path):
    """A 'pretrained' checkpoint whose weights differ from any fresh initialisation (rows of unequal norms)."""
    net = ThreeDense()
    rng = np.random.default_rng(7)
    for param in net.get_parameters():
        scale = rng.uniform(0.2, 3.0, size=(param.shape[0],) + (1,) * (len(param.shape) - 1))
        param.set_data(Tensor((rng.standard_normal(param.shape) * scale).astype(np.float32)))
    path = str(tmp_path / 'base.ckpt')
    ms.save_checkpoint(net, path)
    return path


def _loaded(path):
    net = ThreeDense()
    not_loaded, _ = ms.load_param_into_net(net, ms.load_checkpoint(path))
    assert not not_loaded
    return net


X = Tensor(np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32))


@pytest.mark.parametrize('method', sorted(IDENTITY_AT_INIT))
def test_injected_after_loading_equals_the_loaded_base(tmp_path, method):
    path = _base_checkpoint(tmp_path)
    expected = _loaded(path)(X).asnumpy()
    fresh = ThreeDense()(X).asnumpy()
    assert np.abs(fresh - expected).max() > 0.1     # the checkpoint changes the function
    pet = get_pet_model(_loaded(path), IDENTITY_AT_INIT[method])
    np.testing.assert_allclose(pet(X).asnumpy(), expected, rtol=TOL, atol=TOL)


def test_dora_injected_before_loading_needs_reinit_from_base(tmp_path):
    path = _base_checkpoint(tmp_path)
    expected = _loaded(path)(X).asnumpy()
    net = ThreeDense()
    pet = get_pet_model(net, IDENTITY_AT_INIT['dora'])
    pet(X)                                           # the graph is compiled with the fresh weights' magnitude
    ms.load_param_into_net(net, ms.load_checkpoint(path))
    stale = pet(X).asnumpy()
    assert np.abs(stale - expected).max() > 0.1, 'the magnitude of the fresh weights no longer fits'
    magnitude = net.fc1.mindpet_delta_dora_magnitude.asnumpy().copy()
    lora_a = net.fc1.mindpet_delta_dora_a.asnumpy().copy()
    assert pet.reinit_from_base() is pet
    np.testing.assert_allclose(pet(X).asnumpy(), expected, rtol=TOL, atol=TOL)
    weight = net.fc1.weight.asnumpy()
    np.testing.assert_allclose(net.fc1.mindpet_delta_dora_magnitude.asnumpy(), np.linalg.norm(weight, axis=1),
                               rtol=1e-6)
    assert not np.allclose(magnitude, net.fc1.mindpet_delta_dora_magnitude.asnumpy())
    np.testing.assert_array_equal(net.fc1.mindpet_delta_dora_a.asnumpy(), lora_a)   # A is not re-drawn
    # The stored copy follows too: switching away and back keeps the new magnitude.
    pet.add_adapter('other', IDENTITY_AT_INIT['dora'])
    pet.set_adapter('other')
    pet.set_adapter('default')
    np.testing.assert_allclose(pet(X).asnumpy(), expected, rtol=TOL, atol=TOL)


def test_reinit_from_base_of_a_trained_dora_adapter_uses_the_adapted_rows(tmp_path):
    net = _loaded(_base_checkpoint(tmp_path))
    pet = get_pet_model(net, IDENTITY_AT_INIT['dora'])
    rng = np.random.default_rng(0)
    lora_b = rng.standard_normal(net.fc1.mindpet_delta_dora_b.shape).astype(np.float32)
    net.fc1.mindpet_delta_dora_b.set_data(Tensor(lora_b))
    pet.reinit_from_base('default')
    adapted = net.fc1.weight.asnumpy() + 2.0 * lora_b @ net.fc1.mindpet_delta_dora_a.asnumpy()
    np.testing.assert_allclose(net.fc1.mindpet_delta_dora_magnitude.asnumpy(), np.linalg.norm(adapted, axis=1),
                               rtol=1e-5)


def test_reinit_from_base_refuses_merged_and_unknown_adapters(tmp_path):
    net = _loaded(_base_checkpoint(tmp_path))
    pet = get_pet_model(net, IDENTITY_AT_INIT['dora'])
    before = net.fc1.mindpet_delta_dora_magnitude.asnumpy().copy()
    with pytest.raises(ValueError, match=r"'reinit_from_base'.*'nope' does not exist"):
        pet.reinit_from_base('nope')
    pet.merge()
    with pytest.raises(RuntimeError, match=r"'reinit_from_base'.*merged.*unmerge\(\) first"):
        pet.reinit_from_base()
    pet.unmerge()
    np.testing.assert_array_equal(net.fc1.mindpet_delta_dora_magnitude.asnumpy(), before)


def test_lora_is_unchanged_by_reinit_from_base(tmp_path):
    net = _loaded(_base_checkpoint(tmp_path))
    pet = get_pet_model(net, IDENTITY_AT_INIT['lora'])
    values = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    pet.reinit_from_base()
    for param in net.get_parameters():
        np.testing.assert_array_equal(param.asnumpy(), values[param.name])


def test_the_runner_loads_the_base_before_injecting_dora(tmp_path):
    """`mindpet finetune`'s model right after injection computes the loaded base checkpoint's function."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, 'configs', 'mlp_lora_tiny.yaml'), encoding='utf-8') as handle:
        cfg = yaml.safe_load(handle)
    cfg['pet']['use_dora'] = True
    cfg['model']['code_dir'] = root     # the shipped config's '..' is relative to configs/
    cfg['training']['output_dir'] = str(tmp_path / 'out')
    config_path = tmp_path / 'run.yaml'
    # The base: a Classifier of the task's size with weights unlike a fresh one.
    plan = load_plan(_write(config_path, cfg))
    base = plan.task.build_network()
    rng = np.random.default_rng(1)
    for param in base.get_parameters():
        param.set_data(Tensor((rng.standard_normal(param.shape) * 2.0).astype(np.float32)))
    ckpt = str(tmp_path / 'base.ckpt')
    ms.save_checkpoint(base, ckpt)
    cfg['model']['base_checkpoint'] = ckpt
    plan = load_plan(_write(config_path, cfg))
    built = build(plan)
    x = Tensor(rng.standard_normal((4, plan.task.config.in_dim)).astype(np.float32))
    np.testing.assert_allclose(built.model(x).asnumpy(), base(x).asnumpy(), rtol=TOL, atol=TOL)
    assert built.loaded and ckpt in built.loaded
    assert not (tmp_path / 'out').exists()


def _write(path, cfg):
    path.write_text(yaml.safe_dump(cfg), encoding='utf-8')
    return str(path)
