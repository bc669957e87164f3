"""What the delta Cells share: building a delta Parameter from an initializer (:func:`init_param`), checking
initializer and ``nn.Dense`` keyword arguments, and :class:`DeltaDense`, the base of every delta ``nn.Dense``
(argument checks, the ``(*, in) -> (*, out)`` plumbing, and the merge bookkeeping: merge refused twice, unmerge
refused when nothing is merged, ``to_dense`` from the merged weight). Each method module only writes its maths:
the forward pass and how its merged weight is formed.
"""
import numpy as np
from mindspore import nn, ops, Parameter, Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import initializer

from mindpet.delta.sharding import ACTIVATION_NAMES
from mindpet.utils.validation import (FieldValueError, check_int, check_dtype, check_bool, check_choice,
                                      check_initializer, check_allocation)

_DENSE_KWARGS = ('weight_init', 'bias_init', 'has_bias', 'activation', 'dtype')


def check_dense_kwargs(owner, kwargs):
    """Reject keyword arguments ``nn.Dense`` does not take, naming them (instead of a bare TypeError later)."""
    unknown = sorted(set(kwargs) - set(_DENSE_KWARGS))
    if unknown:
        raise TypeError(f"For '{owner}', got unexpected keyword argument(s) {unknown}; the nn.Dense keywords "
                        f"accepted are {list(_DENSE_KWARGS)}.")
    # nn.Dense reports these without the Cell's name or the value (an unknown activation is even a KeyError).
    if 'has_bias' in kwargs:
        check_bool('has_bias', kwargs['has_bias'], owner)
    if isinstance(kwargs.get('activation'), str):
        check_choice('activation', kwargs['activation'], owner, ACTIVATION_NAMES)
    for name in ('weight_init', 'bias_init'):
        if kwargs.get(name) is not None:
            check_initializer(name, kwargs[name], owner)


def init_param(init, shape, dtype, name, owner=None, set_by=None):
    """A Parameter of ``shape`` and ``dtype`` from any MindSpore initializer form: a name ('zeros', 'normal'), an
    ``Initializer``, a number, a concrete Tensor, a lazily initialised Tensor (``Tensor(shape=..., dtype=...,
    init=One())``) or a numpy array. Tensors and arrays are cast to ``dtype`` (``initializer`` would keep their
    own dtype); a lazy Tensor contributes its ``Initializer``, so nothing of its own dtype is materialised.

    ``set_by`` names the arguments of ``owner`` that set the shape (e.g. ``"'hidden_size' and
    'bottleneck_size'"``), for the message below.

    Raises:
        ValueError: the Parameter would need more memory than is available (checked before allocating; the
            message names ``owner``, ``name`` and ``set_by`` with the estimate).
    """
    shape = [int(dim) for dim in shape]       # numpy integers are not accepted as MindSpore shapes
    what = f"the '{name}' set by {set_by}" if set_by else f"'{name}'"
    check_allocation(owner or name, what, shape, mstype.type_size_in_bytes(dtype))
    if isinstance(init, Tensor) and getattr(init, 'has_init', False) and getattr(init, 'init', None) is not None:
        # Casting a lazy Tensor (astype) crashes the process: use the initializer it carries instead.
        init = init.init
    elif isinstance(init, np.ndarray):
        init = Tensor(init)
    if isinstance(init, Tensor):
        init = init.astype(dtype)
    return Parameter(initializer(init, shape, dtype), name=name)


def check_dense_allocation(owner, in_channels, out_channels, kwargs):
    """Refuse, before ``nn.Dense`` allocates it, a base weight ``(out_channels, in_channels)`` that would not fit
    into the available memory. Not checked: a weight given as a Tensor or array (it already exists), and a 'zeros'
    weight, whose pages stay unallocated until written (the tuners build with 'zeros' and then adopt the base
    layer's own Parameter, so a layer as large as the free memory must not be refused)."""
    weight_init = kwargs.get('weight_init')
    if not isinstance(weight_init, (Tensor, np.ndarray)) and not (isinstance(weight_init, str)
                                                                   and weight_init.lower() == 'zeros'):
        dtype = kwargs.get('dtype', mstype.float32)
        check_allocation(owner, "'in_channels' and 'out_channels'", (out_channels, in_channels),
                         mstype.type_size_in_bytes(dtype) if isinstance(dtype, mstype.Type) else 4)


def check_rank_fits(owner, rank, in_channels, out_channels, name='lora_rank', bound=None):
    """Refuse a rank above ``min(in_channels, out_channels)``: a product of an ``(out, r)`` and an ``(r, in)`` factor
    cannot have a higher rank, so the extra rows only cost memory (and a rank of 10**9 would try to allocate them).
    ``bound`` names the limit in the message when it is not the layer's two sizes (e.g. an adapter's bottleneck).
    Returns the rank as an int."""
    limit = min(int(in_channels), int(out_channels))
    if int(rank) > limit:
        bound = bound or 'min(in_channels, out_channels)'
        raise FieldValueError(f"For '{owner}', the '{name}' must be <= {bound} = {limit}, but got {int(rank)}.",
                              field=name)
    return int(rank)


def check_init_shape(owner, name, init, shape):
    """Check initializer ``init`` of argument ``name`` of ``owner`` can fill ``shape`` (a Tensor/array of exactly
    that shape, or an initializer name/object)."""
    check_initializer(name, init, owner, shape)


