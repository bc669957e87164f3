"""scripts/compare_methods.py builds every method as intended: the tasks' labels are what the generators planted, and
each method's model loads the same base, trains exactly the method's parameters (plus the head) and, where the
method starts from the identity, computes the base model's outputs before training."""
import importlib.util
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def test_related_task_plants_label_and_decoys_that_the_base_groups_cannot_tell_apart():
    ids, labels = cm.task_data('related', 500, seed=1)
    assert ids.shape == (500, cm.SEQ) and ids.dtype == np.int32 and set(labels) == {0, 1, 2, 3}
    fine, coarse = ids % 8, ids % 4
    for row, label in zip(range(500), labels):
        assert (fine[row] == label).sum() >= 4
        decoy = [g for g in range(4, 8) if g != label + 4 and (fine[row] == g).sum() >= 4]
        assert decoy, (ids[row], label)
        # under t % 4 the decoy group also holds >= 4 tokens: the pre-training features see two candidates
        assert (coarse[row] == decoy[0] - 4).sum() >= 4 and (coarse[row] == label).sum() >= 4
    # the finer partition decides almost always; the t % 4 counts alone about half the time, clearly above chance
    assert cm.bayes_accuracy('mod8', 4, n=4000, decoys=4) > 0.95
    assert 0.4 < cm.coarse_ceiling('related', n=20000) < 0.6
    assert 0.2 < cm.coarse_ceiling('new_partition', n=20000) < 0.3


def test_task_option_selects_the_generator_and_every_task_has_learning_rates():
    ids, labels = cm.task_data('new_partition', 64, seed=5)
    ref_ids, ref_labels = cm.make_task('div', cm.PLANT, 64, seed=5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(labels, ref_labels)
    assert set(cm.TASKS) == {'new_partition', 'related'}
    for task in cm.TASKS:
        assert set(cm.LEARNING_RATES[task]) == set(cm.METHODS) | set(cm.BUDGET_METHODS)
    with pytest.raises(SystemExit):
        cm.main(['--task', 'bogus'])


def _best_rate(scores):
    """The documented rule: the highest validation accuracy; ties go to the smaller rate."""
    return sorted(scores, key=lambda lr: (-scores[lr], lr))[0]


class _FakeWorkers:
    """Stands in for the worker processes: records each call's options and returns planted accuracies."""

    def __init__(self, val_accuracy):
        self.val_accuracy, self.calls = val_accuracy, []

    def __call__(self, args):
        opts = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith('--')
                and not args[i + 1].startswith('--')}
        self.calls.append(opts)
        if opts['--method'] == 'pretrain':
            return {'pretrain_task_accuracy': 0.9}
        lr = float(opts['--lr'])
        if '--no-test' in args:
            return {'val_accuracy': self.val_accuracy[opts['--method']][lr]}
        return {'test_accuracy': 0.5, 'trainable_share': 0.01, 'step_ms_median': 1.0, 'peak_rss_mb': 1.0, 'lr': lr}


def test_sweep_reports_the_best_rate_and_the_run_trains_each_method_at_its_best_swept_rate(tmp_path, monkeypatch,
                                                                                         capsys):
    planted = {'lora': {1e-3: 0.90, 3e-3: 0.90, 1e-2: 0.80}, 'ia3': {1e-3: 0.30, 3e-3: 0.60, 1e-2: 0.70}}
    workers = _FakeWorkers(planted)
    monkeypatch.setattr(cm, '_child', workers)
    assert cm.main(['--sweep', '--task', 'related', '--methods', 'lora', 'ia3', '--lrs', '1e-3', '3e-3', '1e-2',
                    '--workdir', str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert 'related lora: 0.001: 0.900, 0.003: 0.900, 0.01: 0.800 -> 0.001' in printed      # a tie: the smaller
    assert 'related ia3: 0.001: 0.300, 0.003: 0.600, 0.01: 0.700 -> 0.01' in printed
    # The comparison run trains every method at the best rate of the recorded sweep.
    workers.calls.clear()
    monkeypatch.setattr(cm, 'bayes_accuracy', lambda *args, **kwargs: 0.9)      # (the report's ceilings: tested
    monkeypatch.setattr(cm, 'coarse_ceiling', lambda *args, **kwargs: 0.5)      # above; slow to sample)
    methods = [m for m in cm.METHODS if m != 'full']         # without 'full' no report is written
    assert cm.main(['--task', 'both', '--methods', *methods, '--workdir', str(tmp_path)]) == 0
    used = {(c['--task'], c['--method']): float(c['--lr']) for c in workers.calls if c['--method'] != 'pretrain'}
    assert used == {(task, method): _best_rate(cm.SWEEP_RESULTS[task][method])
                    for task in cm.TASKS for method in methods}


def _fake_result(method, acc, task):
    result = {'task': task, 'method': method, 'label': cm.LABELS[method], 'lr': 3e-3, 'steps': 300,
              'trainable': 100, 'total': 1000, 'trainable_share': 0.1, 'test_accuracy': acc,
              'step_ms_median': 10.0, 'step_cpu_ms_mean': 12.0, 'peak_rss_mb': 600.0}
    if method == 'pst':
        result.update({'pst_zero_share_of_pruned_weights': 0.9, 'pst_pruned_weights': 1000,
                       'test_accuracy_after_merge': acc, 'pst_share_at_bert_base': 0.026})
    return result


def test_report_has_one_section_per_task_with_its_own_numbers(tmp_path):
    accs = {'new_partition': {'full': 0.851, 'head_only': 0.292, 'lora': 0.783, 'pst': 0.75},
            'related': {'full': 0.912, 'head_only': 0.473, 'lora': 0.864, 'pst': 0.845}}
    per_task = {task: {'meta': {'wall_s': 500.0, 'bayes_accuracy': 0.9, 'pretrain_features_ceiling': 0.49},
                       'results': [_fake_result(m, a, task) for m, a in accs[task].items()]} for task in accs}
    meta = {'wall_s': 1000.0, 'machine': 'test', 'load_start': 1.0, 'load_end': 2.0,
            'pretrain_task_accuracy': 0.93, 'pretrain_bayes_accuracy': 0.95}
    md, out = tmp_path / 'r.md', tmp_path / 'r.json'
    cm.write_report(per_task, meta, str(md), str(out))
    text = md.read_text()
    first, second = text.split('## Task 2')
    assert '## Task 1' in first and '| 29.2 |' in first and '| 47.3 |' not in first
    assert '| 47.3 |' in second and '| 91.2 |' in second and '| 29.2 |' not in second
    assert '75.0 % vs 78.3 %' in first and '84.5 % vs 86.4 %' in second     # PST-vs-LoRA note in both
    assert 'Near chance (25 %)**: head only' in first
    # --report-from rewrites the same Markdown from the JSON alone
    assert cm.main(['--report-from', str(out), '--out-md', str(tmp_path / 'again.md')]) == 0
    assert (tmp_path / 'again.md').read_text() == text


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
