"""The MindSpore worker processes: each measures one part (training step, forward, layer, checkpoint, switching,
the MindPet 1.0.4 reference) in its own process and returns a dict of figures."""
import os
import tempfile
import time

from . import models
from .measure import interleaved, median, memory_figures, memory_snapshot, peak_rss_mb, timed
from .models import (LORA, MALLOPT_PARAMS, TRAIN_VARIANTS, apply_lora, build_gpt, load_mindpet104_lora, ms_batch, ms_loss_cell,
                     ms_setup, ms_sync)


def _ms_variant(name, cfg):
    net = build_gpt(cfg['model'])
    return getattr(models, TRAIN_VARIANTS[name]['apply'])(net, cfg)


def _apply_settings_before_import(settings):
    """The settings that must precede MindSpore's threads (glibc ``mallopt``); returns mallopt's answers."""
    import ctypes
    answers = {}
    for name, value in settings.get('mallopt', {}).items():
        answers[name] = ctypes.CDLL('libc.so.6').mallopt(MALLOPT_PARAMS[name], int(value))
    return answers


def _apply_ms_settings(ms, settings):
    if settings.get('jit_level'):
        ms.set_context(jit_config={'jit_level': settings['jit_level']})
    if settings.get('set_memory'):
        ms.runtime.set_memory(**settings['set_memory'])
    if settings.get('runtime_num_threads'):
        ms.set_context(runtime_num_threads=settings['runtime_num_threads'])


def worker_train(cfg):
    """One training process: build the variant, run steps of AdamWeightDecay in GRAPH_MODE, time and measure.

    ``cfg['settings']`` (optional) applies memory settings (see orchestrate.MEMORY_SETTINGS; ``release``: mindpet's
    compile-then-``malloc_trim``). ``rss_phases`` holds ru_maxrss after each phase, ``memory_phases`` the RSS,
    anonymous memory and high-water mark (:func:`memory_snapshot`) after each."""
    settings = cfg.get('settings') or {}
    mallopt = _apply_settings_before_import(settings)
    ms = ms_setup(cfg)
    _apply_ms_settings(ms, settings)
    from mindspore import nn
    snaps = {}

    def phase(name):
        snaps[name] = dict(memory_snapshot(), peak=peak_rss_mb())

    phase('imported')
    start = time.perf_counter()
    net = build_gpt(cfg['model'])
    phase('built')
    net = getattr(models, TRAIN_VARIANTS[cfg['variant']]['apply'])(net, cfg)
    phase('pet_applied')
    params = net.trainable_params()
    total = sum(p.size for p in net.get_parameters())
    trainable = sum(p.size for p in params)
    opt = nn.AdamWeightDecay(params, learning_rate=1e-4, weight_decay=0.01)
    phase('optimizer')
    train = nn.TrainOneStepCell(ms_loss_cell(net), opt)
    train.set_train(True)
    ids, labels = ms_batch(cfg['model'])
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    train.compile(ids, labels)
    phase('compiled')
    released = None
    if settings.get('release'):
        from mindpet.utils.ms_settings import release_free_memory
        released = release_free_memory()
        phase('released')
    loss_first = float(train(ids, labels).asnumpy())
    compile_s = time.perf_counter() - start
    phase('first_step')
    for _ in range(cfg['warmup']):
        train(ids, labels)
    ms_sync(ms, cfg)
    times, cpu = [], []
    for _ in range(cfg['steps']):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = train(ids, labels)
        ms_sync(ms, cfg)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    phase('steady')
    phases = {name: snap['peak'] for name, snap in snaps.items()
              if name in ('imported', 'built', 'compiled', 'first_step')}
    result = dict(step_s=median(times), step_cpu_s=median(cpu), step_times=times, step_cpu_times=cpu,
                  build_s=build_s, compile_s=compile_s, rss_phases=phases, memory_phases=snaps, **memory_figures(),
                  trainable=trainable, total=total, loss_first=loss_first, loss_last=float(loss.asnumpy()),
                  settings_applied=dict(mallopt=mallopt, released=released,
                                        jit_level=ms.get_context('jit_config').get('jit_level')))
    if cfg.get('device', 'CPU') != 'CPU':
        result['device_peak_mb'] = ms.runtime.max_memory_allocated() / 2 ** 20
    return result


