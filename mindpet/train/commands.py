"""The ``finetune``, ``evaluate`` and ``generate`` verbs of the ``mindpet`` command: their arguments and entry points,
listed in :data:`COMMANDS` for :mod:`mindpet.cli`. The work is done by :mod:`mindpet.train.runner`, imported when a
verb runs, so that ``mindpet --help`` loads no MindSpore (this module imports nothing)."""


def _finetune_arguments(parser):
    parser.add_argument('--config', required=True, metavar='RUN.yaml', help='the run config (see doc/cli.md)')
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='override a config value by its dotted key, e.g. --set training.epochs=1 '
                             '(the value is read as YAML; repeatable)')
    parser.add_argument('--dry-run', action='store_true',
                        help='check the config and build the model without weights; train and write nothing')
    again = parser.add_mutually_exclusive_group()
    again.add_argument('--resume', action='store_true',
                       help='continue the run in training.output_dir from its newest checkpoint (exact: the batches '
                            'already seen are skipped)')
    again.add_argument('--overwrite', action='store_true',
                       help='training.output_dir holds an earlier run: remove what it wrote, then start')


def _finetune_run(args):
    from mindpet.train.runner import finetune  # pylint: disable=import-outside-toplevel
    finetune(args.config, args.overrides, dry_run=args.dry_run, resume=args.resume, overwrite=args.overwrite)
    return 0


def _evaluate_arguments(parser):
    parser.add_argument('--config', required=True, metavar='RUN.yaml', help='the run config of the model')
    parser.add_argument('--adapter', metavar='PATH', default=None,
                        help='an adapter directory (output_dir/adapter) or a full fine-tuned checkpoint '
                             '(output_dir/model.ckpt); omitted: the base model')
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='override a config value by its dotted key (repeatable)')


def _evaluate_run(args):
    from mindpet.train.runner import evaluate  # pylint: disable=import-outside-toplevel
    evaluate(args.config, args.adapter, args.overrides)
    return 0


def _generate_arguments(parser):
    parser.add_argument('--config', required=True, metavar='RUN.yaml', help='the run config of the causal LM')
    parser.add_argument('--adapter', metavar='PATH', default=None,
                        help='an adapter directory (output_dir/adapter) or a full fine-tuned checkpoint; omitted: '
                             'the base model')
    parser.add_argument('--prompt', required=True, action='append', metavar='TEXT',
                        help='the prompt (formatted by data.prompt_template; repeatable)')
    parser.add_argument('--max-new-tokens', type=int, default=None, metavar='N',
                        help='tokens to generate (default: data.max_new_tokens)')
    parser.add_argument('--top-k', type=int, default=0, metavar='K',
                        help='sample from the K most likely tokens (default 0: greedy)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the top-k sampling')
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='override a config value by its dotted key (repeatable)')


def _generate_run(args):
    from mindpet.train.runner import generate  # pylint: disable=import-outside-toplevel
    if args.top_k < 0 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise ValueError(f"--top-k must be >= 0 and --max-new-tokens >= 1, but got {args.top_k} and "
                         f"{args.max_new_tokens}")
    generate(args.config, args.prompt, args.adapter, args.overrides, max_new_tokens=args.max_new_tokens,
             top_k=args.top_k, seed=args.seed)
    return 0


#: ``(name, help, add_arguments, run)`` of each verb, in the order ``mindpet --help`` lists them
COMMANDS = [
    ('finetune', 'fine-tune a model from a YAML run config (mindpet finetune --config RUN.yaml [--set key=value ...] '
                 '[--dry-run] [--resume | --overwrite])', _finetune_arguments, _finetune_run),
    ('evaluate', 'evaluate a model with an adapter or fine-tuned checkpoint (mindpet evaluate --config RUN.yaml '
                 '--adapter DIR)', _evaluate_arguments, _evaluate_run),
    ('generate', 'write text with a causal LM and its adapter (mindpet generate --config RUN.yaml --adapter DIR '
                 '--prompt TEXT [--top-k K])', _generate_arguments, _generate_run),
]
