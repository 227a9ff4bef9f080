"""Formatting shared by the report renderers (parity/report.py, parity/report_train.py):
numbers, repository-relative paths, Markdown tables."""
from __future__ import annotations

import math
import os
from typing import Any, List, Mapping, Optional, Sequence

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


def shown_path(path: Any) -> str:
    """A path as a report shows it: relative to the repository when inside it (a committed
    report must not carry one machine's absolute paths), else as given."""
    if not path:
        return str(path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = os.path.abspath(str(path))
    return os.path.relpath(ap, root) if ap == root or ap.startswith(root + os.sep) else str(path)


def md_table(df, floatfmt: str = ".3g", index: bool = False) -> List[str]:
    """A pandas DataFrame as Markdown lines (no tabulate dependency)."""
    cols = ([df.index.name or ""] if index else []) + [str(c).replace("|", "\\|") for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for idx, row in df.iterrows():
        cells = [str(idx)] if index else []
        for v in row.tolist():
            if isinstance(v, float):
                cells.append(g(v, floatfmt))
            else:
                cells.append("-" if v is None else str(v).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _df(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None):
    import pandas as pd
    df = pd.DataFrame(list(rows))
    if columns is not None:
        df = df.reindex(columns=list(columns))
    return df.astype(object).where(df.notna(), None)
