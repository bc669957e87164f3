"""Layer kinds: the base layer types LoRA, DoRA and IA3 adapt besides ``nn.Dense``, one small entry each.

Every kind is seen by the methods through one *canonical view*: a matrix ``W`` of shape ``(out, in)`` such that the
layer computes ``h = W x + b`` on its inputs' features. The methods write their maths once on that view (``W + s B A``
for LoRA, row norms for DoRA, ``diag(l) W`` for IA3); a kind only says

* how its stored weight maps to the view and back (host side, NumPy: merging, ``mindpet merge``),
* how ``A`` and ``B`` act on its inputs in the graph (:class:`LayerBranch`: a matmul for linear layers, a
  convolution with the base kernel geometry then a 1x1 convolution for ``Conv2d``, a row lookup for embeddings),
* which base configurations it refuses (grouped convolutions, ``max_norm`` embeddings, ...).

The kinds:

=================  ==========================================  ==================  ==========================
name               layer classes                               stored weight       canonical ``(out, in)``
=================  ==========================================  ==================  ==========================
``linear``         ``mindspore.mint.nn.Linear``                ``(out, in)``       as stored
``conv1d``         mindone's GPT-2 ``Conv1D``                  ``(in, out)``       transposed
``conv2d``         ``nn.Conv2d``, ``mint.nn.Conv2d``           ``(out, in, kh, kw)``  ``(out, in*kh*kw)``
``embedding``      ``mint.nn.Embedding``                       ``(num, dim)``      transposed: ``(dim, num)``
``nn_embedding``   ``nn.Embedding`` (``embedding_table``)      ``(num, dim)``      transposed: ``(dim, num)``
=================  ==========================================  ==================  ==========================

(``nn.Dense`` keeps MindPet's own delta Dense Cells, ``LoRADense`` etc.) The delta Cell of a kind,
:class:`DeltaLayer`, holds the base layer itself (unregistered, so parameter names do not change) and adopts its
Parameter objects under their own attribute names: the base checkpoint loads unchanged, the base path runs the base
layer's own ``construct`` (its shard strategies included), and unloading returns that very layer.

To add a layer type: subclass :class:`LayerKind` (``matches``, ``features``, the two NumPy layout functions, the
branch, ``check``) and append an instance to :data:`LAYER_KINDS`.
"""
import sys

import numpy as np
from mindspore import nn, ops, mint, Tensor

from mindpet.delta.base import MergeBookkeeping
from mindpet.utils.exceptions import AdapterConfigError


# ----- graph side: how A and B act on a kind's inputs -------------------------------------------------------------
class LayerBranch(nn.Cell):
    """The graph-side operations of a kind (base: features on the last axis, as ``nn.Dense``).

    ``down(x, A)`` applies ``A`` ``(r, in)`` to the layer input ``x`` (result: ``r`` features), ``up(h, B)`` applies
    ``B`` ``(out, r)``, ``per_out(v)`` shapes a per-output vector to broadcast on the layer output, ``per_in(v)``
    one per input feature on the input, ``weight_view(w)`` gives the canonical ``(out, in)`` view of the stored
    weight inside the graph.
    """

    def __init__(self, transposed=False):
        super().__init__()
        self.transposed = transposed
        self.a_matmul = ops.MatMul(transpose_b=True)
        self.b_matmul = ops.MatMul(transpose_b=True)

    @staticmethod
    def _rows(x):
        return ops.reshape(x, (-1, x.shape[-1]))

    def down(self, x, lora_a):
        return ops.reshape(self.a_matmul(self._rows(x), lora_a), x.shape[:-1] + (lora_a.shape[0],))

    def up(self, h, lora_b):
        return ops.reshape(self.b_matmul(self._rows(h), lora_b), h.shape[:-1] + (lora_b.shape[0],))

    def per_out(self, vector):
        return vector

    def per_in(self, vector):
        return vector

    def weight_view(self, weight):
        if self.transposed:
            return ops.transpose(weight, (1, 0))
        return weight


