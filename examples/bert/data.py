"""Tokenisation and the data pipeline of the BERT example.

:class:`BertWordPiece` tokenises offline with ``mindspore.dataset.text.BertTokenizer`` (basic tokenisation,
lower-casing with accent stripping, greedy longest-match WordPiece) and a BERT ``vocab.txt``; ids are the vocab line
numbers, as in Hugging Face. :func:`topic_dataset` reads the shipped topic-classification split
(``assets/{train,test}.jsonl``, written by ``make_dataset.py``) into a batched ``GeneratorDataset`` of
``input_ids, attention_mask, labels``.
"""
import os

import numpy as np

from examples.common import read_jsonl, array_dataset
from examples.bert.make_dataset import ASSET_DIR, LABELS
from mindpet.utils.validation import check_int, check_choice

SPLITS = ('train', 'test')


class BertWordPiece:
    """BERT tokenizer over a ``vocab.txt`` (offline).

    Args:
        vocab_path (str): the vocab file, one token per line (id = line number).
        max_length (int): sequences are truncated to, and padded up to, this many tokens incl. [CLS]/[SEP].
        lower_case (bool): lower-case and strip accents (uncased models such as all-MiniLM-L6-v2). Default True.

    Example:
        >>> tok = BertWordPiece(os.path.join(minilm_model_dir(), 'vocab.txt'), max_length=16)  # doctest: +SKIP
        >>> tok.encode(['A man is eating food.'])['input_ids'][0, :8]  # doctest: +SKIP
        array([ 101, 1037, 2158, 2003, 5983, 2833, 1012,  102], dtype=int32)
    """

    def __init__(self, vocab_path, max_length=128, lower_case=True):
        import mindspore.dataset.text as text  # pylint: disable=import-outside-toplevel
        owner = type(self).__name__
        self.max_length = check_int('max_length', max_length, owner, min_value=2)
        if not os.path.isfile(vocab_path):
            raise FileNotFoundError(f"For '{owner}', the vocab file '{vocab_path}' does not exist.")
        with open(vocab_path, 'r', encoding='utf-8') as handle:
            self.vocab = [line.rstrip('\n') for line in handle]
        self.token_to_id = {token: index for index, token in enumerate(self.vocab)}
        for special in ('[PAD]', '[UNK]', '[CLS]', '[SEP]'):
            if special not in self.token_to_id:
                raise ValueError(f"For '{owner}', the vocab file '{vocab_path}' has no '{special}' token.")
        self.pad_id = self.token_to_id['[PAD]']
        self.unk_id = self.token_to_id['[UNK]']
        self.cls_id = self.token_to_id['[CLS]']
        self.sep_id = self.token_to_id['[SEP]']
        self._tokenizer = text.BertTokenizer(text.Vocab.from_list(self.vocab), lower_case=lower_case,
                                             unknown_token='[UNK]')

    def tokenize(self, sentence):
        """WordPiece tokens of one sentence (without [CLS]/[SEP])."""
        if not isinstance(sentence, str):
            raise TypeError(f"For '{type(self).__name__}', a sentence must be a str, but got "
                            f"{sentence!r} ({type(sentence).__name__}).")
        if not sentence.strip():
            return []
        return [str(token) for token in self._tokenizer(sentence)]

    def encode(self, sentences):
        """Encode sentences to padded arrays.

        Returns:
            dict with int32 arrays ``input_ids``, ``attention_mask``, ``token_type_ids`` of shape
            ``(len(sentences), max_length)``.
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        ids = np.full((len(sentences), self.max_length), self.pad_id, np.int32)
        mask = np.zeros((len(sentences), self.max_length), np.int32)
        for row, sentence in enumerate(sentences):
            pieces = [self.token_to_id.get(t, self.unk_id) for t in self.tokenize(sentence)]
            pieces = [self.cls_id] + pieces[:self.max_length - 2] + [self.sep_id]
            ids[row, :len(pieces)] = pieces
            mask[row, :len(pieces)] = 1
        return {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': np.zeros_like(ids)}


def load_topic_split(split, data_dir=ASSET_DIR):
    """The rows (dicts with ``text``, ``label``, ``label_name``) of the shipped ``train`` or ``test`` split."""
    check_choice('split', split, 'load_topic_split', SPLITS)
    return read_jsonl(os.path.join(data_dir, f'{split}.jsonl'))


def topic_arrays(split, tokenizer, data_dir=ASSET_DIR):
    """``(input_ids, attention_mask, labels)`` int32 arrays of a split, tokenised with ``tokenizer``."""
    rows = load_topic_split(split, data_dir)
    encoded = tokenizer.encode([row['text'] for row in rows])
    labels = np.array([row['label'] for row in rows], np.int32)
    if labels.min() < 0 or labels.max() >= len(LABELS):
        raise ValueError(f"The '{split}' split in '{data_dir}' has labels outside [0, {len(LABELS) - 1}].")
    return encoded['input_ids'], encoded['attention_mask'], labels


def topic_dataset(split, tokenizer, batch_size, shuffle=None, seed=0, data_dir=ASSET_DIR):
    """A batched ``GeneratorDataset`` (columns ``input_ids``, ``attention_mask``, ``labels``) of a split.

    The training split is shuffled (reproducibly, by ``seed``) and drops its last partial batch, so every step has
    the same shape and reuses one compiled graph; the test split keeps every row in file order.

    Example:
        >>> ds = topic_dataset('train', tok, batch_size=16)  # doctest: +SKIP
        >>> ds.get_dataset_size()  # doctest: +SKIP
        25
    """
    check_int('batch_size', batch_size, 'topic_dataset')
    train = split == 'train'
    columns = topic_arrays(split, tokenizer, data_dir)
    return array_dataset(columns, ['input_ids', 'attention_mask', 'labels'], batch_size,
                         shuffle=train if shuffle is None else shuffle, seed=seed, drop_remainder=train)
