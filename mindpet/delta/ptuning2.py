"""P-Tuning v2 (Liu et al., 2022): a learnable prefix for every layer of a transformer, as in ChatGLM/MindFormers.

    E: (pre_seq_len, 2 * num_layers * num_heads * kv_channels)       (mindpet_delta_ptuning2_embedding)
    X = E                                   without projection
    X = tanh(E W_in^T + b_in) W_out^T + b_out  with prefix_projection (W_in: (projection_dim, |E|))

``X`` is broadcast to the batch, cast, reshaped to ``(batch, pre_seq_len, 2 * num_layers, num_heads,
kv_channels)``, dropped out, permuted by ``out_perm`` (default ``(2, 0, 3, 1, 4)`` -> ``(2 * num_layers, batch,
num_heads, pre_seq_len, kv_channels)``) and split into ``num_layers`` tensors ``(2, batch, num_heads,
pre_seq_len, kv_channels)``: index 0 is layer l's key prefix, index 1 its value prefix.

Delta parameters: ``mindpet_delta_ptuning2_{embedding, dense_in_weight, dense_in_bias, dense_out_weight,
dense_out_bias}`` (the dense ones only with ``prefix_projection``).
"""
import math

import numpy as np
from mindspore import nn, ops
from mindspore import dtype as mstype
from mindspore.common.initializer import HeUniform, Normal

from mindpet.delta.base import init_param
from mindpet.delta.sharding import apply_strategies
from mindpet.utils.validation import check_bool, check_int, check_rate

EMBEDDING_INIT_SIGMA = 0.01  # MindPet's 'normal' initializer


def _check_out_perm(owner, out_perm):
    if not isinstance(out_perm, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in out_perm):
        raise TypeError(f"For '{owner}', the 'out_perm' must be a tuple of 5 ints, but got {out_perm!r} "
                        f"({type(out_perm).__name__}).")
    if sorted(out_perm) != [0, 1, 2, 3, 4] or out_perm[0] != 2:
        raise ValueError(f"For '{owner}', the 'out_perm' must be a permutation of (0, 1, 2, 3, 4) starting with 2 "
                         f"(the layer axis is split per layer), but got {out_perm!r}.")
    return out_perm


