"""The ``mindpet`` command (console script ``mindpet=mindpet.cli:main``): ``mindpet <verb> [options]``.

Verbs: ``merge`` (fold an adapter into a base checkpoint) and ``inspect`` (list a checkpoint's or an adapter
directory's tensors), defined here, and ``finetune``/``evaluate``/``generate``, whose arguments and entry points are
in :mod:`mindpet.train.commands`. Every verb imports its implementation (and with it MindSpore) only when it runs,
so ``mindpet --help``, ``mindpet --version`` and ``mindpet <verb> --help`` load no MindSpore. Further verbs plug in
with :func:`register_command`. Verbs raise exceptions; only :func:`main` turns them into messages and exit codes:
0 success, 1 a file/config/argument error (one line on stderr), 2 a command-line usage error.
"""
import argparse
import json
import os
import sys
from collections import OrderedDict, namedtuple

from mindpet.train import commands as train_commands
from mindpet.version import __version__
from mindpet.utils.exceptions import MindPetError

Command = namedtuple('Command', ['name', 'help', 'add_arguments', 'run'])
_COMMANDS = OrderedDict()


def register_command(name, help_text, add_arguments, run):
    """Register verb ``name``: ``add_arguments(parser)`` declares its options, ``run(args)`` does the work and
    returns 0 (or raises; :func:`main` reports the error).

    Example:
        >>> register_command('hello', 'say hello', lambda p: p.add_argument('--who'), lambda a: 0)  # doctest: +SKIP
    """
    if not isinstance(name, str) or not name or name in _COMMANDS:
        raise ValueError(f"For 'register_command', the 'name' must be a new non-empty str, but got {name!r}.")
    if not callable(add_arguments) or not callable(run):
        raise TypeError("For 'register_command', 'add_arguments' and 'run' must be callables.")
    _COMMANDS[name] = Command(name, help_text, add_arguments, run)


def build_parser():
    """The argparse parser with one sub-command per registered verb."""
    parser = argparse.ArgumentParser(prog='mindpet', description='Parameter-efficient fine-tuning for MindSpore.')
    parser.add_argument('--version', action='version', version=f'mindpet {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    for command in _COMMANDS.values():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv=None):
    """Run ``mindpet`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'command', None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except (MindPetError, ValueError, TypeError, OSError, NotImplementedError, ImportError, ArithmeticError) as ex:
        print(f"mindpet {args.command}: error: {_one_line(ex)}", file=sys.stderr)
        return 1


def _one_line(error):
    """The error's message on one line (MindSpore appends a multi-line C++ call stack after a blank line)."""
    text = str(error).split('\n\n----')[0]
    return ' '.join(text.split())


# ----- merge -------------------------------------------------------------------------------------------------
def _merge_arguments(parser):
    parser.add_argument('--base', metavar='BASE.ckpt',
                        help='base-model checkpoint (.ckpt or .safetensors); with --config it may use the naming '
                             "the model's loader maps (e.g. a Hugging Face model.safetensors), and defaults to the "
                             "config's model.base_checkpoint")
    parser.add_argument('--config', metavar='RUN.yaml',
                        help="run config whose model reads the base checkpoint (its own name map); the output then "
                             "holds the whole network under its own names")
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='SECTION.KEY=VALUE',
                        help='override a run-config value (with --config; repeatable)')
    parser.add_argument('--adapter', required=True, metavar='DIR', help='adapter directory (save_pretrained)')
    parser.add_argument('--out', required=True, metavar='MERGED.ckpt',
                        help='output checkpoint; .safetensors or .ckpt by extension')


