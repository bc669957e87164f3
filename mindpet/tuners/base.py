"""What every method's tuner provides (:class:`BaseTuner`), the shared plumbing of tuners whose delta Cell
replaces an ``nn.Dense`` (:class:`DenseLayerTuner`), and the helpers that move an adapter's tensors in and out of
live layers.

A tuner is stateless: :class:`mindpet.PetModel` owns the network, the adapters and the state, and calls the
tuner's hooks for everything method-specific. The hooks work on one adapted layer (the method's delta Cell) and
on NumPy arrays in the adapter's own shapes, so the adapter store, switching and the ``mindpet merge`` command
need no method-specific code.

A method whose delta Cell replaces an ``nn.Dense`` implements :meth:`BaseTuner.create_layer` and the per-layer
hooks; a method that adds Cells elsewhere (prefix tuning, prompt tuning, cross-layer tensors) overrides
:meth:`BaseTuner.inject` as well. The walk, matching and replacement live in :mod:`mindpet.tuners.inject`;
the training hooks in :mod:`mindpet.tuners.hooks`.
"""
import contextlib

import numpy as np
from mindspore import nn, Tensor

from mindpet.delta.layer_kinds import DeltaLayer
from mindpet.naming import is_delta
from mindpet.tuners.config import resolve_compute_dtype
from mindpet.tuners.hooks import TrainingHook
from mindpet.tuners.inject import DENSE, walk, matches_any, layer_key, layer_type, replace_cell
from mindpet.utils.exceptions import AdapterConfigError
from mindpet.utils.validation import FieldValueError


@contextlib.contextmanager
def naming_layer(key, fields=None):
    """A ValueError raised while adapting the layer ``key`` comes out as one naming the layer (its ``field`` kept),
    unless its message already quotes the key: the delta Cells know their sizes, only the tuner knows the name.
    ``fields`` maps a delta Cell's argument to the config field it comes from where the names differ
    (``{'adalora_rank': 'init_r'}``), so the error's ``field`` is the config's."""
    try:
        yield
    except ValueError as ex:
        field = getattr(ex, 'field', None)
        config_field = (fields or {}).get(field)
        if f"'{key}'" in str(ex) and config_field is None:
            raise
        message = str(ex)
        if f"'{key}'" not in message:
            message = f"For 'get_pet_model', the layer '{key}' cannot be adapted: {message}"
        if config_field is not None:
            message, field = f"{message} (the config's '{config_field}')", config_field
        raise FieldValueError(message, field=field) from ex


