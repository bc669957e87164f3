"""Low-rank adapter: an adapter whose projections are each a product of two thin factors (Compacter-style).

    W_down = L_down R_down   (L_down: [hidden, k], R_down: [k, m])
    W_up   = L_up R_up       (L_up: [m, k],      R_up: [k, hidden])
    y = x + f(x W_down + b_down) W_up + b_up,    m = hidden_size // reduction_factor, k = low_rank_size

Each projection is formed from its factors first, then applied (as MindPet does, so its shard keywords
``strategy_matmul_*_weight`` / ``strategy_matmul_*_input`` keep their meaning). The delta parameters are
``mindpet_delta_low_rank_adapter_{down,up}_{left,right,bias}``; the factors start from ``low_rank_w_init``
(default Xavier-uniform, as MindPet) and the biases at zero. Like every adapter it cannot be merged into a
weight (``merge()`` raises ``NotImplementedError``).
"""
from mindspore import ops
from mindspore import dtype as mstype

from mindpet.delta.adapter import BottleneckAdapter, DenseWithAdapter
from mindpet.delta.base import init_param, check_rank_fits
from mindpet.delta.sharding import apply_strategies, make_activation
from mindpet.utils.validation import check_dtype, check_int, check_initializer


def _check_factor_init(owner, value):
    # One initializer serves four factors of different shapes (no Tensor fits all), and equal constants would make
    # the factors start symmetric.
    check_initializer('low_rank_w_init', value, owner, named_only=True)


def _check_reduction(owner, hidden_size, reduction_factor):
    reduction_factor = check_int('reduction_factor', reduction_factor, owner)
    if reduction_factor > hidden_size:
        raise ValueError(f"For '{owner}', the 'reduction_factor' must be <= 'hidden_size' ({hidden_size}) so the "
                         f"bottleneck hidden_size // reduction_factor is at least 1, but got {reduction_factor}.")
    return reduction_factor


def check_low_rank_sizes(owner, hidden_name, hidden_size, reduction_factor, low_rank_size):
    """The checked ``(reduction_factor, low_rank_size)`` for a bottleneck over ``hidden_size``: each projection
    is a ``(hidden, m)`` product of two factors with inner size ``k``, whose rank cannot exceed the bottleneck
    ``m = hidden // reduction_factor`` (``hidden_name``: what the Cell calls ``hidden``)."""
    reduction_factor = _check_reduction(owner, hidden_size, reduction_factor)
    low_rank_size = check_int('low_rank_size', low_rank_size, owner)
    check_rank_fits(owner, low_rank_size, hidden_size, hidden_size // reduction_factor, name='low_rank_size',
                    bound=f"the bottleneck {hidden_name} // reduction_factor")
    return reduction_factor, low_rank_size


