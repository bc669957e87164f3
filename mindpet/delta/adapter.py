"""Adapter: a trainable bottleneck with a residual connection (Houlsby et al., 2019).

    y = x + W_up f(W_down x + b_down) + b_up

``W_down`` (``mindpet_delta_adapter_down_weight``, ``[bottleneck_size, hidden_size]``) and ``W_up``
(``mindpet_delta_adapter_up_weight``, ``[hidden_size, bottleneck_size]``) start from N(0, 0.01^2) and both biases
at zero, so the layer starts as a near-identity (Houlsby's initialisation) while every delta parameter receives a
gradient from the first step. The residual is added in the input's dtype, so a float16 adapter does not round
the main stream.

An adapter is non-linear, so it cannot be folded into the preceding Dense: ``merge()`` raises
``NotImplementedError`` (inference keeps the small bottleneck).

This module depends only on MindSpore (MindPet 1.0.4 needed MindFormers internals to import it).
"""
from mindspore import nn, ops
from mindspore import dtype as mstype
from mindspore.common.initializer import Normal

from mindpet.delta.base import init_param, check_dense_allocation
from mindpet.delta.sharding import apply_strategies, dense_entries, make_activation
from mindpet.utils.validation import check_bool, check_dtype, check_int, check_initializer

ADAPTER_INIT_SIGMA = 0.01


class BottleneckAdapter(nn.Cell):
    """Shared forward of the adapter family: ``x + up(f(down(x)))`` over the last axis.

    Subclasses define ``project_down(h)`` and ``project_up(h)`` on 2-D inputs in ``compute_dtype``.
    """

    def __init__(self, hidden_size, non_linearity, param_init_type, compute_dtype):
        super().__init__()
        self.hidden_size = hidden_size
        self.non_linearity_name = non_linearity
        self.non_linearity = make_activation(type(self).__name__, non_linearity)
        self.param_init_type = param_init_type
        self.compute_dtype = compute_dtype
        self.cast = ops.Cast()
        self.reshape = ops.Reshape()
        self.residual_add = ops.Add()

    def construct(self, x):
        ori_dtype = x.dtype
        x_shape = x.shape
        x2d = self.reshape(x, (-1, x_shape[-1]))
        h = self.cast(x2d, self.compute_dtype)
        h = self.project_down(h)
        h = self.non_linearity(h)
        h = self.project_up(h)
        out = self.residual_add(x2d, self.cast(h, ori_dtype))
        return self.reshape(out, x_shape)

    def merge(self):
        """Adapters cannot be merged: the bottleneck is non-linear, so no single weight reproduces it."""
        raise NotImplementedError(f"For '{type(self).__name__}', an adapter cannot be merged into a weight: its "
                                  f"bottleneck is non-linear ({self.non_linearity_name}). Keep the adapter for "
                                  f"inference, or use LoRA if a mergeable delta is needed.")


