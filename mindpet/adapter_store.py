"""Adapters on disk: the whole schema of an adapter directory, its reading, writing and merging into a checkpoint.

mindpet's own format is a directory holding ``adapter_config.yaml`` and one tensor file,
``adapter_model.<16 hex digits>.safetensors`` (named by its content's SHA-256; adapters saved by mindpet <= 1.1.0
have ``adapter_model.safetensors``, which still loads).

``adapter_config.yaml`` records the method and its hyper-parameters (the ``pet:`` section, readable by
:func:`mindpet.config_from_dict`), the adapted layers, the parameters of ``modules_to_save`` stored with the
adapter, a fingerprint of the base model (every base parameter's name and shape) so that an adapter is never
loaded into a model it was not trained on, the tensor file's name and SHA-256 (``weights_file``,
``weights_sha256``: safetensors has no checksum of its own, so a damaged byte would otherwise load as a wrong
number), and ``adapter_sha256``, a SHA-256 over all the config's fields, so an edited config is refused
(``field_sha256``, a short SHA-256 of each field, lets the refusal name the edited one).
The tensor file holds the adapter tensors only, in the adapter's own shapes, named ``<layer>.<delta parameter>``
(e.g. ``blocks.0.attn.q_proj.mindpet_delta_lora_a``) and by their own names for ``modules_to_save`` parameters.
No optimizer state is ever written.

A save is one unit (see :mod:`mindpet.utils.dir_commit` and ``doc/checkpoints.md``): the config, renamed into place
last, is the single commit point; a reader gets the old adapter or the new one, never a mix.

Other formats (Hugging Face PEFT's) plug in through :data:`_FORMATS`: :func:`load_adapter_dir` and
:func:`save_adapter_dir` dispatch, and every format reads and writes a :class:`StoredAdapter`.
"""
import contextlib
import hashlib
import importlib
import json
import os
import re
from collections import OrderedDict, namedtuple

import numpy as np
import yaml
from safetensors.numpy import load as safetensors_arrays, save as safetensors_bytes

from mindpet.delta.layer_kinds import canonical_arrays, canonical_fingerprint, stored_updates
from mindpet.naming import is_pet_param
from mindpet.tuners.registry import config_from_dict, make_tuner
from mindpet.utils.dir_commit import READ_ATTEMPTS, directory_lock, remove_temp_files, saved_while_read, write_file
from mindpet.utils.exceptions import AdapterConfigError, CheckpointError, LinkPathError, MindPetError
from mindpet.utils.io_utils import (atomic_save_checkpoint, checkpoint_format, checkpoint_write_errors, ensure_dir,
                                    load_checkpoint_file, read_yaml_file, remove_stale_temp_files)
from mindpet.version import __version__

ADAPTER_CONFIG_NAME = 'adapter_config.yaml'
ADAPTER_WEIGHTS_NAME = 'adapter_model.safetensors'
FORMAT = 'mindpet-adapter/1'

StoredAdapter = namedtuple('StoredAdapter', ['name', 'config', 'targets', 'layers', 'modules', 'fingerprint',
                                             'layer_types'], defaults=(None,))
StoredAdapter.__doc__ = """One adapter as it goes to and comes from disk, in any format.

Fields: ``name`` (str or None), ``config`` (the method's PetConfig, as saved), ``targets`` (list of adapted layer
keys, e.g. ``'blocks.0.attn.q_proj'``), ``layers`` (layer key -> {delta parameter suffix: numpy array}),
``modules`` (``modules_to_save`` parameter name -> numpy array), ``fingerprint`` (base parameter name -> shape, or
None when the format records no base model), ``layer_types`` (layer key -> name of its
:mod:`mindpet.delta.layer_kinds` kind for the adapted layers that are not ``nn.Dense``; None or empty when all are)."""


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


def build_meta(adapter):
    """The ``adapter_config.yaml`` mapping of ``adapter`` (a :class:`StoredAdapter`), without ``weights_sha256``
    (added by the writer from the bytes it writes)."""
    fingerprint = adapter.fingerprint
    meta = {
        'format': FORMAT,
        'mindpet_version': __version__,
        'adapter_name': adapter.name,
        'pet': adapter.config.to_dict(),
        'target_layers': list(adapter.targets),
        'modules_to_save_params': list(adapter.modules),
        'base_model': {'num_parameters': int(sum(int(np.prod(s)) for s in fingerprint.values())),
                       'params': OrderedDict((name, [int(d) for d in shape]) for name, shape in fingerprint.items())},
    }
    if adapter.layer_types:
        # Absent for Dense-only adapters, whose files stay as before.
        meta['layer_types'] = dict(adapter.layer_types)
    return meta


