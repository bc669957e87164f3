"""The adapter lifecycle: inject by name, train, merge, save, load, switch and combine adapters.

:func:`get_pet_model` adapts an unmodified network in place and wraps it in a :class:`PetModel`. Everything that
must take effect in an already-compiled GRAPH_MODE network is done through Parameter data:

* switching adapters copies the adapter's tensors from an in-memory store into the live delta Parameters and sets
  the scaling Parameter (``set_adapter``, ``disable_adapter``);
* merging adds the increment to the base weight's data and sets the scaling to 0 (``merge``/``unmerge``).

Operations that change the network's structure (adapting more layers, a larger LoRA rank than any loaded before,
``merge_and_unload``) make the :class:`PetModel`'s next call compile a new graph; other Cells built around it
before (``TrainOneStepCell``, optimizers) must then be built again.
"""
import contextlib
import os

import numpy as np
from mindspore import nn, Tensor
from mindspore import dtype as mstype

from mindpet.adapter_store import (StoredAdapter, check_adapter_fits, check_format, load_adapter_dir,
                                   model_fingerprint, save_adapter_dir)
from mindpet.delta.layer_kinds import DeltaLayer, model_layer_types
from mindpet.naming import is_pet_param, is_state
from mindpet.tuners.base import BaseTuner
from mindpet.tuners.config import COMPUTE_DTYPES, PetConfig
from mindpet.tuners.inject import walk, matches_any, replace_cell, invalidate_compiled_graph
from mindpet.tuners.registry import make_tuner
from mindpet.utils.exceptions import AdapterConfigError
from mindpet.utils.validation import FieldValueError, check_cell, check_bool, check_int, check_real, check_safe_name


class _Adapter:
    """One adapter in the store: config, adapted layer keys, per-layer tensors, modules_to_save values."""

    def __init__(self, config, targets, tensors, modules, trainable):
        self.config = config
        self.targets = list(targets)
        self.tensors = tensors        # layer key -> {suffix: numpy array}
        self.modules = modules        # parameter name -> numpy array (modules_to_save)
        self.trainable = trainable


class _State:
    """Everything PetModel knows besides the network (kept off the Cell so graph compilation never sees it)."""

    def __init__(self, tuner):
        self.tuner = tuner
        self.layers = {}              # layer key -> delta Cell in the network
        self.adapters = {}            # name -> _Adapter
        self.active = None
        self.merged = False
        self.disabled = False
        self.unloaded = False
        self.module_params = {}       # name -> Parameter of a modules_to_save cell
        self.module_base = {}         # name -> numpy copy of its base value
        self.requires_grad = {}       # name -> requires_grad before injection (restored by unload)
        self.base_dtype = None        # half dtype the frozen base is stored in (get_pet_model's base_dtype)


def _check_adapter_name(owner, adapter_name):
    """An existing adapter must be named: None (or another non-str) is refused before anything changes."""
    if not isinstance(adapter_name, str):
        raise TypeError(f"For '{owner}', the 'adapter_name' must be the name (str) of an adapter, but got "
                        f"{adapter_name!r} ({type(adapter_name).__name__}); to compute the base model use 'with "
                        f"disable_adapter():'.")


def parameter_counts(network):
    """``(trainable, total)`` element counts of ``network``'s Parameters, run-time state (``mindpet_state_*``)
    excluded: trainable are those with ``requires_grad``.

    Example:
        >>> parameter_counts(nn.Dense(4, 3))
        (15, 15)
    """
    trainable = total = 0
    for param in network.get_parameters():
        if is_state(param.name):
            continue
        size = int(np.prod(param.shape))
        total += size
        trainable += size if param.requires_grad else 0
    return trainable, total


def _each_layer_or_none(record, apply, undo, layers):
    """``apply(layer, config)`` on every layer ``record`` covers, or on none: if one fails, the layers already done
    are undone in reverse order (so a refused merge leaves no layer merged, a failed unmerge every layer merged)."""
    done = []
    try:
        for key in record.targets:
            apply(layers[key], record.config)
            done.append(key)
    except BaseException:
        for key in reversed(done):
            undo(layers[key], record.config)
        raise


