"""Method configurations: :class:`PetConfig` (the fields every method shares) and the field checks the method
configs use. A config is a dataclass checked on construction; :func:`mindpet.tuners.registry.config_from_dict`
builds the one a YAML ``pet:`` section names.
"""
import dataclasses
import re
from typing import ClassVar, Dict, List, Optional

import numpy as np
from mindspore import dtype as mstype

from mindpet.utils.exceptions import ModelConfigKeysInfoError, ModelConfigParamsInfoError
from mindpet.utils.validation import (FieldTypeError, FieldValueError, check_int, check_real, check_choice,
                                      check_str_list, check_beta, did_you_mean)

#: the usual :attr:`PetConfig.targets_required`
TARGETS_REQUIRED = 'be a non-empty list of str (cell name patterns)'
#: the names a config's ``compute_dtype`` takes and the dtypes they stand for (None: the base weight's dtype)
COMPUTE_DTYPES = {'float32': mstype.float32, 'float16': mstype.float16, 'bfloat16': mstype.bfloat16}


def check_patterns(owner, name, value, allow_none=True):
    """Check a config field of cell-name patterns: a str is one pattern; each pattern must be a valid regular
    expression. Returns a list (or None)."""
    if isinstance(value, str):
        value = [value]
    value = check_str_list(name, value, owner, allow_none=allow_none)
    for pattern in value or ():
        check_regex(owner, name, pattern)
    return value


def check_regex(owner, name, pattern):
    """Check that ``pattern`` (a str in the config field ``name``) is a valid regular expression (FieldValueError
    naming the field otherwise)."""
    try:
        re.compile(pattern)
    except re.error as ex:
        raise FieldValueError(f"For '{owner}', the pattern {pattern!r} in '{name}' is not a valid regular "
                              f"expression: {ex}.", field=name) from ex


@dataclasses.dataclass
class PetConfig:
    """Fields every method shares. Subclasses add their hyper-parameters as dataclass fields with defaults and
    check them in :meth:`validate` (called on construction and by :meth:`from_dict`).

    Args:
        target_modules (list[str] | str | None): cells to adapt, by cell name as ``cells_and_names()`` reports it
            (``'blocks.0.attn.q_proj'``). A pattern matches a name when it is a regular-expression full match or
            a dot-separated suffix of it (``'q_proj'`` matches every ``*.q_proj``).
        exclude_modules (list[str] | str | None): names matched here are never adapted.
        modules_to_save (list[str] | str | None): cells (same matching) whose parameters stay trainable and are
            stored with the adapter (e.g. a task head).
    """
    method: ClassVar[str] = ''
    #: what ``target_modules`` must be when the method cannot do without it (completes "the 'target_modules'
    #: must ..." in the ValueError for None); '' when None is allowed
    targets_required: ClassVar[str] = ''

    target_modules: Optional[List[str]] = None
    exclude_modules: Optional[List[str]] = None
    modules_to_save: Optional[List[str]] = None

    def __post_init__(self):
        # numpy scalars (np.int64(4) from an array, a sweep, a shape) become plain Python numbers first: a MindSpore
        # shape refuses numpy integers, and YAML cannot write them. numpy bools stay as they are (and are refused
        # where a number is expected, like Python bools).
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.integer):
                setattr(self, field.name, int(value))
            elif isinstance(value, np.floating):
                setattr(self, field.name, float(value))
        self.validate()

    def validate(self):
        """Check and normalise the fields: raise :class:`~mindpet.utils.validation.FieldTypeError` /
        :class:`~mindpet.utils.validation.FieldValueError` (a TypeError / ValueError whose ``field`` names the field;
        the message also gives the value)."""
        owner = type(self).__name__
        self.target_modules = check_patterns(owner, 'target_modules', self.target_modules)
        if self.target_modules is None and self.targets_required:
            raise FieldValueError(f"For '{owner}', the 'target_modules' must {self.targets_required}, but got None.",
                                  field='target_modules')
        self.exclude_modules = check_patterns(owner, 'exclude_modules', self.exclude_modules)
        self.modules_to_save = check_patterns(owner, 'modules_to_save', self.modules_to_save)

    @classmethod
    def field_names(cls):
        """The keys :meth:`from_dict` accepts (besides ``type``)."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data):
        """Build the config from a dict (e.g. a YAML ``pet:`` section); ``type``, if present, must be this method.

        Raises:
            ModelConfigKeysInfoError: an unknown key (the message suggests the closest valid one).
            ModelConfigParamsInfoError: ``data`` is not a mapping, or ``type`` names another method.
            TypeError, ValueError: a field of the wrong type or out of range.
        """
        if not isinstance(data, dict):
            raise ModelConfigParamsInfoError(f"The '{cls.method or cls.__name__}' PET config must be a mapping, "
                                             f"but got {data!r} ({type(data).__name__}).")
        data = dict(data)
        kind = data.pop('type', cls.method)
        if kind != cls.method:
            raise ModelConfigParamsInfoError(f"{cls.__name__} reads 'type: {cls.method}', but got 'type: {kind}'.")
        valid = cls.field_names()
        for key in data:
            if key not in valid:
                hint = did_you_mean(key, valid + ['type'], cutoff=0.5, aside=True)
                raise ModelConfigKeysInfoError(f"Unknown key {key!r} in the '{cls.method}' PET config{hint}; "
                                               f"valid keys: {['type'] + valid}.")
        return cls(**data)

    def to_dict(self):
        """``{'type': method, field: value, ...}`` with plain Python values (YAML-safe)."""
        out = {'type': self.method}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes):
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def check_rank_pattern(owner, value):
    """``None`` or a mapping ``layer name -> kept rank`` (non-negative ints), as AdaLoRA and t-SVD record it when an
    adapter is saved. Returns a plain dict (or None)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FieldTypeError(f"For '{owner}', the 'rank_pattern' must be None or a mapping of layer name -> rank, "
                             f"but got {value!r} ({type(value).__name__}).", field='rank_pattern')
    for name, rank in value.items():
        if not isinstance(name, str):
            raise FieldTypeError(f"For '{owner}', the 'rank_pattern' keys must be layer names (str), but got "
                                 f"{name!r}.", field='rank_pattern')
        check_int(f'rank_pattern[{name!r}]', rank, owner, min_value=0)
    return dict(value)


