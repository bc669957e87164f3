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

from mindpet.delta.lora import init_param, _check_init_shape
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
        _check_init_shape(owner, 'prompt_init', prompt_init, (num_virtual_tokens, token_dim))
        self.mindpet_delta_prompt_tuning_embedding = init_param(
            prompt_init, (num_virtual_tokens, token_dim), param_init_type, 'mindpet_delta_prompt_tuning_embedding')
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
        rows = table[np.resize(ids, self.num_virtual_tokens)].astype(np.float32)
        param = self.mindpet_delta_prompt_tuning_embedding
        param.set_data(Tensor(rows).astype(param.dtype))

    def extend_repr(self):
        return f'num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.token_dim}'
