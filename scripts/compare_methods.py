"""Compare every parameter-efficient method of mindpet with full fine-tuning on one small task.

    PYTHONPATH=. python scripts/compare_methods.py            # all methods, writes doc/method_comparison.{md,json}
    PYTHONPATH=. python scripts/compare_methods.py --methods lora pst --out-md /tmp/x.md --out-json /tmp/x.json

The task: a 4-block transformer encoder classifier (hidden 128, 4 heads, feed-forward 256, vocabulary 64, 16 tokens,
~0.56M parameters) is first pre-trained (full training) on task A: which of 4 token groups (``t % 4``) was planted
5 times in the sequence. Every method then fine-tunes that frozen base for the same number of steps on task B: the
same question for another partition of the vocabulary (``(t // 4) % 4``) with only 4 planted tokens, so the best
possible accuracy is about 86 % (counting ties randomly). The classifier head trains with every method.

Each method runs in its own process (so its peak memory is its own), in GRAPH_MODE on CPU, with Adam at the
method's learning rate (``LEARNING_RATES``: the best validation accuracy in ``SWEEP_RESULTS``, measured with
``--sweep``), and reports: trainable share of the parameters, test accuracy after training, median
step time (after compilation, including the method's own per-step work such as PST's schedule or AdaLoRA's
allocator) and peak resident memory, the last two also relative to full fine-tuning.

PST, AdaLoRA, the t-SVD adapter and LoRA go through ``get_pet_model`` and ``pet.training_hook``; DoRA, IA3, the
adapters, BitFit, prefix and prompt tuning are built directly from their delta Cells (``freeze_delta``).
"""
# MindSpore and mindpet are imported inside the functions that run in the worker processes: the driver process only
# starts workers and writes the report.
# pylint: disable=import-outside-toplevel
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VOCAB, SEQ, HIDDEN, LAYERS, HEADS, FFN, CLASSES = 64, 16, 128, 4, 4, 256, 4
TRAIN_N, VAL_N, TEST_N, BATCH = 4096, 512, 2048, 32
PRETRAIN_STEPS, STEPS = 400, 300
PRETRAIN_PLANT, PLANT = 5, 4
NUM_VIRTUAL = 8            # prefix length / virtual prompt tokens

METHODS = ['full', 'head_only', 'lora', 'adalora', 'tsvd', 'dora', 'ia3', 'adapter', 'low_rank_adapter', 'bitfit',
           'prefix', 'prompt', 'pst']