class LowRankAdapterLayer(BottleneckAdapter):
    """An adapter whose down and up projections are each the product of two rank-``low_rank_size`` factors.

    Args:
        hidden_size (int): size of the last axis of the input (and output).
        reduction_factor (int): the bottleneck is ``hidden_size // reduction_factor``; must be <= hidden_size.
        low_rank_size (int): inner size k of each factor pair, at most the bottleneck. Default 1.
        low_rank_w_init (str | Initializer): initializer of the four factors. Default 'xavier_uniform'.
        non_linearity (str): a ``get_activation`` name. Default 'gelu'.
        param_init_type (mindspore.dtype): dtype of the delta parameters. Default float32.
        compute_dtype (mindspore.dtype): dtype of the matmuls. Default float16.

    Inputs:
        x (Tensor): shape ``(*, hidden_size)``.

    Outputs:
        Tensor of the shape and dtype of ``x``.

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindpet.delta.low_rank_adapter import LowRankAdapterLayer
        >>> layer = LowRankAdapterLayer(16, reduction_factor=4, low_rank_size=2, compute_dtype=ms.float32)
        >>> layer(ms.Tensor(np.ones((2, 16), np.float32))).shape
        (2, 16)
    """

    def __init__(self, hidden_size, reduction_factor, low_rank_size=1, low_rank_w_init='xavier_uniform',
                 non_linearity='gelu', param_init_type=mstype.float32, compute_dtype=mstype.float16):
        owner = type(self).__name__
        hidden_size = check_int('hidden_size', hidden_size, owner)
        reduction_factor, low_rank_size = check_low_rank_sizes(owner, 'hidden_size', hidden_size, reduction_factor,
                                                         low_rank_size)
        _check_factor_init(owner, low_rank_w_init)
        check_dtype('param_init_type', param_init_type, owner)
        check_dtype('compute_dtype', compute_dtype, owner)
        super().__init__(hidden_size, non_linearity, param_init_type, compute_dtype)
        self.reduction_factor = reduction_factor
        self.low_rank_size = low_rank_size
        self.bottleneck_size = hidden_size // reduction_factor
        m, k = self.bottleneck_size, low_rank_size
        prefix = 'mindpet_delta_low_rank_adapter_'
        by_hidden = "'hidden_size' and 'low_rank_size'"
        self.mindpet_delta_low_rank_adapter_down_left = init_param(low_rank_w_init, (hidden_size, k),
                                                                   param_init_type, prefix + 'down_left', owner,
                                                                   by_hidden)
        self.mindpet_delta_low_rank_adapter_down_right = init_param(low_rank_w_init, (k, m), param_init_type,
                                                                    prefix + 'down_right')
        self.mindpet_delta_low_rank_adapter_down_bias = init_param('zeros', (m,), param_init_type,
                                                                   prefix + 'down_bias')
        self.mindpet_delta_low_rank_adapter_up_left = init_param(low_rank_w_init, (m, k), param_init_type,
                                                                 prefix + 'up_left')
        self.mindpet_delta_low_rank_adapter_up_right = init_param(low_rank_w_init, (k, hidden_size),
                                                                  param_init_type, prefix + 'up_right', owner,
                                                                  by_hidden)
        self.mindpet_delta_low_rank_adapter_up_bias = init_param('zeros', (hidden_size,), param_init_type,
                                                                 prefix + 'up_bias')
        self.down_matmul_weight = ops.MatMul()
        self.down_matmul_input = ops.MatMul()
        self.down_bias_add = ops.BiasAdd()
        self.up_matmul_weight = ops.MatMul()
        self.up_matmul_input = ops.MatMul()
        self.up_bias_add = ops.BiasAdd()

    def project_down(self, h):
        weight = self.down_matmul_weight(self.cast(self.mindpet_delta_low_rank_adapter_down_left, self.compute_dtype),
                                         self.cast(self.mindpet_delta_low_rank_adapter_down_right,
                                                   self.compute_dtype))
        h = self.down_matmul_input(h, weight)
        return self.down_bias_add(h, self.cast(self.mindpet_delta_low_rank_adapter_down_bias, self.compute_dtype))

    def project_up(self, h):
        weight = self.up_matmul_weight(self.cast(self.mindpet_delta_low_rank_adapter_up_left, self.compute_dtype),
                                       self.cast(self.mindpet_delta_low_rank_adapter_up_right, self.compute_dtype))
        h = self.up_matmul_input(h, weight)
        return self.up_bias_add(h, self.cast(self.mindpet_delta_low_rank_adapter_up_bias, self.compute_dtype))

    def shard(self, strategy_matmul_down_sampler_weight=None, strategy_matmul_down_sampler_input=None,
              strategy_bias_down_sampler=None, strategy_non_linearity=None, strategy_matmul_up_sampler_weight=None,
              strategy_matmul_up_sampler_input=None, strategy_bias_up_sampler=None, strategy_residual_add=None):
        """Per-operator strategies (MindPet's keywords), each None or a tuple of tuples.

        ``*_weight`` shards the factor product ``left @ right`` (``((a, b), (b, c))``), ``*_input`` the
        activation-times-weight matmul (``((a, b), (b, c))``), the bias adds take ``((a, b), (b,))``, the
        non-linearity ``((a, b),)`` and the residual add ``((a, b), (a, b))``.
        """
        apply_strategies(type(self).__name__, self.shard_entries(
            strategy_matmul_down_sampler_weight, strategy_matmul_down_sampler_input, strategy_bias_down_sampler,
            strategy_non_linearity, strategy_matmul_up_sampler_weight, strategy_matmul_up_sampler_input,
            strategy_bias_up_sampler, strategy_residual_add))
        return self

    def shard_entries(self, strategy_matmul_down_sampler_weight=None, strategy_matmul_down_sampler_input=None,
                      strategy_bias_down_sampler=None, strategy_non_linearity=None,
                      strategy_matmul_up_sampler_weight=None, strategy_matmul_up_sampler_input=None,
                      strategy_bias_up_sampler=None, strategy_residual_add=None):
        """The ``apply_strategies`` entries for :meth:`shard` (also used by :class:`LowRankAdapterDense`)."""
        return [
            (self.down_matmul_weight, 'strategy_matmul_down_sampler_weight', strategy_matmul_down_sampler_weight,
             (2, 2)),
            (self.down_matmul_input, 'strategy_matmul_down_sampler_input', strategy_matmul_down_sampler_input,
             (2, 2)),
            (self.down_bias_add, 'strategy_bias_down_sampler', strategy_bias_down_sampler, (2, 1)),
            (self.non_linearity, 'strategy_non_linearity', strategy_non_linearity, (2,)),
            (self.up_matmul_weight, 'strategy_matmul_up_sampler_weight', strategy_matmul_up_sampler_weight, (2, 2)),
            (self.up_matmul_input, 'strategy_matmul_up_sampler_input', strategy_matmul_up_sampler_input, (2, 2)),
            (self.up_bias_add, 'strategy_bias_up_sampler', strategy_bias_up_sampler, (2, 1)),
            (self.residual_add, 'strategy_residual_add', strategy_residual_add, (2, 2)),
        ]

    def extend_repr(self):
        return (f'hidden_size={self.hidden_size}, reduction_factor={self.reduction_factor}, '
                f'bottleneck_size={self.bottleneck_size}, low_rank_size={self.low_rank_size}, '
                f'non_linearity={self.non_linearity_name}, compute_dtype={self.compute_dtype}')


