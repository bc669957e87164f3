"""Data files and tokenizers the tests write for runs with no code: a 200-row topic classification JSONL file,
instruction rows, and a word-level ``tokenizer.json`` trained offline with the ``tokenizers`` trainer."""
import json

import numpy as np

TOPICS = {
    'sports': 'goal match team score coach league player ball',
    'food': 'bread cheese soup spicy recipe bake oven salad',
    'tech': 'laptop code chip server cloud robot phone app',
    'travel': 'flight hotel beach passport train island map tour',
}
FILLER = 'the a today really some very'.split()
SPECIALS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '</s>']


def topic_rows(count=200, seed=0):
    """``{'text', 'label'}`` rows: 4 words of the label's topic among 3 filler words."""
    rng = np.random.default_rng(seed)
    labels = sorted(TOPICS)
    rows = []
    for index in range(count):
        label = labels[index % len(labels)]
        words = list(rng.choice(TOPICS[label].split(), 4)) + list(rng.choice(FILLER, 3))
        rng.shuffle(words)
        rows.append({'text': ' '.join(words), 'label': label})
    return rows


FACTS = [(f"colour of {thing}", colour) for thing, colour in [
    ('sky', 'blue'), ('grass', 'green'), ('snow', 'white'), ('coal', 'black'), ('sun', 'yellow'),
    ('blood', 'red'), ('sea', 'blue'), ('leaf', 'green'), ('milk', 'white'), ('night', 'black'),
    ('lemon', 'yellow'), ('rose', 'red'), ('cloud', 'white'), ('frog', 'green'), ('crow', 'black'),
    ('banana', 'yellow')]]


def instruction_rows(alpaca=False):
    """Instruction rows ``prompt``/``response`` (or Alpaca ``instruction``/``input``/``output``)."""
    if alpaca:
        return [{'instruction': 'answer', 'input': prompt, 'output': f"it is {answer}"} for prompt, answer in FACTS]
    return [{'prompt': prompt, 'response': f"it is {answer}"} for prompt, answer in FACTS]


def write_jsonl(path, rows):
    with open(path, 'w', encoding='utf-8') as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + '\n')
    return str(path)


def train_tokenizer(path, texts, cls_sep=True):
    """A word-level tokenizer.json trained on ``texts`` (whitespace split; '[CLS] text [SEP]' when ``cls_sep``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    tokenizer = Tokenizer(models.WordLevel(unk_token='[UNK]'))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    if cls_sep:
        tokenizer.post_processor = processors.TemplateProcessing(
            single='[CLS] $A [SEP]', special_tokens=[('[CLS]', tokenizer.token_to_id('[CLS]')),
                                                     ('[SEP]', tokenizer.token_to_id('[SEP]'))])
    tokenizer.save(str(path))
    return str(path), tokenizer.get_vocab_size()
