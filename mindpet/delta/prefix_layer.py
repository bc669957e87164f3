"""Prefix-Tuning (Li & Liang, 2021): learnable keys and values prepended to one attention block's keys and values.

While training, the prefix is produced by a small MLP from a prefix embedding (the paper's reparametrisation)::

    [P_k | P_v] = dropout( tanh(E W_in^T + b_in) W_out^T + b_out )      E: (P, embed_dim), output (P, 2 * hidden)

``P_k`` and ``P_v`` are different columns of the MLP output, so keys and values are distinct tensors, and they are
computed in ``construct`` on every call, so gradients reach ``E`` and the MLP (MindPet 1.0.4 computed a constant
prefix once in ``__init__``, with keys equal to values, and never trained). After training,
:meth:`PrefixLayer.to_static` drops the MLP and keeps only the resulting ``P_k``/``P_v`` (a :class:`StaticPrefix`);
:func:`export_prefixes` does that for every PrefixLayer of a network.

Wiring into an attention block (keys/values ``(batch, heads, seq, head_dim)``)::

    K' = [P_k ; K],  V' = [P_v ; V],  mask' = [1 ... 1 | mask]     (prefix positions are visible to every query)

:func:`concat_prefix` does exactly this (including Pangu's transposed key layout), and :class:`PrefixAttention` is a
complete Pangu-style causal self-attention Cell that does it internally.

Delta parameters: ``mindpet_delta_prefixtuning_{embedding, mlp_in_weight, mlp_in_bias, mlp_out_weight,
mlp_out_bias}``; after export ``mindpet_delta_prefixtuning_{key, value}``.
"""
import math

import numpy as np
from mindspore import nn, ops, Parameter, Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import HeUniform, Normal

from mindpet.delta.base import init_param
from mindpet.delta.sharding import apply_strategies
from mindpet.utils.validation import check_cell, check_dtype, check_int, check_rate, check_allocation

_MASK_ADDER = -10000.0  # Pangu's additive mask value for disallowed positions


def _check_heads(owner, hidden_name, hidden, num_heads):
    if hidden % num_heads:
        raise ValueError(f"For '{owner}', the '{hidden_name}' ({hidden}) must be divisible by 'num_heads' "
                         f"({num_heads}), but got {hidden} % {num_heads} = {hidden % num_heads}.")
    return hidden // num_heads


class _PrefixBase(nn.Cell):
    """Shared output stage: (2, heads, P, head_dim) -> key and value, each broadcast to the batch."""

    def __init__(self, prefix_token_num, batch_size, num_heads, hidden_dim):
        super().__init__()
        self.prefix_token_num = prefix_token_num
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.head_dim = hidden_dim // num_heads
        self.split_kv = ops.Split(axis=0, output_num=2)

    def _batched(self, kv, batch_size):
        if batch_size is None:
            batch_size = self.batch_size
        key, value = self.split_kv(kv)
        shape = (batch_size, self.num_heads, self.prefix_token_num, self.head_dim)
        return ops.broadcast_to(key, shape), ops.broadcast_to(value, shape)


