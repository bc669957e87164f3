#!/usr/bin/env python
"""Benchmark suite for mindpet: what parameter-efficient tuning promises (step time, memory, checkpoint size,
switching time, inference overhead), measured side by side in one run and reported as ratios.

    PYTHONPATH=. python scripts/benchmark.py                  # CPU, parts train/train_ab/forward/layer/ckpt/
                                                              #   switch/reference
    PYTHONPATH=. python scripts/benchmark.py --parts switch   # only set_adapter/merge() vs a forward pass
    PYTHONPATH=. python scripts/benchmark.py --peers          # + Hugging Face PEFT on PyTorch (own venv)
    PYTHONPATH=. python scripts/benchmark.py --device Ascend  # MindSpore parts on Ascend

Prints a markdown table, writes JSON (``--json``, default ``doc/benchmarks.json``) and rewrites the results block
of ``doc/benchmarks.md`` (between its BEGIN/END markers; the hand-written analysis around it is kept).

Every measurement runs in a child process (``--worker KIND``), so peak memory is per process and one variant's
compiled graphs and allocator state cannot leak into another's timing. Variants are interleaved over
``--repeats`` rounds and each figure is a median, because the machines this runs on are shared and noisy.

Adding a variant is one entry in ``TRAIN_VARIANTS`` (training step and memory) and, for the forward timing, in
``FORWARD_GROUPS``: the entry names the function that turns the base model into that variant and the virtualenv
its process runs in. The reference (MindPet 1.0.4) and the peer (PEFT on PyTorch) run in their own virtualenvs
under ``.bench/``, created on first use.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, '.bench')
RESULT_TAG = '@@BENCH_RESULT '
DOC_BEGIN = '<!-- BEGIN BENCHMARK RESULTS (written by scripts/benchmark.py) -->'
DOC_END = '<!-- END BENCHMARK RESULTS -->'

# The GPT-like model of part 1 (GPT-2-small with 6 blocks) and GPT-2 small itself for the checkpoint sizes.
GPT = dict(layers=6, hidden=768, heads=12, vocab=50257, positions=1024, batch=4, seq=64)
GPT2_SMALL = dict(layers=12, hidden=768, heads=12, vocab=50257, positions=1024)
LORA = dict(rank=8, alpha=16, targets=('q', 'v'))
# Houlsby adapters after each block's attention output and feed-forward output (paths inside a block).
ADAPTER = dict(bottleneck=64, targets=('attn.o', 'fc2'))
# Prefix tuning with the paper's reparametrisation MLP (PrefixTuningConfig's default mid_dim); no dropout.
PREFIX = dict(tokens=10, mid_dim=512)
# Part 4 (switching and merging) runs GPT-2 small on one sequence of this many tokens.
SWITCH_INPUT = dict(batch=1, seq=128)
LAYER = dict(in_channels=1024, out_channels=1024, shape=(8, 128, 1024))
QUICK = dict(gpt=dict(layers=2, hidden=128, heads=4, vocab=1000, positions=64, batch=2, seq=16),
             gpt2=dict(layers=2, hidden=128, heads=4, vocab=1000, positions=64),
             layer=dict(in_channels=128, out_channels=128, shape=(2, 16, 128)),
             switch_input=dict(batch=1, seq=16))

# Virtualenvs: 'main' is the interpreter running this script; the others are created under .bench/ when needed.
MINDSPORE_PIN = 'mindspore==2.10.0'
VENVS = {
    'mindpet104': ['numpy<2', MINDSPORE_PIN, 'pyyaml', '--no-deps mindpet==1.0.4'],
    'peft': ['torch==2.13.0', 'numpy<2', 'peft'],
}

# name -> how its training process is built: env (virtualenv), apply (function turning the base model into the
# variant; 'torch_*' functions run on PyTorch), base (the variant its ratios are taken to: the full fine-tuning run in
# the same virtualenv, since the runtimes' baseline memory differs), label (the table's wording), group (the part or
# option that selects it).
TRAIN_VARIANTS = {
    'full': dict(env='main', apply='apply_full', base='full', label='full fine-tuning', group='train'),
    'lora': dict(env='main', apply='apply_lora', base='full', label='LoRA r=8 on q,v (mindpet)', group='train'),
    'adapter': dict(env='main', apply='apply_adapter', base='full', group='train',
                    label='Adapter (Houlsby, bottleneck 64 after attention and FFN outputs)'),
    'bitfit': dict(env='main', apply='apply_bitfit', base='full', label='BitFit (biases only)', group='train'),
    'prefix': dict(env='main', apply='apply_prefix', base='full', group='train',
                   label='prefix tuning (10 virtual tokens per block, MLP 512)'),
    'floor': dict(env='main', apply='apply_floor', base='full', group='train',
                  label='floor: all frozen but block 0 LayerNorm (no weight grads, full data backward)'),
    'full_mindpet104': dict(env='mindpet104', apply='apply_full', base='full_mindpet104',
                            label='full fine-tuning (MindPet 1.0.4 venv)', group='reference'),
    'lora_mindpet104': dict(env='mindpet104', apply='apply_lora_mindpet104', base='full_mindpet104',
                            label='LoRA r=8 on q,v (MindPet 1.0.4 LoRADense)', group='reference'),
    'peft_full': dict(env='peft', apply='torch_full', base='peft_full', label='PyTorch full fine-tuning',
                      group='peers'),
    'peft_lora': dict(env='peft', apply='torch_lora', base='peft_full', label='PyTorch + PEFT LoRA r=8 on q,v',
                      group='peers'),
}
# One forward worker per group: its variants are built in one process and timed interleaved; the first is the base.
FORWARD_GROUPS = {
    'train': dict(env='main', variants=['full', 'lora', 'adapter', 'bitfit', 'prefix']),
    'reference': dict(env='mindpet104', variants=['full', 'lora', 'lora_mindpet104']),
    'peers': dict(env='peft', variants=['peft_full', 'peft_lora']),
}
# Training steps of several variants built in one process and stepped in turn: each round's ratio compares steps
# taken seconds apart under the same load, which per-process runs cannot (their memory figures need them, though).
TRAIN_AB_GROUPS = {
    'train': dict(env='main', variants=['full', 'lora', 'adapter', 'bitfit', 'prefix', 'floor']),
    'reference': dict(env='mindpet104', variants=['lora_mindpet104', 'lora', 'floor']),
    'peers': dict(env='peft', variants=['peft_full', 'peft_lora']),
}
PARTS = ('train', 'train_ab', 'forward', 'layer', 'ckpt', 'switch', 'reference')


# ===================================================================================================== helpers
def _median(values):
    return statistics.median(values) if values else float('nan')


def _peak_rss_mb():
    """Peak resident memory of this process so far (ru_maxrss, KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mb(field):
    """A memory field of /proc/self/status (VmHWM, RssAnon, RssFile, ...) in MB, or None."""
    try:
        with open('/proc/self/status', encoding='utf-8') as fh:
            for line in fh:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _memory_figures():
    """Peak RSS, and the peak without file-backed pages (shared libraries): VmHWM - RssFile - RssShmem.

    The file-backed part depends on how much of MindSpore's libraries other processes keep in the page cache
    (fault-around maps cached neighbours), which differs by ~100 MB between two virtualenvs of the same wheel;
    the anonymous part is what the framework allocated: weights, gradients, optimizer state, activations, graphs.
    """
    peak = _peak_rss_mb()
    hwm, rss_file, rss_shmem = _status_mb('VmHWM'), _status_mb('RssFile'), _status_mb('RssShmem')
    anon = hwm - rss_file - (rss_shmem or 0.0) if hwm is not None and rss_file is not None else None
    return dict(peak_mb=peak, peak_anon_mb=anon, rss_file_mb=rss_file)


def _interleaved(funcs, iterations, warmup=1):
    """Time each callable ``iterations`` times, alternating between them.

    Returns (wall, cpu): name -> list of seconds of wall-clock time and of CPU time of this process (all threads).
    On a shared machine wall time includes the time other processes held the cores; CPU time does not.
    """
    for _ in range(warmup):
        for fn in funcs.values():
            fn()
    wall = {name: [] for name in funcs}
    cpu = {name: [] for name in funcs}
    for _ in range(iterations):
        for name, fn in funcs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def _timed(funcs, iterations):
    """Interleaved timing; name -> median seconds as {'time_s': name -> wall, 'cpu_s': name -> CPU}."""
    wall, cpu = _interleaved(funcs, iterations)
    return dict(time_s={n: _median(t) for n, t in wall.items()}, cpu_s={n: _median(t) for n, t in cpu.items()})


# ============================================================================================ MindSpore models
def _ms_setup(cfg):
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target=cfg.get('device', 'CPU'))
    ms.set_seed(0)
    return ms


def _ms_sync(ms, cfg):
    # CPU graph execution returns after the graph has run; devices run asynchronously and need a barrier.
    if cfg.get('device', 'CPU') != 'CPU':
        ms.runtime.synchronize()


