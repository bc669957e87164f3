"""The ``wukong_huahua`` task of ``mindpet finetune``: the latent-diffusion noise-prediction loss on one visual style
of the generated image-caption set, with DDIM samples to check the style.

Sizes: ``tiny`` (16x16 images, CPU) and ``full`` (Wukong-Huahua's dimensions, Ascend; needs
``model.base_checkpoint`` and precomputed VAE latents in ``data.latents``). The tiny model's output convolutions
start at zero (as in LDM), so an adapter on a freshly initialised model gets no gradient: without
``model.base_checkpoint`` the task first trains the whole model for ``model.pretrain_steps`` steps on the neutral
``base`` style, standing in for pretrained weights.

Evaluation: the held-out noise-prediction loss, and ``colour_error``, the distance (0-255 RGB units) between the
mean colour of DDIM samples for the style's captions and the mean colour of the style's own images.
"""
import numpy as np
from mindspore import Tensor

from examples.common import array_dataset
from examples.wukong_huahua.data import (STYLES, CaptionTokenizer, all_captions, diffusion_arrays, make_caption_set,
                                         patch_decode, save_sample_grid)
from examples.wukong_huahua.model import (WukongConfig, LatentDiffusion, DiffusionWithLoss, DDIMSampler, TINY_CONFIG,
                                          FULL_CONFIG)
from mindpet.train.schema import Field
from mindpet.train.task import Task, KeyValueError, shard_rows, train_base

EVAL_SEED_OFFSET = 1000


