"""The instruction and plain-text encoders report a missing field, an empty field and (instruction rows) a row
longer than max_length by file and line, keep the good rows, and count every row read. The classification encoder's
bad rows are covered end to end in test_own_data_errors.py."""
import numpy as np

from mindpet.train import text_data
from tests.train.text_fixtures import FACTS, instruction_rows, write_jsonl, train_tokenizer

MAX_LENGTH = 12


def _tokenizer(tmp_path):
    path, _ = train_tokenizer(tmp_path / 'tokenizer.json', [f"{p} it is {a}" for p, a in FACTS] + ['answer'],
                              cls_sep=False)
    tokenizer = text_data.load_tokenizer(path)
    return tokenizer, tokenizer.token_to_id('</s>')


def _rows(tmp_path, rows):
    parsed, bad = text_data.read_rows(write_jsonl(tmp_path / 'rows.jsonl', rows))
    assert not bad
    return parsed


def test_instruction_rows_missing_empty_or_too_long_are_reported_by_line(tmp_path):
    tokenizer, eos = _tokenizer(tmp_path)
    good = instruction_rows()[:3]
    rows = [good[0], {'prompt': 'colour of sky'}, good[1], {'prompt': '  ', 'response': 'it is blue'},
            {'prompt': ' '.join(['sky'] * 20), 'response': 'it is blue'}, good[2]]
    encoded = text_data.instruction_arrays(_rows(tmp_path, rows), tokenizer, MAX_LENGTH, 0, eos)
    path = str(tmp_path / 'rows.jsonl')
    assert [tuple(b) for b in encoded.bad] == [(path, 2, "missing field 'response'"),
                                               (path, 4, "empty field 'prompt'"),
                                               (path, 5, f"24 tokens, more than max_length {MAX_LENGTH}")]
    assert len(encoded) == 3 and encoded.rows_read == 6
    alone = text_data.instruction_arrays(_rows(tmp_path, good), tokenizer, MAX_LENGTH, 0, eos)
    for kept, reference in zip(encoded.columns, alone.columns):
        np.testing.assert_array_equal(kept, reference)


def test_plain_text_rows_missing_or_empty_are_reported_and_the_rest_packed(tmp_path):
    tokenizer, eos = _tokenizer(tmp_path)
    rows = [{'text': 'colour of sky it is blue'}, {'body': 'colour of sea'}, {'text': ''},
            {'text': 'colour of snow it is white'}]
    encoded = text_data.packed_text_arrays(_rows(tmp_path, rows), tokenizer, 4, eos)
    path = str(tmp_path / 'rows.jsonl')
    assert [tuple(b) for b in encoded.bad] == [(path, 2, "missing field 'text'"), (path, 3, "empty field 'text'")]
    stream = tokenizer.encode('colour of sky it is blue').ids + [eos] + \
        tokenizer.encode('colour of snow it is white').ids + [eos]
    blocks = len(stream) // 4
    np.testing.assert_array_equal(encoded.columns[0], np.asarray(stream[:blocks * 4]).reshape(blocks, 4))
    assert encoded.rows_read == 4
