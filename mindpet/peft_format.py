"""Hugging Face PEFT's adapter directory format, read and written (LoRA, DoRA and IA3).

A PEFT directory holds ``adapter_config.json`` (``peft_type`` and the method's options) and
``adapter_model.safetensors``, whose keys are ``base_model.model.<module path>.<PEFT tensor>``:

=====================  ==========================================  ==========================================
PEFT tensor            shape                                       mindpet tensor
=====================  ==========================================  ==========================================
``lora_A.weight``      ``(r, in)``                                 ``mindpet_delta_lora_a`` (DoRA: ``_dora_a``)
``lora_B.weight``      ``(out, r)``                                ``mindpet_delta_lora_b`` (DoRA: ``_dora_b``)
``lora_magnitude_vector``  ``(out,)``                              ``mindpet_delta_dora_magnitude``
``ia3_l``              ``(out, 1)``; ``(1, in)`` for feed-forward  ``mindpet_delta_ia3_vector`` ``(out,)`` / ``(in,)``
=====================  ==========================================  ==========================================

On a ``Conv2d`` layer (LoRA only) PEFT's ``lora_A`` is a kernel ``(r, in, kh, kw)`` and ``lora_B`` a 1x1 kernel
``(out, r, 1, 1)``; mindpet holds them as ``(r, in*kh*kw)`` and ``(out, r)`` (its Conv2d layer kind). Other layer
kinds (GPT-2 ``Conv1D``, embeddings) are written only in mindpet's own format.

PyTorch's ``nn.Linear``, MindSpore's ``nn.Dense`` and ``mint.nn.Linear`` all store weights ``(out, in)``, so the LoRA
factors are the same arrays in both formats; IA3's vector is a column or a row in PEFT and flat here. Parameters of
``modules_to_save`` are stored under ``base_model.model.<parameter name>``. The module paths are the MindSpore cell
paths, which for mindone.transformers models equal the Hugging Face ones.

mindone.peft (MindSpore) and Hugging Face PEFT (PyTorch) write and read this format. :class:`mindpet.PetModel`
reads it through :func:`load_adapter_dir` when a directory holds ``adapter_config.json``, and writes it with
``save_pretrained(directory, format='peft')`` through :func:`save_adapter_dir`. A PEFT directory records no
fingerprint of the base model, so loading checks every tensor's shape against the model instead.

Example:
    >>> pet = PetModel.from_pretrained(net, 'peft_lora_dir')  # doctest: +SKIP
    >>> pet.save_pretrained('out/for_peft', format='peft')  # doctest: +SKIP
"""
import dataclasses
import json
import os
import re
from collections import OrderedDict

import numpy as np
from safetensors.numpy import save as safetensors_bytes

from mindpet.naming import is_pet_param
from mindpet.utils.exceptions import AdapterConfigError, CheckpointError
from mindpet.utils.dir_commit import commit_directory, read_unit
from mindpet.utils.io_utils import ensure_dir, load_checkpoint_file

PEFT_CONFIG_NAME = 'adapter_config.json'
PEFT_WEIGHTS_NAME = 'adapter_model.safetensors'
KEY_PREFIX = 'base_model.model.'

LORA_A, LORA_B = 'mindpet_delta_lora_a', 'mindpet_delta_lora_b'
DORA_A, DORA_B, DORA_M = 'mindpet_delta_dora_a', 'mindpet_delta_dora_b', 'mindpet_delta_dora_magnitude'
IA3_VECTOR = 'mindpet_delta_ia3_vector'

# PEFT tensor suffix -> mindpet tensor name, per (peft_type, use_dora).
_SUFFIXES = {
    ('LORA', False): {'lora_A.weight': LORA_A, 'lora_B.weight': LORA_B},
    ('LORA', True): {'lora_A.weight': DORA_A, 'lora_B.weight': DORA_B, 'lora_magnitude_vector': DORA_M},
    ('IA3', False): {'ia3_l': IA3_VECTOR},
}
PEFT_TYPES = ('LORA', 'IA3')
# Layer kinds (mindpet.delta.layer_kinds) PEFT's format is written for: None is nn.Dense.
PEFT_KINDS = (None, 'linear', 'conv2d')

