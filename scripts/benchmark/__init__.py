"""The benchmark suite behind scripts/benchmark.py (run that file; its docstring describes the command)."""