class BaseTuner:
    """The hooks :class:`mindpet.PetModel` calls for one method. Subclass it and register the pair with
    :func:`mindpet.tuners.register_method`.

    Conventions:
        * A *layer key* is the name prefix of the adapted layer's parameters (``'blocks.0.attn.q_proj'``): the
          same string in the model, in the base checkpoint and in the adapter file.
        * An adapter's tensors for one layer are a dict ``suffix -> numpy array`` in the adapter's own shapes;
          in the file they are named ``<layer key>.<suffix>``. Suffixes are delta parameter names
          (``mindpet_delta_<mode>_...``).
        * State that must change after compilation (scalings, gates) lives in Parameters.
    """
    method = ''
    #: the delta Cell class this tuner creates; layers of this class are reused when another adapter targets them
    layer_class = None
    #: the base parameter whose name gives a layer's key (``<key>.weight``)
    key_attr = 'weight'

    # ----- injection -----------------------------------------------------------------------------------------
    def is_target(self, cell):
        """Whether a matched cell can be adapted. Default: exactly ``nn.Dense`` (not subclasses, whose
        ``construct`` may do something else)."""
        return type(cell) is nn.Dense  # pylint: disable=unidiomatic-typecheck

    def create_layer(self, cell, config, key=None):
        """A new delta Cell replacing ``cell`` (layer key ``key``), holding ``cell``'s own weight/bias Parameter
        objects."""
        raise NotImplementedError(f"The '{self.method}' tuner does not replace layers.")

    def candidates(self, cells):
        """Names of cells a config could target (for error messages)."""
        return [name for name, cell in cells if name and (self.is_target(cell) or self.is_layer(cell))]

    def is_layer(self, cell):
        """Whether ``cell`` is one of this method's delta Cells."""
        return self.layer_class is not None and isinstance(cell, self.layer_class)

    def inject(self, model, config, layers):
        """Adapt the cells of ``model`` that ``config`` targets.

        Args:
            model (nn.Cell): the network, modified in place.
            config (PetConfig): the adapter's config.
            layers (dict): layer key -> delta Cell already in the model (from earlier adapters); updated in place.

        Returns:
            tuple: (list of the layer keys this adapter covers, whether the model's structure changed).

        Raises:
            ValueError: the config matches nothing (the message lists the patterns and candidate names), or a
                layer cannot be adapted (the message names the layer, the argument and its limit).
        """
        holders, matches = self.match(model, config, layers)
        # Every check and every new Cell first, so that a refused config leaves the model untouched.
        created = []
        for key, cell, is_new in matches:
            if is_new:
                with naming_layer(key):
                    created.append((key, cell, self.create_layer(cell, config, key=key)))
        for key, cell, layer in created:
            layers[key] = replace_cell(holders, cell, layer, key + '.')
        return [key for key, _, _ in matches], bool(created)

    def match(self, model, config, layers):
        """One walk of ``model``: the cells ``config`` targets, before anything is replaced.

        Returns:
            tuple: ``(holders, matches)``; ``holders`` as from :func:`walk`, ``matches`` a list of
            ``(layer key, cell, is_new)`` in model order: ``is_new`` is False for a delta Cell already in
            ``layers`` (checked with :meth:`check_reuse`), True for a cell to adapt.

        Raises:
            ValueError: the config matches nothing, or :meth:`check_reuse` refuses an adapted layer.
        """
        cells, holders = walk(model)
        known = {id(layer): key for key, layer in layers.items()}
        matches, matched_other = [], []
        for name, cell in cells:
            if not name or not matches_any(name, config.target_modules) or matches_any(name, config.exclude_modules):
                continue
            if id(cell) in known:
                self.check_reuse(known[id(cell)], cell, config)
                matches.append((known[id(cell)], cell, False))
            elif self.is_target(cell):
                matches.append((layer_key(cell, name, self.key_attr), cell, True))
            else:
                matched_other.append(f"{name} ({type(cell).__name__})")
        if not matches:
            candidates = self.candidates(cells)
            # Distinct last name components say more than a long list of full names in a deep model.
            endings = list(dict.fromkeys(name.rsplit('.', 1)[-1] for name in candidates))
            other = f" It matched only cells it cannot adapt: {matched_other[:5]}." if matched_other else ""
            raise FieldValueError(f"For 'get_pet_model', the '{self.method}' config's target_modules "
                                  f"{config.target_modules} (exclude_modules {config.exclude_modules}) match no "
                                  f"adaptable cell of the model.{other} The {len(candidates)} candidate layers end "
                                  f"in {endings[:20]}, e.g. {candidates[:4]}.", field='target_modules')
        return holders, matches

    def check_reuse(self, key, layer, config):
        """Raise ValueError when ``config`` cannot use the existing delta Cell ``layer`` (key ``key``, adapted for an
        earlier adapter), e.g. because it was built for another variant or its Parameters cannot hold it. Default:
        any config can."""

    # ----- per-layer adapter state (NumPy, the adapter's own shapes) -------------------------------------------
    def adapter_shapes(self, weight_shape, config):
        """``suffix -> shape`` of one layer's adapter tensors for a base weight of ``weight_shape``."""
        raise NotImplementedError

    def expected_shapes(self, key, fingerprint, config, source):
        """``suffix -> shape`` of layer ``key``'s adapter tensors, from the base-model fingerprint (name -> shape).
        Default: :meth:`adapter_shapes` of ``<key>.weight``; methods whose shapes depend on more (the layer's role,
        another base parameter) override it.

        Raises:
            AdapterConfigError: the fingerprint lacks the base parameter the shapes derive from.
        """
        return self.adapter_shapes(fingerprint_param(fingerprint, key, 'weight', source), config)

    def adapter_tensor_shapes(self, targets, fingerprint, config, source):
        """``key -> {suffix: shape}`` of the tensors an adapter covering ``targets`` (layer keys, model order)
        holds, from the base-model fingerprint (name -> shape); the adapter store checks files against it.
        Default: :meth:`expected_shapes` per layer. A method whose tensors are shared by several layers (t-SVD)
        overrides it.

        Raises:
            AdapterConfigError: the fingerprint lacks a base parameter the shapes derive from.
        """
        return {key: self.expected_shapes(key, fingerprint, config, source) for key in targets}

    def read_live(self, layer, config):
        """The live adapter tensors of ``layer`` (copies), in the adapter's own shapes."""
        raise NotImplementedError

    def write_live(self, layer, config, tensors):
        """Put an adapter's tensors into ``layer``'s live Parameters. Returns True when a Parameter's shape had to
        change (the caller then recompiles)."""
        raise NotImplementedError

    def activate(self, layer, config):
        """Switch ``layer``'s delta branch on with ``config``'s hyper-parameters (Parameter data only). A method
        that can only do this by changing the graph (a longer input sequence) returns True: the caller then
        recompiles."""
        raise NotImplementedError

    def deactivate(self, layer):
        """Switch ``layer``'s delta branch off: the layer computes its base function (Parameter data only; True
        asks for a recompilation, as :meth:`activate`)."""
        raise NotImplementedError

    def delta_params(self, layer):
        """The trainable delta Parameters of ``layer``."""
        return [p for name, p in layer.parameters_and_names() if is_delta(name)]

    def init_adapter(self, layer, config):
        """Fresh tensors for a new, untrained adapter on ``layer`` (the base function at init)."""
        raise NotImplementedError

    def base_derived(self, layer, config, tensors):
        """The adapter tensors on ``layer`` that a new adapter computes from the base weights, recomputed from the
        layer's current base weights (``tensors``: the adapter's stored tensors, which the result may depend on).
        Used by :meth:`mindpet.PetModel.reinit_from_base` when the base weights were loaded after injection.
        Default: none (the method's initial state does not depend on the base weights)."""
        return {}

    def saved_params(self, model, config):
        """Names of base parameters of ``model`` that make up the adapter itself (BitFit's biases). They are
        trained, stored with the adapter, switched and restored exactly like the parameters of
        ``modules_to_save``. Default: none."""
        return []

    # ----- merging -------------------------------------------------------------------------------------------
    #: why the method cannot be merged, completing "The '<method>' method cannot be merged into the base weights: "
    #: in the NotImplementedError of the default merge hooks ('' for the bare sentence)
    merge_refusal = ''

    def refuse_merge(self):
        """Raise the NotImplementedError of a method that cannot be merged (giving :attr:`merge_refusal`)."""
        reason = f": {self.merge_refusal}" if self.merge_refusal else "."
        raise NotImplementedError(f"The '{self.method}' method cannot be merged into the base weights{reason}")

    def merge_layer(self, layer, config):
        """Fold the active increment into the base weight (Parameter data), switching the branch off."""
        self.refuse_merge()

    def unmerge_layer(self, layer, config):
        """Undo :meth:`merge_layer`."""
        self.refuse_merge()

    def unload_layer(self, layer):
        """A plain Cell computing what ``layer`` computes now (call after merging), holding its base
        Parameter objects."""
        raise NotImplementedError(f"The '{self.method}' method cannot be unloaded into plain layers.")

    def merge_weights(self, params, key, tensors, config):
        """Merge one layer's adapter into checkpoint arrays: ``params`` maps parameter name -> numpy array (the
        base checkpoint); returns ``name -> new array`` for the entries that change. Used by ``mindpet merge``."""
        self.refuse_merge()

    def merge_adapter_weights(self, params, targets, tensors, config):
        """Merge a whole adapter into checkpoint arrays (``mindpet merge``): ``tensors`` maps each layer key of
        ``targets`` to its tensors. Returns ``name -> new array``. Default: :meth:`merge_weights` per layer."""
        updates = {}
        for key in targets:
            updates.update(self.merge_weights(params, key, tensors[key], config))
        return updates

    # ----- saving and training -------------------------------------------------------------------------------
    def saved_config(self, config, tensors):
        """The config written with an adapter whose tensors are ``tensors`` (``key -> {suffix: array}``);
        methods that record what training decided (AdaLoRA's and t-SVD's rank patterns) fill it in."""
        return config

    def training_hook(self, pet, config, total_steps):
        """The :class:`TrainingHook` that drives this method's schedules while ``pet`` trains. Default: one that
        does nothing around the steps."""
        return TrainingHook(pet)

    # ----- combining -----------------------------------------------------------------------------------------
    def combine(self, adapters, weights, combination_type, rank):
        """Combine adapters: ``adapters`` is a list of ``(config, {key: tensors})``. Returns
        ``(config, {key: tensors})`` of the new adapter."""
        raise NotImplementedError(f"The '{self.method}' method does not support add_weighted_adapter.")


