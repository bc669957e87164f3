"""Data of the Wukong-Huahua example: a generated image-caption set in several visual styles, a caption tokenizer,
the tiny config's first stage (an exact patch codec), and the training pipeline.

Images are 16x16 RGB drawings of one shape (circle, square, triangle, ring) of some size at some place, described
by a caption such as "a large circle at the top left". The same captions render differently per style:

* ``base``  - random shape and background colours, striped background half the time (what the base model is
  pre-trained on: it knows every palette, as a real base model knows many styles);
* ``warm``  - a red/orange shape on a pale yellow background, solid fill;
* ``cool``  - a cyan shape on a navy background with horizontal stripes.

Two LoRA adapters trained on ``warm`` and ``cool`` then pull the same caption towards two visibly different
palettes. Everything is seeded: the same arguments give the same arrays on every run.
"""
import zlib

import numpy as np

from examples.common import array_dataset, image_grid, save_png, to_uint8_image
from mindpet.utils.validation import check_int, check_choice, check_real

SHAPES = ('circle', 'square', 'triangle', 'ring')
SIZES = ('small', 'large')
PLACES = {'top left': (4.5, 4.5), 'top right': (4.5, 10.5), 'bottom left': (10.5, 4.5),
          'bottom right': (10.5, 10.5), 'center': (7.5, 7.5)}
STYLES = ('base', 'warm', 'cool')
# (shape colour, background colour, colour jitter, background stripes), RGB in [0, 255].
_PALETTES = {
    'base': None,  # random colours per image
    'warm': ((215, 60, 25), (250, 215, 120), 20, False),
    'cool': ((60, 210, 230), (20, 30, 90), 20, True),
}
SPECIAL_TOKENS = ('[PAD]', '[SOT]', '[EOT]', '[UNK]')
CAPTION_VOCAB = SPECIAL_TOKENS + ('a', 'at', 'the', 'in') + SHAPES + SIZES + ('top', 'bottom', 'left', 'right',
                                                                             'center')


def all_captions():
    """Every caption the generator can produce, in a fixed order."""
    return [f"a {size} {shape} {'in' if place == 'center' else 'at'} the {place}"
            for shape in SHAPES for size in SIZES for place in PLACES]


class CaptionTokenizer:
    """Word-level tokenizer over :data:`CAPTION_VOCAB`: ``[SOT] words [EOT] [PAD]...`` of fixed length.

    Example:
        >>> CaptionTokenizer(8).encode(['a small ring'])[0].tolist()
        [1, 4, 12, 11, 2, 0, 0, 0]
    """

    def __init__(self, context_length, vocab=CAPTION_VOCAB):
        self.context_length = check_int('context_length', context_length, 'CaptionTokenizer', min_value=2)
        self.vocab = tuple(vocab)
        self.token_to_id = {token: index for index, token in enumerate(self.vocab)}
        self.pad_id, self.sot_id, self.eot_id, self.unk_id = (self.token_to_id[t] for t in SPECIAL_TOKENS)

    def encode(self, captions):
        """int32 ``(len(captions), context_length)``; too-long captions are cut (the [EOT] is kept)."""
        if isinstance(captions, str):
            captions = [captions]
        ids = np.full((len(captions), self.context_length), self.pad_id, np.int32)
        for row, caption in enumerate(captions):
            words = [self.token_to_id.get(w, self.unk_id) for w in caption.lower().split()]
            tokens = [self.sot_id] + words[:self.context_length - 2] + [self.eot_id]
            ids[row, :len(tokens)] = tokens
        return ids

    @property
    def vocab_size(self):
        return len(self.vocab)


def _style_seed(style, seed):
    return (zlib.crc32(style.encode('utf-8')) + 1000003 * seed) % (2 ** 32)


