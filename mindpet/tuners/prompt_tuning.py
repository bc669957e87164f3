"""Prompt tuning (Lester et al., 2021) for :func:`mindpet.get_pet_model`: the config, and the tuner that wraps the
model's word embedding (an ``nn.Embedding`` matched by ``target_modules``) in an :class:`EmbeddingWithPrompt`.

The wrapped embedding returns ``num_virtual_tokens`` more positions than it gets ids, so the model's own code must
accept a longer sequence than its ``input_ids``: positions, masks and labels follow the embedding output's length.
Concretely, for an input of ``seq`` ids:

* the logits (or hidden states) come out ``(batch, n + seq, ...)``; the first ``n`` belong to the virtual tokens;
* a padding mask passed to the model must be ``(batch, n + seq)``: ``layer.prompt.extend_attention_mask(mask)``
  prepends ones (also inside a compiled ``construct``), with ``layer = pet.pet_layers['<embedding name>']``;
* language-model labels must be ``(batch, n + seq)``: ``layer.prompt.extend_labels(labels)`` prepends the ignore
  index -100 (the default ``ignore_index`` of ``ops.cross_entropy``);
* a model adding position embeddings must take them for ``x.shape[1]`` positions after the embedding, not for
  ``input_ids.shape[1]``.

Switching between adapters of the same ``num_virtual_tokens`` copies the virtual-token table (same graph).
Disabling the adapters, deleting the active one, or switching to another length changes the sequence length, so the
next call compiles a new graph (by itself). Nothing can be merged: prompt tuning lengthens the input.
"""
import dataclasses
from typing import List, Optional

import numpy as np
from mindspore import nn
from mindspore import dtype as mstype
from mindspore.common.initializer import initializer, Normal

from mindpet.delta.prompt_tuning import EmbeddingWithPrompt, vocab_rows
from mindpet.tuners.base import BaseTuner, fingerprint_param, switch_flag, write_exact
from mindpet.tuners.config import PetConfig
from mindpet.tuners.registry import register_method
from mindpet.utils.validation import FieldValueError, check_int, check_choice

PROMPT_NAME = 'prompt.mindpet_delta_prompt_tuning_embedding'
PROMPT_INITS = ('normal', 'vocab')
PROMPT_SIGMA = 0.02


@dataclasses.dataclass
class PromptTuningConfig(PetConfig):
    """Prompt-tuning hyper-parameters for :func:`mindpet.get_pet_model`.

    Args:
        target_modules (list[str] | str): the word embedding (an ``nn.Embedding`` cell, e.g. ``['embed']``), by
            regex full-match or name suffix.
        num_virtual_tokens (int): virtual tokens prepended to every sequence, > 0. Default 20.
        prompt_init (str): 'normal' (N(0, 0.02), default) or 'vocab': copies of the word embeddings of
            ``prompt_init_token_ids`` (the paper's best initialisation, e.g. the tokenised task description).
        prompt_init_token_ids (list[int] | None): token ids for 'vocab' (cycled or truncated to
            ``num_virtual_tokens``); required with 'vocab', refused otherwise.
        exclude_modules, modules_to_save: see :class:`PetConfig`.

    Example:
        >>> cfg = PromptTuningConfig(target_modules=['embed'], num_virtual_tokens=8, prompt_init='vocab',
        ...                          prompt_init_token_ids=[5, 17, 42])
        >>> cfg.to_dict()['type']
        'prompt_tuning'
    """
    num_virtual_tokens: int = 20
    prompt_init: str = 'normal'
    prompt_init_token_ids: Optional[List[int]] = None
    targets_required = 'name the word embedding (a list of str)'

    def validate(self):
        super().validate()
        owner = type(self).__name__
        check_int('num_virtual_tokens', self.num_virtual_tokens, owner)
        check_choice('prompt_init', self.prompt_init, owner, PROMPT_INITS)
        ids = self.prompt_init_token_ids
        if self.prompt_init == 'vocab':
            if isinstance(ids, tuple):
                ids = self.prompt_init_token_ids = list(ids)
            if (not isinstance(ids, list) or not ids
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
                raise FieldValueError(f"For '{owner}', the 'prompt_init_token_ids' must be a non-empty list of "
                                      f"non-negative ints with prompt_init='vocab', but got {ids!r}.",
                                      field='prompt_init_token_ids')
        elif ids is not None:
            raise FieldValueError(f"For '{owner}', the 'prompt_init_token_ids' are only used with "
                                  f"prompt_init='vocab', but got {ids!r} with prompt_init={self.prompt_init!r}.",
                                  field='prompt_init_token_ids')


class PromptTuningTuner(BaseTuner):
    """Wraps ``nn.Embedding`` cells in :class:`mindpet.delta.prompt_tuning.EmbeddingWithPrompt`; switching and
    storing for it (no merging)."""
    layer_class = EmbeddingWithPrompt
    key_attr = 'embedding_table'
    merge_refusal = ('it prepends virtual tokens to the input sequence, which no weight can reproduce. Keep the '
                     'adapter for inference (unload() gives back the base network).')

    def is_target(self, cell):
        return type(cell) is nn.Embedding  # pylint: disable=unidiomatic-typecheck

    def create_layer(self, cell, config, key=None):
        layer = EmbeddingWithPrompt.from_embedding(cell, config.num_virtual_tokens, prompt_init='zeros')
        write_exact(layer, self.init_adapter(layer, config))
        return layer

    def expected_shapes(self, key, fingerprint, config, source):
        _, dim = fingerprint_param(fingerprint, key, 'embedding_table', source)
        return {PROMPT_NAME: (config.num_virtual_tokens, dim)}

    def read_live(self, layer, config):
        return {PROMPT_NAME: layer.prompt.mindpet_delta_prompt_tuning_embedding.asnumpy().copy()}

    def write_live(self, layer, config, tensors):
        changed = write_exact(layer, tensors)
        layer.prompt.num_virtual_tokens = config.num_virtual_tokens
        return changed

    def init_adapter(self, layer, config):
        """Fresh virtual tokens, drawn from N(0, 0.02) or copied from the word embeddings.

        Raises:
            ValueError: a token id outside the vocabulary.
        """
        shape = (config.num_virtual_tokens, layer.embedding_size)
        if config.prompt_init == 'normal':
            return {PROMPT_NAME: initializer(Normal(PROMPT_SIGMA), list(shape), mstype.float32).init_data().asnumpy()}
        ids = config.prompt_init_token_ids
        if max(ids) >= layer.vocab_size:
            raise FieldValueError(f"For 'PromptTuningConfig', the 'prompt_init_token_ids' must lie in [0, "
                                  f"{layer.vocab_size}) (the vocabulary), but got {max(ids)}.",
                                  field='prompt_init_token_ids')
        return {PROMPT_NAME: vocab_rows(layer.embedding_table.asnumpy(), ids, config.num_virtual_tokens)}

    def activate(self, layer, config):
        return switch_flag(layer, 'prompt_enabled', True)

    def deactivate(self, layer):
        return switch_flag(layer, 'prompt_enabled', False)

    def unload_layer(self, layer):
        return layer.to_embedding()


register_method('prompt_tuning', PromptTuningConfig, PromptTuningTuner)
