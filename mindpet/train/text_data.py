"""Text datasets from files, with no code: rows read from JSONL / CSV / TSV / plain text, tokenised with a Hugging
Face ``tokenizer.json`` (the ``tokenizers`` library), turned into padded NumPy columns and served by
``mindspore.dataset``.

Three kinds:

* ``classification``: a text column and a label column (names configurable); labels are mapped to indices by the
  ``labels`` list (default: the sorted labels of the training file). Columns ``input_ids``, ``attention_mask``,
  ``labels``.
* ``instruction``: causal-LM instruction tuning from ``prompt``/``response`` rows or Alpaca's
  ``instruction``/``input``/``output``. The model sees ``prompt tokens + response tokens + eos``; ``loss_mask`` is 1
  on the response tokens (and eos) only, so the loss never covers the prompt. Columns ``input_ids``,
  ``attention_mask``, ``loss_mask``.
* ``text``: plain text (one document per line of a .txt file, or a text column), tokenised, joined with eos and
  cut into ``max_length`` blocks (packing); every token is a target.

Bad rows (not a JSON object, a missing field, empty text, a label outside the label set, more tokens than
``max_length``) are collected with their ``file:line``; ``on_bad_rows: error`` refuses the data naming the first
and the count, ``skip`` drops them and the runner reports them.

Example:
    >>> rows = read_rows('train.jsonl')                           # doctest: +SKIP
    >>> data = classification_arrays(rows, tokenizer, labels, 64)  # doctest: +SKIP
"""
import csv
import json
import os
from collections import namedtuple

import numpy as np

#: one row of a data file: where it came from (for messages) and its fields
Row = namedtuple('Row', ['path', 'line', 'fields'])
#: a row that cannot be used: ``path:line`` and why
BadRow = namedtuple('BadRow', ['path', 'line', 'reason'])

FORMATS = ('jsonl', 'csv', 'tsv', 'txt')
KINDS = ('classification', 'instruction', 'text')
PAD_CANDIDATES = ('[PAD]', '<pad>', '<|pad|>')
EOS_CANDIDATES = ('</s>', '<eos>', '<|endoftext|>', '[SEP]', '<|eos|>')


class DataError(ValueError):
    """Unusable data; ``key`` is the ``data.*`` key it is about (the runner adds the config file)."""

    def __init__(self, key, message):
        super().__init__(message)
        self.key = key


def file_format(path, declared=None):
    """``declared`` or the format the extension says (``.jsonl``/``.json`` -> jsonl, ``.csv``, ``.tsv``,
    ``.txt``); None when it cannot be told."""
    if declared:
        return declared
    ext = os.path.splitext(path)[1].lower()
    return {'.jsonl': 'jsonl', '.json': 'jsonl', '.csv': 'csv', '.tsv': 'tsv', '.txt': 'txt'}.get(ext)


def read_rows(path, fmt=None, text_column='text'):
    """Every row of a data file.

    Returns:
        (list[Row], list[BadRow]): rows, and lines that are not rows (a JSONL line that is not a JSON object, a
        CSV line with more cells than the header). Blank lines are skipped. A ``txt`` line is the field
        ``text_column``.
    """
    fmt = file_format(path, fmt)
    rows, bad = [], []
    with open(path, encoding='utf-8', newline='' if fmt in ('csv', 'tsv') else None) as handle:
        if fmt == 'jsonl':
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as ex:
                    bad.append(BadRow(path, number, f"not valid JSON ({ex.msg})"))
                    continue
                if not isinstance(value, dict):
                    bad.append(BadRow(path, number, f"not a JSON object (a {type(value).__name__})"))
                    continue
                rows.append(Row(path, number, value))
        elif fmt in ('csv', 'tsv'):
            reader = csv.reader(handle, delimiter=',' if fmt == 'csv' else '\t')
            header = None
            for record in reader:
                if not any(cell.strip() for cell in record):
                    continue
                if header is None:
                    header = [cell.strip() for cell in record]
                    continue
                if len(record) > len(header):
                    bad.append(BadRow(path, reader.line_num, f"{len(record)} cells, but the header has "
                                                             f"{len(header)}"))
                    continue
                rows.append(Row(path, reader.line_num, dict(zip(header, record))))
        else:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    rows.append(Row(path, number, {text_column: line.rstrip('\n')}))
    return rows, bad


