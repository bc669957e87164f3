"""Constants shared across mindpet (and imported by downstream code written for MindPet 1.0.4)."""
import os
import stat

EMPTY_STRING = ''

# os.open flags and permission bits for files mindpet writes (owner read/write only).
DEFAULT_FLAGS = os.O_RDWR | os.O_CREAT
DEFAULT_MODES = stat.S_IWUSR | stat.S_IRUSR

# The PET parameter prefixes and the method names live in mindpet.naming.

MB_SIZE = 1024 * 1024
# Configuration files are small; anything larger is almost certainly the wrong file.
MAX_YAML_MB_SIZE = 10
# Nesting levels a YAML file may have (run configs need fewer than 10).
MAX_YAML_DEPTH = 100

# Training metadata that TrainableParamsCheckPoint stores beside the adapter (epoch, step, ...). Loaders skip these
# names; resume_from_checkpoint reads them.
META_PREFIX = 'mindpet_meta_'
