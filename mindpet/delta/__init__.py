"""Delta (parameter-efficient) Cells, one module per method."""
from mindpet.delta.lora import LoRADense

__all__ = ['LoRADense']
from mindpet.delta.dora import DoRADense  # noqa: E402
__all__ += ['DoRADense']
from mindpet.delta.ia3 import IA3Dense  # noqa: E402
__all__ += ['IA3Dense']
from mindpet.delta.prompt_tuning import PromptTuningEmbedding  # noqa: E402
__all__ += ['PromptTuningEmbedding']
from mindpet.delta.pst import PSTDense, PSTSparsityScheduler  # noqa: E402
__all__ += ['PSTDense', 'PSTSparsityScheduler']
from mindpet.delta.adalora import AdaLoRADense, AdaLoRAAllocator  # noqa: E402
__all__ += ['AdaLoRADense', 'AdaLoRAAllocator']
from mindpet.delta.tsvd import TSVDGroup, TSVDDense, TSVDAllocator  # noqa: E402
__all__ += ['TSVDGroup', 'TSVDDense', 'TSVDAllocator']
