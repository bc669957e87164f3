"""Exception types.

Bad arguments raise the built-in ``TypeError`` / ``ValueError``; problems with files and configuration raise a
subclass of :class:`MindPetError` so callers can catch every toolkit-level failure with one ``except``.
The class names are MindPet 1.0.4's, so code written against it keeps catching the same things.
"""


class MindPetError(Exception):
    """Base class of every error about files, paths and configuration raised by mindpet."""

    def __init__(self, error_info=None):
        super().__init__(error_info)
        self.error_info = error_info

    def __str__(self):
        return self.error_info if self.error_info else ""


# MindPet's first name was "tk": old scripts catch TKError.
TKError = MindPetError


class UnexpectedError(MindPetError):
    """An operation failed for a reason mindpet did not anticipate (the original error is chained)."""


class MakeDirError(MindPetError):
    """A directory could not be created."""


class ReadYamlFileError(MindPetError):
    """A YAML file is missing, unreadable, too large or not valid YAML."""


class LinkPathError(MindPetError):
    """A path that must be a regular file or directory is a symbolic link."""


class AbsolutePathError(MindPetError):
    """A path could not be resolved to an absolute path."""


class PathContentError(MindPetError):
    """A path contains forbidden characters."""


class FileOversizeError(MindPetError):
    """A file is larger than the limit for its kind."""


class ModelConfigKeysInfoError(MindPetError):
    """A model/fine-tune configuration has unknown or missing keys."""


class ModelConfigParamsInfoError(MindPetError):
    """A model/fine-tune configuration has a value of the wrong type or out of range."""


class ModelConfigFreezeInfoError(MindPetError):
    """The ``freeze`` section of a configuration file is missing or malformed."""


class CheckpointError(MindPetError):
    """A checkpoint file is missing, corrupt, or does not fit the network it is loaded into."""


class AdapterConfigError(MindPetError):
    """An adapter directory or its ``adapter_config.yaml`` is missing, malformed or does not fit the model."""