class LowRankAdapterDense(DenseWithAdapter):
    """``nn.Dense`` followed by a :class:`LowRankAdapterLayer` on its output.

    Args:
        in_channels, out_channels, weight_init, bias_init, has_bias, activation: as ``nn.Dense`` (the frozen
            base layer; ``weight``/``bias`` keep Dense's names).
        reduction_factor (int): bottleneck = ``out_channels // reduction_factor``. Default 1.
        low_rank_size (int): inner size of each factor pair, at most the bottleneck. Default 1.
        low_rank_w_init (str | Initializer): initializer of the factors. Default 'xavier_uniform'.
        non_linearity (str): the adapter's activation. Default 'gelu'.
        param_init_type (mindspore.dtype): dtype of the adapter parameters. Default float32.
        compute_dtype (mindspore.dtype): dtype of every matmul. Default float16.

    Inputs:
        x (Tensor): shape ``(*, in_channels)``.

    Outputs:
        Tensor of shape ``(*, out_channels)`` and the dtype of ``x``.

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindpet.delta import LowRankAdapterDense
        >>> layer = LowRankAdapterDense(16, 8, reduction_factor=2, low_rank_size=2, compute_dtype=ms.float32)
        >>> layer(ms.Tensor(np.ones((2, 16), np.float32))).shape
        (2, 8)
    """

    def __init__(self, in_channels, out_channels, weight_init='normal', bias_init='zeros', has_bias=True,
                 activation=None, reduction_factor=1, low_rank_size=1, low_rank_w_init='xavier_uniform',
                 non_linearity='gelu', param_init_type=mstype.float32, compute_dtype=mstype.float16):
        owner = type(self).__name__
        out_channels = check_int('out_channels', out_channels, owner)
        reduction_factor, low_rank_size = check_low_rank_sizes(owner, 'out_channels', out_channels, reduction_factor,
                                                         low_rank_size)
        _check_factor_init(owner, low_rank_w_init)
        make_activation(owner, non_linearity)
        check_dtype('param_init_type', param_init_type, owner)
        super().__init__(in_channels, out_channels, weight_init, bias_init, has_bias, activation, compute_dtype)
        self.reduction_factor = reduction_factor
        self.low_rank_size = low_rank_size
        self.adapter = LowRankAdapterLayer(out_channels, reduction_factor, low_rank_size, low_rank_w_init,
                                           non_linearity, param_init_type, compute_dtype)

    def shard(self, strategy_matmul_org=None, strategy_bias_org=None, strategy_activation_org=None,
              strategy_matmul_down_sampler_weight=None, strategy_matmul_down_sampler_input=None,
              strategy_bias_down_sampler=None, strategy_non_linearity=None, strategy_matmul_up_sampler_weight=None,
              strategy_matmul_up_sampler_input=None, strategy_bias_up_sampler=None, strategy_residual_add=None):
        """Strategies for the base Dense (``strategy_*_org``) and its adapter (see
        :meth:`LowRankAdapterLayer.shard`)."""
        return self.shard_dense(strategy_matmul_org, strategy_bias_org, strategy_activation_org,
                                self.adapter.shard_entries(
                                    strategy_matmul_down_sampler_weight, strategy_matmul_down_sampler_input,
                                    strategy_bias_down_sampler, strategy_non_linearity,
                                    strategy_matmul_up_sampler_weight, strategy_matmul_up_sampler_input,
                                    strategy_bias_up_sampler, strategy_residual_add))