def build_gpt(cfg):
    """A GPT-2-style decoder in MindSpore: tied token embedding, learned positions, pre-LayerNorm blocks whose
    attention has separate ``q``/``k``/``v``/``o`` Dense layers (the names LoRA targets).

    Each attention takes an optional prefix (``attn.prefix``, None in the base model: the branch is then compiled
    out, so every variant runs the same base graph), wired as doc/prefix_tuning.md describes for attention that is
    not a ``PrefixAttention``: ``concat_prefix`` prepends its keys and values, and the additive causal mask gets
    zero (visible) columns for them."""
    import numpy as np
    import mindspore as ms
    from mindspore import nn, ops, Parameter, Tensor
    from mindspore.common.initializer import initializer, Normal
    from mindpet.delta.prefix_layer import concat_prefix

    hidden, heads = cfg['hidden'], cfg['heads']

    class Attention(nn.Cell):
        def __init__(self):
            super().__init__()
            self.heads, self.head_dim = heads, hidden // heads
            self.q, self.k = nn.Dense(hidden, hidden), nn.Dense(hidden, hidden)
            self.v, self.o = nn.Dense(hidden, hidden), nn.Dense(hidden, hidden)
            self.scale = 1.0 / float(np.sqrt(hidden // heads))
            self.prefix = None

        def construct(self, x, mask):
            b, s, _ = x.shape
            q = self.q(x).reshape(b, s, self.heads, self.head_dim).transpose(0, 2, 1, 3)
            k = self.k(x).reshape(b, s, self.heads, self.head_dim).transpose(0, 2, 3, 1)
            v = self.v(x).reshape(b, s, self.heads, self.head_dim).transpose(0, 2, 1, 3)
            if self.prefix is not None:
                prefix_key, prefix_value = self.prefix(b)
                k, v, _ = concat_prefix(prefix_key, prefix_value, k, v, key_transposed=True)
                visible = ops.zeros(mask.shape[:-1] + (prefix_key.shape[2],), mask.dtype)
                mask = ops.concat((visible, mask), -1)
            att = ops.softmax(ops.matmul(q, k) * self.scale + mask, -1)
            out = ops.matmul(att, v).transpose(0, 2, 1, 3).reshape(b, s, hidden)
            return self.o(out)

    class Block(nn.Cell):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm((hidden,)), nn.LayerNorm((hidden,))
            self.attn = Attention()
            self.fc1, self.fc2 = nn.Dense(hidden, 4 * hidden), nn.Dense(4 * hidden, hidden)

        def construct(self, x, mask):
            x = x + self.attn(self.ln1(x), mask)
            return x + self.fc2(ops.gelu(self.fc1(self.ln2(x))))

    class GPT(nn.Cell):
        def __init__(self):
            super().__init__()
            self.wte = Parameter(initializer(Normal(0.02), (cfg['vocab'], hidden), ms.float32), name='wte')
            self.wpe = Parameter(initializer(Normal(0.01), (cfg['positions'], hidden), ms.float32), name='wpe')
            self.blocks = nn.CellList([Block() for _ in range(cfg['layers'])])
            self.ln_f = nn.LayerNorm((hidden,))
            self.head = ops.MatMul(transpose_b=True)
            seq = cfg.get('seq', cfg['positions'])
            causal = np.triu(np.full((seq, seq), -1e4, np.float32), 1)[None, None]
            self.mask = Tensor(causal)

        def construct(self, ids):
            b, s = ids.shape
            x = ops.gather(self.wte, ids, 0) + self.wpe[:s]
            mask = self.mask[:, :, :s, :s]
            for block in self.blocks:
                x = block(x, mask)
            x = self.ln_f(x).reshape(b * s, hidden)
            return self.head(x, self.wte)

    return GPT()


def _ms_loss_cell(net):
    from mindspore import nn, ops

    class LMLoss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.net = net
            # The fused sparse softmax-cross-entropy kernel: ops.cross_entropy's composed log-softmax spends ~15%
            # of a LoRA step in ReduceMax and its gradient on a 50257-word vocabulary.
            self.loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction='mean')

        def construct(self, ids, labels):
            return self.loss(self.net(ids), labels.reshape(-1))

    return LMLoss()


def _ms_batch(cfg):
    import numpy as np
    import mindspore as ms
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg['vocab'], size=(cfg['batch'], cfg['seq'] + 1))
    return ms.Tensor(ids[:, :-1].astype(np.int32)), ms.Tensor(ids[:, 1:].astype(np.int32))


def _replace_in_blocks(net, paths, make_cell):
    """Set ``make_cell(old)`` at each of ``paths`` (dotted, inside a block; the old Cell or None) in every block,
    before the first compile."""
    for block in net.blocks:
        for path in paths:
            *parents, name = path.split('.')
            holder = block
            for part in parents:
                holder = getattr(holder, part)
            setattr(holder, name, make_cell(getattr(holder, name)))
    # A Cell set after construction names its parameters relative to its parent only; give them full paths.
    for path, param in net.parameters_and_names():
        param.name = path


def _replace_qv(net, make_layer):
    """Swap each block's attention ``q``/``v`` Dense for ``make_layer(dense)`` (before the first compile)."""
    _replace_in_blocks(net, [f'attn.{name}' for name in LORA['targets']], make_layer)


def _dense_init(dense):
    from mindspore import Tensor
    return dict(weight_init=Tensor(dense.weight.asnumpy()), bias_init=Tensor(dense.bias.asnumpy()))


# ----- variants (each turns the base model into the variant and sets what trains) -----------------------------
def apply_full(net, cfg):
    return net


def apply_lora(net, cfg):
    import mindspore as ms
    from mindpet.delta import LoRADense
    from mindpet.graph import freeze_delta
    _replace_qv(net, lambda d: LoRADense(d.in_channels, d.out_channels, LORA['rank'], LORA['alpha'],
                                         compute_dtype=ms.float32, **_dense_init(d)))
    freeze_delta(net, 'lora')
    return net


def apply_adapter(net, cfg):
    import mindspore as ms
    from mindpet.delta import AdapterDense
    from mindpet.graph import freeze_delta
    _replace_in_blocks(net, ADAPTER['targets'], lambda d: AdapterDense(
        d.in_channels, d.out_channels, bottleneck_size=ADAPTER['bottleneck'], non_linearity='gelu',
        compute_dtype=ms.float32, **_dense_init(d)))
    freeze_delta(net, 'adapter')
    return net


def apply_prefix(net, cfg):
    from mindpet.delta import PrefixLayer
    from mindpet.graph import freeze_delta
    model = cfg['model']
    _replace_in_blocks(net, ['attn.prefix'], lambda _: PrefixLayer(
        PREFIX['tokens'], model['batch'], model['heads'], model['hidden'], embed_dim=model['hidden'],
        mid_dim=PREFIX['mid_dim'], dropout_rate=0.0))
    freeze_delta(net, 'prefixtuning')
    return net


def apply_floor(net, cfg):
    """Everything frozen except the first block's LayerNorm: the backward still runs through every block (data
    gradients) but computes no weight gradient, so this is the step time an additive method cannot beat."""
    for name, param in net.parameters_and_names():
        param.requires_grad = name.startswith('blocks.0.ln1.')
    return net


def apply_bitfit(net, cfg):
    from mindpet.graph import freeze_delta
    freeze_delta(net, 'bitfit')
    return net


def apply_lora_mindpet104(net, cfg):
    import mindspore as ms
    ref = load_mindpet104_lora()
    _replace_qv(net, lambda d: ref.LoRADense(d.in_channels, d.out_channels, LORA['rank'], LORA['alpha'],
                                             compute_dtype=ms.float32, **_dense_init(d)))
    for param in net.get_parameters():
        param.requires_grad = 'mindpet_delta_lora' in param.name
    return net


def load_mindpet104_lora():
    """MindPet 1.0.4's ``lora`` module, loaded by file path from the installed package.

    Its package ``__init__`` needs MindFormers, and its name clashes with ours, so its three dependencies are
    loaded as ``_mindpet104.*`` and aliased under the ``mindpet.*`` names the module imports, only while it loads.
    """
    import importlib
    import importlib.util
    import types
    spec = importlib.util.find_spec('mindpet')
    roots = [p for p in sys.path if os.path.isfile(os.path.join(p, 'mindpet', 'mindpet_sdk.py'))]
    if not roots:
        raise RuntimeError(f"MindPet 1.0.4 is not installed in this interpreter ({sys.executable}); found "
                           f"{spec.origin if spec else None}.")
    pkg_dir = os.path.join(roots[0], 'mindpet')
    if '_mindpet104.delta.lora' in sys.modules:
        return sys.modules['_mindpet104.delta.lora']
    for name, sub in (('_mindpet104', ''), ('_mindpet104.utils', 'utils'), ('_mindpet104.layers', 'layers'),
                      ('_mindpet104.delta', 'delta')):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(pkg_dir, sub) if sub else pkg_dir]
        sys.modules[name] = module
    aliases = {'mindpet.delta.delta_constants': '_mindpet104.delta.delta_constants',
               'mindpet.utils.version_control': '_mindpet104.utils.version_control',
               'mindpet.layers.activation': '_mindpet104.layers.activation'}
    saved = {alias: sys.modules.get(alias) for alias in aliases}
    try:
        for alias, real in aliases.items():
            sys.modules[alias] = importlib.import_module(real)
        return importlib.import_module('_mindpet104.delta.lora')
    finally:
        for alias, module in saved.items():
            if module is None:
                sys.modules.pop(alias, None)
            else:
                sys.modules[alias] = module


def _ms_variant(name, cfg):
    net = build_gpt(cfg['model'])
    return globals()[TRAIN_VARIANTS[name]['apply']](net, cfg)