class WukongTask(Task):
    """Style fine-tuning of the latent-diffusion model (see the module docstring)."""
    name = 'wukong_huahua'
    sizes = {'tiny': TINY_CONFIG, 'full': FULL_CONFIG}
    model_fields = {
        'pretrain_steps': Field('int', 0, min_value=0,
                                doc="without base_checkpoint: steps of whole-model training on the 'base' style "
                                    "that make the base model"),
        'pretrain_learning_rate': Field('float', 0.002, min_value=0.0, min_exclusive=True,
                                        doc='Adam learning rate of that pre-training'),
    }
    data_fields = {
        'style': Field('str', 'warm', choices=STYLES, doc='the style the adapter learns'),
        'num_images': Field('int', 40, min_value=1, doc='images of the style (40 = every caption once)'),
        'repeats': Field('int', 4, min_value=1, doc='passes over the images, each with fresh timesteps and noise'),
        'uncond_prob': Field('float', 0.1, min_value=0.0, max_value=0.99,
                             doc='share of empty captions (classifier-free guidance)'),
        'seed': Field('int', 0, min_value=0, doc='seed of the images, timesteps and noise'),
        'latents': Field('path', None, doc="precomputed VAE latents: an .npz with 'latents' (N, C, h, w) and "
                                           "'token_ids' (N, L) (needed by the full size)"),
        'sample_steps': Field('int', 10, min_value=1, doc='DDIM steps of the evaluation samples'),
        'guidance_scale': Field('float', 3.0, min_value=0.0, doc='classifier-free guidance of the samples'),
        'eval_images': Field('int', 8, min_value=1, doc='captions sampled in the evaluation'),
    }
    metric = 'colour_error'
    metric_higher_is_better = False

    def __init__(self, model, data, seed=0):
        super().__init__(model, data, seed)
        if self.config.first_stage != 'patch':
            self.metric = 'loss'    # samples are latents: no colours to compare without the VAE decoder

    def model_config(self):
        return WukongConfig.from_dict(super().model_config())

    def check(self):
        if self.config.first_stage != 'patch' and self.data['latents'] is None:
            raise KeyValueError('data.latents', f"the '{self.model['size']}' model works on VAE latents "
                                f"({self.config.first_stage}); give precomputed latents")

    def base_checkpoint_required(self):
        return self.model['size'] != 'tiny'

    def build_network(self):
        return LatentDiffusion(self.config)

    # ----- data --------------------------------------------------------------------------------------------------
    def _arrays(self, style, seed, repeats):
        if self.data['latents'] is not None:
            files = np.load(self.data['latents'])
            latents = files['latents'].astype(np.float32)
            ids = files['token_ids'].astype(np.int32)
            rng = np.random.RandomState(seed)
            latents, ids = np.tile(latents, (repeats, 1, 1, 1)), np.tile(ids, (repeats, 1))
            steps = rng.randint(0, self.config.timesteps, size=len(latents)).astype(np.int32)
            return latents, ids, steps, rng.standard_normal(latents.shape).astype(np.float32)
        return diffusion_arrays(self.config, style, self.data['num_images'], seed, self.data['uncond_prob'],
                                repeats)

    def num_train_rows(self):
        return self.data['num_images'] * self.data['repeats']

    def train_dataset(self, batch_size, rank=0, group_size=1):
        columns = shard_rows(self._arrays(self.data['style'], self.data['seed'], self.data['repeats']), rank,
                             group_size)
        return array_dataset(columns, ['latents', 'token_ids', 'timesteps', 'noise'], batch_size, shuffle=True,
                             seed=self.seed, drop_remainder=True)

    def loss_cell(self, network, rdrop_alpha=0.0):
        # DiffusionWithLoss reads the model's config; a PetModel calls its base_model, which holds the adapters.
        return DiffusionWithLoss(getattr(network, 'base_model', network))

    # ----- base model --------------------------------------------------------------------------------------------
    def base_weights_source(self, path):
        if path is None and self.model['pretrain_steps']:
            return (f"pre-trained here on the 'base' style for {self.model['pretrain_steps']} steps at the start of "
                    f"the run")
        return path

    def load_base(self, network, path):
        if path is not None:
            return super().load_base(network, path)
        steps = self.model['pretrain_steps']
        if not steps:
            return None
        batch = 8
        rows = steps * batch
        columns = self._arrays('base', self.data['seed'] + 1, -(-rows // self.data['num_images']))
        batches = [tuple(c[start:start + batch] for c in columns) for start in range(0, rows, batch)]
        losses = train_base(network, DiffusionWithLoss(network), batches, self.model['pretrain_learning_rate'])
        return (f"pre-trained here on the 'base' style for {steps} steps (loss {losses[0]:.3f} -> "
                f"{np.mean(losses[-max(1, steps // 10):]):.3f})")

    # ----- evaluation --------------------------------------------------------------------------------------------
    def _eval_captions(self):
        captions = all_captions()
        picks = np.linspace(0, len(captions) - 1, self.data['eval_images']).round().astype(int)
        return [captions[i] for i in picks]

    def sample(self, network, captions, seed=0):
        """DDIM samples for ``captions``: float32 images ``(N, 3, H, W)`` in [-1, 1] (tiny) or latents (full)."""
        net = getattr(network, 'base_model', network)
        tokenizer = CaptionTokenizer(self.config.text_context_length)
        ids = tokenizer.encode(captions)
        uncond = tokenizer.encode([''] * len(captions))
        # The patch codec's latents lie in [-scale_factor, scale_factor]: clip the sampler's z0 estimates there.
        clip = self.config.scale_factor if self.config.first_stage == 'patch' else None
        latents = DDIMSampler(net, clip_x0=clip).sample(ids, num_steps=self.data['sample_steps'], seed=seed,
                                          guidance_scale=self.data['guidance_scale'], uncond_ids=uncond)
        if self.config.first_stage != 'patch':
            return latents
        images = patch_decode(latents, self.config.latent_factor, self.config.scale_factor,
                              self.config.image_channels)
        return np.clip(images, -1.0, 1.0)

    def style_colour(self, style):
        """Mean RGB (0-255) of the style's own images."""
        images, _ = make_caption_set(style, 40, seed=0, image_size=self.config.image_size)
        return (images.mean(axis=(0, 2, 3)) + 1.0) * 127.5

    def evaluate(self, network):
        latents, ids, steps, noise = self._arrays(self.data['style'], self.data['seed'] + EVAL_SEED_OFFSET, 1)
        loss_net = DiffusionWithLoss(getattr(network, 'base_model', network))
        loss_net.set_train(False)
        batch = 8
        rows = (len(latents) // batch) * batch or len(latents)
        losses = [float(loss_net(*[Tensor(c[start:start + batch]) for c in (latents, ids, steps, noise)]).asnumpy())
                  for start in range(0, rows, batch)]
        metrics = {'loss': float(np.mean(losses))}
        if self.config.first_stage == 'patch':
            images = self.sample(network, self._eval_captions())
            colour = (images.mean(axis=(0, 2, 3)) + 1.0) * 127.5
            metrics['colour_error'] = float(np.linalg.norm(colour - self.style_colour(self.data['style'])))
        return metrics

    def write_artifacts(self, network, output_dir):
        """``samples.png``: the style's own images (top row) and DDIM samples for the same captions (bottom)."""
        if self.config.first_stage != 'patch':
            return []
        import os  # pylint: disable=import-outside-toplevel
        captions = self._eval_captions()
        reference, reference_captions = make_caption_set(self.data['style'], 40, seed=0,
                                                         image_size=self.config.image_size)
        order = {caption: i for i, caption in enumerate(reference_captions)}
        path = os.path.join(output_dir, 'samples.png')
        save_sample_grid(path, [reference[[order[c] for c in captions]], self.sample(network, captions)])
        return [path]


TASK = WukongTask