class Conv2dBranch(LayerBranch):
    """``A`` as a convolution with the base kernel size, stride, padding and dilation and ``r`` output channels,
    ``B`` as a 1x1 convolution (as PEFT's LoRA ``Conv2d``); NCHW."""

    def __init__(self, in_channels, kernel_size, stride, pad_mode, padding, dilation):
        """``pad_mode`` 'same', 'valid' or 'pad'; for 'pad', ``padding`` is (top, bottom, left, right)."""
        super().__init__()
        self.in_channels = in_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.dilation = tuple(dilation)
        self.pad_mode, self.padding, self.pre_pad = pad_mode, 0, None
        if pad_mode == 'pad':
            top, bottom, left, right = padding
            if top == bottom and left == right:
                self.padding = (top, left)
            else:
                # ops.conv2d pads symmetrically only: uneven padding is applied to the input first.
                self.pad_mode, self.pre_pad = 'valid', (left, right, top, bottom)

    def down(self, x, lora_a):
        kernel = ops.reshape(lora_a, (lora_a.shape[0], self.in_channels) + self.kernel_size)
        if self.pre_pad is not None:
            x = ops.pad(x, self.pre_pad)
        return ops.conv2d(x, kernel, None, self.stride, self.pad_mode, self.padding, self.dilation)

    def up(self, h, lora_b):
        return ops.conv2d(h, ops.reshape(lora_b, lora_b.shape + (1, 1)))

    def per_out(self, vector):
        return ops.reshape(vector, (1, -1, 1, 1))

    def weight_view(self, weight):
        return ops.reshape(weight, (weight.shape[0], -1))


class EmbeddingBranch(LayerBranch):
    """Integer ids in: ``A^T[ids]`` (a row lookup, ``(*, r)``), then ``B`` as for a linear layer."""

    def __init__(self):
        super().__init__(transposed=True)

    def down(self, x, lora_a):
        return ops.gather(ops.transpose(lora_a, (1, 0)), x, 0)


# ----- host side: the kinds ---------------------------------------------------------------------------------------
class LayerKind:
    """One base layer type (see the module docstring). Stateless; :data:`LAYER_KINDS` holds one of each."""
    #: the name recorded with an adapter (``layer_types`` in its YAML)
    name = ''
    #: the attribute holding the weight Parameter
    weight_attr = 'weight'
    #: whether the inputs are float features on the last axis (IA3 may scale them; dropout may act on them)
    float_features_last = True

    def matches(self, cell):
        """Whether ``cell`` is of this kind."""
        raise NotImplementedError

    def check(self, cell, owner):
        """Raise ValueError (naming ``owner``, the setting and its value) for a configuration of ``cell`` that the
        methods cannot adapt exactly."""

    def features(self, cell):
        """``(in, out)`` of the canonical view."""
        raise NotImplementedError

    def to_canonical(self, weight):
        """NumPy: the stored weight -> the ``(out, in)`` view."""
        raise NotImplementedError

    def from_canonical(self, matrix, shape):
        """NumPy: an ``(out, in)`` matrix -> the stored layout of shape ``shape``."""
        raise NotImplementedError

    def canonical_shape(self, shape):
        """The ``(out, in)`` shape of the view of a stored weight of shape ``shape``."""
        return self.to_canonical(np.empty(shape, np.uint8)).shape

    def branch(self, cell):
        """The :class:`LayerBranch` for ``cell``."""
        return LayerBranch()


class LinearKind(LayerKind):
    """``mint.nn.Linear``: ``x W^T + b`` with ``W`` stored ``(out, in)``."""
    name = 'linear'

    def matches(self, cell):
        return isinstance(cell, mint.nn.Linear)

    def features(self, cell):
        return cell.in_features, cell.out_features

    def to_canonical(self, weight):
        return weight

    def from_canonical(self, matrix, shape):
        return matrix.reshape(shape)


