"""The t-SVD adapter through the lifecycle: TensorSVDConfig (defaults, YAML, errors), injection of TSVDDense by name
into tests/gpt_like.py with layers grouped into shared tensors, GRAPH_MODE training through PetModel with the
training hook driving the tube allocator, save/load, switching and merging (shared checks in
tests/hook_tuner_checks.py)."""
import numpy as np
import pytest

from mindpet import TensorSVDConfig, get_pet_model
from mindpet.delta.tsvd import tsvd_increments
from mindpet.tuners.tsvd import layer_groups

from tests import hook_tuner_checks as checks
from tests.gpt_like import GPTLike
from tests.hook_tuner_checks import LAYERS


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    return checks.train_once('tsvd', str(tmp_path_factory.mktemp('tsvd')))


def test_config_needs_only_target_modules_and_reads_from_yaml(tmp_path):
    checks.check_config_defaults_and_yaml(tmp_path, TensorSVDConfig, 'tsvd', dict(
        tsvd_rank=8, tsvd_alpha=8, target_rank=4, group_by='name', t_init=0, t_final=0, delta_t=1,
        orth_reg_weight=0.5, total_step=None, rank_pattern=None))


@pytest.mark.parametrize('call,exc,fragments', [
    (lambda: TensorSVDConfig(target_modules=['q'], group_by='block'), ValueError, ['group_by', 'block']),
    (lambda: TensorSVDConfig(target_modules=['q'], tsvd_rank=2.0), TypeError, ['tsvd_rank', '2.0']),
    (lambda: TensorSVDConfig(target_modules=['q'], tsvd_rank=2, target_rank=3), ValueError, ['target_rank', '3']),
    (lambda: TensorSVDConfig(target_modules=['q'], total_step=0), ValueError, ['total_step', '0']),
])
def test_config_errors_name_the_field_and_value(call, exc, fragments):
    checks.check_config_error(call, exc, fragments)


def test_injection_replaces_matched_layers_keeping_base_parameters(tmp_path):
    # One group per layer name across the blocks, named after its first layer.
    owners = [k for k in LAYERS if k.startswith('blocks.0.')]
    _, cells, params = checks.check_injection(
        'tsvd', tmp_path, [f'{k}.tsvd_group.mindpet_delta_tsvd_{s}' for k in owners for s in 'usv'])
    assert cells['blocks.1.attn.q_proj'].tsvd_group is cells['blocks.0.attn.q_proj'].tsvd_group
    assert [cells[f'blocks.{b}.attn.q_proj'].tsvd_index for b in (0, 1)] == [0, 1]
    assert params['blocks.0.mlp.fc_in.tsvd_group.mindpet_delta_tsvd_u'].shape == (128, 4, 2)


def test_grouping_by_shape_and_the_group_rule():
    shapes = {'b.0.q': (8, 8), 'b.0.up': (16, 8), 'b.1.q': (8, 8), 'b.1.up': (16, 8), 'head': (8, 8)}
    keys = list(shapes)
    assert layer_groups(keys, shapes) == [['b.0.q', 'b.1.q'], ['b.0.up', 'b.1.up'], ['head']]
    assert layer_groups(keys, shapes, 'shape') == [['b.0.q', 'b.1.q', 'head'], ['b.0.up', 'b.1.up']]
    pet = get_pet_model(GPTLike(), TensorSVDConfig(target_modules=['q_proj', 'v_proj'], tsvd_rank=2, target_rank=1,
                                                   group_by='shape'))
    groups = {id(layer.tsvd_group) for layer in pet.pet_layers.values()}
    assert len(groups) == 1
    group = pet.pet_layers['blocks.0.attn.q_proj'].tsvd_group
    assert group.num_layers == 4 and group.mindpet_delta_tsvd_s.shape == (2, 4)
    order = ['blocks.0.attn.q_proj', 'blocks.0.attn.v_proj', 'blocks.1.attn.q_proj', 'blocks.1.attn.v_proj']
    assert [pet.pet_layers[k].tsvd_index for k in order] == [0, 1, 2, 3]
    assert group.mindpet_delta_tsvd_u.name == 'blocks.0.attn.q_proj.tsvd_group.mindpet_delta_tsvd_u'


@pytest.mark.parametrize('change,fragment', [
    (dict(tsvd_rank=2, target_rank=1), 'tsvd_rank=4'),
    (dict(group_by='shape'), 'share a tensor'),
])
def test_second_adapter_must_fit_the_live_layers(change, fragment):
    checks.check_second_adapter_must_fit('tsvd', change, fragment)


def test_training_hook_trains_in_graph_mode_and_freezes_the_base(trained):
    checks.check_training_trains_only_the_adapter(trained)


def test_rank_allocation_follows_the_budget_and_prunes(trained):
    # 3 groups x tsvd_rank 4 tubes down to 3 x 2; a group's rank is its count of tubes with a non-zero entry.
    checks.check_rank_allocation(trained, units=3 * 4, target=3 * 2, delta_t=1,
                                 live_rank=lambda after, name: np.count_nonzero(
                                     np.any(after[f'{name}.mindpet_delta_tsvd_s'] != 0, axis=1)))


def test_saved_adapter_loads_exactly_switches_and_merges(trained, graph_mode, tmp_path):
    def check_merged(pet, merged, w0, tensors):
        # Layer i of a group gets the i-th frontal slice of the t-product increment U * S * V^T (scaled alpha/rank).
        for first in ('blocks.0.attn.q_proj', 'blocks.0.attn.v_proj', 'blocks.0.mlp.fc_in'):
            get = lambda s, first=first: tensors[f'{first}.tsvd_group.mindpet_delta_tsvd_{s}']  # noqa: E731
            increments = tsvd_increments(get('u'), get('s'), get('v'), 8 / 4)
            for index in (0, 1):
                key = first.replace('blocks.0', f'blocks.{index}')
                np.testing.assert_allclose(merged[key], w0[key] + increments[:, :, index], atol=1e-6)

    checks.check_saved_adapter_loads_switches_and_merges(trained, tmp_path, check_merged)