# ----- helpers shared by the tuners --------------------------------------------------------------------------------
def fingerprint_param(fingerprint, key, attr, source):
    """Shape of base parameter ``<key>.<attr>`` in an adapter's base-model fingerprint.

    Raises:
        AdapterConfigError: the fingerprint has no such parameter.
    """
    name = f'{key}.{attr}'
    if name not in fingerprint:
        raise AdapterConfigError(f"The adapter in '{source}' adapts layer '{key}', but its base model has no "
                                 f"parameter '{name}'.")
    return fingerprint[name]


def adopt_dense_params(layer, cell):
    """Give the new delta Dense ``layer`` the weight and bias Parameter objects of the Dense ``cell`` (same data, no
    copy; :func:`replace_cell` sets the names). Returns ``layer``."""
    layer.weight = cell.weight
    if cell.has_bias:
        layer.bias = cell.bias
    return layer


def plain_dense(layer):
    """A plain ``nn.Dense`` holding ``layer``'s weight and bias Parameter objects (for unloading a delta Dense whose
    branch is off or merged)."""
    dense = nn.Dense(layer.in_channels, layer.out_channels, weight_init='zeros', bias_init='zeros',
                     has_bias=layer.has_bias, activation=layer.activation, dtype=layer.weight.dtype)
    return adopt_dense_params(dense, layer)