# ============================================================================================ MindSpore workers
def worker_train(cfg):
    """One training process: build the variant, run steps of AdamWeightDecay in GRAPH_MODE, time and measure."""
    ms = _ms_setup(cfg)
    from mindspore import nn
    phases = dict(imported=_peak_rss_mb())
    start = time.perf_counter()
    net = _ms_variant(cfg['variant'], cfg)
    phases['built'] = _peak_rss_mb()
    params = net.trainable_params()
    total = sum(p.size for p in net.get_parameters())
    trainable = sum(p.size for p in params)
    opt = nn.AdamWeightDecay(params, learning_rate=1e-4, weight_decay=0.01)
    train = nn.TrainOneStepCell(_ms_loss_cell(net), opt)
    train.set_train(True)
    ids, labels = _ms_batch(cfg['model'])
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    train.compile(ids, labels)
    phases['compiled'] = _peak_rss_mb()
    loss_first = float(train(ids, labels).asnumpy())
    compile_s = time.perf_counter() - start
    phases['first_step'] = _peak_rss_mb()
    for _ in range(cfg['warmup']):
        train(ids, labels)
    _ms_sync(ms, cfg)
    times, cpu = [], []
    for _ in range(cfg['steps']):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = train(ids, labels)
        _ms_sync(ms, cfg)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    result = dict(step_s=_median(times), step_cpu_s=_median(cpu), step_times=times, step_cpu_times=cpu,
                  build_s=build_s, compile_s=compile_s, rss_phases=phases, **_memory_figures(),
                  trainable=trainable, total=total, loss_first=loss_first, loss_last=float(loss.asnumpy()))
    if cfg.get('device', 'CPU') != 'CPU':
        result['device_peak_mb'] = ms.runtime.max_memory_allocated() / 2 ** 20
    return result


def worker_train_ab(cfg):
    """Training steps of several variants in one process, interleaved (see TRAIN_AB_GROUPS)."""
    ms = _ms_setup(cfg)
    from mindspore import nn
    ids, labels = _ms_batch(cfg['model'])
    funcs = {}
    for name in cfg['variants']:
        net = _ms_variant(name, cfg)
        opt = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-4, weight_decay=0.01)
        train = nn.TrainOneStepCell(_ms_loss_cell(net), opt)
        train.set_train(True)
        train(ids, labels)

        def run(train=train):
            train(ids, labels)
            _ms_sync(ms, cfg)
        funcs[name] = run
    wall, cpu = _interleaved(funcs, cfg['steps'], warmup=cfg['warmup'])
    return dict(time_s={n: _median(t) for n, t in wall.items()}, cpu_s={n: _median(t) for n, t in cpu.items()},
                paired_cpu={n: _median([a / b for a, b in zip(cpu[n], cpu[cfg['variants'][0]])]) for n in cpu})


def worker_forward(cfg):
    """Forward (inference) time of several variants built in one process, timed interleaved."""
    ms = _ms_setup(cfg)
    ids, _ = _ms_batch(cfg['model'])
    funcs = {}
    for name in cfg['variants']:
        net = _ms_variant(name, cfg)
        net.set_train(False)
        net(ids)

        def run(net=net):
            net(ids)
            _ms_sync(ms, cfg)
        funcs[name] = run
    timed = _timed(funcs, cfg['iterations'])
    return dict(forward_s=timed['time_s'], forward_cpu_s=timed['cpu_s'])


def _grad_cell(net, weights):
    """A Cell returning the gradients of ``net``'s (summed) output w.r.t. its input and ``weights``."""
    from mindspore import nn, ops, ParameterTuple

    class Grad(nn.Cell):
        def __init__(self):
            super().__init__()
            self.net = net
            self.weights = ParameterTuple(weights) if weights else None
            self.grad = ops.GradOperation(get_all=True, get_by_list=bool(weights))

        def construct(self, x):
            if self.weights is None:
                return self.grad(self.net)(x)
            return self.grad(self.net, self.weights)(x)

    return Grad()


def _layer_inputs(cfg, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    lay = cfg['layer']
    cin, cout = lay['in_channels'], lay['out_channels']
    return dict(x=rng.standard_normal(lay['shape']).astype(np.float32),
                w=(rng.standard_normal((cout, cin)) / np.sqrt(cin)).astype(np.float32),
                b=rng.standard_normal(cout).astype(np.float32) * 0.1,
                a=(rng.standard_normal((LORA['rank'], cin)) / np.sqrt(cin)).astype(np.float32),
                bb=rng.standard_normal((cout, LORA['rank'])).astype(np.float32) * 0.1)


def _make_lora(cls, arrays, compute_dtype, freeze=True):
    from mindspore import Tensor
    lay_in, lay_out = arrays['w'].shape[1], arrays['w'].shape[0]
    layer = cls(lay_in, lay_out, LORA['rank'], LORA['alpha'], compute_dtype=compute_dtype,
                weight_init=Tensor(arrays['w']), bias_init=Tensor(arrays['b']),
                lora_a_init=Tensor(arrays['a']), lora_b_init=Tensor(arrays['bb']))
    if freeze:
        layer.weight.requires_grad = False
        layer.bias.requires_grad = False
    return layer


def worker_layer(cfg):
    """Part 2: LoRADense(r=8) against nn.Dense of the same size, unmerged, merged in place, and to_dense()."""
    import numpy as np
    ms = _ms_setup(cfg)
    from mindspore import nn, Tensor
    from mindpet.delta import LoRADense
    arr = _layer_inputs(cfg)
    x = Tensor(arr['x'])
    dense = nn.Dense(arr['w'].shape[1], arr['w'].shape[0], weight_init=Tensor(arr['w']),
                     bias_init=Tensor(arr['b']))
    lora = _make_lora(LoRADense, arr, ms.float32)
    merged = _make_lora(LoRADense, arr, ms.float32)
    unmerged_out = merged(x).asnumpy()          # compile first, then merge inside the compiled graph
    merged.merge()
    merged_out = merged(x).asnumpy()
    plain = lora.to_dense()
    fwd = {'dense': dense, 'lora': lora, 'lora_merged_in_place': merged, 'lora_to_dense': plain}
    bwd = {'dense_full_grad': _grad_cell(dense, dense.trainable_params()),
           'dense_input_grad': _grad_cell(dense, None),
           'lora_grad': _grad_cell(lora, lora.trainable_params())}
    funcs = {}
    for prefix, cells in (('fwd', fwd), ('fwdbwd', bwd)):
        for name, cell in cells.items():
            cell(x)

            def run(cell=cell):
                cell(x)
                _ms_sync(ms, cfg)
            funcs[f'{prefix}:{name}'] = run
    return dict(_timed(funcs, cfg['iterations']),
                merge_max_abs_diff=float(np.max(np.abs(unmerged_out - merged_out))))


def worker_reference(cfg):
    """Part 5: MindPet 1.0.4's LoRADense against ours, same shapes and dtypes, forward and forward+backward."""
    ms = _ms_setup(cfg)
    from mindspore import Tensor
    from mindpet.delta import LoRADense
    ref = load_mindpet104_lora()
    arr = _layer_inputs(cfg)
    x = Tensor(arr['x'])
    funcs, outputs = {}, {}
    for dtype_name in cfg['dtypes']:
        dtype = getattr(ms, dtype_name)
        for who, cls in (('ours', LoRADense), ('mindpet104', ref.LoRADense)):
            layer = _make_lora(cls, arr, dtype)
            outputs[f'{who}:{dtype_name}'] = layer(x).asnumpy()
            for kind, cell in (('fwd', layer), ('fwdbwd', _grad_cell(layer, layer.trainable_params()))):
                cell(x)

                def run(cell=cell):
                    cell(x)
                    _ms_sync(ms, cfg)
                funcs[f'{kind}:{dtype_name}:{who}'] = run
    diffs = {d: float(abs(outputs[f'ours:{d}'] - outputs[f'mindpet104:{d}']).max()) for d in cfg['dtypes']}
    return dict(_timed(funcs, cfg['iterations']), max_abs_diff=diffs)


def worker_ckpt(cfg):
    """Part 3: adapter-only checkpoint vs full checkpoint of GPT-2 small with LoRA r=8 on q and v."""
    _ms_setup(cfg)
    from mindpet.graph.ckpt_util import save_trainable_params
    from mindpet.utils.io_utils import atomic_save_checkpoint
    net = apply_lora(build_gpt(cfg['model']), cfg)
    all_params = list(net.get_parameters())
    trainable = net.trainable_params()
    raw_full = sum(p.size * p.itemsize for p in all_params)
    raw_adapter = sum(p.size * p.itemsize for p in trainable)
    result = dict(params_total=sum(p.size for p in all_params), params_adapter=sum(p.size for p in trainable),
                  raw_full_bytes=raw_full, raw_adapter_bytes=raw_adapter, files={})
    with tempfile.TemporaryDirectory(prefix='mindpet-bench-') as tmp:
        for fmt in ('ckpt', 'safetensors'):
            full_path = os.path.join(tmp, f'full.{fmt}')
            adapter_path = os.path.join(tmp, f'adapter.{fmt}')
            start = time.perf_counter()
            atomic_save_checkpoint(all_params, full_path, ckpt_format=fmt)
            full_s = time.perf_counter() - start
            start = time.perf_counter()
            save_trainable_params(net, adapter_path)
            adapter_s = time.perf_counter() - start
            result['files'][fmt] = dict(full_bytes=os.path.getsize(full_path),
                                        adapter_bytes=os.path.getsize(adapter_path),
                                        full_save_s=full_s, adapter_save_s=adapter_s)
    return result


def _ms_ops(samples, forward_ms):
    """name -> (wall, CPU) seconds lists -> ms figures, with the medians as multiples of the forward pass's."""
    table = {}
    for name, (wall, cpu) in samples.items():
        wall_ms, cpu_ms = [t * 1e3 for t in wall], [t * 1e3 for t in cpu]
        table[name] = dict(median_ms=_median(wall_ms), min_ms=min(wall_ms), max_ms=max(wall_ms),
                           cpu_ms=_median(cpu_ms), x_forward=_median(wall_ms) / forward_ms['wall'],
                           cpu_x_forward=_median(cpu_ms) / forward_ms['cpu'], n=len(wall_ms))
    return table


def worker_switch(cfg):
    """Part 4: ``set_adapter`` between two LoRA adapters (r=8 on q, v) of a compiled PetModel, and ``merge()`` /
    ``unmerge()``, against one forward pass of the same model, on GPT-2-small shapes in GRAPH_MODE.

    Adapters 'a' and 'b' are trainable (switching away from one first copies its live tensors back to the store);
    'c' and 'd' are the same two loaded back from disk for inference (``is_trainable=False``: no copy back). The
    outputs are checked: switching gives the other adapter's output (equal, to 1e-5, to a freshly built model that
    loaded only that adapter), switching back gives bit-identical outputs, merging changes them by rounding only,
    and nothing recompiles.
    """
    import numpy as np
    ms = _ms_setup(cfg)
    from mindspore import Tensor
    from mindpet import LoraConfig, PetModel, get_pet_model
    model = cfg['model']
    n = cfg['iterations']
    start = time.perf_counter()
    net = build_gpt(model)
    base = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    config = LoraConfig(target_modules=list(LORA['targets']), lora_rank=LORA['rank'], lora_alpha=LORA['alpha'])
    pet = get_pet_model(net, config, adapter_name='a')
    pet.add_adapter('b', config)
    rng = np.random.default_rng(1)
    for name in ('a', 'b'):
        # Both LoRA factors random (B is zero at initialisation): each adapter then changes every output.
        pet.set_adapter(name)
        for layer in pet.pet_layers.values():
            for param in (layer.mindpet_delta_lora_a, layer.mindpet_delta_lora_b):
                param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.02))
    tmp = tempfile.TemporaryDirectory(prefix='mindpet-bench-switch-')
    dirs = {name: os.path.join(tmp.name, name) for name in ('a', 'b')}
    pet.set_adapter('a')
    for name, path in dirs.items():
        pet.save_pretrained(path, adapter_name=name)
    pet.load_adapter(dirs['a'], 'c')
    pet.load_adapter(dirs['b'], 'd')
    build_s = time.perf_counter() - start
    lora_size = dict(lora_layers=len(pet.pet_layers), adapter_params=sum(
        layer.mindpet_delta_lora_a.size + layer.mindpet_delta_lora_b.size for layer in pet.pet_layers.values()))

    ids = Tensor(np.random.default_rng(0).integers(0, model['vocab'], (model['batch'], model['seq']))
                 .astype(np.int32))
    start = time.perf_counter()
    out_a = pet(ids).asnumpy()
    compile_s = time.perf_counter() - start
    graphs = len(pet.compile_cache)

    def forward():
        pet(ids)
        _ms_sync(ms, cfg)

    wall, cpu = _interleaved({'forward': forward}, n)
    samples = {'forward': (wall['forward'], cpu['forward'])}
    pet.set_adapter('b')
    out_b = pet(ids).asnumpy()
    pet.set_adapter('d')
    out_d = pet(ids).asnumpy()
    checks = dict(switch_change=float(np.abs(out_b - out_a).max()),
                  loaded_vs_trained=float(np.abs(out_d - out_b).max()))
    if checks['switch_change'] < 1e-3:
        raise AssertionError(f"set_adapter('b') changed the outputs by only {checks['switch_change']:.2e}")
    if checks['loaded_vs_trained']:
        raise AssertionError(f"adapter 'b' loaded from disk differs from the trained one by "
                             f"{checks['loaded_vs_trained']:.2e}")

    for kind, pair in (('set_adapter_trainable', ('a', 'b')), ('set_adapter_inference', ('c', 'd'))):
        names = iter(pair * (n + 1))
        pet.set_adapter(next(names))

        def switch(names=names):
            pet.set_adapter(next(names))
            _ms_sync(ms, cfg)
        wall, cpu = _interleaved({kind: switch}, 2 * n, warmup=0)
        samples[kind] = (wall[kind], cpu[kind])
    pet.set_adapter('a')
    checks['switch_back'] = float(np.abs(pet(ids).asnumpy() - out_a).max())
    if checks['switch_back']:
        raise AssertionError(f"switching back to 'a' changed its outputs by {checks['switch_back']:.2e}")

    wall, cpu = _interleaved({'merge': pet.merge, 'unmerge': pet.unmerge}, n, warmup=0)
    samples.update(merge=(wall['merge'], cpu['merge']), unmerge=(wall['unmerge'], cpu['unmerge']))
    pet.merge()
    checks['merged'] = float(np.abs(pet(ids).asnumpy() - out_a).max())
    pet.unmerge()
    checks['unmerged'] = float(np.abs(pet(ids).asnumpy() - out_a).max())
    if max(checks['merged'], checks['unmerged']) > 1e-4:
        raise AssertionError(f"merge()/unmerge() moved the outputs by {checks['merged']:.2e}/"
                             f"{checks['unmerged']:.2e} (more than float32 rounding)")
    if len(pet.compile_cache) != graphs:
        raise AssertionError(f'switching or merging recompiled the graph ({graphs} -> {len(pet.compile_cache)})')

    plain = pet.merge_and_unload()
    checks['merge_and_unload'] = float(np.abs(plain(ids).asnumpy() - out_a).max())

    def plain_forward():
        plain(ids)
        _ms_sync(ms, cfg)
    wall, cpu = _interleaved({'forward_plain': plain_forward}, n)
    samples['forward_plain'] = (wall['forward_plain'], cpu['forward_plain'])

    # The reference for 'b': a new base model with the same weights that loaded only 'b'.
    fresh = build_gpt(model)
    for param in fresh.get_parameters():
        param.set_data(Tensor(base[param.name]))
    reference = PetModel.from_pretrained(fresh, dirs['b'])
    out_ref = reference(ids).asnumpy()
    checks['vs_model_built_with_b'] = float(np.abs(out_b - out_ref).max())
    np.testing.assert_allclose(out_b, out_ref, rtol=1e-5, atol=1e-5,
                               err_msg="after set_adapter('b') the output is not that of a model built with 'b'")
    tmp.cleanup()
    fwd = dict(wall=_median(samples['forward'][0]) * 1e3, cpu=_median(samples['forward'][1]) * 1e3)
    return dict(ops=_ms_ops(samples, fwd), checks=checks, build_s=build_s, compile_s=compile_s, graphs=graphs,
                params_total=sum(p.size for p in plain.get_parameters()), **lora_size)


