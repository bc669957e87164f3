"""``mindpet finetune`` refusals of issue 15, one table row each: sizes, caps, YAML shape, output directories.

Every row runs the command and asserts the error type (by the one-line message of the CLI and by calling
:func:`finetune`), the key named in the message, and that the output directory is exactly as before the call.
"""
import os
import stat
from collections import namedtuple

import numpy as np
import pytest
import yaml
import mindspore as ms

from mindpet.cli import main
from mindpet.train.runner import finetune, MAX_EPOCHS, MAX_STEPS
from mindpet.train.schedule import WarmupDecayLR, learning_rates
from mindpet.utils.exceptions import (FileOversizeError, ModelConfigParamsInfoError, ReadYamlFileError)
from mindpet.utils.io_utils import atomic_write
from tests.train.test_runner import small_config

Row = namedtuple('Row', ['id', 'sets', 'edit', 'exc', 'fragments'])


def _dup_training(text):
    return text + 'training:\n  epochs: 5\n  batch_size: 8\n  output_dir: elsewhere\n'


def _deep_list(text):
    return text.replace('data:\n', 'data:\n  deep: ' + '[' * 5000 + ']' * 5000 + '\n', 1)


def _oversize(text):
    return text + '#' + 'x' * (11 * 1024 * 1024) + '\n'


ROWS = [
    Row('yaml-duplicate-section', [], _dup_training, ReadYamlFileError,
        ["duplicate key 'training' at lines", 'run.yaml']),
    Row('yaml-5000-deep', [], _deep_list, ReadYamlFileError, ['nesting deeper than 100 levels', 'run.yaml']),
    Row('yaml-over-10mb', [], _oversize, FileOversizeError, ['run.yaml', 'larger than 10 MB']),
    Row('epochs-1e30-int', [f'training.epochs={10 ** 30}'], None, ModelConfigParamsInfoError,
        ["'training.epochs'", f'at most {MAX_EPOCHS:,}']),
    Row('epochs-1e30-float', ['training.epochs=1.0e30'], None, ModelConfigParamsInfoError,
        ["'training.epochs'", 'must be an int']),
    Row('epochs-times-steps', [f'training.epochs={MAX_EPOCHS}', 'training.batch_size=16'], None, ModelConfigParamsInfoError,
        ["'training.epochs'", f'more than the maximum of {MAX_STEPS:,}']),
    Row('max-steps-cap', [f'training.max_steps={MAX_STEPS + 1}'], None, ModelConfigParamsInfoError,
        ["'training.max_steps'", f'at most {MAX_STEPS:,}']),
    Row('output-dir-root', ['training.output_dir=/'], None, ModelConfigParamsInfoError,
        ["'training.output_dir'", "'/' is the root directory"]),
    Row('output-dir-etc', ['training.output_dir=/etc'], None, ModelConfigParamsInfoError,
        ["'training.output_dir'", "'/etc' is a system directory"]),
    Row('output-dir-in-usr', ['training.output_dir=/usr/lib/run'], None, ModelConfigParamsInfoError,
        ["'training.output_dir'", 'inside a system directory']),
    Row('output-dir-home', [f"training.output_dir={os.path.expanduser('~')}"], None, ModelConfigParamsInfoError,
        ["'training.output_dir'", 'is the home directory itself']),
    Row('output-dir-not-empty', [], None, ModelConfigParamsInfoError,
        ["'training.output_dir'", 'is not empty (keep.txt)', '--overwrite', '--resume']),
    Row('hidden-1e9-overrides', ['model.overrides={hidden: 1000000000}'], None, ModelConfigParamsInfoError,
        ["'model.overrides'", 'more than the', 'of memory available here']),
    Row('lora-rank-above-layer', ['pet.lora_rank=300'], None, ModelConfigParamsInfoError,
        ["'pet.lora_rank'", "'layers.0'", 'min(in_channels, out_channels) = 32']),
    Row('lora-rank-1e9', [f'pet.lora_rank={10 ** 9}'], None, ModelConfigParamsInfoError,
        ["'pet.lora_rank'", "'layers.0'", 'but got 1000000000']),
]


