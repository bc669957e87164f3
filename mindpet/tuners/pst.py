"""PST (parameter-efficient sparse training) for :func:`mindpet.get_pet_model`: the config, the tuner that injects
:class:`mindpet.delta.pst.PSTDense` in place of ``nn.Dense`` layers, and the training hook that moves the sparsity
along its cubic schedule.

An adapter holds, per layer, ``U, V, A, B, R, C`` and the layer's current sparsity (``mindpet_state_pst_sparsity``,
a scalar): the mask is recomputed from them, so the adapter file reproduces the layer exactly at the sparsity it
was saved with (the final sparsity after a full schedule).

Merging writes the sparse weight ``M * (W0 + U V)`` into ``weight``; ``unmerge()`` restores the dense ``W0``
bit-exactly from a host copy kept while merged (pruned entries cannot be recovered from the sparse weight).
``merge_and_unload()`` and ``mindpet merge`` produce the sparse weights only: the dense base is not in their output.
"""
import dataclasses
import math
from typing import Optional

import numpy as np
from mindspore import Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import initializer, HeUniform, Normal

from mindpet.delta.pst import PSTDense, PSTSparsityScheduler, sparse_export, _check_sparsity
from mindpet.tuners.base import DenseLayerTuner, naming_layer
from mindpet.tuners.config import PetConfig, TARGETS_REQUIRED, check_compute_dtype, check_total_step
from mindpet.tuners.hooks import TrainingHook, schedule_steps
from mindpet.tuners.registry import register_method
from mindpet.utils.validation import FieldValueError, check_int

U, V, A, B, R, C = (f'mindpet_delta_pst_{k}' for k in 'uvabrc')
SPARSITY = 'mindpet_state_pst_sparsity'


@dataclasses.dataclass
class PstConfig(PetConfig):
    """PST hyper-parameters for :func:`mindpet.get_pet_model` (defaults: the paper's reference setting).

    Args:
        target_modules (list[str] | str): cells to prune and adapt (plain ``nn.Dense``), by regex full-match or
            name suffix.
        r_w (int): rank of the weight update ``U V``. Default 8.
        r_m (int): rank of the data-driven importance ``A B``. Default 8.
        initial_sparsity (float): sparsity in [0, 1) before the schedule starts. Default 0.0.
        final_sparsity (float): sparsity in [0, 1) reached at the end. Default 0.9.
        warmup_fraction (float): share of the steps before the sparsity starts rising. Default 0.1.
        cooldown_fraction (float): share of the last steps at the final sparsity. Default 0.1.
        total_step (int | None): training steps of the schedule (or pass ``total_steps`` to
            ``pet.training_hook``). Default None.
        compute_dtype (str | None): 'float32', 'float16' or 'bfloat16' for the input-side matmul; None (default):
            the weight's dtype. Scores and mask are always float32.
        exclude_modules, modules_to_save: see :class:`PetConfig`.

    Example:
        >>> cfg = PstConfig(target_modules=['q_proj', 'v_proj', 'fc_in', 'fc_out'], total_step=1000)
        >>> cfg.final_sparsity, cfg.r_w
        (0.9, 8)
    """
    r_w: int = 8
    r_m: int = 8
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.9
    warmup_fraction: float = 0.1
    cooldown_fraction: float = 0.1
    total_step: Optional[int] = None
    compute_dtype: Optional[str] = None
    targets_required = TARGETS_REQUIRED

    def validate(self):
        super().validate()
        owner = type(self).__name__
        check_int('r_w', self.r_w, owner)
        check_int('r_m', self.r_m, owner)
        for name in ('initial_sparsity', 'final_sparsity', 'warmup_fraction', 'cooldown_fraction'):
            setattr(self, name, _check_sparsity(name, getattr(self, name), owner))
        if self.warmup_fraction + self.cooldown_fraction >= 1.0:
            raise FieldValueError(f"For '{owner}', 'warmup_fraction' + 'cooldown_fraction' must be < 1, but got "
                                  f"{self.warmup_fraction!r} + {self.cooldown_fraction!r}.", field='cooldown_fraction')
        check_total_step(owner, self.total_step)
        check_compute_dtype(owner, self.compute_dtype)

    def schedule(self):
        """The keyword arguments of :class:`mindpet.delta.pst.PSTSparsityScheduler` / ``cubic_sparsity``."""
        return dict(initial_sparsity=self.initial_sparsity, final_sparsity=self.final_sparsity,
                    warmup_fraction=self.warmup_fraction, cooldown_fraction=self.cooldown_fraction)