# ============================================================================================== PyTorch workers
def build_torch_gpt(cfg):
    """The same GPT-2-style decoder in PyTorch (explicit attention, like the MindSpore model)."""
    import math
    import torch
    from torch import nn
    hidden, heads = cfg['hidden'], cfg['heads']

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
            self.v, self.o = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

        def forward(self, x, mask):
            b, s, _ = x.shape
            hd = hidden // heads
            q = self.q(x).view(b, s, heads, hd).transpose(1, 2)
            k = self.k(x).view(b, s, heads, hd).permute(0, 2, 3, 1)
            v = self.v(x).view(b, s, heads, hd).transpose(1, 2)
            att = torch.softmax(q @ k / math.sqrt(hd) + mask, -1)
            return self.o((att @ v).transpose(1, 2).reshape(b, s, hidden))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
            self.attn = Attention()
            self.fc1, self.fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

        def forward(self, x, mask):
            x = x + self.attn(self.ln1(x), mask)
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Parameter(torch.randn(cfg['vocab'], hidden) * 0.02)
            self.wpe = nn.Parameter(torch.randn(cfg['positions'], hidden) * 0.01)
            self.blocks = nn.ModuleList([Block() for _ in range(cfg['layers'])])
            self.ln_f = nn.LayerNorm(hidden)
            seq = cfg.get('seq', cfg['positions'])
            self.register_buffer('mask', torch.triu(torch.full((seq, seq), -1e4), 1)[None, None])

        def forward(self, ids):
            b, s = ids.shape
            x = self.wte[ids] + self.wpe[:s]
            for block in self.blocks:
                x = block(x, self.mask[:, :, :s, :s])
            return self.ln_f(x).reshape(b * s, hidden) @ self.wte.t()

    return GPT()


def torch_full(model, cfg):
    return model


def torch_lora(model, cfg):
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=LORA['rank'], lora_alpha=LORA['alpha'], lora_dropout=0.0,
                        target_modules=list(LORA['targets']))
    return get_peft_model(model, config)


def _torch_variant(name, cfg):
    import torch
    torch.manual_seed(0)
    return globals()[TRAIN_VARIANTS[name]['apply']](build_torch_gpt(cfg['model']), cfg)


def _torch_batch(cfg):
    import numpy as np
    import torch
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, cfg['vocab'], size=(cfg['batch'], cfg['seq'] + 1)))
    return ids[:, :-1].contiguous(), ids[:, 1:].reshape(-1).contiguous()


def worker_torch_train(cfg):
    import torch
    start = time.perf_counter()
    model = _torch_variant(cfg['variant'], cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    ids, labels = _torch_batch(cfg['model'])
    build_s = time.perf_counter() - start

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(ids), labels)
        loss.backward()
        opt.step()
        return float(loss)
    start = time.perf_counter()
    loss_first = step()
    compile_s = time.perf_counter() - start
    for _ in range(cfg['warmup']):
        step()
    times, cpu = [], []
    for _ in range(cfg['steps']):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return dict(step_s=_median(times), step_cpu_s=_median(cpu), step_times=times, step_cpu_times=cpu,
                build_s=build_s, compile_s=compile_s, **_memory_figures(),
                trainable=sum(p.numel() for p in params), total=sum(p.numel() for p in model.parameters()),
                loss_first=loss_first, loss_last=loss, torch_threads=torch.get_num_threads())


def worker_torch_train_ab(cfg):
    import torch
    ids, labels = _torch_batch(cfg['model'])
    funcs = {}
    for name in cfg['variants']:
        model = _torch_variant(name, cfg)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)

        def run(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(ids), labels).backward()
            opt.step()
        funcs[name] = run
    wall, cpu = _interleaved(funcs, cfg['steps'], warmup=cfg['warmup'] + 1)
    return dict(time_s={n: _median(t) for n, t in wall.items()}, cpu_s={n: _median(t) for n, t in cpu.items()},
                paired_cpu={n: _median([a / b for a, b in zip(cpu[n], cpu[cfg['variants'][0]])]) for n in cpu})