def live_params(layer):
    """``suffix -> Parameter`` of ``layer``'s delta Parameters, suffixes relative to ``layer``
    (``mindpet_delta_lora_a``, ``adapter.mindpet_delta_adapter_down_weight``)."""
    return {name: param for name, param in layer.parameters_and_names() if is_delta(name)}


def read_corner(layer, shapes):
    """Copies of ``layer``'s delta tensors cut to an adapter's own ``shapes`` (``suffix -> shape``): the adapter
    occupies the leading block of each live Parameter (see :func:`write_padded`)."""
    live = live_params(layer)
    return {suffix: live[suffix].asnumpy()[tuple(slice(0, d) for d in shape)].copy()
            for suffix, shape in shapes.items()}


def write_padded(layer, tensors):
    """Write an adapter's tensors into ``layer``'s live delta Parameters, zero-padded to the larger of the live and
    the adapter's size on every axis. For methods where zero rows/columns contribute exact zeros (a LoRA rank, an
    adapter bottleneck), adapters of different sizes thus share one allocation. Returns True when a Parameter
    grew (the caller recompiles).

    Raises:
        ValueError: a tensor's number of axes differs from its Parameter's.
    """
    live = live_params(layer)
    grew = False
    for suffix, value in tensors.items():
        param = live[suffix]
        if value.ndim != len(param.shape):
            raise ValueError(f"The adapter tensor '{suffix}' has shape {value.shape}, which cannot be put into the "
                             f"live Parameter of shape {tuple(param.shape)}.")
        shape = tuple(max(a, b) for a, b in zip(param.shape, value.shape))
        padded = value
        if shape != value.shape:
            padded = np.zeros(shape, value.dtype)
            padded[tuple(slice(0, d) for d in value.shape)] = value
        grew = grew or shape != tuple(param.shape)
        param.set_data(Tensor(padded, param.dtype))
    return grew


