"""AdaLoRA for :func:`mindpet.get_pet_model`: the config, the tuner that injects
:class:`mindpet.delta.adalora.AdaLoRADense` in place of ``nn.Dense`` layers, and the training hook (orthogonality
regulariser in the loss, :class:`mindpet.delta.adalora.AdaLoRAAllocator` after every step).

An adapter stores every layer's ``P``, ``lambda`` and ``Q`` at the initial rank ``init_r``; the singular values the
allocator pruned are exact zeros in ``lambda`` and the kept rank per layer is written to the saved config as
``rank_pattern``. It merges into the base weights like LoRA: ``W <- W + (lora_alpha / init_r) P diag(lambda) Q``.
"""
import dataclasses
from typing import Union

import numpy as np
from mindspore import Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import initializer, Normal

from mindpet.delta.adalora import AdaLoRADense, AdaLoRAAllocator, adalora_increment
from mindpet.tuners.base import DenseLayerTuner, naming_layer
from mindpet.tuners.config import PetConfig, TARGETS_REQUIRED, RankScheduleFields
from mindpet.tuners.hooks import RankAllocationHook, schedule_steps
from mindpet.tuners.registry import register_method
from mindpet.utils.validation import FieldValueError, check_int, check_real, check_rate

P, LAMBDA, Q = 'mindpet_delta_adalora_p', 'mindpet_delta_adalora_lambda', 'mindpet_delta_adalora_q'


@dataclasses.dataclass
class _AdaLoraRankFields(PetConfig):
    """AdaLoRA's own fields, before the shared schedule fields (see :class:`RankScheduleFields`)."""
    init_r: int = 12
    target_r: int = 8
    lora_alpha: Union[int, float] = 8
    lora_dropout: float = 0.0


@dataclasses.dataclass
class AdaLoraConfig(RankScheduleFields, _AdaLoraRankFields):
    """AdaLoRA hyper-parameters for :func:`mindpet.get_pet_model` (defaults as in the paper's code).

    Args:
        target_modules (list[str] | str): cells to adapt (plain ``nn.Dense``), by regex full-match or name suffix.
        init_r (int): initial rank of every layer. Default 12.
        target_r (int): mean rank per layer at the end (``target_r * layers`` singular values survive). Default 8.
        lora_alpha (int | float): non-zero; the increment is scaled by ``lora_alpha / init_r``. Default 8.
        lora_dropout (float): dropout in [0, 1) on the increment's input. Default 0.0.
        t_init (int): steps before the budget starts falling. Default 0.
        t_final (int): last steps with the final, fixed allocation. Default 0.
        delta_t (int): steps between two re-allocations while the budget falls. Default 1.
        beta1, beta2 (float): smoothing of sensitivity and uncertainty, in [0, 1). Default 0.85.
        orth_reg_weight (float): weight (>= 0) of ``||P^T P - I||^2 + ||Q Q^T - I||^2`` in the loss. Default 0.5.
        total_step (int | None): training steps (or pass ``total_steps`` to ``pet.training_hook``). Default None.
        compute_dtype (str | None): 'float32', 'float16' or 'bfloat16' for the matmuls; None (default): the
            weight's dtype.
        rank_pattern (dict | None): written when the adapter is saved: ``layer -> kept rank`` (what the allocator
            decided). A record; it does not shape a new adapter.
        exclude_modules, modules_to_save: see :class:`PetConfig`.

    Example:
        >>> cfg = AdaLoraConfig(target_modules=['q_proj', 'v_proj'], init_r=12, target_r=4, total_step=1000)
        >>> cfg.to_dict()['type']
        'adalora'
    """
    targets_required = TARGETS_REQUIRED

    def validate(self):
        super().validate()
        owner = type(self).__name__
        check_int('init_r', self.init_r, owner)
        check_int('target_r', self.target_r, owner, min_value=0, max_value=self.init_r)
        check_real('lora_alpha', self.lora_alpha, owner, nonzero=True)
        if self.lora_dropout == 0 and type(self.lora_dropout) is int:  # pylint: disable=unidiomatic-typecheck
            self.lora_dropout = 0.0    # YAML writes 'lora_dropout: 0'
        check_rate('lora_dropout', self.lora_dropout, owner)
        self.check_schedule(owner)

    @property
    def scaling(self):
        """``lora_alpha / init_r``."""
        return self.lora_alpha / self.init_r


class AdaLoraTuner(DenseLayerTuner):
    """Injects :class:`AdaLoRADense` in place of ``nn.Dense`` layers (keeping their weight and bias Parameters);
    stores, switches and merges AdaLoRA adapters; its training hook allocates the rank."""
    layer_class = AdaLoRADense

    def create_layer(self, cell, config, key=None):
        with naming_layer(key, {'adalora_rank': 'init_r'}):
            return self.build_layer(AdaLoRADense, cell, config.compute_dtype, adalora_rank=config.init_r,
                                    adalora_alpha=config.lora_alpha, adalora_dropout=config.lora_dropout)

    def check_reuse(self, key, layer, config):
        if layer.adalora_rank != config.init_r:
            raise FieldValueError(f"For 'get_pet_model', the layer '{key}' holds AdaLoRA adapters of init_r="
                                  f"{layer.adalora_rank}; an AdaLoRA adapter on it must use the same init_r, but got "
                                  f"{config.init_r}.", field='init_r')

    def adapter_shapes(self, weight_shape, config):
        out_channels, in_channels = weight_shape
        return {P: (out_channels, config.init_r), LAMBDA: (config.init_r,), Q: (config.init_r, in_channels)}

    def read_live(self, layer, config):
        return {name: getattr(layer, name).asnumpy().copy() for name in (P, LAMBDA, Q)}

    def write_live(self, layer, config, tensors):
        for name, value in tensors.items():
            param = getattr(layer, name)
            param.set_data(Tensor(value, param.dtype))
        return False

    def init_adapter(self, layer, config):
        def draw(shape):
            return initializer(Normal(0.02), list(shape), mstype.float32).init_data().asnumpy()

        return {P: draw((layer.out_channels, config.init_r)), LAMBDA: np.zeros((config.init_r,), np.float32),
                Q: draw((config.init_r, layer.in_channels))}

    def activate(self, layer, config):
        layer.scaling = config.scaling
        if not layer.merged:
            layer.mindpet_state_adalora_scaling.set_data(Tensor(config.scaling, mstype.float32))

    def deactivate(self, layer):
        layer.mindpet_state_adalora_scaling.set_data(Tensor(0.0, mstype.float32))

    def sync_scaling(self, layer, config):
        layer.scaling = config.scaling

    def merge_weights(self, params, key, tensors, config):
        name = f'{key}.weight'
        weight = params[name]
        merged = weight.astype(np.float32) + adalora_increment(tensors[P], tensors[LAMBDA], tensors[Q],
                                                               config.scaling)
        return {name: merged.astype(weight.dtype)}

    def saved_config(self, config, tensors):
        return config.replace(rank_pattern={key: int(np.count_nonzero(t[LAMBDA])) for key, t in tensors.items()})

    def training_hook(self, pet, config, total_steps):
        steps = schedule_steps(self.method, config, total_steps)
        allocator = AdaLoRAAllocator(pet.base_model, steps, target_rank=config.target_r, t_init=config.t_init,
                                     t_final=config.t_final, delta_t=config.delta_t, beta1=config.beta1,
                                     beta2=config.beta2)
        return RankAllocationHook(pet, allocator, config.orth_reg_weight)


register_method('adalora', AdaLoraConfig, AdaLoraTuner)
