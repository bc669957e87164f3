"""Trainable share of each delta method on a BERT-base-sized layer stack (the numbers in doc/<method>.md).

Builds 12 transformer layers with BERT-base shapes (hidden 768, 12 heads, FFN 3072; query/key/value/output
Dense, two LayerNorms) in MindSpore, inserts the method's delta Cells where the method puts them, freezes with
``freeze_delta`` and counts ``trainable_params()``. Nothing runs forward, so this takes a few seconds on CPU.
Shares are given of the 12-layer stack and of a whole BERT-base (stack + embeddings + pooler, counted
analytically: vocab 30522, 512 positions, 2 token types).

    PYTHONPATH=. python scripts/param_share.py
"""
import argparse

import numpy as np
from mindspore import nn

from mindpet.delta import AdapterDense, LoRADense, LowRankAdapterDense, PrefixEncoder, PrefixLayer
from mindpet.graph import freeze_delta

HIDDEN, HEADS, FFN, LAYERS = 768, 12, 3072, 12
EMBEDDINGS = 30522 * HIDDEN + 512 * HIDDEN + 2 * HIDDEN + 2 * HIDDEN  # word, position, type, LayerNorm
POOLER = HIDDEN * HIDDEN + HIDDEN


class BertLayer(nn.Cell):
    """Parameter layout of one BERT-base encoder layer (no forward: only counted)."""

    def __init__(self, method, cfg):
        super().__init__()
        dense = lambda i, o: nn.Dense(i, o, weight_init='zeros')  # noqa: E731  (values do not matter here)
        lora = lambda i, o: LoRADense(i, o, cfg['lora_rank'], 2 * cfg['lora_rank'], weight_init='zeros')  # noqa
        self.query = lora(HIDDEN, HIDDEN) if method == 'lora' else dense(HIDDEN, HIDDEN)
        self.key = dense(HIDDEN, HIDDEN)
        self.value = lora(HIDDEN, HIDDEN) if method == 'lora' else dense(HIDDEN, HIDDEN)
        self.attention_output = self._output(method, cfg, HIDDEN)
        self.attention_norm = nn.LayerNorm((HIDDEN,))
        self.intermediate = dense(HIDDEN, FFN)
        self.output = self._output(method, cfg, FFN)
        self.output_norm = nn.LayerNorm((HIDDEN,))
        if method == 'prefixtuning':
            self.prefix = PrefixLayer(cfg['prefix_len'], 1, HEADS, HIDDEN, cfg['prefix_embed'], cfg['prefix_mid'])

    @staticmethod
    def _output(method, cfg, in_dim):
        # Houlsby: an adapter after the attention output projection and after the FFN output projection.
        if method == 'adapter':
            return AdapterDense(in_dim, HIDDEN, weight_init='zeros', bottleneck_size=cfg['bottleneck'])
        if method == 'low_rank_adapter':
            return LowRankAdapterDense(in_dim, HIDDEN, weight_init='zeros', reduction_factor=cfg['reduction'],
                                       low_rank_size=cfg['low_rank'])
        return nn.Dense(in_dim, HIDDEN, weight_init='zeros')


class Stack(nn.Cell):
    def __init__(self, method, cfg):
        super().__init__()
        self.layers = nn.CellList([BertLayer(method, cfg) for _ in range(LAYERS)])
        if method == 'ptuning2':
            self.prefix_encoder = PrefixEncoder(cfg['pre_seq_len'], LAYERS, HEADS, HIDDEN // HEADS,
                                                cfg['projection'], cfg['projection_dim'], 0.0)


def count(params):
    return int(sum(np.prod(p.shape) for p in params))


def measure(label, method, cfg, mode=None, exclude=None, exported=None):
    stack = Stack(method, cfg)
    base = count(p for p in stack.get_parameters() if 'mindpet_' not in p.name)
    freeze_delta(stack, mode or method, exclude=exclude)
    trainable = count(stack.trainable_params()) if exported is None else exported
    return label, trainable, base


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.parse_args()
    cfg = dict(lora_rank=8, bottleneck=64, reduction=16, low_rank=1, prefix_len=10, prefix_embed=512,
               prefix_mid=512, pre_seq_len=128, projection=False, projection_dim=512)
    rows = [
        measure('LoRA r=8 on query+value (reference)', 'lora', cfg),
        measure('Adapter bottleneck 64, 2 per layer', 'adapter', cfg),
        measure('Low-rank adapter reduction 16 (m=48), k=1, 2 per layer', 'low_rank_adapter', cfg),
        measure('Prefix-Tuning P=10, embed 512, mid 512: training (MLP)', 'prefixtuning', cfg),
        measure('Prefix-Tuning P=10: exported prefix (MLP dropped)', 'prefixtuning', cfg,
                exported=LAYERS * 2 * cfg['prefix_len'] * HIDDEN),
        measure('P-Tuning v2 pre_seq_len 128, no projection', 'ptuning2', cfg),
        measure('P-Tuning v2 pre_seq_len 128, projection 512', 'ptuning2', dict(cfg, projection=True)),
        measure('BitFit (*bias)', 'bitfit', cfg),
        measure('BitFit + LayerNorm beta', 'bitfit', cfg, exclude=['*beta']),
    ]
    print(f'BERT-base-sized stack: {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, FFN {FFN}')
    print('| method | trainable | % of 12-layer stack | % of BERT-base |')
    print('|---|---:|---:|---:|')
    for label, trainable, base in rows:
        print(f'| {label} | {trainable:,} | {100 * trainable / base:.3f}% | '
              f'{100 * trainable / (base + EMBEDDINGS + POOLER):.3f}% |')
    print(f'(stack {rows[0][2]:,} base parameters; BERT-base {rows[0][2] + EMBEDDINGS + POOLER:,})')


if __name__ == '__main__':
    main()