def worker_torch_forward(cfg):
    import torch
    ids, _ = _torch_batch(cfg['model'])
    funcs = {}
    for name in cfg['variants']:
        model = _torch_variant(name, cfg).eval()

        def run(model=model):
            with torch.no_grad():
                model(ids)
        funcs[name] = run
    timed = _timed(funcs, cfg['iterations'])
    return dict(forward_s=timed['time_s'], forward_cpu_s=timed['cpu_s'])


WORKERS = {'train': worker_train, 'train_ab': worker_train_ab, 'torch_train_ab': worker_torch_train_ab,
           'forward': worker_forward, 'layer': worker_layer, 'ckpt': worker_ckpt, 'switch': worker_switch,
           'reference': worker_reference, 'torch_train': worker_torch_train, 'torch_forward': worker_torch_forward}


def run_as_worker(kind, cfg_json):
    cfg = json.loads(cfg_json)
    load = os.getloadavg()[0]
    result = WORKERS[kind](cfg)
    result['loadavg_start'] = load
    print(RESULT_TAG + json.dumps(result), flush=True)


# ================================================================================================ orchestrator
def venv_python(env, log):
    """The interpreter of virtualenv ``env``, created under .bench/ (and its packages installed) when missing."""
    if env == 'main':
        return sys.executable
    path = os.path.join(BENCH_DIR, f'venv-{env}')
    python = os.path.join(path, 'bin', 'python')
    stamp = os.path.join(path, '.installed')
    if not os.path.isfile(stamp):
        log(f'[setup] creating {path} ({", ".join(VENVS[env])}); this downloads packages once')
        subprocess.run([sys.executable, '-m', 'venv', path], check=True)
        for spec in VENVS[env]:
            subprocess.run([python, '-m', 'pip', 'install', '-q', *spec.split()], check=True)
        with open(stamp, 'w', encoding='utf-8') as fh:
            fh.write('\n'.join(VENVS[env]) + '\n')
    return python


class Runner:
    """Starts worker processes and collects their JSON results; stderr of each goes to a log file."""

    def __init__(self, args):
        self.args = args
        self.log_dir = os.path.join(ROOT, 'outputs', 'benchmark-logs')
        os.makedirs(self.log_dir, exist_ok=True)
        self.count = 0
        self.loads = []

    def log(self, message):
        print(message, file=sys.stderr, flush=True)

    def run(self, env, kind, cfg):
        cfg = dict(cfg, device=self.args.device)
        python = venv_python(env, self.log)
        child_env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v='3', MS_COMPILER_CACHE_ENABLE='0',
                         PYTHONUNBUFFERED='1')
        self.count += 1
        log_path = os.path.join(self.log_dir, f'{self.count:03d}-{kind}-{cfg.get("variant", env)}.log')
        self.log(f'[run {self.count}] {kind} {cfg.get("variant", "")} ({env}) load={os.getloadavg()[0]:.2f}')
        start = time.perf_counter()
        proc = subprocess.run([python, os.path.abspath(__file__), '--worker', kind, '--args', json.dumps(cfg)],
                              capture_output=True, text=True, env=child_env, cwd=ROOT,
                              timeout=self.args.timeout, check=False)
        with open(log_path, 'w', encoding='utf-8') as fh:
            fh.write(proc.stdout + '\n--- stderr ---\n' + proc.stderr)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
        if proc.returncode != 0 or not lines:
            tail = '\n'.join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f'worker {kind} {cfg.get("variant", "")} failed (exit {proc.returncode}); '
                               f'log {log_path}:\n{tail}')
        result = json.loads(lines[-1][len(RESULT_TAG):])
        result['wall_s'] = time.perf_counter() - start
        self.loads.append(result['loadavg_start'])
        return result


def _paired_ratio(results, name, base, key):
    """Median and range over repeats of results[name][r][key] / results[base][r][key] (same round)."""
    ratios = [a[key] / b[key] for a, b in zip(results[name], results[base]) if a.get(key) and b.get(key)]
    if not ratios:
        return None
    return dict(median=_median(ratios), min=min(ratios), max=max(ratios), n=len(ratios))


def _group_variants(table, group, args):
    """The variants of ``table[group]`` selected by ``--variants`` (its first, the base, always kept), or [] when
    the selection leaves nothing to compare with the base."""
    names = table[group]['variants']
    chosen = [v for i, v in enumerate(names) if i == 0 or args.variants is None or v in args.variants]
    return chosen if len(chosen) > 1 or args.variants is None else []


def _run_groups(runner, table, groups, args, kind, payload):
    """Run every selected group of ``table`` (its variants built in one worker process and timed in turn)
    ``args.repeats`` times, groups interleaved within a round: ``{group: (variants, [worker result per round])}``.
    PyTorch groups use the ``torch_<kind>`` worker."""
    results = {}
    for _ in range(args.repeats):
        for group in sorted(groups):
            chosen = _group_variants(table, group, args)
            if not chosen:
                continue
            env = table[group]['env']
            result = runner.run(env, f'torch_{kind}' if env == 'peft' else kind, dict(payload, variants=chosen))
            results.setdefault(group, (chosen, []))[1].append(result)
    return results


def _ratios_to_first(chosen, runs, keys, range_tag):
    """Per variant: for each ``(key, tag)`` the median of ``run[key][variant]`` over the rounds and its ratio to
    the group's first variant (median, min and max over the rounds, named ``<tag>ratio`` and
    ``<tag><range_tag>min/max``)."""
    base = chosen[0]
    rows = {}
    for name in chosen:
        row = dict(base=base)
        for key, tag in keys:
            ratios = [r[key][name] / r[key][base] for r in runs]
            row.update({key: _median([r[key][name] for r in runs]), f'{tag}ratio': _median(ratios),
                        f'{tag}{range_tag}min': min(ratios), f'{tag}{range_tag}max': max(ratios)})
        rows[name] = row
    return rows


def run_benchmarks(args):
    runner = Runner(args)
    sizes = QUICK if args.quick else dict(gpt=GPT, gpt2=GPT2_SMALL, layer=LAYER, switch_input=SWITCH_INPUT)
    parts = set(args.parts)
    groups = {'train'} | ({'reference'} if 'reference' in parts else set()) | ({'peers'} if args.peers else set())
    common = dict(warmup=args.warmup, steps=args.steps)
    out = dict(parts=sorted(parts), peers=args.peers, repeats=args.repeats, layer_repeats=args.layer_repeats,
               sizes=sizes, lora=dict(LORA), adapter=dict(ADAPTER), prefix=dict(PREFIX), variants=args.variants,
               device=args.device)

    if 'train' in parts:
        wanted = set(TRAIN_VARIANTS) if args.variants is None else set(args.variants)
        wanted |= {TRAIN_VARIANTS[v]['base'] for v in wanted}
        variants = [v for v, spec in TRAIN_VARIANTS.items() if spec['group'] in groups and v in wanted]
        train = {v: [] for v in variants}
        for _ in range(args.repeats):
            for name in variants:
                spec = TRAIN_VARIANTS[name]
                kind = 'torch_train' if spec['apply'].startswith('torch_') else 'train'
                train[name].append(runner.run(spec['env'], kind, dict(common, variant=name, model=sizes['gpt'])))
        summary = {}
        for name in variants:
            base = TRAIN_VARIANTS[name]['base']
            runs = train[name]
            summary[name] = dict(label=TRAIN_VARIANTS[name]['label'], base=base,
                                 compile_s=_median([r['compile_s'] for r in runs]),
                                 trainable=runs[0]['trainable'], total=runs[0]['total'],
                                 loss_first=runs[0]['loss_first'], loss_last=runs[0]['loss_last'])
            for key in ('step_s', 'step_cpu_s', 'peak_mb', 'peak_anon_mb'):
                summary[name][key] = _median([r[key] for r in runs if r.get(key)])
                summary[name][key.replace('_s', '').replace('_mb', '') + '_ratio'] = \
                    _paired_ratio(train, name, base, key)
            summary[name]['rss_phases'] = runs[0].get('rss_phases')
        out['train'] = dict(summary=summary, runs=train)

    if 'train_ab' in parts:
        out['train_ab'] = {}
        for group, (chosen, runs) in _run_groups(runner, TRAIN_AB_GROUPS, groups, args, 'train_ab',
                                                 dict(common, model=sizes['gpt'])).items():
            rows = _ratios_to_first(chosen, runs, (('time_s', ''), ('cpu_s', 'cpu_')), range_tag='')
            for name, row in rows.items():
                paired = [r['paired_cpu'][name] for r in runs]
                row.update(paired_ratio=_median(paired), paired_min=min(paired), paired_max=max(paired))
            out['train_ab'][group] = rows

    if 'forward' in parts:
        out['forward'] = {}
        for group, (chosen, runs) in _run_groups(runner, FORWARD_GROUPS, groups, args, 'forward',
                                                 dict(model=sizes['gpt'], iterations=args.iterations)).items():
            out['forward'][group] = _ratios_to_first(chosen, runs, (('forward_s', ''), ('forward_cpu_s', 'cpu_')),
                                                     range_tag='ratio_')

    if 'layer' in parts:
        runs = [runner.run('main', 'layer', dict(layer=sizes['layer'], iterations=args.iterations * 2))
                for _ in range(args.layer_repeats)]
        out['layer'] = _ratio_table(runs, {
            'fwd_unmerged': ('fwd:lora', 'fwd:dense'),
            'fwd_merged_in_place': ('fwd:lora_merged_in_place', 'fwd:dense'),
            'fwd_to_dense': ('fwd:lora_to_dense', 'fwd:dense'),
            'fwdbwd_vs_dense_full': ('fwdbwd:lora_grad', 'fwdbwd:dense_full_grad'),
            'fwdbwd_vs_dense_input_only': ('fwdbwd:lora_grad', 'fwdbwd:dense_input_grad')})
        out['layer']['merge_max_abs_diff'] = max(r['merge_max_abs_diff'] for r in runs)

    if 'ckpt' in parts:
        out['ckpt'] = runner.run('main', 'ckpt', dict(model=sizes['gpt2']))

    if 'switch' in parts:
        out['switch'] = runner.run('main', 'switch', dict(model=dict(sizes['gpt2'], **sizes['switch_input']),
                                                          iterations=args.iterations))

    if 'reference' in parts:
        dtypes = ['float32', 'float16']
        runs = [runner.run('mindpet104', 'reference', dict(layer=sizes['layer'], iterations=args.iterations * 2,
                                                             dtypes=dtypes))
                for _ in range(args.layer_repeats)]
        pairs = {}
        for d in dtypes:
            for kind in ('fwd', 'fwdbwd'):
                pairs[f'{kind}_{d}'] = (f'{kind}:{d}:ours', f'{kind}:{d}:mindpet104')
        out['reference'] = _ratio_table(runs, pairs)
        out['reference']['max_abs_diff'] = runs[0]['max_abs_diff']

    out['machine'] = machine_info()
    out['load'] = dict(min=min(runner.loads, default=None), max=max(runner.loads, default=None),
                       median=_median(runner.loads) if runner.loads else None)
    return out


