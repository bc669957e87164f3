"""A Wukong-Huahua-style latent-diffusion model: a UNet with cross-attention conditioned on a text encoder.

The layout follows Wukong-Huahua / Stable Diffusion v1 (``ldm.modules.diffusionmodules.openaimodel.UNetModel`` with
spatial transformers), and so do the parameter paths::

    model.diffusion_model.input_blocks.N.M...      (ResBlock | SpatialTransformer | Downsample per block)
    model.diffusion_model.middle_block.M...
    model.diffusion_model.output_blocks.N.M...
    ...transformer_blocks.0.attn1.to_q / to_k / to_v / to_out    (self-attention)
    ...transformer_blocks.0.attn2.to_q / to_k / to_v / to_out    (cross-attention over the text features)
    cond_stage_model.transformer...                 (the text encoder)

``to_q``/``to_k``/``to_v``/``to_out`` are plain ``nn.Dense`` cells, so LoRA targets them by name (Wukong-Huahua's
LoRA recipe: the cross-attention query, key, value and output projections, rank 4, alpha 4).

:data:`TINY_CONFIG` trains on CPU in seconds on 16x16 images; :data:`FULL_CONFIG` records Wukong-Huahua's real
dimensions (UNet 320 channels, mults 1/2/4/4, context 768, 77-token text encoder, 4x64x64 latents of a kl-f8 VAE)
for Ascend. The first stage (image <-> latent) runs outside the trained graph: the tiny config uses an exact,
parameter-free patch codec (:func:`examples.wukong_huahua.data.patch_encode`), the full one precomputed VAE latents.

Training objective: noise prediction, ``|| eps - eps_theta(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t, c) ||^2``
(:class:`DiffusionWithLoss`; the tiny config predicts ``z0`` instead, parameterization 'x0', which a briefly trained
tiny model gets right where an eps error is amplified by ``1 / sqrt(abar_T)``); sampling: deterministic DDIM (:class:`DDIMSampler`) with optional classifier-free
guidance.
"""
import math
from dataclasses import dataclass

import numpy as np
from mindspore import nn, ops, Parameter, Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import initializer, Normal

from examples.common import ExampleConfig
from mindpet.utils.validation import check_int, check_real, check_rate, check_choice


