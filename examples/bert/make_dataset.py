"""Generate the BERT example's topic-classification dataset, deterministically.

    python -m examples.bert.make_dataset            # rewrites examples/bert/assets/{train,test}.jsonl
    python -m examples.bert.make_dataset --check    # exit 1 if the shipped files differ from a fresh generation

Four topics (sports, food, weather, technology). Sentences are built from templates, people and topic keywords with
a seeded ``random.Random``, so the files are byte-identical on every run and machine. Three things keep the task
from being a keyword lookup:

* half the sentences use templates shared by all topics, so only the keyword tells the topic;
* 40% open with a distractor clause about another topic ("Despite all the talk about rain, ..."): the label is the
  topic of the main clause, which a bag-of-words average (e.g. frozen mean-pooled sentence embeddings) gets wrong;
* the held-out split has unseen combinations of the training keywords and, for half of its rows, keywords that never
  occur in training (accuracy rewards what the pretrained model knows about words).
"""
import argparse
import os
import random
import sys

LABELS = ('sports', 'food', 'weather', 'technology')
SEED = 20240613
TRAIN_PER_CLASS = 100
TEST_PER_CLASS = 40
ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')

PEOPLE = ('My sister', 'The teacher', 'Our neighbour', 'A student', 'My uncle', 'The manager', 'My best friend',
          'Grandpa', 'The new intern', 'Her cousin', 'The old man', 'Everyone in the office')
# Templates shared by every topic: in these only the keyword tells the topic apart.
SHARED_TEMPLATES = ('{who} keeps talking about {k}.', '{who} wrote a long post about {k}.',
                    'The news mentioned {k} again.', '{who} asked me what I think of {k}.',
                    'There was a question about {k} in the quiz.', '{who} is tired of hearing about {k}.')
# Distractor clauses: {d} is a keyword of another topic.
DISTRACTORS = ('Despite all the talk about {d}, ', 'After a long chat about {d}, ', 'Instead of discussing {d}, ',
               'Although the news was full of {d}, ')
DISTRACTOR_SHARE = 0.4
OPENERS = ('', 'Yesterday, ', 'I heard that ', 'Apparently, ', 'Last week, ', 'To our surprise, ')

# (keywords seen in training, keywords only in the held-out split, templates). ``{who}`` is a person, ``{k}`` a
# keyword.
TOPICS = {
    'sports': (
        ('football', 'basketball', 'tennis', 'baseball', 'golf', 'cricket', 'swimming', 'cycling', 'boxing',
         'skiing'),
        ('volleyball', 'hockey', 'rugby', 'badminton'),
        ('{who} played {k} after school.', '{who} watched {k} on television last night.',
         'The coach said {k} practice starts at nine.', 'Our club is looking for new players for {k}.',
         '{who} won a medal in {k} this season.', 'Tickets for the {k} final sold out in an hour.',
         '{who} trains for {k} every morning.', 'The {k} championship was decided in the last minute.')),
    'food': (
        ('pasta', 'soup', 'bread', 'rice', 'salad', 'pizza', 'cake', 'cheese', 'noodles', 'curry'),
        ('dumplings', 'pancakes', 'omelette', 'sushi'),
        ('{who} cooked {k} for dinner.', 'The recipe for {k} needs fresh ingredients.',
         '{who} thinks the {k} at that restaurant tastes great.', 'We ordered {k} and it arrived hot.',
         '{who} is learning to make {k} at home.', 'The {k} was too salty to finish.',
         '{who} shared a plate of {k} with the family.', 'There is leftover {k} in the fridge.')),
    'weather': (
        ('rain', 'snow', 'wind', 'fog', 'sunshine', 'thunder', 'frost', 'heat', 'clouds', 'storms'),
        ('hail', 'drizzle', 'humidity', 'blizzards'),
        ('The forecast predicts {k} tomorrow morning.', '{who} stayed inside because of the {k}.',
         'Heavy {k} is expected across the region.', 'The {k} lasted all afternoon.',
         '{who} said the {k} ruined the picnic.', 'Farmers are worried about more {k} this week.',
         '{who} checked the sky and saw signs of {k}.', 'The {k} made the roads dangerous tonight.')),
    'technology': (
        ('laptop', 'smartphone', 'software', 'computer', 'robot', 'printer', 'keyboard', 'battery', 'website',
         'camera'),
        ('tablet', 'router', 'microchip', 'database'),
        ('{who} installed a new {k} at work.', 'The {k} stopped working after the update.',
         '{who} bought a faster {k} yesterday.', 'Engineers are testing the new {k}.',
         '{who} fixed the broken {k} in ten minutes.', 'The company released an improved {k}.',
         '{who} reads reviews before choosing a {k}.', 'The {k} needs to be restarted twice a day.')),
}


def _sentence(rng, keywords, templates, distractors):
    # Half the sentences use a topic-neutral template, so the keyword alone decides their label.
    templates = SHARED_TEMPLATES if rng.random() < 0.5 else templates
    text = rng.choice(templates).format(who=rng.choice(PEOPLE), k=rng.choice(keywords))
    if rng.random() < DISTRACTOR_SHARE:
        opener = rng.choice(DISTRACTORS).format(d=rng.choice(distractors))
    else:
        opener = rng.choice(OPENERS)
    if opener:
        # Lower-case the sentence start after an opener, except for proper words like "Grandpa".
        first, rest = text.split(' ', 1)
        if first in ('The', 'My', 'Our', 'A', 'We', 'Nobody', 'There', 'Engineers', 'Farmers', 'Tickets',
                     'Everyone', 'Heavy', 'Her'):
            first = first.lower()
        text = opener + first + ' ' + rest
    return text


def generate(seed=SEED, train_per_class=TRAIN_PER_CLASS, test_per_class=TEST_PER_CLASS):
    """Return ``(train_rows, test_rows)``: lists of ``{'text', 'label', 'label_name'}`` dicts, no duplicates and no
    sentence in both splits."""
    rng = random.Random(seed)
    train, test, seen = [], [], set()
    for label, name in enumerate(LABELS):
        seen_kw, held_kw, templates = TOPICS[name]

        def draw(keywords, count, out, held=False):
            # Distractor keywords come from the same pool (seen / held-out) as the row's own keyword.
            others = [k for other in LABELS if other != name for k in TOPICS[other][1 if held else 0]]
            while count:
                text = _sentence(rng, keywords, templates, others)
                if text in seen:
                    continue
                seen.add(text)
                out.append({'text': text, 'label': label, 'label_name': name})
                count -= 1

        draw(seen_kw, train_per_class, train)
        draw(seen_kw, test_per_class // 2, test)
        draw(held_kw, test_per_class - test_per_class // 2, test, held=True)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=ASSET_DIR, help='output directory (default: the shipped assets)')
    parser.add_argument('--check', action='store_true', help='compare with the files in --out instead of writing')
    args = parser.parse_args(argv)
    from examples.common import write_jsonl, read_jsonl  # pylint: disable=import-outside-toplevel
    train, test = generate()
    if args.check:
        same = (read_jsonl(os.path.join(args.out, 'train.jsonl')) == train
                and read_jsonl(os.path.join(args.out, 'test.jsonl')) == test)
        print('up to date' if same else 'differs from a fresh generation')
        return 0 if same else 1
    write_jsonl(os.path.join(args.out, 'train.jsonl'), train)
    write_jsonl(os.path.join(args.out, 'test.jsonl'), test)
    print(f"wrote {len(train)} training and {len(test)} held-out sentences to {args.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
