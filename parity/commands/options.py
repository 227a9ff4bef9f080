"""Reading a command's options: ``opt(args, name, default)`` is the option's value, or
``default`` when it is absent or None (stage functions are also called with a bare
``argparse.Namespace`` by tests)."""
from __future__ import annotations

from typing import Any


def opt(args: Any, name: str, default: Any = None) -> Any:
    v = getattr(args, name, default)
    return default if v is None else v
