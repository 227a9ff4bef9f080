"""Number formatting, the one place: table cells (``g``), durations (``fmt_s``) and
measures with a unit (``fmt_unit``).  Standard library only."""
from __future__ import annotations

import math
from typing import Any


def g(x: Any, fmt: str = ".3g") -> str:
    """A number for a table: '-' for None, strings kept ('inf', 'nan' from JSON)."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, str):
        return x
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return str(v)
    return format(v, fmt)


def fmt_s(s: float) -> str:
    """A duration: milliseconds below one second."""
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_unit(v: float, unit: str) -> str:
    """A bench measure in its unit (ms, s, MB)."""
    if unit == "ms":
        return f"{v:.1f}" if v < 1000 else f"{v:.0f}"
    if unit == "s":
        return f"{v:.2f}"
    return f"{v:.0f}"
