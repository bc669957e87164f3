"""Which parameters belong to a PET method, and what the methods are called: the one place for both.

Every parameter a delta Cell adds is named by its Cell attribute, and that name starts with one of two prefixes:

* ``mindpet_delta_<mode>_...``: a trainable delta parameter (``mindpet_delta_lora_a``). Freezing, checkpointing,
  the adapter store and switching find an adapter's tensors by this prefix without knowing the method.
* ``mindpet_state_<mode>_...``: run-time state of a delta Cell (the LoRA scaling that ``merge()`` sets to 0, the
  gates that switch a branch off). It lives in Parameters because compiled graphs only see Parameter data
  changes; it is never trained and never required from a checkpoint.

A parameter's *name* here is its full name (``blocks.0.q_proj.mindpet_delta_lora_a``) or its last component; the
predicates look at the last component only, so a layer called ``mindpet_delta_x`` does not make its base weight a
delta parameter.

Methods are called by their registry names (``mindpet.tuners.available_methods()``, the YAML ``type:``), e.g.
``prefix_tuning``. MindPet 1.0.4's ``freeze_delta`` modes spell one of them differently (``prefixtuning``); that
spelling is accepted as an alias (:data:`METHOD_ALIASES`) and is also the ``<mode>`` in that method's parameter
names (:func:`delta_marker`), which stay as MindPet 1.0.4 wrote them so its checkpoints load.

Example:
    >>> is_delta('blocks.0.q_proj.mindpet_delta_lora_a'), is_state('q.mindpet_state_lora_scaling')
    (True, True)
    >>> is_pet_param('blocks.0.q_proj.weight'), canonical_method('PrefixTuning'), delta_marker('prefix_tuning')
    (False, 'prefix_tuning', 'mindpet_delta_prefixtuning_')
"""

DELTA_PREFIX = 'mindpet_delta_'
STATE_PREFIX = 'mindpet_state_'

#: MindPet 1.0.4 spellings of a method name -> the registry's name
METHOD_ALIASES = {'prefixtuning': 'prefix_tuning'}
#: method variants whose parameters carry their own ``<mode>`` -> the registered method that builds them
VARIANTS = {'dora': 'lora'}
# The reverse, for the ``<mode>`` part of parameter names (MindPet 1.0.4's spelling is part of the file format).
_PARAM_MODES = {method: alias for alias, method in METHOD_ALIASES.items()}


def _last(name):
    return name.rsplit('.', 1)[-1]


def is_delta(name):
    """True when parameter ``name`` is a trainable delta parameter (last component ``mindpet_delta_...``)."""
    return _last(name).startswith(DELTA_PREFIX)


def is_state(name):
    """True when parameter ``name`` is delta-Cell run-time state (last component ``mindpet_state_...``)."""
    return _last(name).startswith(STATE_PREFIX)


def is_pet_param(name):
    """True when parameter ``name`` was added by a PET method (a delta parameter or state); False for base
    parameters, whose names and shapes form a model's fingerprint."""
    return is_delta(name) or is_state(name)


def canonical_method(name):
    """The registry's name for method ``name``: lower case, MindPet 1.0.4 aliases (``prefixtuning``) mapped. A
    non-str is returned unchanged (the caller's check reports it)."""
    if not isinstance(name, str):
        return name
    name = name.lower()
    return METHOD_ALIASES.get(name, name)


def delta_marker(method):
    """The prefix of the delta parameters of registered method ``method`` (``mindpet_delta_lora_``)."""
    return f'{DELTA_PREFIX}{_PARAM_MODES.get(method, method)}_'