LABELS = {
    'full': 'full fine-tuning', 'head_only': 'head only (reference)', 'lora': 'LoRA r=8 (q, v)',
    'adalora': 'AdaLoRA r 12->8 (q, v)', 'tsvd': 't-SVD k 8->4 per group (q, v)', 'dora': 'DoRA r=8 (q, v)',
    'ia3': 'IA3 (k, v, ffn)', 'adapter': 'Adapter m=16 (attn out, ffn out)',
    'low_rank_adapter': 'LowRankAdapter m=16 k=1 (attn out, ffn out)', 'bitfit': 'BitFit (biases)',
    'prefix': f'Prefix tuning P={NUM_VIRTUAL}', 'prompt': f'Prompt tuning n={NUM_VIRTUAL}',
    'pst': 'PST 90% sparse, r_w=r_m=8 (all block linears)',
}
# Validation accuracy per learning rate from `--sweep` (run once on this machine; 1e-3 never won for the first four
# methods, so the rest started at 3e-3; the grid was extended where the best value sat on its edge).
SWEEP_RESULTS = {
    'full': {1e-3: 0.818, 3e-3: 0.828, 1e-2: 0.688, 3e-2: 0.369},
    'head_only': {1e-3: 0.283, 3e-3: 0.289, 1e-2: 0.256, 3e-2: 0.277},
    'lora': {1e-3: 0.568, 3e-3: 0.789, 1e-2: 0.662, 3e-2: 0.365},
    'adalora': {1e-3: 0.283, 3e-3: 0.301, 1e-2: 0.699, 3e-2: 0.637},
    'tsvd': {3e-3: 0.508, 1e-2: 0.529, 3e-2: 0.426},
    'dora': {3e-3: 0.816, 1e-2: 0.783, 3e-2: 0.439},
    'ia3': {3e-3: 0.297, 1e-2: 0.314, 3e-2: 0.480, 1e-1: 0.570, 3e-1: 0.471},
    'adapter': {3e-3: 0.277, 1e-2: 0.271, 3e-2: 0.277},
    'low_rank_adapter': {3e-3: 0.279, 1e-2: 0.275, 3e-2: 0.283},
    'bitfit': {3e-3: 0.279, 1e-2: 0.256, 3e-2: 0.248},
    'prefix': {3e-3: 0.590, 1e-2: 0.662, 3e-2: 0.613},
    'prompt': {3e-3: 0.291, 1e-2: 0.314, 3e-2: 0.309},
    'pst': {1e-3: 0.420, 3e-3: 0.717, 1e-2: 0.240, 3e-2: 0.297},
}
LEARNING_RATES = {method: max(scores, key=scores.get) for method, scores in SWEEP_RESULTS.items()}
SWEEP_LRS = [1e-3, 3e-3, 1e-2, 3e-2]
BLOCK_LINEARS = ['q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc_in', 'fc_out']