def worker_train_ab(cfg):
    """Training steps of several variants in one process, interleaved (see TRAIN_AB_GROUPS)."""
    ms = ms_setup(cfg)
    from mindspore import nn
    ids, labels = ms_batch(cfg['model'])
    funcs = {}
    for name in cfg['variants']:
        net = _ms_variant(name, cfg)
        opt = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-4, weight_decay=0.01)
        train = nn.TrainOneStepCell(ms_loss_cell(net), opt)
        train.set_train(True)
        train(ids, labels)

        def run(train=train):
            train(ids, labels)
            ms_sync(ms, cfg)
        funcs[name] = run
    wall, cpu = interleaved(funcs, cfg['steps'], warmup=cfg['warmup'])
    return dict(time_s={n: median(t) for n, t in wall.items()}, cpu_s={n: median(t) for n, t in cpu.items()},
                paired_cpu={n: median([a / b for a, b in zip(cpu[n], cpu[cfg['variants'][0]])]) for n in cpu})


def worker_forward(cfg):
    """Forward (inference) time of several variants built in one process, timed interleaved."""
    ms = ms_setup(cfg)
    ids, _ = ms_batch(cfg['model'])
    funcs = {}
    for name in cfg['variants']:
        net = _ms_variant(name, cfg)
        net.set_train(False)
        net(ids)

        def run(net=net):
            net(ids)
            ms_sync(ms, cfg)
        funcs[name] = run
    times = timed(funcs, cfg['iterations'])
    return dict(forward_s=times['time_s'], forward_cpu_s=times['cpu_s'])


def _grad_cell(net, weights):
    """A Cell returning the gradients of ``net``'s (summed) output w.r.t. its input and ``weights``."""
    from mindspore import nn, ops, ParameterTuple

    class Grad(nn.Cell):
        def __init__(self):
            super().__init__()
            self.net = net
            self.weights = ParameterTuple(weights) if weights else None
            self.grad = ops.GradOperation(get_all=True, get_by_list=bool(weights))

        def construct(self, x):
            if self.weights is None:
                return self.grad(self.net)(x)
            return self.grad(self.net, self.weights)(x)

    return Grad()


