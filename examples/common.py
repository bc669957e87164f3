"""Dataset and file utilities shared by the examples (BERT, Wukong-Huahua, Pangu-alpha).

Everything here is deterministic: datasets come from NumPy arrays with a fixed shuffle seed, and the text/image files
the examples ship are written byte-identically on every run (atomically, through ``mindpet.utils.io_utils``).
"""
import json
import os
import struct
import zlib
from dataclasses import asdict, fields

import numpy as np

from mindpet.utils.io_utils import atomic_write
from mindpet.utils.validation import check_int, check_bool, did_you_mean


class ExampleConfig:
    """Base of the examples' dataclass configs: ``from_dict`` refuses unknown keys (suggesting the closest valid
    one), ``to_dict`` gives plain YAML-friendly values, ``check_positive_ints`` validates dimension fields.

    Subclasses are ``@dataclass``es; ``IGNORED_KEYS`` lists foreign metadata keys ``from_dict`` may skip.
    """
    IGNORED_KEYS = ()

    @classmethod
    def from_dict(cls, values):
        """Build from a dict. Raises ``TypeError`` for a non-dict, ``ValueError`` naming an unknown key."""
        if not isinstance(values, dict):
            raise TypeError(f"For '{cls.__name__}', the config must be a dict, but got {type(values).__name__}.")
        known = [f.name for f in fields(cls)]
        for key in sorted(set(values) - set(known) - set(cls.IGNORED_KEYS)):
            hint = did_you_mean(key, known) or f"; valid keys are {sorted(known)}."
            raise ValueError(f"For '{cls.__name__}', unknown key '{key}'{hint}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self):
        """The fields as a dict of plain values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def check_positive_ints(self, names):
        """``check_int`` every field in ``names`` (positive ints)."""
        for name in names:
            check_int(name, getattr(self, name), type(self).__name__)


def read_jsonl(path):
    """Read a JSON-lines file into a list of dicts.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: a line is not valid JSON (the message names the file and line number).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The data file '{path}' does not exist.")
    rows = []
    with open(path, 'r', encoding='utf-8') as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as ex:
                raise ValueError(f"Line {number} of '{path}' is not valid JSON: {ex.msg}.") from ex
    return rows


def write_jsonl(path, rows):
    """Write ``rows`` (dicts) as JSON lines with sorted keys, atomically. Returns ``path``."""
    text = ''.join(json.dumps(row, sort_keys=True, ensure_ascii=False) + '\n' for row in rows)
    return write_text(path, text)


def write_text(path, text):
    """Write a UTF-8 text file atomically (LF line ends on every platform). Returns ``path``."""
    def _write(tmp_path):
        with open(tmp_path, 'w', encoding='utf-8', newline='\n') as handle:
            handle.write(text)
    return atomic_write(path, _write)


class _ArraySource:
    """Random-access source for GeneratorDataset: row ``i`` of every column."""

    def __init__(self, columns):
        self.columns = columns
        self.length = len(columns[0])

    def __getitem__(self, index):
        return tuple(col[index] for col in self.columns)

    def __len__(self):
        return self.length


def array_dataset(columns, column_names, batch_size, shuffle=False, seed=0, drop_remainder=False):
    """A batched ``mindspore.dataset.GeneratorDataset`` over NumPy arrays of equal length.

    Args:
        columns (Sequence[numpy.ndarray]): one array per column, all with the same first dimension ``N``.
        column_names (Sequence[str]): a name per column.
        batch_size (int): rows per batch.
        shuffle (bool): shuffle rows each epoch, reproducibly (the order depends only on ``seed``).
        seed (int): seed of the shuffle.
        drop_remainder (bool): drop a last, smaller batch (keeps every batch the same shape, so a compiled graph
            is reused).

    Returns:
        mindspore.dataset.Dataset yielding ``len(columns)`` tensors per batch.

    Example:
        >>> ds = array_dataset([np.zeros((10, 4), np.int32), np.arange(10)], ['x', 'y'], batch_size=4)
        >>> ds.get_dataset_size()
        3
    """
    import mindspore.dataset as ds
    owner = 'array_dataset'
    check_int('batch_size', batch_size, owner)
    check_bool('shuffle', shuffle, owner)
    check_int('seed', seed, owner, min_value=0)
    check_bool('drop_remainder', drop_remainder, owner)
    columns = [np.asarray(col) for col in columns]
    if not columns or len(columns) != len(column_names):
        raise ValueError(f"For '{owner}', 'columns' and 'column_names' must be non-empty and of the same length, "
                         f"but got {len(columns)} column(s) and {len(column_names)} name(s).")
    lengths = {len(col) for col in columns}
    if len(lengths) != 1:
        raise ValueError(f"For '{owner}', every column must have the same number of rows, but got {sorted(lengths)}.")
    if shuffle:
        # The order comes from our own seeded permutation so it is identical on every machine and run.
        order = np.random.RandomState(seed).permutation(len(columns[0]))
        columns = [col[order] for col in columns]
    dataset = ds.GeneratorDataset(_ArraySource(columns), column_names=list(column_names), shuffle=False)
    return dataset.batch(batch_size, drop_remainder=drop_remainder)


# ----- images ---------------------------------------------------------------------------------------------------
def to_uint8_image(array):
    """Map an image in [-1, 1] (shape ``(3, H, W)`` or ``(H, W, 3)``) to uint8 ``(H, W, 3)``."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"For 'to_uint8_image', the image must have 3 dimensions, but got shape {array.shape}.")
    if array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    return np.clip(np.round((array + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images, ncols, pad=2, upscale=1, pad_value=255):
    """Tile uint8 images ``(N, H, W, 3)`` into one ``(rows*H', cols*W', 3)`` image (``H' = H*upscale + pad``).

    Pixels are repeated ``upscale`` times (nearest neighbour) so tiny images stay visible.
    """
    images = np.asarray(images, dtype=np.uint8)
    check_int('ncols', ncols, 'image_grid')
    check_int('pad', pad, 'image_grid', min_value=0)
    check_int('upscale', upscale, 'image_grid')
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"For 'image_grid', the images must have shape (N, H, W, 3), but got {images.shape}.")
    images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    num, height, width, _ = images.shape
    nrows = -(-num // ncols)
    grid = np.full((nrows * (height + pad) + pad, ncols * (width + pad) + pad, 3), pad_value, np.uint8)
    for index in range(num):
        row, col = divmod(index, ncols)
        top, left = pad + row * (height + pad), pad + col * (width + pad)
        grid[top:top + height, left:left + width] = images[index]
    return grid


def png_bytes(image):
    """Encode a uint8 RGB image ``(H, W, 3)`` as PNG bytes (8-bit truecolour, no extra dependency)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"For 'png_bytes', the image must have shape (H, W, 3), but got {image.shape}.")
    height, width, _ = image.shape

    def chunk(kind, data):
        body = kind + data
        return struct.pack('>I', len(data)) + body + struct.pack('>I', zlib.crc32(body) & 0xffffffff)

    # Each scanline starts with filter type 0 (none).
    raw = b''.join(b'\x00' + image[row].tobytes() for row in range(height))
    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw, 9))
            + chunk(b'IEND', b''))


