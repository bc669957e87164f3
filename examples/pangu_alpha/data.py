"""Text data of the PanGu-alpha example: a character tokenizer and the shipped corpora.

``assets/corpus.txt`` holds simple general sentences (for pre-training the tiny base model) and
``assets/task.txt`` short question/answer lines (``q: ... a: ...``) for fine-tuning, e.g. with prefix tuning; both
were written for this project. Each line becomes one training row ``<bos> line <eos> <pad>...``.
"""
import os

import numpy as np

from examples.common import array_dataset
from mindpet.utils.validation import check_int, check_choice

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')
CORPORA = ('corpus', 'task')
SPECIAL_TOKENS = ('<pad>', '<unk>', '<bos>', '<eos>')
ALPHABET = " .,:;?!'-abcdefghijklmnopqrstuvwxyz0123456789"


class CharTokenizer:
    """Lower-cased characters over a fixed alphabet; ids 0-3 are ``<pad> <unk> <bos> <eos>``.

    Example:
        >>> tok = CharTokenizer()
        >>> tok.decode(tok.encode('The cat.'))
        'the cat.'
    """

    def __init__(self, alphabet=ALPHABET):
        self.vocab = SPECIAL_TOKENS + tuple(alphabet)
        self.token_to_id = {token: index for index, token in enumerate(self.vocab)}
        if len(self.token_to_id) != len(self.vocab):
            raise ValueError("For 'CharTokenizer', the 'alphabet' must not repeat characters or special tokens.")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = range(4)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def encode(self, text):
        """Ids of the characters of ``text`` (lower-cased; unknown characters -> ``<unk>``), no specials."""
        return [self.token_to_id.get(ch, self.unk_id) for ch in text.lower()]

    def decode(self, ids):
        """Text of ``ids``; special tokens are dropped."""
        return ''.join(self.vocab[i] for i in ids if i >= len(SPECIAL_TOKENS))


def load_lines(corpus, data_dir=ASSET_DIR):
    """The non-empty lines of ``corpus`` ('corpus' or 'task')."""
    check_choice('corpus', corpus, 'load_lines', CORPORA)
    path = os.path.join(data_dir, f'{corpus}.txt')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The text file '{path}' does not exist.")
    with open(path, 'r', encoding='utf-8') as handle:
        return [line.strip() for line in handle if line.strip()]


def lm_arrays(lines, tokenizer, seq_length):
    """int32 ``(len(lines), seq_length)``: ``<bos> text <eos>`` right-padded with ``<pad>``.

    Raises:
        ValueError: a line does not fit (the message names it), so nothing is silently cut.
    """
    check_int('seq_length', seq_length, 'lm_arrays', min_value=3)
    ids = np.full((len(lines), seq_length), tokenizer.pad_id, np.int32)
    for row, line in enumerate(lines):
        tokens = [tokenizer.bos_id] + tokenizer.encode(line) + [tokenizer.eos_id]
        if len(tokens) > seq_length:
            raise ValueError(f"For 'lm_arrays', the line {line!r} needs {len(tokens)} tokens with <bos>/<eos>, "
                             f"more than seq_length {seq_length}.")
        ids[row, :len(tokens)] = tokens
    return ids


def lm_dataset(corpus, tokenizer, seq_length, batch_size, shuffle=True, seed=0, data_dir=ASSET_DIR):
    """A batched ``GeneratorDataset`` with one column ``input_ids`` over the lines of ``corpus``; the last partial
    batch is dropped so every step reuses one compiled graph.

    Example:
        >>> ds = lm_dataset('corpus', CharTokenizer(), seq_length=64, batch_size=8)
        >>> ds.get_dataset_size()
        11
    """
    ids = lm_arrays(load_lines(corpus, data_dir), tokenizer, seq_length)
    return array_dataset([ids], ['input_ids'], batch_size, shuffle=shuffle, seed=seed, drop_remainder=True)


def task_prompts(data_dir=ASSET_DIR):
    """``(prompt, answer)`` pairs of the task file: ``('q: what colour is the sky? a:', ' the sky is blue.')``."""
    pairs = []
    for line in load_lines('task', data_dir):
        head, sep, tail = line.partition(' a:')
        if not sep:
            raise ValueError(f"The task line {line!r} has no ' a:' separator.")
        pairs.append((head + sep, tail))
    return pairs