class Conv1DKind(LayerKind):
    """GPT-2's ``Conv1D`` (``mindone.transformers.mindspore_utils.Conv1D``): ``x W + b`` with ``W`` stored
    ``(in, out)``. Matched only when mindone is imported (a model holding one has imported it)."""
    name = 'conv1d'

    def matches(self, cell):
        module = sys.modules.get('mindone.transformers.mindspore_utils')
        conv1d = getattr(module, 'Conv1D', None)
        return conv1d is not None and isinstance(cell, conv1d)

    def features(self, cell):
        in_features, out_features = cell.weight.shape
        return in_features, out_features

    def to_canonical(self, weight):
        return weight.T

    def from_canonical(self, matrix, shape):
        return matrix.T.reshape(shape)

    def branch(self, cell):
        return LayerBranch(transposed=True)


class Conv2dKind(LayerKind):
    """``nn.Conv2d`` and ``mint.nn.Conv2d`` (NCHW, groups 1): ``W`` stored ``(out, in, kh, kw)``."""
    name = 'conv2d'

    def matches(self, cell):
        return isinstance(cell, (nn.Conv2d, mint.nn.Conv2d))

    def check(self, cell, owner):
        groups = getattr(cell, 'group', getattr(cell, 'groups', 1))
        if groups != 1:
            raise ValueError(f"For '{owner}', a grouped convolution cannot be adapted (groups must be 1, but the "
                             f"{type(cell).__name__} has groups={groups}).")
        if getattr(cell, 'data_format', 'NCHW') != 'NCHW':
            raise ValueError(f"For '{owner}', the Conv2d data_format must be 'NCHW', but got {cell.data_format!r}.")
        if getattr(cell, 'padding_mode', 'zeros') != 'zeros':
            raise ValueError(f"For '{owner}', the Conv2d padding_mode must be 'zeros', but got "
                             f"{cell.padding_mode!r}.")
        padding = cell.padding
        if isinstance(padding, str) and padding == 'same' and any(k % 2 == 0 for k in cell.kernel_size):
            raise ValueError(f"For '{owner}', padding='same' with an even kernel size {tuple(cell.kernel_size)} "
                             f"cannot be adapted (where the extra row goes is the kernel's choice).")

    def features(self, cell):
        out_channels, in_channels, k_h, k_w = cell.weight.shape
        return in_channels * k_h * k_w, out_channels

    def to_canonical(self, weight):
        return weight.reshape(weight.shape[0], -1)

    def from_canonical(self, matrix, shape):
        return matrix.reshape(shape)

    def branch(self, cell):
        _, in_channels, k_h, k_w = cell.weight.shape
        if isinstance(cell, nn.Conv2d):
            pad_mode, padding = cell.pad_mode, cell.padding
            if isinstance(padding, int):
                padding = (padding,) * 4
        elif isinstance(cell.padding, str):
            pad_mode, padding = cell.padding, 0
        else:
            pad_h, pad_w = cell.padding
            pad_mode, padding = 'pad', (pad_h, pad_h, pad_w, pad_w)
        return Conv2dBranch(in_channels, (k_h, k_w), cell.stride, pad_mode, padding, cell.dilation)


class EmbeddingKind(LayerKind):
    """``mint.nn.Embedding``: ``W[ids]`` with ``W`` stored ``(num, dim)``, i.e. ``W^T onehot(ids)``: the view is
    ``W^T`` ``(dim, num)``, so LoRA's ``A`` is ``(r, num)`` and ``B`` ``(dim, r)`` as in PEFT."""
    name = 'embedding'
    float_features_last = False

    def matches(self, cell):
        return isinstance(cell, mint.nn.Embedding)

    def check(self, cell, owner):
        if getattr(cell, 'max_norm', None) is not None:
            raise ValueError(f"For '{owner}', an embedding with max_norm={cell.max_norm} cannot be adapted (it "
                             f"rescales looked-up rows, so a merged increment would not equal the branch).")

    def features(self, cell):
        num, dim = self.weight_of(cell).shape
        return num, dim

    def weight_of(self, cell):
        return getattr(cell, self.weight_attr)

    def to_canonical(self, weight):
        return weight.T

    def from_canonical(self, matrix, shape):
        return matrix.T.reshape(shape)

    def branch(self, cell):
        return EmbeddingBranch()


