"""Reading a command's options: ``opt(args, name, default)`` is the option's value, or
``default`` when it is absent or None (stage functions are also called with a bare
``argparse.Namespace`` by tests)."""
from __future__ import annotations

from typing import Any


def opt(args: Any, name: str, default: Any = None) -> Any:
    v = getattr(args, name, default)
    return default if v is None else v


def given(args: Any, name: str) -> bool:
    """Was the option given on the command line?  The CLI records the explicit options in
    ``args.explicit`` before it fills in the defaults; without that record, a value that is
    not None counts as given."""
    explicit = getattr(args, "explicit", None)
    if explicit is not None:
        return name in explicit
    return getattr(args, name, None) is not None