class AdapterLayer(BottleneckAdapter):
    """A Houlsby adapter: ``y = x + W_up f(W_down x + b_down) + b_up`` on the last axis of ``x``.

    Args:
        hidden_size (int): size of the last axis of the input (and output).
        bottleneck_size (int): inner size m. Default 64.
        non_linearity (str): a ``mindspore.nn.get_activation`` name. Default 'gelu' (tanh approximation).
        param_init_type (mindspore.dtype): dtype of the delta parameters: float32, float16 or bfloat16.
        compute_dtype (mindspore.dtype): dtype of the bottleneck matmuls. Default float16 (as MindPet).

    Inputs:
        x (Tensor): shape ``(*, hidden_size)``.

    Outputs:
        Tensor of the shape and dtype of ``x``.

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindpet.delta.adapter import AdapterLayer
        >>> layer = AdapterLayer(16, bottleneck_size=4, compute_dtype=ms.float32)
        >>> layer(ms.Tensor(np.ones((2, 3, 16), np.float32))).shape
        (2, 3, 16)
    """

    def __init__(self, hidden_size, bottleneck_size=64, non_linearity='gelu', param_init_type=mstype.float32,
                 compute_dtype=mstype.float16):
        owner = type(self).__name__
        hidden_size = check_int('hidden_size', hidden_size, owner)
        bottleneck_size = check_int('bottleneck_size', bottleneck_size, owner)
        check_dtype('param_init_type', param_init_type, owner)
        check_dtype('compute_dtype', compute_dtype, owner)
        super().__init__(hidden_size, non_linearity, param_init_type, compute_dtype)
        self.bottleneck_size = bottleneck_size
        self.mindpet_delta_adapter_down_weight = init_param(
            Normal(ADAPTER_INIT_SIGMA), (bottleneck_size, hidden_size), param_init_type,
            'mindpet_delta_adapter_down_weight', owner, "'hidden_size' and 'bottleneck_size'")
        self.mindpet_delta_adapter_down_bias = init_param('zeros', (bottleneck_size,), param_init_type,
                                                          'mindpet_delta_adapter_down_bias')
        self.mindpet_delta_adapter_up_weight = init_param(
            Normal(ADAPTER_INIT_SIGMA), (hidden_size, bottleneck_size), param_init_type,
            'mindpet_delta_adapter_up_weight', owner, "'hidden_size' and 'bottleneck_size'")
        self.mindpet_delta_adapter_up_bias = init_param('zeros', (hidden_size,), param_init_type,
                                                        'mindpet_delta_adapter_up_bias')
        self.down_matmul = ops.MatMul(transpose_b=True)
        self.down_bias_add = ops.BiasAdd()
        self.up_matmul = ops.MatMul(transpose_b=True)
        self.up_bias_add = ops.BiasAdd()

    def project_down(self, h):
        h = self.down_matmul(h, self.cast(self.mindpet_delta_adapter_down_weight, self.compute_dtype))
        return self.down_bias_add(h, self.cast(self.mindpet_delta_adapter_down_bias, self.compute_dtype))

    def project_up(self, h):
        h = self.up_matmul(h, self.cast(self.mindpet_delta_adapter_up_weight, self.compute_dtype))
        return self.up_bias_add(h, self.cast(self.mindpet_delta_adapter_up_bias, self.compute_dtype))

    def shard(self, strategy_matmul_down_sampler=None, strategy_bias_down_sampler=None,
              strategy_non_linearity=None, strategy_matmul_up_sampler=None, strategy_bias_up_sampler=None,
              strategy_residual_add=None):
        """Per-operator semi-auto-parallel strategies (MindPet's keywords); each None or a tuple of tuples.

        The matmuls take ``((a, b), (c, b))`` (weights are ``[out, in]``), the bias adds ``((a, b), (b,))``,
        the non-linearity ``((a, b),)`` and the residual add ``((a, b), (a, b))``.
        """
        apply_strategies(type(self).__name__, self.shard_entries(
            strategy_matmul_down_sampler, strategy_bias_down_sampler, strategy_non_linearity,
            strategy_matmul_up_sampler, strategy_bias_up_sampler, strategy_residual_add))
        return self

    def shard_entries(self, strategy_matmul_down_sampler=None, strategy_bias_down_sampler=None,
                      strategy_non_linearity=None, strategy_matmul_up_sampler=None, strategy_bias_up_sampler=None,
                      strategy_residual_add=None):
        """The ``apply_strategies`` entries for :meth:`shard` (also used by :class:`AdapterDense`)."""
        return [
            (self.down_matmul, 'strategy_matmul_down_sampler', strategy_matmul_down_sampler, (2, 2)),
            (self.down_bias_add, 'strategy_bias_down_sampler', strategy_bias_down_sampler, (2, 1)),
            (self.non_linearity, 'strategy_non_linearity', strategy_non_linearity, (2,)),
            (self.up_matmul, 'strategy_matmul_up_sampler', strategy_matmul_up_sampler, (2, 2)),
            (self.up_bias_add, 'strategy_bias_up_sampler', strategy_bias_up_sampler, (2, 1)),
            (self.residual_add, 'strategy_residual_add', strategy_residual_add, (2, 2)),
        ]

    def extend_repr(self):
        return (f'hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, '
                f'non_linearity={self.non_linearity_name}, compute_dtype={self.compute_dtype}')


