"""Prompt tuning (Lester et al., 2021): learnable virtual-token embeddings prepended to the input embeddings.

    E' = [P; E]      P: (num_virtual_tokens, token_dim) = ``mindpet_delta_prompt_tuning_embedding``

The whole model stays frozen; only ``P`` trains. The attention mask (and, for language-model losses, the labels) must
grow by ``num_virtual_tokens`` positions at the front: :meth:`PromptTuningEmbedding.extend_attention_mask` and
:meth:`PromptTuningEmbedding.extend_labels` do that inside a compiled ``construct``. Prompt tuning changes the input
sequence, so there is nothing to merge into the weights.
"""
import numpy as np
from mindspore import nn, ops, Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import Normal

from mindpet.delta.base import init_param, check_init_shape
from mindpet.utils.validation import check_int, check_dtype


class PromptTuningEmbedding(nn.Cell):
    """Prepends ``num_virtual_tokens`` trainable embeddings to a batch of input embeddings.

    Args:
        num_virtual_tokens (int): number of virtual tokens ``n`` (> 0).
        token_dim (int): embedding size (the model's hidden size).
        prompt_init: initializer name/object or Tensor ``[n, token_dim]`` for the virtual tokens. Default
            ``Normal(0.02)``. :meth:`init_from_vocab` copies rows of the word-embedding table instead (the paper's
            best initialisation).
        param_init_type (mindspore.dtype): dtype of the virtual-token table. Default float32.

    Inputs:
        inputs_embeds (Tensor): ``(batch, seq, token_dim)``.

    Outputs:
        Tensor ``(batch, n + seq, token_dim)`` of the dtype of ``inputs_embeds``.

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindpet.delta.prompt_tuning import PromptTuningEmbedding
        >>> prompt = PromptTuningEmbedding(num_virtual_tokens=4, token_dim=8)
        >>> prompt(ms.Tensor(np.zeros((2, 5, 8), np.float32))).shape
        (2, 9, 8)
        >>> prompt.extend_attention_mask(ms.Tensor(np.ones((2, 5), np.int32))).shape
        (2, 9)
    """

    def __init__(self, num_virtual_tokens, token_dim, prompt_init=Normal(0.02), param_init_type=mstype.float32):
        super().__init__()
        owner = type(self).__name__
        self.num_virtual_tokens = check_int('num_virtual_tokens', num_virtual_tokens, owner)
        self.token_dim = check_int('token_dim', token_dim, owner)
        check_dtype('param_init_type', param_init_type, owner)
        check_init_shape(owner, 'prompt_init', prompt_init, (num_virtual_tokens, token_dim))
        self.mindpet_delta_prompt_tuning_embedding = init_param(
            prompt_init, (num_virtual_tokens, token_dim), param_init_type, 'mindpet_delta_prompt_tuning_embedding',
            owner, "'num_virtual_tokens' and 'token_dim'")
        self.concat = ops.Concat(axis=1)
        self.cast = ops.Cast()

    def construct(self, inputs_embeds):
        if len(inputs_embeds.shape) != 3:
            raise ValueError(f"For 'PromptTuningEmbedding', 'inputs_embeds' must be (batch, seq, token_dim), "
                             f"but got shape {inputs_embeds.shape}.")
        batch = inputs_embeds.shape[0]
        prompt = self.cast(self.mindpet_delta_prompt_tuning_embedding, inputs_embeds.dtype)
        prompt = ops.broadcast_to(ops.expand_dims(prompt, 0), (batch, self.num_virtual_tokens, self.token_dim))
        return self.concat((prompt, inputs_embeds))

    def extend_attention_mask(self, attention_mask):
        """``(batch, seq)`` mask -> ``(batch, n + seq)`` with ones (attend) for the virtual tokens, same dtype."""
        ones = ops.ones((attention_mask.shape[0], self.num_virtual_tokens), attention_mask.dtype)
        return self.concat((ones, attention_mask))

    def extend_labels(self, labels, ignore_index=-100):
        """``(batch, seq)`` labels -> ``(batch, n + seq)`` with ``ignore_index`` at the virtual tokens."""
        pad = ops.fill(labels.dtype, (labels.shape[0], self.num_virtual_tokens), ignore_index)
        return self.concat((pad, labels))

    def init_from_vocab(self, embedding_table, token_ids):
        """Copy word embeddings into the virtual tokens (host side; also seen by compiled graphs).

        Args:
            embedding_table (Parameter | Tensor | numpy.ndarray): ``(vocab, token_dim)``.
            token_ids (list[int] | numpy.ndarray): ids of the words to copy, e.g. the tokenised task description;
                cycled when shorter than ``num_virtual_tokens``, truncated when longer.
        """
        owner = type(self).__name__
        table = embedding_table.asnumpy() if hasattr(embedding_table, 'asnumpy') else np.asarray(embedding_table)
        if table.ndim != 2 or table.shape[1] != self.token_dim:
            raise ValueError(f"For '{owner}', the 'embedding_table' must have shape (vocab, {self.token_dim}), "
                             f"but got {table.shape}.")
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"For '{owner}', the 'token_ids' must be a non-empty 1-D list of ints, but got "
                            f"{token_ids!r}.")
        if ids.min() < 0 or ids.max() >= table.shape[0]:
            raise ValueError(f"For '{owner}', the 'token_ids' must lie in [0, {table.shape[0]}), but got ids from "
                             f"{ids.min()} to {ids.max()}.")
        rows = vocab_rows(table, ids, self.num_virtual_tokens)
        param = self.mindpet_delta_prompt_tuning_embedding
        param.set_data(Tensor(rows).astype(param.dtype))

    def extend_repr(self):
        return f'num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.token_dim}'


