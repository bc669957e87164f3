"""Constants shared across mindpet (and imported by downstream code written for MindPet 1.0.4)."""
import os
import stat

EMPTY_STRING = ''

# os.open flags and permission bits for files mindpet writes (owner read/write only).
DEFAULT_FLAGS = os.O_RDWR | os.O_CREAT
DEFAULT_MODES = stat.S_IWUSR | stat.S_IRUSR

# Every trainable delta parameter is named ``mindpet_delta_<mode>_...``: freezing, checkpointing and the
# adapter store find them by this prefix without knowing the method.
DELTA_PREFIX = 'mindpet_delta_'
# Non-trainable run-time state of delta Cells (e.g. the LoRA scaling that merge() sets to 0). It lives in
# Parameters because compiled graphs only see Parameter data changes; it is never trained and never required
# in a checkpoint.
STATE_PREFIX = 'mindpet_state_'

# The delta methods freeze_delta knows. Each mode's parameters carry ``mindpet_delta_<mode>_`` in their names,
# except bitfit, which trains the existing bias terms.
DELTA_LIST = ['lora', 'prefixtuning', 'adapter', 'low_rank_adapter', 'bitfit', 'ptuning2']
DELTA_LIST += ['dora', 'ia3', 'prompt_tuning', 'pst', 'adalora', 'tsvd']

MB_SIZE = 1024 * 1024
# Configuration files are small; anything larger is almost certainly the wrong file.
MAX_YAML_MB_SIZE = 10
# Nesting levels a YAML file may have (run configs need fewer than 10).
MAX_YAML_DEPTH = 100

# Training metadata that TrainableParamsCheckPoint stores beside the adapter (epoch, step, ...). Loaders skip these
# names; resume_from_checkpoint reads them.
META_PREFIX = 'mindpet_meta_'