def _layer_inputs(cfg, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    lay = cfg['layer']
    cin, cout = lay['in_channels'], lay['out_channels']
    return dict(x=rng.standard_normal(lay['shape']).astype(np.float32),
                w=(rng.standard_normal((cout, cin)) / np.sqrt(cin)).astype(np.float32),
                b=rng.standard_normal(cout).astype(np.float32) * 0.1,
                a=(rng.standard_normal((LORA['rank'], cin)) / np.sqrt(cin)).astype(np.float32),
                bb=rng.standard_normal((cout, LORA['rank'])).astype(np.float32) * 0.1)


def _make_lora(cls, arrays, compute_dtype, freeze=True):
    from mindspore import Tensor
    lay_in, lay_out = arrays['w'].shape[1], arrays['w'].shape[0]
    layer = cls(lay_in, lay_out, LORA['rank'], LORA['alpha'], compute_dtype=compute_dtype,
                weight_init=Tensor(arrays['w']), bias_init=Tensor(arrays['b']),
                lora_a_init=Tensor(arrays['a']), lora_b_init=Tensor(arrays['bb']))
    if freeze:
        layer.weight.requires_grad = False
        layer.bias.requires_grad = False
    return layer


def worker_layer(cfg):
    """Part 2: LoRADense(r=8) against nn.Dense of the same size, unmerged, merged in place, and to_dense()."""
    import numpy as np
    ms = ms_setup(cfg)
    from mindspore import nn, Tensor
    from mindpet.delta import LoRADense
    arr = _layer_inputs(cfg)
    x = Tensor(arr['x'])
    dense = nn.Dense(arr['w'].shape[1], arr['w'].shape[0], weight_init=Tensor(arr['w']),
                     bias_init=Tensor(arr['b']))
    lora = _make_lora(LoRADense, arr, ms.float32)
    merged = _make_lora(LoRADense, arr, ms.float32)
    unmerged_out = merged(x).asnumpy()          # compile first, then merge inside the compiled graph
    merged.merge()
    merged_out = merged(x).asnumpy()
    plain = lora.to_dense()
    fwd = {'dense': dense, 'lora': lora, 'lora_merged_in_place': merged, 'lora_to_dense': plain}
    bwd = {'dense_full_grad': _grad_cell(dense, dense.trainable_params()),
           'dense_input_grad': _grad_cell(dense, None),
           'lora_grad': _grad_cell(lora, lora.trainable_params())}
    funcs = {}
    for prefix, cells in (('fwd', fwd), ('fwdbwd', bwd)):
        for name, cell in cells.items():
            cell(x)

            def run(cell=cell):
                cell(x)
                ms_sync(ms, cfg)
            funcs[f'{prefix}:{name}'] = run
    return dict(timed(funcs, cfg['iterations']),
                merge_max_abs_diff=float(np.max(np.abs(unmerged_out - merged_out))))


def worker_reference(cfg):
    """Part 5: MindPet 1.0.4's LoRADense against ours, same shapes and dtypes, forward and forward+backward."""
    ms = ms_setup(cfg)
    from mindspore import Tensor
    from mindpet.delta import LoRADense
    ref = load_mindpet104_lora()
    arr = _layer_inputs(cfg)
    x = Tensor(arr['x'])
    funcs, outputs = {}, {}
    for dtype_name in cfg['dtypes']:
        dtype = getattr(ms, dtype_name)
        for who, cls in (('ours', LoRADense), ('mindpet104', ref.LoRADense)):
            layer = _make_lora(cls, arr, dtype)
            outputs[f'{who}:{dtype_name}'] = layer(x).asnumpy()
            for kind, cell in (('fwd', layer), ('fwdbwd', _grad_cell(layer, layer.trainable_params()))):
                cell(x)

                def run(cell=cell):
                    cell(x)
                    ms_sync(ms, cfg)
                funcs[f'{kind}:{dtype_name}:{who}'] = run
    diffs = {d: float(abs(outputs[f'ours:{d}'] - outputs[f'mindpet104:{d}']).max()) for d in cfg['dtypes']}
    return dict(timed(funcs, cfg['iterations']), max_abs_diff=diffs)


def worker_ckpt(cfg):
    """Part 3: adapter-only checkpoint vs full checkpoint of GPT-2 small with LoRA r=8 on q and v."""
    ms_setup(cfg)
    from mindpet.graph.ckpt_util import save_trainable_params
    from mindpet.utils.io_utils import atomic_save_checkpoint
    net = apply_lora(build_gpt(cfg['model']), cfg)
    all_params = list(net.get_parameters())
    trainable = net.trainable_params()
    raw_full = sum(p.size * p.itemsize for p in all_params)
    raw_adapter = sum(p.size * p.itemsize for p in trainable)
    result = dict(params_total=sum(p.size for p in all_params), params_adapter=sum(p.size for p in trainable),
                  raw_full_bytes=raw_full, raw_adapter_bytes=raw_adapter, files={})
    with tempfile.TemporaryDirectory(prefix='mindpet-bench-') as tmp:
        for fmt in ('ckpt', 'safetensors'):
            full_path = os.path.join(tmp, f'full.{fmt}')
            adapter_path = os.path.join(tmp, f'adapter.{fmt}')
            start = time.perf_counter()
            atomic_save_checkpoint(all_params, full_path, ckpt_format=fmt)
            full_s = time.perf_counter() - start
            start = time.perf_counter()
            save_trainable_params(net, adapter_path)
            adapter_s = time.perf_counter() - start
            result['files'][fmt] = dict(full_bytes=os.path.getsize(full_path),
                                        adapter_bytes=os.path.getsize(adapter_path),
                                        full_save_s=full_s, adapter_save_s=adapter_s)
    return result


def _ms_ops(samples, forward_ms):
    """name -> (wall, CPU) seconds lists -> ms figures, with the medians as multiples of the forward pass's."""
    table = {}
    for name, (wall, cpu) in samples.items():
        wall_ms, cpu_ms = [t * 1e3 for t in wall], [t * 1e3 for t in cpu]
        table[name] = dict(median_ms=median(wall_ms), min_ms=min(wall_ms), max_ms=max(wall_ms),
                           cpu_ms=median(cpu_ms), x_forward=median(wall_ms) / forward_ms['wall'],
                           cpu_x_forward=median(cpu_ms) / forward_ms['cpu'], n=len(wall_ms))
    return table


def worker_switch(cfg):
    """Part 4: ``set_adapter`` between two LoRA adapters (r=8 on q, v) of a compiled PetModel, and ``merge()`` /
    ``unmerge()``, against one forward pass of the same model, on GPT-2-small shapes in GRAPH_MODE.

    Adapters 'a' and 'b' are trainable (switching away from one first copies its live tensors back to the store);
    'c' and 'd' are the same two loaded back from disk for inference (``is_trainable=False``: no copy back). The
    outputs are checked: switching gives the other adapter's output (equal, to 1e-5, to a freshly built model that
    loaded only that adapter), switching back gives bit-identical outputs, merging changes them by rounding only,
    and nothing recompiles.
    """
    import numpy as np
    ms = ms_setup(cfg)
    from mindspore import Tensor
    from mindpet import LoraConfig, PetModel, get_pet_model
    model = cfg['model']
    n = cfg['iterations']
    start = time.perf_counter()
    net = build_gpt(model)
    base = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    config = LoraConfig(target_modules=list(LORA['targets']), lora_rank=LORA['rank'], lora_alpha=LORA['alpha'])
    pet = get_pet_model(net, config, adapter_name='a')
    pet.add_adapter('b', config)
    rng = np.random.default_rng(1)
    for name in ('a', 'b'):
        # Both LoRA factors random (B is zero at initialisation): each adapter then changes every output.
        pet.set_adapter(name)
        for layer in pet.pet_layers.values():
            for param in (layer.mindpet_delta_lora_a, layer.mindpet_delta_lora_b):
                param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.02))
    tmp = tempfile.TemporaryDirectory(prefix='mindpet-bench-switch-')
    dirs = {name: os.path.join(tmp.name, name) for name in ('a', 'b')}
    pet.set_adapter('a')
    for name, path in dirs.items():
        pet.save_pretrained(path, adapter_name=name)
    pet.load_adapter(dirs['a'], 'c')
    pet.load_adapter(dirs['b'], 'd')
    build_s = time.perf_counter() - start
    lora_size = dict(lora_layers=len(pet.pet_layers), adapter_params=sum(
        layer.mindpet_delta_lora_a.size + layer.mindpet_delta_lora_b.size for layer in pet.pet_layers.values()))

    ids = Tensor(np.random.default_rng(0).integers(0, model['vocab'], (model['batch'], model['seq']))
                 .astype(np.int32))
    start = time.perf_counter()
    out_a = pet(ids).asnumpy()
    compile_s = time.perf_counter() - start
    graphs = len(pet.compile_cache)

    def forward():
        pet(ids)
        ms_sync(ms, cfg)

    wall, cpu = interleaved({'forward': forward}, n)
    samples = {'forward': (wall['forward'], cpu['forward'])}
    pet.set_adapter('b')
    out_b = pet(ids).asnumpy()
    pet.set_adapter('d')
    out_d = pet(ids).asnumpy()
    checks = dict(switch_change=float(np.abs(out_b - out_a).max()),
                  loaded_vs_trained=float(np.abs(out_d - out_b).max()))
    if checks['switch_change'] < 1e-3:
        raise AssertionError(f"set_adapter('b') changed the outputs by only {checks['switch_change']:.2e}")
    if checks['loaded_vs_trained']:
        raise AssertionError(f"adapter 'b' loaded from disk differs from the trained one by "
                             f"{checks['loaded_vs_trained']:.2e}")

    for kind, pair in (('set_adapter_trainable', ('a', 'b')), ('set_adapter_inference', ('c', 'd'))):
        names = iter(pair * (n + 1))
        pet.set_adapter(next(names))

        def switch(names=names):
            pet.set_adapter(next(names))
            ms_sync(ms, cfg)
        wall, cpu = interleaved({kind: switch}, 2 * n, warmup=0)
        samples[kind] = (wall[kind], cpu[kind])
    pet.set_adapter('a')
    checks['switch_back'] = float(np.abs(pet(ids).asnumpy() - out_a).max())
    if checks['switch_back']:
        raise AssertionError(f"switching back to 'a' changed its outputs by {checks['switch_back']:.2e}")

    wall, cpu = interleaved({'merge': pet.merge, 'unmerge': pet.unmerge}, n, warmup=0)
    samples.update(merge=(wall['merge'], cpu['merge']), unmerge=(wall['unmerge'], cpu['unmerge']))
    pet.merge()
    checks['merged'] = float(np.abs(pet(ids).asnumpy() - out_a).max())
    pet.unmerge()
    checks['unmerged'] = float(np.abs(pet(ids).asnumpy() - out_a).max())
    if max(checks['merged'], checks['unmerged']) > 1e-4:
        raise AssertionError(f"merge()/unmerge() moved the outputs by {checks['merged']:.2e}/"
                             f"{checks['unmerged']:.2e} (more than float32 rounding)")
    if len(pet.compile_cache) != graphs:
        raise AssertionError(f'switching or merging recompiled the graph ({graphs} -> {len(pet.compile_cache)})')

    plain = pet.merge_and_unload()
    checks['merge_and_unload'] = float(np.abs(plain(ids).asnumpy() - out_a).max())

    def plain_forward():
        plain(ids)
        ms_sync(ms, cfg)
    wall, cpu = interleaved({'forward_plain': plain_forward}, n)
    samples['forward_plain'] = (wall['forward_plain'], cpu['forward_plain'])

    # The reference for 'b': a new base model with the same weights that loaded only 'b'.
    fresh = build_gpt(model)
    for param in fresh.get_parameters():
        param.set_data(Tensor(base[param.name]))
    reference = PetModel.from_pretrained(fresh, dirs['b'])
    out_ref = reference(ids).asnumpy()
    checks['vs_model_built_with_b'] = float(np.abs(out_b - out_ref).max())
    np.testing.assert_allclose(out_b, out_ref, rtol=1e-5, atol=1e-5,
                               err_msg="after set_adapter('b') the output is not that of a model built with 'b'")
    tmp.cleanup()
    fwd = dict(wall=median(samples['forward'][0]) * 1e3, cpu=median(samples['forward'][1]) * 1e3)
    return dict(ops=_ms_ops(samples, fwd), checks=checks, build_s=build_s, compile_s=compile_s, graphs=graphs,
                params_total=sum(p.size for p in plain.get_parameters()), **lora_size)


