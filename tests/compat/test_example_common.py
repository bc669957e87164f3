"""examples/common.py: config base class, JSON lines, the array dataset, PNG writing."""
import zlib
from dataclasses import dataclass

import numpy as np
import pytest

from examples.common import (ExampleConfig, array_dataset, image_grid, png_bytes, read_jsonl, read_png, save_png,
                             to_uint8_image, write_jsonl)


@dataclass
class _Cfg(ExampleConfig):
    width: int = 4
    depth: int = 2
    sizes: tuple = (1, 2)
    IGNORED_KEYS = ('model_type',)

    def __post_init__(self):
        self.check_positive_ints(('width', 'depth'))


def test_example_config():
    cfg = _Cfg.from_dict({'width': 8, 'model_type': 'x'})
    assert cfg.width == 8 and cfg.to_dict() == {'width': 8, 'depth': 2, 'sizes': [1, 2]}
    with pytest.raises(ValueError, match="unknown key 'widht'; did you mean 'width'\\?"):
        _Cfg.from_dict({'widht': 8})
    with pytest.raises(ValueError, match="unknown key 'zzz'; valid keys are"):
        _Cfg.from_dict({'zzz': 8})
    with pytest.raises(TypeError, match="must be a dict, but got list"):
        _Cfg.from_dict([])
    with pytest.raises(ValueError, match="For '_Cfg', the 'depth' must be a positive int, but got 0"):
        _Cfg(depth=0)
    with pytest.raises(TypeError, match="'width' must be a positive int, but got 2.0"):
        _Cfg(width=2.0)


def test_jsonl_roundtrip_and_errors(tmp_path):
    rows = [{'text': 'héllo', 'label': 1}, {'b': [1, 2], 'a': None}]
    path = write_jsonl(str(tmp_path / 'd.jsonl'), rows)
    assert read_jsonl(path) == rows
    assert open(path, encoding='utf-8').read().splitlines()[1] == '{"a": null, "b": [1, 2]}'
    (tmp_path / 'bad.jsonl').write_text('{"a": 1}\n{oops\n', encoding='utf-8')
    with pytest.raises(ValueError, match="Line 2 of '.*bad.jsonl' is not valid JSON"):
        read_jsonl(str(tmp_path / 'bad.jsonl'))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_jsonl(str(tmp_path / 'none.jsonl'))


def test_array_dataset():
    x = np.arange(20, dtype=np.int32).reshape(10, 2)
    y = np.arange(10, dtype=np.int32)
    batches = [tuple(t.asnumpy() for t in b)
               for b in array_dataset([x, y], ['x', 'y'], 4).create_tuple_iterator(num_epochs=1)]
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuffled = [b[1].asnumpy() for b in array_dataset([x, y], ['x', 'y'], 4, shuffle=True, seed=7,
                                                      drop_remainder=True).create_tuple_iterator(num_epochs=1)]
    order = np.random.RandomState(7).permutation(10)
    assert np.concatenate(shuffled).tolist() == order[:8].tolist()
    with pytest.raises(ValueError, match="same number of rows"):
        array_dataset([x, y[:5]], ['x', 'y'], 4)
    with pytest.raises(ValueError, match="same length"):
        array_dataset([x], ['x', 'y'], 4)
    with pytest.raises(TypeError, match="'batch_size'"):
        array_dataset([x], ['x'], 4.0)


def test_png_roundtrip(tmp_path):
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (5, 7, 3)).astype(np.uint8)
    path = save_png(str(tmp_path / 'a.png'), image)
    np.testing.assert_array_equal(read_png(path), image)
    data = png_bytes(image)
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and data[12:16] == b'IHDR'
    # Every chunk's CRC is correct (viewers reject the file otherwise).
    pos = 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], 'big')
        body = data[pos + 4:pos + 8 + length]
        assert int.from_bytes(data[pos + 8 + length:pos + 12 + length], 'big') == zlib.crc32(body) & 0xffffffff
        pos += 12 + length
    assert to_uint8_image(np.full((3, 2, 2), -1.0)).max() == 0
    assert to_uint8_image(np.ones((2, 2, 3))).min() == 255
    grid = image_grid(np.stack([image, image, image]), ncols=2, pad=1, upscale=2)
    assert grid.shape == (2 * 11 + 1, 2 * 15 + 1, 3)
    np.testing.assert_array_equal(grid[12:22:2, 1:15:2], image)  # third tile: second row, first column
    assert (grid[12:22, 16:30] == 255).all()
    with pytest.raises(ValueError, match="shape \\(H, W, 3\\)"):
        png_bytes(np.zeros((4, 4), np.uint8))
