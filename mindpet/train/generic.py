"""The built-in task: fine-tune any MindSpore Cell on JSONL / CSV / TSV / text files, with no code written.

A run config names the model and the data; this task does the rest::

    model:
      class: mindone.transformers:BertForSequenceClassification   # or factory: my_pkg.models:build + kwargs
      config: {vocab_size: 1000, hidden_size: 64, ...}             # or the path of an HF-style config.json
      weights: base/model.safetensors                               # a .ckpt/.safetensors file or a shard dir
    data:
      train: data/train.jsonl                                       # text + label rows
      tokenizer: data/tokenizer.json

The head decides the loss and the evaluation (``model.head``, by default from the class name):

* ``sequence_classification`` (``...ForSequenceClassification``): ``(input_ids, attention_mask) -> logits (N, C)``;
  cross-entropy; accuracy, macro-F1, per-class accuracy. ``num_labels`` is set from the label set.
* ``causal_lm`` (``...ForCausalLM``, ``...LMHeadModel``): ``-> logits (N, T, V)``; next-token cross-entropy on the
  target tokens (instruction data: the response only); eval loss, perplexity, greedy samples of held-out prompts.
* ``plain``: any other Cell ``(input_ids[, attention_mask]) -> logits``, with ``model.loss`` naming the loss:
  ``cross_entropy`` (classification) or ``next_token`` (causal LM).

The inputs passed are those the Cell's ``construct`` takes: ``attention_mask`` and ``token_type_ids`` when it
names them, and ``return_dict=False`` (Hugging Face-style models then return a tuple whose first item is the
logits; mindone's BERT needs all three given explicitly in GRAPH_MODE).

On a CPU, ``mindspore.mint`` cells without a CPU kernel in MindSpore 2.10 (``mint.nn.Embedding``,
``mint.nn.LayerNorm``, mindone's exact GELU) are replaced by equivalents computing the same function with the same
Parameter objects (``model.cpu_fallbacks``); on Ascend and GPU nothing is replaced.
"""
import inspect
import json
import math
import os
import re

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor

from mindpet.train import text_data
from mindpet.train.imports import CodeImportError, import_object
from mindpet.train.schema import CODE_FIELDS, Field
from mindpet.train.task import KeyValueError, Task, predict_batches, shard_rows, softmax_cross_entropy
from mindpet.train.text_data import DataError
from mindpet.utils.exceptions import CheckpointError

HEADS = ('auto', 'sequence_classification', 'causal_lm', 'plain')
LOSSES = ('cross_entropy', 'next_token')
CLASSIFICATION = 'classification'


def _head_of_class(cls):
    """The head a class name implies (``auto``)."""
    name = getattr(cls, '__name__', '')
    if name.endswith('ForSequenceClassification'):
        return 'sequence_classification'
    if name.endswith('ForCausalLM') or name.endswith('LMHeadModel'):
        return 'causal_lm'
    return 'plain'


# ----- calling a model ---------------------------------------------------------------------------------------------
class ModelCall(nn.Cell):
    """``(input_ids, attention_mask) -> logits``: calls the network with the inputs its ``construct`` takes.

    Args:
        network (nn.Cell): the model (a :class:`mindpet.PetModel` is called through its adapted network, the same
            Parameters).

    Inputs:
        input_ids (Tensor): int32 ``(N, T)``.
        attention_mask (Tensor): int32 ``(N, T)``, 1 on real tokens.

    Outputs:
        Tensor: the logits, the first item when the model returns a tuple.
    """

    def __init__(self, network):
        super().__init__(auto_prefix=False)
        network = getattr(network, 'base_model', network)
        self.network = network
        params = inspect.signature(network.construct).parameters
        self.pass_mask = 'attention_mask' in params
        self.pass_token_types = 'token_type_ids' in params
        self.pass_return_dict = 'return_dict' in params

    def construct(self, input_ids, attention_mask):
        if self.pass_return_dict:
            if self.pass_token_types:
                out = self.network(input_ids, attention_mask=attention_mask,
                                   token_type_ids=ops.zeros_like(input_ids), return_dict=False)
            else:
                out = self.network(input_ids, attention_mask=attention_mask, return_dict=False)
        elif self.pass_mask:
            out = self.network(input_ids, attention_mask=attention_mask)
        else:
            out = self.network(input_ids)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out


