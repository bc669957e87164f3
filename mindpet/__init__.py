"""mindpet: parameter-efficient fine-tuning for MindSpore.

Importing mindpet prints nothing, writes nothing and leaves the MindSpore context as it was. It also loads nothing
but its version: the public names below and the sub-packages (``mindpet.delta``, ``mindpet.graph``, ...) are
imported on first use, so ``mindpet --help`` and ``mindpet --version`` answer without loading MindSpore.

Example:
    >>> import mindpet
    >>> mindpet.LoraConfig(target_modules=['q_proj'], lora_rank=4).to_dict()['type']
    'lora'
"""
import importlib
import importlib.util

from mindpet.version import __version__

# public name -> the module that defines it
_EXPORTS = {
    # The adapter lifecycle (inject by name, merge, save/load/switch adapters).
    'PetConfig': 'mindpet.tuners.config',
    'register_method': 'mindpet.tuners.registry',
    'config_from_dict': 'mindpet.tuners.registry',
    'config_from_yaml': 'mindpet.tuners.registry',
    'PetModel': 'mindpet.model',
    'get_pet_model': 'mindpet.model',
    # The methods' configs (each method registers itself under its YAML 'type' when its module is imported).
    'LoraConfig': 'mindpet.tuners.lora',
    'IA3Config': 'mindpet.tuners.ia3',
    'AdapterConfig': 'mindpet.tuners.adapter',
    'LowRankAdapterConfig': 'mindpet.tuners.low_rank_adapter',
    'BitFitConfig': 'mindpet.tuners.bitfit',
    'PromptTuningConfig': 'mindpet.tuners.prompt_tuning',
    'PrefixTuningConfig': 'mindpet.tuners.prefix_tuning',
    'PTuning2Config': 'mindpet.tuners.ptuning2',
    'PstConfig': 'mindpet.tuners.pst',
    'AdaLoraConfig': 'mindpet.tuners.adalora',
    'TensorSVDConfig': 'mindpet.tuners.tsvd',
}

__all__ = ['delta', 'graph', '__version__'] + list(_EXPORTS)


def __getattr__(name):
    """Import a public name or a sub-package on first use (PEP 562)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif not name.startswith('_') and importlib.util.find_spec(f'{__name__}.{name}') is not None:
        value = importlib.import_module(f'{__name__}.{name}')
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
