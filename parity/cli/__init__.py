"""The ``parity`` command line; ``parity.cli:main`` is the console script of pyproject.toml."""
from parity.cli.parser import main

__all__ = ["main"]
