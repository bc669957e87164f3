"""Delta (parameter-efficient) Cells, one module per method."""
from mindpet.delta.lora import LoRADense

__all__ = ['LoRADense']