@dataclass
class WukongConfig(ExampleConfig):
    """Dimensions of the latent-diffusion model (names follow the Wukong-Huahua / LDM YAML keys).

    Example:
        >>> WukongConfig.from_dict(TINY_CONFIG).latent_size
        8
    """
    image_size: int = 16
    image_channels: int = 3
    first_stage: str = 'patch'        # 'patch': exact pixel-unshuffle codec; 'kl-f8': Wukong-Huahua's VAE latents
    latent_factor: int = 2            # image side / latent side
    latent_channels: int = 12         # patch codec: image_channels * latent_factor ** 2
    scale_factor: float = 1.0
    model_channels: int = 32
    channel_mult: tuple = (1, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple = (2,)
    num_heads: int = 2
    transformer_depth: int = 1
    norm_groups: int = 8
    dropout: float = 0.0
    context_dim: int = 32
    text_vocab_size: int = 32
    text_context_length: int = 12
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    timesteps: int = 100
    linear_start: float = 0.0085
    linear_end: float = 0.12
    # What the UNet predicts: 'eps' (the noise, as Wukong-Huahua), 'x0' (the clean latents) or 'v'
    # (sqrt(abar) eps - sqrt(1 - abar) z0, as Stable Diffusion 2).
    parameterization: str = 'eps'

    def __post_init__(self):
        owner = 'WukongConfig'
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.check_positive_ints(('image_size', 'image_channels', 'latent_factor', 'latent_channels',
                                  'model_channels', 'num_res_blocks', 'num_heads', 'transformer_depth',
                                  'norm_groups', 'context_dim', 'text_vocab_size', 'text_context_length',
                                  'text_width', 'text_layers', 'text_heads', 'timesteps'))
        check_choice('first_stage', self.first_stage, owner, ('patch', 'kl-f8'))
        check_choice('parameterization', self.parameterization, owner, ('eps', 'x0', 'v'))
        check_real('scale_factor', self.scale_factor, owner, min_value=0, min_inclusive=False)
        check_rate('dropout', self.dropout, owner)
        check_real('linear_start', self.linear_start, owner, min_value=0, min_inclusive=False)
        check_real('linear_end', self.linear_end, owner, min_value=self.linear_start, min_inclusive=False)
        if not self.channel_mult or not all(isinstance(m, int) and m > 0 for m in self.channel_mult):
            raise ValueError(f"For '{owner}', the 'channel_mult' must be a non-empty list of positive ints, but got "
                             f"{list(self.channel_mult)}.")
        if self.image_size % (self.latent_factor * 2 ** (len(self.channel_mult) - 1)):
            raise ValueError(f"For '{owner}', the 'image_size' ({self.image_size}) must be divisible by "
                             f"'latent_factor' * 2 ** (len(channel_mult) - 1) "
                             f"({self.latent_factor * 2 ** (len(self.channel_mult) - 1)}).")
        if self.first_stage == 'patch' and self.latent_channels != self.image_channels * self.latent_factor ** 2:
            raise ValueError(f"For '{owner}', with first_stage 'patch' the 'latent_channels' must be "
                             f"image_channels * latent_factor ** 2 = "
                             f"{self.image_channels * self.latent_factor ** 2}, but got {self.latent_channels}.")
        for mult in self.channel_mult:
            channels = self.model_channels * mult
            if channels % self.norm_groups or channels % self.num_heads:
                raise ValueError(f"For '{owner}', every level's channels (model_channels * channel_mult = "
                                 f"{channels}) must be divisible by 'norm_groups' ({self.norm_groups}) and "
                                 f"'num_heads' ({self.num_heads}).")
        if self.text_width % self.text_heads:
            raise ValueError(f"For '{owner}', the 'text_width' ({self.text_width}) must be divisible by "
                             f"'text_heads' ({self.text_heads}).")

    @property
    def latent_size(self):
        return self.image_size // self.latent_factor


# 100 diffusion steps with the betas scaled x10, so the last step is (almost) pure noise as with 1000 steps:
# abar_T = 0.0038 (the 1000-step schedule: 0.0047; the 1000-step betas over 100 steps would leave abar_T = 0.58).
TINY_CONFIG = dict(image_size=16, image_channels=3, first_stage='patch', latent_factor=2, latent_channels=12,
                   scale_factor=1.0, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                   attention_resolutions=[2], num_heads=2, transformer_depth=1, norm_groups=8, dropout=0.0,
                   context_dim=32, text_vocab_size=32, text_context_length=12, text_width=32, text_layers=2,
                   text_heads=2, timesteps=100, linear_start=0.0085, linear_end=0.12, parameterization='x0')

# Wukong-Huahua v1 (512x512 images, Stable-Diffusion-v1 UNet, Chinese CLIP-style text encoder), for Ascend.
FULL_CONFIG = dict(image_size=512, image_channels=3, first_stage='kl-f8', latent_factor=8, latent_channels=4,
                   scale_factor=0.18215, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2,
                   attention_resolutions=[4, 2, 1], num_heads=8, transformer_depth=1, norm_groups=32, dropout=0.0,
                   context_dim=768, text_vocab_size=49408, text_context_length=77, text_width=768, text_layers=12,
                   text_heads=12, timesteps=1000, linear_start=0.00085, linear_end=0.012)


def _conv(in_channels, out_channels, kernel, stride=1, zero=False):
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, pad_mode='pad', padding=kernel // 2,
                     has_bias=True, weight_init='zeros' if zero else 'he_uniform')


def _dense(in_channels, out_channels, has_bias=True, zero=False):
    return nn.Dense(in_channels, out_channels, has_bias=has_bias,
                    weight_init='zeros' if zero else Normal(0.02))


