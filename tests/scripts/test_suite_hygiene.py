"""The test suite writes only to temporary directories: MindSpore's graph dumps, hypothesis's files and the
benchmark's worker logs land outside the repository (tests/conftest.py and the benchmark's --log-dir); and the
test files the docs name exist."""
import glob
import os
import re

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Tensor
from hypothesis import given, settings, strategies as st
from hypothesis.configuration import storage_directory

from scripts.benchmark import orchestrate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _inside_repo(path):
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(ROOT)]) == os.path.realpath(ROOT)


def _tree(path):
    """relative path -> mtime of everything under ``path`` (empty when it does not exist)."""
    out = {}
    for folder, dirs, names in os.walk(path):
        for name in dirs + names:
            full = os.path.join(folder, name)
            out[os.path.relpath(full, path)] = os.stat(full).st_mtime_ns
    return out


class _ShapeMismatch(nn.Cell):
    def construct(self, x):
        return ops.matmul(x, Tensor(np.ones((3, 3), np.float32)))


def test_a_graph_that_fails_to_compile_dumps_outside_the_repository(graph_mode):
    om_path = os.environ['MS_OM_PATH']
    assert not _inside_repo(om_path), om_path
    dump = os.path.join(om_path, 'rank_0', 'om', 'analyze_fail.ir')
    before = os.stat(dump).st_mtime_ns if os.path.exists(dump) else None
    in_repo = {path: _tree(path) for path in (os.path.join(ROOT, 'rank_0'), os.path.join(os.getcwd(), 'rank_0'))}
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        _ShapeMismatch()(Tensor(np.ones((2, 2), np.float32)))
    assert os.path.exists(dump) and os.stat(dump).st_mtime_ns != before      # written, and here
    assert {path: _tree(path) for path in in_repo} == in_repo                # nothing under the repository


def test_hypothesis_keeps_no_database_and_no_files_in_the_repository():
    assert settings.default.database is None
    assert not _inside_repo(str(storage_directory('examples', intent_to_write=False).path))
    before = _tree(os.path.join(ROOT, '.hypothesis')), _tree(os.path.join(os.getcwd(), '.hypothesis'))
    seen = []

    @settings(max_examples=20, deadline=None)
    @given(text=st.text(max_size=4), number=st.floats(allow_nan=False))
    def prop(text, number):
        seen.append((text, number))

    prop()
    assert seen
    assert (_tree(os.path.join(ROOT, '.hypothesis')), _tree(os.path.join(os.getcwd(), '.hypothesis'))) == before


def test_benchmark_worker_logs_go_to_the_given_directory(tmp_path):
    args = orchestrate.parse_args(['--log-dir', str(tmp_path / 'logs')])
    runner = orchestrate.Runner(args)
    assert runner.log_dir == str(tmp_path / 'logs') and os.path.isdir(runner.log_dir)
    # Without --log-dir (a user's run) the logs go beside the results, under outputs/.
    assert orchestrate.parse_args([]).log_dir is None


def test_every_test_file_the_docs_name_exists():
    """README, doc/ and the examples' READMEs name test files by path (tests/<folder>/test_x.py[::name]): each
    exists (catches pages left behind when tests move)."""
    pages = [os.path.join(ROOT, 'README.md')] + glob.glob(os.path.join(ROOT, 'doc', '*.md')) \
        + glob.glob(os.path.join(ROOT, 'examples', '*', 'README.md'))
    named = set()
    for page in pages:
        with open(page, encoding='utf-8') as handle:
            named |= {(os.path.relpath(page, ROOT), path) for path in re.findall(r'\btests/[\w/]+\.py', handle.read())}
    assert len(named) > 10
    missing = sorted((page, path) for page, path in named if not os.path.isfile(os.path.join(ROOT, path)))
    assert not missing, missing
