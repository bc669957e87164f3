"""Adapters on disk: a directory holding ``adapter_config.yaml`` and ``adapter_model.safetensors``.

``adapter_config.yaml`` records the method and its hyper-parameters (the ``pet:`` section, readable by
:func:`mindpet.config_from_dict`), the adapted layers, the parameters of ``modules_to_save`` stored with the
adapter, a fingerprint of the base model (every base parameter's name and shape) so that an adapter is never
loaded into a model it was not trained on, and the SHA-256 of the tensor file (``weights_sha256``: safetensors has
no checksum of its own, so a damaged byte would otherwise load as a wrong number; adapters saved without it load
unchecked). ``adapter_model.safetensors`` holds the adapter tensors only, in the
adapter's own shapes, named ``<layer>.<delta parameter>`` (e.g. ``blocks.0.attn.q_proj.mindpet_delta_lora_a``) and
by their own names for ``modules_to_save`` parameters. No optimizer state is ever written.
"""
import os
from collections import OrderedDict, namedtuple

import numpy as np
import yaml

from mindpet.naming import is_pet_param
from mindpet.utils.exceptions import AdapterConfigError, CheckpointError, MindPetError
from mindpet.utils.io_utils import (atomic_write, atomic_save_checkpoint, load_checkpoint_file, read_yaml_file,
                                    file_sha256)

ADAPTER_CONFIG_NAME = 'adapter_config.yaml'
ADAPTER_WEIGHTS_NAME = 'adapter_model.safetensors'
FORMAT = 'mindpet-adapter/1'

AdapterFiles = namedtuple('AdapterFiles', ['config', 'meta', 'tensors'])
AdapterFiles.__doc__ = """An adapter read from disk: its config object, the YAML mapping, and name -> numpy array."""


def model_fingerprint(net):
    """``name -> shape`` (lists) of every base parameter of ``net``, in order; PET parameters are left out, so an
    adapted model and its base model have the same fingerprint."""
    return OrderedDict((p.name, [int(d) for d in p.shape]) for p in net.get_parameters()
                       if not is_pet_param(p.name))


def check_fingerprint(expected, actual, source, what='this model', allow_extra=False):
    """Refuse a model whose parameters differ from the adapter's base, naming the first differing parameter.

    Args:
        expected (dict): name -> shape recorded with the adapter.
        actual (dict): name -> shape of the model (or base checkpoint) at hand.
        source (str): the adapter directory (for the message).
        what (str): how to call ``actual`` in the message.
        allow_extra (bool): accept names in ``actual`` that ``expected`` lacks (e.g. optimizer state in a
            checkpoint).

    Raises:
        AdapterConfigError: a name is missing from ``actual``, a shape differs, or (unless ``allow_extra``)
            ``actual`` has a parameter the adapter's base model did not have.
    """
    for name, shape in expected.items():
        if name not in actual:
            raise AdapterConfigError(f"The adapter in '{source}' was trained on a base model with parameter "
                                     f"'{name}' {tuple(shape)}, which {what} does not have.")
        if list(actual[name]) != list(shape):
            raise AdapterConfigError(f"The adapter in '{source}' does not fit {what}: parameter '{name}' has shape "
                                     f"{tuple(actual[name])} here but {tuple(shape)} in the adapter's base model.")
    if not allow_extra:
        for name, shape in actual.items():
            if name not in expected:
                raise AdapterConfigError(f"The adapter in '{source}' does not fit {what}: parameter '{name}' "
                                         f"{tuple(shape)} is not in the adapter's base model.")


def expected_tensors(tuner, config, targets, modules_params, fingerprint, source):
    """``name -> shape`` of the tensors an adapter file must hold, from its layers and the base fingerprint."""
    expected = OrderedDict()
    for key, shapes in tuner.adapter_tensor_shapes(list(targets), fingerprint, config, source).items():
        for suffix, shape in shapes.items():
            expected[f'{key}.{suffix}'] = tuple(shape)
    for name in modules_params:
        if name not in fingerprint:
            raise AdapterConfigError(f"The adapter in '{source}' stores module parameter '{name}', which its base "
                                     f"model does not have.")
        expected[name] = tuple(fingerprint[name])
    return expected


def check_tensors(tensors, expected, path):
    """Refuse a tensor file that lacks, adds or reshapes a tensor, naming the first one.

    Raises:
        CheckpointError: the first missing, unexpected or differently shaped tensor.
    """
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"The adapter file '{path}' lacks tensor '{name}' {shape}.")
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(f"The adapter file '{path}' has tensor '{name}' of shape "
                                  f"{tuple(tensors[name].shape)}, but the adapter needs {shape}.")
    extra = [name for name in tensors if name not in expected]
    if extra:
        raise CheckpointError(f"The adapter file '{path}' holds {len(extra)} tensor(s) the adapter does not "
                              f"describe, first: '{extra[0]}'.")