def flat_tensors(adapter):
    """``name -> array`` as stored in the tensor file: ``<layer>.<delta parameter>`` for every adapted layer, then
    the ``modules_to_save`` parameters by their own names."""
    flat = OrderedDict()
    for key in adapter.targets:
        for suffix, value in adapter.layers[key].items():
            flat[f'{key}.{suffix}'] = value
    flat.update(adapter.modules)
    return flat


def group_tensors(flat, targets, module_names):
    """Inverse of :func:`flat_tensors`: ``(layers, modules)`` with ``layers[key][suffix]`` and ``modules[name]``."""
    layers = OrderedDict()
    for key in targets:
        prefix = key + '.'
        layers[key] = OrderedDict((name[len(prefix):], value) for name, value in flat.items()
                                  if name.startswith(prefix) and is_pet_param(name[len(prefix):]))
    modules = OrderedDict((name, flat[name]) for name in module_names)
    return layers, modules


def weights_file_name(data):
    """The name of a tensor file holding ``data`` (bytes): ``adapter_model.<first 16 hex digits of its
    SHA-256>.safetensors``. Named by content, a file is never rewritten with other bytes, so a reader that found it
    through a config reads the bytes that config describes."""
    return f'adapter_model.{hashlib.sha256(data).hexdigest()[:16]}.safetensors'


_WEIGHTS_FILE_RE = re.compile(r'^adapter_model\.[0-9a-f]{16}\.safetensors$')


def _meta_sha256(meta):
    """SHA-256 over every field of an adapter config but ``adapter_sha256`` itself, in a canonical form (the
    config's ``weights_sha256`` ties the tensor file's bytes in)."""
    return _sha256({key: value for key, value in meta.items() if key != 'adapter_sha256'})


def _sha256(value):
    text = json.dumps(value, sort_keys=True, separators=(',', ':'), ensure_ascii=True)
    return hashlib.sha256(text.encode('ascii')).hexdigest()


def _field_digests(meta):
    """``field -> first 8 hex digits of its SHA-256`` for every field of an adapter config (each key of ``pet``
    on its own, as ``pet.<key>``) but the checksums themselves: recorded as ``field_sha256``, they let a refused
    config name the field that was edited."""
    digests = {}
    for key, value in meta.items():
        if key in ('adapter_sha256', 'field_sha256'):
            continue
        if key == 'pet' and isinstance(value, dict):
            digests.update((f'pet.{name}', _sha256(item)[:8]) for name, item in value.items())
        else:
            digests[key] = _sha256(value)[:8]
    return digests


def _edited_fields(meta):
    """The fields of a config whose SHA-256 check failed that differ from the ``field_sha256`` it records (added
    and removed ones included); empty when it records none, or when only ``field_sha256`` itself was changed."""
    recorded = meta.get('field_sha256')
    if not isinstance(recorded, dict):
        return []
    now = _field_digests(meta)
    return sorted(key for key in set(recorded) | set(now) if recorded.get(key) != now.get(key))


def _save_mindpet_dir(directory, adapter):
    """Write ``adapter`` in mindpet's own format, as one unit, into the existing ``directory`` whose writer lock
    the caller holds (:func:`save_adapter_dir`).

    Temporary files of killed saves are removed; the tensor file is written under
    its content name (:func:`weights_file_name`); ``adapter_config.yaml``, written last and renamed into place, is
    the commit point; tensor files no config names any more are removed. The config records the tensor file's name
    and SHA-256 and ``adapter_sha256``, a SHA-256 over all its fields, so an edited config is refused on load.
    """
    # ascontiguousarray turns a 0-d array (a scalar state such as PST's sparsity) into shape (1,): keep the shape.
    data = safetensors_bytes({name: np.ascontiguousarray(value).reshape(np.shape(value))
                              for name, value in flat_tensors(adapter).items()})
    weights_name = weights_file_name(data)
    meta = dict(build_meta(adapter), weights_file=weights_name, weights_sha256=hashlib.sha256(data).hexdigest())
    text = yaml.safe_dump(_plain(meta), sort_keys=False, default_flow_style=None, width=120)
    # Hash what a reader will parse, so that the YAML round trip cannot make the two sides differ.
    text += yaml.safe_dump({'field_sha256': _field_digests(yaml.safe_load(text))}, default_flow_style=False)
    text += yaml.safe_dump({'adapter_sha256': _meta_sha256(yaml.safe_load(text))})
    weights_path = os.path.join(directory, weights_name)
    remove_temp_files(directory, [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, _WEIGHTS_FILE_RE])
    # Tensor files of saves killed before their commit: without this, kills in a row would pile them up.
    _remove_unnamed_weights(directory, _committed_weights(directory))
    existed = os.path.exists(weights_path)
    write_file(weights_path, data, what='adapter weights file')
    try:
        write_file(os.path.join(directory, ADAPTER_CONFIG_NAME), text.encode('utf-8'), what='adapter config')
    except BaseException:
        if not existed:   # no config names it: a failed save leaves the directory as it was
            with contextlib.suppress(OSError):
                os.remove(weights_path)
        raise
    _remove_unnamed_weights(directory, weights_name)
    return directory


