"""Every method gets a training hook: without a schedule (LoRA) it is a plain TrainOneStepCell whose loss is the
output; a loaded (frozen) adapter and a scheduled method without a step count are refused with the argument named."""
import pytest
from mindspore import nn

import mindpet
from mindpet import AdaLoraConfig, PetModel, get_pet_model

from tests.gpt_like import GPTLike, LMLoss, token_batch


def test_every_method_gets_a_hook_lora_a_plain_train_step(graph_mode, tmp_path):
    pet = get_pet_model(GPTLike(), mindpet.LoraConfig(target_modules=['q_proj'], lora_rank=2))
    hook = pet.training_hook()                       # no schedule: total_steps not needed
    step = hook.train_network(LMLoss(pet), nn.Adam(pet.trainable_params(), 0.01))
    assert type(step) is nn.TrainOneStepCell  # pylint: disable=unidiomatic-typecheck
    ids, labels = token_batch('shift')
    hook.before_step(0)
    outputs = step(ids, labels)
    hook.after_step(0, outputs)
    assert hook.loss(outputs) is outputs
    pet.save_pretrained(str(tmp_path / 'lora'))
    loaded = PetModel.from_pretrained(GPTLike(), str(tmp_path / 'lora'))
    with pytest.raises(ValueError, match='not trainable'):
        loaded.training_hook()
    ada = get_pet_model(GPTLike(), AdaLoraConfig(target_modules=['q_proj'], init_r=2, target_r=1))
    with pytest.raises(ValueError, match="'total_steps' or set 'total_step'"):
        ada.training_hook()
    with pytest.raises(TypeError, match='total_steps'):
        ada.training_hook(total_steps=2.5)
    rank_hook = ada.training_hook(total_steps=4)
    with pytest.raises(TypeError, match='outputs'):
        rank_hook.after_step(0, 1.0)
