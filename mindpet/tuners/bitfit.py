"""BitFit (Ben Zaken et al., 2022) for :func:`mindpet.get_pet_model`: train only bias terms.

No layer is replaced and no parameter is added. The adapter *is* a set of the base model's bias Parameters (names
matching ``*bias``, as ``freeze_delta(net, 'bitfit')``): they are trained, stored in the adapter file under their
own names, switched (each adapter's values copied in with ``set_data``, the base values restored when no adapter is
active) and restored by ``unload()`` exactly like the parameters of ``modules_to_save``. Since the trained biases
live in the base layers, the model is always "merged": ``merge()`` changes nothing and ``merge_and_unload()`` returns
the network holding the active adapter's biases.
"""
import dataclasses
import fnmatch

from mindpet.naming import is_pet_param
from mindpet.tuners.base import BaseTuner
from mindpet.tuners.config import PetConfig
from mindpet.tuners.inject import matches_any
from mindpet.tuners.registry import register_method
from mindpet.utils.validation import FieldValueError

BIAS_PATTERN = '*bias'


@dataclasses.dataclass
class BitFitConfig(PetConfig):
    """BitFit for :func:`mindpet.get_pet_model`.

    Args:
        target_modules (list[str] | str | None): cells whose bias terms train, with every bias inside them
            (regex full-match or name suffix; ``'attn'`` trains the biases of every ``*.attn.*`` layer). Default
            None: every bias of the model.
        exclude_modules (list[str] | str | None): cells whose biases stay frozen.
        modules_to_save (list[str] | str | None): cells trained in full and stored with the adapter (a task head).

    Note: MindSpore's ``nn.LayerNorm`` calls its bias ``beta``; name the LayerNorm cells in ``modules_to_save`` to
    train them (gamma included).

    Example:
        >>> BitFitConfig(target_modules=['attn']).to_dict()['type']
        'bitfit'
    """

    def bias_names(self, model):
        """Names of the bias Parameters of ``model`` this config trains (in the model's parameter order).

        Raises:
            ValueError: none (the message lists the patterns and the cells holding biases).
        """
        names, holders = [], []
        for param in model.get_parameters():
            if is_pet_param(param.name) or not fnmatch.fnmatch(param.name, BIAS_PATTERN):
                continue
            owner = param.name.rsplit('.', 1)[0] if '.' in param.name else ''
            holders.append(owner)
            parts = owner.split('.')
            scopes = ['.'.join(parts[:i]) for i in range(1, len(parts) + 1)] if owner else []
            if self.target_modules is not None and not any(matches_any(s, self.target_modules) for s in scopes):
                continue
            if any(matches_any(s, self.exclude_modules) for s in scopes):
                continue
            names.append(param.name)
        if not names:
            raise FieldValueError(f"For 'get_pet_model', the 'bitfit' config's target_modules {self.target_modules} "
                                  f"(exclude_modules {self.exclude_modules}) select no bias parameter "
                                  f"('{BIAS_PATTERN}'); cells with a bias: {list(dict.fromkeys(holders))[:8]}.",
                                  field='target_modules')
        return names


class BitFitTuner(BaseTuner):
    """Adds no layer: the adapter is the selected bias Parameters (see :meth:`BaseTuner.saved_params`)."""

    def inject(self, model, config, layers):
        config.bias_names(model)    # refuse a config selecting nothing before anything changes
        return [], False

    def saved_params(self, model, config):
        return config.bias_names(model)


register_method('bitfit', BitFitConfig, BitFitTuner)