# Keys that describe the adapter but do not change what it computes.
_INFORMATIONAL = {'peft_type', 'task_type', 'base_model_name_or_path', 'revision', 'inference_mode', 'auto_mapping',
                  'peft_version', 'target_modules', 'exclude_modules', 'modules_to_save', 'feedforward_modules',
                  'r', 'lora_alpha', 'lora_dropout', 'use_dora', 'init_ia3_weights', 'runtime_config',
                  'megatron_core',
                  'qalora_group_size'}   # read only with use_qalora, which is refused
# Options mindpet reproduces only at PEFT's default value (the value is what PEFT writes when it is unused).
_DEFAULTS = {'fan_in_fan_out': False, 'bias': 'none', 'use_rslora': False, 'lora_bias': False,
             'layers_to_transform': None, 'layers_pattern': None, 'rank_pattern': {}, 'alpha_pattern': {},
             'megatron_config': None, 'loftq_config': {}, 'eva_config': None, 'corda_config': None,
             'trainable_token_indices': None, 'use_qalora': False, 'target_parameters': None,
             'layer_replication': None}
# init_lora_weights values that leave the base weights alone (PiSSA, OLoRA, CorDA and LoftQ rewrite them, so their
# adapters only fit the rewritten base model).
_PLAIN_INITS = (True, False, 'gaussian', 'eva')


def _is_unset(value):
    return value is None or value is False or value == {} or value == [] or value == ''


def _read_config(directory):
    path = os.path.join(directory, PEFT_CONFIG_NAME)
    try:
        with open(path, encoding='utf-8') as handle:
            data = json.load(handle)
    except OSError as ex:
        raise AdapterConfigError(f"The PEFT adapter config '{path}' cannot be read: {ex.strerror or ex}.") from ex
    except ValueError as ex:
        raise AdapterConfigError(f"The PEFT adapter config '{path}' is not valid JSON: {ex}.") from ex
    if not isinstance(data, dict):
        raise AdapterConfigError(f"The PEFT adapter config '{path}' must be a JSON object, but holds "
                                 f"{type(data).__name__}.")
    peft_type = data.get('peft_type')
    if peft_type not in PEFT_TYPES:
        raise AdapterConfigError(f"The PEFT adapter config '{path}' has peft_type {peft_type!r}; mindpet reads "
                                 f"{list(PEFT_TYPES)} adapters (LoRA, DoRA as LoRA with use_dora, IA3).")
    return path, data


def _check_options(path, data):
    """Refuse every option that would make PEFT compute something mindpet's method does not, naming it."""
    from mindpet.tuners.lora import LoraConfig  # pylint: disable=import-outside-toplevel
    own_fields = {field.name for field in dataclasses.fields(LoraConfig)}
    for key, value in data.items():
        if key in _INFORMATIONAL:
            continue
        if key == 'init_lora_weights':
            if value not in _PLAIN_INITS:
                raise AdapterConfigError(f"The PEFT adapter config '{path}' has init_lora_weights={value!r}: that "
                                         f"initialisation rewrites the base weights, so the adapter only fits the "
                                         f"rewritten model; mindpet loads adapters made with {list(_PLAIN_INITS)}.")
            continue
        if key in _DEFAULTS:
            if value == _DEFAULTS[key] or (key not in ('bias',) and _is_unset(value)):
                continue
            if key in own_fields and key in ('use_rslora', 'rank_pattern', 'alpha_pattern'):
                continue  # mindpet's LoraConfig has the same option: passed on in _lora_config
            raise AdapterConfigError(f"The PEFT adapter config '{path}' sets {key}={value!r}, which mindpet does "
                                     f"not support (it loads only {key}={_DEFAULTS[key]!r}).")
        if not _is_unset(value):
            raise AdapterConfigError(f"The PEFT adapter config '{path}' sets the option {key}={value!r}, which "
                                     f"mindpet does not know; refusing rather than loading an adapter that would "
                                     f"compute something else.")


