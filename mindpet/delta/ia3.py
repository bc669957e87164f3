"""IA3: infused adapter by inhibiting and amplifying inner activations (Liu et al., 2022).

A learned vector ``l`` (``mindpet_delta_ia3_vector``, init 1) rescales a frozen Dense layer:

- keys / values (``ia3_feedforward=False``): the output is scaled, ``h = l * (W0 x + b)``, ``l`` of shape ``[out]``;
- feed-forward (``ia3_feedforward=True``, put it on the feed-forward block's second, output projection): the input
  is scaled, ``h = W0 (l * x) + b``, ``l`` of shape ``[in]`` (the paper's ``l_ff * gamma(W1 x)``).

At initialisation the layer is its base Dense. Merging folds ``l`` into the weight (``diag(l) W0`` and ``l * b``, or
``W0 diag(l)``), so inference costs exactly the base layer.
"""
import numpy as np
from mindspore import ops, Parameter, Tensor
from mindspore import dtype as mstype

from mindpet.delta.base import DeltaDense, host_f32
from mindpet.delta.layer_kinds import DeltaLayer
from mindpet.delta.sharding import apply_dense_strategies
from mindpet.delta.base import init_param, check_init_shape
from mindpet.utils.validation import check_bool


class IA3Dense(DeltaDense):
    """A ``nn.Dense`` whose output (keys/values) or input (feed-forward) is scaled by a learned vector.

    Args:
        in_channels (int): input features.
        out_channels (int): output features.
        ia3_feedforward (bool): False scales the output (``l`` has ``out_channels`` entries; keys and values),
            True scales the input (``in_channels`` entries; the feed-forward output projection). Default False.
        ia3_init: initializer name/object or Tensor for ``l``. Default 'ones' (the layer starts as its base).
        param_init_type (mindspore.dtype): dtype of ``l``. Default float32.
        compute_dtype (mindspore.dtype): dtype of the matmul and scaling. Default float16.
        **kwargs: ``nn.Dense`` keywords (``weight_init``, ``bias_init``, ``has_bias``, ``activation``, ``dtype``).

    Inputs:
        x (Tensor): shape ``(*, in_channels)``, at least 2 dimensions.

    Outputs:
        Tensor ``(*, out_channels)`` of the dtype of ``x``.

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindpet.delta.ia3 import IA3Dense
        >>> value_proj = IA3Dense(16, 16, compute_dtype=ms.float32)
        >>> ffn_out = IA3Dense(64, 16, ia3_feedforward=True, compute_dtype=ms.float32)
        >>> ffn_out.mindpet_delta_ia3_vector.shape
        (64,)
    """

    def __init__(self, in_channels, out_channels, ia3_feedforward=False, ia3_init='ones',
                 param_init_type=mstype.float32, compute_dtype=mstype.float16, **kwargs):
        owner = type(self).__name__
        self.ia3_feedforward = check_bool('ia3_feedforward', ia3_feedforward, owner)
        super().__init__(in_channels, out_channels, param_init_type, compute_dtype, **kwargs)
        size = in_channels if ia3_feedforward else out_channels
        check_init_shape(owner, 'ia3_init', ia3_init, (size,))
        self.mindpet_delta_ia3_vector = init_param(ia3_init, (size,), param_init_type, 'mindpet_delta_ia3_vector')
        # 1 while the vector acts in the forward pass, 0 once merged into the weight (Parameter data, so a
        # compiled graph sees merge()/unmerge()).
        self.mindpet_state_ia3_gate = Parameter(Tensor(1.0, mstype.float32), name='mindpet_state_ia3_gate',
                                                requires_grad=False)
        self.ia3_mul = ops.Mul()

    def construct(self, x):
        ori_dtype = x.dtype
        x_shape = x.shape
        x = self._to_2d(x)
        gate = self.mindpet_state_ia3_gate
        vector = gate * self.cast(self.mindpet_delta_ia3_vector, mstype.float32) + (1.0 - gate)
        vector = self.cast(vector, self.compute_dtype)
        if self.ia3_feedforward:
            out = self._add_bias(self._base(self.ia3_mul(x, vector), self.weight))
        else:
            out = self.ia3_mul(self._add_bias(self._base(x, self.weight)), vector)
        return self._finish(out, x_shape, ori_dtype)

    # ----- merge / export --------------------------------------------------------------------------------------
    def _merged_weight_f32(self):
        return ia3_weight(host_f32(self.weight), host_f32(self.mindpet_delta_ia3_vector), self.ia3_feedforward)

    def _merged_bias_f32(self):
        return ia3_bias(host_f32(self.bias), host_f32(self.mindpet_delta_ia3_vector), self.ia3_feedforward)

    def _merge_weights(self):
        if np.any(host_f32(self.mindpet_delta_ia3_vector) == 0):
            raise RuntimeError("For 'IA3Dense', an entry of the IA3 vector is exactly 0, so the merge could not be "
                               "undone; use to_dense() for a merged copy instead.")
        weight, bias = self._merged_weight_f32(), self._merged_bias_f32() if self.has_bias else None
        self._set_weight(weight)
        if bias is not None:
            self._set_bias(bias)
        self.mindpet_state_ia3_gate.set_data(Tensor(0.0, mstype.float32))

    def _unmerge_weights(self):
        vector = host_f32(self.mindpet_delta_ia3_vector)
        weight = host_f32(self.weight)
        self._set_weight(weight / vector[None, :] if self.ia3_feedforward else weight / vector[:, None])
        if self.has_bias and not self.ia3_feedforward:
            self._set_bias(host_f32(self.bias) / vector)
        self.mindpet_state_ia3_gate.set_data(Tensor(1.0, mstype.float32))

    def shard(self, strategy_org_dense_matmul=None, strategy_org_bias_add=None, strategy_ia3_mul=None,
              strategy_activation=None):
        """Semi-auto-parallel strategies: ``strategy_ia3_mul`` is ``((dp, k), (k,))`` with ``k`` the split of the
        scaled axis (``in`` for feed-forward, ``out`` otherwise)."""
        return apply_dense_strategies(type(self).__name__, self, [
            (self.matmul, 'strategy_org_dense_matmul', strategy_org_dense_matmul, (2, 2)),
            (self.ia3_mul, 'strategy_ia3_mul', strategy_ia3_mul, (2, 1)),
        ], strategy_org_bias_add, strategy_activation)

    def extend_repr(self):
        return super().extend_repr() + f', ia3_feedforward={self.ia3_feedforward}, merged={self.merged}'


