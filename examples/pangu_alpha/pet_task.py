"""The ``pangu_alpha`` task of ``mindpet finetune``: causal language modelling of the shipped text with the
PanGu-alpha-style decoder, and greedy answers to the task's questions before and after fine-tuning.

Prefix tuning goes through P-Tuning v2 (``pet.type: ptuning2``): the backbone's ``prefix_key_values`` input is fed
by a trainable prefix encoder; the layer/head sizes are filled in from the model. LoRA targets ``dense1``/``dense3``
(query/value). Sizes: ``tiny`` (character vocabulary, CPU) and ``2.6b`` (PanGu-alpha 2.6B, Ascend; needs
``model.base_checkpoint`` and pre-tokenised data in ``data.tokenized``).

A meaningful tiny demonstration first makes a base model on the general corpus, then prefix-tunes it on the
questions (see examples/pangu_alpha/README.md)::

    mindpet finetune --config configs/pangu_prefix_tiny.yaml --set 'pet={type: full}' --set data.corpus=corpus \\
        --set training.epochs=200 --set optimizer.type=adam --set schedule.start_learning_rate=0.003 \\
        --set training.output_dir=outputs/pangu_base
    mindpet finetune --config configs/pangu_prefix_tiny.yaml --set model.base_checkpoint=outputs/pangu_base/model.ckpt
"""
import numpy as np

from examples.common import array_dataset
from examples.pangu_alpha.data import ASSET_DIR, CORPORA, CharTokenizer, load_lines, lm_arrays, task_prompts
from examples.pangu_alpha.model import (PanguConfig, PanguAlphaForCausalLM, CausalLMWithLoss, TINY_CONFIG,
                                        FULL_2_6B_CONFIG, greedy_generate)
from mindpet.train.schema import Field
from mindpet.train.task import Task, KeyValueError, predict_batches, shard_rows

DEMO_QUESTIONS = 3


class PanguTask(Task):
    """Language modelling of ``data.corpus`` with the PanGu-alpha-style model (see the module docstring)."""
    name = 'pangu_alpha'
    sizes = {'tiny': TINY_CONFIG, '2.6b': FULL_2_6B_CONFIG}
    data_fields = {
        'corpus': Field('str', 'task', choices=CORPORA, doc="shipped text: 'task' (questions and answers) or "
                                                          "'corpus' (general sentences)"),
        'data_dir': Field('dir', ASSET_DIR, doc='directory with corpus.txt and task.txt'),
        'tokenized': Field('path', None, doc='pre-tokenised int32 ids (N, seq_length) as .npy, used instead of the '
                                             'character corpus (needed for the 2.6b vocabulary)'),
        'eval_batch_size': Field('int', 8, min_value=1, doc='rows per evaluation call'),
        'max_new_tokens': Field('int', 24, min_value=1, doc='tokens generated per answer in the evaluation'),
    }
    metric = 'loss'
    metric_higher_is_better = False

    def model_config(self):
        return PanguConfig.from_dict(super().model_config())

    def check(self):
        tokenizer = CharTokenizer()
        if self.data['tokenized'] is None and self.config.vocab_size < tokenizer.vocab_size:
            raise KeyValueError('data.tokenized', f"the '{self.model['size']}' model (vocabulary "
                                f"{self.config.vocab_size}) needs pre-tokenised ids; the shipped text uses a "
                                f"{tokenizer.vocab_size}-symbol character vocabulary")
        if self.data['tokenized'] is None and self.config.vocab_size != TINY_CONFIG['vocab_size']:
            raise KeyValueError('data.tokenized', f"the character corpus is for the tiny vocabulary "
                                f"({TINY_CONFIG['vocab_size']}); give pre-tokenised ids for a vocabulary of "
                                f"{self.config.vocab_size}")

    def base_checkpoint_required(self):
        return self.model['size'] != 'tiny'

    def pet_defaults(self, method):
        if method == 'ptuning2':
            return {'target_modules': ['backbone'], 'num_layers': self.config.num_layers,
                    'num_heads': self.config.num_heads, 'kv_channels': self.config.head_dim}
        return {}

    def check_pet(self, config):
        if config.method == 'ptuning2':
            for key, value in self.pet_defaults('ptuning2').items():
                if key != 'target_modules' and getattr(config, key) != value:
                    raise KeyValueError(f'pet.{key}', f"must match the model ({value}), but got "
                                        f"{getattr(config, key)}; leave it out to take the model's value")

    def build_network(self):
        return PanguAlphaForCausalLM(self.config)

    def _ids(self):
        if not hasattr(self, '_cache'):
            if self.data['tokenized'] is not None:
                ids = np.load(self.data['tokenized']).astype(np.int32)
                if ids.ndim != 2 or ids.shape[1] > self.config.seq_length:
                    raise KeyValueError('data.tokenized', f"must hold (N, <= {self.config.seq_length}) ids, but "
                                        f"'{self.data['tokenized']}' holds shape {ids.shape}")
            else:
                lines = load_lines(self.data['corpus'], self.data['data_dir'])
                ids = lm_arrays(lines, CharTokenizer(), self.config.seq_length)
            self._cache = ids
        return self._cache

    def num_train_rows(self):
        return len(self._ids())

    def train_dataset(self, batch_size, rank=0, group_size=1):
        ids, = shard_rows([self._ids()], rank, group_size)
        return array_dataset([ids], ['input_ids'], batch_size, shuffle=True, seed=self.seed, drop_remainder=True)

    def loss_cell(self, network, rdrop_alpha=0.0):
        # CausalLMWithLoss reads the model's config; a PetModel calls its base_model, which holds the adapters.
        return CausalLMWithLoss(getattr(network, 'base_model', network))

    def evaluate(self, network):
        """Next-token loss over the data (every row) and, on the character corpus, the share of task questions
        answered exactly by greedy decoding."""
        ids = self._ids()
        logits = predict_batches(network, [ids], self.data['eval_batch_size'])
        targets = ids[:, 1:]
        shifted = logits[:, :-1].astype(np.float64)
        shifted -= shifted.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        weights = (targets != self.config.pad_token_id)
        metrics = {'loss': float(-(picked * weights).sum() / max(weights.sum(), 1))}
        if self.data['tokenized'] is None:
            pairs = task_prompts(self.data['data_dir'])
            answers = self._answers(network, [q for q, _ in pairs])
            metrics['answers_exact'] = float(np.mean([got.strip() == want.strip()
                                                      for got, (_, want) in zip(answers, pairs)]))
        return metrics

    def _answers(self, network, questions):
        tokenizer = CharTokenizer()
        net = getattr(network, 'base_model', network)   # greedy_generate reads the network's config
        prompts = [[tokenizer.bos_id] + tokenizer.encode(q) for q in questions]
        out = greedy_generate(net, prompts, self.data['max_new_tokens'], eos_id=tokenizer.eos_id)
        return [tokenizer.decode(ids) for ids in out]

    def demo(self, network):
        if self.data['tokenized'] is not None:
            return None
        questions = [q for q, _ in task_prompts(self.data['data_dir'])[:DEMO_QUESTIONS]]
        return [f"{q}{a}" for q, a in zip(questions, self._answers(network, questions))]


TASK = PanguTask