class ClassificationLoss(nn.Cell):
    """``(input_ids, attention_mask, labels) -> mean cross-entropy`` of the logits ``(N, C)``."""

    def __init__(self, network):
        super().__init__(auto_prefix=False)
        self.call = ModelCall(network)

    def construct(self, input_ids, attention_mask, labels):
        return ops.cross_entropy(self.call(input_ids, attention_mask).astype(ms.float32), labels)


class NextTokenLoss(nn.Cell):
    """``(input_ids, attention_mask, loss_mask) -> loss``: the mean next-token cross-entropy over the positions
    whose target token has ``loss_mask`` 1 (position ``t`` predicts token ``t + 1``)."""

    def __init__(self, network, reduce=True):
        super().__init__(auto_prefix=False)
        self.call = ModelCall(network)
        self.reduce = reduce

    def construct(self, input_ids, attention_mask, loss_mask):
        logits = self.call(input_ids, attention_mask).astype(ms.float32)
        vocab = logits.shape[-1]
        per_token = ops.cross_entropy(logits[:, :-1].reshape(-1, vocab), input_ids[:, 1:].reshape(-1),
                                      reduction='none').reshape(input_ids.shape[0], -1)
        weights = loss_mask[:, 1:]
        if not self.reduce:
            return per_token * weights
        return (per_token * weights).sum() / ops.maximum(weights.sum(), 1.0)


# ----- CPU fallbacks -----------------------------------------------------------------------------------------------
class GatherEmbedding(nn.Cell):
    """``mint.nn.Embedding`` (no ``max_norm``) as a gather of the same weight Parameter. The forward pass is the
    same; ``padding_idx``'s zero gradient for the padding row is not reproduced, which matters only when the
    embedding itself trains (PET methods freeze it)."""

    def __init__(self, cell):
        super().__init__()
        self.weight = cell.weight

    def construct(self, input_ids):
        return ops.gather(self.weight, input_ids, 0)


class ClassicLayerNorm(nn.Cell):
    """``mint.nn.LayerNorm`` through the classic ``ops.LayerNorm`` kernel, with the same weight and bias."""

    def __init__(self, cell):
        super().__init__()
        axes = len(cell.normalized_shape)
        self.weight = cell.weight
        self.bias = cell.bias
        self.norm = ops.LayerNorm(begin_norm_axis=-axes, begin_params_axis=-axes, epsilon=cell.eps)

    def construct(self, x):
        return self.norm(x, self.weight, self.bias)[0]


def _cpu_fallback(cell):
    """The CPU-capable equivalent of ``cell``, or None when it needs none."""
    kind = type(cell).__name__
    if kind == 'EmbeddingExt' and getattr(cell, 'max_norm', None) is None:
        return GatherEmbedding(cell)
    if kind == 'LayerNormExt' and getattr(cell, 'weight', None) is not None and cell.bias is not None:
        return ClassicLayerNorm(cell)
    if kind == 'GELUActivation' and type(cell).__module__.startswith('mindone.'):
        return nn.GELU(approximate=False)
    return None


def apply_cpu_fallbacks(network):
    """Replace, in place, the cells without a CPU kernel (see the module docstring); returns how many."""
    from mindpet.tuners.inject import walk, replace_cell  # pylint: disable=import-outside-toplevel
    _, holders = walk(network)
    count = 0
    for name, cell in list(network.cells_and_names()):
        new = _cpu_fallback(cell) if name else None
        if new is not None:
            replace_cell(holders, cell, new, name + '.')
            count += 1
    return count


