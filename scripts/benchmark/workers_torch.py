"""The PyTorch worker processes (Hugging Face PEFT peers, run in their own virtualenv): training step and forward
timing."""
import time

from . import models
from .measure import interleaved, median, memory_figures, timed
from .models import TRAIN_VARIANTS, build_torch_gpt


def _torch_variant(name, cfg):
    import torch
    torch.manual_seed(0)
    return getattr(models, TRAIN_VARIANTS[name]['apply'])(build_torch_gpt(cfg['model']), cfg)


def _torch_batch(cfg):
    import numpy as np
    import torch
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, cfg['vocab'], size=(cfg['batch'], cfg['seq'] + 1)))
    return ids[:, :-1].contiguous(), ids[:, 1:].reshape(-1).contiguous()


def worker_torch_train(cfg):
    import torch
    start = time.perf_counter()
    model = _torch_variant(cfg['variant'], cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    ids, labels = _torch_batch(cfg['model'])
    build_s = time.perf_counter() - start

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(ids), labels)
        loss.backward()
        opt.step()
        return float(loss)
    start = time.perf_counter()
    loss_first = step()
    compile_s = time.perf_counter() - start
    for _ in range(cfg['warmup']):
        step()
    times, cpu = [], []
    for _ in range(cfg['steps']):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return dict(step_s=median(times), step_cpu_s=median(cpu), step_times=times, step_cpu_times=cpu,
                build_s=build_s, compile_s=compile_s, **memory_figures(),
                trainable=sum(p.numel() for p in params), total=sum(p.numel() for p in model.parameters()),
                loss_first=loss_first, loss_last=loss, torch_threads=torch.get_num_threads())


def worker_torch_train_ab(cfg):
    import torch
    ids, labels = _torch_batch(cfg['model'])
    funcs = {}
    for name in cfg['variants']:
        model = _torch_variant(name, cfg)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)

        def run(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(ids), labels).backward()
            opt.step()
        funcs[name] = run
    wall, cpu = interleaved(funcs, cfg['steps'], warmup=cfg['warmup'] + 1)
    return dict(time_s={n: median(t) for n, t in wall.items()}, cpu_s={n: median(t) for n, t in cpu.items()},
                paired_cpu={n: median([a / b for a, b in zip(cpu[n], cpu[cfg['variants'][0]])]) for n in cpu})


def worker_torch_forward(cfg):
    import torch
    ids, _ = _torch_batch(cfg['model'])
    funcs = {}
    for name in cfg['variants']:
        model = _torch_variant(name, cfg).eval()

        def run(model=model):
            with torch.no_grad():
                model(ids)
        funcs[name] = run
    times = timed(funcs, cfg['iterations'])
    return dict(forward_s=times['time_s'], forward_cpu_s=times['cpu_s'])
