"""The ``finetune`` and ``evaluate`` verbs of the ``mindpet`` command (registered with
:func:`mindpet.cli.register_command`; the work is done by :mod:`mindpet.train.runner`)."""
from mindpet.cli import register_command


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


register_command('finetune', 'fine-tune a model from a YAML run config (mindpet finetune --config RUN.yaml '
                             '[--set key=value ...] [--dry-run] [--resume | --overwrite])', _finetune_arguments, _finetune_run)
register_command('evaluate', 'evaluate a model with an adapter or fine-tuned checkpoint (mindpet evaluate --config '
                             'RUN.yaml --adapter DIR)', _evaluate_arguments, _evaluate_run)
