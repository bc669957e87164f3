"""Causal-LM instruction tuning with no code: the loss covers response tokens only (checked against NumPy, and by
changing prompt tokens), perplexity falls in a run on a tiny decoder, and `mindpet generate` prints text."""
import json

import numpy as np
import pytest
import yaml
import mindspore as ms
from mindspore import Tensor

from mindpet.cli import main
from mindpet.train import text_data
from mindpet.train.generic import NextTokenLoss
from tests.train.text_fixtures import FACTS, instruction_rows, write_jsonl, train_tokenizer
from tests.train.text_models import TinyDecoder

MAX_LENGTH = 12


@pytest.fixture(autouse=True)
def _graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _tokenizer(tmp_path):
    texts = [f"{p} it is {a}" for p, a in FACTS] + ['answer']
    path, vocab = train_tokenizer(tmp_path / 'tokenizer.json', texts, cls_sep=False)
    return path, vocab


def _encode(tmp_path, rows):
    path, _ = _tokenizer(tmp_path)
    tokenizer = text_data.load_tokenizer(path)
    parsed, bad = text_data.read_rows(write_jsonl(tmp_path / 'rows.jsonl', rows))
    assert not bad
    eos = tokenizer.token_to_id('</s>')
    return tokenizer, text_data.instruction_arrays(parsed, tokenizer, MAX_LENGTH, 0, eos)


def test_the_loss_mask_covers_the_response_and_eos_only(tmp_path):
    tokenizer, encoded = _encode(tmp_path, instruction_rows())
    ids, attention, mask = encoded.columns
    first = ids[0]
    prompt = tokenizer.encode('colour of sky\n').ids
    response = tokenizer.encode('it is blue', add_special_tokens=False).ids + [tokenizer.token_to_id('</s>')]
    assert list(first[:len(prompt) + len(response)]) == prompt + response
    assert list(mask[0]) == [0] * len(prompt) + [1] * len(response) + [0] * (MAX_LENGTH - len(prompt) - len(response))
    assert list(attention[0]) == [1] * (len(prompt) + len(response)) + [0] * (MAX_LENGTH - len(prompt) - len(response))
    # Alpaca fields give the same prompt text layout (instruction, blank line, input).
    _, alpaca = _encode(tmp_path, instruction_rows(alpaca=True))
    assert alpaca.columns[2].sum(axis=1).tolist() == mask.sum(axis=1).tolist()


def test_changing_a_prompt_token_leaves_the_loss_mask_and_moves_only_the_prompt(tmp_path):
    rows = instruction_rows()
    _, encoded = _encode(tmp_path, rows)
    changed = [dict(rows[0], prompt=rows[0]['prompt'].replace('sky', 'grass'))] + rows[1:]
    _, other = _encode(tmp_path, changed)
    np.testing.assert_array_equal(other.columns[2], encoded.columns[2])           # same loss mask
    differs = np.nonzero(other.columns[0][0] != encoded.columns[0][0])[0]
    assert len(differs) == 1 and encoded.columns[2][0, differs[0]] == 0           # the token is a prompt token


def test_next_token_loss_equals_the_masked_numpy_reference(tmp_path):
    _, encoded = _encode(tmp_path, instruction_rows()[:4])
    ids, attention, mask = encoded.columns
    vocab = int(ids.max()) + 1
    net = TinyDecoder(vocab, hidden=16, max_length=MAX_LENGTH)
    loss_cell = NextTokenLoss(net)
    value = float(loss_cell(Tensor(ids), Tensor(attention), Tensor(mask)).asnumpy())
    logits = net(Tensor(ids)).asnumpy().astype(np.float64)[:, :-1]
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    targets = ids[:, 1:]
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    weights = mask[:, 1:]
    np.testing.assert_allclose(value, (nll * weights).sum() / weights.sum(), rtol=1e-5)
    # A prompt token's logits do not enter the loss: change the prompt's first target and the loss moves only
    # through the attention of later positions, never through a masked target.
    assert weights[:, :2].sum() == 0