def _listing(directory):
    return {name: os.stat(os.path.join(directory, name)).st_mtime_ns for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize('row', ROWS, ids=[row.id for row in ROWS])
def test_refused_with_one_line_and_nothing_changed(tmp_path, capsys, row):
    path = small_config(tmp_path)
    if row.edit:
        with open(path, encoding='utf-8') as handle:
            text = handle.read()
        with open(path, 'w', encoding='utf-8') as handle:
            handle.write(row.edit(text))
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    (out_dir / 'keep.txt').write_text('not mindpet')
    before = _listing(out_dir)
    args = ['finetune', '--config', path]
    for item in row.sets:
        args += ['--set', item]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert all(fragment in err for fragment in row.fragments), err
    with pytest.raises(row.exc) as info:
        finetune(path, row.sets, out=lambda *_: None)
    assert all(fragment in str(info.value) for fragment in row.fragments), str(info.value)
    assert _listing(out_dir) == before
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    path = small_config(tmp_path)
    with pytest.raises(ValueError, match=r"'resume' and 'overwrite' exclude each other"):
        finetune(path, resume=True, overwrite=True)
    with pytest.raises(SystemExit):
        main(['finetune', '--config', path, '--resume', '--overwrite'])
    assert 'not allowed with argument' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_overwrite_removes_what_the_earlier_run_wrote_and_nothing_else(tmp_path, graph_mode):
    path = small_config(tmp_path, training__checkpoint_interval=2)
    out_dir = tmp_path / 'out'
    finetune(path, out=lambda *_: None)
    first = set(os.listdir(out_dir))
    assert {'adapter', 'checkpoints', 'config.yaml', 'metrics.json'} <= first
    (out_dir / 'checkpoints' / 'stale-from-run-1.txt').write_text('x')
    (out_dir / 'notes.txt').write_text('mine')
    lines = []
    finetune(path, overrides=['training.checkpoint_interval=0'], overwrite=True, out=lines.append)
    assert lines[0].startswith('[overwrite] removed the earlier run') and 'checkpoints' in lines[0]
    # The foreign file stays; the first run's checkpoints are gone (this run wrote none).
    assert set(os.listdir(out_dir)) == (first - {'checkpoints'}) | {'notes.txt'}
    assert (out_dir / 'notes.txt').read_text() == 'mine'


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_umask_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write(str(tmp_path / 'f.txt'), lambda tmp: open(tmp, 'w', encoding='utf-8').close())
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


def test_learning_rate_is_computed_per_step_in_the_graph(graph_mode):
    """The optimizer computes each step's rate from its step counter: nothing of size total_steps exists, and the
    rates equal the formula's."""
    from mindspore import nn
    net = nn.Dense(2, 1)
    schedule = WarmupDecayLR(MAX_STEPS, 1.0, 0.1, warmup_steps=3, decay='cosine')
    opt = nn.SGD(net.trainable_params(), learning_rate=schedule)
    assert max(int(np.prod(p.shape)) for p in opt.get_parameters()) <= 2
    for args in [(10, 1e-3, 1e-5, 3, 'linear', 1.0), (5, 2.0, 0.0, 0, 'cosine', 1.0),
                 (4, 1.0, 0.1, 0, 'polynomial', 2.0), (3, 0.5, 0.0, 1, 'constant', 1.0), (2, 1.0, 0.0, 5, 'linear', 1.0)]:
        lr = WarmupDecayLR(*args)
        got = [float(lr(ms.Tensor(i, ms.int32)).asnumpy()) for i in range(args[0])]
        np.testing.assert_allclose(got, learning_rates(*args), rtol=1e-6, atol=1e-9)
    last = WarmupDecayLR(MAX_STEPS, 1.0, 0.1, decay='linear')
    assert float(last(ms.Tensor(MAX_STEPS - 1, ms.int32)).asnumpy()) == pytest.approx(0.1, rel=1e-6)
