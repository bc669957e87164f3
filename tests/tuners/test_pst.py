"""PST through the lifecycle: PstConfig (defaults, YAML, errors), injection of PSTDense by name into
tests/gpt_like.py, GRAPH_MODE training through PetModel with the training hook driving the sparsity schedule,
save/load, switching and merging into the sparse export (shared checks in tests/hook_tuner_checks.py)."""
import pytest

from mindpet import PstConfig
from mindpet.delta.pst import cubic_sparsity, kept_count

from tests import hook_tuner_checks as checks
from tests.hook_tuner_checks import LAYERS, STEPS


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    return checks.train_once('pst', str(tmp_path_factory.mktemp('pst')))


def test_config_needs_only_target_modules_and_reads_from_yaml(tmp_path):
    checks.check_config_defaults_and_yaml(tmp_path, PstConfig, 'pst', dict(
        r_w=8, r_m=8, initial_sparsity=0.0, final_sparsity=0.9, warmup_fraction=0.1, cooldown_fraction=0.1,
        total_step=None))


@pytest.mark.parametrize('call,exc,fragments', [
    (lambda: PstConfig(target_modules=['q'], final_sparsity=1.0), ValueError, ['final_sparsity', '1.0']),
    (lambda: PstConfig(target_modules=['q'], r_w=0), ValueError, ['r_w', '0']),
    (lambda: PstConfig(target_modules=['q'], warmup_fraction=0.5, cooldown_fraction=0.5), ValueError,
     ['cooldown_fraction']),
    (lambda: PstConfig(target_modules=['q'], compute_dtype='float64'), ValueError, ['compute_dtype', 'float64']),
])
def test_config_errors_name_the_field_and_value(call, exc, fragments):
    checks.check_config_error(call, exc, fragments)


def test_injection_replaces_matched_layers_keeping_base_parameters(tmp_path):
    checks.check_injection('pst', tmp_path, [f'{k}.mindpet_delta_pst_{s}' for k in LAYERS for s in 'uvabrc'])


def test_second_adapter_must_fit_the_live_layers():
    checks.check_second_adapter_must_fit('pst', dict(r_w=2), 'r_w=4')


def test_training_hook_trains_in_graph_mode_and_freezes_the_base(trained):
    checks.check_training_trains_only_the_adapter(trained)


def test_schedule_and_masks_after_training(trained):
    run = trained.run
    want = [cubic_sparsity(i, STEPS, 0.0, 0.5, 0.1, 0.25) for i in range(STEPS)]
    assert run.seen == pytest.approx(want)
    report = run.hook.report()
    assert sorted(report) == sorted(LAYERS)
    for key, (kept, total, sparsity) in report.items():
        assert kept == kept_count(0.5, total) and sparsity == 0.5
        exported = run.pet.pet_layers[key].export_weight()
        assert int((exported == 0).sum()) == total - kept


def test_saved_adapter_loads_exactly_switches_and_merges(trained, graph_mode, tmp_path):
    def check_merged(pet, merged, w0, tensors):
        # The weight becomes the sparse export M * (W0 + U V).
        for weight in merged.values():
            assert int((weight == 0).sum()) == weight.size - kept_count(0.5, weight.size)

    checks.check_saved_adapter_loads_switches_and_merges(trained, tmp_path, check_merged)