def _tensor_arrays(path):
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    params = load_checkpoint_file(path, what='PEFT adapter weights')
    arrays = OrderedDict()
    for name, value in params.items():
        if value.dtype == ms.bfloat16:  # numpy has no bfloat16
            value = value.astype(ms.float32)
        arrays[name] = value.asnumpy()
    return arrays


def _layer_tensors(path, arrays, suffixes, modules_to_save):
    """Group PEFT keys by module path: ``(layers, modules)`` with PEFT's arrays (not reshaped yet)."""
    layers, modules = OrderedDict(), OrderedDict()
    for key, value in arrays.items():
        if not key.startswith(KEY_PREFIX):
            hint = (" It is a tensor of mindpet's own format, whose directories hold adapter_config.yaml."
                    if is_pet_param(key.rsplit('.', 1)[-1]) else '')
            raise CheckpointError(f"The PEFT adapter file '{path}' has tensor '{key}', which does not start with "
                                  f"'{KEY_PREFIX}' (the PEFT key of a model's module).{hint}")
        name = key[len(KEY_PREFIX):]
        for suffix, own in suffixes.items():
            if name.endswith('.' + suffix):
                layers.setdefault(name[:-len(suffix) - 1], OrderedDict())[own] = value
                break
        else:
            owner = name.rsplit('.', 1)[0]
            if modules_to_save and any(owner == m or owner.endswith('.' + m) or re.fullmatch(m, owner)
                                       for m in modules_to_save):
                modules[name] = value
            else:
                raise CheckpointError(f"The PEFT adapter file '{path}' has tensor '{key}', which is neither one of "
                                      f"{sorted(suffixes)} nor a parameter of its modules_to_save "
                                      f"{modules_to_save}.")
    for layer, tensors in layers.items():
        missing = [suffix for suffix, own in suffixes.items() if own not in tensors]
        if missing:
            raise CheckpointError(f"The PEFT adapter file '{path}' lacks tensor "
                                  f"'{KEY_PREFIX}{layer}.{missing[0]}'.")
    if not layers:
        raise CheckpointError(f"The PEFT adapter file '{path}' holds no adapter tensor (expected keys ending in "
                              f"{sorted(suffixes)}).")
    return layers, modules


def _exact(keys):
    """Patterns selecting exactly the cells ``keys`` (regular expressions full-matching each name)."""
    return [re.escape(key) for key in keys]