class PrefixLayer(_PrefixBase):
    """Learnable prefix keys and values for one attention block, reparametrised through an MLP.

    Args:
        prefix_token_num (int): number of prefix positions P.
        batch_size (int): default batch size the prefix is broadcast to (``construct`` may override it).
        num_heads (int): attention heads of the block.
        hidden_dim (int): the block's hidden size (heads * head_dim); must be divisible by ``num_heads``.
        embed_dim (int): size of the prefix embedding fed to the MLP.
        mid_dim (int): hidden size of the reparametrisation MLP. Default 512.
        dropout_rate (float): dropout on the produced prefix while training, in [0, 1). Default 0.1.

    Inputs:
        batch_size (int, optional): batch to broadcast to; default the constructor's ``batch_size``.

    Outputs:
        (key, value): two float32 Tensors of shape ``(batch_size, num_heads, prefix_token_num, head_dim)``.

    Example:
        >>> from mindpet.delta.prefix_layer import PrefixLayer
        >>> prefix = PrefixLayer(4, batch_size=2, num_heads=2, hidden_dim=8, embed_dim=6, mid_dim=10)
        >>> key, value = prefix()
        >>> key.shape
        (2, 2, 4, 4)
    """

    def __init__(self, prefix_token_num, batch_size, num_heads, hidden_dim, embed_dim, mid_dim=512,
                 dropout_rate=0.1):
        owner = type(self).__name__
        prefix_token_num = check_int('prefix_token_num', prefix_token_num, owner)
        batch_size = check_int('batch_size', batch_size, owner)
        num_heads = check_int('num_heads', num_heads, owner)
        hidden_dim = check_int('hidden_dim', hidden_dim, owner)
        embed_dim = check_int('embed_dim', embed_dim, owner)
        mid_dim = check_int('mid_dim', mid_dim, owner)
        check_rate('dropout_rate', dropout_rate, owner)
        _check_heads(owner, 'hidden_dim', hidden_dim, num_heads)
        super().__init__(prefix_token_num, batch_size, num_heads, hidden_dim)
        self.embed_dim = embed_dim
        self.mid_dim = mid_dim
        self.dropout_rate = dropout_rate
        fan_in = HeUniform(negative_slope=math.sqrt(5))  # PyTorch Linear's default, as the reference code
        name = 'mindpet_delta_prefixtuning_'
        self.mindpet_delta_prefixtuning_embedding = init_param(Normal(1.0), (prefix_token_num, embed_dim),
                                                               mstype.float32, name + 'embedding', owner,
                                                               "'prefix_token_num' and 'embed_dim'")
        self.mindpet_delta_prefixtuning_mlp_in_weight = init_param(fan_in, (mid_dim, embed_dim), mstype.float32,
                                                                   name + 'mlp_in_weight', owner,
                                                                   "'mid_dim' and 'embed_dim'")
        self.mindpet_delta_prefixtuning_mlp_in_bias = init_param('zeros', (mid_dim,), mstype.float32,
                                                                 name + 'mlp_in_bias')
        self.mindpet_delta_prefixtuning_mlp_out_weight = init_param(fan_in, (2 * hidden_dim, mid_dim),
                                                                    mstype.float32, name + 'mlp_out_weight', owner,
                                                                    "'hidden_dim' and 'mid_dim'")
        self.mindpet_delta_prefixtuning_mlp_out_bias = init_param('zeros', (2 * hidden_dim,), mstype.float32,
                                                                  name + 'mlp_out_bias')
        self.matmul_in = ops.MatMul(transpose_b=True)
        self.bias_add_in = ops.BiasAdd()
        self.tanh = ops.Tanh()
        self.matmul_out = ops.MatMul(transpose_b=True)
        self.bias_add_out = ops.BiasAdd()
        self.dropout = nn.Dropout(p=dropout_rate)
        self.reshape = ops.Reshape()
        self.transpose = ops.Transpose()

    def construct(self, batch_size=None):
        h = self.matmul_in(self.mindpet_delta_prefixtuning_embedding, self.mindpet_delta_prefixtuning_mlp_in_weight)
        h = self.tanh(self.bias_add_in(h, self.mindpet_delta_prefixtuning_mlp_in_bias))
        kv = self.matmul_out(h, self.mindpet_delta_prefixtuning_mlp_out_weight)
        kv = self.bias_add_out(kv, self.mindpet_delta_prefixtuning_mlp_out_bias)
        kv = self.dropout(kv)
        # (P, 2 * hidden) -> (P, 2, heads, head_dim) -> (2, heads, P, head_dim): first half keys, second values.
        kv = self.reshape(kv, (self.prefix_token_num, 2, self.num_heads, self.head_dim))
        kv = self.transpose(kv, (1, 2, 0, 3))
        return self._batched(kv, batch_size)

    def prefix_numpy(self):
        """The current prefix without dropout: ``(key, value)``, float32 arrays ``(num_heads, P, head_dim)``."""
        emb = self.mindpet_delta_prefixtuning_embedding.asnumpy().astype(np.float32)
        w_in = self.mindpet_delta_prefixtuning_mlp_in_weight.asnumpy().astype(np.float32)
        b_in = self.mindpet_delta_prefixtuning_mlp_in_bias.asnumpy().astype(np.float32)
        w_out = self.mindpet_delta_prefixtuning_mlp_out_weight.asnumpy().astype(np.float32)
        b_out = self.mindpet_delta_prefixtuning_mlp_out_bias.asnumpy().astype(np.float32)
        kv = np.tanh(emb @ w_in.T + b_in) @ w_out.T + b_out
        kv = kv.reshape(self.prefix_token_num, 2, self.num_heads, self.head_dim).transpose(1, 2, 0, 3)
        return kv[0], kv[1]

    def to_static(self, batch_size=None):
        """Export: a :class:`StaticPrefix` holding the final prefix (the MLP and embedding are dropped).

        It has the same call signature and outputs (in eval mode), so it replaces this layer in the attention
        block. To swap every PrefixLayer of a network with correct parameter names use :func:`export_prefixes`.
        """
        key, value = self.prefix_numpy()
        return StaticPrefix(key, value, self.batch_size if batch_size is None else batch_size)

    def shard(self, model_parallel=1):
        """Semi-auto-parallel strategies: the MLP column/row-parallel over ``model_parallel`` devices.

        ``mid_dim`` must be divisible by ``model_parallel``.
        """
        owner = type(self).__name__
        mp = check_int('model_parallel', model_parallel, owner)
        if self.mid_dim % mp:
            raise ValueError(f"For '{owner}', the 'model_parallel' ({mp}) must divide 'mid_dim' ({self.mid_dim}).")
        apply_strategies(owner, [
            (self.matmul_in, 'strategy_matmul_in', ((1, 1), (mp, 1)), (2, 2)),
            (self.bias_add_in, 'strategy_bias_add_in', ((1, mp), (mp,)), (2, 1)),
            (self.tanh, 'strategy_tanh', ((1, mp),), (2,)),
            (self.matmul_out, 'strategy_matmul_out', ((1, mp), (1, mp)), (2, 2)),
            (self.bias_add_out, 'strategy_bias_add_out', ((1, 1), (1,)), (2, 1)),
        ])
        return self

    def extend_repr(self):
        return (f'prefix_token_num={self.prefix_token_num}, num_heads={self.num_heads}, '
                f'hidden_dim={self.hidden_dim}, embed_dim={self.embed_dim}, mid_dim={self.mid_dim}, '
                f'dropout_rate={self.dropout_rate}')


