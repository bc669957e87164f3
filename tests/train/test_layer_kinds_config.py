"""A run config (`mindpet finetune`'s YAML) targets the layer types of mindpet.delta.layer_kinds like nn.Dense:
a user's model of mint.nn.Linear and nn.Embedding layers is adapted by `pet.target_modules`, and a layer type a
method refuses is reported against `pet.target_modules`."""
import mindspore as ms
import pytest
import yaml
from mindspore import nn, mint, ops

from mindpet.train.runner import build, load_plan
from mindpet.utils.exceptions import MindPetError
from tests.train.text_fixtures import topic_rows, write_jsonl, train_tokenizer


class MintTextClassifier(nn.Cell):
    """``(input_ids, attention_mask) -> logits``: an nn.Embedding, a masked mean, mint.nn.Linear layers."""

    def __init__(self, vocab_size, hidden=16, num_labels=4):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden)
        self.proj = mint.nn.Linear(hidden, hidden)
        self.head = mint.nn.Linear(hidden, num_labels)

    def construct(self, input_ids, attention_mask):
        mask = attention_mask.astype(ms.float32)[:, :, None]
        pooled = (self.embedding(input_ids) * mask).sum(axis=1) / ops.maximum(mask.sum(axis=1), 1.0)
        return self.head(ops.relu(self.proj(pooled)))


def _plan(tmp_path, pet):
    rows = topic_rows(16)
    tokenizer, vocab = train_tokenizer(tmp_path / 'tokenizer.json', [r['text'] for r in rows])
    cfg = {'model': {'class': 'tests.train.test_layer_kinds_config:MintTextClassifier', 'trust_code': True,
                     'config': {'vocab_size': vocab}, 'loss': 'cross_entropy'},
           'pet': pet,
           'data': {'train': write_jsonl(tmp_path / 'train.jsonl', rows), 'tokenizer': tokenizer, 'max_length': 12},
           'schedule': {'start_learning_rate': 0.01},
           'training': {'batch_size': 4, 'output_dir': str(tmp_path / 'out')}}
    path = tmp_path / 'run.yaml'
    path.write_text(yaml.safe_dump(cfg), encoding='utf-8')
    return load_plan(str(path))


def test_run_config_targets_mint_linear_and_embedding_layers(tmp_path):
    built = build(_plan(tmp_path, {'type': 'lora', 'target_modules': ['embedding', 'proj'], 'lora_rank': 2,
                                   'modules_to_save': ['head']}))
    layers = built.pet_model.pet_layers
    assert {key: (type(layer).__name__, layer.kind.name) for key, layer in layers.items()} == {
        'embedding': ('LoraLayer', 'nn_embedding'), 'proj': ('LoraLayer', 'linear')}
    assert sorted(p.name for p in built.pet_model.trainable_params()) == [
        'embedding.mindpet_delta_lora_a', 'embedding.mindpet_delta_lora_b', 'head.bias', 'head.weight',
        'proj.mindpet_delta_lora_a', 'proj.mindpet_delta_lora_b']


def test_a_layer_type_the_method_refuses_names_the_config_key(tmp_path):
    with pytest.raises(MindPetError, match=r"pet\.target_modules.*layer 'embedding' cannot be adapted.*DoRA"):
        build(_plan(tmp_path, {'type': 'lora', 'target_modules': ['embedding'], 'use_dora': True}))