def save_adapter(directory, meta, tensors):
    """Write ``meta`` (plus the tensor file's ``weights_sha256``) as ``adapter_config.yaml`` and ``tensors``
    (name -> numpy array) as safetensors, both atomically. Returns the two paths."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    # ascontiguousarray turns a 0-d array (a scalar state such as PST's sparsity) into shape (1,): keep the shape.
    items = [{'name': name, 'data': ms.Tensor(np.ascontiguousarray(value).reshape(np.shape(value)))}
             for name, value in tensors.items()]
    atomic_save_checkpoint(items, weights_path, ckpt_format='safetensors')
    # Also ties the two files together: a crash between the two renames leaves a config whose checksum does not
    # match the new tensor file, which load refuses instead of mixing two saves.
    meta = dict(meta, weights_sha256=file_sha256(weights_path))
    text = yaml.safe_dump(_plain(meta), sort_keys=False, default_flow_style=None, width=120)

    def _write(tmp_path):
        with open(tmp_path, 'w', encoding='utf-8') as handle:
            handle.write(text)

    atomic_write(config_path, _write)
    return config_path, weights_path


def _plain(value):
    """Python containers and scalars only (safe_dump refuses OrderedDict, tuples and numpy scalars)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


_REQUIRED = ('format', 'pet', 'target_layers', 'modules_to_save_params', 'base_model')


def read_adapter_meta(directory):
    """Read and check ``adapter_config.yaml``; returns ``(config, meta)``.

    Raises:
        AdapterConfigError: the directory or file is missing, a key is missing, or the format is unknown.
    """
    from mindpet.tuners.registry import config_from_dict  # pylint: disable=import-outside-toplevel
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"The adapter directory must be a str path, but got {directory!r} "
                        f"({type(directory).__name__}).")
    directory = os.fspath(directory)
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise AdapterConfigError(f"The adapter directory '{directory}' is a file, not a directory (give the "
                                 f"directory written by save_pretrained).")
    if not os.path.isdir(directory):
        raise AdapterConfigError(f"The adapter directory '{directory}' does not exist.")
    try:
        os.listdir(directory)
    except OSError as ex:
        raise AdapterConfigError(f"The adapter directory '{directory}' cannot be read: {ex.strerror or ex}.") from ex
    if not os.path.isfile(path):
        raise AdapterConfigError(f"The adapter directory '{directory}' has no {ADAPTER_CONFIG_NAME}.")
    meta = read_yaml_file(path, what='adapter config')
    if not isinstance(meta, dict):
        raise AdapterConfigError(f"'{path}' must be a mapping, but holds {type(meta).__name__}.")
    missing = [key for key in _REQUIRED if key not in meta]
    if missing:
        raise AdapterConfigError(f"'{path}' lacks the key(s) {missing}.")
    if meta['format'] != FORMAT:
        raise AdapterConfigError(f"'{path}' has format {meta['format']!r}; this mindpet reads {FORMAT!r}.")
    base = meta['base_model']
    if not isinstance(base, dict) or not isinstance(base.get('params'), dict):
        raise AdapterConfigError(f"'{path}' has no 'base_model.params' mapping (the base-model fingerprint).")
    for key in ('target_layers', 'modules_to_save_params'):
        if not isinstance(meta[key], list) or not all(isinstance(v, str) for v in meta[key]):
            raise AdapterConfigError(f"'{path}': '{key}' must be a list of str, but got {meta[key]!r}.")
    try:
        config = config_from_dict(meta['pet'])
    except (TypeError, ValueError) as ex:
        raise AdapterConfigError(f"'{path}': the 'pet' section is invalid: {ex}") from ex
    except MindPetError as ex:  # e.g. an unknown key: keep the type callers catch, name the file
        raise type(ex)(f"'{path}': the 'pet' section is invalid: {ex}") from ex
    if not isinstance(meta.get('weights_sha256', ''), str):
        raise AdapterConfigError(f"'{path}': 'weights_sha256' must be a str, but got {meta['weights_sha256']!r}.")
    return config, meta


def verify_adapter_weights(directory, meta):
    """Check ``adapter_model.safetensors`` of ``directory`` against the ``weights_sha256`` recorded in ``meta``
    (adapters saved without one pass unchecked).

    Raises:
        CheckpointError: the file's bytes differ from the recorded checksum.
    """
    path = os.path.join(os.fspath(directory), ADAPTER_WEIGHTS_NAME)
    expected = meta.get('weights_sha256')
    if expected and file_sha256(path) != expected:
        raise CheckpointError(f"The adapter weights file '{path}' does not match the SHA-256 recorded in "
                              f"{ADAPTER_CONFIG_NAME}: it was damaged or replaced after saving.")


