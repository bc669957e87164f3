"""``python -m mindpet <verb> ...``: the ``mindpet`` command without the console script (e.g. under msrun)."""
import sys

from mindpet.cli import main

if __name__ == '__main__':
    sys.exit(main())
