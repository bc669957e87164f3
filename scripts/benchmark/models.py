"""The benchmark's models and variants: a GPT-2-style decoder in MindSpore (and its PyTorch twin for the peers),
the functions turning the base model into each variant (``apply_*`` / ``torch_*``), and ``TRAIN_VARIANTS``, the table
naming each variant's virtualenv, function, base and label. Adding a variant is one function here and one entry in
``TRAIN_VARIANTS`` (and, for the forward timing, in orchestrate.FORWARD_GROUPS)."""
import os
import sys


# The GPT-like model of part 1 (GPT-2-small with 6 blocks) and GPT-2 small itself for the checkpoint sizes.
GPT = dict(layers=6, hidden=768, heads=12, vocab=50257, positions=1024, batch=4, seq=64)
# Issue 17's model: the same decoder with a 1,000-word vocabulary (the embedding no longer dominates the weights).
GPT_V1000 = dict(GPT, vocab=1000)
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

# Variants only the memory part runs (orchestrate.MEMORY_VARIANTS): LoRA the way users apply it.
TRAIN_VARIANTS.update({
    'lora_pet': dict(env='main', apply='apply_lora_pet', base='full', group='memory',
                     label='LoRA r=8 on q,v (get_pet_model, float32 base)'),
    'lora_fp16': dict(env='main', apply='apply_lora_fp16', base='full', group='memory',
                      label='LoRA r=8 on q,v (get_pet_model, float16 base)'),
})
# Variants only the recompute part runs (scripts/benchmark/recompute.py): the same with each block recomputed.
TRAIN_VARIANTS.update({
    'lora_pet_recompute': dict(env='main', apply='apply_lora_pet_recompute', base='lora_pet', group='recompute',
                               label='LoRA r=8 on q,v (get_pet_model) + recompute of every block'),
    'full_recompute': dict(env='main', apply='apply_full_recompute', base='full', group='recompute',
                           label='full fine-tuning + recompute of every block'),
})
# glibc mallopt parameter numbers (malloc.h), for the allocator settings the memory part tries.
MALLOPT_PARAMS = {'M_TRIM_THRESHOLD': -1, 'M_MMAP_THRESHOLD': -3, 'M_ARENA_MAX': -8}


def ms_setup(cfg):
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target=cfg.get('device', 'CPU'))
    ms.set_seed(0)
    return ms


def ms_sync(ms, cfg):
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


def ms_loss_cell(net):
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


def ms_batch(cfg):
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


def _pet_lora(net, base_dtype):
    from mindpet import LoraConfig, get_pet_model
    config = LoraConfig(target_modules=[f'attn.{t}' for t in LORA['targets']], lora_rank=LORA['rank'],
                        lora_alpha=LORA['alpha'])
    # The PetModel is what users train; it wraps (and shares the parameters of) ``net``.
    return get_pet_model(net, config, base_dtype=base_dtype)


def apply_lora_pet(net, cfg):
    """LoRA through ``get_pet_model`` (the user's path: the Dense's own weight Parameters are kept, not copied)."""
    return _pet_lora(net, None)


def apply_lora_pet_recompute(net, cfg):
    """``apply_lora_pet``, then ``apply_recompute`` on the repeated blocks (``blocks.0`` ... ``blocks.N-1``)."""
    from mindpet.recompute import apply_recompute
    pet = apply_lora_pet(net, cfg)
    apply_recompute(pet)
    return pet


def apply_full_recompute(net, cfg):
    from mindpet.recompute import apply_recompute
    apply_recompute(net)
    return net


def apply_lora_fp16(net, cfg):
    """LoRA through ``get_pet_model(..., base_dtype=ms.float16)``: frozen base in float16, adapters float32."""
    import mindspore as ms
    return _pet_lora(net, ms.float16)


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