def save_png(path, image):
    """Write a uint8 RGB image ``(H, W, 3)`` to ``path`` as PNG, atomically. Returns ``path``."""
    data = png_bytes(image)

    def _write(tmp_path):
        with open(tmp_path, 'wb') as handle:
            handle.write(data)
    return atomic_write(path, _write, suffix='.png')


def read_png(path):
    """Decode a PNG written by :func:`save_png` (8-bit RGB, filter 0) back to a uint8 ``(H, W, 3)`` array."""
    with open(path, 'rb') as handle:
        data = handle.read()
    if data[:8] != b'\x89PNG\r\n\x1a\n':
        raise ValueError(f"'{path}' is not a PNG file.")
    pos, idat, size = 8, b'', None
    while pos < len(data):
        length, = struct.unpack('>I', data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b'IHDR':
            size = struct.unpack('>II', body[:8])
            if body[8:10] != b'\x08\x02':
                raise ValueError(f"'{path}' is not an 8-bit RGB PNG.")
        elif kind == b'IDAT':
            idat += body
        pos += 12 + length
    width, height = size
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    if np.any(raw[:, 0] != 0):
        raise ValueError(f"'{path}' uses PNG row filters this reader does not decode.")
    return raw[:, 1:].reshape(height, width, 3).copy()
