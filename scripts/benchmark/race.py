"""The real-model race (issue 17): the quick start's task, all-MiniLM-L6-v2 LoRA topic classification, trained by
mindpet on MindSpore and by Hugging Face PEFT on PyTorch, each in its own process, and compared on step time, peak
memory and test accuracy after the same steps.

What makes the two runs the same experiment is decided once, here in the parent (:func:`prepare_race`), and handed
to both workers in one ``.npz`` file: the token ids (the package's ``tokenizer.json``, padded to
``data.max_length``), the order of the training rows for every epoch, the learning rate of every step
(``configs/bert_lora.yaml``'s schedule) and the initial classifier head. Both sides load the package's
``model.safetensors`` and train with MindSpore's ``AdamWeightDecay`` update rule (the PyTorch side runs the same
rule in a few lines, since ``torch.optim.AdamW`` adds Adam's bias correction). Dropout masks differ (two RNGs).
"""
import json
import os
import time

from .measure import median, memory_figures

RACE_CONFIG = os.path.join('configs', 'bert_lora.yaml')
RACE_SIDES = ('mindpet', 'peft')


def race_settings(root, steps=None):
    """The run's settings read from ``configs/bert_lora.yaml``: LoRA targets/rank/alpha/dropout, batch, epochs,
    schedule, optimizer (``eps`` 1e-8 unless the config sets it: the runner's default), max_length; ``steps``
    (when given) caps the number of training steps."""
    import yaml  # pylint: disable=import-outside-toplevel
    with open(os.path.join(root, RACE_CONFIG), encoding='utf-8') as fh:
        cfg = yaml.safe_load(fh)
    pet, opt, sched, train = cfg['pet'], cfg['optimizer'], cfg['schedule'], cfg['training']
    return dict(config=RACE_CONFIG, target_modules=list(pet['target_modules']), rank=pet['lora_rank'],
                alpha=pet['lora_alpha'], dropout=pet['lora_dropout'], modules_to_save=list(pet['modules_to_save']),
                max_length=cfg['data']['max_length'], batch_size=train['batch_size'], epochs=train['epochs'],
                seed=cfg['context']['seed'], weight_decay=opt['weight_decay'], eps=opt.get('eps', 1e-8),
                start_learning_rate=sched['start_learning_rate'], end_learning_rate=sched['end_learning_rate'],
                warmup_steps=sched['warmup_steps'], decay=sched['decay'], max_steps=steps)


