"""mindpet: parameter-efficient fine-tuning for MindSpore.

Importing mindpet prints nothing, writes nothing and leaves the MindSpore context as it was.
"""
__version__ = '1.1.0'

from mindpet import delta, graph  # noqa: E402  (public sub-packages)

__all__ = ['delta', 'graph', '__version__']

# The adapter lifecycle (inject by name, merge, save/load/switch adapters).
from mindpet.tuners import (PetConfig, LoraConfig, register_method, config_from_dict,  # noqa: E402
                            config_from_yaml)
from mindpet.model import PetModel, get_pet_model  # noqa: E402

__all__ += ['PetConfig', 'LoraConfig', 'register_method', 'config_from_dict', 'config_from_yaml', 'PetModel',
            'get_pet_model']

# Sparse training and adaptive-rank methods (PST, AdaLoRA, the tensorised t-SVD adapter).
from mindpet.tuners.pst import PstConfig  # noqa: E402
from mindpet.tuners.adalora import AdaLoraConfig  # noqa: E402
from mindpet.tuners.tsvd import TensorSVDConfig  # noqa: E402

__all__ += ['PstConfig', 'AdaLoraConfig', 'TensorSVDConfig']