class StaticPrefix(_PrefixBase):
    """A trained prefix without its MLP: ``mindpet_delta_prefixtuning_key`` / ``_value`` ``(heads, P, head_dim)``.

    Args:
        key (numpy.ndarray | Tensor): prefix keys, shape ``(num_heads, prefix_token_num, head_dim)``.
        value (numpy.ndarray | Tensor): prefix values, the same shape.
        batch_size (int): default batch size the prefix is broadcast to.

    Inputs / Outputs: as :class:`PrefixLayer` (no dropout).

    Example:
        >>> import numpy as np
        >>> from mindpet.delta.prefix_layer import StaticPrefix
        >>> prefix = StaticPrefix(np.zeros((2, 4, 3), np.float32), np.ones((2, 4, 3), np.float32), batch_size=5)
        >>> prefix()[1].shape
        (5, 2, 4, 3)
    """

    def __init__(self, key, value, batch_size):
        owner = type(self).__name__
        batch_size = check_int('batch_size', batch_size, owner)
        for name, arr in (('key', key), ('value', value)):
            if not isinstance(arr, (np.ndarray, Tensor)):
                raise TypeError(f"For '{owner}', the '{name}' must be a numpy array or Tensor, but got "
                                f"{type(arr).__name__}.")
            if len(arr.shape) != 3:
                raise ValueError(f"For '{owner}', the '{name}' must have shape (num_heads, prefix_token_num, "
                                 f"head_dim), but got shape {tuple(arr.shape)}.")
        if tuple(key.shape) != tuple(value.shape):
            raise ValueError(f"For '{owner}', the 'key' and 'value' must have the same shape, but got "
                             f"{tuple(key.shape)} and {tuple(value.shape)}.")
        num_heads, prefix_token_num, head_dim = key.shape
        super().__init__(prefix_token_num, batch_size, num_heads, num_heads * head_dim)
        self.mindpet_delta_prefixtuning_key = Parameter(Tensor(np.asarray(_numpy(key), np.float32)),
                                                        name='mindpet_delta_prefixtuning_key')
        self.mindpet_delta_prefixtuning_value = Parameter(Tensor(np.asarray(_numpy(value), np.float32)),
                                                          name='mindpet_delta_prefixtuning_value')
        self.stack = ops.Stack(axis=0)

    def construct(self, batch_size=None):
        kv = self.stack((self.mindpet_delta_prefixtuning_key, self.mindpet_delta_prefixtuning_value))
        return self._batched(kv, batch_size)

    def prefix_numpy(self):
        """``(key, value)`` as float32 arrays ``(num_heads, P, head_dim)``."""
        return self.mindpet_delta_prefixtuning_key.asnumpy(), self.mindpet_delta_prefixtuning_value.asnumpy()

    def shard(self, model_parallel=1):
        """Nothing to shard (no computation besides a broadcast); accepted for a uniform API."""
        model_parallel = check_int('model_parallel', model_parallel, type(self).__name__)
        return self