def ia3_weight(weight, vector, feedforward):
    """The plain weight equal to an IA3 layer: ``W0 diag(l)`` (feed-forward, input scaled) or ``diag(l) W0``.

    Example:
        >>> import numpy as np
        >>> ia3_weight(np.ones((2, 3), np.float32), np.array([1., 2., 3.], np.float32), True)[0]
        array([1., 2., 3.], dtype=float32)
    """
    vector = vector.astype(np.float32)
    weight = weight.astype(np.float32)
    return weight * vector[None, :] if feedforward else vector[:, None] * weight


def ia3_bias(bias, vector, feedforward):
    """The plain bias equal to an IA3 layer: unchanged (feed-forward) or ``l * b``."""
    bias = bias.astype(np.float32)
    return bias if feedforward else vector.astype(np.float32) * bias


class IA3Layer(DeltaLayer):
    """IA3 on a base layer of a :class:`~mindpet.delta.layer_kinds.LayerKind`: ``h = l * base(x)`` (``l`` per output
    feature or channel; every kind) or, with ``ia3_feedforward``, ``h = base(l * x)`` (``l`` per input feature;
    layers whose inputs are features on the last axis: ``mint.nn.Linear``, GPT-2 ``Conv1D``). Merging folds ``l``
    into the canonical ``(out, in)`` view of the weight (and the bias when the output is scaled). Parameters and
    state are :class:`IA3Dense`'s, so the IA3 tuner drives both.

    Args:
        base_layer (nn.Cell): the layer to adapt; it keeps its Parameter objects and names.
        kind (LayerKind): ``kind_of(base_layer)``.
        ia3_feedforward (bool): scale the input instead of the output. Default False.
        ia3_init, param_init_type: as :class:`IA3Dense`.

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindspore import mint
        >>> from mindpet.delta.layer_kinds import kind_of
        >>> base = mint.nn.Linear(16, 8)
        >>> IA3Layer(base, kind_of(base)).mindpet_delta_ia3_vector.shape
        (8,)
    """

    def __init__(self, base_layer, kind, ia3_feedforward=False, ia3_init='ones', param_init_type=mstype.float32,
                 compute_dtype=None):
        owner = type(self).__name__
        self.ia3_feedforward = check_bool('ia3_feedforward', ia3_feedforward, owner)
        if ia3_feedforward and (not kind.float_features_last or kind.name == 'conv2d'):
            raise ValueError(f"For '{owner}', ia3_feedforward=True scales input features on the last axis, which "
                             f"a {type(base_layer).__name__} (layer type '{kind.name}') does not take; remove it "
                             f"from 'feedforward_modules'.")
        weight = getattr(base_layer, kind.weight_attr)
        super().__init__(base_layer, kind, weight.dtype if compute_dtype is None else compute_dtype)
        size = self.in_channels if ia3_feedforward else self.out_channels
        check_init_shape(owner, 'ia3_init', ia3_init, (size,))
        self.mindpet_delta_ia3_vector = init_param(ia3_init, (size,), param_init_type, 'mindpet_delta_ia3_vector')
        self.mindpet_state_ia3_gate = Parameter(Tensor(1.0, mstype.float32), name='mindpet_state_ia3_gate',
                                                requires_grad=False)

    def construct(self, x):
        gate = self.mindpet_state_ia3_gate
        vector = gate * self.cast(self.mindpet_delta_ia3_vector, mstype.float32) + (1.0 - gate)
        if self.ia3_feedforward:
            return self.base_layer(x * self.cast(self.branch.per_in(vector), x.dtype))
        out = self.base_layer(x)
        return out * self.cast(self.branch.per_out(vector), out.dtype)

    def _merge_weights(self):
        vector = host_f32(self.mindpet_delta_ia3_vector)
        if np.any(vector == 0):
            raise RuntimeError("For 'IA3Layer', an entry of the IA3 vector is exactly 0, so the merge could not be "
                               "undone.")
        self._set_canonical_weight(ia3_weight(self.canonical_weight_f32(), vector, self.ia3_feedforward))
        if self.has_bias and not self.ia3_feedforward:
            self._set_bias(ia3_bias(host_f32(self.bias), vector, False))
        self.mindpet_state_ia3_gate.set_data(Tensor(0.0, mstype.float32))

    def _unmerge_weights(self):
        vector = host_f32(self.mindpet_delta_ia3_vector)
        weight = self.canonical_weight_f32()
        self._set_canonical_weight(weight / vector[None, :] if self.ia3_feedforward else weight / vector[:, None])
        if self.has_bias and not self.ia3_feedforward:
            self._set_bias(host_f32(self.bias) / vector)
        self.mindpet_state_ia3_gate.set_data(Tensor(1.0, mstype.float32))

    def extend_repr(self):
        return super().extend_repr() + f', ia3_feedforward={self.ia3_feedforward}'
