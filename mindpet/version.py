"""The mindpet version, in a module of its own so that importing it loads nothing else (``mindpet --version``,
the adapter metadata)."""
__version__ = '1.1.0'