class PstTrainingHook(TrainingHook):
    """Sets every PST layer's sparsity for step ``i`` before the step runs (:class:`PSTSparsityScheduler`).

    Attributes:
        scheduler (PSTSparsityScheduler): its ``report()`` gives ``layer -> (kept, total, sparsity)``.
    """

    def __init__(self, pet, scheduler):
        super().__init__(pet)
        self.scheduler = scheduler

    def before_step(self, step):
        self.scheduler.step(step)

    def report(self):
        """``layer name -> (kept entries, total entries, sparsity of the current mask)``."""
        return self.scheduler.report()


class PstTuner(DenseLayerTuner):
    """Injects :class:`PSTDense` in place of ``nn.Dense`` layers (keeping their weight and bias Parameters);
    stores, switches and merges PST adapters."""
    layer_class = PSTDense

    def create_layer(self, cell, config, key=None):
        with naming_layer(key, {'pst_rank_w': 'r_w', 'pst_rank_m': 'r_m'}):
            return self.build_layer(PSTDense, cell, config.compute_dtype, pst_rank_w=config.r_w,
                                    pst_rank_m=config.r_m, pst_sparsity=config.initial_sparsity)

    def check_reuse(self, key, layer, config):
        if (layer.pst_rank_w, layer.pst_rank_m) != (config.r_w, config.r_m):
            raise FieldValueError(f"For 'get_pet_model', the layer '{key}' holds PST adapters with "
                                  f"r_w={layer.pst_rank_w}, r_m={layer.pst_rank_m}; a PST adapter on it must use the "
                                  f"same ranks, but got r_w={config.r_w}, r_m={config.r_m}.",
                                  field='r_w' if layer.pst_rank_w != config.r_w else 'r_m')

    def adapter_shapes(self, weight_shape, config):
        out_channels, in_channels = weight_shape
        return {U: (out_channels, config.r_w), V: (config.r_w, in_channels), A: (out_channels, config.r_m),
                B: (config.r_m, in_channels), R: (out_channels,), C: (in_channels,), SPARSITY: ()}

    def read_live(self, layer, config):
        tensors = {name: getattr(layer, name).asnumpy().copy() for name in (U, V, A, B, R, C)}
        # A scalar Parameter may come back from a compiled graph as shape (1,); the adapter keeps it 0-d.
        tensors[SPARSITY] = np.array(layer.sparsity, np.float32)
        return tensors

    def write_live(self, layer, config, tensors):
        for name, value in tensors.items():
            param = getattr(layer, name)
            param.set_data(Tensor(np.reshape(value, param.shape), param.dtype))
        return False

    def init_adapter(self, layer, config):
        out_channels, in_channels = layer.out_channels, layer.in_channels

        def draw(init, shape):
            return initializer(init, list(shape), mstype.float32).init_data().asnumpy()

        return {U: np.zeros((out_channels, config.r_w), np.float32),
                V: draw(HeUniform(negative_slope=math.sqrt(5)), (config.r_w, in_channels)),
                A: np.zeros((out_channels, config.r_m), np.float32),
                B: draw(Normal(0.02), (config.r_m, in_channels)),
                R: np.zeros((out_channels,), np.float32), C: np.zeros((in_channels,), np.float32),
                SPARSITY: np.array(config.initial_sparsity, np.float32)}

    def activate(self, layer, config):
        if not layer.merged:
            layer.mindpet_state_pst_gate.set_data(Tensor(1.0, mstype.float32))

    def deactivate(self, layer):
        # Gate 0: the layer computes W0 x + b exactly (the PST branch is multiplied by 0).
        layer.mindpet_state_pst_gate.set_data(Tensor(0.0, mstype.float32))

    def merge_weights(self, params, key, tensors, config):
        name = f'{key}.weight'
        return {name: sparse_export(params[name], tensors[U], tensors[V], tensors[A], tensors[B], tensors[R],
                                    tensors[C], tensors[SPARSITY])}

    def training_hook(self, pet, config, total_steps):
        steps = schedule_steps(self.method, config, total_steps)
        return PstTrainingHook(pet, PSTSparsityScheduler(pet.base_model, steps, **config.schedule()))


register_method('pst', PstConfig, PstTuner)