def _committed_weights(directory):
    """The tensor file name the directory's config names, or None when there is no readable config (then no
    tensor file is known to be unnamed)."""
    try:
        return read_adapter_meta(directory)[1].get('weights_file', ADAPTER_WEIGHTS_NAME)
    except (MindPetError, OSError):
        return None


def _remove_unnamed_weights(directory, keep):
    """Remove the tensor files of ``directory`` but ``keep`` (nothing when ``keep`` is None). A reader that read an
    older config and finds its file gone reads the config again (:func:`_read_committed`)."""
    if keep is None:
        return
    for entry in os.listdir(directory):
        if entry != keep and (entry == ADAPTER_WEIGHTS_NAME or _WEIGHTS_FILE_RE.match(entry)):
            with contextlib.suppress(OSError):   # e.g. open by a reader on Windows: removed by the next save
                os.remove(os.path.join(directory, entry))


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


def _check_adapter_dir(directory):
    """The adapter directory as a str, after checking that it is a readable directory."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"The adapter directory must be a str path, but got {directory!r} "
                        f"({type(directory).__name__}).")
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise AdapterConfigError(f"The adapter directory '{directory}' is a file, not a directory (give the "
                                 f"directory written by save_pretrained).")
    if not os.path.isdir(directory):
        raise AdapterConfigError(f"The adapter directory '{directory}' does not exist.")
    try:
        os.listdir(directory)
    except OSError as ex:
        raise AdapterConfigError(f"The adapter directory '{directory}' cannot be read: {ex.strerror or ex}.") from ex
    return directory


def read_adapter_meta(directory):
    """Read and check the ``adapter_config.yaml`` of a mindpet-format adapter directory; returns
    ``(config, meta)``.

    Raises:
        AdapterConfigError: the directory or file is missing, a key is missing, or the format is unknown.
    """
    directory = _check_adapter_dir(directory)
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
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
    for key in ('weights_sha256', 'adapter_sha256'):
        if not isinstance(meta.get(key, ''), str):
            raise AdapterConfigError(f"'{path}': '{key}' must be a str, but got {meta[key]!r}.")
    if 'weights_file' in meta:
        if not isinstance(meta['weights_file'], str) or not _WEIGHTS_FILE_RE.match(meta['weights_file']):
            raise AdapterConfigError(f"'{path}': 'weights_file' must be a name like "
                                     f"'adapter_model.0123456789abcdef.safetensors', but got {meta['weights_file']!r}.")
        if 'adapter_sha256' not in meta:
            raise AdapterConfigError(f"'{path}' lacks 'adapter_sha256' (the SHA-256 over its fields that every "
                                     f"adapter with a 'weights_file' records).")
    return config, meta


def adapter_weights_path(directory):
    """Path of the tensor file the ``adapter_config.yaml`` of ``directory`` names (``adapter_model.safetensors``
    for adapters saved before tensor files were named by content)."""
    _, meta = read_adapter_meta(directory)
    return os.path.join(os.fspath(directory), meta.get('weights_file', ADAPTER_WEIGHTS_NAME))


def _read_bytes(path, what):
    if os.path.islink(path):
        raise LinkPathError(f"The {what} file '{path}' is a symbolic link; give the real path.")
    try:
        with open(path, 'rb') as handle:
            data = handle.read()
    except FileNotFoundError:
        raise
    except IsADirectoryError as ex:
        raise CheckpointError(f"The {what} file '{path}' is a directory, not a file.") from ex
    except OSError as ex:
        raise CheckpointError(f"The {what} file '{path}' cannot be read: {ex.strerror or ex}.") from ex
    if not data:
        raise CheckpointError(f"The {what} file '{path}' is empty.")
    return data


# A writer commits between a reader's reading the config and opening the tensor file it names (which that writer
# then removes): the reader reads the new config and tries again (up to READ_ATTEMPTS times).


def _read_committed(directory):
    """``(config, meta, path, data)`` of one committed save: the config and the bytes of the tensor file it
    names."""
    for attempt in range(READ_ATTEMPTS):
        config, meta = read_adapter_meta(directory)
        path = os.path.join(directory, meta.get('weights_file', ADAPTER_WEIGHTS_NAME))
        try:
            return config, meta, path, _read_bytes(path, 'adapter weights')
        except FileNotFoundError as ex:
            if attempt + 1 < READ_ATTEMPTS and read_adapter_meta(directory)[1] != meta:
                continue
            raise CheckpointError(f"The adapter weights file '{path}' does not exist.") from ex
    raise saved_while_read(directory)


def _load_mindpet_dir(directory):
    """Read a mindpet-format adapter directory, its tensors checked against its YAML (names and shapes) and both
    files against the SHA-256 values its config records."""
    config, meta, path, data = _read_committed(directory)
    try:
        flat = safetensors_arrays(data)
    except Exception as ex:  # safetensors raises its own SafetensorError for torn or foreign files
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise CheckpointError(f"The adapter weights file '{path}' could not be read (truncated or corrupt?): "
                              f"{first}") from ex
    fingerprint = meta['base_model']['params']
    layer_types = meta.get('layer_types')
    # The tuners derive adapter shapes from each layer's weight in the (out, in) view of its layer type.
    expected = expected_tensors(make_tuner(config.method), config, meta['target_layers'],
                                meta['modules_to_save_params'],
                                canonical_fingerprint(fingerprint, layer_types, directory), directory)
    _refuse_foreign_tensors(flat, expected, path)
    check_tensors(flat, expected, path)
    # After the name/shape checks, whose messages say more; these catch changed values.
    if meta.get('weights_sha256') and hashlib.sha256(data).hexdigest() != meta['weights_sha256']:
        raise CheckpointError(f"The adapter weights file '{path}' does not match the SHA-256 recorded in "
                              f"{ADAPTER_CONFIG_NAME}: it was damaged or replaced after saving.")
    if 'adapter_sha256' in meta and _meta_sha256(meta) != meta['adapter_sha256']:
        edited = _edited_fields(meta)
        which = f" (edited: {', '.join(repr(key) for key in edited)})" if edited else ''
        raise AdapterConfigError(f"'{os.path.join(directory, ADAPTER_CONFIG_NAME)}' was edited after saving: its "
                                 f"fields no longer match its SHA-256 ('adapter_sha256'){which}. Change an adapter "
                                 f"by loading it and saving it again.")
    layers, modules = group_tensors(flat, meta['target_layers'], meta['modules_to_save_params'])
    return StoredAdapter(meta.get('adapter_name'), config, list(meta['target_layers']), layers, modules,
                         OrderedDict(fingerprint), layer_types)


def _refuse_foreign_tensors(flat, expected, path):
    """A clearer error than "lacks tensor" for a tensor file that holds none of the adapter's tensors (e.g. Hugging
    Face PEFT's ``base_model.model.<module>.lora_A.weight``, copied in)."""
    if flat and not any(name in flat for name in expected):
        raise CheckpointError(f"The adapter weights file '{path}' holds none of the adapter's tensors (first by "
                              f"name: '{min(flat)}'): it is of another format, such as Hugging Face PEFT's, whose "
                              f"directory holds its own config ({_FORMATS['peft'][0]}).")


