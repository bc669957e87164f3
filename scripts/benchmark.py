#!/usr/bin/env python
"""Benchmark suite for mindpet: what parameter-efficient tuning promises (step time, memory, checkpoint size,
switching time, inference overhead), measured side by side in one run and reported as ratios.

    PYTHONPATH=. python scripts/benchmark.py                  # CPU, parts train/train_ab/forward/layer/ckpt/
                                                              #   switch/reference
    PYTHONPATH=. python scripts/benchmark.py --parts switch   # only set_adapter/merge() vs a forward pass
    PYTHONPATH=. python scripts/benchmark.py --peers          # + Hugging Face PEFT on PyTorch (own venv)
    PYTHONPATH=. python scripts/benchmark.py --device Ascend  # MindSpore parts on Ascend

Prints a markdown table, writes JSON (``--json``, default ``doc/benchmarks.json``) and rewrites the results block
of ``doc/benchmarks.md`` (between its BEGIN/END markers; the hand-written analysis around it is kept).

Every measurement runs in a child process (``--worker KIND``), so peak memory is per process and one variant's
compiled graphs and allocator state cannot leak into another's timing. Variants are interleaved over
``--repeats`` rounds and each figure is a median, because the machines this runs on are shared and noisy.

The code is the package scripts/benchmark/: ``models.py`` (the models and the variants table), ``workers_ms.py`` and
``workers_torch.py`` (what each worker process measures), ``measure.py`` (timing and memory primitives),
``orchestrate.py`` (the command line, the worker processes, the ratios) and ``report.py`` (targets and the markdown).
Adding a variant is one entry in ``models.TRAIN_VARIANTS`` (training step and memory) and, for the forward timing,
in ``orchestrate.FORWARD_GROUPS``: the entry names the function that turns the base model into that variant and
the virtualenv its process runs in. The reference (MindPet 1.0.4) and the peer (PEFT on PyTorch) run in their own virtualenvs
under ``.bench/``, created on first use.
"""
import os
import sys

# This file stays the command; the code is the package scripts/benchmark/ beside it. Running this file puts scripts/
# first on sys.path, and in one directory a package is found before a module of the same name, so `benchmark` below
# is always the package, never this file (which is only ever __main__). The insert covers loading this file by path
# from elsewhere. Inside the package, imports are relative, so it also imports as scripts.benchmark (the tests).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from benchmark.orchestrate import main  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == '__main__':
    sys.exit(main())