class CrossAttention(nn.Cell):
    """Multi-head attention of ``x`` over ``context`` (self-attention when ``context`` is None).

    Projections ``to_q`` (query_dim -> inner), ``to_k``/``to_v`` (context_dim -> inner), ``to_out``
    (inner -> query_dim), inner = heads * dim_head.

    Inputs: x ``(B, N, query_dim)``, context ``(B, M, context_dim)`` or None. Output: ``(B, N, query_dim)``.
    """

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.to_q = _dense(query_dim, inner, has_bias=False)
        self.to_k = _dense(context_dim, inner, has_bias=False)
        self.to_v = _dense(context_dim, inner, has_bias=False)
        self.to_out = _dense(inner, query_dim)
        self.dropout = nn.Dropout(p=dropout)

    def _heads(self, x):
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, self.heads, self.dim_head).transpose(0, 2, 1, 3)

    def construct(self, x, context=None):
        if context is None:
            context = x
        q = self._heads(self.to_q(x))
        k = self._heads(self.to_k(context))
        v = self._heads(self.to_v(context))
        probs = ops.softmax((ops.matmul(q, k.transpose(0, 1, 3, 2)) * self.scale).astype(mstype.float32), axis=-1)
        out = ops.matmul(probs.astype(v.dtype), v).transpose(0, 2, 1, 3)
        batch, seq, _, _ = out.shape
        return self.dropout(self.to_out(out.reshape(batch, seq, self.heads * self.dim_head)))


class GEGLU(nn.Cell):
    """``a * gelu(b)`` where ``[a, b] = proj(x)`` (the SD feed-forward input)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = _dense(dim_in, dim_out * 2)

    def construct(self, x):
        hidden, gate = ops.chunk(self.proj(x), 2, axis=-1)
        return hidden * ops.gelu(gate, approximate='none')


class FeedForward(nn.Cell):
    """``net.0`` GEGLU(dim -> 4 dim), dropout, ``net.2`` Dense(4 dim -> dim)."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.net = nn.SequentialCell([GEGLU(dim, dim * mult), nn.Dropout(p=dropout), _dense(dim * mult, dim)])

    def construct(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Cell):
    """Self-attention (``attn1``), cross-attention over the text (``attn2``), feed-forward; pre-LayerNorm."""

    def __init__(self, dim, heads, dim_head, context_dim, dropout=0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm((dim,), epsilon=1e-5)
        self.norm2 = nn.LayerNorm((dim,), epsilon=1e-5)
        self.norm3 = nn.LayerNorm((dim,), epsilon=1e-5)

    def construct(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Cell):
    """Feature map ``(B, C, H, W)`` -> tokens -> transformer blocks with cross-attention -> ``(B, C, H, W)`` + input.

    ``proj_out`` starts at zero, so a fresh block is the identity.
    """

    def __init__(self, channels, heads, dim_head, depth, context_dim, groups, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = _conv(channels, inner, 1)
        self.transformer_blocks = nn.CellList([BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout)
                                               for _ in range(depth)])
        self.proj_out = _conv(inner, channels, 1, zero=True)

    def construct(self, x, context):
        batch, _, height, width = x.shape
        h = self.proj_in(self.norm(x))
        inner = h.shape[1]
        h = h.reshape(batch, inner, height * width).transpose(0, 2, 1)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(0, 2, 1).reshape(batch, inner, height, width)
        return self.proj_out(h) + x


class ResBlock(nn.Cell):
    """GroupNorm-SiLU-Conv, plus the projected timestep embedding, GroupNorm-SiLU-Dropout-Conv, and a skip path."""

    def __init__(self, channels, emb_channels, out_channels, groups, dropout=0.0):
        super().__init__()
        self.in_layers = nn.SequentialCell([nn.GroupNorm(groups, channels), nn.SiLU(),
                                            _conv(channels, out_channels, 3)])
        self.emb_layers = nn.SequentialCell([nn.SiLU(), _dense(emb_channels, out_channels)])
        self.out_layers = nn.SequentialCell([nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                             _conv(out_channels, out_channels, 3, zero=True)])
        self.use_skip_conv = channels != out_channels
        if self.use_skip_conv:
            self.skip_connection = _conv(channels, out_channels, 1)

    def construct(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).expand_dims(-1).expand_dims(-1)
        h = self.out_layers(h)
        skip = self.skip_connection(x) if self.use_skip_conv else x
        return skip + h


class Downsample(nn.Cell):
    """Stride-2 3x3 convolution (``op``)."""

    def __init__(self, channels):
        super().__init__()
        self.op = _conv(channels, channels, 3, stride=2)

    def construct(self, x):
        return self.op(x)


class Upsample(nn.Cell):
    """Nearest-neighbour 2x upsampling (broadcast + reshape: same ops on every backend), then a 3x3 ``conv``."""

    def __init__(self, channels):
        super().__init__()
        self.conv = _conv(channels, channels, 3)

    def construct(self, x):
        batch, channels, height, width = x.shape
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = ops.broadcast_to(x, (batch, channels, height, 2, width, 2))
        return self.conv(x.reshape(batch, channels, height * 2, width * 2))


class TimestepEmbedSequential(nn.SequentialCell):
    """Layers run in order; ResBlocks also get the timestep embedding, SpatialTransformers the text context.

    Parameter paths are ``<block>.<index>...`` as in the LDM code.
    """

    def construct(self, x, emb, context):
        for layer in self.cell_list:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def timestep_frequencies(dim, max_period=10000):
    """The ``dim // 2`` frequencies of the sinusoidal timestep embedding (float32 numpy)."""
    half = dim // 2
    return np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half).astype(np.float32)