class DenseWithAdapter(nn.Dense):
    """Shared forward of ``AdapterDense`` and ``LowRankAdapterDense``: the Dense (in ``compute_dtype``), its
    activation, then the adapter held in ``self.adapter``. ``weight``/``bias`` keep Dense's names, so a base
    checkpoint loads unchanged."""

    def __init__(self, in_channels, out_channels, weight_init, bias_init, has_bias, activation, compute_dtype):
        owner = type(self).__name__
        in_channels = check_int('in_channels', in_channels, owner)
        out_channels = check_int('out_channels', out_channels, owner)
        check_bool('has_bias', has_bias, owner)
        check_initializer('weight_init', weight_init, owner)
        if bias_init is not None:
            check_initializer('bias_init', bias_init, owner)
        if isinstance(activation, str):
            make_activation(owner, activation, arg='activation')
        check_dtype('compute_dtype', compute_dtype, owner)
        check_dense_allocation(owner, in_channels, out_channels, {'weight_init': weight_init})
        super().__init__(in_channels, out_channels, weight_init=weight_init, bias_init=bias_init,
                         has_bias=has_bias, activation=activation)
        self.compute_dtype = compute_dtype
        self.cast = ops.Cast()

    def construct(self, x):
        ori_dtype = x.dtype
        x_shape = x.shape
        x = self.reshape(x, (-1, x_shape[-1]))
        x = self.cast(x, self.compute_dtype)
        out = self.matmul(x, self.cast(self.weight, self.compute_dtype))
        if self.has_bias:
            out = self.bias_add(out, self.cast(self.bias, self.compute_dtype))
        if self.activation_flag:
            out = self.activation(out)
        out = self.adapter(self.cast(out, ori_dtype))
        return self.reshape(out, x_shape[:-1] + (self.out_channels,))

    def merge(self):
        """Refused: see :meth:`BottleneckAdapter.merge`."""
        self.adapter.merge()

    def shard_dense(self, strategy_matmul_org, strategy_bias_org, strategy_activation_org, adapter_entries):
        """Check and apply the base Dense's strategies together with the adapter's ``adapter_entries``."""
        owner = type(self).__name__
        apply_strategies(owner, [(self.matmul, 'strategy_matmul_org', strategy_matmul_org, (2, 2))]
                         + dense_entries(owner, self, strategy_bias_org, strategy_activation_org,
                                         'strategy_bias_org', 'strategy_activation_org')
                         + adapter_entries)
        return self


class AdapterDense(DenseWithAdapter):
    """``nn.Dense`` followed by an :class:`AdapterLayer` on its output: ``y = Adapter(act(x W^T + b))``.

    Args:
        in_channels, out_channels, weight_init, bias_init, has_bias, activation: as ``nn.Dense`` (the frozen
            base layer; ``weight``/``bias`` keep Dense's names).
        bottleneck_size (int): the adapter's inner size. Default 64.
        non_linearity (str): the adapter's activation (a ``get_activation`` name). Default 'gelu'.
        param_init_type (mindspore.dtype): dtype of the adapter parameters. Default float32.
        compute_dtype (mindspore.dtype): dtype of every matmul. Default float16.

    Inputs:
        x (Tensor): shape ``(*, in_channels)``.

    Outputs:
        Tensor of shape ``(*, out_channels)`` and the dtype of ``x``.

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindpet.delta import AdapterDense
        >>> layer = AdapterDense(16, 8, bottleneck_size=4, compute_dtype=ms.float32)
        >>> layer(ms.Tensor(np.ones((2, 16), np.float32))).shape
        (2, 8)
    """

    def __init__(self, in_channels, out_channels, weight_init='normal', bias_init='zeros', has_bias=True,
                 activation=None, bottleneck_size=64, non_linearity='gelu', param_init_type=mstype.float32,
                 compute_dtype=mstype.float16):
        owner = type(self).__name__
        bottleneck_size = check_int('bottleneck_size', bottleneck_size, owner)
        make_activation(owner, non_linearity)
        check_dtype('param_init_type', param_init_type, owner)
        super().__init__(in_channels, out_channels, weight_init, bias_init, has_bias, activation, compute_dtype)
        self.bottleneck_size = bottleneck_size
        self.adapter = AdapterLayer(out_channels, bottleneck_size, non_linearity, param_init_type, compute_dtype)

    def shard(self, strategy_matmul_org=None, strategy_bias_org=None, strategy_activation_org=None,
              strategy_matmul_down_sampler=None, strategy_bias_down_sampler=None, strategy_non_linearity=None,
              strategy_matmul_up_sampler=None, strategy_bias_up_sampler=None, strategy_residual_add=None):
        """Strategies for the base Dense (``strategy_*_org``) and its adapter (see :meth:`AdapterLayer.shard`)."""
        return self.shard_dense(strategy_matmul_org, strategy_bias_org, strategy_activation_org,
                                self.adapter.shard_entries(
                                    strategy_matmul_down_sampler, strategy_bias_down_sampler,
                                    strategy_non_linearity, strategy_matmul_up_sampler, strategy_bias_up_sampler,
                                    strategy_residual_add))