class MergeBookkeeping:
    """The merge state every delta Cell shares (:class:`DeltaDense` and
    :class:`mindpet.delta.layer_kinds.DeltaLayer`): merging twice is refused, unmerging with nothing merged is
    refused; the subclass sets ``self.merged = False`` and writes ``_merge_weights()`` / ``_unmerge_weights()`` on
    Parameter data."""

    def merge(self):
        """Fold the delta into ``weight`` (and ``bias`` where the method scales it) and switch the delta branch off.

        Takes effect in already-compiled graphs (only Parameter data changes). Merging twice raises RuntimeError.
        """
        owner = type(self).__name__
        if self.merged:
            raise RuntimeError(f"For '{owner}', the delta is already merged into the weight; call unmerge() first.")
        self._merge_weights()
        self.merged = True

    def unmerge(self):
        """Undo :meth:`merge`: restore the base weight (and bias) and switch the delta branch on again."""
        owner = type(self).__name__
        if not self.merged:
            raise RuntimeError(f"For '{owner}', there is no merged delta to unmerge.")
        self._unmerge_weights()
        self.merged = False

    def _merge_weights(self):
        raise NotImplementedError

    def _unmerge_weights(self):
        raise NotImplementedError


class DeltaDense(MergeBookkeeping, nn.Dense):
    """Base of the delta Dense layers (LoRA, DoRA, IA3, PST, AdaLoRA, t-SVD).

    ``weight``/``bias`` keep ``nn.Dense``'s names, so a base checkpoint loads unchanged. Subclasses implement
    ``construct`` with :meth:`_to_2d`, :meth:`_base` and :meth:`_finish`, and the merge maths in
    :meth:`_merge_weights` / :meth:`_unmerge_weights`; :meth:`merged_weight` gives the equivalent plain weight.
    """

    def __init__(self, in_channels, out_channels, param_init_type=mstype.float32, compute_dtype=mstype.float16,
                 **kwargs):
        owner = type(self).__name__
        in_channels = check_int('in_channels', in_channels, owner)
        out_channels = check_int('out_channels', out_channels, owner)
        check_dtype('param_init_type', param_init_type, owner)
        check_dtype('compute_dtype', compute_dtype, owner)
        check_dense_kwargs(owner, kwargs)
        check_dense_allocation(owner, in_channels, out_channels, kwargs)
        super().__init__(in_channels, out_channels, **kwargs)
        self.param_init_type = param_init_type
        self.compute_dtype = compute_dtype
        # MindPet's attribute name for the compute dtype; downstream code reads layer.dtype.
        self.dtype = compute_dtype
        self.merged = False
        self.cast = ops.Cast()

    # ----- forward plumbing (called from construct; compiled into the graph) -----------------------------------
    def _to_compute(self, tensor):
        """``tensor`` in the compute dtype, with no Cast when it already is (frozen fp32 weights with fp32 compute:
        the graph then holds no per-step copy of the weight, and PyNative runs no cast kernel)."""
        if tensor.dtype == self.compute_dtype:
            return tensor
        return self.cast(tensor, self.compute_dtype)

    def _to_2d(self, x):
        """``(*, in)`` -> ``(N, in)`` in the compute dtype."""
        x_shape = x.shape
        if len(x_shape) < 2:
            raise ValueError(f"For '{type(self).__name__}', the input must have at least 2 dimensions, "
                             f"but got {len(x_shape)}.")
        if len(x_shape) != 2:
            x = self.reshape(x, (-1, x_shape[-1]))
        return self.cast(x, self.compute_dtype)

    def _base(self, x, weight):
        """``x @ weight^T`` in the compute dtype (no bias)."""
        return self.matmul(x, self.cast(weight, self.compute_dtype))

    def _add_bias(self, out):
        if self.has_bias:
            out = self.bias_add(out, self.cast(self.bias, self.compute_dtype))
        return out

    def _finish(self, out, x_shape, ori_dtype):
        """Activation, ``(N, out)`` -> ``(*, out)`` and the caller's dtype."""
        if self.activation_flag:
            out = self.activation(out)
        if len(x_shape) != 2:
            out = self.reshape(out, x_shape[:-1] + (self.out_channels,))
        return self.cast(out, ori_dtype)

    # ----- merge / export (host side, on Parameter data, so compiled graphs see it) -----------------------------
    def merged_weight(self):
        """The plain ``(out, in)`` weight equivalent to this layer now, as a numpy array of the weight's dtype."""
        if self.merged:
            return self.weight.asnumpy()
        return self._merged_weight_f32().astype(_np_dtype(self.weight))

    def merged_bias(self):
        """The plain bias equivalent to this layer now (numpy), or None without bias."""
        if not self.has_bias:
            return None
        if self.merged:
            return self.bias.asnumpy()
        return self._merged_bias_f32().astype(_np_dtype(self.bias))

    def _merged_weight_f32(self):
        raise NotImplementedError

    def _merged_bias_f32(self):
        return self.bias.asnumpy().astype(np.float32)

    def _set_weight(self, value_f32):
        self.weight.set_data(Tensor(np.asarray(value_f32, np.float32).astype(_np_dtype(self.weight))))

    def _set_bias(self, value_f32):
        self.bias.set_data(Tensor(np.asarray(value_f32, np.float32).astype(_np_dtype(self.bias))))

    def to_dense(self):
        """A plain ``nn.Dense`` (new Parameters ``weight``/``bias``) equal to this layer: zero inference overhead."""
        bias = self.merged_bias()
        return nn.Dense(self.in_channels, self.out_channels, weight_init=Tensor(self.merged_weight()),
                        bias_init=Tensor(bias) if bias is not None else None, has_bias=self.has_bias,
                        activation=self.activation, dtype=self.weight.dtype)


def _np_dtype(param):
    return param.asnumpy().dtype


def host_f32(param):
    """A Parameter's data as a float32 numpy array."""
    return param.asnumpy().astype(np.float32)

