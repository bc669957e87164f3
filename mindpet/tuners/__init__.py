"""Method configs, the method registry and the tuners behind :func:`mindpet.get_pet_model`.

A method plugs in by defining a config dataclass (derived from :class:`PetConfig`) and a tuner (derived from
:class:`BaseTuner`) in its own module ``mindpet.tuners.<name>`` and calling ``register_method(name, Config,
Tuner)`` there; :func:`config_from_dict` imports that module when a config names the method.
"""
from mindpet.tuners.config import PetConfig
from mindpet.tuners.registry import (register_method, get_method, available_methods, config_from_dict,
                                     config_from_yaml)
from mindpet.tuners.base import BaseTuner
from mindpet.tuners.inject import name_matches
from mindpet.tuners.lora import LoraConfig, LoraTuner

__all__ = ['PetConfig', 'register_method', 'get_method', 'available_methods', 'config_from_dict',
           'config_from_yaml', 'BaseTuner', 'name_matches', 'LoraConfig', 'LoraTuner']