def check_total_step(owner, value, t_init=0, t_final=0):
    """``None`` or a positive int of training steps that leaves room for ``t_init + t_final``. Returns it."""
    if value is None:
        return None
    check_int('total_step', value, owner)
    if t_init + t_final >= value:
        raise FieldValueError(f"For '{owner}', 't_init' + 't_final' must be < 'total_step' ({value}), but got "
                              f"{t_init} + {t_final}.", field='total_step')
    return value


def check_compute_dtype(owner, value):
    """``None`` or a name in :data:`COMPUTE_DTYPES`. Returns it."""
    if value is not None:
        check_choice('compute_dtype', value, owner, tuple(COMPUTE_DTYPES))
    return value


def resolve_compute_dtype(value, default):
    """The MindSpore dtype a config's ``compute_dtype`` names; ``default`` (the base weight's dtype) for None."""
    return COMPUTE_DTYPES[value] if value else default


@dataclasses.dataclass
class RankScheduleFields:
    """The schedule fields AdaLoRA and t-SVD share (see :class:`mindpet.tuners.adalora.AdaLoraConfig`): the budget
    steps, the importance smoothing, the orthogonality weight, the compute dtype and the recorded rank pattern.

    A config lists it *before* the class holding its own fields (``class C(RankScheduleFields, _COwnFields)``): a
    dataclass puts the fields of a later base first, so these stay last, as they are written to YAML. Its
    ``validate`` calls :meth:`check_schedule` after checking its own fields.
    """
    t_init: int = 0
    t_final: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    compute_dtype: Optional[str] = None
    rank_pattern: Optional[Dict[str, int]] = None

    def check_schedule(self, owner):
        """Check and normalise the schedule fields (TypeError/ValueError naming the field and the value)."""
        check_int('t_init', self.t_init, owner, min_value=0)
        check_int('t_final', self.t_final, owner, min_value=0)
        check_int('delta_t', self.delta_t, owner)
        self.beta1 = check_beta('beta1', self.beta1, owner)
        self.beta2 = check_beta('beta2', self.beta2, owner)
        self.orth_reg_weight = float(check_real('orth_reg_weight', self.orth_reg_weight, owner, min_value=0))
        check_total_step(owner, self.total_step, self.t_init, self.t_final)
        check_compute_dtype(owner, self.compute_dtype)
        self.rank_pattern = check_rank_pattern(owner, self.rank_pattern)