def export_prefixes(net):
    """Export every :class:`PrefixLayer` inside ``net``: replace it, in place, by its :class:`StaticPrefix`.

    The new parameters get their full names (``<path to the layer>.mindpet_delta_prefixtuning_key`` / ``_value``);
    a sub-Cell swapped in by plain ``setattr`` would only be named relative to its parent, so every block's prefix
    would share one name and a checkpoint would keep only one of them. Call the network through a NEW top-level
    Cell afterwards: a graph compiled before the swap keeps running the old prefix MLP.

    Args:
        net (nn.Cell): a network holding PrefixLayer Cells.

    Returns:
        list of str: the paths of the replaced layers.

    Raises:
        ValueError: ``net`` holds no PrefixLayer.

    Example:
        >>> replaced = export_prefixes(model)   # doctest: +SKIP
        >>> save_trainable_params(model, 'prefix.ckpt')   # only the final keys/values  # doctest: +SKIP
    """
    check_cell('net', net, 'export_prefixes')
    replaced = []
    for path, cell in list(net.cells_and_names()):
        for attr, child in list(cell.name_cells().items()):
            if not isinstance(child, PrefixLayer):
                continue
            static = child.to_static()
            setattr(cell, attr, static)
            full = f'{path}.{attr}' if path else attr
            static.mindpet_delta_prefixtuning_key.name = f'{full}.mindpet_delta_prefixtuning_key'
            static.mindpet_delta_prefixtuning_value.name = f'{full}.mindpet_delta_prefixtuning_value'
            replaced.append(full)
    if not replaced:
        raise ValueError("For 'export_prefixes', the 'net' holds no PrefixLayer to export.")
    return replaced


def _numpy(arr):
    return arr.asnumpy() if isinstance(arr, Tensor) else arr


