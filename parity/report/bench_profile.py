"""The ``--profile`` part of ``bench.md``: per config and mode, the time per op family of both
backends side by side, then each side's slowest ops (bench.json schema in
parity/commands/bench.py; families in parity/workers/op_families.py)."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

SIDES = (("torch", "PyTorch"), ("jittor", "Jittor"))

FAMILY_NOTE = ("Op families: each side's ops mapped to one vocabulary (rules and limits in "
               "`parity/workers/op_families.py`). PyTorch: self CPU time per op, so nested ops count once; "
               "\"framework\" is autograd bookkeeping and allocation, which Jittor's profiler does not record "
               "(it times kernels only). Jittor: time per kernel, a fused kernel counted under its dominant op; "
               "Jittor has no normalisation or attention op (BatchNorm/LayerNorm run as reduction + elementwise "
               "kernels, attention as matmul + softmax), so those rows are PyTorch's only. \"optimiser\" is the "
               "AdamW step on both sides.")


def sides_of(prof: Mapping[str, Any]) -> Dict[str, Mapping[str, Any]]:
    """One mode's profile entry -> {backend: its profile}.  Schema-1 bench.json files held
    Jittor's alone, not keyed by backend."""
    if "by_op" in prof or "top_kernels" in prof:
        return {"jittor": prof}
    return {be: p for be, p in prof.items() if isinstance(p, Mapping)}


def family_rows(sides: Mapping[str, Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """[{"family", "torch": (ms, %) or None, "jittor": ..., "diff_ms": J - T or None}], sorted by
    the Jittor - PyTorch difference, largest first (one side only: by its time)."""
    per: Dict[str, Dict[str, Any]] = {}
    for be, _ in SIDES:
        for f in (sides.get(be) or {}).get("by_family") or []:
            per.setdefault(f["family"], {"family": f["family"], "torch": None, "jittor": None})[be] = (
                float(f["total_ms"]), float(f["percent"]))
    both = all(sides.get(be) and sides[be].get("by_family") is not None for be, _ in SIDES)
    for r in per.values():
        t, j = (r["torch"] or (0.0, 0.0))[0], (r["jittor"] or (0.0, 0.0))[0]
        r["diff_ms"] = j - t if both else None
        r["_sort"] = j - t if both else t + j
    rows = sorted(per.values(), key=lambda r: (-r["_sort"], r["family"]))
    for r in rows:
        del r["_sort"]
    return rows


def _cell(v: Optional[tuple]) -> List[str]:
    return [f"{v[0]:.1f}", f"{v[1]:.1f}"] if v else ["-", "-"]


def family_table(sides: Mapping[str, Mapping[str, Any]]) -> List[str]:
    lines = ["| family | PyTorch ms | % | Jittor ms | % | J−T ms |", "|---|---:|---:|---:|---:|---:|"]
    for r in family_rows(sides):
        diff = f"{r['diff_ms']:+.1f}" if r["diff_ms"] is not None else "-"
        lines.append(f"| {r['family']} | " + " | ".join(_cell(r["torch"]) + _cell(r["jittor"])) + f" | {diff} |")
    tot = [f"{(sides.get(be) or {}).get('total_ms'):.1f}" if (sides.get(be) or {}).get("total_ms") is not None
           else "-" for be, _ in SIDES]
    lines.append(f"| **profiled total** | {tot[0]} | 100 | {tot[1]} | 100 | |")
    return lines


def top_ops_table(side: Mapping[str, Any], variants: str = "kernels", n: int = 10) -> List[str]:
    """``variants``: what one op's rows are (Jittor: jit kernels; torch: input shapes)."""
    lines = [f"| op | family | {variants} | calls | total ms | % |", "|---|---|---:|---:|---:|---:|"]
    for o in (side.get("by_op") or [])[:n]:
        lines.append(f"| `{o['op']}` | {o.get('family', '-')} | {o['kernels']} | {o['count']} | "
                     f"{o['total_ms']:.1f} | {o['percent']:.1f} |")
    return lines


def profile_md(run: Mapping[str, Any]) -> List[str]:
    """The profile sections of one bench.json run (config): nothing without ``--profile``."""
    lines: List[str] = []
    for mode, prof in (run.get("profile") or {}).items():
        sides = sides_of(prof)
        if not sides:
            continue
        if any(s.get("by_family") is not None for s in sides.values()):
            lines += [f"Where each side spends a step, {run['config']} {mode}, by op family: one more call per "
                      f"backend after the timed ones, under its own profiler, **not a timed call** (ms: the "
                      f"profiler's totals of the recorded ops), sorted by Jittor − PyTorch:", ""] + family_table(sides) + [""]
        for be, label in SIDES:
            side = sides.get(be)
            if not side:
                continue
            how = "torch.profiler, self CPU time" if be == "torch" else "`jt.profile_scope()`, kernels"
            lines += [f"Slowest {label} ops, {run['config']} {mode} (the same profiled call: {how} grouped by "
                      f"op; details in `{side.get('file')}`):", ""]
            lines += top_ops_table(side, "shapes" if be == "torch" else "kernels") + [""]
    return lines


def profile_section(runs: List[Mapping[str, Any]]) -> List[str]:
    """Every run's profile sections, after the family note when any has families."""
    body = [line for r in runs for line in profile_md(r)]
    families = any(s.get("by_family") is not None for r in runs for prof in (r.get("profile") or {}).values()
                   for s in sides_of(prof).values())
    return ([FAMILY_NOTE, ""] if families else []) + body
