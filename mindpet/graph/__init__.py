"""Graph-level operations: freezing and adapter-only checkpoints."""
from mindpet.graph.freeze_utils import freeze_modules, freeze_delta, freeze_from_config
from mindpet.graph.ckpt_util import (TrainableParamsCheckPoint, load_base_and_delta, save_trainable_params,
                                     LoadReport)
from mindpet.graph.ckpt_util import (resume_from_checkpoint, find_latest_checkpoint, list_checkpoints,
                                     ResumeState, distributed_rank)

__all__ = ['freeze_modules', 'freeze_delta', 'freeze_from_config', 'TrainableParamsCheckPoint',
           'load_base_and_delta', 'save_trainable_params', 'LoadReport']
__all__ += ['resume_from_checkpoint', 'find_latest_checkpoint', 'list_checkpoints', 'ResumeState', 'distributed_rank']