def _pet_with_adapters(cfg, names):
    """A PetModel of the benchmark GPT (LoRA r=8 on q, v) holding ``names``, each adapter's factors random
    (seeded, so two calls build identical models)."""
    import numpy as np
    from mindspore import Tensor
    from mindpet import LoraConfig, get_pet_model
    ms_setup(cfg)
    net = build_gpt(cfg['model'])
    config = LoraConfig(target_modules=[f'attn.{t}' for t in LORA['targets']], lora_rank=LORA['rank'],
                        lora_alpha=LORA['alpha'])
    pet = get_pet_model(net, config, adapter_name=names[0])
    for name in names[1:]:
        pet.add_adapter(name, config)
    rng = np.random.default_rng(1)
    for name in names:
        pet.set_adapter(name)
        for layer in pet.pet_layers.values():
            for param in (layer.mindpet_delta_lora_a, layer.mindpet_delta_lora_b):
                param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.05))
    return pet


def worker_mixed(cfg):
    """Mixed-adapter batches: one batch whose rows use 4 different LoRA adapters (``MixedLoraModel``) against the
    same batch on one adapter, both the PetModel's ordinary path and the serving view with every row on one adapter,
    timed interleaved in one process (GRAPH_MODE, two identical models built from the same seed). Checked in the
    run: each row of the mixed batch equals the PetModel with only that row's adapter active, and the mixes run in
    one compiled graph."""
    import numpy as np
    ms = ms_setup(cfg)
    from mindspore import Tensor
    from mindpet.serving import MixedLoraModel
    model = cfg['model']
    names = ['a', 'b', 'c', 'd']
    single = _pet_with_adapters(cfg, names)
    view = MixedLoraModel(_pet_with_adapters(cfg, names))
    ids = Tensor(np.random.default_rng(0).integers(0, model['vocab'], (model['batch'], model['seq']))
                 .astype(np.int32))
    mix = [names[row % len(names)] for row in range(model['batch'])]
    refs = {}
    for name in names:
        single.set_adapter(name)
        refs[name] = single(ids).asnumpy().reshape(model['batch'], model['seq'], -1)
    single.set_adapter('a')
    out = view.forward(ids, adapter_names=mix).asnumpy().reshape(model['batch'], model['seq'], -1)
    row_diff = max(float(np.abs(out[row] - refs[name][row]).max()) for row, name in enumerate(mix))
    if row_diff > 1e-4:
        raise AssertionError(f'a mixed-batch row differs from its adapter alone by {row_diff:.2e}')
    adapters_differ = float(np.abs(refs['a'] - refs['b']).max())
    graphs = len(view.compile_cache)

    def petmodel_single():
        single(ids)
        ms_sync(ms, cfg)

    def view_mixed():
        view.forward(ids, adapter_names=mix)
        ms_sync(ms, cfg)

    def view_single():
        view.forward(ids, adapter_names=['a'] * model['batch'])
        ms_sync(ms, cfg)

    times = timed({'petmodel_single': petmodel_single, 'view_mixed': view_mixed, 'view_single': view_single},
                  cfg['iterations'])
    if len(view.compile_cache) != graphs:
        raise AssertionError(f'a new mix recompiled the view ({graphs} -> {len(view.compile_cache)} graphs)')
    view.close()
    return dict(times, checks=dict(row_max_abs_diff=row_diff, adapters_differ=adapters_differ, graphs=graphs),
                adapters=len(names), mix=mix, **memory_figures())