# Adapter directory formats: the config file that identifies a directory of that format, and the module that
# reads and writes it (None: this module). A format module has ``save_adapter_dir(directory, adapter)`` (writes a
# StoredAdapter into the existing directory, whose writer lock the caller holds; returns the directory) and ``load_adapter_dir(directory)`` (returns a StoredAdapter whose
# ``fingerprint`` may be None when the format records no base model). 'peft' is Hugging Face PEFT's layout
# (``adapter_config.json`` + ``adapter_model.safetensors``), imported only when used.
_FORMATS = OrderedDict([
    ('mindpet', (ADAPTER_CONFIG_NAME, None)),
    ('peft', ('adapter_config.json', 'mindpet.peft_format')),
])


def check_format(fmt, owner):
    """``fmt`` if it names a known adapter directory format, else ValueError naming the 'format' argument."""
    if not isinstance(fmt, str) or fmt not in _FORMATS:
        raise ValueError(f"For '{owner}', the 'format' must be one of {list(_FORMATS)}, but got {fmt!r}.")
    return fmt


def _format_io(fmt):
    """``(save, load)`` functions of format ``fmt``."""
    module_name = _FORMATS[fmt][1]
    if module_name is None:
        return _save_mindpet_dir, _load_mindpet_dir
    try:
        module = importlib.import_module(module_name)
    except ImportError as ex:
        raise ValueError(f"The adapter format {fmt!r} is not available in this installation "
                         f"({module_name}: {ex}).") from ex
    return module.save_adapter_dir, module.load_adapter_dir