class UNetModel(nn.Cell):
    """The denoising UNet: ``(x_t (B, C, h, w), t (B,) int, context (B, M, context_dim)) -> eps (B, C, h, w)``."""

    def __init__(self, cfg):
        super().__init__()
        mc, groups, heads = cfg.model_channels, cfg.norm_groups, cfg.num_heads
        emb_dim = mc * 4
        self.freqs = Tensor(timestep_frequencies(mc))
        self.time_embed = nn.SequentialCell([_dense(mc, emb_dim), nn.SiLU(), _dense(emb_dim, emb_dim)])

        def attention(ch):
            return SpatialTransformer(ch, heads, ch // heads, cfg.transformer_depth, cfg.context_dim, groups,
                                      cfg.dropout)

        blocks = [TimestepEmbedSequential([_conv(cfg.latent_channels, mc, 3)])]
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mc * mult, groups, cfg.dropout)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2
        self.input_blocks = nn.CellList(blocks)
        self.middle_block = TimestepEmbedSequential([ResBlock(ch, emb_dim, ch, groups, cfg.dropout), attention(ch),
                                                     ResBlock(ch, emb_dim, ch, groups, cfg.dropout)])
        blocks = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for index in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, groups, cfg.dropout)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                if level and index == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                blocks.append(TimestepEmbedSequential(layers))
        self.output_blocks = nn.CellList(blocks)
        self.out = nn.SequentialCell([nn.GroupNorm(groups, ch), nn.SiLU(),
                                      _conv(mc, cfg.latent_channels, 3, zero=True)])

    def construct(self, x, timesteps, context):
        args = timesteps.astype(mstype.float32).expand_dims(-1) * self.freqs.expand_dims(0)
        emb = self.time_embed(ops.concat((ops.cos(args), ops.sin(args)), axis=-1))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        # Read the skips back to front by index (list.pop is not a plain pop in graph mode).
        index = len(skips) - 1
        for block in self.output_blocks:
            h = block(ops.concat((h, skips[index]), axis=1), emb, context)
            index = index - 1
        return self.out(h)


class TextAttention(nn.Cell):
    """Causal multi-head self-attention of the text encoder (``q_proj``/``k_proj``/``v_proj``/``out_proj``)."""

    def __init__(self, width, heads, context_length):
        super().__init__()
        self.heads = heads
        self.dim_head = width // heads
        self.q_proj = _dense(width, width)
        self.k_proj = _dense(width, width)
        self.v_proj = _dense(width, width)
        self.out_proj = _dense(width, width)
        causal = np.triu(np.full((context_length, context_length), -10000.0, np.float32), k=1)
        self.causal_mask = Tensor(causal)

    def _heads(self, x):
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, self.heads, self.dim_head).transpose(0, 2, 1, 3)

    def construct(self, x):
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) * (self.dim_head ** -0.5) + self.causal_mask
        out = ops.matmul(ops.softmax(scores.astype(mstype.float32), axis=-1).astype(v.dtype), v)
        batch, _, seq, _ = out.shape
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, seq, self.heads * self.dim_head))