# ----- weights -----------------------------------------------------------------------------------------------------
def weight_files(path):
    """The checkpoint files of ``weights``: the file itself, or every .safetensors/.ckpt file of a directory
    (shards), sorted."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(('.safetensors', '.ckpt')))
        if not files:
            raise CheckpointError(f"The weights directory '{path}' holds no .safetensors or .ckpt file.")
        return files
    return [path]


def map_names(names, network_names, weights_map, prefix=None):
    """``{checkpoint name: network name}`` for the checkpoint ``names``.

    Args:
        weights_map: ``'none'`` (names as they are), ``'auto'`` (the built-in map: names as they are, else with the
            model's ``base_model_prefix`` added or removed, else with TensorFlow-era ``gamma``/``beta`` read as
            ``weight``/``bias`` and back), or a mapping ``regex -> replacement`` applied in order (``re.sub``).
        prefix (str | None): the model class's ``base_model_prefix`` (Hugging Face-style classes).
    """
    mapped = {}
    for name in names:
        if isinstance(weights_map, dict):
            new = name
            for pattern, replacement in weights_map.items():
                new = re.sub(pattern, replacement, new)
            mapped[name] = new
            continue
        if weights_map == 'none' or name in network_names:
            mapped[name] = name
            continue
        candidates = []
        for base in (name, re.sub(r'\.gamma$', '.weight', re.sub(r'\.beta$', '.bias', name)),
                     re.sub(r'(LayerNorm|layer_norm|norm)\.weight$', r'\1.gamma',
                            re.sub(r'(LayerNorm|layer_norm|norm)\.bias$', r'\1.beta', name))):
            candidates.append(base)
            if prefix:
                candidates.append(f'{prefix}.{base}')
                if base.startswith(prefix + '.'):
                    candidates.append(base[len(prefix) + 1:])
        mapped[name] = next((c for c in candidates if c in network_names), name)
    return mapped


def load_weights(network, path, weights_map='auto', prefix=None):
    """Load ``path`` (a file or a shard directory) into ``network`` through the name map.

    Every network parameter the checkpoint provides is loaded (shapes checked); parameters it lacks (a new task
    head) keep their initial values; checkpoint tensors the network lacks are ignored. Both are counted.

    Returns:
        str: ``'N tensors from PATH (M kept as initialised: ..., K unused)'``.

    Raises:
        CheckpointError: an unreadable file, a shape mismatch, or no tensor matching the network at all.
    """
    from mindpet.utils.io_utils import load_checkpoint_file  # pylint: disable=import-outside-toplevel
    from mindpet.naming import is_pet_param  # pylint: disable=import-outside-toplevel
    params = {p.name: p for p in network.get_parameters() if not is_pet_param(p.name)}
    loaded = {}
    unused = 0
    for file in weight_files(path):
        tensors = load_checkpoint_file(file, what='weights')
        names = map_names(list(tensors), set(params), weights_map, prefix)
        for name, value in tensors.items():
            target = names[name]
            if target not in params:
                unused += 1
                continue
            param = params[target]
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"The weights '{file}' hold '{name}' of shape {tuple(value.shape)}, but the "
                                      f"model's '{target}' has shape {tuple(param.shape)}.")
            loaded[target] = value
    if not loaded:
        raise CheckpointError(f"No tensor of the weights '{path}' matches a parameter of the model (e.g. the model "
                              f"has {sorted(params)[:3]}); give 'model.weights_map' (regex -> replacement).")
    for name, value in loaded.items():
        params[name].set_data(Tensor(value.asnumpy()).astype(params[name].dtype))
    kept = sorted(set(params) - set(loaded))
    text = f"{len(loaded)} tensors from {path}"
    extra = []
    if kept:
        extra.append(f"{len(kept)} kept as initialised: {', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''}")
    if unused:
        extra.append(f"{unused} unused")
    return text + (f" ({'; '.join(extra)})" if extra else '')


# ----- decoding ----------------------------------------------------------------------------------------------------
def has_kv_cache(network):
    """Whether ``network`` follows the Hugging Face cache convention: ``construct`` takes ``past_key_values`` and
    ``use_cache``, and with ``use_cache=True, return_dict=False`` returns ``(logits, past_key_values, ...)``."""
    network = getattr(network, 'base_model', network)
    params = inspect.signature(network.construct).parameters
    return 'past_key_values' in params and 'use_cache' in params


def _pick(logits, top_k, rng):
    logits = np.asarray(logits, np.float64)
    if not top_k:
        return int(np.argmax(logits))
    top = np.argsort(logits)[-top_k:]
    probs = np.exp(logits[top] - logits[top].max())
    return int(top[rng.choice(len(top), p=probs / probs.sum())])


def decode(call, prompt_ids, max_length, max_new_tokens, eos_id, pad_id, top_k=0, seed=0):
    """Greedy (``top_k`` 0) or top-k sampling from a causal LM, one token at a time, without a cache.

    Every step runs the whole fixed-size window ``(1, max_length)`` (one compiled graph for all steps) and reads
    the logits at the last real position.

    Returns:
        list[int]: the new token ids (without the prompt; up to and excluding eos).
    """
    rng = np.random.default_rng(seed)
    ids = list(prompt_ids)
    new = []
    for _ in range(max_new_tokens):
        if len(ids) >= max_length:
            break
        window = np.full((1, max_length), pad_id, np.int32)
        window[0, :len(ids)] = ids
        mask = np.zeros((1, max_length), np.int32)
        mask[0, :len(ids)] = 1
        token = _pick(call(Tensor(window), Tensor(mask)).asnumpy()[0, len(ids) - 1], top_k, rng)
        if eos_id is not None and token == eos_id:
            break
        ids.append(token)
        new.append(token)
    return new


def decode_cached(network, prompt_ids, max_length, max_new_tokens, eos_id, top_k=0, seed=0):
    """:func:`decode` for a model with a KV cache (:func:`has_kv_cache`): the prompt runs once, then each step
    feeds only the new token with the returned ``past_key_values``. The inputs grow by one token per step, so
    this runs in PyNative mode (a graph would be compiled for every length); the mode is restored afterwards.

    Returns:
        list[int]: the new token ids.
    """
    network = getattr(network, 'base_model', network)
    params = inspect.signature(network.construct).parameters
    kwargs = {'use_cache': True}
    if 'return_dict' in params:
        kwargs['return_dict'] = False
    rng = np.random.default_rng(seed)
    mode = ms.get_context('mode')
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        network.set_train(False)
        ids = list(prompt_ids)
        feed, past, new = ids, None, []
        for _ in range(max_new_tokens):
            if len(ids) >= max_length:
                break
            step = dict(kwargs)
            if past is not None:
                step['past_key_values'] = past
            if 'attention_mask' in params:
                step['attention_mask'] = Tensor(np.ones((1, len(ids)), np.int32))
            out = network(Tensor(np.asarray([feed], np.int32)), **step)
            logits, past = out[0], out[1]
            token = _pick(logits.asnumpy()[0, -1], top_k, rng)
            if eos_id is not None and token == eos_id:
                break
            ids.append(token)
            new.append(token)
            feed = [token]
        return new
    finally:
        ms.set_context(mode=mode)


# ----- the task ----------------------------------------------------------------------------------------------------
class GenericTask(Task):
    """The task of configs naming ``model.class`` or ``model.factory`` (see the module docstring)."""
    name = 'model'
    model_fields = {
        'class': Field('str', None, doc="the model class 'package.module:ClassName' (any MindSpore Cell, e.g. "
                                        "mindone.transformers:BertForSequenceClassification)"),
        'factory': Field('str', None, doc="instead of class: a function 'package.module:function' returning the "
                                          "Cell, called with kwargs"),
        'config': Field('any', None, doc="the class's config: a mapping, or the path of an HF-style config.json"),
        'kwargs': Field('dict', None, doc="keyword arguments of the factory (or extra ones of the class)"),
        'weights': Field('str', None, doc="pretrained weights: a .ckpt or .safetensors file, or a directory of "
                                          "shards (null: initial weights)"),
        'weights_map': Field('any', 'auto', doc="checkpoint names -> model names: auto (built-in), none, or a "
                                                "mapping regex -> replacement"),
        'head': Field('str', 'auto', choices=HEADS, doc="the task head: from the class name (auto), "
                                                        "sequence_classification, causal_lm or plain"),
        'loss': Field('str', None, choices=LOSSES, doc="the loss of a plain head: cross_entropy (classification) "
                                                       "or next_token (causal LM)"),
        'cpu_fallbacks': Field('bool', True, doc="on a CPU, replace mint cells that lack CPU kernels by "
                                                 "equivalents holding the same Parameters"),
    }
    data_fields = {
        'kind': Field('str', None, choices=text_data.KINDS,
                      doc="classification, instruction (causal LM) or text (packed LM); null: from the head"),
        'train': Field('path', doc='the training file (.jsonl, .csv, .tsv or .txt)'),
        'eval': Field('path', None, doc='the evaluation file (null: hold out data.split of train)'),
        'split': Field('float', None, min_value=0.0, max_value=0.5, min_exclusive=True,
                       doc='share of train held out for evaluation when there is no eval file (null: 0.1)'),
        'format': Field('str', None, choices=text_data.FORMATS, doc='file format (null: from the extension)'),
        'tokenizer': Field('path', doc='a Hugging Face tokenizer.json'),
        'max_length': Field('int', 128, min_value=2, doc='tokens per row; longer rows are bad rows (text: block size)'),
        'text_column': Field('str', 'text', doc='the text field (classification, text)'),
        'label_column': Field('str', 'label', doc='the label field (classification)'),
        'labels': Field('any', None, doc='label names (or int labels) in index order (null: the sorted labels of '
                                         'train)'),
        'prompt_column': Field('str', 'prompt', doc="the prompt field (instruction; Alpaca's instruction/input "
                                                    "are read when it is absent)"),
        'response_column': Field('str', 'response', doc="the response field (instruction; Alpaca: output)"),
        'prompt_template': Field('str', '{prompt}\n', doc='how a prompt is put before its response'),
        'pad_token': Field('str', None, doc='padding token (null: [PAD], <pad> or id 0)'),
        'eos_token': Field('str', None, doc='end-of-sequence token of causal LMs (null: </s>, <eos>, ...)'),
        'on_bad_rows': Field('str', 'error', choices=('error', 'skip'),
                             doc='bad rows (missing field, empty text, unknown label, too long) stop the run or '
                                 'are skipped and reported'),
        'eval_batch_size': Field('int', 32, min_value=1, doc='rows per evaluation call'),
        'sample_prompts': Field('int', 3, min_value=0, doc='held-out prompts answered greedily before and after '
                                                           'training (causal LM)'),
        'max_new_tokens': Field('int', 32, min_value=1, doc='tokens generated per sample'),
    }
    supports_rdrop = False

    @classmethod
    def all_model_fields(cls):
        return dict(CODE_FIELDS, **cls.model_fields)

    def __init__(self, model, data, seed=0):
        super().__init__(model, data, seed)
        self._class = None
        self._config_file = None
        self.head = self.kind = None
        self.classifies = False
        self.labels = []
        self.pad_id = 0
        self.eos_id = None
        self._splits = None
        self._tokenizer = None
        self.bad_rows = []

    def model_config(self):
        return self.model.get('config')

    def label(self):
        return self.model['class'] or self.model['factory']

    # ----- checks ----------------------------------------------------------------------------------------------
    def _import(self, key):
        try:
            return import_object(self.model[key], self.model['trust_code'], self.model['code_dir'],
                                 what='model class' if key == 'class' else 'model factory')
        except CodeImportError as ex:
            raise KeyValueError(f'model.{key}', str(ex)) from None

    def check(self):
        model, data = self.model, self.data
        if (model['class'] is None) == (model['factory'] is None):
            raise KeyValueError('model.class' if model['class'] is None else 'model.factory',
                                "give exactly one of 'class' (with config) and 'factory' (with kwargs)")
        if model['factory'] is not None and model['config'] is not None:
            raise KeyValueError('model.config', "belongs to 'class'; a factory takes 'kwargs'")
        config = model['config']
        if config is not None and not isinstance(config, dict):
            if not isinstance(config, str) or not os.path.isfile(config):
                raise KeyValueError('model.config', f"must be a mapping or the path of an existing config.json, but "
                                                    f"got {config!r}")
            try:
                with open(config, encoding='utf-8') as handle:
                    self._config_file = json.load(handle)
            except (OSError, json.JSONDecodeError) as ex:
                raise KeyValueError('model.config', f"'{config}' is not a JSON file ({ex})") from None
            if not isinstance(self._config_file, dict):
                raise KeyValueError('model.config', f"'{config}' does not hold a JSON object")
        if model['weights'] is not None and not os.path.exists(model['weights']):
            raise KeyValueError('model.weights', f"the file or directory '{model['weights']}' does not exist")
        self._check_weights_map(model['weights_map'])
        self._class = self._import('class' if model['class'] is not None else 'factory')
        head = model['head']
        if head == 'auto':
            head = _head_of_class(self._class) if model['class'] is not None else 'plain'
        if head == 'plain' and model['loss'] is None:
            raise KeyValueError('model.loss', f"missing: a plain model ({model['class'] or model['factory']}) needs "
                                              f"the loss named: one of {list(LOSSES)}")
        if head != 'plain' and model['loss'] is not None:
            raise KeyValueError('model.loss', f"the {head} head has its own loss; 'loss' is for plain models")
        self.head = head
        self.classifies = head == 'sequence_classification' or model['loss'] == 'cross_entropy'
        kind = data['kind'] or (CLASSIFICATION if self.classifies else 'instruction')
        if (kind == CLASSIFICATION) != self.classifies:
            raise KeyValueError('data.kind', f"{kind!r} data does not fit the {head} head"
                                             f"{' with loss ' + model['loss'] if model['loss'] else ''}")
        self.kind = kind
        if data['eval'] is not None and data['split'] is not None:
            raise KeyValueError('data.split', "give either an eval file or a split of train, not both")
        labels = data['labels']
        if labels is not None:
            if (not isinstance(labels, list) or not labels
                    or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in labels)):
                raise KeyValueError('data.labels', f"must be a list of label names (str or int), but got {labels!r}")
            data['labels'] = [str(v) for v in labels]
            if len(set(data['labels'])) != len(labels):
                raise KeyValueError('data.labels', f"lists a label twice: {labels!r}")
        if '{prompt}' not in data['prompt_template']:
            raise KeyValueError('data.prompt_template', f"must contain '{{prompt}}', but got "
                                                        f"{data['prompt_template']!r}")
        self.metric = 'accuracy' if self.classifies else 'perplexity'
        self.metric_higher_is_better = self.classifies
        missing = [key for key in ('train', 'eval', 'tokenizer')
                   if data[key] is not None and not os.path.isfile(data[key])]
        if missing:
            # Only a dry run gets here (it lists the files missing on this machine): nothing to read.
            self.labels = list(data['labels'] or [])
            return
        self._prepare_data()

    @staticmethod
    def _check_weights_map(value):
        if value in ('auto', 'none'):
            return
        if not isinstance(value, dict) or not value:
            raise KeyValueError('model.weights_map', f"must be 'auto', 'none' or a mapping regex -> replacement, but "
                                                     f"got {value!r}")
        for pattern, replacement in value.items():
            if not isinstance(pattern, str) or not isinstance(replacement, str):
                raise KeyValueError('model.weights_map', f"maps str to str, but got {pattern!r}: {replacement!r}")
            try:
                re.compile(pattern)
            except re.error as ex:
                raise KeyValueError('model.weights_map', f"{pattern!r} is not a regular expression ({ex})") from None

    # ----- data ------------------------------------------------------------------------------------------------
    def _data_error(self, ex):
        return KeyValueError(f'data.{ex.key}', str(ex))

    def _read(self, key):
        path = self.data[key]
        fmt = text_data.file_format(path, self.data['format'])
        if fmt is None:
            raise KeyValueError('data.format', f"cannot tell the format of '{path}' from its extension; give one of "
                                               f"{list(text_data.FORMATS)}")
        if fmt == 'txt' and self.kind != 'text':
            raise KeyValueError(f'data.{key}', f"a .txt file holds plain text ('kind: text'), not {self.kind} rows")
        try:
            return text_data.read_rows(path, fmt, self.data['text_column'])
        except (OSError, UnicodeDecodeError) as ex:
            raise KeyValueError(f'data.{key}', f"cannot read '{path}': {ex}") from None

    def _prepare_data(self):
        """Read, check and tokenise both splits (bad rows refused or recorded)."""
        data = self.data
        try:
            self._tokenizer = tokenizer = text_data.load_tokenizer(data['tokenizer'])
            self.pad_id = text_data.special_id(tokenizer, data['pad_token'], text_data.PAD_CANDIDATES, 'padding',
                                               'pad_token') or 0
            self.eos_id = text_data.special_id(tokenizer, data['eos_token'], text_data.EOS_CANDIDATES,
                                               'end-of-sequence', 'eos_token')
        except DataError as ex:
            raise self._data_error(ex) from None
        train_rows, train_bad = self._read('train')
        if self.kind == CLASSIFICATION:
            column = data['label_column']
            self.labels = data['labels'] or sorted({str(r.fields[column]) for r in train_rows
                                                    if isinstance(r.fields.get(column), (str, int))
                                                    and str(r.fields[column]).strip()})
            if len(self.labels) < 2:
                raise KeyValueError('data.labels', f"a classification needs at least 2 labels, but the training "
                                                   f"data has {self.labels}")
        splits = {'train': self._encode_checked('train', train_rows, train_bad)}
        if data['eval'] is not None:
            splits['eval'] = self._encode_checked('eval', *self._read('eval'))
        else:
            splits['train'], splits['eval'] = _split(splits['train'], data['split'] or 0.1, self.seed)
        self._splits = splits

    def _encode_checked(self, key, rows, bad):
        """The rows of ``data.<key>`` encoded; bad rows refused (``on_bad_rows: error``) or recorded."""
        encoded = self._encode(rows)
        encoded.bad = bad + encoded.bad
        if encoded.bad and self.data['on_bad_rows'] == 'error':
            raise KeyValueError(f'data.{key}', f"{len(encoded.bad)} bad row(s) of {len(rows) + len(bad)}: "
                                               f"{text_data.bad_rows_text(encoded.bad)} (on_bad_rows: skip drops "
                                               f"them)")
        if len(encoded) < (2 if key == 'train' and self.data['eval'] is None else 1):
            raise KeyValueError(f'data.{key}', f"no usable rows (of {len(rows) + len(bad)})")
        self.bad_rows += encoded.bad
        return encoded

    def _encode(self, rows):
        data, tokenizer = self.data, self._tokenizer
        if self.kind == CLASSIFICATION:
            return text_data.classification_arrays(rows, tokenizer, self.labels, data['max_length'], self.pad_id,
                                                   data['text_column'], data['label_column'])
        if self.kind == 'instruction':
            return text_data.instruction_arrays(rows, tokenizer, data['max_length'], self.pad_id, self.eos_id,
                                                data['prompt_template'], data['prompt_column'],
                                                data['response_column'])
        return text_data.packed_text_arrays(rows, tokenizer, data['max_length'], self.eos_id, data['text_column'])

    def notes(self):
        lines = []
        if self._splits is None:
            return lines
        for key in ('train', 'eval'):
            encoded = self._splits[key]
            lines.append(f"{key}: {len(encoded)} {'blocks' if self.kind == 'text' else 'rows'} of {self.kind} data "
                         f"from {self.data[key] or self.data['train']}")
        if self.bad_rows:
            lines.append(f"skipped {len(self.bad_rows)} bad row(s): {text_data.bad_rows_text(self.bad_rows, 5)}")
        return lines

    def num_train_rows(self):
        return len(self._splits['train'])

    def train_dataset(self, batch_size, rank=0, group_size=1):
        encoded = self._splits['train']
        columns = shard_rows(encoded.columns, rank, group_size)
        return text_data.dataset(text_data.Encoded(columns, encoded.names, [], 0), batch_size, shuffle=True,
                                 seed=self.seed)

    # ----- model -----------------------------------------------------------------------------------------------
    def _class_config(self):
        """The class's config object: its ``config_class`` (Hugging Face style) built from the mapping or file,
        with ``num_labels`` (classification) and ``vocab_size`` filled in when not given; or a plain dict."""
        values = dict(self._config_file or self.model['config'] or {})
        config_class = getattr(self._class, 'config_class', None)
        if (self.head == 'sequence_classification' and self.labels and 'num_labels' not in values
                and 'id2label' not in values):
            values['num_labels'] = len(self.labels)
        if config_class is not None and 'vocab_size' not in values and self._tokenizer is not None:
            values['vocab_size'] = self._tokenizer.get_vocab_size()
        if config_class is None:
            return None, values
        values.pop('architectures', None)
        return config_class(**values), None

    def build_network(self):
        kwargs = dict(self.model['kwargs'] or {})
        try:
            if self.model['factory'] is not None:
                key, what = 'model.kwargs', self.model['factory']
                network = self._class(**kwargs)
            else:
                key, what = 'model.config', self.model['class']
                config, values = self._class_config()
                network = self._class(config, **kwargs) if config is not None else self._class(**values, **kwargs)
        except (TypeError, ValueError) as ex:
            raise KeyValueError(key, f"'{what}' could not be built from it: {ex}") from None
        if not isinstance(network, nn.Cell):
            raise KeyValueError('model.factory' if self.model['factory'] else 'model.class',
                                f"'{what}' gave {type(network).__name__}, not a mindspore.nn.Cell")
        if self.model['cpu_fallbacks'] and ms.get_context('device_target') == 'CPU':
            apply_cpu_fallbacks(network)
        return network

    def base_weights_source(self, path):
        return self.model['weights']

    def load_base(self, network, path):
        if self.model['weights'] is None:
            return None
        return load_weights(network, self.model['weights'], self.model['weights_map'],
                            getattr(self._class, 'base_model_prefix', None))

    def loss_cell(self, network, rdrop_alpha=0.0):
        return ClassificationLoss(network) if self.classifies else NextTokenLoss(network)

    # ----- results ---------------------------------------------------------------------------------------------
    def evaluate(self, network):
        encoded = self._splits['eval']
        size = self.data['eval_batch_size']
        if self.classifies:
            logits = predict_batches(ModelCall(network), encoded.columns[:2], size)
            return classification_metrics(logits, encoded.columns[2], self.labels)
        weighted = predict_batches(NextTokenLoss(network, reduce=False), encoded.columns, size)
        loss = float(weighted.sum() / max(encoded.columns[2][:, 1:].sum(), 1.0))
        return {'perplexity': math.exp(min(loss, 700.0)), 'loss': loss}

    def eval_prompts(self):
        """Up to ``data.sample_prompts`` held-out prompts (instruction data), as token ids."""
        if self.kind != 'instruction' or not self.data['sample_prompts']:
            return []
        encoded = self._splits['eval']
        prompts = []
        for ids, mask in zip(encoded.columns[0], encoded.columns[2]):
            first = int(np.argmax(mask > 0)) if mask.any() else len(ids)
            prompts.append([int(t) for t in ids[:first]])
            if len(prompts) == self.data['sample_prompts']:
                break
        return prompts

    def generate_ids(self, network, prompt_ids, max_new_tokens=None, top_k=0, seed=0):
        """New token ids after ``prompt_ids``: :func:`decode_cached` when the model has a KV cache, else
        :func:`decode`."""
        if has_kv_cache(network):
            return decode_cached(network, prompt_ids, self.data['max_length'],
                                 max_new_tokens or self.data['max_new_tokens'], self.eos_id, top_k, seed)
        call = ModelCall(network)
        call.set_train(False)
        return decode(call, prompt_ids, self.data['max_length'], max_new_tokens or self.data['max_new_tokens'],
                      self.eos_id, self.pad_id, top_k, seed)

    def generate(self, network, prompt, max_new_tokens=None, top_k=0, seed=0):
        """The text a causal LM writes after ``prompt`` (formatted by ``data.prompt_template``)."""
        if self.classifies:
            raise ValueError(f"the {self.head} model classifies; generating text needs a causal LM")
        ids = self._tokenizer.encode(self.data['prompt_template'].format(prompt=prompt)).ids
        if len(ids) >= self.data['max_length']:
            raise ValueError(f"the prompt has {len(ids)} tokens; data.max_length {self.data['max_length']} leaves "
                             f"no room to generate")
        return self._tokenizer.decode(self.generate_ids(network, ids, max_new_tokens, top_k, seed))

    def demo(self, network):
        lines = []
        for ids in self.eval_prompts():
            prompt = self._tokenizer.decode(ids).replace('\n', ' ').strip()
            answer = self._tokenizer.decode(self.generate_ids(network, ids)).replace('\n', ' ')
            lines.append(f"{prompt!r} -> {answer!r}")
        return lines or None


def _split(encoded, fraction, seed):
    """``(train, eval)`` Encoded: a seeded random ``fraction`` of the rows held out (at least one each)."""
    order = np.random.default_rng(seed).permutation(len(encoded))
    held = min(max(1, int(round(len(encoded) * fraction))), len(encoded) - 1)
    keep, hold = np.sort(order[held:]), np.sort(order[:held])
    return (text_data.Encoded([c[keep] for c in encoded.columns], encoded.names, encoded.bad, encoded.rows_read),
            text_data.Encoded([c[hold] for c in encoded.columns], encoded.names, [], 0))


def classification_metrics(logits, labels, names):
    """Accuracy, macro-F1 (the mean over classes of F1, 0 for a class never predicted nor present), the
    cross-entropy, and each class's accuracy (``accuracy[name]``: the share of its rows predicted right).

    Args:
        logits (numpy.ndarray): ``(N, C)``.
        labels (numpy.ndarray): ``(N,)`` int.
        names (list[str]): class names (``C`` of them).
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[1] != len(names):
        raise ValueError(f"the model gives logits of shape {logits.shape}, but the data has {len(names)} labels "
                         f"{names}: set the model's number of classes to {len(names)}")
    predicted = logits.argmax(axis=1)
    metrics = {'accuracy': float((predicted == labels).mean()), 'loss': softmax_cross_entropy(logits, labels)}
    f1_scores = []
    per_class = {}
    for index, name in enumerate(names):
        true_pos = float(((predicted == index) & (labels == index)).sum())
        predicted_pos = float((predicted == index).sum())
        actual = float((labels == index).sum())
        denominator = predicted_pos + actual
        f1_scores.append(2 * true_pos / denominator if denominator else 0.0)
        if actual:
            per_class[f'accuracy[{name}]'] = true_pos / actual
    metrics['macro_f1'] = float(np.mean(f1_scores))
    metrics.update(per_class)
    return metrics


TASK = GenericTask

__all__ = ['GenericTask', 'TASK', 'ModelCall', 'ClassificationLoss', 'NextTokenLoss', 'GatherEmbedding',
           'ClassicLayerNorm', 'apply_cpu_fallbacks', 'weight_files', 'map_names', 'load_weights', 'decode',
           'decode_cached', 'has_kv_cache',
           'classification_metrics', 'HEADS', 'LOSSES']