def _ratio_table(runs, pairs):
    """name -> median/min/max over runs of wall (ratio) and CPU (cpu_ratio) time of a / b, and median times."""
    table = {}
    for name, (num, den) in pairs.items():
        row = dict(of=num, vs=den)
        for key, tag in (('time_s', ''), ('cpu_s', 'cpu_')):
            ratios = [r[key][num] / r[key][den] for r in runs]
            row.update({f'{tag}ratio': _median(ratios), f'{tag}min': min(ratios), f'{tag}max': max(ratios),
                        key: _median([r[key][num] for r in runs]),
                        f'{tag}base_s': _median([r[key][den] for r in runs])})
        table[name] = row
    return table


def machine_info():
    info = dict(python=platform.python_version(), platform=platform.platform(), cores=os.cpu_count())
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as fh:
            info['cpu'] = next((ln.split(':', 1)[1].strip() for ln in fh if ln.startswith('model name')), '?')
        with open('/proc/meminfo', encoding='utf-8') as fh:
            info['memory_gb'] = round(int(fh.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    try:
        from importlib.metadata import version
        info['mindspore'] = version('mindspore')
        info['numpy'] = version('numpy')
    except Exception:  # pylint: disable=broad-except
        pass
    peft_python = os.path.join(BENCH_DIR, 'venv-peft', 'bin', 'python')
    if os.path.isfile(peft_python):
        proc = subprocess.run([peft_python, '-c', 'import torch, peft; print(torch.__version__, peft.__version__)'],
                              capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            info['torch'], info['peft'] = proc.stdout.split()
    return info


# ===================================================================================================== report
def _get(data, *path):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


# (what, path to the CPU-time figure, path to the wall-clock figure, required maximum). Timing targets are judged
# on CPU time (this process's CPU seconds over all threads), which other jobs on a shared machine barely move;
# the wall-clock figure of the same run is shown beside it. Adapter and prefix tuning have no figure of their own
# in the issue: their bound is the promise of any parameter-efficient method, to cost less than full fine-tuning.
# The switching bound (50 ms) is doc/lifecycle.md's, a tenth of the MindPet blog's 0.5 s per switch.
TARGETS = [
    ('LoRA step time / full fine-tuning (one process each)',
     ('train', 'summary', 'lora', 'step_cpu_ratio', 'median'),
     ('train', 'summary', 'lora', 'step_ratio', 'median'), 0.57),
    ('LoRA step time / full fine-tuning (same process, interleaved)', ('train_ab', 'train', 'lora', 'cpu_ratio'),
     ('train_ab', 'train', 'lora', 'ratio'), 0.57),
    ('ours / MindPet 1.0.4 LoRA training step (same process, interleaved)',
     ('train_ab', 'reference', 'lora', 'cpu_ratio'), ('train_ab', 'reference', 'lora', 'ratio'), 1.0),
    ('LoRA model forward / base model forward', ('forward', 'train', 'lora', 'cpu_ratio'),
     ('forward', 'train', 'lora', 'ratio'), 1.03),
    ('LoRA peak memory (ru_maxrss) / full fine-tuning', ('train', 'summary', 'lora', 'peak_ratio', 'median'),
     None, 0.60),
    ('LoRA peak anonymous memory (VmHWM - RssFile) / full fine-tuning',
     ('train', 'summary', 'lora', 'peak_anon_ratio', 'median'), None, 0.60),
    ('Adapter step time / full fine-tuning (same process, interleaved)', ('train_ab', 'train', 'adapter', 'cpu_ratio'),
     ('train_ab', 'train', 'adapter', 'ratio'), 1.0),
    ('prefix tuning step time / full fine-tuning (same process, interleaved)',
     ('train_ab', 'train', 'prefix', 'cpu_ratio'), ('train_ab', 'train', 'prefix', 'ratio'), 1.0),
    ('Adapter peak anonymous memory / full fine-tuning',
     ('train', 'summary', 'adapter', 'peak_anon_ratio', 'median'), None, 1.0),
    ('prefix tuning peak anonymous memory / full fine-tuning',
     ('train', 'summary', 'prefix', 'peak_anon_ratio', 'median'), None, 1.0),
    ('set_adapter between trainable LoRA adapters, GPT-2 small (ms)',
     ('switch', 'ops', 'set_adapter_trainable', 'cpu_ms'), ('switch', 'ops', 'set_adapter_trainable', 'median_ms'),
     50.0),
    ('set_adapter between LoRA adapters loaded for inference, GPT-2 small (ms)',
     ('switch', 'ops', 'set_adapter_inference', 'cpu_ms'), ('switch', 'ops', 'set_adapter_inference', 'median_ms'),
     50.0),
    ('LoRADense forward (unmerged) / nn.Dense', ('layer', 'fwd_unmerged', 'cpu_ratio'),
     ('layer', 'fwd_unmerged', 'ratio'), 1.05),
    ('merged LoRADense (merge() then to_dense()) forward / nn.Dense', ('layer', 'fwd_to_dense', 'cpu_ratio'),
     ('layer', 'fwd_to_dense', 'ratio'), 1.02),
    ('ours / MindPet 1.0.4 LoRADense forward, fp32', ('reference', 'fwd_float32', 'cpu_ratio'),
     ('reference', 'fwd_float32', 'ratio'), 1.0),
    ('ours / MindPet 1.0.4 LoRADense fwd+bwd, fp32', ('reference', 'fwdbwd_float32', 'cpu_ratio'),
     ('reference', 'fwdbwd_float32', 'ratio'), 1.0),
    ('ours / MindPet 1.0.4 LoRADense forward, fp16', ('reference', 'fwd_float16', 'cpu_ratio'),
     ('reference', 'fwd_float16', 'ratio'), 1.0),
    ('ours / MindPet 1.0.4 LoRADense fwd+bwd, fp16', ('reference', 'fwdbwd_float16', 'cpu_ratio'),
     ('reference', 'fwdbwd_float16', 'ratio'), 1.0),
]
# Relative targets: our LoRA/full ratio no worse than the other implementation's ratio in the same run.
RELATIVE_TARGETS = [
    ('LoRA/full step ratio: ours vs MindPet 1.0.4', 'lora_mindpet104', 'step_cpu_ratio', 'step_ratio'),
    ('LoRA/full step ratio: ours vs PyTorch+PEFT', 'peft_lora', 'step_cpu_ratio', 'step_ratio'),
    ('LoRA/full peak memory ratio: ours vs MindPet 1.0.4', 'lora_mindpet104', 'peak_ratio', None),
    ('LoRA/full peak anonymous memory ratio: ours vs MindPet 1.0.4', 'lora_mindpet104', 'peak_anon_ratio', None),
    ('LoRA/full peak memory ratio: ours vs PyTorch+PEFT', 'peft_lora', 'peak_ratio', None),
    ('LoRA/full peak anonymous memory ratio: ours vs PyTorch+PEFT', 'peft_lora', 'peak_anon_ratio', None),
]


def evaluate_targets(results):
    rows = []
    for what, path, wall_path, limit in TARGETS:
        value = _get(results, *path)
        if value is not None:
            rows.append(dict(what=what, value=value, wall=_get(results, *wall_path) if wall_path else None,
                             target=f'<= {limit}', met=value <= limit))
    ours, theirs = _get(results, 'train_ab', 'train', 'lora'), _get(results, 'train_ab', 'peers', 'peft_lora')
    if ours and theirs:
        rows.append(dict(what='LoRA/full step ratio (same process): ours vs PyTorch+PEFT', value=ours['cpu_ratio'],
                         wall=ours['ratio'], wall_target=theirs['ratio'], target=f'<= {theirs["cpu_ratio"]:.3f}',
                         met=ours['cpu_ratio'] <= theirs['cpu_ratio']))
    ckpt = results.get('ckpt')
    for fmt, files in (ckpt or {}).get('files', {}).items():
        excess = files['adapter_bytes'] / ckpt['raw_adapter_bytes'] - 1.0
        rows.append(dict(what=f'adapter file ({fmt}) bytes over raw adapter tensor bytes', value=excess, wall=None,
                         target='<= 0.01', met=excess <= 0.01))
    summary = _get(results, 'train', 'summary') or {}
    for what, other, key, wall_key in RELATIVE_TARGETS:
        ours, theirs = _get(summary, 'lora', key, 'median'), _get(summary, other, key, 'median')
        if ours is None or theirs is None:
            continue
        wall = (_get(summary, 'lora', wall_key, 'median'), _get(summary, other, wall_key, 'median')) \
            if wall_key else (None, None)
        rows.append(dict(what=what, value=ours, wall=wall[0], target=f'<= {theirs:.3f}', met=ours <= theirs,
                         wall_target=wall[1]))
    return rows


def _fmt(value, digits=2, unit=''):
    if value is None:
        return 'n/a'
    return f'{value:.{digits}f}{unit}'


def _rng(ratio):
    """'0.550x (0.53-0.57)': median ratio and its range over rounds."""
    if not ratio:
        return 'n/a'
    return f'{ratio["median"]:.3f}x ({ratio["min"]:.2f}-{ratio["max"]:.2f})'


def _pair(row, tag=''):
    return f'{row[tag + "ratio"]:.3f}x ({row[tag + "min"]:.2f}-{row[tag + "max"]:.2f})'


def render_markdown(results, command):
    lines = []
    m = results.get('machine', {})
    load = results.get('load', {})
    add = lines.append
    add(f'Run {results.get("date", "?")} ({results.get("duration_s", 0) / 60:.0f} min) with `{command}`.')
    add('')
    add(f'Machine: {m.get("cpu", "?")}, {m.get("cores", "?")} cores, {m.get("memory_gb", "?")} GB, '
        f'{m.get("platform", "?")}; Python {m.get("python", "?")}, MindSpore {m.get("mindspore", "?")}, '
        f'numpy {m.get("numpy", "?")}' + (f', PyTorch {m["torch"]}, PEFT {m["peft"]}' if 'torch' in m else '')
        + f'; device {results.get("device", "CPU")}.')
    add(f'Load average (1 min) when the worker processes started: median {_fmt(load.get("median"))}, range '
        f'{_fmt(load.get("min"))}-{_fmt(load.get("max"))} on {m.get("cores", "?")} cores (other jobs shared '
        f'them). {results.get("repeats")} rounds ({results.get("layer_repeats")} for parts 2 and 5); figures are medians; ratios are paired per round (same round, '
        f'back-to-back processes, or the same process for the layer and forward figures) with the range over rounds '
        f'in brackets. "CPU" is the process\'s CPU time (all threads, `time.process_time`), "wall" the elapsed time; '
        f'targets are judged on CPU time because the wall clock also counts the time other jobs held the cores.')
    reused = results.get('reused')
    if reused:
        add(f'Parts {", ".join(reused["parts"])} come from the earlier run of {reused.get("date")} '
            f'(`{reused.get("command")}`; load median {_fmt((reused.get("load") or {}).get("median"))}, range '
            f'{_fmt((reused.get("load") or {}).get("min"))}-{_fmt((reused.get("load") or {}).get("max"))}); '
            f'the load figures above are this run\'s.')
    add('')
    train = _get(results, 'train', 'summary')
    if train:
        sz = results['sizes']['gpt']
        add(f'### 1. Training step and peak memory (GRAPH_MODE, GPT-like: {sz["layers"]} blocks, hidden '
            f'{sz["hidden"]}, vocab {sz["vocab"]} tied, batch {sz["batch"]} x seq {sz["seq"]}, fp32, '
            f'AdamWeightDecay; one process per variant)')
        add('')
        add('| variant | trainable params | step CPU (s) | CPU / full | step wall (s) | wall / full | '
            'peak RSS (MB) | peak / full | peak anon (MB) | anon / full | loss first -> last |')
        add('|---|---|---|---|---|---|---|---|---|---|---|')
        for s in train.values():
            pct = 100.0 * s['trainable'] / s['total']
            add(f'| {s["label"]} | {s["trainable"]:,} ({pct:.2f}%) | {_fmt(s["step_cpu_s"], 3)} | '
                f'{_rng(s["step_cpu_ratio"])} | {_fmt(s["step_s"], 3)} | {_rng(s["step_ratio"])} | '
                f'{_fmt(s["peak_mb"], 0)} | {_rng(s["peak_ratio"])} | {_fmt(s["peak_anon_mb"], 0)} | '
                f'{_rng(s["peak_anon_ratio"])} | {s["loss_first"]:.3f} -> {s["loss_last"]:.3f} |')
        add('')
        add('Ratios are to the full fine-tuning run in the same virtualenv (PyTorch rows: to PyTorch full '
            'fine-tuning). Peak RSS is the whole process (`ru_maxrss`). Peak anon is `VmHWM - RssFile - RssShmem` at '
            'the end: the same peak without the pages of shared libraries, whose count depends on what other '
            'processes keep in the page cache (the same MindSpore wheel shows ~100 MB more of them in one '
            'virtualenv than in another).')
        add('')
        phased = {n: s for n, s in train.items() if s.get('rss_phases')}
        if phased:
            add('Where a MindSpore process\'s memory goes (peak RSS in MB after each phase, first round):')
            add('')
            add('| variant | import | model built | graph compiled | first step | end (peak) | compile (s) |')
            add('|---|---|---|---|---|---|---|')
            for s in phased.values():
                ph = s['rss_phases']
                add(f'| {s["label"]} | {ph["imported"]:.0f} | {ph["built"]:.0f} | {ph["compiled"]:.0f} | '
                    f'{ph["first_step"]:.0f} | {s["peak_mb"]:.0f} | {_fmt(s["compile_s"], 1)} |')
            add('')
    train_ab = results.get('train_ab')
    if train_ab:
        add('### 1b. Training steps of several variants in one process, stepped in turn')
        add('')
        add('Same model, data and optimiser as above; each round is one process holding the group\'s variants and '
            'stepping them in turn, so a ratio compares steps taken seconds apart under the same load. Ratios are '
            'to the first variant of the group: "CPU / first" divides the round\'s median step times (the figure '
            'the targets use), "paired" is the median over steps of each step divided by the first variant\'s '
            'step just before it.')
        add('')
        add('| group | variant | step CPU (s) | CPU / first | paired CPU / first | step wall (s) | wall / first |')
        add('|---|---|---|---|---|---|---|')
        for group, rows in train_ab.items():
            for name, r in rows.items():
                paired = (f'{r["paired_ratio"]:.3f}x ({r["paired_min"]:.2f}-{r["paired_max"]:.2f})'
                          if 'paired_ratio' in r else 'n/a')
                add(f'| {group} | {TRAIN_VARIANTS[name]["label"]} | {_fmt(r["cpu_s"], 3)} | {_pair(r, "cpu_")} | '
                    f'{paired} | {_fmt(r["time_s"], 3)} | {_pair(r)} |')
        add('')
    forward = results.get('forward')
    if forward:
        add('### Forward pass of each variant (inference; the variants of a group built in one process, timed '
            'interleaved)')
        add('')
        add('| group | variant | forward CPU (ms) | CPU / base | forward wall (ms) | wall / base |')
        add('|---|---|---|---|---|---|')
        for group, rows in forward.items():
            for name, r in rows.items():
                add(f'| {group} | {TRAIN_VARIANTS[name]["label"]} | {_fmt(r["forward_cpu_s"] * 1e3, 1)} | '
                    f'{r["cpu_ratio"]:.3f}x ({r["cpu_ratio_min"]:.2f}-{r["cpu_ratio_max"]:.2f}) | '
                    f'{_fmt(r["forward_s"] * 1e3, 1)} | {r["ratio"]:.3f}x ({r["ratio_min"]:.2f}-'
                    f'{r["ratio_max"]:.2f}) |')
        add('')
    layer = results.get('layer')
    if layer:
        sz = results['sizes']['layer']
        add(f'### 2. Layer overhead: LoRADense(r=8) vs nn.Dense {sz["in_channels"]}x{sz["out_channels"]}, '
            f'input {tuple(sz["shape"])} fp32, GRAPH_MODE, one process')
        add('')
        add('| measurement | baseline | CPU (ms) | base CPU (ms) | CPU ratio | wall ratio |')
        add('|---|---|---|---|---|---|')
        labels = {'fwd_unmerged': ('forward, unmerged', 'nn.Dense forward'),
                  'fwd_merged_in_place': ('forward after merge() in the already-compiled graph (branch gated '
                                          'to 0, still computed)', 'nn.Dense forward'),
                  'fwd_to_dense': ('forward of to_dense() (merged, branch removed)', 'nn.Dense forward'),
                  'fwdbwd_vs_dense_full': ('forward+backward (grads of x, A, B)',
                                           'nn.Dense fwd+bwd (grads of x, W, b)'),
                  'fwdbwd_vs_dense_input_only': ('forward+backward (grads of x, A, B)',
                                                 'nn.Dense fwd+bwd (grad of x only)')}
        for key, (what, base) in labels.items():
            r = layer[key]
            add(f'| {what} | {base} | {_fmt(r["cpu_s"] * 1e3, 2)} | {_fmt(r["cpu_base_s"] * 1e3, 2)} | '
                f'{_pair(r, "cpu_")} | {_pair(r)} |')
        add('')
        add(f'merge() inside the compiled graph changes the output by at most {layer["merge_max_abs_diff"]:.2e} '
            f'(fp32 rounding). The backward rows sum the output with ones, so the frozen product\'s forward is '
            f'dead code for the gradient and MindSpore drops it: they compare gradient work, not a training step.')
        add('')
    ckpt = results.get('ckpt')
    if ckpt:
        sz = results['sizes']['gpt2']
        add(f'### 3. Checkpoint size: GPT-2 small shapes ({sz["layers"]} blocks, hidden {sz["hidden"]}, vocab '
            f'{sz["vocab"]}, {sz["positions"]} positions), LoRA r=8 on q, v')
        add('')
        add(f'{ckpt["params_adapter"]:,} adapter parameters of {ckpt["params_total"]:,} '
            f'({100.0 * ckpt["params_adapter"] / ckpt["params_total"]:.3f}%); raw tensor bytes: adapter '
            f'{ckpt["raw_adapter_bytes"]:,}, full {ckpt["raw_full_bytes"]:,}.')
        add('')
        add('| format | full file (bytes) | adapter file (bytes) | adapter / full | adapter file / raw adapter '
            'bytes | save full (s) | save adapter (s) |')
        add('|---|---|---|---|---|---|---|')
        for fmt, f in ckpt['files'].items():
            add(f'| {fmt} | {f["full_bytes"]:,} | {f["adapter_bytes"]:,} | '
                f'{100.0 * f["adapter_bytes"] / f["full_bytes"]:.3f}% | '
                f'{f["adapter_bytes"] / ckpt["raw_adapter_bytes"]:.4f}x | {f["full_save_s"]:.2f} | '
                f'{f["adapter_save_s"]:.3f} |')
        add('')
    switch = results.get('switch')
    if switch:
        sz = results['sizes']['gpt2']
        inp = results['sizes'].get('switch_input', {})
        add(f'### 4. Switching and merging: GPT-2 small shapes ({sz["layers"]} blocks, hidden {sz["hidden"]}, '
            f'vocab {sz["vocab"]} tied; {switch["params_total"]:,} parameters), LoRA r=8 on q, v '
            f'({switch["lora_layers"]} layers, {switch["adapter_params"]:,} parameters per adapter), input '
            f'{inp.get("batch", "?")} x {inp.get("seq", "?")} tokens, GRAPH_MODE, one process, after the graph was '
            f'compiled ({switch["compile_s"]:.1f} s) and ran')
        add('')
        add('| operation | wall median (ms) | wall min-max (ms) | CPU median (ms) | wall / forward | CPU / forward |')
        add('|---|---|---|---|---|---|')
        labels = {'forward': 'forward pass, LoRA active (unmerged): the unit',
                  'forward_plain': 'forward pass after merge_and_unload() (plain Dense)',
                  'set_adapter_trainable': 'set_adapter between two trainable adapters',
                  'set_adapter_inference': 'set_adapter between two adapters loaded for inference',
                  'merge': f'merge() ({switch["lora_layers"]} weights += scaling B A)',
                  'unmerge': 'unmerge()'}
        for key, what in labels.items():
            r = switch['ops'][key]
            add(f'| {what} | {r["median_ms"]:.2f} | {r["min_ms"]:.2f}-{r["max_ms"]:.2f} | {r["cpu_ms"]:.2f} | '
                f'{r["x_forward"]:.3f}x | {r["cpu_x_forward"]:.3f}x |')
        c = switch['checks']
        add('')
        add(f'Checked in the run: set_adapter changed the outputs (by up to {c["switch_change"]:.3f}) to those of a '
            f'new model built with the other adapter (largest difference {c["vs_model_built_with_b"]:.1e}); the '
            f'adapter loaded from disk gives the trained one\'s outputs (difference {c["loaded_vs_trained"]:.1e}); '
            f'switching back gives bit-identical outputs ({c["switch_back"]:.1e}); merge() moves them by '
            f'{c["merged"]:.1e} and unmerge() leaves {c["unmerged"]:.1e} (float32 rounding); the compiled graph was '
            f'reused throughout ({switch["graphs"]} graph). Trainable adapters copy the outgoing adapter\'s live '
            f'tensors back to the store before switching; adapters loaded for inference skip that copy.')
        add('')
    ref = results.get('reference')
    if ref:
        sz = results['sizes']['layer']
        add(f'### 5. Against the reference: MindPet 1.0.4 LoRADense vs ours ({sz["in_channels"]}x'
            f'{sz["out_channels"]}, r=8, input {tuple(sz["shape"])} fp32, weights fp32, one process, interleaved)')
        add('')
        add('| compute dtype | measurement | ours CPU (ms) | MindPet CPU (ms) | ours / MindPet CPU | '
            'ours / MindPet wall |')
        add('|---|---|---|---|---|---|')
        for key, r in ref.items():
            if not isinstance(r, dict) or 'ratio' not in r:
                continue
            kind, dtype = key.split('_', 1)
            what = 'forward' if kind == 'fwd' else 'forward+backward (grads of x, A, B)'
            add(f'| {dtype} | {what} | {_fmt(r["cpu_s"] * 1e3, 2)} | {_fmt(r["cpu_base_s"] * 1e3, 2)} | '
                f'{_pair(r, "cpu_")} | {_pair(r)} |')
        diffs = ', '.join(f'{d} {v:.1e}' for d, v in ref.get('max_abs_diff', {}).items())
        add('')
        add(f'Largest output difference between the two implementations: {diffs}.')
        add('')
    rows = evaluate_targets(results)
    if rows:
        add('### Targets')
        add('')
        add('| target | measured (CPU) | wall clock | required | met |')
        add('|---|---|---|---|---|')
        for r in rows:
            wall = _fmt(r['wall'], 3)
            if r.get('wall_target') is not None:
                wall += f' (vs {r["wall_target"]:.3f})'
            add(f'| {r["what"]} | {r["value"]:.3f} | {wall} | {r["target"]} | {"yes" if r["met"] else "**no**"} |')
        add('')
    return '\n'.join(lines)


def update_doc(path, block):
    """Replace the results block of ``path`` (between the markers), creating the page if it does not exist."""
    text = ''
    if os.path.isfile(path):
        with open(path, encoding='utf-8') as fh:
            text = fh.read()
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        tail = rest.split(DOC_END, 1)[1]
    else:
        head = text or '# Benchmarks\n\n'
        tail = '\n'
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as fh:
        fh.write(f'{head}{DOC_BEGIN}\n{block}\n{DOC_END}{tail}')


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n', 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='CPU', choices=['CPU', 'Ascend', 'GPU'],
                        help='MindSpore device for the MindSpore parts (PyTorch peers always run on CPU).')
    parser.add_argument('--parts', default=','.join(PARTS),
                        help=f'comma-separated subset of {",".join(PARTS)} (default: all).')
    parser.add_argument('--peers', action='store_true', help='also run Hugging Face PEFT on PyTorch (own venv).')
    parser.add_argument('--variants', default=None,
                        help=f'comma-separated subset of the part-1 variants {",".join(TRAIN_VARIANTS)} (default: '
                             f'all of the selected groups; each one\'s base is always run).')
    parser.add_argument('--repeats', type=int, default=3, help='rounds of every measurement (default 3).')
    parser.add_argument('--layer-repeats', type=int, default=5,
                        help='processes for the layer and reference parts (cheap, so more of them; default 5).')
    parser.add_argument('--steps', type=int, default=8, help='timed training steps per process (default 8).')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps after the compiling one (default 2).')
    parser.add_argument('--iterations', type=int, default=10,
                        help='timed calls per candidate in forward/layer workers (layer/reference: twice this).')
    parser.add_argument('--quick', action='store_true', help='tiny shapes, to check the script itself.')
    parser.add_argument('--json', default=None, help='where to write the JSON (default doc/benchmarks.json; '
                                                     'outputs/benchmark-quick.json with --quick).')
    parser.add_argument('--doc', default=None, help='markdown page to update (default doc/benchmarks.md; '
                                                    'none with --quick).')
    parser.add_argument('--no-doc', action='store_true', help='do not update the markdown page.')
    parser.add_argument('--reuse', default=None,
                        help='JSON of an earlier run: keep its parts that this run does not measure.')
    parser.add_argument('--timeout', type=int, default=3600, help='seconds allowed per worker process.')
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--args', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(',') if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f'unknown part(s) {unknown}; choose from {list(PARTS)}')
    if args.variants is not None:
        args.variants = [v.strip() for v in args.variants.split(',') if v.strip()]
        unknown = sorted(set(args.variants) - set(TRAIN_VARIANTS))
        if unknown or not args.variants:
            parser.error(f'unknown variant(s) {unknown or args.variants}; choose from {list(TRAIN_VARIANTS)}')
    if args.repeats < 1 or args.steps < 1 or args.iterations < 1 or args.warmup < 0:
        parser.error('--repeats, --steps and --iterations must be >= 1 and --warmup >= 0')
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        run_as_worker(args.worker, args.args)
        return 0
    command = 'PYTHONPATH=. python scripts/benchmark.py' + (' ' + ' '.join(argv) if argv else '')
    started = time.time()
    results = run_benchmarks(args)
    if args.reuse:
        with open(args.reuse, encoding='utf-8') as fh:
            earlier = json.load(fh)
        for key in PARTS:
            if key not in results and key in earlier:
                results[key] = earlier[key]
        results['reused'] = dict(path=args.reuse, date=earlier.get('date'), command=earlier.get('command'),
                                 load=earlier.get('load'),
                                 parts=sorted(k for k in earlier if k in PARTS and k not in args.parts))
        if 'train' in earlier and 'train' not in args.parts:
            results['sizes'] = earlier.get('sizes', results['sizes'])
    results['date'] = datetime.datetime.now().strftime('%Y-%m-%d %H:%M')
    results['command'] = command
    results['duration_s'] = time.time() - started
    results['targets'] = evaluate_targets(results)
    json_path = args.json or os.path.join(ROOT, 'outputs/benchmark-quick.json' if args.quick
                                          else 'doc/benchmarks.json')
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, 'w', encoding='utf-8') as fh:
        json.dump(results, fh, indent=1)
    block = render_markdown(results, command)
    print(block)
    doc = args.doc or (None if args.quick else os.path.join(ROOT, 'doc', 'benchmarks.md'))
    if doc and not args.no_doc:
        update_doc(doc, block)
        print(f'\n(updated {doc}; JSON in {json_path})', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
