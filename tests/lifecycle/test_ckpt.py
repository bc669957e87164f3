"""TrainableParamsCheckPoint with Model.train, and loading base + delta checkpoints."""
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor
from mindspore.train import Model
from mindspore.train.callback import CheckpointConfig
import mindspore.dataset as ds

from mindpet.graph import freeze_delta, TrainableParamsCheckPoint, load_base_and_delta, save_trainable_params
from mindpet.utils.constants import META_PREFIX
from mindpet.utils.exceptions import CheckpointError

from tests.nets import LoRAMLP, regression_data, snapshot

LORA = ['fc1.mindpet_delta_lora_a', 'fc1.mindpet_delta_lora_b', 'fc2.mindpet_delta_lora_a',
        'fc2.mindpet_delta_lora_b']


def _dataset(batch=8):
    x, y = regression_data(n=32)
    return ds.NumpySlicesDataset({'x': x, 'y': y}, shuffle=False).batch(batch)


def _train(net, directory, epochs=2, config=None, **kwargs):
    model = Model(net, loss_fn=nn.MSELoss(), optimizer=nn.Adam(net.trainable_params(), learning_rate=0.05))
    callback = TrainableParamsCheckPoint(directory, prefix='lora', config=config, **kwargs)
    model.train(epochs, _dataset(), callbacks=[callback], dataset_sink_mode=False)
    return callback


def _tensors(saved):
    """The parameter names of a loaded checkpoint, without the callback's position metadata."""
    return sorted(name for name in saved if not name.startswith(META_PREFIX))


def _files(directory):
    return sorted(f for f in os.listdir(directory))


def test_checkpoint_holds_only_trainable_params_and_reloads_exactly(graph_mode, tmp_path):
    net = LoRAMLP()
    base_file = str(tmp_path / 'base.ckpt')
    ms.save_checkpoint(net, base_file)
    freeze_delta(net, 'lora', exclude=['head.*'])
    out_dir = tmp_path / 'delta'
    callback = _train(net, str(out_dir), config=CheckpointConfig(save_checkpoint_steps=4, keep_checkpoint_max=10))
    # 2 epochs x 4 steps, saved every 4 steps: 1_4 and 2_4; no temporary files left behind.
    assert _files(out_dir) == ['lora-1_4.ckpt', 'lora-2_4.ckpt']
    saved = ms.load_checkpoint(callback.latest_ckpt_file_name)
    assert _tensors(saved) == sorted(LORA + ['head.weight', 'head.bias'])  # no adam_m/adam_v/global_step/lr
    trained = snapshot(net)
    for name in _tensors(saved):
        np.testing.assert_array_equal(saved[name].asnumpy(), trained[name])

    x = Tensor(regression_data(n=5, seed=9)[0])
    expected = net(x).asnumpy()
    fresh = LoRAMLP(seed=123)  # different init everywhere
    report = load_base_and_delta(fresh, base_file, callback.latest_ckpt_file_name)
    assert sorted(report.delta_loaded) == _tensors(saved)
    np.testing.assert_array_equal(fresh(x).asnumpy(), expected)


def test_keep_checkpoint_max_and_step_interval(graph_mode, tmp_path):
    net = LoRAMLP()
    freeze_delta(net, 'lora')
    _train(net, str(tmp_path), epochs=3, config=CheckpointConfig(save_checkpoint_steps=2, keep_checkpoint_max=2))
    assert _files(tmp_path) == ['lora-3_2.ckpt', 'lora-3_4.ckpt']