class TextMLP(nn.Cell):
    """``c_proj(gelu(c_fc(x)))`` with a 4x hidden width."""

    def __init__(self, width):
        super().__init__()
        self.c_fc = _dense(width, width * 4)
        self.c_proj = _dense(width * 4, width)

    def construct(self, x):
        return self.c_proj(ops.gelu(self.c_fc(x), approximate='none'))


class TextResidualBlock(nn.Cell):
    """CLIP-style block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` with ``mlp.c_fc``/``mlp.c_proj``."""

    def __init__(self, width, heads, context_length):
        super().__init__()
        self.ln_1 = nn.LayerNorm((width,), epsilon=1e-5)
        self.attn = TextAttention(width, heads, context_length)
        self.ln_2 = nn.LayerNorm((width,), epsilon=1e-5)
        self.mlp = TextMLP(width)

    def construct(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Cell):
    """Token + position embeddings, causal transformer, final LayerNorm: ids ``(B, L)`` -> ``(B, L, width)``."""

    def __init__(self, cfg):
        super().__init__()
        # Unit-scale token embeddings: with CLIP's N(0, 0.02) a text encoder trained from scratch (tiny config) let its
        # trained biases swamp the tokens, and its output became caption-independent (|cond - uncond| = 0).
        self.token_embedding = nn.Embedding(cfg.text_vocab_size, cfg.text_width, embedding_table=Normal(1.0))
        self.positional_embedding = Parameter(
            initializer(Normal(0.01), (cfg.text_context_length, cfg.text_width), mstype.float32),
            name='positional_embedding')
        self.resblocks = nn.CellList([TextResidualBlock(cfg.text_width, cfg.text_heads, cfg.text_context_length)
                                      for _ in range(cfg.text_layers)])
        self.ln_final = nn.LayerNorm((cfg.text_width,), epsilon=1e-5)

    def construct(self, token_ids):
        x = self.token_embedding(token_ids) + self.positional_embedding
        for block in self.resblocks:
            x = block(x)
        return self.ln_final(x)


class TextEncoder(nn.Cell):
    """Conditioning stage (``cond_stage_model``): text transformer, then a projection to ``context_dim`` when the
    widths differ."""

    def __init__(self, cfg):
        super().__init__()
        self.transformer = TextTransformer(cfg)
        self.use_proj = cfg.text_width != cfg.context_dim
        if self.use_proj:
            self.proj = _dense(cfg.text_width, cfg.context_dim, has_bias=False)

    def construct(self, token_ids):
        x = self.transformer(token_ids)
        return self.proj(x) if self.use_proj else x


class DiffusionWrapper(nn.Cell):
    """Holds the UNet as ``diffusion_model`` (the LDM parameter path ``model.diffusion_model``)."""

    def __init__(self, cfg):
        super().__init__()
        self.diffusion_model = UNetModel(cfg)

    def construct(self, x, timesteps, context):
        return self.diffusion_model(x, timesteps, context)


class LatentDiffusion(nn.Cell):
    """The denoiser conditioned on text: ``(x_t (B, C, h, w), t (B,) int32, token_ids (B, L) int32) -> eps``.

    Args:
        config (WukongConfig | dict): dimensions (:data:`TINY_CONFIG`, :data:`FULL_CONFIG`).

    Example:
        >>> net = LatentDiffusion(TINY_CONFIG)
        >>> x = ms.Tensor(np.zeros((2, 12, 8, 8), np.float32))
        >>> net(x, ms.Tensor([1, 50], ms.int32), ms.Tensor(np.ones((2, 12), np.int32))).shape
        (2, 12, 8, 8)
    """

    def __init__(self, config):
        super().__init__()
        self.config = config if isinstance(config, WukongConfig) else WukongConfig.from_dict(config)
        self.cond_stage_model = TextEncoder(self.config)
        self.model = DiffusionWrapper(self.config)

    def construct(self, x_t, timesteps, token_ids):
        return self.model(x_t, timesteps, self.cond_stage_model(token_ids))