def prepare_race(root, settings, out_dir):
    """Tokenise both splits, fix the batch order, the learning rates and the initial head; write them to
    ``out_dir/race_inputs.npz`` and return its path (main virtualenv: needs ``tokenizers`` and the weights
    package)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    from examples.bert.data import load_topic_split  # pylint: disable=import-outside-toplevel
    from examples.bert.make_dataset import LABELS  # pylint: disable=import-outside-toplevel
    from examples.bert.model import minilm_model_dir  # pylint: disable=import-outside-toplevel
    from mindpet.train.schedule import learning_rates  # pylint: disable=import-outside-toplevel

    package = minilm_model_dir()
    tok = Tokenizer.from_file(os.path.join(package, 'tokenizer.json'))
    tok.enable_truncation(settings['max_length'])
    tok.enable_padding(length=settings['max_length'], pad_id=0, pad_token='[PAD]')
    arrays = {}
    for split in ('train', 'test'):
        rows = load_topic_split(split)
        encoded = tok.encode_batch([row['text'] for row in rows])
        arrays[f'{split}_ids'] = np.array([e.ids for e in encoded], np.int32)
        arrays[f'{split}_mask'] = np.array([e.attention_mask for e in encoded], np.int32)
        arrays[f'{split}_labels'] = np.array([row['label'] for row in rows], np.int32)
    rows, batch = len(arrays['train_labels']), settings['batch_size']
    per_epoch = rows // batch  # drop_remainder, as the runner does
    rng = np.random.default_rng(settings['seed'])
    order = np.concatenate([rng.permutation(rows)[:per_epoch * batch] for _ in range(settings['epochs'])])
    total = per_epoch * settings['epochs']
    if settings['max_steps']:
        total = min(total, settings['max_steps'])
    arrays['batches'] = order[:total * batch].reshape(total, batch).astype(np.int64)
    arrays['rates'] = np.array(learning_rates(per_epoch * settings['epochs'], settings['start_learning_rate'],
                                              settings['end_learning_rate'], settings['warmup_steps'],
                                              settings['decay'])[:total], np.float32)
    with open(os.path.join(package, 'config.json'), encoding='utf-8') as fh:
        hidden = json.load(fh)['hidden_size']
    arrays['head_weight'] = (rng.standard_normal((len(LABELS), hidden)) * 0.02).astype(np.float32)
    arrays['head_bias'] = np.zeros(len(LABELS), np.float32)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'race_inputs.npz')
    np.savez(path, **arrays)
    return path


def _timed_steps(step, inputs):
    """Run ``step(i)`` for every batch; wall and CPU seconds (this process, all threads) of each step (the first
    includes graph compilation). CPU time moves far less than wall time when other jobs share the cores."""
    times, cpu = [], []
    loss = None
    for i in range(len(inputs['batches'])):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = step(i)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return (times, cpu), loss


def _summary(timing, loss, accuracy, trainable, total, steps):
    times, cpu = timing
    later = times[1:] or times
    return dict(steps=steps, first_step_s=times[0], step_s=median(later), step_cpu_s=median(cpu[1:] or cpu),
                step_times=times, step_cpu_times=cpu,
                train_s=sum(times), loss_last=loss, accuracy=accuracy, trainable=trainable, total=total,
                **memory_figures())


def worker_race_mindpet(cfg):
    """mindpet LoRA on MindSpore (GRAPH_MODE), the quick start's network and loss."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindspore import nn, Tensor  # pylint: disable=import-outside-toplevel
    from examples.bert.model import (BertForSequenceClassification, ClassifierWithLoss,  # pylint: disable=C0415
                                     bert_config_from_dir, load_pretrained_bert, minilm_model_dir)
    from mindpet import LoraConfig, get_pet_model  # pylint: disable=import-outside-toplevel

    s = cfg['settings']
    inputs = dict(np.load(cfg['inputs']))
    ms.set_context(mode=ms.GRAPH_MODE, device_target=cfg.get('device', 'CPU'))
    ms.set_seed(s['seed'])
    net = BertForSequenceClassification(bert_config_from_dir(minilm_model_dir()), num_labels=4, pooling='mean')
    load_pretrained_bert(net)
    net.classifier.weight.set_data(Tensor(inputs['head_weight']))
    net.classifier.bias.set_data(Tensor(inputs['head_bias']))
    pet = get_pet_model(net, LoraConfig(target_modules=s['target_modules'], lora_rank=s['rank'],
                                        lora_alpha=s['alpha'], lora_dropout=s['dropout'],
                                        modules_to_save=s['modules_to_save']))
    params = list(pet.trainable_params())
    # The runner's grouping (mindpet/train/runner.py): biases and norms are not decayed.
    plain = [p.name.rsplit('.', 1)[-1] in ('bias', 'beta', 'gamma') for p in params]
    groups = [g for g in ({'params': [p for p, k in zip(params, plain) if not k], 'weight_decay': s['weight_decay']},
                          {'params': [p for p, k in zip(params, plain) if k], 'weight_decay': 0.0}) if g['params']]
    opt = nn.AdamWeightDecay(groups, learning_rate=[float(r) for r in inputs['rates']], eps=s['eps'],
                             weight_decay=s['weight_decay'])
    train_step = nn.TrainOneStepCell(ClassifierWithLoss(pet), opt)
    train_step.set_train(True)
    ids, mask, labels = inputs['train_ids'], inputs['train_mask'], inputs['train_labels']

    def step(i):
        rows = inputs['batches'][i]
        return float(train_step(Tensor(ids[rows]), Tensor(mask[rows]), Tensor(labels[rows])).asnumpy())
    times, loss = _timed_steps(step, inputs)
    pet.set_train(False)
    logits = [pet(Tensor(inputs['test_ids'][i:i + 32]), Tensor(inputs['test_mask'][i:i + 32])).asnumpy()
              for i in range(0, len(inputs['test_labels']), 32)]
    accuracy = float((np.concatenate(logits).argmax(1) == inputs['test_labels']).mean())
    return _summary(times, loss, accuracy, sum(p.size for p in params), sum(p.size for p in pet.get_parameters()),
                    len(times[0]))


