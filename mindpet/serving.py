"""Mixed-adapter batches: one forward in which every row of the batch uses its own LoRA adapter (or none).

:class:`MixedLoraModel` is a serving view of a :class:`mindpet.PetModel` holding several LoRA adapters. It puts a
:class:`MixedLoraDense` in place of each of the model's LoRA layers while it is open. That layer holds every
adapter's ``A`` and ``B`` stacked (``[n + 1, r, in]`` and ``[n + 1, out, r]``, slot 0 being all zeros: "no
adapter") and gathers each row's factors by the row's adapter index, which is Parameter data. A new mix of adapters
therefore only changes that Parameter's data and runs in the graph already compiled; only a new batch size
recompiles.

The training path is untouched: :class:`mindpet.delta.LoRADense` has no per-row logic, and :meth:`MixedLoraModel.close`
(or leaving its ``with`` block) puts the PetModel's own layers back.

Each row ``i`` of a layer's input ``x`` (``[batch, ..., in]``, rows first) gets

    y_i = x_i W^T + b + s_k x_i A_k^T B_k^T        with k = the row's adapter (s_0 = 0, A_0 = B_0 = 0)

which is what the PetModel computes with adapter ``k`` active alone.
"""
from types import SimpleNamespace

import numpy as np
from mindspore import nn, ops, Parameter, Tensor
from mindspore import dtype as mstype

from mindpet.delta.lora import LoRADense
from mindpet.tuners.inject import walk, replace_cell, invalidate_compiled_graph

INDEX_NAME = 'mindpet_state_mixed_adapter_index'


class MixedLoraDense(nn.Cell):
    """A LoRA ``nn.Dense`` serving a batch whose rows use different adapters (inference only).

    It shares the base ``weight``/``bias`` Parameter objects of ``layer`` (a :class:`mindpet.delta.LoRADense`) and
    holds the adapters' factors stacked: ``mindpet_state_mixed_lora_a`` ``[n + 1, r, in]``,
    ``mindpet_state_mixed_lora_b`` ``[n + 1, out, r]`` and ``mindpet_state_mixed_lora_scaling`` ``[n + 1]`` (slot 0
    zeros: no adapter; ``r`` the largest rank, smaller ranks zero-padded, which adds exact zeros).

    Args:
        layer (LoRADense): the PetModel's layer (base weight, bias, activation, compute dtype).
        stack_a, stack_b, scalings (numpy.ndarray): the stacked factors and scalings, slot 0 zeros.
        adapter_index (Parameter): int32 ``[batch]``, the adapter slot of each row; shared by all layers of a view.

    Inputs:
        x (Tensor): ``[batch, ..., in]`` (or ``[batch * k, in]`` with each row's ``k`` entries contiguous).

    Outputs:
        Tensor of the shape of ``x`` with ``out`` last, in ``x``'s dtype.

    Example:
        >>> view = MixedLoraModel(pet)  # doctest: +SKIP
        >>> type(view.layers['blocks.0.attn.q_proj']).__name__  # doctest: +SKIP
        'MixedLoraDense'
    """

    def __init__(self, layer, stack_a, stack_b, scalings, adapter_index):
        super().__init__()
        self.weight = layer.weight
        self.has_bias = layer.has_bias
        if self.has_bias:
            self.bias = layer.bias
        self.activation_flag = layer.activation_flag
        self.activation = layer.activation
        self.out_channels = layer.out_channels
        self.compute_dtype = layer.compute_dtype
        self.mindpet_state_mixed_lora_a = Parameter(Tensor(stack_a, layer.mindpet_delta_lora_a.dtype),
                                                    name='mindpet_state_mixed_lora_a', requires_grad=False)
        self.mindpet_state_mixed_lora_b = Parameter(Tensor(stack_b, layer.mindpet_delta_lora_b.dtype),
                                                    name='mindpet_state_mixed_lora_b', requires_grad=False)
        self.mindpet_state_mixed_lora_scaling = Parameter(Tensor(scalings, mstype.float32),
                                                          name='mindpet_state_mixed_lora_scaling', requires_grad=False)
        self.adapter_index = adapter_index
        self.matmul = ops.MatMul(transpose_b=True)
        self.row_matmul = ops.BatchMatMul(transpose_b=True)
        self.cast = ops.Cast()

    def construct(self, x):
        ori_dtype = x.dtype
        x_shape = x.shape
        index = self.adapter_index
        batch = index.shape[0]
        x = self._to_compute(x)
        flat = ops.reshape(x, (-1, x_shape[-1]))
        out = self.matmul(flat, self._to_compute(self.weight))
        if self.has_bias:
            out = ops.bias_add(out, self._to_compute(self.bias))
        # Each row's factors by its slot: [batch, r, in] and [batch, out, r]; the rank-r product stays per row.
        lora_a = self._to_compute(ops.gather(self.mindpet_state_mixed_lora_a, index, 0))
        lora_b = self._to_compute(ops.gather(self.mindpet_state_mixed_lora_b, index, 0))
        scaling = ops.reshape(ops.gather(self.mindpet_state_mixed_lora_scaling, index, 0), (batch, 1, 1))
        rows = ops.reshape(x, (batch, -1, x_shape[-1]))
        lora = self.row_matmul(rows, lora_a)
        lora = lora * self._to_compute(scaling)
        lora = self.row_matmul(lora, lora_b)
        out = out + ops.reshape(lora, (-1, self.out_channels))
        if self.activation_flag:
            out = self.activation(out)
        out = ops.reshape(out, x_shape[:-1] + (self.out_channels,))
        if out.dtype != ori_dtype:
            out = self.cast(out, ori_dtype)
        return out

    def _to_compute(self, tensor):
        if tensor.dtype == self.compute_dtype:
            return tensor
        return self.cast(tensor, self.compute_dtype)