def detect_format(directory):
    """The format of an adapter directory, from the config file it holds (mindpet's own first).

    Raises:
        AdapterConfigError: the path is not a readable directory, or it holds no known config file.
    """
    directory = _check_adapter_dir(directory)
    found = [fmt for fmt, (config_name, _) in _FORMATS.items()
             if os.path.isfile(os.path.join(directory, config_name))]
    if len(found) > 1:
        # save_adapter_dir never makes such a directory; which adapter a reader should take is unknowable.
        names = [_FORMATS[fmt][0] for fmt in found]
        raise AdapterConfigError(f"The adapter directory '{directory}' holds adapters of {len(found)} formats "
                                 f"({', '.join(f'{fmt!r}: {name}' for fmt, name in zip(found, names))}); keep one "
                                 f"adapter per directory.")
    if found:
        return found[0]
    others = [config_name for config_name, _ in list(_FORMATS.values())[1:]]
    raise AdapterConfigError(f"The adapter directory '{directory}' has no {ADAPTER_CONFIG_NAME} (nor another "
                             f"known adapter config: {others}).")


def save_adapter_dir(directory, adapter, fmt='mindpet'):
    """Write ``adapter`` (a :class:`StoredAdapter`) to ``directory`` (created if needed) in format ``fmt``
    ('mindpet': ``adapter_config.yaml`` + the tensor file, as one unit; 'peft': Hugging Face PEFT's layout), holding
    the directory's writer lock (:func:`mindpet.utils.dir_commit.directory_lock`). Returns the directory (str).

    Example:
        >>> save_adapter_dir('out/task_a', adapter)  # doctest: +SKIP
    """
    check_format(fmt, 'save_adapter_dir')
    save, _ = _format_io(fmt)
    directory = ensure_dir(os.fspath(directory), what='adapter directory')
    # Every format's writers are serialised; the format's writer runs with the lock held.
    with directory_lock(directory):
        for other, (config_name, _) in _FORMATS.items():
            if other != fmt and os.path.isfile(os.path.join(directory, config_name)):
                # Two configs in one directory: a reader would take the other format's (stale) adapter.
                raise AdapterConfigError(f"The directory '{directory}' holds a {other!r} adapter ({config_name}); "
                                         f"saving a {fmt!r} adapter beside it would leave two. Save into another "
                                         f"directory, or remove that adapter first.")
        # PEFT saves of mindpet <= 1.1 wrote with io_utils.atomic_write, whose killed writers left these.
        remove_stale_temp_files(directory, 'adapter_')
        return save(directory, adapter)


def load_adapter_dir(directory):
    """Read an adapter directory of any known format (see :func:`detect_format`) into a :class:`StoredAdapter`,
    its tensors checked against its config (names and shapes) and, for mindpet's format, its checksum.

    Raises:
        AdapterConfigError: the directory or its config is missing or malformed.
        CheckpointError: the tensor file is missing, corrupt, or does not match the config.

    Example:
        >>> adapter = load_adapter_dir('out/adapter')  # doctest: +SKIP
        >>> adapter.config.lora_rank, adapter.targets[:1]  # doctest: +SKIP
    """
    _, load = _format_io(detect_format(directory))
    return load(os.fspath(directory))