# ----- data -------------------------------------------------------------------------------------------------------
def make_task(partition, plant, n, seed):
    """``n`` sequences: a class c, ``plant`` tokens from group c of ``partition``, the rest uniform, shuffled."""
    rng = np.random.RandomState(seed)
    group_of = np.arange(VOCAB) % 4 if partition == 'mod' else (np.arange(VOCAB) // 4) % 4
    members = [np.flatnonzero(group_of == g) for g in range(CLASSES)]
    labels = rng.randint(0, CLASSES, n).astype(np.int32)
    ids = rng.randint(0, VOCAB, (n, SEQ))
    for i, label in enumerate(labels):
        ids[i, :plant] = rng.choice(members[label], plant)
        rng.shuffle(ids[i])
    return ids.astype(np.int32), labels


def bayes_accuracy(partition, plant, n=20000, seed=99):
    """Accuracy of the count-argmax rule (ties split): about the best any model can do."""
    ids, labels = make_task(partition, plant, n, seed)
    group_of = np.arange(VOCAB) % 4 if partition == 'mod' else (np.arange(VOCAB) // 4) % 4
    counts = np.stack([(group_of[ids] == g).sum(1) for g in range(CLASSES)], 1)
    best = counts == counts.max(1, keepdims=True)
    return float(np.mean(best[np.arange(n), labels] / best.sum(1)))


# ----- the model (plain MindSpore; a factory decides what each linear layer is) ---------------------------------
def build_model(dense=None, prefix=None, prompt=None):
    """The encoder classifier. ``dense(name, in, out)`` may return a delta Cell for a block linear (name like
    ``attn.q_proj``); ``prefix(block)`` a PrefixLayer per block; ``prompt`` a PromptTuningEmbedding."""
    import mindspore as ms
    from mindspore import nn, ops, Parameter, Tensor
    from mindpet.delta.prefix_layer import concat_prefix

    def linear(name, d_in, d_out):
        layer = dense(name, d_in, d_out) if dense else None
        return layer if layer is not None else nn.Dense(d_in, d_out)

    class Attention(nn.Cell):
        def __init__(self, block):
            super().__init__()
            self.q_proj = linear('attn.q_proj', HIDDEN, HIDDEN)
            self.k_proj = linear('attn.k_proj', HIDDEN, HIDDEN)
            self.v_proj = linear('attn.v_proj', HIDDEN, HIDDEN)
            self.out_proj = linear('attn.out_proj', HIDDEN, HIDDEN)
            self.prefix = prefix(block) if prefix else None
            self.head_dim = HIDDEN // HEADS
            self.scale = 1.0 / float(np.sqrt(self.head_dim))

        def _split(self, x, batch, seq):
            return ops.transpose(ops.reshape(x, (batch, seq, HEADS, self.head_dim)), (0, 2, 1, 3))

        def construct(self, x):
            batch, seq, _ = x.shape
            q = self._split(self.q_proj(x), batch, seq)
            k = self._split(self.k_proj(x), batch, seq)
            v = self._split(self.v_proj(x), batch, seq)
            if self.prefix is not None:
                prefix_key, prefix_value = self.prefix(batch)
                k, v, _ = concat_prefix(prefix_key, prefix_value, k, v)
            probs = ops.softmax(ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * self.scale, axis=-1)
            context = ops.reshape(ops.transpose(ops.matmul(probs, v), (0, 2, 1, 3)), (batch, seq, HIDDEN))
            return self.out_proj(context)

    class MLP(nn.Cell):
        def __init__(self):
            super().__init__()
            self.fc_in = linear('mlp.fc_in', HIDDEN, FFN)
            self.fc_out = linear('mlp.fc_out', FFN, HIDDEN)

        def construct(self, x):
            return self.fc_out(ops.gelu(self.fc_in(x)))

    class Block(nn.Cell):
        def __init__(self, block):
            super().__init__()
            self.ln_1 = nn.LayerNorm((HIDDEN,))
            self.attn = Attention(block)
            self.ln_2 = nn.LayerNorm((HIDDEN,))
            self.mlp = MLP()

        def construct(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class Classifier(nn.Cell):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, HIDDEN)
            self.pos = Parameter(Tensor(np.random.RandomState(1).randn(SEQ, HIDDEN).astype(np.float32) * 0.02),
                                 name='pos')
            self.prompt = prompt
            self.blocks = nn.CellList([Block(b) for b in range(LAYERS)])
            self.ln_f = nn.LayerNorm((HIDDEN,))
            self.classifier = nn.Dense(HIDDEN, CLASSES)
            self.skip = prompt.num_virtual_tokens if prompt is not None else 0

        def construct(self, ids):
            x = self.embed(ids) + self.pos
            if self.prompt is not None:
                x = self.prompt(x)      # virtual tokens in front of the (position-encoded) real ones
            for block in self.blocks:
                x = block(x)
            x = self.ln_f(x)[:, self.skip:, :]
            return self.classifier(ops.mean(x, 1))

    ms.set_seed(0)
    return Classifier()


def loss_cell(net):
    from mindspore import nn, ops

    class _Loss(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.net = net

        def construct(self, ids, labels):
            return ops.cross_entropy(self.net(ids), labels)

    return _Loss()


def accuracy(net, ids, labels):
    from mindspore import Tensor
    net.set_train(False)
    predictions = []
    for start in range(0, len(ids), 256):
        predictions.append(net(Tensor(ids[start:start + 256])).asnumpy().argmax(1))
    return float(np.mean(np.concatenate(predictions) == labels))


# ----- worker processes -------------------------------------------------------------------------------------------
def pretrain(base_path):
    """Full training on task A; saves the base checkpoint."""
    import mindspore as ms
    from mindspore import nn, Tensor
    ms.set_context(mode=ms.GRAPH_MODE, device_target='CPU')
    net = build_model()
    ids, labels = make_task('mod', PRETRAIN_PLANT, TRAIN_N, seed=10)
    step = nn.TrainOneStepCell(loss_cell(net), nn.Adam(net.trainable_params(), learning_rate=1e-3))
    step.set_train()
    rng = np.random.RandomState(11)
    for _ in range(PRETRAIN_STEPS):
        batch = rng.randint(0, TRAIN_N, BATCH)
        step(Tensor(ids[batch]), Tensor(labels[batch]))
    test_ids, test_labels = make_task('mod', PRETRAIN_PLANT, TEST_N, seed=12)
    ms.save_checkpoint(net, base_path)
    return {'pretrain_task_accuracy': accuracy(net, test_ids, test_labels),
            'pretrain_bayes_accuracy': bayes_accuracy('mod', PRETRAIN_PLANT)}


def _load_base(net, base_path, allowed_missing):
    """Load the base checkpoint; everything must load except the method's own (new) parameters."""
    import mindspore as ms
    not_loaded, unused = ms.load_param_into_net(net, ms.load_checkpoint(base_path))
    bad = [name for name in not_loaded if not any(key in name for key in allowed_missing)]
    if bad or unused:
        raise RuntimeError(f"base checkpoint mismatch: not loaded {bad[:5]}, unused {unused[:5]}")


def build_method(method, base_path, steps=STEPS):
    """``(model to call, PetModel or None, extra info)`` with exactly the method's parameters trainable."""
    import mindspore as ms
    from mindpet import (LoraConfig, AdaLoraConfig, TensorSVDConfig, PstConfig,
                         get_pet_model)
    from mindpet.delta import (DoRADense, IA3Dense, AdapterDense, LowRankAdapterDense,
                               PrefixLayer, PromptTuningEmbedding)
    from mindpet.graph import freeze_delta
    f32 = ms.float32
    head = ['classifier']
    configs = {
        'lora': LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=8, lora_alpha=16, modules_to_save=head),
        'adalora': AdaLoraConfig(target_modules=['q_proj', 'v_proj'], init_r=12, target_r=8, lora_alpha=16,
                                 t_init=steps // 10, t_final=steps * 3 // 10, delta_t=10, orth_reg_weight=0.5,
                                 total_step=steps, modules_to_save=head),
        'tsvd': TensorSVDConfig(target_modules=['q_proj', 'v_proj'], tsvd_rank=8, tsvd_alpha=16, target_rank=4,
                                t_init=steps // 10, t_final=steps * 3 // 10, delta_t=10, orth_reg_weight=0.5,
                                total_step=steps, modules_to_save=head),
        'pst': PstConfig(target_modules=BLOCK_LINEARS, r_w=8, r_m=8, final_sparsity=0.9, warmup_fraction=0.1,
                         cooldown_fraction=0.3, total_step=steps, modules_to_save=head),
    }
    if method in configs:
        net = build_model()
        _load_base(net, base_path, [])
        pet = get_pet_model(net, configs[method])
        return pet, pet, {'config': configs[method].to_dict()}

    factories = {
        'dora': lambda name, i, o: (DoRADense(i, o, lora_rank=8, lora_alpha=16, compute_dtype=f32)
                                    if name in ('attn.q_proj', 'attn.v_proj') else None),
        'ia3': lambda name, i, o: (IA3Dense(i, o, compute_dtype=f32) if name in ('attn.k_proj', 'attn.v_proj') else
                                   IA3Dense(i, o, ia3_feedforward=True, compute_dtype=f32)
                                   if name == 'mlp.fc_out' else None),
        'adapter': lambda name, i, o: (AdapterDense(i, o, bottleneck_size=16, compute_dtype=f32)
                                       if name in ('attn.out_proj', 'mlp.fc_out') else None),
        'low_rank_adapter': lambda name, i, o: (LowRankAdapterDense(i, o, reduction_factor=8, low_rank_size=1,
                                                                    compute_dtype=f32)
                                                if name in ('attn.out_proj', 'mlp.fc_out') else None),
    }
    modes = {'dora': 'dora', 'ia3': 'ia3', 'adapter': 'adapter', 'low_rank_adapter': 'low_rank_adapter',
             'bitfit': 'bitfit', 'prefix': 'prefixtuning', 'prompt': 'prompt_tuning'}
    prompt = None
    if method == 'prompt':
        prompt = PromptTuningEmbedding(NUM_VIRTUAL, HIDDEN)
    net = build_model(dense=factories.get(method),
                      prefix=(lambda block: PrefixLayer(NUM_VIRTUAL, BATCH, HEADS, HIDDEN, embed_dim=32, mid_dim=64,
                                                        dropout_rate=0.0)) if method == 'prefix' else None,
                      prompt=prompt)
    _load_base(net, base_path, ['mindpet_delta_', 'mindpet_state_'])
    if method == 'dora':
        for _, cell in net.cells_and_names():
            if isinstance(cell, DoRADense):
                cell.init_magnitude()       # m = row norms of the loaded W0: the layer equals the base at init
    if method == 'prompt':
        # The paper's best initialisation: copies of (here: random) vocabulary embeddings.
        prompt.init_from_vocab(net.embed.embedding_table, list(range(0, VOCAB, VOCAB // NUM_VIRTUAL)))
    if method == 'full':
        pass
    elif method == 'head_only':
        for param in net.get_parameters():
            param.requires_grad = param.name.startswith('classifier.')
    else:
        freeze_delta(net, modes[method], exclude=['classifier.*'])
    return net, None, {}


def run_method(method, base_path, lr, steps=STEPS, with_test=True):
    """Fine-tune on task B; returns the measurements."""
    import mindspore as ms
    from mindspore import nn, Tensor
    from mindpet.utils.io_utils import is_state_param
    ms.set_context(mode=ms.GRAPH_MODE, device_target='CPU')
    model, pet, info = build_method(method, base_path, steps)
    params = [p for p in model.get_parameters() if not is_state_param(p.name)]
    total = sum(int(np.prod(p.shape)) for p in params)
    trainable = sum(int(np.prod(p.shape)) for p in params if p.requires_grad)
    ids, labels = make_task('div', PLANT, TRAIN_N, seed=20)
    val_ids, val_labels = make_task('div', PLANT, VAL_N, seed=21)
    optimizer = nn.Adam(model.trainable_params(), learning_rate=lr)
    hook = pet.training_hook(total_steps=steps) if pet is not None else None
    step = (hook.train_network(loss_cell(model), optimizer) if hook is not None
            else nn.TrainOneStepCell(loss_cell(model), optimizer))
    step.set_train()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rng = np.random.RandomState(22)
    losses, times, cpu_times = [], [], []
    for i in range(steps):
        batch = rng.randint(0, TRAIN_N, BATCH)
        start, cpu_start = time.perf_counter(), time.process_time()
        if hook is not None:
            hook.before_step(i)
        outputs = step(Tensor(ids[batch]), Tensor(labels[batch]))
        if hook is not None:
            hook.after_step(i, outputs)
        loss = float((hook.loss(outputs) if hook is not None else outputs).asnumpy())
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        losses.append(loss)
    peak_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        'method': method, 'label': LABELS[method], 'lr': lr, 'steps': steps, 'trainable': trainable,
        'total': total, 'trainable_share': trainable / total, 'val_accuracy': accuracy(model, val_ids, val_labels),
        'first_step_s': times[0], 'step_ms_median': 1e3 * float(np.median(times[5:])),
        'step_cpu_ms_mean': 1e3 * float(np.mean(cpu_times[5:])),
        'loss_first10': float(np.mean(losses[:10])), 'loss_last10': float(np.mean(losses[-10:])),
        'peak_rss_mb': peak_train, 'rss_before_training_mb': rss_before,
    }
    if with_test:
        test_ids, test_labels = make_task('div', PLANT, TEST_N, seed=23)
        result['test_accuracy'] = accuracy(model, test_ids, test_labels)
    if hook is not None and hasattr(hook, 'rank_pattern'):
        result['rank_pattern'] = hook.rank_pattern()
    if method == 'pst' and with_test:
        result.update(_pst_export_check(pet, test_ids, test_labels, result['test_accuracy'], info))
    result.update(info)
    return result


def _pst_export_check(pet, test_ids, test_labels, acc_unmerged, info):
    """Merge the sparse weights into the model and re-evaluate; count the zeros of every pruned weight."""
    pet.merge()
    zeros = sum(int((layer.weight.asnumpy() == 0).sum()) for layer in pet.pet_layers.values())
    pruned = sum(int(np.prod(layer.weight.shape)) for layer in pet.pet_layers.values())
    acc_merged = accuracy(pet, test_ids, test_labels)
    cfg = info['config']
    # The trainable share PST's per-layer formula gives at BERT-base shapes (12 layers, hidden 768, FFN 3072,
    # 110M parameters), for comparison with the paper's "about 1.5 %".
    per_layer = 4 * _pst_count(768, 768, cfg) + _pst_count(768, 3072, cfg) + _pst_count(3072, 768, cfg)
    return {'pst_zero_share_of_pruned_weights': zeros / pruned, 'pst_pruned_weights': pruned,
            'test_accuracy_after_merge': acc_merged, 'merged_equals_unmerged': acc_merged == acc_unmerged,
            'pst_share_at_bert_base': 12 * per_layer / 110e6}


def _pst_count(d_in, d_out, cfg):
    return (cfg['r_w'] + cfg['r_m']) * (d_in + d_out) + d_in + d_out


# ----- the driver -------------------------------------------------------------------------------------------------
def _child(args_list, timeout=900):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), GLOG_v='3',
               MS_COMPILER_CACHE_ENABLE='0')
    with tempfile.NamedTemporaryFile(suffix='.json', delete=False) as handle:
        out = handle.name
    done = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker', '--out-json', out] + args_list,
                          capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {args_list} failed:\n{done.stderr[-4000:]}")
    with open(out, encoding='utf-8') as handle:
        result = json.load(handle)
    os.unlink(out)
    return result


TABLE_HEAD = ('| method | trainable | trainable share | test accuracy % | step ms (wall) | step CPU ms | CPU vs full | '
              'peak RSS MB | peak RSS vs full | lr |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n')


def write_report(results, meta, md_path, json_path):
    """doc/method_comparison.md (the table and what it shows) and the raw JSON."""
    by = {r['method']: r for r in results}
    full = by['full']
    rows = []
    for r in results:
        rows.append(f"| {r['label']} | {r['trainable']:,} | {100 * r['trainable_share']:.2f} % | "
                    f"{100 * r['test_accuracy']:.1f} | {r['step_ms_median']:.0f} | {r['step_cpu_ms_mean']:.0f} | "
                    f"{r['step_cpu_ms_mean'] / full['step_cpu_ms_mean']:.2f} | {r['peak_rss_mb']:.0f} | "
                    f"{r['peak_rss_mb'] / full['peak_rss_mb']:.2f} | {r['lr']:g} |")
    notes = []
    if 'pst' in by and 'lora' in by:
        pst, lora = by['pst'], by['lora']
        notes.append(
            f"- **PST at 90 % sparsity vs dense LoRA**: {100 * pst['test_accuracy']:.1f} % vs "
            f"{100 * lora['test_accuracy']:.1f} % test accuracy "
            f"({100 * (pst['test_accuracy'] - lora['test_accuracy']):+.1f} points). The exported model has "
            f"{100 * pst['pst_zero_share_of_pruned_weights']:.1f} % zeros in its "
            f"{pst['pst_pruned_weights']:,} pruned block weights (all six linear layers of every block); with the "
            f"sparse weights merged in, the test accuracy is {100 * pst['test_accuracy_after_merge']:.1f} %. PST "
            f"trains {100 * pst['trainable_share']:.1f} % of this toy model's parameters: at hidden size 128 its "
            f"per-layer cost `(r_w + r_m)(in + out) + in + out` with r_w = r_m = 8 is large. The same configuration "
            f"at BERT-base shapes (12 layers, hidden 768, FFN 3072, 110M parameters) trains "
            f"{100 * pst['pst_share_at_bert_base']:.1f} % (the paper reports about 1.5 %). Its step costs "
            f"{pst['step_cpu_ms_mean'] / lora['step_cpu_ms_mean']:.1f}x LoRA's CPU time (a per-layer sort of the "
            f"importance scores every step) and its peak memory is the highest "
            f"({pst['peak_rss_mb'] - full['peak_rss_mb']:+.0f} MB vs full fine-tuning: scores, masks and their "
            f"gradients for every pruned weight).")
    for key in ('adalora', 'tsvd'):
        if key in by and 'rank_pattern' in by[key]:
            r = by[key]
            notes.append(f"- **{r['label']}**: final ranks {r['rank_pattern']} (sum "
                         f"{sum(r['rank_pattern'].values())}).")
    chance = [by[m]['label'] for m in by if by[m]['test_accuracy'] < 0.35]
    if chance:
        notes.append(
            "- **Near chance (25 %)**: " + ", ".join(chance) + ". Their training loss stays on the plateau at ln 4 "
            "(see `loss_last10` in the JSON) for the whole budget at every learning rate tried. The task needs new "
            "per-token features (another partition of the vocabulary) that the frozen base, specialised on task A, "
            "does not provide: measured separately with this script's model and base (200 steps, lr 1e-3), fully "
            "training the `out_proj` and `fc_out` weights of every block (where the adapters sit) still ends on "
            "the plateau (loss 1.33), training `v_proj` leaves it after ~140 steps (0.96) and training only the "
            "token embeddings solves the task at once (0.36). So on this task the methods that change the token "
            "features before they are mixed (LoRA/DoRA/AdaLoRA/t-SVD on `v_proj`, PST, prefix keys/values, full "
            "fine-tuning) do best, and those that act on sub-layer outputs, train biases only or only prepend "
            "tokens stay near chance within this budget; this says more about the task than about these methods "
            "in general.")
    text = f"""# Method comparison on one small task

Generated by `PYTHONPATH=. python scripts/compare_methods.py` ({meta['wall_s']:.0f} s wall; {meta['machine']};
load average {meta['load_start']:.1f} at the start, {meta['load_end']:.1f} at the end: the machine was shared
with other jobs). Raw numbers: [method_comparison.json](method_comparison.json).

**Task.** A 4-block transformer encoder classifier (hidden 128, 4 heads, feed-forward 256, vocabulary 64, 16 tokens,
mean pooling, {full['total']:,} parameters) is pre-trained by full training on task A: which of 4 token groups
(`t % 4`) was planted 5 times in a random sequence (test accuracy {100 * meta['pretrain_task_accuracy']:.1f} %,
best possible {100 * meta['pretrain_bayes_accuracy']:.1f} %). Every method then fine-tunes that base for
{full['steps']} steps (batch {BATCH}, Adam, GRAPH_MODE, CPU) on task B: the same question for another partition of
the vocabulary (`(t // 4) % 4`) with 4 planted tokens; the best possible accuracy is
{100 * meta['bayes_accuracy']:.1f} % (the count-argmax rule, ties counted as chance), chance is 25 %. The classifier
head trains with every method. Each method runs in its own process. Learning rates: picked per method by validation
accuracy on {VAL_N} validation sequences (`--sweep`; the grid per method is in the JSON's `meta.sweep`). Test
accuracy is measured on {TEST_N} other held-out sequences.

""" + TABLE_HEAD + "\n".join(rows) + f"""

- *trainable share*: trainable parameters over all parameters of the model as the method runs it (its own
  parameters included; PST's and the adapters' frozen base weights count in "all").
- *step ms (wall)*: median wall time of a training step after compilation, including the method's host-side work
  per step (PST's sparsity schedule; AdaLoRA's and t-SVD's importance scores and masking, which copy the adapter's
  gradients to the host every step). *step CPU ms*: mean process CPU time per step (all threads), less sensitive to
  the other jobs on the machine than wall time; *CPU vs full* is its ratio to full fine-tuning.
- *peak RSS*: the process's peak resident memory (`ru_maxrss`). MindSpore itself takes about 0.4 GB after import, so
  at this model size relative differences are small; full fine-tuning keeps Adam moments for all parameters
  (~{2 * 4 * full['total'] / 2 ** 20:.1f} MB here), the other methods for their trainable ones only.

What it shows:

""" + "\n".join(notes) + "\n"
    with open(md_path, 'w', encoding='utf-8') as handle:
        handle.write(text)
    with open(json_path, 'w', encoding='utf-8') as handle:
        json.dump({'meta': meta, 'results': results}, handle, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--methods', nargs='+', default=METHODS, choices=METHODS)
    parser.add_argument('--out-md', default=os.path.join(ROOT, 'doc', 'method_comparison.md'))
    parser.add_argument('--out-json', default=os.path.join(ROOT, 'doc', 'method_comparison.json'))
    parser.add_argument('--workdir', default=None, help='where the base checkpoint goes (default: a temp dir)')
    parser.add_argument('--sweep', action='store_true', help='print validation accuracy per learning rate')
    parser.add_argument('--lrs', nargs='+', type=float, default=SWEEP_LRS, help='the learning rates of --sweep')
    parser.add_argument('--steps', type=int, default=STEPS)
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--method', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--lr', type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument('--base', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--no-test', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        if args.method == 'pretrain':
            result = pretrain(args.base)
        else:
            result = run_method(args.method, args.base, args.lr, steps=args.steps, with_test=not args.no_test)
        with open(args.out_json, 'w', encoding='utf-8') as handle:
            json.dump(result, handle)
        return 0

    start, load_start = time.time(), os.getloadavg()[0]
    workdir = args.workdir or tempfile.mkdtemp(prefix='mindpet-compare-')
    os.makedirs(workdir, exist_ok=True)
    base = os.path.join(workdir, 'base.ckpt')
    meta = _child(['--method', 'pretrain', '--base', base])
    print(f"pretrained: task A accuracy {meta['pretrain_task_accuracy']:.3f}", flush=True)
    if args.sweep:
        for method in args.methods:
            scores = {lr: _child(['--method', method, '--base', base, '--lr', str(lr), '--steps', str(args.steps),
                                  '--no-test'])['val_accuracy'] for lr in args.lrs}
            best = max(scores, key=scores.get)
            print(f"{method}: " + ", ".join(f"{lr:g}: {acc:.3f}" for lr, acc in scores.items()) + f" -> {best:g}",
                  flush=True)
        return 0
    results = []
    for method in args.methods:
        result = _child(['--method', method, '--base', base, '--lr', str(LEARNING_RATES[method]),
                         '--steps', str(args.steps)])
        print(f"{method}: test {result['test_accuracy']:.3f} share {result['trainable_share']:.4f} "
              f"step {result['step_ms_median']:.1f} ms peak {result['peak_rss_mb']:.0f} MB "
              f"({time.time() - start:.0f} s so far)", flush=True)
        results.append(result)
    meta.update({'bayes_accuracy': bayes_accuracy('div', PLANT), 'wall_s': time.time() - start,
                 'load_start': load_start, 'load_end': os.getloadavg()[0],
                 'machine': f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}",
                 'sweep': {m: {f'{lr:g}': acc for lr, acc in SWEEP_RESULTS[m].items()} for m in args.methods}})
    if 'full' in args.methods:
        write_report(results, meta, args.out_md, args.out_json)
        print(f"wrote {args.out_md} and {args.out_json}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