def vocab_rows(table, token_ids, num_virtual_tokens):
    """Rows ``token_ids`` of a ``(vocab, dim)`` table as float32, cycled or truncated to ``num_virtual_tokens``
    (the word-embedding initialisation of the virtual tokens; ids are checked by the caller)."""
    return np.asarray(table)[np.resize(np.asarray(token_ids), num_virtual_tokens)].astype(np.float32)


class EmbeddingWithPrompt(nn.Embedding):
    """An ``nn.Embedding`` that prepends trainable virtual tokens to its output: ids ``(batch, seq)`` ->
    ``(batch, n + seq, dim)``. What :func:`mindpet.get_pet_model` puts in place of the model's word embedding for
    prompt tuning.

    It is an ``nn.Embedding`` holding the original ``embedding_table`` Parameter (same name, so a base checkpoint
    loads unchanged) and a :class:`PromptTuningEmbedding` ``prompt`` (parameter
    ``<embedding>.prompt.mindpet_delta_prompt_tuning_embedding``). ``prompt_enabled`` (a Python flag, so changing it
    needs a new graph) turns the prefix off: the Cell is then its base embedding.

    Args:
        vocab_size, embedding_size, use_one_hot, dtype, padding_idx: as ``nn.Embedding``.
        num_virtual_tokens (int): number of virtual tokens ``n`` (> 0).
        prompt_init: initializer of the virtual tokens (see :class:`PromptTuningEmbedding`). Default Normal(0.02).

    Inputs:
        ids (Tensor): int ``(batch, seq)``.

    Outputs:
        Tensor ``(batch, n + seq, embedding_size)``.

    Example:
        >>> import numpy as np, mindspore as ms
        >>> from mindspore import nn
        >>> from mindpet.delta.prompt_tuning import EmbeddingWithPrompt
        >>> layer = EmbeddingWithPrompt.from_embedding(nn.Embedding(10, 8), num_virtual_tokens=3)
        >>> layer(ms.Tensor(np.zeros((2, 5), np.int32))).shape
        (2, 8, 8)
    """

    def __init__(self, vocab_size, embedding_size, num_virtual_tokens, use_one_hot=False, dtype=mstype.float32,
                 padding_idx=None, prompt_init=Normal(0.02)):
        owner = type(self).__name__
        vocab_size = check_int('vocab_size', vocab_size, owner)
        embedding_size = check_int('embedding_size', embedding_size, owner)
        # No memory check for the table: it is 'zeros', whose pages stay unallocated until written (and
        # from_embedding replaces it by the base embedding's own Parameter).
        super().__init__(vocab_size, embedding_size, use_one_hot=use_one_hot, embedding_table='zeros', dtype=dtype,
                         padding_idx=padding_idx)
        self.prompt = PromptTuningEmbedding(num_virtual_tokens, embedding_size, prompt_init)
        self.prompt_enabled = True

    @classmethod
    def from_embedding(cls, embedding, num_virtual_tokens, prompt_init=Normal(0.02)):
        """Wrap ``embedding`` (an ``nn.Embedding``): the result holds its ``embedding_table`` Parameter object."""
        layer = cls(embedding.vocab_size, embedding.embedding_size, num_virtual_tokens,
                    use_one_hot=embedding.use_one_hot, dtype=embedding.dtype, padding_idx=embedding.padding_idx,
                    prompt_init=prompt_init)
        layer.embedding_table = embedding.embedding_table
        return layer

    def construct(self, ids):
        out = super().construct(ids)
        if self.prompt_enabled:
            out = self.prompt(out)
        return out

    def to_embedding(self):
        """A plain ``nn.Embedding`` holding this Cell's ``embedding_table`` Parameter (the prompt dropped)."""
        plain = nn.Embedding(self.vocab_size, self.embedding_size, use_one_hot=self.use_one_hot,
                             embedding_table='zeros', dtype=self.dtype, padding_idx=self.padding_idx)
        plain.embedding_table = self.embedding_table
        return plain
