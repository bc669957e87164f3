"""Freezing: choose which parameters train, by glob pattern, by delta method, or from a YAML file.

Patterns are ``fnmatch`` globs matched against full parameter names (``'*'``, ``'*dense*'``,
``'*.dense.*.bias'``). ``include`` freezes what it matches, ``exclude`` un-freezes what it matches; a name matched
by both is left as it is (MindPet's rule). A pattern that matches no parameter is an error: a mistyped pattern must
not silently train nothing (or everything).
"""
from fnmatch import fnmatchcase

from mindpet.naming import METHOD_ALIASES, VARIANTS, canonical_method, delta_marker, is_state
from mindpet.tuners.registry import available_methods
from mindpet.utils.exceptions import ModelConfigFreezeInfoError
from mindpet.utils.io_utils import read_yaml_file
from mindpet.utils.validation import check_cell, check_str_list, check_choice


def _match(name, patterns):
    return bool(patterns) and any(fnmatchcase(name, pattern) for pattern in patterns)


def _check_patterns_match(owner, arg, patterns, names):
    for pattern in patterns or ():
        if not any(fnmatchcase(name, pattern) for name in names):
            sample = ', '.join(names[:5])
            raise ValueError(f"For '{owner}', the pattern {pattern!r} in '{arg}' matches no parameter of the "
                             f"model (e.g. {sample}).")


def _set_requires_grad(param, value):
    # Run-time state (LoRA scaling etc.) must never become trainable, whatever the patterns say.
    if value and is_state(param.name):
        return
    param.requires_grad = value


def freeze_modules(model, include=None, exclude=None):
    """Freeze the parameters matched by ``include`` and un-freeze those matched by ``exclude``.

    Args:
        model (nn.Cell): the network.
        include (list[str] | None): globs of parameters to freeze.
        exclude (list[str] | None): globs of parameters to make trainable.

    Raises:
        TypeError: ``model`` is not a Cell or a pattern list is not a list of str.
        ValueError: both lists are None or empty, or a pattern matches no parameter.

    Example:
        >>> freeze_modules(net, include=['*'], exclude=['*.classifier.*'])  # doctest: +SKIP
    """
    owner = 'freeze_modules'
    check_cell('model', model, owner)
    include = check_str_list('include', include, owner)
    exclude = check_str_list('exclude', exclude, owner)
    if include is None and exclude is None:
        raise ValueError(f"For '{owner}', 'include' and 'exclude' cannot both be None.")
    params = list(model.parameters_and_names())
    names = [name for name, _ in params]
    _check_patterns_match(owner, 'include', include, names)
    _check_patterns_match(owner, 'exclude', exclude, names)
    for name, param in params:
        frozen, unfrozen = _match(name, include), _match(name, exclude)
        if frozen and not unfrozen:
            _set_requires_grad(param, False)
        elif unfrozen and not frozen:
            _set_requires_grad(param, True)


def freeze_modes():
    """The modes :func:`freeze_delta` accepts: every registered method, the variants with parameters of their own
    (``dora``) and MindPet 1.0.4's spellings (``prefixtuning``)."""
    return sorted(set(available_methods()) | set(VARIANTS) | set(METHOD_ALIASES))


def delta_param_names(model, mode):
    """Names of the parameters that ``mode`` (a registered method or variant) trains: ``*mindpet_delta_<mode>_*``
    (see :func:`mindpet.naming.delta_marker`), or ``*bias`` for bitfit."""
    if mode == 'bitfit':
        return [name for name, _ in model.parameters_and_names() if name.endswith('bias')]
    marker = delta_marker(mode)
    return [name for name, _ in model.parameters_and_names() if name.rsplit('.', 1)[-1].startswith(marker)]


def freeze_delta(model, mode, include=None, exclude=None):
    """Freeze everything except the delta parameters of ``mode``, then apply ``include``/``exclude``.

    The delta parameters are made trainable even if they had been frozen before.

    Args:
        model (nn.Cell): the network.
        mode (str): a method name (``lora``, ``prefix_tuning``, ``adapter``, ``low_rank_adapter``, ``bitfit``,
            ``ptuning2``, ``ia3``, ...; see :func:`freeze_modes`), ``dora``, or MindPet 1.0.4's ``prefixtuning``
            (any case).
        include (list[str] | None): extra globs to freeze afterwards.
        exclude (list[str] | None): extra globs to keep trainable (e.g. the task head).

    Raises:
        ValueError: unknown mode, no parameter of that mode in the model, or a pattern that matches nothing.

    Example:
        >>> freeze_delta(net, 'lora', exclude=['*head*'])  # doctest: +SKIP
    """
    owner = 'freeze_delta'
    check_cell('model', model, owner)
    mode = canonical_method(check_choice('mode', mode, owner, freeze_modes(), case_insensitive=True))
    include = check_str_list('include', include, owner)
    exclude = check_str_list('exclude', exclude, owner)
    trained = set(delta_param_names(model, mode))
    if not trained:
        what = "'*bias'" if mode == 'bitfit' else f"'*{delta_marker(mode)}*'"
        raise ValueError(f"For '{owner}', mode {mode!r} found no parameter named {what} in the model; "
                         f"was the delta Cell added to it?")
    # Check the extra patterns before touching anything, so a bad call leaves the model as it was.
    names = [name for name, _ in model.parameters_and_names()]
    _check_patterns_match(owner, 'include', include, names)
    _check_patterns_match(owner, 'exclude', exclude, names)
    for name, param in model.parameters_and_names():
        _set_requires_grad(param, name in trained)
    if include or exclude:
        freeze_modules(model, include, exclude)


def freeze_from_config(model, config_path):
    """Freeze by the ``freeze: {include: [...], exclude: [...]}`` section of a YAML file.

    Raises:
        ReadYamlFileError: the file is missing or not YAML.
        ModelConfigFreezeInfoError: no ``freeze`` section, or it is malformed.

    Example:
        >>> freeze_from_config(net, 'configs/freeze.yaml')  # doctest: +SKIP
    """
    owner = 'freeze_from_config'
    check_cell('model', model, owner)
    if not isinstance(config_path, str):
        raise TypeError(f"For '{owner}', the 'config_path' must be a str, but got {config_path!r} "
                        f"({type(config_path).__name__}).")
    content = read_yaml_file(config_path, what='freeze config')
    include, exclude = _freeze_lists(content, config_path)
    freeze_modules(model, include, exclude)


def _freeze_lists(content, path):
    if not isinstance(content, dict) or 'freeze' not in content:
        raise ModelConfigFreezeInfoError(f"The config file '{path}' has no 'freeze' section.")
    section = content['freeze']
    if not isinstance(section, dict) or not section:
        raise ModelConfigFreezeInfoError(f"The 'freeze' section of '{path}' must be a mapping with 'include' "
                                         f"and/or 'exclude', but got {section!r}.")
    unknown = sorted(set(section) - {'include', 'exclude'})
    if unknown:
        raise ModelConfigFreezeInfoError(f"The 'freeze' section of '{path}' has unknown key(s) {unknown}; only "
                                         f"'include' and 'exclude' are allowed.")
    lists = []
    for key in ('include', 'exclude'):
        value = section.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise ModelConfigFreezeInfoError(f"'freeze.{key}' in '{path}' must be a list of str, but got "
                                             f"{value!r}.")
        lists.append(value or None)
    if lists == [None, None]:
        raise ModelConfigFreezeInfoError(f"The 'freeze' section of '{path}' lists no pattern.")
    return lists
