"""The mindone part: LoRA on a mindone.transformers BERT, mindpet vs mindone.peft, beside full fine-tuning of the
same model, all built in one worker process and timed interleaved (training steps, then forward passes).

The BERT is built from a config (no download) and made runnable on the CPU by tests/ecosystem/mindone_models.py
(its mint Embedding and LayerNorm cells computed by CPU ops on the same Parameters; ReLU instead of GELU). LoRA on
``query``/``value`` (r=8, alpha 16) in both libraries; the head stays frozen because mindone.peft's
``modules_to_save`` wrapper does not compile in GRAPH_MODE (a generator expression in its ``construct``).
"""
from .measure import interleaved, median, timed
from .models import ms_setup, ms_sync

MINDONE_BERT = dict(vocab=1000, hidden=256, layers=4, heads=4, intermediate=1024, batch=16, seq=64)
MINDONE_QUICK = dict(vocab=100, hidden=32, layers=2, heads=2, intermediate=64, batch=2, seq=8)
MINDONE_VARIANTS = ('full', 'mindpet_lora', 'mindone_peft_lora')


def _bert(size):
    import numpy as np  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    from mindone.transformers import BertForSequenceClassification  # pylint: disable=import-outside-toplevel
    from tests.ecosystem.mindone_models import cpu_runnable  # pylint: disable=import-outside-toplevel
    config = transformers.BertConfig(vocab_size=size['vocab'], hidden_size=size['hidden'],
                                     num_hidden_layers=size['layers'], num_attention_heads=size['heads'],
                                     intermediate_size=size['intermediate'], max_position_embeddings=size['seq'],
                                     hidden_act='relu', hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     num_labels=4, attn_implementation='eager')
    ms.set_seed(0)
    np.random.seed(0)
    model = BertForSequenceClassification(config)
    cpu_runnable(model)
    return model


def _variant(name, size):
    model = _bert(size)
    if name == 'full':
        return model
    if name == 'mindpet_lora':
        from mindpet import LoraConfig, get_pet_model  # pylint: disable=import-outside-toplevel
        return get_pet_model(model, LoraConfig(target_modules=['query', 'value'], lora_rank=8, lora_alpha=16))
    from mindone import peft  # pylint: disable=import-outside-toplevel
    return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=['query', 'value']))


def worker_mindone(cfg):
    """Step and forward time of full fine-tuning, mindpet LoRA and mindone.peft LoRA on one mindone BERT size."""
    ms = ms_setup(cfg)
    import numpy as np  # pylint: disable=import-outside-toplevel
    from mindspore import nn  # pylint: disable=import-outside-toplevel
    from tests.ecosystem.mindone_models import BertLogits, BertLoss  # pylint: disable=import-outside-toplevel
    size = cfg['bert']
    rng = np.random.RandomState(0)
    ids = ms.Tensor(rng.randint(1, size['vocab'], (size['batch'], size['seq'])).astype(np.int32))
    mask = ms.Tensor(np.ones((size['batch'], size['seq']), np.int32))
    types = ms.Tensor(np.zeros((size['batch'], size['seq']), np.int32))
    labels = ms.Tensor(rng.randint(0, 4, (size['batch'],)).astype(np.int32))

    steps, forwards, trainable = {}, {}, {}
    for name in cfg['variants']:
        net = _variant(name, size)
        trainable[name] = sum(int(np.prod(p.shape)) for p in net.trainable_params())
        logits = BertLogits(net)
        train = nn.TrainOneStepCell(BertLoss(logits), nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-4))
        train.set_train(True)
        train(ids, mask, types, labels)

        def step(train=train):
            train(ids, mask, types, labels)
            ms_sync(ms, cfg)
        steps[name] = step
        eval_net = BertLogits(net)
        eval_net.set_train(False)
        eval_net(ids, mask, types)

        def forward(eval_net=eval_net):
            eval_net(ids, mask, types)
            ms_sync(ms, cfg)
        forwards[name] = forward
    wall, cpu = interleaved(steps, cfg['steps'], warmup=cfg['warmup'])
    fwd = timed(forwards, cfg['iterations'])
    return dict(step_s={n: median(t) for n, t in wall.items()}, step_cpu_s={n: median(t) for n, t in cpu.items()},
                forward_s=fwd['time_s'], forward_cpu_s=fwd['cpu_s'], trainable=trainable)
