"""The tensorised t-SVD adapter for :func:`mindpet.get_pet_model`: the config, the tuner that groups same-shaped
target layers across blocks and injects :class:`mindpet.delta.tsvd.TSVDDense` layers sharing one
:class:`mindpet.delta.tsvd.TSVDGroup` per group, and the training hook (orthogonality regulariser,
:class:`mindpet.delta.tsvd.TSVDAllocator` after every step).

Grouping: the matched layers are grouped, in model order, by weight shape and (``group_by='name'``, the default)
by their name with the block indices (all-digit name components) replaced, so ``blocks.0.attn.q_proj`` ..
``blocks.11.attn.q_proj`` form one group of ``L = 12`` layers; ``group_by='shape'`` puts every same-shaped matched
layer in one group. Layer ``l`` of a group is slice ``l`` of its tensor.

Names: a group's factors are registered under its first layer only, with the full names
``<first layer>.tsvd_group.mindpet_delta_tsvd_{u,s,v}`` (what ``parameters_and_names()`` reports). The adapter file
holds them under the same names; the group's other layers store no tensor of their own. The kept rank of every group
(``<first layer>.tsvd_group -> tubes``) is written to the saved config as ``rank_pattern``.

Merging adds ``(tsvd_alpha / tsvd_rank) * dT[:, :, l]`` to layer ``l``'s weight, like LoRA.
"""
import dataclasses
import re
from typing import Optional, Union

import numpy as np
from mindspore import Tensor
from mindspore import dtype as mstype

from mindpet.delta.tsvd import TSVDGroup, TSVDDense, TSVDAllocator, orthogonal_init, tsvd_increments
from mindpet.tuners.base import DenseLayerTuner, fingerprint_param, naming_layer
from mindpet.tuners.config import PetConfig, TARGETS_REQUIRED, RankScheduleFields
from mindpet.tuners.hooks import RankAllocationHook, schedule_steps
from mindpet.tuners.inject import replace_cell
from mindpet.tuners.registry import register_method
from mindpet.utils.validation import FieldValueError, check_int, check_real, check_choice

GROUP = 'tsvd_group'
U, S, V = (f'{GROUP}.mindpet_delta_tsvd_{k}' for k in 'usv')
GROUP_BY = ('name', 'shape')


@dataclasses.dataclass
class _TensorSVDRankFields(PetConfig):
    """t-SVD's own fields, before the shared schedule fields (see :class:`RankScheduleFields`)."""
    tsvd_rank: int = 8
    tsvd_alpha: Union[int, float] = 8
    target_rank: int = 4
    group_by: str = 'name'
    tsvd_factor_slices: Optional[int] = None


@dataclasses.dataclass
class TensorSVDConfig(RankScheduleFields, _TensorSVDRankFields):
    """Hyper-parameters of the t-SVD adapter for :func:`mindpet.get_pet_model`.

    Args:
        target_modules (list[str] | str): cells to adapt (plain ``nn.Dense``), by regex full-match or name suffix.
        tsvd_rank (int): singular tubes ``k`` per group, at most ``min(in, out)`` of its layers. Default 8.
        tsvd_alpha (int | float): non-zero; increments are scaled by ``tsvd_alpha / tsvd_rank``. Default 8.
        target_rank (int): mean number of tubes per group kept at the end. Default 4.
        group_by (str): 'name' (default): same-shaped layers whose names differ only in block indices share a
            tensor; 'shape': all same-shaped matched layers share one.
        tsvd_factor_slices (int | None): ``P``, the frontal slices U and V keep (the others zero), at most the
            layers of every group; None (default): all ``L``. ``1``: the group's layers share their singular
            vectors and each has its own singular values (``k (out + in) + k L`` trainable values per group
            instead of ``k L (out + in + 1)``).
        t_init, t_final, delta_t (int): the budget schedule (see :class:`AdaLoraConfig`). Defaults 0, 0, 1 (a
            decision after every batch).
        beta1, beta2 (float): smoothing of the gradient smoothness and uncertainty, in [0, 1). Default 0.85.
        orth_reg_weight (float): weight (>= 0) of ``||U^T * U - I||^2 + ||V^T * V - I||^2``. Default 0.5.
        total_step (int | None): training steps (or pass ``total_steps`` to ``pet.training_hook``). Default None.
        compute_dtype (str | None): 'float32', 'float16' or 'bfloat16' for the input-side matmuls; None (default):
            the weight's dtype.
        rank_pattern (dict | None): written when the adapter is saved: ``<first layer>.tsvd_group -> kept tubes``.
            A record; it does not shape a new adapter.
        exclude_modules, modules_to_save: see :class:`PetConfig`.

    Example:
        >>> cfg = TensorSVDConfig(target_modules=['q_proj', 'v_proj'], tsvd_rank=8, target_rank=4, total_step=500)
        >>> cfg.to_dict()['type']
        'tsvd'
    """
    targets_required = TARGETS_REQUIRED

    def validate(self):
        super().validate()
        owner = type(self).__name__
        check_int('tsvd_rank', self.tsvd_rank, owner)
        check_real('tsvd_alpha', self.tsvd_alpha, owner, nonzero=True)
        check_int('target_rank', self.target_rank, owner, min_value=0, max_value=self.tsvd_rank)
        check_choice('group_by', self.group_by, owner, GROUP_BY)
        if self.tsvd_factor_slices is not None:
            check_int('tsvd_factor_slices', self.tsvd_factor_slices, owner)
        self.check_schedule(owner)

    def factor_slices(self, num_layers):
        """``P`` for a group of ``num_layers`` layers.

        Raises:
            ValueError: ``tsvd_factor_slices`` exceeds ``num_layers``.
        """
        if self.tsvd_factor_slices is None:
            return num_layers
        if self.tsvd_factor_slices > num_layers:
            raise FieldValueError(f"For '{type(self).__name__}', the 'tsvd_factor_slices' must not exceed the number "
                                  f"of layers of a t-SVD group ({num_layers}), but got {self.tsvd_factor_slices}.",
                                  field='tsvd_factor_slices')
        return self.tsvd_factor_slices

    @property
    def scaling(self):
        """``tsvd_alpha / tsvd_rank``."""
        return self.tsvd_alpha / self.tsvd_rank