def check_adapter_fits(adapter, fingerprint, source, what='this model', allow_extra=False, layer_types=None):
    """Refuse ``adapter`` (a :class:`StoredAdapter`) for a model of base fingerprint ``fingerprint`` (name ->
    shape, from :func:`model_fingerprint` or a base checkpoint): its recorded base fingerprint must match (see
    :func:`check_fingerprint`); an adapter that records none must have the tensor shapes its config implies for
    that model. ``layer_types`` (layer key -> kind name, e.g. from
    :func:`mindpet.delta.layer_kinds.model_layer_types`) stands in for an adapter that records no layer types.

    Raises:
        AdapterConfigError: another base model (the first differing parameter named).
        CheckpointError: a tensor missing, extra or of another shape.
    """
    if adapter.fingerprint is not None:
        check_fingerprint(adapter.fingerprint, fingerprint, source, what=what, allow_extra=allow_extra)
        return
    expected = expected_tensors(make_tuner(adapter.config.method), adapter.config, adapter.targets,
                                list(adapter.modules),
                                canonical_fingerprint(fingerprint, _target_types(adapter, layer_types), source),
                                source)
    check_tensors(flat_tensors(adapter), expected, source)


def _target_types(adapter, layer_types):
    """The layer types of ``adapter``'s targets: recorded with it, else taken from ``layer_types``."""
    if adapter.layer_types is not None:
        return adapter.layer_types
    return {key: name for key, name in (layer_types or {}).items() if key in adapter.targets}


MergeReport = namedtuple('MergeReport', ['out_path', 'layers', 'module_params', 'copied', 'total_params'])
MergeReport.__doc__ = """What merge_into_checkpoint did: output path, layers merged, modules_to_save parameters
replaced, entries copied unchanged, entries written."""


def merge_into_checkpoint(base_path, adapter_dir, out_path, base_params=None):
    """Write ``out_path``: the base checkpoint with the adapter merged into its weights (the ``mindpet merge``
    command). No network code is needed: the adapter's YAML names the layers and the method.

    The base checkpoint must hold every parameter of the adapter's base-model fingerprint with the same shape;
    other entries (e.g. optimizer state) are copied unchanged. The format follows ``out_path``'s extension
    (``.safetensors`` or ``.ckpt``); the file is written atomically.

    ``base_params`` (name -> numpy array) replaces reading ``base_path`` (which then only names the base in
    messages): the parameters of a network into which a model's own loader read a checkpoint of another naming,
    e.g. Hugging Face's (``mindpet merge --config``).

    Raises:
        AdapterConfigError: the adapter does not fit the base checkpoint (first differing parameter named).
        CheckpointError: a file is missing or corrupt, or ``out_path`` cannot be written (disk full, permission);
            a file already at ``out_path`` then stays as it was.

    Example:
        >>> merge_into_checkpoint('base.ckpt', 'out/adapter', 'merged.ckpt')  # doctest: +SKIP
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    expected = "a path ending in .ckpt or .safetensors (the format follows the extension)"
    if not isinstance(out_path, (str, os.PathLike)):
        raise TypeError(f"For 'merge_into_checkpoint', the 'out_path' must be {expected}, but got {out_path!r} "
                        f"({type(out_path).__name__}).")
    if os.path.splitext(os.fspath(out_path))[1] not in ('.ckpt', '.safetensors'):
        raise ValueError(f"For 'merge_into_checkpoint', the 'out_path' must be {expected}, but got {out_path!r}.")
    adapter = load_adapter_dir(adapter_dir)
    if base_params is None:
        base = OrderedDict((name, value.asnumpy())
                           for name, value in load_checkpoint_file(base_path, what='base checkpoint').items())
    else:
        base = OrderedDict(base_params)
    base_shapes = OrderedDict((name, list(value.shape)) for name, value in base.items())
    check_adapter_fits(adapter, base_shapes, adapter_dir, what=f"the base checkpoint '{base_path}'",
                       allow_extra=True)
    arrays = base
    tuner = make_tuner(adapter.config.method)
    # The tuners merge on each layer's weight in the (out, in) view of its layer type.
    updates = tuner.merge_adapter_weights(canonical_arrays(arrays, adapter.layer_types, adapter_dir),
                                          adapter.targets, adapter.layers, adapter.config)
    updates = stored_updates(updates, arrays, adapter.layer_types, adapter_dir)
    for name, value in adapter.modules.items():
        updates[name] = value.astype(arrays[name].dtype)
    items = [{'name': name, 'data': ms.Tensor(updates.get(name, value))} for name, value in arrays.items()]
    with checkpoint_write_errors(out_path):
        atomic_save_checkpoint(items, out_path, ckpt_format=checkpoint_format(out_path))
    copied = sum(1 for name in arrays if name not in (adapter.fingerprint or base_shapes))
    return MergeReport(os.fspath(out_path), len(adapter.targets), len(adapter.modules), copied, len(items))
