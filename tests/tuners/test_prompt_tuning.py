"""Prompt tuning through the lifecycle API: PromptTuningConfig wraps the word embedding in EmbeddingWithPrompt;
shared checks in tests/tuner_checks.py (labels extended with extend_labels; disabling recompiles)."""
import numpy as np
import pytest
from mindspore import nn, ops, Tensor

from mindpet import PromptTuningConfig, PetModel, get_pet_model
from mindpet.delta.prompt_tuning import EmbeddingWithPrompt

from tests import tuner_checks as checks
from tests.gpt_like import GPTLike

N = 4


class PromptReadyGPT(GPTLike):
    """GPTLike taking its positions for the embedding output's length (as models fed input embeddings do), so a
    prompt-tuned embedding may lengthen the sequence."""

    def construct(self, input_ids):
        x = self.embed(input_ids)
        x = x + self.pos[:x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class PromptLMLoss(nn.Cell):
    """LM loss with the labels extended by the ignore index at the virtual tokens."""

    def __init__(self, pet):
        super().__init__(auto_prefix=False)
        self.net = pet
        self.prompt = pet.pet_layers['embed'].prompt

    def construct(self, input_ids, labels):
        logits = self.net(input_ids)
        labels = self.prompt.extend_labels(labels)
        return ops.cross_entropy(ops.reshape(logits, (-1, logits.shape[-1])), ops.reshape(labels, (-1,)))


CASE = checks.Case(config_a=PromptTuningConfig(target_modules=['embed'], num_virtual_tokens=N),
                   config_b=PromptTuningConfig(target_modules=['embed'], num_virtual_tokens=N, prompt_init='vocab',
                                               prompt_init_token_ids=[3, 1, 4]),
                   keys_a=['embed'], layer_class=EmbeddingWithPrompt, identity=None, mergeable=False,
                   make_net=PromptReadyGPT, loss=PromptLMLoss, seq=8, lr=0.05, disable_in_graph=False)


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    return checks.trained_pair_once(CASE, tmp_path_factory)


def test_injection_and_the_prompt_is_prepended(graph_mode, tmp_path):
    checks.check_injection(CASE, tmp_path)
    pet = get_pet_model(PromptReadyGPT(), CASE.config_a)
    ids, _ = checks.batch(CASE)
    base = PromptReadyGPT()
    prompt = pet.pet_layers['embed'].prompt.mindpet_delta_prompt_tuning_embedding.asnumpy()
    assert prompt.shape == (N, 32) and 0.005 < prompt.std() < 0.05
    # The same network fed [P; E] by hand.
    table = base.embed.embedding_table.asnumpy()
    x = np.concatenate([np.broadcast_to(prompt, (ids.shape[0], N, 32)), table[ids.asnumpy()]], axis=1)
    hidden = Tensor(x.astype(np.float32)) + base.pos[:N + CASE.seq]
    for block in base.blocks:
        hidden = block(hidden)
    expected = base.lm_head(base.ln_f(hidden)).asnumpy()
    out = pet(ids).asnumpy()
    assert out.shape == (ids.shape[0], N + CASE.seq, 64)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    mask = pet.pet_layers['embed'].prompt.extend_attention_mask(Tensor(np.ones((2, CASE.seq), np.int32)))
    assert mask.shape == (2, N + CASE.seq)


def test_vocab_initialisation_copies_word_embeddings():
    pet = get_pet_model(PromptReadyGPT(), CASE.config_b)
    table = pet.pet_layers['embed'].embedding_table.asnumpy()
    prompt = pet.pet_layers['embed'].prompt.mindpet_delta_prompt_tuning_embedding.asnumpy()
    np.testing.assert_array_equal(prompt, table[[3, 1, 4, 3]])
    with pytest.raises(ValueError, match=r"'prompt_init_token_ids' must lie in \[0, 64\)") as info:
        get_pet_model(PromptReadyGPT(), PromptTuningConfig(target_modules=['embed'], prompt_init='vocab',
                                                           prompt_init_token_ids=[64]))
    assert info.value.field == 'prompt_init_token_ids'





def test_another_prompt_length_switches_exactly_with_a_recompilation(pair, tmp_path, graph_mode):
    pet = PetModel.from_pretrained(PromptReadyGPT(), pair.dir_a, adapter_name='a')
    pet.add_adapter('long', PromptTuningConfig(target_modules=['embed'], num_virtual_tokens=N + 2))
    np.testing.assert_array_equal(pet(pair.ids).asnumpy(), pair.out_a)
    pet.set_adapter('long')
    assert pet(pair.ids).shape == (8, N + 2 + CASE.seq, 64)
    pet.set_adapter('a')
    np.testing.assert_array_equal(pet(pair.ids).asnumpy(), pair.out_a)



def test_yaml():
    checks.check_yaml(CASE.config_b, ('num_virtual_token', 'num_virtual_tokens'),
                      [('num_virtual_tokens', 0, ValueError), ('prompt_init', 'text', ValueError),
                       ('prompt_init_token_ids', [-1], ValueError), ('prompt_init_token_ids', None, ValueError),
                       ('target_modules', None, ValueError)])
    with pytest.raises(ValueError, match="'prompt_init_token_ids' are only used with prompt_init='vocab'"):
        PromptTuningConfig(target_modules=['embed'], prompt_init_token_ids=[1])