def read_adapter(directory):
    """Read an adapter directory: its config, YAML mapping and tensors, with the tensors checked against the
    YAML (names and shapes).

    Raises:
        AdapterConfigError: see :func:`read_adapter_meta`.
        CheckpointError: the tensor file is missing, corrupt, or does not match the YAML.

    Example:
        >>> files = read_adapter('out/adapter')  # doctest: +SKIP
        >>> files.config.lora_rank, sorted(files.tensors)[:1]  # doctest: +SKIP
    """
    from mindpet.tuners.registry import make_tuner  # pylint: disable=import-outside-toplevel
    config, meta = read_adapter_meta(directory)
    path = os.path.join(os.fspath(directory), ADAPTER_WEIGHTS_NAME)
    params = load_checkpoint_file(path, what='adapter weights')
    tensors = OrderedDict((name, value.asnumpy()) for name, value in params.items())
    tuner = make_tuner(config.method)
    expected = expected_tensors(tuner, config, meta['target_layers'], meta['modules_to_save_params'],
                                meta['base_model']['params'], directory)
    check_tensors(tensors, expected, path)
    # After the name/shape checks, whose messages say more; this one catches changed values.
    verify_adapter_weights(directory, meta)
    return AdapterFiles(config, meta, tensors)


MergeReport = namedtuple('MergeReport', ['out_path', 'layers', 'module_params', 'copied', 'total_params'])
MergeReport.__doc__ = """What merge_into_checkpoint did: output path, layers merged, modules_to_save parameters
replaced, entries copied unchanged, entries written."""


def merge_into_checkpoint(base_path, adapter_dir, out_path):
    """Write ``out_path``: the base checkpoint with the adapter merged into its weights (the ``mindpet merge``
    command). No network code is needed: the adapter's YAML names the layers and the method.

    The base checkpoint must hold every parameter of the adapter's base-model fingerprint with the same shape;
    other entries (e.g. optimizer state) are copied unchanged. The format follows ``out_path``'s extension
    (``.safetensors`` or ``.ckpt``); the file is written atomically.

    Raises:
        AdapterConfigError: the adapter does not fit the base checkpoint (first differing parameter named).
        CheckpointError: a file is missing or corrupt.

    Example:
        >>> merge_into_checkpoint('base.ckpt', 'out/adapter', 'merged.ckpt')  # doctest: +SKIP
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindpet.tuners.registry import make_tuner  # pylint: disable=import-outside-toplevel
    from mindpet.utils.io_utils import checkpoint_format  # pylint: disable=import-outside-toplevel
    expected = "a path ending in .ckpt or .safetensors (the format follows the extension)"
    if not isinstance(out_path, (str, os.PathLike)):
        raise TypeError(f"For 'merge_into_checkpoint', the 'out_path' must be {expected}, but got {out_path!r} "
                        f"({type(out_path).__name__}).")
    if os.path.splitext(os.fspath(out_path))[1] not in ('.ckpt', '.safetensors'):
        raise ValueError(f"For 'merge_into_checkpoint', the 'out_path' must be {expected}, but got {out_path!r}.")
    files = read_adapter(adapter_dir)
    base = load_checkpoint_file(base_path, what='base checkpoint')
    check_fingerprint(files.meta['base_model']['params'], {n: list(p.shape) for n, p in base.items()},
                      adapter_dir, what=f"the base checkpoint '{base_path}'", allow_extra=True)
    arrays = OrderedDict((name, value.asnumpy()) for name, value in base.items())
    tuner = make_tuner(files.config.method)
    tensors = {}
    for key in files.meta['target_layers']:
        prefix = key + '.'
        tensors[key] = {name[len(prefix):]: value for name, value in files.tensors.items()
                        if name.startswith(prefix) and is_pet_param(name[len(prefix):])}
    updates = tuner.merge_adapter_weights(arrays, files.meta['target_layers'], tensors, files.config)
    modules = files.meta['modules_to_save_params']
    for name in modules:
        updates[name] = files.tensors[name].astype(arrays[name].dtype)
    items = [{'name': name, 'data': ms.Tensor(updates.get(name, value))} for name, value in arrays.items()]
    atomic_save_checkpoint(items, out_path, ckpt_format=checkpoint_format(out_path))
    copied = sum(1 for name in arrays if name not in files.meta['base_model']['params'])
    return MergeReport(os.fspath(out_path), len(files.meta['target_layers']), len(modules), copied, len(items))
