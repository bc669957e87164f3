"""Delta (parameter-efficient) Cells, one module per method."""
from mindpet.delta.lora import LoRADense, LoraLayer
from mindpet.delta.adapter import AdapterDense, AdapterLayer
from mindpet.delta.low_rank_adapter import LowRankAdapterDense, LowRankAdapterLayer
from mindpet.delta.prefix_layer import PrefixLayer, StaticPrefix, PrefixAttention, concat_prefix, export_prefixes
from mindpet.delta.ptuning2 import PrefixEncoder
from mindpet.delta.r_drop import RDropLoss, rdrop_repeat
from mindpet.delta.dora import DoRADense, DoraLayer
from mindpet.delta.ia3 import IA3Dense, IA3Layer
from mindpet.delta.prompt_tuning import PromptTuningEmbedding
from mindpet.delta.pst import PSTDense, PSTSparsityScheduler
from mindpet.delta.adalora import AdaLoRADense, AdaLoRAAllocator
from mindpet.delta.tsvd import TSVDGroup, TSVDDense, TSVDAllocator

__all__ = ['LoRADense', 'AdapterDense', 'AdapterLayer', 'LowRankAdapterDense', 'LowRankAdapterLayer', 'PrefixLayer',
           'StaticPrefix', 'PrefixAttention', 'concat_prefix', 'export_prefixes', 'PrefixEncoder', 'RDropLoss',
           'rdrop_repeat', 'DoRADense', 'IA3Dense', 'PromptTuningEmbedding', 'PSTDense', 'PSTSparsityScheduler',
           'AdaLoRADense', 'AdaLoRAAllocator', 'TSVDGroup', 'TSVDDense', 'TSVDAllocator',
           # the delta Cells around the other layer types (mindpet.delta.layer_kinds)
           'LoraLayer', 'DoraLayer', 'IA3Layer']