class PrefixEncoder(nn.Cell):
    """P-Tuning v2 prefix encoder: per-layer key/value prefixes for a ``num_layers`` transformer.

    Args:
        pre_seq_len (int): prefix length.
        num_layers (int): transformer layers that get a prefix.
        num_heads (int): attention heads (key/value heads) per layer.
        kv_channels (int): size of one head.
        prefix_projection (bool): pass the embedding through a two-layer tanh MLP.
        projection_dim (int): the MLP's hidden size (checked only when ``prefix_projection``).
        dropout_prob (float): dropout on the prefix while training, in [0, 1).
        parallel_config: None or an object with ``data_parallel`` and ``model_parallel`` ints (MindFormers'
            ``TransformerOpParallelConfig``); when given, :meth:`shard` is applied with them.
        out_perm (tuple): permutation applied to ``(batch, pre_seq_len, 2 * num_layers, num_heads,
            kv_channels)``; must start with 2. Default ``(2, 0, 3, 1, 4)``.

    Inputs:
        batch_size (int): the batch to produce prefixes for.
        dtype (mindspore.dtype): output dtype. Default float16.

    Outputs:
        tuple of ``num_layers`` Tensors, each ``(2, batch_size, num_heads, pre_seq_len, kv_channels)`` with the
        default ``out_perm``.

    Example:
        >>> import mindspore as ms
        >>> from mindpet.delta.ptuning2 import PrefixEncoder
        >>> encoder = PrefixEncoder(4, num_layers=2, num_heads=2, kv_channels=3, prefix_projection=True,
        ...                         projection_dim=8, dropout_prob=0.0)
        >>> [t.shape for t in encoder(5, ms.float32)]
        [(2, 5, 2, 4, 3), (2, 5, 2, 4, 3)]
    """

    def __init__(self, pre_seq_len, num_layers, num_heads, kv_channels, prefix_projection, projection_dim,
                 dropout_prob, parallel_config=None, out_perm=(2, 0, 3, 1, 4)):
        owner = type(self).__name__
        pre_seq_len = check_int('pre_seq_len', pre_seq_len, owner)
        num_layers = check_int('num_layers', num_layers, owner)
        num_heads = check_int('num_heads', num_heads, owner)
        kv_channels = check_int('kv_channels', kv_channels, owner)
        check_bool('prefix_projection', prefix_projection, owner)
        if prefix_projection:
            projection_dim = check_int('projection_dim', projection_dim, owner)
        check_rate('dropout_prob', dropout_prob, owner)
        _check_out_perm(owner, out_perm)
        parallel = _parallel_sizes(owner, parallel_config)
        super().__init__()
        self.pre_seq_len = pre_seq_len
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.kv_channels = kv_channels
        self.prefix_projection = prefix_projection
        self.projection_dim = projection_dim if prefix_projection else None
        self.dropout_prob = dropout_prob
        self.out_perm = out_perm
        self.embed_dim = 2 * num_layers * num_heads * kv_channels
        name = 'mindpet_delta_ptuning2_'
        by_embed = "'num_layers', 'num_heads' and 'kv_channels'"
        self.mindpet_delta_ptuning2_embedding = init_param(Normal(EMBEDDING_INIT_SIGMA),
                                                           (pre_seq_len, self.embed_dim), mstype.float32,
                                                           name + 'embedding', owner, f"'pre_seq_len', {by_embed}")
        if prefix_projection:
            fan_in = HeUniform(negative_slope=math.sqrt(5))
            self.mindpet_delta_ptuning2_dense_in_weight = init_param(fan_in, (projection_dim, self.embed_dim),
                                                                     mstype.float32, name + 'dense_in_weight', owner,
                                                                     f"'projection_dim', {by_embed}")
            self.mindpet_delta_ptuning2_dense_in_bias = init_param('zeros', (projection_dim,), mstype.float32,
                                                                   name + 'dense_in_bias')
            self.mindpet_delta_ptuning2_dense_out_weight = init_param(fan_in, (self.embed_dim, projection_dim),
                                                                      mstype.float32, name + 'dense_out_weight',
                                                                      owner, f"'projection_dim', {by_embed}")
            self.mindpet_delta_ptuning2_dense_out_bias = init_param('zeros', (self.embed_dim,), mstype.float32,
                                                                    name + 'dense_out_bias')
        self.expand_dims = ops.ExpandDims()
        self.tile = ops.Tile()
        self.reshape = ops.Reshape()
        self.matmul_in = ops.MatMul(transpose_b=True)
        self.bias_add_in = ops.BiasAdd()
        self.tanh = ops.Tanh()
        self.matmul_out = ops.MatMul(transpose_b=True)
        self.bias_add_out = ops.BiasAdd()
        self.cast = ops.Cast()
        self.dropout = nn.Dropout(p=dropout_prob)
        self.transpose = ops.Transpose()
        self.split_layers = ops.Split(axis=0, output_num=num_layers)
        if parallel is not None:
            self.shard(*parallel)

    def construct(self, batch_size, dtype=mstype.float16):
        # (P, E) -> (batch * P, E): the MLP runs on batch rows so 'data_parallel' can shard it.
        prefix = self.tile(self.expand_dims(self.mindpet_delta_ptuning2_embedding, 0), (batch_size, 1, 1))
        prefix = self.reshape(prefix, (batch_size * self.pre_seq_len, self.embed_dim))
        if self.prefix_projection:
            prefix = self.matmul_in(prefix, self.mindpet_delta_ptuning2_dense_in_weight)
            prefix = self.tanh(self.bias_add_in(prefix, self.mindpet_delta_ptuning2_dense_in_bias))
            prefix = self.matmul_out(prefix, self.mindpet_delta_ptuning2_dense_out_weight)
            prefix = self.bias_add_out(prefix, self.mindpet_delta_ptuning2_dense_out_bias)
        prefix = self.cast(prefix, dtype)
        prefix = self.reshape(prefix, (batch_size, self.pre_seq_len, 2 * self.num_layers, self.num_heads,
                                       self.kv_channels))
        prefix = self.dropout(prefix)
        prefix = self.transpose(prefix, self.out_perm)
        return self.split_layers(prefix)

    def prefix_numpy(self):
        """The prefix without dropout as float32 ``(num_layers, 2, num_heads, pre_seq_len, kv_channels)``
        (layer, key/value, ...) -- the data a trained encoder can be exported to."""
        x = self.mindpet_delta_ptuning2_embedding.asnumpy().astype(np.float32)
        if self.prefix_projection:
            h = np.tanh(x @ self.mindpet_delta_ptuning2_dense_in_weight.asnumpy().T
                        + self.mindpet_delta_ptuning2_dense_in_bias.asnumpy())
            x = h @ self.mindpet_delta_ptuning2_dense_out_weight.asnumpy().T + \
                self.mindpet_delta_ptuning2_dense_out_bias.asnumpy()
        x = x.reshape(self.pre_seq_len, self.num_layers, 2, self.num_heads, self.kv_channels)
        return x.transpose(1, 2, 3, 0, 4)

    def shard(self, data_parallel, model_parallel):
        """Strategies over the batch (``data_parallel``) and, for the projection MLP, column/row parallel over
        ``model_parallel`` (which must divide ``projection_dim``)."""
        owner = type(self).__name__
        dp = check_int('data_parallel', data_parallel, owner)
        mp = check_int('model_parallel', model_parallel, owner)
        entries = [
            (self.tile, 'strategy_tile', ((1, 1, 1),), (3,)),
            (self.cast, 'strategy_cast', ((dp, 1),), (2,)),
            (self.dropout.dropout, 'strategy_dropout', ((dp, 1, 1, 1, 1),), (5,)),
            (self.transpose, 'strategy_transpose', ((dp, 1, 1, 1, 1),), (5,)),
            (self.split_layers, 'strategy_split_layers', ((1, dp, 1, 1, 1),), (5,)),
        ]
        if self.prefix_projection:
            if self.projection_dim % mp:
                raise ValueError(f"For '{owner}', the 'model_parallel' ({mp}) must divide 'projection_dim' "
                                 f"({self.projection_dim}).")
            entries += [
                (self.matmul_in, 'strategy_matmul_in', ((dp, 1), (mp, 1)), (2, 2)),
                (self.bias_add_in, 'strategy_bias_add_in', ((dp, mp), (mp,)), (2, 1)),
                (self.tanh, 'strategy_tanh', ((dp, mp),), (2,)),
                (self.matmul_out, 'strategy_matmul_out', ((dp, mp), (1, mp)), (2, 2)),
                (self.bias_add_out, 'strategy_bias_add_out', ((dp, 1), (1,)), (2, 1)),
            ]
        apply_strategies(owner, entries)
        return self

    def extend_repr(self):
        return (f'pre_seq_len={self.pre_seq_len}, num_layers={self.num_layers}, num_heads={self.num_heads}, '
                f'kv_channels={self.kv_channels}, prefix_projection={self.prefix_projection}, '
                f'projection_dim={self.projection_dim}, dropout_prob={self.dropout_prob}')