class PetModel(nn.Cell):
    """A network with parameter-efficient adapters injected by name. Built by :func:`get_pet_model`.

    Calling it calls the adapted network with the same inputs. Parameter names are the network's own, so the
    base checkpoint loads into it (or into ``pet.base_model``) unchanged.

    Args:
        model (nn.Cell): the network, adapted in place (``pet.base_model`` is ``model``).
        config (PetConfig | None): the first adapter's config, e.g. :class:`mindpet.LoraConfig`; None: start
            without adapters (the base model's parameters are frozen; add or load one next). Default None.
        adapter_name (str): name of the first adapter. Default 'default'.

    Example:
        >>> pet = get_pet_model(net, LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=8))  # doctest: +SKIP
        >>> logits = pet(input_ids)  # doctest: +SKIP
    """

    def __init__(self, model, config=None, adapter_name='default'):
        super().__init__(auto_prefix=False)
        owner = 'PetModel'
        check_cell('model', model, owner)
        if isinstance(model, PetModel):
            raise TypeError(f"For '{owner}', the 'model' is already a PetModel; add adapters with add_adapter() "
                            f"or load_adapter().")
        if config is not None and not isinstance(config, PetConfig):
            raise TypeError(f"For '{owner}', the 'config' must be a PetConfig (e.g. LoraConfig) or None, but got "
                            f"{config!r} ({type(config).__name__}).")
        check_safe_name('adapter_name', adapter_name, owner)
        added = [p.name for p in model.get_parameters() if is_pet_param(p.name)]
        if added:
            raise ValueError(f"For '{owner}', the 'model' already has PET parameters (e.g. '{added[0]}'); inject "
                             f"into the unmodified network, or use the PetModel that adapted it.")
        self.base_model = model
        self._state = _State(None)   # the first adapter added or loaded fixes the method (and so the tuner)
        for param in model.get_parameters():
            self._state.requires_grad[param.name] = param.requires_grad
            param.requires_grad = False
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    def construct(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    # ----- properties ----------------------------------------------------------------------------------------
    @property
    def active_adapter(self):
        """Name of the adapter in effect (None after deleting it)."""
        return self._state.active

    @property
    def adapters(self):
        """Names of the adapters held, in the order they were added."""
        return list(self._state.adapters)

    @property
    def merged(self):
        """Whether the active adapter is merged into the base weights."""
        return self._state.merged

    @property
    def pet_layers(self):
        """Layer key -> delta Cell in the network (a copy of the mapping)."""
        return dict(self._state.layers)

    def get_adapter_config(self, adapter_name=None):
        """The config of ``adapter_name`` (default: the active adapter)."""
        return self._record(adapter_name, 'get_adapter_config').config

    # ----- adding adapters -----------------------------------------------------------------------------------
    def add_adapter(self, adapter_name, config, trainable=True):
        """Add a new, untrained adapter (the base function until trained); it does not become active.

        Layers the config targets that no adapter covered yet are adapted now (the next call recompiles).

        Raises:
            ValueError: the name exists, or the config matches nothing.
            AdapterConfigError: the config is of another method than this model's adapters.
        """
        owner = 'add_adapter'
        self._check_usable(owner)
        self._check_new_name(owner, adapter_name)
        check_bool('trainable', trainable, owner)
        self._check_method(config, owner)
        state = self._state
        self._module_names(config)          # a modules_to_save matching nothing fails before any layer changes
        self._sync()
        before = dict(state.layers)
        targets, changed = state.tuner.inject(self.base_model, config, state.layers)
        tensors = {}
        for key in targets:
            layer = state.layers[key]
            fresh = key not in before
            tensors[key] = (state.tuner.read_live(layer, config) if fresh
                            else state.tuner.init_adapter(layer, config))
        module_names = self._resolve_modules(config)
        changed = self._saved_in_float32(config) or changed
        # A new adapter starts from the base values (not from another adapter's trained values).
        modules = {name: state.module_base[name].copy() for name in module_names}
        state.adapters[adapter_name] = _Adapter(config, targets, tensors, modules, trainable)
        self._after_structure_change(changed)
        return self

    def load_adapter(self, directory, adapter_name, is_trainable=False):
        """Load an adapter saved by :meth:`save_pretrained` under ``adapter_name`` (it does not become active).

        The adapter's base-model fingerprint must equal this model's, and its tensors must have the shapes its
        config implies. An adapter of a larger rank than any loaded before on a layer grows that layer's live
        Parameters when it is first activated (the next call recompiles).

        Args:
            directory (str): the adapter directory.
            adapter_name (str): a new name.
            is_trainable (bool): whether its tensors train when it is active. Default False.

        Raises:
            AdapterConfigError: missing/malformed YAML, another method, or another base model (the message names
                the first differing parameter).
            CheckpointError: missing/corrupt tensor file, or a tensor missing, extra or of the wrong shape.
        """
        owner = 'load_adapter'
        self._check_usable(owner)
        self._check_new_name(owner, adapter_name)
        check_bool('is_trainable', is_trainable, owner)
        adapter = load_adapter_dir(directory)
        self._check_method(adapter.config, owner, source=directory)
        check_adapter_fits(adapter, model_fingerprint(self.base_model), directory,
                           layer_types=model_layer_types(self.base_model))
        self._sync()
        self._add_loaded(adapter_name, adapter, is_trainable, directory)
        return self

    def _add_loaded(self, adapter_name, adapter, trainable, source):
        state = self._state
        self._check_loadable(adapter, source)
        targets, changed = state.tuner.inject(self.base_model, adapter.config, state.layers)
        if sorted(targets) != sorted(adapter.targets):
            self._after_structure_change(changed)   # layers injected on the way stay switched off and frozen
            missing = sorted(set(adapter.targets) - set(targets))
            extra = sorted(set(targets) - set(adapter.targets))
            raise AdapterConfigError(f"The adapter in '{source}' adapts {adapter.targets[:4]}..., but its "
                                     f"target_modules select other layers in this model (first difference: "
                                     f"{(missing or extra)[0]!r}).")
        for name in adapter.modules:
            self._register_module_param(name, source)
        changed = self._saved_in_float32(adapter.config) or changed
        layers = {key: dict(adapter.layers[key]) for key in targets}
        state.adapters[adapter_name] = _Adapter(adapter.config, targets, layers, dict(adapter.modules), trainable)
        self._after_structure_change(changed)

    def _check_loadable(self, adapter, source):
        """Refuse, before any layer is injected, an adapter whose target_modules select other layers here than
        the ones it holds, or that stores module parameters the model lacks (for tuners that inject with the
        generic walk, where the selection can be computed without changing the model)."""
        state = self._state
        names = {p.name for p in self.base_model.get_parameters()}
        missing = sorted(name for name in adapter.modules if name not in names)
        if missing:
            raise AdapterConfigError(f"'{source}' stores module parameter '{missing[0]}', which the model does not "
                                     f"have.")
        if type(state.tuner).inject is not BaseTuner.inject:
            return
        _, matches = state.tuner.match(self.base_model, adapter.config, state.layers)
        targets = [key for key, _, _ in matches]
        if sorted(targets) != sorted(adapter.targets):
            missing = sorted(set(adapter.targets) - set(targets))
            extra = sorted(set(targets) - set(adapter.targets))
            raise AdapterConfigError(f"The adapter in '{source}' adapts {adapter.targets[:4]}..., but its "
                                     f"target_modules select other layers in this model (first difference: "
                                     f"{(missing or extra)[0]!r}).")

    @classmethod
    def from_pretrained(cls, model, directory, adapter_name='default', is_trainable=False):
        """Adapt ``model`` with the adapter saved in ``directory`` and make it active.

        On failure ``model`` is left as it was (layers and trainability).

        Example:
            >>> pet = PetModel.from_pretrained(build_base_net(), 'out/adapter')  # doctest: +SKIP

        Raises:
            AdapterConfigError, CheckpointError: as :meth:`load_adapter`.
        """
        owner = 'PetModel.from_pretrained'
        check_cell('model', model, owner)
        check_safe_name('adapter_name', adapter_name, owner)
        check_bool('is_trainable', is_trainable, owner)
        pet = cls(model)
        try:
            pet.load_adapter(directory, adapter_name, is_trainable)
        except BaseException:
            pet.unload()
            raise
        return pet.set_adapter(adapter_name)

    def reinit_from_base(self, adapter_name=None):
        """Recompute, from the base weights now in the network, the adapter tensors a method derives from them
        (DoRA's magnitude ``m``: the row norms of the weight).

        The injection computes them from the weights the network holds at that moment. Load the pretrained base
        weights first and inject afterwards (what ``mindpet finetune`` does); when the base is loaded into an
        already-adapted model instead, call this right after loading, before training: the adapted model then
        computes exactly the loaded base model again. Methods whose initial state does not depend on the base
        weights (LoRA, IA3, ...) are unchanged by it.

        Args:
            adapter_name (str | None): the adapter to re-initialise. Default None: every adapter.

        Returns:
            PetModel: ``self``.

        Raises:
            ValueError: no such adapter.
            RuntimeError: the model is merged (the weights are not the base weights then), or inside
                :meth:`disable_adapter`.

        Example:
            >>> pet = get_pet_model(net, LoraConfig(target_modules=['q_proj'], use_dora=True))  # doctest: +SKIP
            >>> ms.load_param_into_net(net, ms.load_checkpoint('base.ckpt'))  # doctest: +SKIP
            >>> pet.reinit_from_base()  # doctest: +SKIP
        """
        owner = 'reinit_from_base'
        self._check_usable(owner)
        state = self._state
        if adapter_name is not None:
            self._record(adapter_name, owner)
        names = self.adapters if adapter_name is None else [adapter_name]
        if state.merged:
            raise RuntimeError(f"For '{owner}', the adapter {state.active!r} is merged into the weights; call "
                               f"unmerge() first.")
        if state.disabled:
            raise RuntimeError(f"For '{owner}', cannot re-initialise inside 'with disable_adapter()'.")
        self._sync()
        # Compute everything first, then store: a failure leaves every adapter as it was.
        updates = {name: {key: state.tuner.base_derived(state.layers[key], state.adapters[name].config,
                                                        state.adapters[name].tensors[key])
                          for key in state.adapters[name].targets}
                   for name in names}
        for name, per_layer in updates.items():
            for key, derived in per_layer.items():
                state.adapters[name].tensors[key].update(derived)
        if state.active in updates and self._apply(state.adapters[state.active]):
            self._recompile()
        return self

    # ----- switching -----------------------------------------------------------------------------------------
    def set_adapter(self, adapter_name):
        """Make ``adapter_name`` the active adapter; takes effect in an already-compiled graph.

        Only Parameter data changes (the adapter's tensors and scaling), unless the adapter needs a larger live
        rank than allocated (then the next call recompiles). If the model is merged, the old adapter is unmerged
        and the new one merged.

        ``adapter_name`` must name an adapter: ``set_adapter(None)`` is refused (it does not mean "no adapter";
        compute the base model with ``with pet.disable_adapter():``, or delete the adapter). Every check runs before
        anything changes, so a refused call leaves the model as it was (a merged model stays merged).

        Raises:
            TypeError: ``adapter_name`` is not a str (None included).
            ValueError: no such adapter.
            RuntimeError: inside :meth:`disable_adapter`.
        """
        owner = 'set_adapter'
        self._check_usable(owner)
        _check_adapter_name(owner, adapter_name)
        record = self._record(adapter_name, owner)
        state = self._state
        if state.disabled:
            raise RuntimeError(f"For '{owner}', adapters cannot be switched inside 'with disable_adapter()'.")
        if state.active == adapter_name:
            return self
        was_merged = state.merged
        if was_merged:
            self.unmerge()
        self._sync()
        grew = self._apply(record)
        state.active = adapter_name
        if grew:
            self._after_structure_change(True)
        if was_merged:
            self.merge()
        return self

    def delete_adapter(self, adapter_name):
        """Forget ``adapter_name`` (a name: None is refused). Deleting the active adapter leaves none active (base
        outputs).

        Raises:
            TypeError: ``adapter_name`` is not a str. ValueError: no such adapter. RuntimeError: inside
            :meth:`disable_adapter`. Nothing changes when a call is refused.
        """
        owner = 'delete_adapter'
        self._check_usable(owner)
        _check_adapter_name(owner, adapter_name)
        self._record(adapter_name, owner)
        state = self._state
        if state.disabled:
            raise RuntimeError(f"For '{owner}', adapters cannot be deleted inside 'with disable_adapter()'.")
        if state.active == adapter_name:
            if state.merged:
                self.unmerge()
            state.active = None
            if self._apply(None):
                self._recompile()
        del state.adapters[adapter_name]
        return self

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context in which the model computes the base model's outputs (modules_to_save at their base values).

        Takes effect in an already-compiled graph. A merged adapter is unmerged for the duration.

        Example:
            >>> with pet.disable_adapter():  # doctest: +SKIP
            ...     base_logits = pet(input_ids)
        """
        owner = 'disable_adapter'
        self._check_usable(owner)
        state = self._state
        if state.disabled:
            raise RuntimeError(f"For '{owner}', the adapters are already disabled (nested 'with').")
        was_merged = state.merged
        if was_merged:
            self.unmerge()
        self._sync()
        if self._apply(None):
            self._recompile()
        state.disabled = True
        try:
            yield self
        finally:
            state.disabled = False
            if self._apply(state.adapters.get(state.active)):
                self._recompile()
            if was_merged:
                self.merge()

    def _record(self, adapter_name, owner):
        state = self._state
        if adapter_name is None:
            adapter_name = state.active
            if adapter_name is None:
                raise ValueError(f"For '{owner}', there is no active adapter; name one of {self.adapters}.")
        if not isinstance(adapter_name, str) or adapter_name not in state.adapters:
            raise ValueError(f"For '{owner}', the adapter {adapter_name!r} does not exist; adapters: "
                             f"{self.adapters}.")
        return state.adapters[adapter_name]

    def _sync(self):
        """Copy the active adapter's live tensors (possibly trained since) back into the store."""
        state = self._state
        if state.active is None or state.disabled:
            return
        record = state.adapters[state.active]
        if not record.trainable:
            return
        for key in record.targets:
            record.tensors[key] = state.tuner.read_live(state.layers[key], record.config)
        for name in record.modules:
            record.modules[name] = state.module_params[name].asnumpy().copy()

    def _apply(self, record):
        """Put ``record``'s tensors (None: no adapter) into the live Parameters; set trainability. Returns True
        when the graph must be recompiled (a Parameter's shape grew, or the method changes the graph to switch)."""
        state = self._state
        grew = False
        for key, layer in state.layers.items():
            covered = record is not None and key in record.tensors
            if covered:
                grew = state.tuner.write_live(layer, record.config, record.tensors[key]) or grew
                grew = state.tuner.activate(layer, record.config) or grew
            else:
                grew = state.tuner.deactivate(layer) or grew
            for param in state.tuner.delta_params(layer):
                param.requires_grad = covered and record.trainable
        for name, param in state.module_params.items():
            stored = record is not None and name in record.modules
            value = record.modules[name] if stored else state.module_base[name]
            param.set_data(Tensor(value, param.dtype))
            param.requires_grad = stored and record.trainable
        return grew

    # ----- merging -------------------------------------------------------------------------------------------
    def merge(self):
        """Fold the active adapter into the base weights (the delta branch is switched off). Takes effect in an
        already-compiled graph. Merging twice is refused.

        Raises:
            RuntimeError: already merged, no active adapter, or inside :meth:`disable_adapter`.
        """
        owner = 'merge'
        self._check_usable(owner)
        state = self._state
        if state.merged:
            raise RuntimeError(f"For '{owner}', the adapter {state.active!r} is already merged; call unmerge() "
                               f"first.")
        if state.disabled:
            raise RuntimeError(f"For '{owner}', cannot merge inside 'with disable_adapter()'.")
        record = self._record(None, owner)
        self._sync()
        _each_layer_or_none(record, state.tuner.merge_layer, state.tuner.unmerge_layer, state.layers)
        state.merged = True
        return self

    def unmerge(self):
        """Take the merged adapter back out of the base weights.

        Raises:
            RuntimeError: nothing is merged.
        """
        owner = 'unmerge'
        self._check_usable(owner)
        state = self._state
        if not state.merged:
            raise RuntimeError(f"For '{owner}', no adapter is merged.")
        record = state.adapters[state.active]
        _each_layer_or_none(record, state.tuner.unmerge_layer, state.tuner.merge_layer, state.layers)
        state.merged = False
        return self

    def merge_and_unload(self):
        """Merge the active adapter and return the network with plain layers (``nn.Dense`` for LoRA) holding the
        merged weights: inference costs exactly the base model's. The Parameters keep their names, so the result
        saves as a base-model checkpoint. This PetModel cannot be used afterwards.

        Example:
            >>> plain_net = pet.merge_and_unload()  # doctest: +SKIP
            >>> ms.save_checkpoint(plain_net, 'merged.ckpt')  # doctest: +SKIP
        """
        owner = 'merge_and_unload'
        self._check_usable(owner)
        if self._state.disabled:
            raise RuntimeError(f"For '{owner}', cannot unload inside 'with disable_adapter()'.")
        if self._state.active is not None and not self._state.merged:
            self.merge()
        return self._unload()

    def unload(self):
        """Return the network with its original plain layers and base weights (adapters discarded)."""
        owner = 'unload'
        self._check_usable(owner)
        if self._state.disabled:
            raise RuntimeError(f"For '{owner}', cannot unload inside 'with disable_adapter()'.")
        if self._state.merged:
            self.unmerge()
        self._apply(None)
        return self._unload()

    def _unload(self):
        state = self._state
        _, holders = walk(self.base_model)
        for key, layer in state.layers.items():
            replace_cell(holders, layer, state.tuner.unload_layer(layer), key + '.')
        for param in self.base_model.get_parameters():
            param.requires_grad = state.requires_grad.get(param.name, param.requires_grad)
        state.unloaded = True
        state.layers = {}
        invalidate_compiled_graph(self.base_model)
        invalidate_compiled_graph(self)
        return self.base_model

    # ----- saving --------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, adapter_name=None, format='mindpet'):  # pylint: disable=W0622
        """Write ``adapter_name`` (default: the active adapter) to ``save_directory`` as one unit (see
        ``doc/checkpoints.md``): adapter tensors only, no optimizer state.

        Args:
            save_directory (str): the adapter directory (created if needed).
            adapter_name (str | None): the adapter to save; None: the active one.
            format (str): 'mindpet' (``adapter_config.yaml`` + the safetensors file) or 'peft' (Hugging Face PEFT's
                ``adapter_config.json`` + ``adapter_model.safetensors``). Default 'mindpet'.

        Returns:
            str: ``save_directory``.

        Example:
            >>> pet.save_pretrained('out/task_a')  # doctest: +SKIP
        """
        owner = 'save_pretrained'
        self._check_usable(owner)
        if not isinstance(save_directory, (str, os.PathLike)) or not os.fspath(save_directory):
            raise TypeError(f"For '{owner}', the 'save_directory' must be a non-empty str path, but got "
                            f"{save_directory!r} ({type(save_directory).__name__}).")
        record = self._record(adapter_name, owner)
        check_format(format, owner)
        name = adapter_name or self._state.active
        self._sync()
        adapter = StoredAdapter(name, self._state.tuner.saved_config(record.config, record.tensors),
                                list(record.targets), record.tensors, record.modules,
                                model_fingerprint(self.base_model), self._layer_types(record.targets))
        return save_adapter_dir(save_directory, adapter, format)

    # ----- combining -----------------------------------------------------------------------------------------
    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type='svd', rank=None):
        """Add ``adapter_name`` whose increment is ``sum_i weights[i] * increment(adapters[i])``.

        Args:
            adapters (list[str]): names of existing adapters.
            weights (list[float]): one weight per adapter.
            adapter_name (str): the new adapter's name (it does not become active).
            combination_type (str): 'svd' (default): the sum re-factorised by a truncated SVD to ``rank``
                (default: the largest input rank) -- exact when the sum's rank is at most ``rank`` (e.g. weights
                (1, 0)), else its best rank-``rank`` approximation; 'cat': exact, rank = sum of the ranks.
            rank (int | None): the new adapter's rank for 'svd'.

        Raises:
            ValueError: unknown names, mismatched lengths, an existing ``adapter_name``, adapters that store
                modules_to_save (their values cannot be combined).

        Example:
            >>> pet.add_weighted_adapter(['a', 'b'], [0.5, 0.5], 'mix')  # doctest: +SKIP
            >>> pet.set_adapter('mix')  # doctest: +SKIP
        """
        owner = 'add_weighted_adapter'
        self._check_usable(owner)
        if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
            raise TypeError(f"For '{owner}', the 'adapters' must be a non-empty list of adapter names, but got "
                            f"{adapters!r}.")
        if isinstance(weights, str) or not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
            raise ValueError(f"For '{owner}', the 'weights' must be a list of {len(adapters)} numbers (one per "
                             f"adapter), but got {weights!r}.")
        weights = [float(check_real('weights', w, owner)) for w in weights]
        records = [self._record(name, owner) for name in adapters]
        self._check_new_name(owner, adapter_name)
        if rank is not None:
            check_int('rank', rank, owner)
        for name, record in zip(adapters, records):
            if record.modules:
                raise ValueError(f"For '{owner}', the adapter {name!r} stores modules_to_save parameters, which "
                                 f"cannot be combined.")
        self._sync()
        config, tensors = self._state.tuner.combine([(r.config, r.tensors) for r in records], weights,
                                                    combination_type, rank)
        self._state.adapters[adapter_name] = _Adapter(config, list(tensors), tensors, {}, False)
        return self

    # ----- training ------------------------------------------------------------------------------------------
    def training_hook(self, total_steps=None):
        """The hook that drives the active adapter's method-specific schedule during training: PST's sparsity
        schedule, AdaLoRA's and t-SVD's rank allocation (with their orthogonality regulariser); for the other
        methods it does nothing but build a ``TrainOneStepCell``, so one training loop serves every method.

        Args:
            total_steps (int | None): training steps of the schedule; None: the config's ``total_step``.

        Returns:
            mindpet.tuners.hooks.TrainingHook: ``train_network(loss_net, optimizer)``, ``before_step(i)``,
            ``after_step(i, outputs)``; also a ``Model.train`` callback.

        Example:
            >>> hook = pet.training_hook(total_steps=1000)  # doctest: +SKIP
            >>> step = hook.train_network(nn.WithLossCell(pet, loss_fn), optimizer)  # doctest: +SKIP
            >>> for i, (x, y) in enumerate(batches):  # doctest: +SKIP
            ...     hook.before_step(i)
            ...     hook.after_step(i, step(x, y))
        """
        owner = 'training_hook'
        self._check_usable(owner)
        if total_steps is not None:
            check_int('total_steps', total_steps, owner)
        record = self._record(None, owner)
        if not record.trainable:
            raise ValueError(f"For '{owner}', the active adapter {self._state.active!r} is not trainable (loaded "
                             f"with is_trainable=False).")
        return self._state.tuner.training_hook(self, record.config, total_steps)

    # ----- reporting -----------------------------------------------------------------------------------------
    def print_trainable_parameters(self):
        """Print and return ``(trainable, total, percent)`` parameter counts (run-time state excluded; delta
        Parameters counted at their live size).

        Example:
            >>> pet.print_trainable_parameters()  # doctest: +SKIP
            trainable params: 1,536 || all params: 45,120 || trainable%: 3.4043
        """
        trainable, total = parameter_counts(self.base_model)
        percent = 100.0 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}")
        return trainable, total, percent

    # ----- helpers -------------------------------------------------------------------------------------------
    def _layer_types(self, keys):
        """``key -> kind name`` of the layers among ``keys`` that are not ``nn.Dense`` (see
        :mod:`mindpet.delta.layer_kinds`), recorded with an adapter so its shapes and merges use the right layout."""
        layers = self._state.layers
        return {key: layers[key].kind.name for key in keys if isinstance(layers.get(key), DeltaLayer)}

    def _check_usable(self, owner):
        if self._state.unloaded:
            raise RuntimeError(f"For '{owner}', this PetModel was unloaded (merge_and_unload/unload); use the "
                               f"network it returned.")

    def _check_new_name(self, owner, adapter_name):
        check_safe_name('adapter_name', adapter_name, owner)
        if adapter_name in self._state.adapters:
            raise ValueError(f"For '{owner}', an adapter named {adapter_name!r} already exists; adapters: "
                             f"{self.adapters}.")

    def _check_method(self, config, owner, source=None):
        if not isinstance(config, PetConfig):
            raise TypeError(f"For '{owner}', the 'config' must be a PetConfig (e.g. LoraConfig), but got "
                            f"{config!r} ({type(config).__name__}).")
        state = self._state
        if state.tuner is None or not (state.layers or state.adapters):
            # Nothing adapted yet (a PetModel started empty): the first adapter fixes the method.
            state.tuner = make_tuner(config.method)
        if config.method != state.tuner.method:
            where = f"The adapter in '{source}'" if source else f"For '{owner}', the config"
            raise AdapterConfigError(f"{where} is a '{config.method}' adapter; this PetModel holds "
                                     f"'{self._state.tuner.method}' adapters.")

    def _resolve_modules(self, config):
        """Parameter names of the cells ``config.modules_to_save`` selects, after the base parameters the method's
        adapter consists of (BitFit's biases); all registered for switching."""
        names = self._module_names(config)
        for name in names:
            self._register_module_param(name, 'modules_to_save')
        return names

    def _module_names(self, config):
        """The names :meth:`_resolve_modules` registers, found without registering anything.

        Raises:
            ValueError: ``modules_to_save`` matches no cell.
        """
        names = list(self._state.tuner.saved_params(self.base_model, config))
        if not config.modules_to_save:
            return names
        matched = False
        for cell_name, cell in self.base_model.cells_and_names():
            if cell_name and matches_any(cell_name, config.modules_to_save):
                matched = True
                for param in cell.get_parameters():
                    if not is_pet_param(param.name) and param.name not in names:
                        names.append(param.name)
        if not matched:
            raise FieldValueError(f"For 'get_pet_model', the modules_to_save {config.modules_to_save} match no "
                                  f"cell of the model.", field='modules_to_save')
        return names

    def _register_module_param(self, name, source):
        state = self._state
        if name in state.module_params:
            return
        params = {p.name: p for p in self.base_model.get_parameters()}
        if name not in params:
            raise AdapterConfigError(f"'{source}' stores module parameter '{name}', which the model does not have.")
        state.module_params[name] = params[name]
        state.module_base[name] = params[name].asnumpy().copy()

    def _saved_in_float32(self, config):
        """On a half-precision base (``get_pet_model(..., base_dtype=...)``), keep what trains in full in float32:
        every saved module parameter is stored in float32 (so are its optimiser moments), and the cells
        ``config.modules_to_save`` selects run in float32 (``Cell.to_float``: their half inputs are cast at the
        boundary, as the delta layers cast their float32 factors). Returns whether the graph must be rebuilt."""
        state = self._state
        if state.base_dtype is None:
            return False
        changed = False
        for name, param in state.module_params.items():
            if param.dtype in (mstype.float16, mstype.bfloat16):
                param.set_dtype(mstype.float32)
                state.module_base[name] = state.module_base[name].astype(np.float32)
                changed = True
        if config.modules_to_save:
            for cell_name, cell in self.base_model.cells_and_names():
                if cell_name and matches_any(cell_name, config.modules_to_save):
                    cell.to_float(mstype.float32)
                    changed = True
        return changed

    def _after_structure_change(self, changed):
        """New layers (deactivated unless the active adapter covers them) and recompilation."""
        if not changed:
            return
        state = self._state
        active = state.adapters.get(state.active)
        for key, layer in state.layers.items():
            if active is None or key not in active.tensors:
                state.tuner.deactivate(layer)
                for param in state.tuner.delta_params(layer):
                    param.requires_grad = False
        self._recompile()

    def _recompile(self):
        """Make the next call (of this PetModel or of the network itself) compile a new graph."""
        invalidate_compiled_graph(self)
        invalidate_compiled_graph(self.base_model)