def test_relative_directory_and_optimizer_state_on_request(graph_mode, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = LoRAMLP()
    freeze_delta(net, 'lora')
    callback = _train(net, 'rel/out', epochs=1, config=CheckpointConfig(save_checkpoint_steps=4),
                      save_optimizer_state=True)
    assert callback.latest_ckpt_file_name == str(tmp_path / 'rel' / 'out' / 'lora-1_4.ckpt')
    saved = ms.load_checkpoint(callback.latest_ckpt_file_name)
    assert set(LORA) < set(saved)
    assert 'moment1.fc1.mindpet_delta_lora_a' in saved and 'global_step' in saved


def test_safetensors_format_and_append_info(graph_mode, tmp_path):
    net = LoRAMLP()
    freeze_delta(net, 'lora')
    _train(net, str(tmp_path / 'st'), epochs=1, config=CheckpointConfig(save_checkpoint_steps=4, format='safetensors'))
    assert _files(tmp_path / 'st') == ['lora-1_4.safetensors']
    loaded = ms.load_checkpoint(str(tmp_path / 'st' / 'lora-1_4.safetensors'), format='safetensors')
    assert _tensors(loaded) == LORA
    _train(net, str(tmp_path / 'ai'), epochs=1,
           config=CheckpointConfig(save_checkpoint_steps=4, append_info=['epoch_num', 'step_num']))
    loaded = ms.load_checkpoint(str(tmp_path / 'ai' / 'lora-1_4.ckpt'))
    assert set(LORA) < set(loaded) and 'epoch_num' in loaded


def _delta_file(tmp_path, params, name='delta.ckpt'):
    path = str(tmp_path / name)
    ms.save_checkpoint(params, path)
    return path


def test_loader_refuses_mismatches(tmp_path):
    net = LoRAMLP()
    base = str(tmp_path / 'base.ckpt')
    ms.save_checkpoint([p for p in net.get_parameters() if 'lora' not in p.name], base)
    lora = {p.name: p for p in net.get_parameters() if 'mindpet_delta_lora' in p.name}
    good = _delta_file(tmp_path, list(lora.values()))
    load_base_and_delta(LoRAMLP(), base, good)

    missing = _delta_file(tmp_path, [v for k, v in lora.items() if k != 'fc2.mindpet_delta_lora_b'], 'm.ckpt')
    with pytest.raises(CheckpointError, match='fc2.mindpet_delta_lora_b'):
        load_base_and_delta(LoRAMLP(), base, missing)
    wrong_shape = [{'name': k, 'data': Tensor(np.zeros((2, 2), np.float32)) if k == 'fc1.mindpet_delta_lora_a'
                    else v} for k, v in lora.items()]
    with pytest.raises(CheckpointError, match=r"fc1.mindpet_delta_lora_a.*\(2, 2\)"):
        load_base_and_delta(LoRAMLP(), base, _delta_file(tmp_path, wrong_shape, 's.ckpt'))
    extra = [{'name': k, 'data': v} for k, v in lora.items()] + [
        {'name': 'fc9.mindpet_delta_lora_a', 'data': Tensor(np.zeros((2, 2), np.float32))}]
    with pytest.raises(CheckpointError, match='fc9.mindpet_delta_lora_a'):
        load_base_and_delta(LoRAMLP(), base, _delta_file(tmp_path, extra, 'e.ckpt'))
    torn = str(tmp_path / 'torn.ckpt')
    with open(good, 'rb') as src, open(torn, 'wb') as dst:
        dst.write(src.read()[:40])
    with pytest.raises(CheckpointError, match='torn.ckpt'):
        load_base_and_delta(LoRAMLP(), base, torn)
    with pytest.raises(CheckpointError, match='does not exist'):
        load_base_and_delta(LoRAMLP(), base, str(tmp_path / 'nope.ckpt'))
    head_only = str(tmp_path / 'head_only_base.ckpt')
    ms.save_checkpoint([p for p in net.get_parameters() if p.name.startswith('head')], head_only)
    with pytest.raises(CheckpointError, match='fc1.weight'):
        load_base_and_delta(LoRAMLP(), head_only, good)


def test_save_trainable_params_is_atomic_and_exact(tmp_path):
    net = LoRAMLP()
    freeze_delta(net, 'lora')
    path = str(tmp_path / 'a.ckpt')
    save_trainable_params(net, path)
    assert _files(tmp_path) == ['a.ckpt']
    assert sorted(ms.load_checkpoint(path)) == LORA


@pytest.mark.parametrize('kwargs,exc,fragment', [
    (dict(directory=3), TypeError, 'directory'),
    (dict(directory=''), ValueError, 'directory'),
    (dict(directory='d', prefix=5), TypeError, 'prefix'),
    (dict(directory='d', prefix='a/b'), ValueError, 'prefix'),
    (dict(directory='d', prefix=''), ValueError, 'prefix'),
    (dict(directory='d', config={'save_checkpoint_steps': 1}), TypeError, 'config'),
    (dict(directory='d', save_optimizer_state='yes'), TypeError, 'save_optimizer_state'),
])
def test_callback_bad_arguments(kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        TrainableParamsCheckPoint(**kwargs)