def write_exact(layer, tensors):
    """Write an adapter's tensors into ``layer``'s live delta Parameters, replacing their shapes if they differ (for
    methods where a size is part of the computation, e.g. a prompt length). Returns True when a shape changed."""
    live = live_params(layer)
    changed = False
    for suffix, value in tensors.items():
        param = live[suffix]
        changed = changed or tuple(value.shape) != tuple(param.shape)
        param.set_data(Tensor(value, param.dtype))
    return changed


def switch_flag(layer, attr, on):
    """Set ``layer``'s Python flag ``attr`` (a branch switched by the graph's structure, not by Parameter data).
    Returns True when it changed: a compiled graph keeps the old value, so the caller must recompile."""
    changed = getattr(layer, attr) != on
    setattr(layer, attr, on)
    return changed


class DenseLayerTuner(BaseTuner):
    """Shared plumbing of tuners whose delta Cell replaces an ``nn.Dense`` (LoRA/DoRA, IA3, PST, AdaLoRA, t-SVD):
    building it around the Dense's own Parameters, merging through the Cell's ``merge()``/``unmerge()`` (after
    :meth:`sync_scaling` has given the layer the adapter's host-side scaling), and unloading to a plain
    ``nn.Dense``.

    A tuner that sets :attr:`adapts_layer_kinds` also adapts the layer types of
    :mod:`mindpet.delta.layer_kinds` (``mint.nn.Linear``, GPT-2 ``Conv1D``, ``Conv2d``, ``Embedding``): there its
    :class:`~mindpet.delta.layer_kinds.DeltaLayer` wraps the base layer, and unloading returns that layer itself.
    """
    #: whether the layer types of :mod:`mindpet.delta.layer_kinds` are adapted besides ``nn.Dense``
    adapts_layer_kinds = False

    def is_target(self, cell):
        kind = layer_type(cell)
        return kind == DENSE or (self.adapts_layer_kinds and kind is not None)

    @staticmethod
    def build_layer(layer_class, cell, compute_dtype, **kwargs):
        """``layer_class(in, out, ..., **kwargs)`` holding ``cell``'s weight and bias Parameter objects; the
        matmuls run in ``compute_dtype`` ('float16', 'float32', 'bfloat16'; None: the weight's dtype)."""
        dtype = cell.weight.dtype
        compute = resolve_compute_dtype(compute_dtype, dtype)
        # 'zeros' avoids drawing a random weight that is replaced at once by the base layer's own Parameter.
        layer = layer_class(cell.in_channels, cell.out_channels, compute_dtype=compute, weight_init='zeros',
                            bias_init='zeros', has_bias=cell.has_bias, activation=cell.activation, dtype=dtype,
                            **kwargs)
        return adopt_dense_params(layer, cell)

    @classmethod
    def build_delta(cls, cell, key, dense_class, layer_class, compute_dtype, **kwargs):
        """The delta Cell for ``cell`` (layer key ``key``): ``dense_class`` around an ``nn.Dense`` (see
        :meth:`build_layer`), ``layer_class(cell, kind, ...)`` around a layer of a
        :class:`~mindpet.delta.layer_kinds.LayerKind`.

        Raises:
            ValueError: the layer's configuration cannot be adapted (naming the layer and the setting).
        """
        kind = layer_type(cell)
        if kind in (DENSE, None):
            return cls.build_layer(dense_class, cell, compute_dtype, **kwargs)
        compute = resolve_compute_dtype(compute_dtype, getattr(cell, kind.weight_attr).dtype)
        return layer_class(cell, kind, compute_dtype=compute, **kwargs)

    def sync_scaling(self, layer, config):
        """Give ``layer`` the host-side scaling of ``config`` that its merge()/unmerge() use (several adapters of
        different alpha/rank share one layer); methods without a scaling keep this no-op."""

    def merge_layer(self, layer, config):
        self.sync_scaling(layer, config)
        layer.merge()

    def unmerge_layer(self, layer, config):
        self.sync_scaling(layer, config)
        layer.unmerge()

    def unload_layer(self, layer):
        # The delta branch is off (merged, or not covered by the active adapter): the base layer computes the same.
        if isinstance(layer, DeltaLayer):
            return layer.unload()
        return plain_dense(layer)
