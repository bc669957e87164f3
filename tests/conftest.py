"""Shared test set-up: CPU, a compile cache, and fixtures that run a test in each MindSpore mode."""
import os

# MindSpore's compile cache (MS_COMPILER_CACHE_ENABLE) is deliberately OFF: measured here, a second run reused a
# wrong cached graph (value_and_grad returned another structure), i.e. silently wrong results. Tiny test graphs
# compile in well under a second anyway.
os.environ['MS_COMPILER_CACHE_ENABLE'] = '0'
os.environ.setdefault('GLOG_v', '3')

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