def concat_prefix(prefix_key, prefix_value, key, value, attention_mask=None, key_transposed=False, prefix_gate=None):
    """Prepend a prefix to an attention block's keys and values and widen its mask (graph-mode safe).

    Args:
        prefix_key, prefix_value (Tensor): ``(batch, heads, P, head_dim)``, e.g. ``PrefixLayer()(batch)``.
        key (Tensor): ``(batch, heads, seq, head_dim)``, or ``(batch, heads, head_dim, seq)`` with
            ``key_transposed=True`` (Pangu keeps keys transposed for ``query @ key``).
        value (Tensor): ``(batch, heads, seq, head_dim)``.
        attention_mask (Tensor, optional): ``(..., q_len, seq)`` with 1 = may attend (Pangu's convention). The
            result is ``(..., q_len, P + seq)`` with ones in front: every query sees the whole prefix.
        key_transposed (bool): the key layout, see above.
        prefix_gate (Tensor, optional): a scalar multiplying the mask's prefix columns (1: visible, 0: masked out,
            i.e. the prefix switched off by Parameter data). Default None: visible.

    Returns:
        (key, value, attention_mask) with the prefix in front (``attention_mask`` None if none was given). The
        prefix is cast to the dtype of ``key``/``value``.

    Example:
        >>> # inside an attention Cell's construct, after the heads are split:
        >>> pk, pv = self.prefix(batch_size)                                    # doctest: +SKIP
        >>> key, value, mask = concat_prefix(pk, pv, key, value, mask)          # doctest: +SKIP
    """
    prefix_key = ops.cast(prefix_key, key.dtype)
    prefix_value = ops.cast(prefix_value, value.dtype)
    if key_transposed:
        key = ops.concat((ops.transpose(prefix_key, (0, 1, 3, 2)), key), -1)
    else:
        key = ops.concat((prefix_key, key), 2)
    value = ops.concat((prefix_value, value), 2)
    if attention_mask is not None:
        ones = ops.ones(attention_mask.shape[:-1] + (prefix_key.shape[2],), attention_mask.dtype)
        if prefix_gate is not None:
            ones = ones * ops.cast(prefix_gate, attention_mask.dtype)
        attention_mask = ops.concat((ones, attention_mask), -1)
    return key, value, attention_mask


