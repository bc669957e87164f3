"""The lifecycle checks every method described by a tests/tuner_checks.py ``Case`` passes, run once per method and
check: GRAPH_MODE training (the loss falls, exactly the trainable parameters move), the save/load round trip (bit
for bit), switching between two adapters in a compiled graph, and merging (or its clear refusal). The Cases live
with each method's own tests in tests/tuners/test_<method>.py."""
import pytest

from tests import tuner_checks as checks
from tests.tuners import test_adapter, test_bitfit, test_dora, test_ia3, test_prefix_tuning, test_prompt_tuning

CASES = {'adapter': test_adapter.CASES['adapter'], 'low_rank_adapter': test_adapter.CASES['low_rank_adapter'],
         'bitfit': test_bitfit.CASE, 'dora': test_dora.CASE, 'ia3': test_ia3.CASE,
         'prefix_tuning': test_prefix_tuning.CASE, 'prompt_tuning': test_prompt_tuning.CASE}

CHECKS = {
    'training': lambda case, pair, tmp_path: checks.check_training(case, pair),
    'round_trip': checks.check_round_trip,
    'switching': lambda case, pair, tmp_path: checks.check_switching(case, pair),
    'merge': checks.check_merge,
}


@pytest.fixture(scope='module', params=sorted(CASES))
def case_pair(request, tmp_path_factory):
    case = CASES[request.param]
    return case, checks.trained_pair_once(case, tmp_path_factory)


@pytest.mark.parametrize('check', sorted(CHECKS))
def test_lifecycle(case_pair, check, tmp_path):
    CHECKS[check](*case_pair, tmp_path)
