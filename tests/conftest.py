"""Shared test set-up: CPU, no compile cache, MindSpore's and hypothesis's files kept out of the repository, and
fixtures that run a test in each MindSpore mode."""
import os
import tempfile

# MindSpore's compile cache (MS_COMPILER_CACHE_ENABLE) is deliberately OFF: measured here, a second run reused a
# wrong cached graph (value_and_grad returned another structure), i.e. silently wrong results. Tiny test graphs
# compile in well under a second anyway.
os.environ['MS_COMPILER_CACHE_ENABLE'] = '0'
os.environ.setdefault('GLOG_v', '3')
# Tests write only to temporary directories. MindSpore writes rank_0/om/analyze_fail.ir under MS_OM_PATH (default:
# the working directory, i.e. the repository) whenever a graph fails to compile, as the bad-input tests make it do;
# worker processes the tests start inherit the variable. Hypothesis keeps its example database and caches under its
# home directory (default: .hypothesis in the working directory); the database is off, the caches go to /tmp.
SCRATCH = os.path.join(tempfile.gettempdir(), f'mindpet-tests-{os.getuid()}')
os.environ.setdefault('MS_OM_PATH', os.path.join(SCRATCH, 'ms_om'))

from hypothesis import settings  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

set_hypothesis_home_dir(os.path.join(SCRATCH, 'hypothesis'))
settings.register_profile('mindpet-tests', database=None)
settings.load_profile('mindpet-tests')

import mindspore as ms  # noqa: E402
import pytest  # noqa: E402

ms.set_context(device_target='CPU')


@pytest.fixture(params=['graph', 'pynative'])
def ms_mode(request):
    """Run the test once in GRAPH_MODE and once in PYNATIVE_MODE; yields the mode name."""
    ms.set_context(mode=ms.GRAPH_MODE if request.param == 'graph' else ms.PYNATIVE_MODE)
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture
def graph_mode():
    """Run the test in GRAPH_MODE (the production mode)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)
