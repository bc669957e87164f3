"""Delta (parameter-efficient) Cells, one module per method."""
from mindpet.delta.lora import LoRADense
from mindpet.delta.adapter import AdapterDense, AdapterLayer
from mindpet.delta.low_rank_adapter import LowRankAdapterDense, LowRankAdapterLayer
from mindpet.delta.prefix_layer import PrefixLayer, StaticPrefix, PrefixAttention, concat_prefix, export_prefixes
from mindpet.delta.ptuning2 import PrefixEncoder
from mindpet.delta.r_drop import RDropLoss, rdrop_repeat

__all__ = ['LoRADense']
__all__ += ['AdapterDense', 'AdapterLayer', 'LowRankAdapterDense', 'LowRankAdapterLayer', 'PrefixLayer',
            'StaticPrefix', 'PrefixAttention', 'concat_prefix', 'export_prefixes',
            'PrefixEncoder', 'RDropLoss', 'rdrop_repeat']