def test_instruction_run_lowers_perplexity_and_generate_prints_text(tmp_path, capsys):
    tokenizer, vocab = _tokenizer(tmp_path)
    rows = instruction_rows()
    train = write_jsonl(tmp_path / 'train.jsonl', rows)
    held = write_jsonl(tmp_path / 'eval.jsonl', rows[:4])
    cfg = {'context': {'mode': 'GRAPH', 'device_target': 'CPU', 'seed': 0},
           'model': {'class': 'tests.train.text_models:TinyDecoder', 'trust_code': True,
                     'config': {'vocab_size': vocab, 'hidden': 32, 'max_length': MAX_LENGTH}, 'loss': 'next_token'},
           'pet': {'type': 'lora', 'target_modules': ['query', 'value', 'ffn'], 'lora_rank': 8, 'lora_alpha': 16,
                   'modules_to_save': ['head']},
           'data': {'train': train, 'eval': held, 'tokenizer': tokenizer, 'max_length': MAX_LENGTH,
                    'sample_prompts': 2, 'max_new_tokens': 4},
           'optimizer': {'type': 'adam'},
           'schedule': {'start_learning_rate': 0.02, 'decay': 'constant'},
           'training': {'epochs': 40, 'batch_size': 8, 'log_interval': 40, 'output_dir': str(tmp_path / 'out'),
                        'plot': False}}
    path = tmp_path / 'lm.yaml'
    path.write_text(yaml.safe_dump(cfg), encoding='utf-8')
    assert main(['finetune', '--config', str(path)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    before, after = metrics['eval']['before'], metrics['eval']['after']
    assert set(after) == {'perplexity', 'loss'}
    assert after['perplexity'] < before['perplexity'] / 4, (before, after)
    np.testing.assert_allclose(after['perplexity'], np.exp(after['loss']), rtol=1e-6)
    assert "[demo] before fine-tuning:" in printed and "'colour of sky' -> " in printed
    assert main(['generate', '--config', str(path), '--adapter', str(tmp_path / 'out' / 'adapter'),
                 '--prompt', 'colour of sky', '--max-new-tokens', '3']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith('[generate] tests.train.text_models:TinyDecoder with adapter ')
    assert lines[1].startswith('colour of sky ') and len(lines[1].split()) > 3, lines
    # Top-k sampling prints text too (seeded).
    assert main(['generate', '--config', str(path), '--adapter', str(tmp_path / 'out' / 'adapter'),
                 '--prompt', 'colour of snow', '--top-k', '3', '--seed', '1']) == 0
    assert capsys.readouterr().out.strip().splitlines()[1].startswith('colour of snow ')


def test_generate_refuses_a_classifier(tmp_path, capsys):
    from tests.train.test_own_model_and_data import classification_files, write_config
    train, tokenizer, vocab = classification_files(tmp_path)
    path = write_config(tmp_path, model={'class': 'tests.train.text_models:TinyTextClassifier', 'trust_code': True,
                                         'config': {'vocab_size': vocab}, 'loss': 'cross_entropy'},
                        data={'train': train, 'tokenizer': tokenizer, 'max_length': 12},
                        pet={'type': 'lora', 'target_modules': ['proj']})
    assert main(['generate', '--config', path, '--prompt', 'hello']) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'generating text needs a causal LM' in err


def test_a_model_with_a_kv_cache_decodes_the_same_tokens_feeding_one_token_per_step(tmp_path):
    from mindpet import LoraConfig, get_pet_model
    from mindpet.train.generic import ModelCall, decode, decode_cached, has_kv_cache
    from tests.train.text_models import CachedTinyDecoder

    class Spy(CachedTinyDecoder):
        fed = []

        def construct(self, input_ids, past_key_values=None, use_cache=False):
            Spy.fed.append(input_ids.shape[1])
            return super().construct(input_ids, past_key_values, use_cache)

    ms.set_seed(4)
    net = CachedTinyDecoder(40, hidden=16, max_length=MAX_LENGTH)
    rng = np.random.default_rng(2)
    for param in net.get_parameters():
        param.set_data(Tensor((rng.standard_normal(param.shape) * 0.8).astype(np.float32)))
    pet = get_pet_model(net, LoraConfig(target_modules=['query', 'value'], lora_rank=2))
    for layer in pet.pet_layers.values():        # a trained-looking adapter: B no longer zero
        layer.mindpet_delta_lora_b.set_data(Tensor(rng.standard_normal(layer.mindpet_delta_lora_b.shape)
                                                   .astype(np.float32)))
    assert has_kv_cache(pet) and not has_kv_cache(TinyDecoder(40, 16, MAX_LENGTH))
    prompt = [3, 7, 1]
    window = decode(ModelCall(pet), prompt, MAX_LENGTH, 8, None, 0)       # GRAPH_MODE, full window each step
    cached = decode_cached(pet, prompt, MAX_LENGTH, 8, None)              # PyNative, one token per step
    assert len(window) == 8 and cached == window
    assert ms.get_context('mode') == ms.GRAPH_MODE                       # restored
    # The cache path feeds the prompt once, then one token per step (a spy counts, in PyNative only).
    weights = {name: Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.8)
               for name, p in CachedTinyDecoder(40, 16, MAX_LENGTH).parameters_dict().items()}
    plain, spy = CachedTinyDecoder(40, 16, MAX_LENGTH), Spy(40, 16, MAX_LENGTH)
    for model in (plain, spy):
        for name, param in model.parameters_dict().items():
            param.set_data(weights[name])
    expected = decode(ModelCall(plain), prompt, MAX_LENGTH, 5, None, 0)
    Spy.fed = []
    assert decode_cached(spy, prompt, MAX_LENGTH, 5, None) == expected
    assert Spy.fed == [3, 1, 1, 1, 1]
