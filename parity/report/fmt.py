"""Shared by the report renderers: repository-relative paths and Markdown tables (numbers:
``parity/numfmt.py``)."""
from __future__ import annotations

import os
from typing import Any, List, Mapping, Optional, Sequence

from parity.facts import repo_root
from parity.numfmt import g


def shown_path(path: Any) -> str:
    """A path as a report shows it: relative to the repository when inside it (a committed
    report must not carry one machine's absolute paths), else as given."""
    if not path:
        return str(path)
    root = repo_root()
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