def _merge_run(args):
    from mindpet.adapter_store import merge_into_checkpoint  # pylint: disable=import-outside-toplevel
    if args.config is not None:
        from mindpet.train.runner import merge  # pylint: disable=import-outside-toplevel
        report, _ = merge(args.config, args.adapter, args.out, base=args.base, overrides=args.overrides)
    elif args.base is None:
        raise ValueError("mindpet merge needs --base BASE.ckpt, or --config RUN.yaml (whose model reads its base "
                         "checkpoint)")
    elif args.overrides:
        raise ValueError("--set overrides a run config: give --config RUN.yaml too")
    else:
        from mindpet.utils.exceptions import AdapterConfigError  # pylint: disable=import-outside-toplevel
        try:
            report = merge_into_checkpoint(args.base, args.adapter, args.out)
        except AdapterConfigError as ex:
            raise AdapterConfigError(f"{ex} If the base checkpoint uses another naming (e.g. Hugging Face's "
                                     f"model.safetensors), give --config RUN.yaml: its model's loader maps the "
                                     f"names.") from ex
    extra = f", {report.copied} other entries copied unchanged" if report.copied else ""
    print(f"merged {report.layers} layer(s) and {report.module_params} saved module parameter(s) into "
          f"{report.out_path} ({report.total_params} tensors, {os.path.getsize(report.out_path):,} bytes{extra})")
    return 0


# ----- inspect -----------------------------------------------------------------------------------------------
def describe(path):
    """Rows ``{'name', 'shape', 'dtype', 'bytes'}`` for a checkpoint file or an adapter directory, and a header
    dict (the adapter's method and hyper-parameters, for a directory).

    Raises:
        CheckpointError, AdapterConfigError: missing or corrupt files.
    """
    from mindpet.adapter_store import flat_tensors, load_adapter_dir  # pylint: disable=import-outside-toplevel
    from mindpet.utils.io_utils import load_checkpoint_file  # pylint: disable=import-outside-toplevel
    header = {}
    if os.path.isdir(path):
        adapter = load_adapter_dir(path)
        header = {'adapter': adapter.name, 'pet': adapter.config.to_dict(), 'layers': len(adapter.targets),
                  'modules_to_save_params': len(adapter.modules),
                  'base_parameters': (None if adapter.fingerprint is None
                                      else sum(_count(shape) for shape in adapter.fingerprint.values()))}
        params = flat_tensors(adapter)
    else:
        params = load_checkpoint_file(path, what='checkpoint')
    rows = [{'name': name, 'shape': list(value.shape), 'dtype': str(value.dtype).lower(),
             'bytes': int(value.nbytes)} for name, value in params.items()]
    return header, rows


def _inspect_arguments(parser):
    parser.add_argument('file', metavar='FILE', help='a .ckpt/.safetensors file or an adapter directory')
    parser.add_argument('--json', action='store_true', help='print JSON instead of a table')


def _inspect_run(args):
    header, rows = describe(args.file)
    total = sum(row['bytes'] for row in rows)
    if args.json:
        print(json.dumps({'file': args.file, 'header': header, 'tensors': rows, 'total_bytes': total}, indent=1))
        return 0
    for key, value in header.items():
        print(f"{key}: {value}")
    cells = [(row['name'], str(tuple(row['shape'])), row['dtype'], f"{row['bytes']:,}") for row in rows]
    titles = ('name', 'shape', 'dtype', 'bytes')
    widths = [max([len(t)] + [len(c[i]) for c in cells]) for i, t in enumerate(titles)]
    print('  '.join(t.ljust(w) for t, w in zip(titles, widths)))
    for cell in cells:
        print('  '.join([cell[0].ljust(widths[0]), cell[1].ljust(widths[1]), cell[2].ljust(widths[2]),
                         cell[3].rjust(widths[3])]))
    print(f"{len(rows)} tensors, {sum(_count(r['shape']) for r in rows):,} values, {total:,} bytes "
          f"({total / 1024 / 1024:.2f} MB)")
    return 0


def _count(shape):
    out = 1
    for dim in shape:
        out *= dim
    return out


register_command('merge', 'merge an adapter into a base checkpoint (mindpet merge --base B --adapter DIR --out M)',
                 _merge_arguments, _merge_run)
register_command('inspect', 'list the tensors of a checkpoint or adapter directory (names, shapes, dtypes, bytes)',
                 _inspect_arguments, _inspect_run)
for _verb in train_commands.COMMANDS:
    register_command(*_verb)


if __name__ == '__main__':
    sys.exit(main())