def _lora_config(path, data, layers, modules):
    from mindpet.tuners.lora import LoraConfig  # pylint: disable=import-outside-toplevel
    rank = data.get('r')
    alpha = data.get('lora_alpha', rank)
    use_dora = bool(data.get('use_dora', False))
    a_name, b_name = (DORA_A, DORA_B) if use_dora else (LORA_A, LORA_B)
    layer_types = OrderedDict()
    for layer, tensors in layers.items():
        lora_a, lora_b = tensors[a_name], tensors[b_name]
        if lora_a.ndim == 4 and lora_b.ndim == 4 and lora_b.shape[2:] == (1, 1):
            # Conv2d: A is a (r, in, kh, kw) kernel, B a 1x1 (out, r, 1, 1) one; mindpet's view is (r, in*kh*kw).
            lora_a, lora_b = lora_a.reshape(lora_a.shape[0], -1), lora_b.reshape(lora_b.shape[0], -1)
            tensors[a_name], tensors[b_name] = lora_a, lora_b
            layer_types[layer] = 'conv2d'
        if lora_a.ndim != 2 or lora_b.ndim != 2:
            raise CheckpointError(f"The PEFT adapter file '{path}' has LoRA factors of shapes {lora_a.shape} and "
                                  f"{lora_b.shape} for '{layer}'; mindpet reads those of linear and Conv2d layers.")
        if lora_b.shape[1] != lora_a.shape[0]:
            raise CheckpointError(f"The PEFT adapter file '{path}' has lora_B {lora_b.shape} that does not multiply "
                                  f"lora_A {lora_a.shape} for '{layer}'.")
        if use_dora and tensors[DORA_M].reshape(-1).shape[0] != lora_b.shape[0]:
            raise CheckpointError(f"The PEFT adapter file '{path}' has lora_magnitude_vector "
                                  f"{tensors[DORA_M].shape} for '{layer}', but lora_B has {lora_b.shape[0]} rows.")
        if use_dora:
            tensors[DORA_M] = tensors[DORA_M].reshape(-1)
        if lora_a.shape[0] != rank and not data.get('rank_pattern'):
            raise CheckpointError(f"The PEFT adapter file '{path}' has rank {lora_a.shape[0]} for '{layer}', but "
                                  f"its config says r={rank!r}.")
    kwargs = dict(target_modules=_exact(layers), lora_rank=rank, lora_alpha=alpha,
                  lora_dropout=float(data.get('lora_dropout') or 0.0), use_dora=use_dora,
                  modules_to_save=_module_cells(modules))
    for option in ('use_rslora', 'rank_pattern', 'alpha_pattern'):
        if not _is_unset(data.get(option)):
            kwargs[option] = data[option]
    try:
        return LoraConfig(**kwargs), layer_types
    except (TypeError, ValueError) as ex:
        raise AdapterConfigError(f"The PEFT adapter config '{path}' does not give a valid LoRA config: {ex}") from ex


def _ia3_config(path, data, layers, modules):
    from mindpet.tuners.ia3 import IA3Config  # pylint: disable=import-outside-toplevel
    feedforward = []
    for layer, tensors in layers.items():
        vector = tensors[IA3_VECTOR]
        if vector.ndim != 2 or 1 not in vector.shape:
            raise CheckpointError(f"The PEFT adapter file '{path}' has ia3_l of shape {vector.shape} for "
                                  f"'{layer}'; PEFT's linear IA3 vector is (out, 1) or, feed-forward, (1, in).")
        if vector.shape[0] == 1 and vector.shape[1] != 1:
            feedforward.append(layer)
        elif vector.shape == (1, 1) and layer in (data.get('feedforward_modules') or []):
            feedforward.append(layer)
        tensors[IA3_VECTOR] = vector.reshape(-1)
    try:
        return IA3Config(target_modules=_exact(layers), feedforward_modules=_exact(feedforward) or None,
                         modules_to_save=_module_cells(modules)), OrderedDict()
    except (TypeError, ValueError) as ex:
        raise AdapterConfigError(f"The PEFT adapter config '{path}' does not give a valid IA3 config: {ex}") from ex


def _module_cells(modules):
    cells = []
    for name in modules:
        cell = name.rsplit('.', 1)[0]
        if cell not in cells:
            cells.append(cell)
    return _exact(cells) or None


def load_adapter_dir(directory):
    """Read a PEFT adapter directory into a :class:`mindpet.adapter_store.StoredAdapter`.

    Args:
        directory (str): holds ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        StoredAdapter: ``config`` a :class:`mindpet.LoraConfig` (``use_dora`` for DoRA) or :class:`mindpet.IA3Config`
        selecting exactly the module paths found in the file; ``layers`` path -> mindpet tensors (float32 numpy);
        ``modules`` the ``modules_to_save`` parameters; ``fingerprint`` None (PEFT records no base model).

    Raises:
        AdapterConfigError: unreadable config, an unknown ``peft_type``, or an option mindpet does not reproduce
            (named in the message).
        CheckpointError: a missing or corrupt tensor file, a key that is not an adapter tensor, a missing factor,
            or factors whose shapes do not fit together.

    Example:
        >>> adapter = load_adapter_dir('peft_lora_dir')  # doctest: +SKIP
        >>> adapter.config.lora_rank, adapter.targets[:1]  # doctest: +SKIP
        (8, ['bert.encoder.layer.0.attention.self.query'])
    """
    # Both files from one save: a writer may swap the directory between the two reads.
    return read_unit(os.fspath(directory), _load)


