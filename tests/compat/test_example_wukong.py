"""The Wukong-Huahua example: cross-attention against NumPy, the noise-prediction loss, the DDIM sampler (incl.
classifier-free guidance), LoRA on the cross-attention projections and a short training run in GRAPH_MODE, and the
generated image-caption data."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from examples.common import read_png
from examples.wukong_huahua.data import (CAPTION_VOCAB, STYLES, CaptionTokenizer, all_captions, diffusion_arrays,
                                         diffusion_dataset, make_caption_set, patch_decode, patch_encode,
                                         save_sample_grid)
from examples.wukong_huahua.model import (FULL_CONFIG, TINY_CONFIG, CrossAttention, DDIMSampler, DiffusionWithLoss,
                                          LatentDiffusion, NoiseSchedule, WukongConfig)
from mindpet.graph import freeze_delta
from tests.example_helpers import (changed_names, graph, snapshot, swap_dense_for_lora,  # noqa: F401 (fixture)
                                   train_steps, trainable_names)


def test_configs():
    full = WukongConfig.from_dict(FULL_CONFIG)
    assert (full.latent_size, full.latent_channels, full.model_channels, full.context_dim) == (64, 4, 320, 768)
    assert full.channel_mult == (1, 2, 4, 4) and full.attention_resolutions == (4, 2, 1)
    tiny = WukongConfig.from_dict(TINY_CONFIG)
    assert tiny.latent_size == 8 and tiny.text_vocab_size >= len(CAPTION_VOCAB)
    assert WukongConfig.from_dict(tiny.to_dict()) == tiny
    with pytest.raises(ValueError, match="'latent_channels' must be image_channels \\* latent_factor \\*\\* 2 = 12"):
        WukongConfig.from_dict(dict(TINY_CONFIG, latent_channels=4))
    with pytest.raises(ValueError, match="unknown key 'contex_dim'; did you mean 'context_dim'\\?"):
        WukongConfig.from_dict({'contex_dim': 8})
    with pytest.raises(ValueError, match="'first_stage'"):
        WukongConfig.from_dict(dict(TINY_CONFIG, first_stage='vae'))
    schedule = NoiseSchedule(1000)
    assert abs(schedule.betas[0] - 0.00085) < 1e-12 and abs(schedule.betas[-1] - 0.012) < 1e-12
    assert np.all(np.diff(schedule.alphas_cumprod) < 0)
    # Sampling starts from pure noise, so the last step must be (almost) pure noise in both configs.
    for config in (full, tiny):
        assert NoiseSchedule.from_config(config).alphas_cumprod[-1] < 0.005


def _numpy_cross_attention(att, x, ctx):
    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], att.heads, att.dim_head).transpose(0, 2, 1, 3)

    q = heads(x @ att.to_q.weight.asnumpy().T)
    k = heads(ctx @ att.to_k.weight.asnumpy().T)
    v = heads(ctx @ att.to_v.weight.asnumpy().T)
    scores = q @ k.transpose(0, 1, 3, 2) * att.dim_head ** -0.5
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
    return out @ att.to_out.weight.asnumpy().T + att.to_out.bias.asnumpy()


def test_cross_attention_matches_numpy(graph):
    rng = np.random.RandomState(0)
    att = CrossAttention(query_dim=8, context_dim=6, heads=2, dim_head=4)
    x, ctx = rng.randn(2, 5, 8).astype(np.float32), rng.randn(2, 3, 6).astype(np.float32)
    np.testing.assert_allclose(att(Tensor(x), Tensor(ctx)).asnumpy(), _numpy_cross_attention(att, x, ctx),
                               rtol=1e-5, atol=1e-5)
    att.to_k.weight.set_data(Tensor(rng.randn(8, 6).astype(np.float32)))
    np.testing.assert_allclose(att(Tensor(x), Tensor(ctx)).asnumpy(), _numpy_cross_attention(att, x, ctx),
                               rtol=1e-5, atol=1e-5)


def _as_if_trained(net, rng):
    """Give the zero-initialised output convolutions small random weights (as in a trained model), so every
    sub-layer - including the cross-attention - influences the output and receives gradients."""
    for param in net.get_parameters():
        if param.name.endswith('weight') and not param.asnumpy().any():
            param.set_data(Tensor((rng.randn(*param.shape) * 0.05).astype(np.float32)))


def test_loss_sampler_lora_and_training(graph):
    ms.set_seed(0)
    rng = np.random.RandomState(0)
    cfg = WukongConfig.from_dict(dict(TINY_CONFIG, parameterization='eps'))
    net = LatentDiffusion(cfg)
    _as_if_trained(net, rng)
    schedule = NoiseSchedule.from_config(cfg)
    latents, ids, steps, noise = (a[:4] for a in diffusion_arrays(cfg, 'warm', 8, seed=0, uncond_prob=0.0))

    x_t = schedule.q_sample(latents, steps, noise)
    eps = net(Tensor(x_t), Tensor(steps), Tensor(ids)).asnumpy()
    assert eps.shape == latents.shape

    # DDIM with a zero noise prediction: every step rescales x by sqrt(a_prev / a_t), so the result is
    # x_T / sqrt(abar[T - 1]) (set after compilation: the final convolution is zeroed with set_data).
    sampler = DDIMSampler(net)
    assert sampler.timesteps(5).tolist() == [99, 74, 50, 25, 0]
    out_conv = net.model.diffusion_model.out[2]
    weight, bias = out_conv.weight.asnumpy().copy(), out_conv.bias.asnumpy().copy()
    out_conv.weight.set_data(Tensor(np.zeros_like(weight)))
    out_conv.bias.set_data(Tensor(np.zeros_like(bias)))
    sampled = sampler.sample(ids, num_steps=5, seed=3)
    x_start = np.random.RandomState(3).standard_normal(latents.shape)
    np.testing.assert_allclose(sampled, x_start / np.sqrt(schedule.alphas_cumprod[99]), rtol=1e-5, atol=1e-5)
    out_conv.weight.set_data(Tensor(weight))
    out_conv.bias.set_data(Tensor(bias))

    # Classifier-free guidance with the unconditional ids equal to the captions is the plain conditional sample;
    # the guided batch of 2 runs as a batch of 4 (the compiled graph is reused).
    guided = sampler.sample(ids[:2], num_steps=3, seed=4, guidance_scale=5.0, uncond_ids=ids[:2])
    plain = sampler.sample(np.concatenate([ids[:2], ids[:2]]), num_steps=3, seed=4)[:2]
    np.testing.assert_allclose(guided, plain, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="'uncond_ids' is needed"):
        sampler.sample(ids[:2], guidance_scale=2.0)

    # LoRA on the cross-attention projections (attn2.to_q/to_k/to_v/to_out) of all 4 spatial transformers.
    # (The network output is unchanged at init: the first training loss below equals the base model's.)
    swapped = swap_dense_for_lora(net, {'to_q', 'to_k', 'to_v', 'to_out'}, rank=4, alpha=4, within='attn2')
    assert len(swapped) == 16 and all('.attn2.' in path for path in swapped)
    assert 'model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_out' in swapped

    freeze_delta(net, 'lora')
    assert len(trainable_names(net)) == 32
    before = snapshot(net)
    batch = (Tensor(latents), Tensor(ids), Tensor(steps), Tensor(noise))
    losses = train_steps(DiffusionWithLoss(net), [batch] * 12, learning_rate=3e-2)
    # Loss = mean (eps_theta(x_t) - noise)^2 with x_t = sqrt(abar) z0 + sqrt(1 - abar) noise, from the base eps.
    np.testing.assert_allclose(losses[0], np.mean((eps - noise) ** 2), rtol=1e-5)
    assert losses[-1] < 0.9 * losses[0], losses
    assert changed_names(before) == trainable_names(net)


# ----- data -----------------------------------------------------------------------------------------------------
def test_caption_set_styles_and_tokenizer():
    images, captions = make_caption_set('warm', 45, seed=1)
    again, captions_again = make_caption_set('warm', 45, seed=1)
    np.testing.assert_array_equal(images, again)
    assert captions == captions_again and sorted(set(captions[:40])) == sorted(all_captions())
    assert images.shape == (45, 3, 16, 16) and images.dtype == np.float32
    assert images.min() >= -1 and images.max() <= 1
    per_image = {s: make_caption_set(s, 40, seed=0)[0].mean(axis=(2, 3)) for s in STYLES}  # (40, RGB)
    mean = {s: v.mean(axis=0) for s, v in per_image.items()}
    assert mean['warm'][0] > mean['warm'][2] + 0.4 and mean['cool'][2] > mean['cool'][0] + 0.2
    assert np.abs(mean['warm'] - mean['cool']).max() > 0.8
    # The base set spans all palettes; each style is one palette.
    assert per_image['base'].std(axis=0).min() > 0.3
    assert per_image['warm'].std(axis=0).max() < 0.15 and per_image['cool'].std(axis=0).max() < 0.15
    with pytest.raises(ValueError, match="'style'"):
        make_caption_set('pastel', 4)
    tok = CaptionTokenizer(12)
    ids = tok.encode(['a large triangle at the bottom right', '', 'a purple blob'])
    assert ids[0].tolist() == [1, 4, 13, 10, 5, 6, 15, 17, 2, 0, 0, 0]
    assert ids[1].tolist() == [1, 2] + [0] * 10
    assert ids[2].tolist()[:5] == [1, 4, 3, 3, 2]


def test_patch_codec_and_pipeline(tmp_path):
    cfg = WukongConfig.from_dict(TINY_CONFIG)
    images, _ = make_caption_set('cool', 6, seed=0)
    latents = patch_encode(images, 2, 0.5)
    assert latents.shape == (6, 12, 8, 8)
    np.testing.assert_array_equal(latents[0, ::4, 0, 0], images[0, :, 0, 0] * 0.5)  # channel c * 4: offset (0, 0)
    np.testing.assert_allclose(patch_decode(latents, 2, 0.5), images, atol=1e-7)

    arrays = diffusion_arrays(cfg, 'cool', 20, seed=5, uncond_prob=0.25, repeats=3)
    again = diffusion_arrays(cfg, 'cool', 20, seed=5, uncond_prob=0.25, repeats=3)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, again))
    lat, ids, steps, noise = arrays
    assert lat.shape == (60, 12, 8, 8) and noise.shape == lat.shape and steps.dtype == np.int32
    assert steps.min() >= 0 and steps.max() < cfg.timesteps and len(set(steps.tolist())) > 30
    empty = (ids[:, 1] == 2).mean()
    assert 0.1 < empty < 0.4
    ds = diffusion_dataset(cfg, 'cool', 20, batch_size=8, seed=5, repeats=3)
    shapes = [tuple(t.shape for t in b) for b in ds.create_tuple_iterator(num_epochs=1)]
    assert len(shapes) == 7 and shapes[0] == ((8, 12, 8, 8), (8, 12), (8,), (8, 12, 8, 8))

    path = save_sample_grid(str(tmp_path / 'grid.png'), [images[:3], images[3:5]], upscale=2)
    grid = read_png(path)
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    expected = ((images[4].transpose(1, 2, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(grid[36:68:2, 36:68:2], expected)
    assert (grid[36:68, 70:102] == 255).all()  # the missing fifth tile is blank


class _EchoDenoiser(ms.nn.Cell):
    """Stands in for LatentDiffusion: returns ``scale * x_t`` (enough to check the loss and sampler formulas)."""

    def __init__(self, config, scale):
        super().__init__()
        self.config = config
        self.scale = scale

    def construct(self, x_t, timesteps, token_ids):
        return x_t * self.scale


@pytest.mark.parametrize('parameterization', ['eps', 'x0', 'v'])
def test_loss_and_sampler_formulas_per_parameterization(parameterization):
    cfg = WukongConfig.from_dict(dict(TINY_CONFIG, parameterization=parameterization))
    schedule = NoiseSchedule.from_config(cfg)
    rng = np.random.RandomState(1)
    latents, noise = rng.randn(2, 12, 8, 8).astype(np.float32), rng.randn(2, 12, 8, 8).astype(np.float32)
    steps = np.array([3, 80], np.int32)
    loss = DiffusionWithLoss(_EchoDenoiser(cfg, 0.5))(Tensor(latents), Tensor(np.zeros((2, 12), np.int32)),
                                                      Tensor(steps), Tensor(noise))
    abar = schedule.alphas_cumprod[steps].reshape(-1, 1, 1, 1)
    target = {'eps': noise, 'x0': latents, 'v': np.sqrt(abar) * noise - np.sqrt(1 - abar) * latents}[parameterization]
    np.testing.assert_allclose(float(loss.asnumpy()),
                               np.mean((0.5 * schedule.q_sample(latents, steps, noise) - target) ** 2), rtol=1e-5)
    # Sampler: a predictor of zero noise rescales x by sqrt(abar_prev / abar_t) each step; a predictor of z0 = 0
    # leaves x = 0 at the end; v = 0 means z0 = sqrt(abar_t) x, so every step multiplies x by
    # sqrt(abar_prev) sqrt(abar_t) + sqrt(1 - abar_prev) sqrt(1 - abar_t).
    sampled = DDIMSampler(_EchoDenoiser(cfg, 0.0)).sample(np.zeros((2, 12), np.int32), num_steps=4, seed=2)
    x_start = np.random.RandomState(2).standard_normal(sampled.shape)
    abar = schedule.alphas_cumprod
    if parameterization == 'eps':
        expected = x_start / np.sqrt(abar[99])
    elif parameterization == 'x0':
        expected = 0 * x_start
    else:
        visited = [abar[t] for t in DDIMSampler(_EchoDenoiser(cfg, 0.0)).timesteps(4)] + [1.0]
        factor = np.prod([np.sqrt(p * a) + np.sqrt((1 - p) * (1 - a)) for a, p in zip(visited, visited[1:])])
        expected = factor * x_start
    np.testing.assert_allclose(sampled, expected, rtol=1e-5, atol=1e-6)


class _OracleDenoiser(ms.nn.Cell):
    """The ideal denoiser of a one-point data set ``z0``: returns what the parameterization asks for, exactly
    (``eps = (x_t - sqrt(abar_t) z0) / sqrt(1 - abar_t)``, ``z0``, or
    ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0``)."""

    def __init__(self, config, z0):
        super().__init__()
        self.config = config
        abar = NoiseSchedule.from_config(config).alphas_cumprod
        self.sqrt_abar = Tensor(np.sqrt(abar).astype(np.float32))
        self.sqrt_one_minus = Tensor(np.sqrt(1 - abar).astype(np.float32))
        self.z0 = Tensor(z0)

    def construct(self, x_t, timesteps, token_ids):
        a = ms.ops.gather(self.sqrt_abar, timesteps, 0).reshape((-1, 1, 1, 1))
        s = ms.ops.gather(self.sqrt_one_minus, timesteps, 0).reshape((-1, 1, 1, 1))
        eps = (x_t - a * self.z0) / s
        if self.config.parameterization == 'eps':
            return eps
        if self.config.parameterization == 'x0':
            return self.z0 + 0 * x_t
        return a * eps - s * self.z0


@pytest.mark.parametrize('parameterization', ['eps', 'x0', 'v'])
def test_ddim_with_an_oracle_denoiser_returns_its_x0(graph, parameterization):
    cfg = WukongConfig.from_dict(dict(TINY_CONFIG, parameterization=parameterization))
    z0 = np.clip(np.random.RandomState(5).randn(3, 12, 8, 8), -1, 1).astype(np.float32)
    oracle = _OracleDenoiser(cfg, z0)
    for steps, clip in ((10, None), (4, 1.0)):
        sampled = DDIMSampler(oracle, clip_x0=clip).sample(np.zeros((3, 12), np.int32), num_steps=steps, seed=1)
        np.testing.assert_allclose(sampled, z0, atol=1e-3)
    # Clipping: a denoiser whose z0 estimate is 5x too large ends inside [-clip, clip] (exactly the clipped z0).
    far = _OracleDenoiser(cfg, 5 * z0)
    sampled = DDIMSampler(far, clip_x0=0.5).sample(np.zeros((3, 12), np.int32), num_steps=4, seed=1)
    np.testing.assert_allclose(sampled, np.clip(5 * z0, -0.5, 0.5), atol=1e-3)
    with pytest.raises(ValueError, match="'clip_x0'"):
        DDIMSampler(oracle, clip_x0=-1.0)