class PrefixAttention(nn.Cell):
    """Pangu-style multi-head causal self-attention with an optional prefix (Prefix-Tuning ready).

    ``dense1``/``dense2``/``dense3`` project queries/keys/values and ``projection`` the output (Pangu's names, so
    a Pangu attention checkpoint loads into it). With ``prefix`` given, the prefix keys/values are prepended via
    :func:`concat_prefix` and the mask widened with ones.

    Args:
        hidden_size (int): model width; divisible by ``num_heads``.
        num_heads (int): attention heads.
        prefix (PrefixLayer | StaticPrefix | None): the block's prefix; its ``num_heads``/``hidden_dim`` must
            match. Default None (a plain attention block, e.g. the base model).
        attention_dropout (float): dropout on the attention probabilities while training. Default 0.
        compute_dtype (mindspore.dtype): dtype of the projections and matmuls (softmax runs in float32).

    Inputs:
        x (Tensor): ``(batch, seq, hidden_size)``.
        attention_mask (Tensor): ``(batch, seq, seq)``, 1 where query i may attend key j (e.g. lower triangular).
        prefix_key, prefix_value (Tensor, optional): ``(batch, num_heads, P, head_dim)`` prefixes given from
            outside, e.g. one layer's slice of a P-Tuning v2 ``PrefixEncoder`` output (``kv[0]``, ``kv[1]``);
            they take the place of the ``prefix`` Cell's.

    Outputs:
        Tensor ``(batch, seq, hidden_size)`` in the dtype of ``x``.

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindpet.delta.prefix_layer import PrefixAttention, PrefixLayer
        >>> attn = PrefixAttention(8, 2, prefix=PrefixLayer(3, 2, 2, 8, embed_dim=4, mid_dim=6))
        >>> mask = ms.Tensor(np.tril(np.ones((2, 5, 5), np.float32)))
        >>> attn(ms.Tensor(np.ones((2, 5, 8), np.float32)), mask).shape
        (2, 5, 8)
    """

    def __init__(self, hidden_size, num_heads, prefix=None, attention_dropout=0.0, compute_dtype=mstype.float32):
        owner = type(self).__name__
        hidden_size = check_int('hidden_size', hidden_size, owner)
        num_heads = check_int('num_heads', num_heads, owner)
        self.head_dim = _check_heads(owner, 'hidden_size', hidden_size, num_heads)
        check_rate('attention_dropout', attention_dropout, owner)
        check_dtype('compute_dtype', compute_dtype, owner)
        if prefix is not None:
            if not isinstance(prefix, _PrefixBase):
                raise TypeError(f"For '{owner}', the 'prefix' must be None, a PrefixLayer or a StaticPrefix, but "
                                f"got {type(prefix).__name__}.")
            if (prefix.num_heads, prefix.hidden_dim) != (num_heads, hidden_size):
                raise ValueError(f"For '{owner}', the 'prefix' must have num_heads={num_heads} and "
                                 f"hidden_dim={hidden_size}, but got num_heads={prefix.num_heads} and "
                                 f"hidden_dim={prefix.hidden_dim}.")
        # The four (hidden, hidden) projections are allocated at once.
        check_allocation(owner, "'hidden_size'", (hidden_size, hidden_size), 4)
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.compute_dtype = compute_dtype
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.dense1 = nn.Dense(hidden_size, hidden_size).to_float(compute_dtype)
        self.dense2 = nn.Dense(hidden_size, hidden_size).to_float(compute_dtype)
        self.dense3 = nn.Dense(hidden_size, hidden_size).to_float(compute_dtype)
        self.projection = nn.Dense(hidden_size, hidden_size).to_float(compute_dtype)
        self.prefix = prefix
        self.reshape = ops.Reshape()
        self.transpose = ops.Transpose()
        self.merge_transpose = ops.Transpose()
        self.score_matmul = ops.BatchMatMul(transpose_b=True)
        self.context_matmul = ops.BatchMatMul()
        self.mul_scale = ops.Mul()
        self.sub_mask = ops.Sub()
        self.mul_mask = ops.Mul()
        self.add_mask = ops.Add()
        self.softmax = ops.Softmax(axis=-1)
        self.expand_dims = ops.ExpandDims()
        self.cast = ops.Cast()
        self.attention_dropout = nn.Dropout(p=attention_dropout)

    def _heads(self, x, batch, seq):
        return self.transpose(self.reshape(x, (batch, seq, self.num_heads, self.head_dim)), (0, 2, 1, 3))

    def prefix_gate(self):
        """The scalar gating the prefix's visibility (None: always visible; see :class:`GatedPrefixAttention`)."""
        return None

    def construct(self, x, attention_mask, prefix_key=None, prefix_value=None):
        ori_dtype = x.dtype
        batch, seq, _ = x.shape
        query = self._heads(self.dense1(x), batch, seq)
        key = self._heads(self.dense2(x), batch, seq)
        value = self._heads(self.dense3(x), batch, seq)
        mask = self.cast(attention_mask, mstype.float32)
        if prefix_key is None and self.prefix is not None:
            prefix_key, prefix_value = self.prefix(batch)
        if prefix_key is not None:
            key, value, mask = concat_prefix(prefix_key, prefix_value, key, value, mask,
                                             prefix_gate=self.prefix_gate())
        scores = self.score_matmul(query, key)
        scores = self.mul_scale(self.cast(scores, mstype.float32), self.scale)
        adder = self.mul_mask(self.sub_mask(1.0, self.expand_dims(mask, 1)), _MASK_ADDER)
        probs = self.softmax(self.add_mask(scores, adder))
        probs = self.attention_dropout(probs)
        context = self.context_matmul(self.cast(probs, value.dtype), value)
        context = self.reshape(self.merge_transpose(context, (0, 2, 1, 3)), (batch, seq, self.hidden_size))
        return self.cast(self.projection(context), ori_dtype)

    def shard(self, data_parallel=1, model_parallel=1):
        """Megatron-style strategies: q/k/v column-parallel and the output projection row-parallel over
        ``model_parallel`` (which must divide ``num_heads``), the batch over ``data_parallel``. The prefix, if
        any, is sharded with ``prefix.shard(model_parallel)`` when its sizes allow it."""
        owner = type(self).__name__
        dp = check_int('data_parallel', data_parallel, owner)
        mp = check_int('model_parallel', model_parallel, owner)
        if self.num_heads % mp:
            raise ValueError(f"For '{owner}', the 'model_parallel' ({mp}) must divide 'num_heads' "
                             f"({self.num_heads}).")
        entries = []
        for dense in (self.dense1, self.dense2, self.dense3):
            entries += [(dense.matmul, 'strategy_qkv_matmul', ((dp, 1), (mp, 1)), (2, 2)),
                        (dense.bias_add, 'strategy_qkv_bias_add', ((dp, mp), (mp,)), (2, 1))]
        heads4 = (dp, mp, 1, 1)
        entries += [
            (self.transpose, 'strategy_split_heads', ((dp, 1, mp, 1),), (4,)),
            (self.score_matmul, 'strategy_score_matmul', (heads4, heads4), (4, 4)),
            (self.mul_scale, 'strategy_scale', (heads4, ()), (4, 0)),
            (self.softmax, 'strategy_softmax', (heads4,), (4,)),
            (self.context_matmul, 'strategy_context_matmul', (heads4, heads4), (4, 4)),
            (self.merge_transpose, 'strategy_merge_heads', (heads4,), (4,)),
            (self.projection.matmul, 'strategy_projection_matmul', ((dp, mp), (1, mp)), (2, 2)),
            (self.projection.bias_add, 'strategy_projection_bias_add', ((dp, 1), (1,)), (2, 1)),
        ]
        apply_strategies(owner, entries)
        if isinstance(self.prefix, PrefixLayer) and self.prefix.mid_dim % mp == 0:
            self.prefix.shard(mp)
        return self

    def extend_repr(self):
        return (f'hidden_size={self.hidden_size}, num_heads={self.num_heads}, '
                f'prefix={type(self.prefix).__name__ if self.prefix is not None else None}')


