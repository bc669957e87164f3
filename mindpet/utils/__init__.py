"""Shared helpers: exceptions, constants, argument validation and checkpoint I/O."""