class NoiseSchedule:
    """The LDM "linear" schedule: ``beta_t = (sqrt(start) + t / (T - 1) (sqrt(end) - sqrt(start)))^2``.

    ``alphas_cumprod[t] = prod_{s <= t} (1 - beta_s)``; numpy float64 arrays of length ``T``.

    Example:
        >>> NoiseSchedule(1000).alphas_cumprod[-1] < 0.01
        True
    """

    def __init__(self, timesteps, linear_start=0.00085, linear_end=0.012):
        self.timesteps = check_int('timesteps', timesteps, 'NoiseSchedule')
        self.betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.timesteps, cfg.linear_start, cfg.linear_end)

    def q_sample(self, z0, t, noise):
        """NumPy ``sqrt(abar_t) z0 + sqrt(1 - abar_t) noise`` for a batch (``t``: ints of shape ``(B,)``)."""
        abar = self.alphas_cumprod[np.asarray(t)].reshape(-1, *([1] * (np.ndim(z0) - 1)))
        return (np.sqrt(abar) * z0 + np.sqrt(1.0 - abar) * noise).astype(np.float32)


class DiffusionWithLoss(nn.Cell):
    """Training loss: mean squared error between the model's output and its target - the noise (parameterization
    'eps', Wukong-Huahua's), the clean latents ('x0') or ``v = sqrt(abar_t) noise - sqrt(1 - abar_t) latents``.

    Inputs:
        latents (Tensor): clean latents ``z0`` ``(B, C, h, w)`` (already scaled by ``scale_factor``).
        token_ids (Tensor): int32 ``(B, L)`` caption ids.
        timesteps (Tensor): int32 ``(B,)`` in ``[0, T)``.
        noise (Tensor): ``(B, C, h, w)`` standard normal noise.

    The timesteps and noise come from the data pipeline (seeded NumPy), which keeps runs reproducible and the
    graph free of random operators.

    Output: scalar float32 loss.
    """

    def __init__(self, network, schedule=None):
        # auto_prefix=False: wrapping must not rename the network's parameters (checkpoint names).
        super().__init__(auto_prefix=False)
        self.network = network
        schedule = NoiseSchedule.from_config(network.config) if schedule is None else schedule
        self.sqrt_abar = Tensor(np.sqrt(schedule.alphas_cumprod).astype(np.float32))
        self.sqrt_one_minus_abar = Tensor(np.sqrt(1.0 - schedule.alphas_cumprod).astype(np.float32))
        self.parameterization = network.config.parameterization

    def construct(self, latents, token_ids, timesteps, noise):
        shape = (-1, 1, 1, 1)
        x_t = (ops.gather(self.sqrt_abar, timesteps, 0).reshape(shape) * latents
               + ops.gather(self.sqrt_one_minus_abar, timesteps, 0).reshape(shape) * noise)
        prediction = self.network(x_t, timesteps, token_ids).astype(mstype.float32)
        if self.parameterization == 'eps':
            target = noise
        elif self.parameterization == 'x0':
            target = latents
        else:
            target = (ops.gather(self.sqrt_abar, timesteps, 0).reshape(shape) * noise
                      - ops.gather(self.sqrt_one_minus_abar, timesteps, 0).reshape(shape) * latents)
        return ops.mse_loss(prediction, target.astype(mstype.float32))