def get_pet_model(model, config, adapter_name='default', base_dtype=None):
    """Inject the adapter described by ``config`` into ``model`` (in place) and wrap it in a :class:`PetModel`.

    Matching ``nn.Dense`` layers are replaced by the method's delta Cell holding the original weight and bias
    Parameter objects (same names, no re-initialisation); every other parameter is frozen except those of
    ``modules_to_save``. At init the outputs equal the base model's.

    Args:
        model (nn.Cell): an unmodified network.
        config (PetConfig): e.g. ``LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=8)``.
        adapter_name (str): the adapter's name. Default 'default'.
        base_dtype (mindspore.dtype | str | None): store the frozen base weights in this dtype (``ms.float16`` /
            ``'float16'``, ``ms.bfloat16`` / ``'bfloat16'``, or float32) and run the network's cells in it
            (``Cell.to_float``); the adapters, their optimiser state and the scaling stay float32, and layers whose
            config leaves ``compute_dtype`` None compute in ``base_dtype``. The cells of ``modules_to_save`` (and
            any base parameter a method trains, e.g. BitFit's biases) are kept in float32 and the
            ``modules_to_save`` cells run in float32. None (default): leave the base as it is. Merging writes the
            base weight back in ``base_dtype`` (rounded once).

    Returns:
        PetModel: call it like ``model``; ``pet.base_model`` is ``model``.

    Raises:
        TypeError: ``model`` is not a Cell or ``config`` not a PetConfig.
        ValueError: the config matches nothing (the message lists the patterns and candidate layer names), the
            model already holds PET parameters, or ``base_dtype`` is not a float dtype.

    Example:
        >>> from mindpet import LoraConfig, get_pet_model
        >>> pet = get_pet_model(net, LoraConfig(target_modules=['q_proj', 'v_proj'], lora_rank=8))  # doctest: +SKIP
        >>> pet.print_trainable_parameters()  # doctest: +SKIP
        >>> half = get_pet_model(net2, LoraConfig(target_modules=['q_proj'], modules_to_save=['head']),
        ...                      base_dtype=ms.float16)  # doctest: +SKIP
    """
    dtype = _check_base_dtype(base_dtype)
    pet = PetModel(model, config, adapter_name)
    if dtype is not None:
        _store_base_in(pet, dtype)
    return pet