class NnEmbeddingKind(EmbeddingKind):
    """``nn.Embedding``: as ``mint.nn.Embedding``, the table is the Parameter ``embedding_table``."""
    name = 'nn_embedding'
    weight_attr = 'embedding_table'

    def matches(self, cell):
        return isinstance(cell, nn.Embedding)

    def check(self, cell, owner):
        pass


LAYER_KINDS = (LinearKind(), Conv1DKind(), Conv2dKind(), EmbeddingKind(), NnEmbeddingKind())
KINDS_BY_NAME = {kind.name: kind for kind in LAYER_KINDS}


def kind_of(cell):
    """The :class:`LayerKind` of ``cell``, or None (``nn.Dense`` and unknown layers)."""
    for kind in LAYER_KINDS:
        if kind.matches(cell):
            return kind
    return None


def _recorded_types(layer_types, source):
    """The ``layer_types`` mapping recorded with an adapter (None: every layer is a Dense), checked."""
    if layer_types is None:
        return {}
    if not isinstance(layer_types, dict) or not all(isinstance(k, str) for k in layer_types):
        raise AdapterConfigError(f"The adapter in '{source}' has 'layer_types' {layer_types!r}; expected a mapping "
                                 f"of layer name -> layer type.")
    return layer_types


def kind_named(name, source):
    """The kind recorded as ``name`` in an adapter; AdapterConfigError naming it when this mindpet has none."""
    if not isinstance(name, str) or name not in KINDS_BY_NAME:
        raise AdapterConfigError(f"The adapter in '{source}' records layer type {name!r}; this mindpet knows "
                                 f"{sorted(KINDS_BY_NAME)}.")
    return KINDS_BY_NAME[name]


def model_layer_types(model):
    """``layer key -> kind name`` of every layer of ``model`` that has a kind, adapted (a :class:`DeltaLayer`) or not;
    the key is the name prefix of the layer's weight Parameter. For adapters that record no layer types (other
    formats), so their shapes are checked on the right view."""
    types = {}
    for name, cell in model.cells_and_names():
        kind = cell.kind if isinstance(cell, DeltaLayer) else kind_of(cell)
        if kind is None or not name:
            continue
        param_name = getattr(getattr(cell, kind.weight_attr, None), 'name', '') or ''
        suffix = '.' + kind.weight_attr
        types[param_name[:-len(suffix)] if param_name.endswith(suffix) else name] = kind.name
    return types


# ----- the adapter store's view: fingerprints and checkpoint arrays in the canonical layout ------------------------
def canonical_fingerprint(fingerprint, layer_types, source):
    """A copy of a base-model fingerprint (name -> shape) in which each adapted layer of ``layer_types``
    (key -> kind name) shows its weight as ``<key>.weight`` of the canonical ``(out, in)`` shape, the form the
    tuners derive adapter shapes from."""
    out = dict(fingerprint)
    for key, name in _recorded_types(layer_types, source).items():
        kind = kind_named(name, source)
        stored = f'{key}.{kind.weight_attr}'
        if stored in fingerprint:
            out[f'{key}.weight'] = list(kind.canonical_shape(tuple(fingerprint[stored])))
    return out


def canonical_arrays(arrays, layer_types, source):
    """``arrays`` (name -> NumPy array, a base checkpoint) with each adapted layer's weight under ``<key>.weight``
    in the canonical layout (other entries unchanged)."""
    out = dict(arrays)
    for key, name in _recorded_types(layer_types, source).items():
        kind = kind_named(name, source)
        stored = f'{key}.{kind.weight_attr}'
        if stored in arrays:
            out[f'{key}.weight'] = kind.to_canonical(arrays[stored])
    return out