class DDIMSampler:
    """Deterministic DDIM sampling (eta = 0) with optional classifier-free guidance.

    Each step: ``eps = eps_u + g (eps_c - eps_u)``; ``z0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)``;
    ``x <- sqrt(a_prev) z0 + sqrt(1 - a_prev) eps`` (with parameterization 'x0' the guided output is ``z0`` and
    ``eps = (x - sqrt(a_t) z0) / sqrt(1 - a_t)``). The network runs once per step on a fixed-shape batch, so
    a compiled graph is reused for every step and every call with the same batch size.

    Args:
        network (LatentDiffusion): the denoiser.
        schedule (NoiseSchedule | None): default: from the network's config.
        clip_x0 (float | None): clip each step's ``z0`` estimate to ``[-clip_x0, clip_x0]`` (and recompute ``eps``
            from it), as LDM's ``clip_denoised``. For latents known to be bounded (the tiny config's patch codec:
            ``scale_factor``); it keeps an early, imprecise ``z0`` estimate (amplified by ``1 / sqrt(abar_T)``,
            16x in the tiny schedule) from blowing up. None: no clipping (VAE latents are not bounded).

    Example:
        >>> sampler = DDIMSampler(net, clip_x0=1.0)
        >>> latents = sampler.sample(ids, num_steps=10, seed=0)  # doctest: +SKIP
    """

    def __init__(self, network, schedule=None, clip_x0=None):
        self.network = network
        self.schedule = NoiseSchedule.from_config(network.config) if schedule is None else schedule
        if clip_x0 is not None:
            check_real('clip_x0', clip_x0, 'DDIMSampler', min_value=0, min_inclusive=False)
        self.clip_x0 = clip_x0

    def timesteps(self, num_steps):
        """The ``num_steps`` timesteps visited, from high noise to low (ints in ``[0, T)``)."""
        check_int('num_steps', num_steps, 'DDIMSampler', max_value=self.schedule.timesteps)
        return np.linspace(self.schedule.timesteps - 1, 0, num_steps).round().astype(np.int32)

    def sample(self, token_ids, num_steps=10, seed=0, guidance_scale=1.0, uncond_ids=None):
        """Sample latents for ``token_ids`` (int32 numpy ``(B, L)``); returns float32 numpy ``(B, C, h, w)``.

        With ``guidance_scale != 1`` the unconditional prediction uses ``uncond_ids`` (e.g. the empty caption).
        """
        check_real('guidance_scale', guidance_scale, 'DDIMSampler', min_value=0)
        token_ids = np.asarray(token_ids, np.int32)
        cfg = self.network.config
        batch = token_ids.shape[0]
        guided = guidance_scale != 1.0
        if guided:
            if uncond_ids is None:
                raise ValueError("For 'DDIMSampler', 'uncond_ids' is needed when 'guidance_scale' is not 1.")
            token_ids = np.concatenate([np.broadcast_to(np.asarray(uncond_ids, np.int32), token_ids.shape),
                                        token_ids])
        rng = np.random.RandomState(seed)
        x = rng.standard_normal((batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size)).astype(np.float32)
        abar = self.schedule.alphas_cumprod
        steps = self.timesteps(num_steps)
        ids = Tensor(token_ids)
        self.network.set_train(False)
        for index, t in enumerate(steps):
            x_in = np.concatenate([x, x]) if guided else x
            t_in = np.full((x_in.shape[0],), t, np.int32)
            out = self.network(Tensor(x_in), Tensor(t_in), ids).asnumpy().astype(np.float64)
            if guided:
                out = out[:batch] + guidance_scale * (out[batch:] - out[:batch])
            a_t = abar[t]
            a_prev = abar[steps[index + 1]] if index + 1 < len(steps) else 1.0
            if cfg.parameterization == 'eps':
                eps = out
                z0 = (x - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)
            elif cfg.parameterization == 'v':
                eps = np.sqrt(1.0 - a_t) * x + np.sqrt(a_t) * out
                z0 = np.sqrt(a_t) * x - np.sqrt(1.0 - a_t) * out
            else:
                z0 = out
            if self.clip_x0 is not None or cfg.parameterization == 'x0':
                if self.clip_x0 is not None:
                    z0 = np.clip(z0, -self.clip_x0, self.clip_x0)
                eps = (x - np.sqrt(a_t) * z0) / np.sqrt(1.0 - a_t)
            x = (np.sqrt(a_prev) * z0 + np.sqrt(1.0 - a_prev) * eps).astype(np.float32)
        return x


__all__ = ['WukongConfig', 'TINY_CONFIG', 'FULL_CONFIG', 'CrossAttention', 'SpatialTransformer', 'ResBlock',
           'UNetModel', 'TextEncoder', 'LatentDiffusion', 'NoiseSchedule', 'DiffusionWithLoss', 'DDIMSampler',
           'timestep_frequencies']
