"""Adapter switching and merging cost vs one forward pass, GPT-2-small shapes, GRAPH_MODE.

    PYTHONPATH=. python scripts/bench_switch.py [--vocab 50257] [--seq 128] [--repeats 20] [--out FILE.json]

Model: the GPT-style decoder of tests/gpt_like.py with 12 blocks, hidden 768, 12 heads (GPT-2 small: 124M
parameters with the default vocabulary). LoRA r=8, alpha=16 on q_proj and v_proj (24 layers). Measured, all in the
same process after the graph has been compiled and has run:

* forward: one call of the compiled PetModel (batch 1 x seq tokens), median of ``--repeats``;
* set_adapter: switching between two adapters (trainable adapters: the outgoing one is copied back to the store
  first; inference adapters loaded with ``is_trainable=False`` skip that copy), median and max;
* merge / unmerge: folding the active adapter into the 24 base weights and back;
* forward after merge_and_unload: the plain network (zero-overhead inference), median.

Prints a markdown table and writes JSON (default outputs/bench_switch.json).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault('GLOG_v', '3')
os.environ['MS_COMPILER_CACHE_ENABLE'] = '0'   # a cached graph was seen to be reused wrongly (BRIEF.md)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

import mindpet  # noqa: E402
from mindpet import LoraConfig, get_pet_model  # noqa: E402
from tests.gpt_like import GPTLike  # noqa: E402


def _times(fn, repeats):
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000.0)
    return out


def _randomise(pet, seed):
    rng = np.random.RandomState(seed)
    for layer in pet.pet_layers.values():
        for param in (layer.mindpet_delta_lora_a, layer.mindpet_delta_lora_b):
            param.set_data(Tensor(rng.randn(*param.shape).astype(np.float32) * 0.02))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--layers', type=int, default=12)
    parser.add_argument('--hidden', type=int, default=768)
    parser.add_argument('--heads', type=int, default=12)
    parser.add_argument('--vocab', type=int, default=50257)
    parser.add_argument('--seq', type=int, default=128)
    parser.add_argument('--rank', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--out', default=os.path.join('outputs', 'bench_switch.json'))
    args = parser.parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE, device_target='CPU')

    start = time.perf_counter()
    net = GPTLike(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads, seq_len=args.seq)
    config = LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=args.rank, lora_alpha=2 * args.rank)
    pet = get_pet_model(net, config, adapter_name='a')
    pet.add_adapter('b', config)
    pet.add_adapter('c', config, trainable=False)
    pet.add_adapter('d', config, trainable=False)
    for seed, name in enumerate(['a', 'b', 'c', 'd']):
        pet.set_adapter(name)
        _randomise(pet, seed)
    pet.set_adapter('a')
    build_s = time.perf_counter() - start
    ids = Tensor(np.random.RandomState(0).randint(0, args.vocab, (1, args.seq)).astype(np.int32))
    start = time.perf_counter()
    out_a = pet(ids).asnumpy()
    compile_s = time.perf_counter() - start
    cache = len(pet.compile_cache)

    forward = _times(lambda: pet(ids).asnumpy(), max(5, args.repeats // 2))
    pet.set_adapter('b')
    out_b = pet(ids).asnumpy()
    assert np.abs(out_a - out_b).max() > 0, 'switching did not change the outputs'

    names = iter(['a', 'b'] * args.repeats)
    switch_train = _times(lambda: pet.set_adapter(next(names)), args.repeats)
    names = iter(['c', 'd'] * args.repeats)
    switch_infer = _times(lambda: pet.set_adapter(next(names)), args.repeats)
    pet.set_adapter('a')
    np.testing.assert_array_equal(pet(ids).asnumpy(), out_a)

    merge, unmerge = [], []
    for _ in range(max(3, args.repeats // 4)):
        merge += _times(pet.merge, 1)
        unmerge += _times(pet.unmerge, 1)
    pet.merge()
    np.testing.assert_allclose(pet(ids).asnumpy(), out_a, atol=1e-3, rtol=1e-3)
    pet.unmerge()
    forward_lora = _times(lambda: pet(ids).asnumpy(), max(5, args.repeats // 2))
    assert len(pet.compile_cache) == cache, 'switching or merging recompiled the graph'

    plain = pet.merge_and_unload()
    plain(ids).asnumpy()
    forward_plain = _times(lambda: plain(ids).asnumpy(), max(5, args.repeats // 2))

    fwd = statistics.median(forward_lora)
    rows = [(name, statistics.median(values), min(values), max(values)) for name, values in [
        ('forward pass (LoRA active, unmerged)', forward_lora),
        ('forward pass (merge_and_unload, plain Dense)', forward_plain),
        ('set_adapter (trainable adapters)', switch_train),
        ('set_adapter (inference adapters)', switch_infer),
        ('merge()', merge),
        ('unmerge()', unmerge)]]
    params = sum(int(np.prod(p.shape)) for p in plain.get_parameters())
    adapter_bytes = 2 * args.layers * 2 * args.rank * args.hidden * 4
    print(f"GPT-like: {args.layers} blocks, hidden {args.hidden}, vocab {args.vocab}, {params / 1e6:.1f}M "
          f"parameters; LoRA r={args.rank} on q_proj, v_proj ({2 * args.layers} layers, "
          f"{adapter_bytes / 1024:.0f} KiB per adapter); input 1 x {args.seq}; GRAPH_MODE CPU, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; compile {compile_s:.1f} s\n")
    print('| operation | median ms | min ms | max ms | median / forward median |')
    print('|---|---:|---:|---:|---:|')
    for name, median, best, worst in rows:
        print(f'| {name} | {median:.2f} | {best:.2f} | {worst:.2f} | {median / fwd:.3f} |')
    result = {
        'mindpet': mindpet.__version__, 'mindspore': ms.__version__, 'machine': platform.machine(),
        'cpus': os.cpu_count(), 'layers': args.layers, 'hidden': args.hidden, 'vocab': args.vocab,
        'seq': args.seq, 'rank': args.rank, 'parameters': params, 'adapter_bytes': adapter_bytes,
        'build_s': build_s, 'compile_s': compile_s, 'repeats': args.repeats,
        'load_average': os.getloadavg()[0],
        'ms': {name: {'median': median, 'min': best, 'max': worst, 'x_forward': median / fwd}
               for name, median, best, worst in rows},
        'raw_ms': {'forward_lora': forward_lora, 'forward_plain': forward_plain, 'set_adapter_trainable':
                   switch_train, 'set_adapter_inference': switch_infer, 'merge': merge, 'unmerge': unmerge},
        'recompiled': False,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w', encoding='utf-8') as handle:
        json.dump(result, handle, indent=1)
    print(f'\nwrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