class _AdamWeightDecayTorch:
    """MindSpore's ``nn.AdamWeightDecay`` update on torch tensors (no bias correction, decoupled decay):
    ``m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr (m / (sqrt(v) + eps) + wd p)``."""

    def __init__(self, groups, beta1=0.9, beta2=0.999, eps=1e-6):
        import torch  # pylint: disable=import-outside-toplevel
        self.groups, self.b1, self.b2, self.eps = groups, beta1, beta2, eps
        self.state = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for g in groups for p in g['params']}

    def step(self, lr):
        import torch  # pylint: disable=import-outside-toplevel
        with torch.no_grad():
            for group in self.groups:
                for p in group['params']:
                    m, v = self.state[id(p)]
                    m.mul_(self.b1).add_(p.grad, alpha=1 - self.b1)
                    v.mul_(self.b2).addcmul_(p.grad, p.grad, value=1 - self.b2)
                    update = m / (v.sqrt() + self.eps)
                    if group['weight_decay']:
                        update = update + group['weight_decay'] * p
                    p.sub_(lr * update)
                    p.grad = None


def worker_race_peft(cfg):
    """Hugging Face PEFT LoRA on PyTorch: transformers' BertModel from the package's config + safetensors, mean
    pooling, dropout and the same initial head."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    from peft import LoraConfig, get_peft_model  # pylint: disable=import-outside-toplevel
    from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
    from transformers import BertConfig, BertModel  # pylint: disable=import-outside-toplevel

    s = cfg['settings']
    inputs = dict(np.load(cfg['inputs']))
    torch.manual_seed(s['seed'])
    package = cfg['package_dir']
    config = BertConfig.from_json_file(os.path.join(package, 'config.json'))

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel(config)
            self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)
            self.classifier = torch.nn.Linear(config.hidden_size, 4)

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return self.classifier(self.dropout(pooled))

    model = Classifier()
    state = {k: v for k, v in load_file(os.path.join(package, 'model.safetensors')).items()
             if not k.endswith('position_ids')}
    missing, unexpected = model.bert.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if 'position_ids' not in k]:
        raise RuntimeError(f'MiniLM weights did not fit BertModel: missing {missing}, unexpected {unexpected}')
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(inputs['head_weight']))
        model.classifier.bias.copy_(torch.from_numpy(inputs['head_bias']))
    model = get_peft_model(model, LoraConfig(r=s['rank'], lora_alpha=s['alpha'], lora_dropout=s['dropout'],
                                             target_modules=s['target_modules'],
                                             modules_to_save=s['modules_to_save']))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    plain = [n.rsplit('.', 1)[-1] == 'bias' or 'LayerNorm' in n for n, _ in named]
    groups = [g for g in ({'params': [p for (_, p), k in zip(named, plain) if not k],
                           'weight_decay': s['weight_decay']},
                          {'params': [p for (_, p), k in zip(named, plain) if k], 'weight_decay': 0.0})
              if g['params']]
    opt = _AdamWeightDecayTorch(groups, eps=s['eps'])
    model.train()
    ids, mask = torch.from_numpy(inputs['train_ids']).long(), torch.from_numpy(inputs['train_mask']).long()
    labels = torch.from_numpy(inputs['train_labels']).long()

    def step(i):
        rows = torch.from_numpy(inputs['batches'][i])
        loss = torch.nn.functional.cross_entropy(model(ids[rows], mask[rows]), labels[rows])
        loss.backward()
        opt.step(float(inputs['rates'][i]))
        return loss.item()
    times, loss = _timed_steps(step, inputs)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs['test_ids']).long(),
                       torch.from_numpy(inputs['test_mask']).long()).numpy()
    accuracy = float((logits.argmax(1) == inputs['test_labels']).mean())
    result = _summary(times, loss, accuracy, sum(p.numel() for _, p in named),
                      sum(p.numel() for p in model.parameters()), len(times[0]))
    result.update(torch_threads=torch.get_num_threads(), torch=torch.__version__)
    return result
