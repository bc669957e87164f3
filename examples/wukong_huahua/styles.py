"""Two styles, two LoRA adapters, one base model: train them with ``mindpet finetune`` and switch between them.

    python examples/wukong_huahua/styles.py                     # ~7.5 min on 2 shared CPU cores
    python examples/wukong_huahua/styles.py --output outputs/wukong_styles --lora-steps 120

1. the base model: full training of the tiny model on the neutral ``base`` style (``pet: {type: full}``);
2. one LoRA adapter per style (``warm``, ``cool``) on that base, from ``configs/wukong_huahua_lora_tiny.yaml``;
3. one model holding both adapters (``PetModel.from_pretrained`` + ``load_adapter``): the same captions and the
   same starting noise are sampled with the adapters disabled, with ``set_adapter('warm')`` and with
   ``set_adapter('cool')``; the rows go into ``styles.png`` (rows: base, warm, cool, then the two styles' own
   images for reference), and the mean colour of each row and the switch time are printed.
"""
import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CAPTIONS = ['a large circle in the center', 'a small square at the top left', 'a large triangle at the bottom right',
            'a large ring at the top right', 'a small circle at the bottom left', 'a large square in the center']


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'wukong_huahua_lora_tiny.yaml'))
    parser.add_argument('--output', default=os.path.join('outputs', 'wukong_styles'))
    parser.add_argument('--base-steps', type=int, default=250, help='steps of base-model training')
    parser.add_argument('--base-lr', type=float, default=0.003)
    parser.add_argument('--lora-steps', type=int, default=80, help='steps of each style adapter')
    parser.add_argument('--lora-lr', type=float, default=0.01)
    parser.add_argument('--base', default=None, help='an existing base model.ckpt (skips step 1)')
    parser.add_argument('--set', dest='sets', action='append', default=[],
                        help='extra --set for the two adapter runs (e.g. "pet.target_modules=[\'.*to_(q|v)\']")')
    return parser.parse_args(argv)


def mean_colour(images):
    """Mean RGB (0-255) of float images ``(N, 3, H, W)`` in [-1, 1]."""
    return (np.asarray(images).mean(axis=(0, 2, 3)) + 1.0) * 127.5


def main(argv=None):
    args = parse_args(argv)
    from mindpet.adapter_store import adapter_weights_path
    from mindpet.model import PetModel
    from mindpet.train.runner import finetune, load_plan, set_context
    from examples.wukong_huahua.data import make_caption_set, save_sample_grid

    quiet = dict(out=lambda line: print(f"    {line}") if line.startswith(('[eval]', 'step')) else None)
    base = args.base
    if base is None:
        print(f"[1/3] base model: whole-model training on the 'base' style for {args.base_steps} steps")
        finetune(args.config, ['pet={type: full}', 'data.style=base', 'model.pretrain_steps=0',
                               f'training.max_steps={args.base_steps}', 'training.evaluate=false',
                               f'schedule.start_learning_rate={args.base_lr}',
                               f'schedule.end_learning_rate={args.base_lr / 10}', 'training.log_interval=50',
                               f"training.output_dir={os.path.join(args.output, 'base')}"], **quiet)
        base = os.path.join(args.output, 'base', 'model.ckpt')
    adapters = {}
    for style in ('warm', 'cool'):
        print(f"[2/3] LoRA adapter for the '{style}' style ({args.lora_steps} steps)")
        out_dir = os.path.join(args.output, style)
        finetune(args.config, [f'model.base_checkpoint={base}', 'model.pretrain_steps=0', f'data.style={style}',
                               f'training.max_steps={args.lora_steps}', 'training.log_interval=40',
                               f'schedule.start_learning_rate={args.lora_lr}',
                               f'schedule.end_learning_rate={args.lora_lr / 10}',
                               f'training.output_dir={out_dir}'] + args.sets, **quiet)
        adapters[style] = os.path.join(out_dir, 'adapter')

    print("[3/3] one base model, both adapters: sampling the same captions and noise with each")
    plan = load_plan(args.config, [f'model.base_checkpoint={base}'] + args.sets)
    set_context(plan)
    task = plan.task
    network = task.build_network()
    task.load_base(network, base)
    pet = PetModel.from_pretrained(network, adapters['warm'], adapter_name='warm')
    pet.load_adapter(adapters['cool'], 'cool')
    rows, labels, switch_times = [], [], []
    with pet.disable_adapter():
        rows.append(task.sample(pet, CAPTIONS, seed=0))
        labels.append('base (adapters disabled)')
    for style in ('warm', 'cool'):
        start = time.perf_counter()
        pet.set_adapter(style)
        switch_times.append(time.perf_counter() - start)
        rows.append(task.sample(pet, CAPTIONS, seed=0))
        labels.append(f"set_adapter('{style}')")
    for style in ('warm', 'cool'):
        images, captions = make_caption_set(style, 40, seed=0, image_size=task.config.image_size)
        order = {caption: i for i, caption in enumerate(captions)}
        rows.append(images[[order[c] for c in CAPTIONS]])
        labels.append(f"the '{style}' training images")
    path = os.path.join(args.output, 'styles.png')
    save_sample_grid(path, rows)
    print(f"wrote {path} (rows: {'; '.join(labels)})")
    colours = [mean_colour(row) for row in rows]
    for label, colour in zip(labels, colours):
        print(f"  mean RGB of {label:<32} {np.round(colour).astype(int).tolist()}")
    print(f"  warm vs cool samples: mean-colour distance {np.linalg.norm(colours[1] - colours[2]):.1f} (0-255 "
          f"units); pixel-wise mean |difference| {np.abs(rows[1] - rows[2]).mean() * 127.5:.1f}")
    print(f"  set_adapter switch time: {', '.join(f'{1000 * t:.1f} ms' for t in switch_times)} (copies "
          f"{os.path.getsize(adapter_weights_path(adapters['warm'])):,} bytes of adapter "
          f"tensors into the compiled graph's Parameters)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
