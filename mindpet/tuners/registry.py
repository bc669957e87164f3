"""The method registry: which config class and tuner class serve each method name.

Every parameter-efficient method is described by a config class (a dataclass derived from
:class:`mindpet.tuners.config.PetConfig`) and a tuner class (derived from :class:`mindpet.tuners.base.BaseTuner`)
that knows how to inject, switch, merge and store it. Both are registered under the method's name::

    register_method('lora', LoraConfig, LoraTuner)

and a YAML ``pet:`` section (or any dict) names its method with ``type``::

    pet:
      type: lora
      target_modules: [q_proj, v_proj]
      lora_rank: 8

A method module registers itself when it is imported; :func:`get_method` (and so :func:`config_from_dict`) imports
``mindpet.tuners.<type>`` on demand, so a new method plugs in by adding its own module, without editing this one.
"""
import dataclasses
import importlib
import pkgutil
import re

from mindpet.tuners.base import BaseTuner
from mindpet.tuners.config import PetConfig
from mindpet.utils.exceptions import ModelConfigKeysInfoError, ModelConfigParamsInfoError
from mindpet.utils.io_utils import read_yaml_file
from mindpet.utils.validation import did_you_mean

_METHODS = {}
# Modules of this package that are infrastructure, not methods.
_NOT_METHOD_MODULES = ('base', 'config', 'registry', 'inject', 'hooks')


def register_method(name, config_class, tuner_class):
    """Register a method: ``config_from_dict({'type': name, ...})`` builds ``config_class`` and
    :func:`mindpet.get_pet_model` uses ``tuner_class`` for it.

    Args:
        name (str): the method's name as written in YAML ``type:`` (lower case, e.g. ``'lora'``).
        config_class (type): a dataclass derived from :class:`PetConfig`.
        tuner_class (type): a class derived from :class:`mindpet.tuners.base.BaseTuner`.

    Raises:
        TypeError: wrong argument types.
        ValueError: ``name`` is already registered with other classes.

    Example:
        >>> register_method('lora', LoraConfig, LoraTuner)  # doctest: +SKIP
    """
    owner = 'register_method'
    if not isinstance(name, str) or not re.fullmatch(r'[a-z][a-z0-9_]*', name):
        raise ValueError(f"For '{owner}', the 'name' must be a lower-case identifier, but got {name!r}.")
    if not (isinstance(config_class, type) and issubclass(config_class, PetConfig)
            and dataclasses.is_dataclass(config_class)):
        raise TypeError(f"For '{owner}', the 'config_class' must be a dataclass derived from PetConfig, but got "
                        f"{config_class!r}.")
    if not (isinstance(tuner_class, type) and issubclass(tuner_class, BaseTuner)):
        raise TypeError(f"For '{owner}', the 'tuner_class' must be a class derived from BaseTuner, but got "
                        f"{tuner_class!r}.")
    known = _METHODS.get(name)
    if known is not None and known != (config_class, tuner_class):
        raise ValueError(f"For '{owner}', the method {name!r} is already registered with "
                         f"{known[0].__name__}/{known[1].__name__}.")
    config_class.method = name
    _METHODS[name] = (config_class, tuner_class)


def make_tuner(name):
    """A tuner instance for method ``name`` (its ``method`` attribute set: one tuner class may serve several
    registered methods)."""
    tuner = get_method(name)[1]()
    tuner.method = name
    return tuner


def _import_all_methods():
    package = importlib.import_module('mindpet.tuners')
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_METHOD_MODULES and not info.name.startswith('_'):
            importlib.import_module(f'mindpet.tuners.{info.name}')


def available_methods():
    """Sorted names of every method this installation provides."""
    _import_all_methods()
    return sorted(_METHODS)


def get_method(name):
    """``(config_class, tuner_class)`` registered for ``name``; imports ``mindpet.tuners.<name>`` if needed.

    Raises:
        ValueError: no such method (the message lists them and suggests the closest).
    """
    if name not in _METHODS and isinstance(name, str) and re.fullmatch(r'[a-z][a-z0-9_]*', name):
        try:
            importlib.import_module(f'mindpet.tuners.{name}')
        except ModuleNotFoundError as ex:
            if ex.name != f'mindpet.tuners.{name}':
                raise
    if name not in _METHODS:
        methods = available_methods()
        hint = did_you_mean(name, methods, cutoff=0.5, aside=True)
        raise ValueError(f"Unknown PET method type {name!r}{hint}; available: {methods}.")
    return _METHODS[name]


def config_from_dict(data):
    """Build the registered config class named by ``data['type']``.

    Example:
        >>> cfg = config_from_dict({'type': 'lora', 'target_modules': ['q_proj'], 'lora_rank': 4})
        >>> cfg.lora_rank
        4

    Raises:
        ModelConfigKeysInfoError: ``type`` is missing, or an unknown key.
        ModelConfigParamsInfoError: ``data`` is not a mapping.
        ValueError: an unknown method type (the message lists the available ones).
        TypeError, ValueError: a field of the wrong type or out of range.
    """
    if not isinstance(data, dict):
        raise ModelConfigParamsInfoError(f"A PET config must be a mapping with a 'type' key, but got {data!r} "
                                         f"({type(data).__name__}).")
    if 'type' not in data:
        raise ModelConfigKeysInfoError(f"A PET config needs a 'type' key naming the method (one of "
                                       f"{available_methods()}); got keys {sorted(data)}.")
    config_class, _ = get_method(data['type'])
    return config_class.from_dict(data)


def config_from_yaml(path, section='pet'):
    """Read the ``pet:`` section (or ``section``) of a YAML file into a config.

    Raises:
        ReadYamlFileError: the file is missing or not YAML.
        ModelConfigKeysInfoError: the file has no such section; unknown keys in it.

    Example:
        >>> cfg = config_from_yaml('configs/lora.yaml')  # doctest: +SKIP
    """
    content = read_yaml_file(path, what='PET config')
    if not isinstance(content, dict) or section not in content:
        raise ModelConfigKeysInfoError(f"The config file '{path}' has no '{section}' section.")
    return config_from_dict(content[section])
