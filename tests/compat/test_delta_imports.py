"""The contract's import paths for every delta method, under both names (mindpet, tk), without MindFormers."""
import importlib
import subprocess
import sys

import pytest

import mindpet.delta

PATHS = {
    'adapter': ['AdapterDense', 'AdapterLayer'],
    'low_rank_adapter': ['LowRankAdapterDense', 'LowRankAdapterLayer'],
    'prefix_layer': ['PrefixLayer', 'PrefixAttention', 'StaticPrefix', 'concat_prefix', 'export_prefixes'],
    'ptuning2': ['PrefixEncoder'],
    'r_drop': ['RDropLoss', 'rdrop_repeat'],
}


@pytest.mark.parametrize('module', sorted(PATHS))
def test_module_paths_under_both_names(module):
    real = importlib.import_module(f'mindpet.delta.{module}')
    alias = importlib.import_module(f'tk.delta.{module}')
    for name in PATHS[module]:
        assert getattr(alias, name) is getattr(real, name) is getattr(mindpet.delta, name)
        assert name in mindpet.delta.__all__


def test_importing_the_delta_package_needs_no_mindformers():
    code = ("import sys; import mindpet.delta, tk.delta; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('mindformers', 'torch')]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip() == 'ok' and out.stderr.strip() == '', out.stderr