def _load(directory):
    from mindpet.adapter_store import StoredAdapter  # pylint: disable=import-outside-toplevel
    path, data = _read_config(directory)
    _check_options(path, data)
    weights = os.path.join(directory, PEFT_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        other = [n for n in ('adapter_model.bin',) if os.path.isfile(os.path.join(directory, n))]
        hint = f" (it has {other[0]}, PyTorch's pickle format: convert it to safetensors)" if other else ''
        raise CheckpointError(f"The PEFT adapter directory '{directory}' has no {PEFT_WEIGHTS_NAME}{hint}.")
    arrays = _tensor_arrays(weights)
    use_dora = data['peft_type'] == 'LORA' and bool(data.get('use_dora', False))
    modules_to_save = data.get('modules_to_save') or []
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    layers, modules = _layer_tensors(weights, arrays, _SUFFIXES[(data['peft_type'], use_dora)], modules_to_save)
    if data['peft_type'] == 'LORA':
        config, layer_types = _lora_config(path, data, layers, modules)
    else:
        config, layer_types = _ia3_config(path, data, layers, modules)
    layers = OrderedDict((key, {name: np.ascontiguousarray(value, np.float32) for name, value in tensors.items()})
                         for key, tensors in layers.items())
    modules = OrderedDict((name, np.ascontiguousarray(value)) for name, value in modules.items())
    return StoredAdapter(None, config, list(layers), layers, modules, None, dict(layer_types) or None)


def peft_config_dict(adapter):
    """The ``adapter_config.json`` mapping for ``adapter`` (a StoredAdapter of a LoRA, DoRA or IA3 config).

    ``target_modules`` lists the adapted module paths exactly (PEFT matches a list entry against the whole path).

    Raises:
        ValueError: the method is not one PEFT's format holds, or the adapter uses an option PEFT has no
            equivalent for.
    """
    config = adapter.config
    modules = []
    for name in adapter.modules:
        cell = name.rsplit('.', 1)[0]
        if cell not in modules:
            modules.append(cell)
    common = {'base_model_name_or_path': None, 'revision': None, 'task_type': None, 'inference_mode': True,
              'target_modules': list(adapter.targets), 'fan_in_fan_out': False,
              'modules_to_save': modules or None}
    if config.method == 'lora':
        data = {'peft_type': 'LORA', **common, 'r': config.lora_rank, 'lora_alpha': config.lora_alpha,
                'lora_dropout': config.lora_dropout, 'bias': 'none', 'use_rslora': False,
                'init_lora_weights': True, 'layers_to_transform': None, 'layers_pattern': None,
                'rank_pattern': {}, 'alpha_pattern': {}, 'use_dora': bool(config.use_dora)}
        for option in ('use_rslora', 'rank_pattern', 'alpha_pattern'):
            value = getattr(config, option, None)
            if not _is_unset(value):
                data[option] = value
        return data
    if config.method == 'ia3':
        feedforward = [key for key in adapter.targets if config.is_feedforward(key)]
        return {'peft_type': 'IA3', **common, 'feedforward_modules': feedforward, 'init_ia3_weights': True}
    raise ValueError(f"For 'save_pretrained', the format 'peft' holds LoRA, DoRA and IA3 adapters, but this adapter "
                     f"is '{config.method}' (save it with format='mindpet').")


def _layer_kind(adapter, key):
    kind = (adapter.layer_types or {}).get(key)
    if kind not in PEFT_KINDS:
        raise ValueError(f"For 'save_pretrained', the format 'peft' holds adapters of linear layers (nn.Dense, "
                         f"mint.nn.Linear) and, for LoRA, Conv2d layers, but layer '{key}' is of kind {kind!r} "
                         f"(save it with format='mindpet').")
    return kind


def peft_tensors(adapter):
    """``PEFT key -> numpy array`` for ``adapter`` (see the module's table; a Conv2d layer's factors become PEFT's
    ``(r, in, kh, kw)`` and ``(out, r, 1, 1)`` kernels)."""
    config = adapter.config
    out = OrderedDict()
    for key in adapter.targets:
        tensors = adapter.layers[key]
        kind = _layer_kind(adapter, key)
        if config.method == 'lora':
            use_dora = bool(config.use_dora)
            lora_a, lora_b = tensors[DORA_A if use_dora else LORA_A], tensors[DORA_B if use_dora else LORA_B]
            if kind == 'conv2d':
                if use_dora or adapter.fingerprint is None:
                    raise ValueError(f"For 'save_pretrained', the format 'peft' holds LoRA (not DoRA) on Conv2d "
                                     f"layers, with the layer's kernel shape known; layer '{key}' cannot be written.")
                _, in_channels, kh, kw = adapter.fingerprint[f'{key}.weight']
                lora_a = lora_a.reshape(lora_a.shape[0], in_channels, kh, kw)
                lora_b = lora_b.reshape(lora_b.shape[0], lora_b.shape[1], 1, 1)
            out[f'{KEY_PREFIX}{key}.lora_A.weight'] = lora_a
            out[f'{KEY_PREFIX}{key}.lora_B.weight'] = lora_b
            if use_dora:
                out[f'{KEY_PREFIX}{key}.lora_magnitude_vector'] = tensors[DORA_M]
        else:
            if kind not in (None, 'linear'):
                raise ValueError(f"For 'save_pretrained', the format 'peft' holds IA3 on linear layers; layer "
                                 f"'{key}' is of kind {kind!r} (save it with format='mindpet').")
            vector = tensors[IA3_VECTOR].reshape(-1)
            shape = (1, -1) if config.is_feedforward(key) else (-1, 1)
            out[f'{KEY_PREFIX}{key}.ia3_l'] = vector.reshape(shape)
    for name, value in adapter.modules.items():
        out[f'{KEY_PREFIX}{name}'] = value
    return out


def save_adapter_dir(directory, adapter):
    """Write ``adapter`` (a StoredAdapter) as a PEFT directory, ``adapter_model.safetensors`` and
    ``adapter_config.json`` committed as one unit (:func:`mindpet.utils.dir_commit.commit_directory`: the new directory
    is built beside ``directory`` and swapped in; other files in it stay). Returns ``directory``.

    Raises:
        ValueError: see :func:`peft_config_dict`.
        CheckpointError: a storage error (disk full, permission), naming the file; ``directory`` is as it was.
    """
    directory = os.fspath(directory)
    data = peft_config_dict(adapter)   # refuses before anything is written
    tensors = peft_tensors(adapter)
    ensure_dir(directory, what='adapter directory')
    # 'format': 'pt' is what PEFT itself records; PyTorch PEFT reads the file either way.
    weights = safetensors_bytes({name: np.ascontiguousarray(value) for name, value in tensors.items()},
                                metadata={'format': 'pt'})
    text = json.dumps(data, indent=2, sort_keys=True) + '\n'
    commit_directory(directory, OrderedDict([(PEFT_WEIGHTS_NAME, weights), (PEFT_CONFIG_NAME, text.encode('utf-8'))]),
                     what={PEFT_WEIGHTS_NAME: 'PEFT adapter weights file', PEFT_CONFIG_NAME: 'PEFT adapter config'})
    return directory