def _check_base_dtype(base_dtype):
    """The mindspore dtype ``base_dtype`` names (None stays None), checked before anything changes."""
    if base_dtype is None:
        return None
    dtype = COMPUTE_DTYPES.get(base_dtype, base_dtype) if isinstance(base_dtype, str) else base_dtype
    if dtype not in COMPUTE_DTYPES.values():
        raise ValueError(f"For 'get_pet_model', the 'base_dtype' must be None or one of {list(COMPUTE_DTYPES)} (or "
                         f"the mindspore dtype), but got {base_dtype!r}.")
    return dtype


def _store_base_in(pet, dtype):
    """Store the frozen floating base Parameters of ``pet`` in ``dtype`` and run its cells in ``dtype``; delta
    layers that compute in the base weight's dtype (config ``compute_dtype`` None) follow it. What trains in full
    (saved modules) stays float32."""
    if dtype == mstype.float32:
        return
    state = pet._state  # pylint: disable=protected-access
    for param in pet.base_model.get_parameters():
        if not is_pet_param(param.name) and param.name not in state.module_params and \
                param.dtype in (mstype.float32, mstype.float64, mstype.float16, mstype.bfloat16) and \
                param.dtype != dtype:
            param.set_dtype(dtype)
    for key, layer in state.layers.items():
        configs = [record.config for record in state.adapters.values() if key in record.tensors]
        if all(getattr(config, 'compute_dtype', None) is None for config in configs) and \
                hasattr(layer, 'compute_dtype'):
            layer.compute_dtype = layer.dtype = dtype
    pet.base_model.to_float(dtype)
    state.base_dtype = dtype
    for record in state.adapters.values():
        pet._saved_in_float32(record.config)  # pylint: disable=protected-access
