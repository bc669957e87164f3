"""scripts/compare_methods.py builds every method as intended: the task's labels are what the generator planted, and
each method's model loads the same base, trains exactly the method's parameters (plus the head) and, where the
method starts from the identity, computes the base model's outputs before training."""
import importlib.util
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location('compare_methods', os.path.join(ROOT, 'scripts',
                                                                                   'compare_methods.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cm = _script()


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('compare') / 'base.ckpt')
    net = cm.build_model()
    ms.save_checkpoint(net, path)
    ids, _ = cm.make_task('div', cm.PLANT, 8, seed=0)
    return path, ids, net(Tensor(ids)).asnumpy()


def test_task_plants_the_label_and_the_ceiling_is_below_one():
    ids, labels = cm.make_task('div', 4, 500, seed=1)
    assert ids.shape == (500, cm.SEQ) and ids.dtype == np.int32 and set(labels) == {0, 1, 2, 3}
    group = (ids // 4) % 4
    assert all((group[i] == labels[i]).sum() >= 4 for i in range(500))
    assert 0.8 < cm.bayes_accuracy('div', 4, n=4000) < 0.9
    assert cm.bayes_accuracy('mod', 5, n=4000) > cm.bayes_accuracy('div', 4, n=4000)


# Parameter-name fragments each method trains (besides the classifier head).
TRAINS = {
    'head_only': [], 'lora': ['mindpet_delta_lora_'], 'adalora': ['mindpet_delta_adalora_'],
    'tsvd': ['mindpet_delta_tsvd_'], 'dora': ['mindpet_delta_dora_'], 'ia3': ['mindpet_delta_ia3_'],
    'adapter': ['mindpet_delta_adapter_'], 'low_rank_adapter': ['mindpet_delta_low_rank_adapter_'],
    'bitfit': ['.bias'], 'prefix': ['mindpet_delta_prefixtuning_'], 'prompt': ['mindpet_delta_prompt_tuning_'],
    'pst': ['mindpet_delta_pst_'],
}
# Methods whose fresh parameters make the model compute exactly the base (adapters/prefix/prompt do not).
IDENTITY_AT_INIT = {'full', 'head_only', 'lora', 'adalora', 'tsvd', 'dora', 'ia3', 'bitfit', 'pst'}


@pytest.mark.parametrize('method', cm.METHODS)
def test_each_method_trains_only_its_parameters_and_starts_from_the_base(base, method):
    path, ids, base_out = base
    model, pet, _ = cm.build_method(method, path, steps=20)
    trainable = [p.name for p in model.trainable_params()]
    if method == 'full':
        assert len(trainable) == len(list(model.get_parameters()))
    else:
        head = [n for n in trainable if n.startswith('classifier.')]
        assert sorted(head) == ['classifier.bias', 'classifier.weight']
        rest = [n for n in trainable if not n.startswith('classifier.')]
        assert all(any(f in n for f in TRAINS[method]) for n in rest), rest
        assert bool(rest) == bool(TRAINS[method])
    out = model(Tensor(ids)).asnumpy()
    if method in IDENTITY_AT_INIT:
        np.testing.assert_allclose(out, base_out, atol=1e-5, rtol=1e-5)
    if pet is not None:
        assert pet.training_hook(total_steps=20) is not None