class GatedPrefixAttention(PrefixAttention):
    """A :class:`PrefixAttention` whose prefix can be switched off by Parameter data (so in an already-compiled
    graph): ``mindpet_state_prefix_gate`` multiplies the mask's prefix columns (1: visible; 0: masked out, and the
    block computes its plain attention up to float32 rounding). What :func:`mindpet.get_pet_model` puts in place of a
    prefix-less ``PrefixAttention`` for prefix tuning.

    Args:
        hidden_size, num_heads, attention_dropout, compute_dtype: as :class:`PrefixAttention`.
        prefix (PrefixLayer | StaticPrefix): the block's prefix (required).

    Inputs / Outputs: as :class:`PrefixAttention`.

    Example:
        >>> from mindpet.delta.prefix_layer import GatedPrefixAttention, PrefixAttention, PrefixLayer
        >>> attn = GatedPrefixAttention.from_attention(PrefixAttention(8, 2), PrefixLayer(3, 1, 2, 8, embed_dim=4))
        >>> float(attn.mindpet_state_prefix_gate.asnumpy())
        1.0
    """

    def __init__(self, hidden_size, num_heads, prefix, attention_dropout=0.0, compute_dtype=mstype.float32):
        if prefix is None:
            raise ValueError(f"For '{type(self).__name__}', the 'prefix' must be a PrefixLayer or StaticPrefix, but "
                             f"got None.")
        super().__init__(hidden_size, num_heads, prefix, attention_dropout, compute_dtype)
        self.mindpet_state_prefix_gate = Parameter(Tensor(1.0, mstype.float32), name='mindpet_state_prefix_gate',
                                                   requires_grad=False)

    def prefix_gate(self):
        return self.mindpet_state_prefix_gate

    @classmethod
    def from_attention(cls, attention, prefix):
        """The prefix-less ``attention``'s projections and dropout (the same Cells and Parameters) with ``prefix``."""
        layer = cls(attention.hidden_size, attention.num_heads, prefix, compute_dtype=attention.compute_dtype)
        for name in _ATTENTION_CELLS:
            setattr(layer, name, getattr(attention, name))
        return layer

    def to_attention(self):
        """A prefix-less :class:`PrefixAttention` holding this block's projections (the prefix dropped)."""
        plain = PrefixAttention(self.hidden_size, self.num_heads, compute_dtype=self.compute_dtype)
        for name in _ATTENTION_CELLS:
            setattr(plain, name, getattr(self, name))
        return plain


_ATTENTION_CELLS = ('dense1', 'dense2', 'dense3', 'projection', 'attention_dropout')