def field_text(row, column):
    """The row's ``column`` as text, or raise KeyError (missing) / ValueError (empty)."""
    if column not in row.fields or row.fields[column] is None:
        raise KeyError(column)
    value = row.fields[column]
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    if not text.strip():
        raise ValueError(column)
    return text


def special_id(tokenizer, given, candidates, what, key):
    """The id of token ``given`` (or of the first of ``candidates`` the vocabulary has); None when neither.

    Raises:
        DataError: ``given`` is not in the vocabulary.
    """
    if given is not None:
        token_id = tokenizer.token_to_id(given)
        if token_id is None:
            raise DataError(key, f"the {what} token {given!r} is not in the tokenizer's vocabulary")
        return token_id
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def load_tokenizer(path):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json``.

    Raises:
        DataError: ``tokenizers`` is not installed, or the file is not a tokenizer.
    """
    try:
        from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    except ImportError as ex:
        raise DataError('tokenizer', "needs the 'tokenizers' package (pip install tokenizers)") from ex
    try:
        return Tokenizer.from_file(path)
    except Exception as ex:  # the Rust library raises its own Exception type
        raise DataError('tokenizer', f"'{path}' is not a tokenizer.json ({str(ex).splitlines()[0]})") from None


class Encoded:
    """Padded NumPy columns of one split, and the bad rows found while making them."""

    def __init__(self, columns, names, bad, rows_read):
        self.columns = columns
        self.names = names
        self.bad = bad
        self.rows_read = rows_read

    def __len__(self):
        return len(self.columns[0]) if self.columns else 0


def _fields_or_bad(row, bad, read):
    """``read(row)``, or None after recording the row in ``bad`` when a field it reads is missing or empty (the
    KeyError/ValueError of :func:`field_text`); ``read`` never returns None itself."""
    try:
        return read(row)
    except KeyError as ex:
        bad.append(BadRow(row.path, row.line, f"missing field '{ex.args[0]}'"))
    except ValueError as ex:
        bad.append(BadRow(row.path, row.line, f"empty field '{ex.args[0]}'"))
    return None


def _too_long_is_bad(row, ids, max_length, bad):
    """True, after recording the row in ``bad``, when its tokens do not fit in ``max_length`` (a row is reported,
    never truncated)."""
    if len(ids) <= max_length:
        return False
    bad.append(BadRow(row.path, row.line, f"{len(ids)} tokens, more than max_length {max_length}"))
    return True


def _pad(sequences, length, pad_id):
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
    return ids, mask


def classification_arrays(rows, tokenizer, labels, max_length, pad_id, text_column='text', label_column='label'):
    """``input_ids``/``attention_mask`` ``(N, max_length)`` int32 and ``labels`` ``(N,)`` int32 of the good rows.

    Args:
        rows (list[Row]): from :func:`read_rows`.
        labels (list[str]): label names; a row's label (compared as text) is its index here.

    Returns:
        Encoded
    """
    index = {str(name): i for i, name in enumerate(labels)}
    sequences, targets, bad = [], [], []
    for row in rows:
        fields = _fields_or_bad(row, bad, lambda r: (field_text(r, text_column), field_text(r, label_column)))
        if fields is None:
            continue
        text, label = fields
        if label not in index:
            bad.append(BadRow(row.path, row.line, f"label {label!r} is not in the label set {list(index)}"))
            continue
        ids = tokenizer.encode(text).ids
        if _too_long_is_bad(row, ids, max_length, bad):
            continue
        sequences.append(ids)
        targets.append(index[label])
    input_ids, mask = _pad(sequences, max_length, pad_id)
    return Encoded([input_ids, mask, np.asarray(targets, np.int32)], ['input_ids', 'attention_mask', 'labels'],
                   bad, len(rows))


def prompt_and_response(row, prompt_column='prompt', response_column='response'):
    """The prompt and response texts of an instruction row: ``prompt``/``response`` (names configurable) or
    Alpaca's ``instruction``/``input``/``output`` (prompt = instruction, a blank line and the input when there is
    one). Raises KeyError/ValueError like :func:`field_text`."""
    if prompt_column not in row.fields and 'instruction' in row.fields:
        prompt = field_text(row, 'instruction')
        extra = row.fields.get('input')
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        return prompt, field_text(row, 'output' if response_column not in row.fields else response_column)
    return field_text(row, prompt_column), field_text(row, response_column)


def instruction_ids(tokenizer, prompt, response, eos_id, template='{prompt}\n'):
    """``(ids, loss_mask)`` of one instruction row: the formatted prompt's tokens, then the response's and eos;
    the mask is 1 exactly on the response tokens and eos."""
    prompt_ids = tokenizer.encode(template.format(prompt=prompt)).ids
    response_ids = tokenizer.encode(response, add_special_tokens=False).ids
    if eos_id is not None:
        response_ids = response_ids + [eos_id]
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def instruction_arrays(rows, tokenizer, max_length, pad_id, eos_id, template='{prompt}\n', prompt_column='prompt',
                       response_column='response'):
    """``input_ids``/``attention_mask`` int32 and ``loss_mask`` float32, all ``(N, max_length)``.

    Returns:
        Encoded
    """
    sequences, masks, bad = [], [], []
    for row in rows:
        fields = _fields_or_bad(row, bad, lambda r: prompt_and_response(r, prompt_column, response_column))
        if fields is None:
            continue
        ids, loss_mask = instruction_ids(tokenizer, fields[0], fields[1], eos_id, template)
        if _too_long_is_bad(row, ids, max_length, bad):
            continue
        sequences.append(ids)
        masks.append(loss_mask)
    input_ids, attention = _pad(sequences, max_length, pad_id)
    loss_mask = np.zeros(input_ids.shape, np.float32)
    for i, mask in enumerate(masks):
        loss_mask[i, :len(mask)] = mask
    return Encoded([input_ids, attention, loss_mask], ['input_ids', 'attention_mask', 'loss_mask'], bad, len(rows))


def packed_text_arrays(rows, tokenizer, max_length, eos_id, text_column='text'):
    """Plain text for LM training: every document's tokens (then eos), concatenated and cut into blocks of
    ``max_length`` (the last, partial block dropped); every position is a target.

    Returns:
        Encoded
    """
    stream, bad = [], []
    for row in rows:
        text = _fields_or_bad(row, bad, lambda r: field_text(r, text_column))
        if text is None:
            continue
        stream.extend(tokenizer.encode(text).ids)
        if eos_id is not None:
            stream.append(eos_id)
    blocks = len(stream) // max_length
    input_ids = np.asarray(stream[:blocks * max_length], np.int32).reshape(blocks, max_length)
    ones = np.ones(input_ids.shape, np.int32)
    return Encoded([input_ids, ones, ones.astype(np.float32)], ['input_ids', 'attention_mask', 'loss_mask'], bad,
                   len(rows))


def bad_rows_text(bad, limit=3):
    """``'train.jsonl:5: missing field 'label'; train.jsonl:9: ...'`` for the first ``limit`` bad rows."""
    shown = '; '.join(f"{b.path}:{b.line}: {b.reason}" for b in bad[:limit])
    more = f"; and {len(bad) - limit} more" if len(bad) > limit else ''
    return shown + more


def dataset(encoded, batch_size, shuffle=True, seed=0, drop_remainder=True):
    """A batched ``mindspore.dataset`` of the columns (int32/float32 NumPy arrays)."""
    import mindspore.dataset as ds  # pylint: disable=import-outside-toplevel
    data = ds.NumpySlicesDataset(dict(zip(encoded.names, encoded.columns)), column_names=encoded.names,
                                 shuffle=shuffle)
    if shuffle:
        ds.config.set_seed(seed)
    return data.batch(batch_size, drop_remainder=drop_remainder)


__all__ = ['Row', 'BadRow', 'DataError', 'Encoded', 'FORMATS', 'KINDS', 'file_format', 'read_rows', 'field_text',
           'special_id', 'load_tokenizer', 'classification_arrays', 'prompt_and_response', 'instruction_ids',
           'instruction_arrays', 'packed_text_arrays', 'bad_rows_text', 'dataset']