def stored_updates(updates, arrays, layer_types, source):
    """The inverse of :func:`canonical_arrays` for a tuner's ``name -> new array`` updates."""
    out = dict(updates)
    for key, name in _recorded_types(layer_types, source).items():
        kind = kind_named(name, source)
        canonical = f'{key}.weight'
        if canonical in updates:
            stored = f'{key}.{kind.weight_attr}'
            value = out.pop(canonical)
            out[stored] = np.ascontiguousarray(kind.from_canonical(value, arrays[stored].shape))
    return out


def canonical_weight_f32(layer):
    """The base weight of a delta Cell (a :class:`DeltaLayer` or a delta ``nn.Dense``) in the canonical
    ``(out, in)`` view, float32 NumPy."""
    if isinstance(layer, DeltaLayer):
        return layer.canonical_weight_f32()
    return layer.weight.asnumpy().astype(np.float32)


# ----- the delta Cell of a kind -----------------------------------------------------------------------------------
class DeltaLayer(MergeBookkeeping, nn.Cell):
    """Base of the delta Cells that wrap a base layer of a :class:`LayerKind` (``LoraLayer``, ``DoraLayer``,
    ``IA3Layer``).

    The base layer is held unregistered (``base_layer``), so its Parameters keep their names; this Cell adopts them
    under the same attribute names (``weight``, ``bias``, ``embedding_table``). Subclasses call ``base_layer`` for
    the base output and write the method's maths on the canonical ``(out, in)`` view; merging changes only
    Parameter data, so compiled graphs see it.

    Args:
        base_layer (nn.Cell): a layer of ``kind``.
        kind (LayerKind): its kind (see :func:`kind_of`).
        compute_dtype (mindspore.dtype): dtype the delta branch runs in.
    """

    def __init__(self, base_layer, kind, compute_dtype):
        super().__init__()
        owner = type(self).__name__
        kind.check(base_layer, owner)
        object.__setattr__(self, 'base_layer', base_layer)
        for name, param in base_layer.parameters_and_names():
            if '.' in name:
                raise ValueError(f"For '{owner}', the {type(base_layer).__name__} holds the nested parameter "
                                 f"'{name}'; only layers whose parameters are their own can be adapted.")
            setattr(self, name, param)
        self.kind = kind
        self.float_input = kind.float_features_last
        self.branch = kind.branch(base_layer)
        self.in_channels, self.out_channels = kind.features(base_layer)
        self.has_bias = getattr(base_layer, 'bias', None) is not None
        self.compute_dtype = compute_dtype
        self.dtype = compute_dtype
        self.merged = False
        self.cast = ops.Cast()

    @property
    def base_weight(self):
        """The base layer's weight Parameter (its own object)."""
        return getattr(self, self.kind.weight_attr)

    def set_train(self, mode=True):
        super().set_train(mode)
        self.base_layer.set_train(mode)
        return self

    def _branch_input(self, x):
        if self.float_input:
            return self.cast(x, self.compute_dtype)
        return x

    # ----- host side ----------------------------------------------------------------------------------------------
    def canonical_weight_f32(self):
        """The base weight's data in the canonical ``(out, in)`` view, float32 NumPy."""
        return np.ascontiguousarray(self.kind.to_canonical(self.base_weight.asnumpy().astype(np.float32)))

    def _set_canonical_weight(self, matrix):
        weight = self.base_weight
        stored = self.kind.from_canonical(np.asarray(matrix, np.float32), tuple(weight.shape))
        weight.set_data(Tensor(np.ascontiguousarray(stored).astype(weight.asnumpy().dtype)))

    def _set_bias(self, value):
        self.bias.set_data(Tensor(np.asarray(value, np.float32).astype(self.bias.asnumpy().dtype)))

    def unload(self):
        """The base layer itself (its class, attributes and Parameter objects), computing what this Cell computes
        when the branch is off or merged."""
        return self.base_layer

    def extend_repr(self):
        return f'base={type(self.base_layer).__name__}, kind={self.kind.name}, merged={self.merged}'