def layer_groups(keys, weight_shapes, group_by='name'):
    """The groups of layer keys that share one t-SVD tensor, each in the order of ``keys`` (model order), the
    groups in the order of their first layer.

    Example:
        >>> shapes = {k: (8, 8) for k in ('b.0.q', 'b.0.v', 'b.1.q', 'b.1.v')}
        >>> layer_groups(['b.0.q', 'b.0.v', 'b.1.q', 'b.1.v'], shapes)
        [['b.0.q', 'b.1.q'], ['b.0.v', 'b.1.v']]
        >>> layer_groups(['b.0.q', 'b.0.v', 'b.1.q', 'b.1.v'], shapes, 'shape')
        [['b.0.q', 'b.0.v', 'b.1.q', 'b.1.v']]
    """
    groups = {}
    for key in keys:
        signature = (tuple(weight_shapes[key]),)
        if group_by == 'name':
            signature += ('.'.join('*' if part.isdigit() else part for part in key.split('.')),)
        groups.setdefault(signature, []).append(key)
    return list(groups.values())


def group_name(first_key):
    """The name of a group's Cell (and the prefix of its factors): ``<first layer>.tsvd_group``."""
    return f'{first_key}.{GROUP}'


class TensorSVDTuner(DenseLayerTuner):
    """Injects :class:`TSVDDense` layers sharing one :class:`TSVDGroup` per group of same-shaped target layers;
    stores, switches and merges t-SVD adapters; its training hook allocates the tubes."""
    layer_class = TSVDDense

    def inject(self, model, config, layers):
        holders, matches = self.match(model, config, layers)
        keys = [key for key, _, _ in matches]
        cells = {key: cell for key, cell, _ in matches}
        fresh = {key for key, _, is_new in matches if is_new}
        groups = layer_groups(keys, {key: tuple(cells[key].weight.shape) for key in keys}, config.group_by)
        # Every check and every new Cell first, so that a refused config leaves the model untouched.
        created = []
        for members in groups:
            new = [key for key in members if key in fresh]
            if not new:
                self._check_live_group(members, layers, config)
                continue
            if len(new) != len(members):
                raise ValueError(f"For 'get_pet_model', the t-SVD group {members} mixes layers an earlier adapter "
                                 f"adapted ({[k for k in members if k not in fresh]}) with new ones; adapters on one "
                                 f"model must group the same layers.")
            first = cells[members[0]]
            with naming_layer(members[0]):
                group = TSVDGroup(first.in_channels, first.out_channels, len(members), tsvd_rank=config.tsvd_rank,
                                  tsvd_alpha=config.tsvd_alpha, tsvd_factor_slices=config.factor_slices(len(members)))
            new_layers = []
            for index, key in enumerate(members):
                with naming_layer(key):
                    new_layers.append(self.build_layer(TSVDDense, cells[key], config.compute_dtype,
                                                       tsvd_group=group, tsvd_index=index))
            created.append((members, group, new_layers))
        for members, group, new_layers in created:
            for key, layer in zip(members, new_layers):
                layers[key] = replace_cell(holders, cells[key], layer, key + '.')
            # Each replacement renamed the shared factors after its own layer; name them once after the first
            # layer, as parameters_and_names() (and so every checkpoint) reports them.
            group.update_parameters_name(members[0] + f'.{GROUP}.')
        return keys, bool(created)

    @staticmethod
    def _check_live_group(members, layers, config):
        group = layers[members[0]].tsvd_group
        live = sorted((key for key, layer in layers.items() if layer.tsvd_group is group),
                      key=lambda key: layers[key].tsvd_index)
        if live != members:
            raise ValueError(f"For 'get_pet_model', the t-SVD config groups the adapted layers as {members}, but "
                             f"they share a tensor with {live}; adapters on one model must group the same layers.")
        for field, live, wanted in (('tsvd_rank', group.tsvd_rank, config.tsvd_rank),
                                    ('tsvd_factor_slices', group.tsvd_factor_slices,
                                     config.factor_slices(len(members)))):
            if live != wanted:
                raise FieldValueError(f"For 'get_pet_model', the t-SVD group of {members[0]!r} holds adapters of "
                                      f"{field}={live}; a t-SVD adapter on it must use the same {field}, but got "
                                      f"{wanted}.", field=field)

    def adapter_tensor_shapes(self, targets, fingerprint, config, source):
        weight_shapes = {key: tuple(fingerprint_param(fingerprint, key, 'weight', source)) for key in targets}
        shapes = {key: {} for key in targets}
        for members in layer_groups(targets, weight_shapes, config.group_by):
            out_channels, in_channels = weight_shapes[members[0]]
            k, length = config.tsvd_rank, len(members)
            kept = config.factor_slices(length)
            shapes[members[0]] = {U: (out_channels, k, kept), S: (k, length), V: (in_channels, k, kept)}
        return shapes

    @staticmethod
    def _owns_group(layer):
        return layer.tsvd_index == 0

    def read_live(self, layer, config):
        if not self._owns_group(layer):
            return {}
        group = layer.tsvd_group
        return {U: group.mindpet_delta_tsvd_u.asnumpy().copy(), S: group.mindpet_delta_tsvd_s.asnumpy().copy(),
                V: group.mindpet_delta_tsvd_v.asnumpy().copy()}

    def write_live(self, layer, config, tensors):
        for name, value in tensors.items():
            param = getattr(layer.tsvd_group, name.rsplit('.', 1)[-1])
            param.set_data(Tensor(value, param.dtype))
        return False

    def init_adapter(self, layer, config):
        if not self._owns_group(layer):
            return {}
        group = layer.tsvd_group
        k, length, kept = config.tsvd_rank, group.num_layers, group.tsvd_factor_slices
        return {U: orthogonal_init(group.out_channels, k, length, slices=kept), S: np.zeros((k, length), np.float32),
                V: orthogonal_init(group.in_channels, k, length, slices=kept)}

    def sync_scaling(self, layer, config):
        # Host-side copies used by merge()/unmerge() and increments(); the graph reads the Parameter.
        layer.scaling = config.scaling
        layer.tsvd_group.scaling = config.scaling

    def activate(self, layer, config):
        self.sync_scaling(layer, config)
        if not layer.merged:
            layer.mindpet_state_tsvd_scaling.set_data(Tensor(config.scaling, mstype.float32))

    def deactivate(self, layer):
        layer.mindpet_state_tsvd_scaling.set_data(Tensor(0.0, mstype.float32))

    def merge_adapter_weights(self, params, targets, tensors, config):
        shapes = {key: params[f'{key}.weight'].shape for key in targets}
        updates = {}
        for members in layer_groups(targets, shapes, config.group_by):
            factors = tensors[members[0]]
            increments = tsvd_increments(factors[U], factors[S], factors[V], config.scaling)
            for index, key in enumerate(members):
                name = f'{key}.weight'
                weight = params[name]
                updates[name] = (weight.astype(np.float32) + increments[:, :, index]).astype(weight.dtype)
        return updates

    def saved_config(self, config, tensors):
        pattern = {group_name(key): int(np.count_nonzero(np.any(t[S] != 0, axis=1)))
                   for key, t in tensors.items() if S in t}
        return config.replace(rank_pattern=pattern)

    def training_hook(self, pet, config, total_steps):
        steps = schedule_steps(self.method, config, total_steps)
        allocator = TSVDAllocator(pet.base_model, steps, target_rank=config.target_rank, t_init=config.t_init,
                                  t_final=config.t_final, delta_t=config.delta_t, beta1=config.beta1,
                                  beta2=config.beta2)
        return RankAllocationHook(pet, allocator, config.orth_reg_weight)


register_method('tsvd', TensorSVDConfig, TensorSVDTuner)
