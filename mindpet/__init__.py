"""mindpet: parameter-efficient fine-tuning for MindSpore.

Importing mindpet prints nothing, writes nothing and leaves the MindSpore context as it was.
"""
from mindpet.version import __version__

from mindpet import delta, graph  # noqa: E402  (public sub-packages)

__all__ = ['delta', 'graph', '__version__']

# The adapter lifecycle (inject by name, merge, save/load/switch adapters).
from mindpet.tuners import (PetConfig, LoraConfig, register_method, config_from_dict,  # noqa: E402
                            config_from_yaml)
from mindpet.model import PetModel, get_pet_model  # noqa: E402

__all__ += ['PetConfig', 'LoraConfig', 'register_method', 'config_from_dict', 'config_from_yaml', 'PetModel',
            'get_pet_model']

# More methods for get_pet_model (each registers itself under its YAML 'type').
from mindpet.tuners.ia3 import IA3Config  # noqa: E402

__all__ += ['IA3Config']
from mindpet.tuners.adapter import AdapterConfig  # noqa: E402
from mindpet.tuners.low_rank_adapter import LowRankAdapterConfig  # noqa: E402

__all__ += ['AdapterConfig', 'LowRankAdapterConfig']
from mindpet.tuners.bitfit import BitFitConfig  # noqa: E402

__all__ += ['BitFitConfig']
from mindpet.tuners.prompt_tuning import PromptTuningConfig  # noqa: E402

__all__ += ['PromptTuningConfig']
from mindpet.tuners.prefix_tuning import PrefixTuningConfig  # noqa: E402
from mindpet.tuners.ptuning2 import PTuning2Config  # noqa: E402

__all__ += ['PrefixTuningConfig', 'PTuning2Config']
# Sparse training and adaptive-rank methods (PST, AdaLoRA, the tensorised t-SVD adapter).
from mindpet.tuners.pst import PstConfig  # noqa: E402
from mindpet.tuners.adalora import AdaLoraConfig  # noqa: E402
from mindpet.tuners.tsvd import TensorSVDConfig  # noqa: E402

__all__ += ['PstConfig', 'AdaLoraConfig', 'TensorSVDConfig']