def render(shape, size, place, style, rng, image_size=16):
    """Draw one image: float32 ``(3, H, W)`` in [-1, 1]."""
    if _PALETTES[style] is None:
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        jitter, stripes = 0, bool(rng.uniform() < 0.5)
    else:
        fg, bg, jitter, stripes = _PALETTES[style]
    cy, cx = PLACES[place]
    scale = image_size / 16.0
    cy, cx = (cy + rng.uniform(-0.5, 0.5)) * scale, (cx + rng.uniform(-0.5, 0.5)) * scale
    radius = (2.2 if size == 'small' else 3.8) * scale
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    dy, dx = yy - cy, xx - cx
    if shape == 'circle':
        inside = dy ** 2 + dx ** 2 <= radius ** 2
    elif shape == 'square':
        inside = np.maximum(np.abs(dy), np.abs(dx)) <= radius * 0.85
    elif shape == 'triangle':
        inside = (dy >= -radius) & (dy <= radius * 0.8) & (np.abs(dx) <= (dy + radius) * 0.6)
    else:  # ring
        dist2 = dy ** 2 + dx ** 2
        inside = (dist2 <= radius ** 2) & (dist2 >= (radius * 0.55) ** 2)
    fg = np.clip(np.array(fg, np.float32) + rng.uniform(-jitter, jitter, 3), 0, 255)
    bg = np.clip(np.array(bg, np.float32) + rng.uniform(-jitter, jitter, 3), 0, 255)
    background = np.broadcast_to(bg, (image_size, image_size, 3)).copy()
    if stripes:
        background[(np.arange(image_size) // max(1, int(2 * scale))) % 2 == 1] *= 0.55
    image = np.where(inside[..., None], fg, background)
    return (image.transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32)


def make_caption_set(style, num, seed=0, image_size=16):
    """``num`` images of one style and their captions.

    Returns:
        (images, captions): float32 ``(num, 3, H, W)`` in [-1, 1], and a list of ``num`` captions. Every caption of
        :func:`all_captions` appears (cyclically) before any repeats, in a seeded order.

    Example:
        >>> images, captions = make_caption_set('warm', 8, seed=0)
        >>> images.shape, captions[0]  # doctest: +SKIP
        ((8, 3, 16, 16), 'a large ring at the bottom left')
    """
    owner = 'make_caption_set'
    check_choice('style', style, owner, STYLES)
    check_int('num', num, owner)
    check_int('seed', seed, owner, min_value=0)
    rng = np.random.RandomState(_style_seed(style, seed))
    combos = [(shape, size, place) for shape in SHAPES for size in SIZES for place in PLACES]
    order = np.concatenate([rng.permutation(len(combos)) for _ in range(-(-num // len(combos)))])[:num]
    images, captions = [], []
    for index in order:
        shape, size, place = combos[index]
        images.append(render(shape, size, place, style, rng, image_size))
        captions.append(f"a {size} {shape} {'in' if place == 'center' else 'at'} the {place}")
    return np.stack(images), captions


# ----- first stage (tiny config) -----------------------------------------------------------------------------
def patch_encode(images, factor, scale_factor=1.0):
    """Images ``(B, C, H, W)`` -> latents ``(B, C * f^2, H / f, W / f)`` by pixel-unshuffle, times ``scale_factor``.

    Exact and parameter-free: the tiny config's stand-in for the kl-f8 VAE, so training and sampling work on a
    lower-resolution, more-channel latent like Wukong-Huahua's, and :func:`patch_decode` inverts it exactly.
    """
    images = np.asarray(images, np.float32)
    batch, channels, height, width = images.shape
    if height % factor or width % factor:
        raise ValueError(f"For 'patch_encode', the image size {height}x{width} is not divisible by {factor}.")
    x = images.reshape(batch, channels, height // factor, factor, width // factor, factor)
    x = x.transpose(0, 1, 3, 5, 2, 4).reshape(batch, channels * factor * factor, height // factor, width // factor)
    return (x * scale_factor).astype(np.float32)


def patch_decode(latents, factor, scale_factor=1.0, channels=3):
    """Inverse of :func:`patch_encode`."""
    latents = np.asarray(latents, np.float32) / scale_factor
    batch, _, height, width = latents.shape
    x = latents.reshape(batch, channels, factor, factor, height, width).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(batch, channels, height * factor, width * factor).astype(np.float32)


# ----- training pipeline -------------------------------------------------------------------------------------
def diffusion_arrays(cfg, style, num, seed=0, uncond_prob=0.1, repeats=1):
    """Training rows for a style: ``(latents, token_ids, timesteps, noise)`` numpy arrays of ``num * repeats`` rows.

    Each repeat of the image set draws fresh timesteps (uniform in ``[0, T)``) and noise, and replaces a caption by
    the empty one with probability ``uncond_prob`` (for classifier-free guidance), all from a seeded RNG.
    """
    owner = 'diffusion_arrays'
    check_real('uncond_prob', uncond_prob, owner, min_value=0)
    if uncond_prob >= 1:
        raise ValueError(f"For '{owner}', the 'uncond_prob' must be in [0, 1), but got {uncond_prob}.")
    check_int('repeats', repeats, owner)
    if cfg.first_stage != 'patch':
        raise ValueError(f"For '{owner}', images can only be encoded here with first_stage 'patch'; the "
                         f"'{cfg.first_stage}' first stage needs precomputed VAE latents.")
    images, captions = make_caption_set(style, num, seed, cfg.image_size)
    latents = patch_encode(images, cfg.latent_factor, cfg.scale_factor)
    tokenizer = CaptionTokenizer(cfg.text_context_length)
    rng = np.random.RandomState(_style_seed(style, seed) ^ 0x5EED)
    rows = num * repeats
    drop = rng.uniform(size=rows) < uncond_prob
    ids = tokenizer.encode([('' if d else captions[i % num]) for i, d in enumerate(drop)])
    timesteps = rng.randint(0, cfg.timesteps, size=rows).astype(np.int32)
    noise = rng.standard_normal((rows,) + latents.shape[1:]).astype(np.float32)
    return np.tile(latents, (repeats, 1, 1, 1)), ids, timesteps, noise


def diffusion_dataset(cfg, style, num, batch_size, seed=0, uncond_prob=0.1, repeats=1, shuffle=True):
    """A batched ``GeneratorDataset`` with columns ``latents, token_ids, timesteps, noise`` (see
    :func:`diffusion_arrays`), shuffled by ``seed``; the last partial batch is dropped so the graph is reused."""
    columns = diffusion_arrays(cfg, style, num, seed, uncond_prob, repeats)
    return array_dataset(columns, ['latents', 'token_ids', 'timesteps', 'noise'], batch_size, shuffle=shuffle,
                         seed=seed, drop_remainder=True)


def save_sample_grid(path, rows_of_images, upscale=6):
    """Save rows of images (each a float ``(N, 3, H, W)`` array in [-1, 1]) as one PNG grid, one row per entry.

    Example:
        >>> save_sample_grid('out/styles.png', [warm_images, cool_images])  # doctest: +SKIP
    """
    rows = [np.stack([to_uint8_image(image) for image in images]) for images in rows_of_images]
    ncols = max(len(r) for r in rows)
    tiles = []
    for row in rows:
        pad = np.full((ncols - len(row),) + row.shape[1:], 255, np.uint8)
        tiles.append(np.concatenate([row, pad]) if len(pad) else row)
    return save_png(path, image_grid(np.concatenate(tiles), ncols, pad=2, upscale=upscale))