def _parallel_sizes(owner, parallel_config):
    if parallel_config is None:
        return None
    sizes = []
    for attr in ('data_parallel', 'model_parallel'):
        if not hasattr(parallel_config, attr):
            raise TypeError(f"For '{owner}', the 'parallel_config' must be None or have an int '{attr}' "
                            f"attribute, but got {type(parallel_config).__name__} without it.")
        sizes.append(check_int(f'parallel_config.{attr}', getattr(parallel_config, attr), owner))
    return tuple(sizes)


def prefix_argument_index(cell):
    """Position of the ``prefix_key_values`` argument of ``cell.construct`` (excluding ``self``), or None."""
    import inspect  # pylint: disable=import-outside-toplevel
    try:
        names = list(inspect.signature(cell.construct).parameters)
    except (TypeError, ValueError):
        return None
    return names.index('prefix_key_values') if 'prefix_key_values' in names else None


class PrefixKeyValueModel(nn.Cell):
    """A model that takes per-layer prefix keys/values (a ``construct`` argument named ``prefix_key_values``, the
    MindFormers P-Tuning v2 convention), fed by its own :class:`PrefixEncoder`.

    ``construct(*inputs)`` calls ``model(*inputs)`` with the ``prefix_key_values`` position replaced by
    ``encoder(batch, dtype)``, ``batch`` being the first input's leading dimension. Built by the ``ptuning2``
    tuner of :func:`mindpet.get_pet_model`; the wrapped model's parameters keep their names (``auto_prefix=False``).

    Args:
        model (nn.Cell): the wrapped model; its ``construct`` has a ``prefix_key_values`` argument and every
            argument before it is given positionally.
        encoder (PrefixEncoder): the prefix source.
        dtype (mindspore.dtype): dtype of the prefixes. Default float32.

    Example:
        >>> wrapped = PrefixKeyValueModel(backbone, PrefixEncoder(8, 3, 4, 16, True, 64, 0.0))  # doctest: +SKIP
        >>> hidden = wrapped(input_ids)  # doctest: +SKIP
    """

    def __init__(self, model, encoder, dtype=mstype.float32):
        super().__init__(auto_prefix=False)
        index = prefix_argument_index(model)
        if index is None:
            raise TypeError(f"For 'PrefixKeyValueModel', the 'model' must take a 'prefix_key_values' argument in "
                            f"its construct, but {type(model).__name__}.construct does not.")
        if not isinstance(encoder, PrefixEncoder):
            raise TypeError(f"For 'PrefixKeyValueModel', the 'encoder' must be a PrefixEncoder, but got "
                            f"{type(encoder).__name__}.")
        self.model = model
        self.prefix_encoder = encoder
        self.index = index
        self.dtype = dtype
        # A Python flag: switching the prefix off changes the graph (no prefix positions); whoever flips it makes
        # the next call recompile (the tuner reports it).
        self.prefix_enabled = True

    def __getattr__(self, name):
        # Code around the wrapped model keeps reading its attributes through the wrapper (e.g. a language model's
        # tied output head reads 'backbone.word_embedding'); the graph compiler resolves them the same way.
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get('_cells', {}).get('model')
            if model is None:
                raise
            return getattr(model, name)

    def construct(self, *inputs):
        if not self.prefix_enabled:
            return self.model(*inputs)
        prefixes = self.prefix_encoder(inputs[0].shape[0], self.dtype)
        return self.model(*(inputs[:self.index] + (prefixes,) + inputs[self.index + 1:]))