class MixedLoraModel(nn.Cell):
    """A serving view of a LoRA :class:`mindpet.PetModel` that runs each row of a batch with its own adapter.

    While the view is open, the PetModel's network computes through :class:`MixedLoraDense` layers (sharing its base
    weights); :meth:`close` (or the end of a ``with`` block) puts the PetModel's LoRA layers back, unchanged. The
    adapters are copied when the view is built: train or load adapters before, not while it is open.

    Args:
        pet (PetModel): a LoRA PetModel, not merged, outside ``disable_adapter()``; every adapted layer an
            ``nn.Dense`` (:class:`mindpet.delta.LoRADense`), adapters without ``modules_to_save`` and with the
            default initialisation (not PiSSA/OLoRA, which replace the base weight).
        adapter_names (list[str] | None): the adapters to serve, in slot order; None: all of ``pet.adapters``.

    Inputs:
        *args: the network's inputs, batch first. Set the rows' adapters with :meth:`set_rows` or call
        :meth:`forward`.

    Example:
        >>> with MixedLoraModel(pet) as view:  # doctest: +SKIP
        ...     logits = view.forward(input_ids, adapter_names=['shift', None, 'double', 'shift'])
    """

    def __init__(self, pet, adapter_names=None):
        super().__init__(auto_prefix=False)
        owner = 'MixedLoraModel'
        from mindpet.model import PetModel  # pylint: disable=import-outside-toplevel
        if not isinstance(pet, PetModel):
            raise TypeError(f"For '{owner}', the 'pet' must be a PetModel, but got {type(pet).__name__}.")
        state = pet._state  # pylint: disable=protected-access
        names = self._check_pet(owner, pet, state, adapter_names)
        pet._sync()  # pylint: disable=protected-access  (the active adapter's trained values into the store)
        self.base_model = pet.base_model
        self.adapter_index = Parameter(Tensor(np.zeros((1,), np.int32)), name=INDEX_NAME, requires_grad=False)
        # Host-side bookkeeping, kept off the Cell so graph compilation never sees it (as PetModel._state).
        self._view = SimpleNamespace(pet=pet, slots={name: slot for slot, name in enumerate(names, start=1)},
                                     originals=dict(state.layers), layers={}, open=True)
        _, holders = walk(pet.base_model)
        for key, layer in self._view.originals.items():
            stack_a, stack_b, scalings = _stack_layer(state, names, key, layer)
            mixed = MixedLoraDense(layer, stack_a, stack_b, scalings, self.adapter_index)
            replace_cell(holders, layer, mixed, key + '.')
            self._view.layers[key] = mixed
        # replace_cell prefixed the shared index Parameter with each layer's key; it is one Parameter of the view.
        self.adapter_index.name = INDEX_NAME
        invalidate_compiled_graph(pet)

    @property
    def adapter_slots(self):
        """Adapter name -> its slot in the stacked factors (slot 0 is "no adapter")."""
        return dict(self._view.slots)

    @property
    def layers(self):
        """Layer key -> the :class:`MixedLoraDense` in the network while the view is open."""
        return dict(self._view.layers)

    @staticmethod
    def _check_pet(owner, pet, state, adapter_names):
        if state.tuner is None or type(state.tuner).__name__ != 'LoraTuner':
            raise ValueError(f"For '{owner}', the 'pet' must hold LoRA adapters, but it holds "
                             f"{'none' if state.tuner is None else type(state.tuner).__name__}.")
        if state.merged or state.disabled or state.unloaded:
            raise RuntimeError(f"For '{owner}', the 'pet' must not be merged, unloaded or inside "
                               f"'disable_adapter()' (merged={state.merged}, unloaded={state.unloaded}, "
                               f"disabled={state.disabled}).")
        names = pet.adapters if adapter_names is None else adapter_names
        if not isinstance(names, (list, tuple)) or not names or \
                any(not isinstance(n, str) or n not in state.adapters for n in names) or len(set(names)) != len(names):
            raise ValueError(f"For '{owner}', the 'adapter_names' must be None or a non-empty list of distinct "
                             f"adapter names among {pet.adapters}, but got {adapter_names!r}.")
        for key, layer in state.layers.items():
            if type(layer) is not LoRADense:  # pylint: disable=unidiomatic-typecheck
                raise ValueError(f"For '{owner}', the layer '{key}' is a {type(layer).__name__}; mixed batches "
                                 f"serve plain LoRA on nn.Dense layers (LoRADense) only.")
        for name in names:
            record = state.adapters[name]
            if record.modules:
                raise ValueError(f"For '{owner}', the adapter '{name}' has modules_to_save "
                                 f"({sorted(record.modules)[:2]}...); they replace whole cells and cannot differ "
                                 f"per row.")
            if record.config.init_lora_weights is not True:
                raise ValueError(f"For '{owner}', the adapter '{name}' uses init_lora_weights="
                                 f"{record.config.init_lora_weights!r}; only adapters on the unchanged base "
                                 f"weights (init_lora_weights=True) can share a batch.")
        return list(names)

    def construct(self, *args):
        return self.base_model(*args)

    def set_rows(self, adapter_names):
        """Give row ``i`` of the next calls the adapter ``adapter_names[i]`` (None: the base model).

        Only Parameter data changes, so a compiled graph is reused; a new batch size compiles a new graph.

        Raises:
            ValueError: an unknown name (naming it and the served adapters), or an empty list.
            RuntimeError: the view is closed.
        """
        owner = 'MixedLoraModel.set_rows'
        if not self._view.open:
            raise RuntimeError(f"For '{owner}', the view is closed.")
        if not isinstance(adapter_names, (list, tuple)) or not adapter_names:
            raise ValueError(f"For '{owner}', the 'adapter_names' must be a non-empty list (one entry per row), "
                             f"but got {adapter_names!r}.")
        slots = []
        for row, name in enumerate(adapter_names):
            if name is not None and name not in self._view.slots:
                raise ValueError(f"For '{owner}', the 'adapter_names[{row}]' must be None or one of "
                                 f"{list(self._view.slots)}, but got {name!r}.")
            slots.append(0 if name is None else self._view.slots[name])
        slots = np.asarray(slots, np.int32)
        if slots.shape != self.adapter_index.shape:
            self.adapter_index.set_data(Tensor(slots))
            invalidate_compiled_graph(self)
        else:
            self.adapter_index.set_data(Tensor(slots))
        return self

    def forward(self, *args, adapter_names):
        """``set_rows(adapter_names)`` then call the network on ``args`` (batch first, ``len(adapter_names)`` rows).

        Example:
            >>> out = view.forward(ids, adapter_names=['a', None])  # doctest: +SKIP
        """
        self.set_rows(adapter_names)
        return self(*args)

    def close(self):
        """Put the PetModel's own LoRA layers back (its parameters and names as before). Idempotent."""
        view = self._view
        if not view.open:
            return
        _, holders = walk(self.base_model)
        for key, layer in view.originals.items():
            replace_cell(holders, view.layers[key], layer, key + '.')
        view.open = False
        view.layers = {}
        invalidate_compiled_graph(view.pet)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _stack_layer(state, names, key, layer):
    """Slot 0 zeros, slot ``k`` adapter ``names[k-1]`` zero-padded to the largest rank (zeros where it does not
    cover ``key``). Returns float32 ``A [n+1, r, in]``, ``B [n+1, out, r]`` and scalings ``[n+1]``."""
    covering = [(slot, state.adapters[name]) for slot, name in enumerate(names, start=1)
                if key in state.adapters[name].tensors]
    rank = max([record.tensors[key]['mindpet_delta_lora_a'].shape[0] for _, record in covering] or [1])
    stack_a = np.zeros((len(names) + 1, rank, layer.in_channels), np.float32)
    stack_b = np.zeros((len(names) + 1, layer.out_channels, rank), np.float32)
    scalings = np.zeros((len(names) + 1,), np.float32)
    for slot, record in covering:
        lora_a = record.tensors[key]['mindpet_delta_lora_a']
        lora_b = record.tensors[key]['mindpet_delta_lora_b']
        stack_a[slot, :lora_a.shape[0]] = lora_a
        stack_b[slot, :, :lora_b.shape[1]] = lora_b
        scalings[slot] = record.config.for_layer(key).scaling
    return stack_a, stack_b, scalings
