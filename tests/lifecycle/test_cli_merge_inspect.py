"""`mindpet merge` and `mindpet inspect`: in-process through cli.main, and once through the console entry."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindpet import LoraConfig, get_pet_model
from mindpet import cli
from mindpet.adapter_store import adapter_weights_path

from tests.gpt_like import GPTLike, token_batch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A base checkpoint (with an optimizer-state entry, as ModelCheckpoint writes), and an adapter (with a saved
    head) whose merged weights are known."""
    root = tmp_path_factory.mktemp('cli')
    base = GPTLike(seed=3)
    base_path = str(root / 'base.ckpt')
    ms.save_checkpoint(base, base_path, append_dict={'epoch_num': 1})
    pet = get_pet_model(GPTLike(seed=3), LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=4,
                                                    lora_alpha=8, modules_to_save=['lm_head']))
    rng = np.random.RandomState(0)
    for param in pet.trainable_params():
        param.set_data(Tensor(rng.randn(*param.shape).astype(np.float32) * 0.1))
    adapter = str(root / 'adapter')
    pet.save_pretrained(adapter)
    ids, _ = token_batch('shift')
    plain = pet.merge_and_unload()
    expected = {p.name: p.asnumpy().copy() for p in plain.get_parameters()}
    return root, base_path, adapter, expected, plain(ids).asnumpy(), ids


def test_merge_writes_the_merged_base_checkpoint(files, capsys):
    root, base_path, adapter, expected, out, ids = files
    merged_path = str(root / 'merged.ckpt')
    assert cli.main(['merge', '--base', base_path, '--adapter', adapter, '--out', merged_path]) == 0
    message = capsys.readouterr().out
    assert 'merged 4 layer(s) and 1 saved module parameter(s)' in message and merged_path in message
    merged = ms.load_checkpoint(merged_path)
    net = GPTLike(seed=11)
    not_loaded, left_over = ms.load_param_into_net(net, merged, strict_load=True)
    assert not_loaded == [] and left_over == ['epoch_num']        # the extra entry is copied through
    for name, value in expected.items():
        np.testing.assert_allclose(net.parameters_dict()[name].asnumpy(), value, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(net(ids).asnumpy(), out, atol=1e-5, rtol=1e-5)
    # safetensors output by extension
    st_path = str(root / 'merged.safetensors')
    assert cli.main(['merge', '--base', base_path, '--adapter', adapter, '--out', st_path]) == 0
    st = ms.load_checkpoint(st_path, format='safetensors')
    np.testing.assert_array_equal(st['blocks.0.attn.q_proj.weight'].asnumpy(),
                                  merged['blocks.0.attn.q_proj.weight'].asnumpy())


def test_merge_refuses_another_base_and_reports_errors_without_traceback(files, tmp_path, capsys):
    _, _, adapter, _, _, _ = files
    other = str(tmp_path / 'other.ckpt')
    ms.save_checkpoint(GPTLike(vocab=80), other)
    out = str(tmp_path / 'merged.ckpt')
    assert cli.main(['merge', '--base', other, '--adapter', adapter, '--out', out]) == 1
    err = capsys.readouterr().err
    assert err.startswith('mindpet merge: error: ') and "'embed.embedding_table'" in err
    assert 'Traceback' not in err and not os.path.exists(out)
    assert cli.main(['merge', '--base', str(tmp_path / 'none.ckpt'), '--adapter', adapter, '--out', out]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(['merge', '--base', other])
    assert info.value.code == 2
    assert cli.main([]) == 2


def test_inspect_lists_names_shapes_dtypes_bytes(files, capsys):
    _, base_path, adapter, _, _, _ = files
    assert cli.main(['inspect', adapter_weights_path(adapter)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ['name', 'shape', 'dtype', 'bytes']
    row = next(line for line in lines if line.startswith('blocks.0.attn.q_proj.mindpet_delta_lora_a '))
    assert row.split() == ['blocks.0.attn.q_proj.mindpet_delta_lora_a', '(4,', '32)', 'float32', '512']
    raw = 4 * 2 * 4 * 32 * 4 + 64 * 32 * 4
    assert lines[-1] == f"9 tensors, {raw // 4:,} values, {raw:,} bytes ({raw / 1024 / 1024:.2f} MB)"

    assert cli.main(['inspect', adapter, '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['header']['pet']['lora_rank'] == 4 and report['header']['layers'] == 4
    assert report['total_bytes'] == raw
    assert {'name': 'lm_head.weight', 'shape': [64, 32], 'dtype': 'float32', 'bytes': 8192} in report['tensors']

    assert cli.main(['inspect', base_path, '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    names = {t['name'] for t in report['tensors']}
    assert names == {p.name for p in GPTLike().get_parameters()} | {'epoch_num'}


def test_register_command_plugs_in_a_verb(capsys):
    calls = []
    cli.register_command('echo-test', 'test verb', lambda p: p.add_argument('--word'),
                         lambda args: calls.append(args.word) or 0)
    try:
        assert cli.main(['echo-test', '--word', 'hi']) == 0
        assert calls == ['hi']
        with pytest.raises(ValueError, match='new non-empty str'):
            cli.register_command('echo-test', 'again', lambda p: None, lambda a: 0)
    finally:
        cli._COMMANDS.pop('echo-test', None)  # pylint: disable=protected-access


def test_console_entry_point_runs(files):
    _, _, adapter, _, _, _ = files
    env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v='3')
    done = subprocess.run([sys.executable, '-m', 'mindpet.cli', 'inspect', adapter], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert 'pet: ' in done.stdout and 'blocks.1.attn.v_proj.mindpet_delta_lora_b' in done.stdout
