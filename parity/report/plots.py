"""PNG plots of ``parity report`` (matplotlib, Agg backend; every function returns PNG bytes).

Colours: PyTorch blue, Jittor orange, the PyTorch float64 reference grey — in every plot.
"""
from __future__ import annotations

import io
import math
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np

COLORS = {"torch": "#1f77b4", "jittor": "#ff7f0e", "ref": "#7f7f7f"}


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _pos(vals: Sequence[float], floor: float = 1e-18) -> np.ndarray:
    """Values for a log axis: zeros become ``floor`` (drawn at the bottom), non-finite NaN."""
    a = np.asarray([_num(v) for v in vals], dtype=np.float64)
    a = np.where(np.isfinite(a), np.maximum(a, floor), np.nan)
    return a


def side_color(side: Mapping[str, Any]) -> str:
    if side.get("role") == "ref":
        return COLORS["ref"]
    return COLORS.get(side.get("backend"), "k")


# ----------------------------------------------------------------------------------------
# training runs
# ----------------------------------------------------------------------------------------

def loss_curves(sides: Sequence[Mapping[str, Any]], logs: Mapping[str, Mapping[str, Any]], title: str = "") -> bytes:
    """Total loss per iteration of every side overlaid (thin), per-epoch means (markers)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for s in sides:
        lg = logs.get(s["label"])
        if not lg:
            continue
        its = lg.get("iterations", [])
        x = [r["iteration"] for r in its]
        y = [_num(r["total"]) for r in its]
        ls = "--" if s.get("role") == "ref" else "-"
        ax.plot(x, y, ls, color=side_color(s), lw=0.8, alpha=0.55)
        ipe = max(1, max((e.get("iterations", 1) for e in lg.get("epochs", [])), default=1))
        ex = [e["epoch"] * ipe for e in lg.get("epochs", [])]
        ey = [_num(e.get("mean_total")) for e in lg.get("epochs", [])]
        ax.plot(ex, ey, "o" + ls, color=side_color(s), ms=3.5, lw=1.6,
                label=f"{s['label']} ({s['backend']} {s['dtype']}) epoch mean")
        nf = lg.get("nonfinite")
        if nf:
            ax.axvline(nf["iteration"], color=side_color(s), ls=":", lw=1.2)
            ax.annotate(f"{s['label']}: non-finite {nf['term']}", (nf["iteration"], ax.get_ylim()[1]),
                        rotation=90, va="top", ha="right", fontsize=7, color=side_color(s))
    ax.set_xlabel("iteration")
    ax.set_ylabel("total loss")
    ax.set_title(title or "Total loss (lines: every iteration; markers: epoch means)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def epoch_rel_diff(metrics: Mapping[str, Any], floor: Optional[Mapping[str, Any]], tol: Optional[float] = None,
                   title: str = "") -> bytes:
    """Per-epoch relative difference of the mean total loss and of the worst term (log), with
    the float32 noise floor (T32 vs T64) when measured."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ep = metrics.get("epochs", [])
    x = [d["epoch"] for d in ep]
    ax.semilogy(x, _pos([d["total_rel"] for d in ep]), "o-", color=COLORS["jittor"], label="total: |J - T| / |T|")
    ax.semilogy(x, _pos([d["worst_term_rel"] for d in ep]), "s:", color=COLORS["jittor"], alpha=0.7, ms=3,
                label="worst loss term")
    if floor:
        fe = floor.get("epochs", [])
        ax.semilogy([d["epoch"] for d in fe], _pos([d["total_rel"] for d in fe]), "o-", color=COLORS["ref"],
                    label="floor, total: |T32 - T64| / |T64|")
        ax.semilogy([d["epoch"] for d in fe], _pos([d["worst_term_rel"] for d in fe]), "s:", color=COLORS["ref"],
                    alpha=0.7, ms=3, label="floor, worst term")
    if tol:
        ax.axhline(tol, color="k", lw=0.8, ls="--", label=f"lock-step tolerance {tol:g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("relative difference of the epoch mean")
    ax.set_title(title or "Relative difference per epoch")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _png(fig)


def iteration_rel_diff(metrics: Mapping[str, Any], floor: Optional[Mapping[str, Any]], tol: float) -> bytes:
    """Per-iteration relative difference (total and worst term), lock-step point marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.8))
    it = metrics.get("iterations", [])
    x = [d["iteration"] for d in it]
    ax.semilogy(x, _pos([d["total_rel"] for d in it]), "-", color=COLORS["jittor"], lw=1, label="total (J vs T)")
    ax.semilogy(x, _pos([d["worst_term_rel"] for d in it]), ":", color=COLORS["jittor"], lw=1, label="worst term (J vs T)")
    ax.semilogy(x, _pos([d["grad_norm_rel"] for d in it]), "-.", color="#2ca02c", lw=0.9,
                label="pre-clip gradient norm (J vs T)")
    if floor:
        fi = floor.get("iterations", [])
        ax.semilogy([d["iteration"] for d in fi], _pos([d["worst_term_rel"] for d in fi]), ":", color=COLORS["ref"],
                    lw=1, label="worst term floor (T32 vs T64)")
    ax.axhline(tol, color="k", lw=0.8, ls="--", label=f"lock-step tolerance {tol:g}")
    ls = metrics.get("lockstep", {})
    if ls.get("first_iteration"):
        ax.axvline(ls["first_iteration"], color="r", lw=0.8, ls="--",
                   label=f"lock-step ends: iteration {ls['first_iteration']} ({ls.get('term')})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("relative difference")
    ax.set_title("Per-iteration relative difference (zeros drawn at 1e-18)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _png(fig)


def term_curves(sides: Sequence[Mapping[str, Any]], logs: Mapping[str, Mapping[str, Any]], max_terms: int = 48) -> bytes:
    """One panel per loss term: per-epoch mean of every side."""
    plt = _plt()
    terms: List[str] = []
    for s in sides:
        for e in (logs.get(s["label"]) or {}).get("epochs", []):
            terms += [t for t in e.get("mean", {}) if t not in terms]
    terms = terms[:max_terms]
    n = max(1, len(terms))
    cols = 6 if n > 12 else 4
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 1.9), squeeze=False)
    for i, t in enumerate(terms):
        ax = axes[i // cols][i % cols]
        for s in sides:
            lg = logs.get(s["label"])
            if not lg:
                continue
            eps = [e for e in lg.get("epochs", []) if t in e.get("mean", {})]
            ax.plot([e["epoch"] for e in eps], [_num(e["mean"][t]) for e in eps], "--" if s.get("role") == "ref" else "-",
                    color=side_color(s), lw=1.2, marker="." if len(eps) < 30 else None, label=s["label"])
        ax.set_title(t, fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=6)
    for j in range(len(terms), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle("Per-term epoch means (x: epoch)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def map_curves(sides: Sequence[Mapping[str, Any]], maps: Mapping[str, Mapping[str, Mapping[str, float]]]) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for s in sides:
        m = maps.get(s["label"]) or {}
        ep = sorted(int(k) for k in m)
        for key, mk in (("AP", "o"), ("AP50", "^")):
            ax.plot(ep, [_num(m[str(e)][key]) for e in ep], mk + ("--" if s.get("role") == "ref" else "-"),
                    color=side_color(s), label=f"{s['label']} {key}", alpha=1.0 if key == "AP" else 0.6)
    ax.set_xlabel("epoch")
    ax.set_ylabel("COCO metric (val)")
    ax.set_title("COCO AP / AP50 on the val images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


# ----------------------------------------------------------------------------------------
# forward / grad runs
# ----------------------------------------------------------------------------------------

def module_errors(entries: Sequence[Mapping[str, Any]], title: str, max_bars: int = 140) -> bytes:
    """Horizontal bars, one per tensor in forward order: rel L2 error (cand vs base) with the
    float32 floor marker when measured; failing tensors in red."""
    plt = _plt()
    ents = list(entries)[:max_bars]
    n = max(1, len(ents))
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.16 * n + 1.2)))
    y = np.arange(len(ents))
    err = _pos([e.get("err") for e in ents], 1e-18)
    colors = [COLORS["jittor"] if e.get("passed") else "#d62728" for e in ents]
    ax.barh(y, err, color=colors, height=0.7, label="rel L2 (Jittor vs PyTorch)")
    fl = [e.get("floor") for e in ents]
    if any(f is not None for f in fl):
        ax.plot(_pos(fl, 1e-18), y, "|", color="k", ms=7, label="float32 floor (T32 vs T64)")
    ths = sorted({float((e.get("threshold") or {}).get("rel_l2")) for e in ents
                  if (e.get("threshold") or {}).get("rel_l2") is not None})
    for i, t in enumerate(ths):
        ax.axvline(t, color="k", ls="--", lw=0.8, label="threshold (fixed rule)" if i == 0 else None)
    ax.set_yticks(y)
    ax.set_yticklabels([e["name"] for e in ents], fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("relative L2 error (zeros drawn at 1e-18)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x", which="both")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def group_errors(groups: Sequence[Mapping[str, Any]], title: str) -> bytes:
    """Bars per parameter group: worst and median gradient rel L2 error, floor median."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = np.arange(len(groups))
    w = 0.28
    ax.bar(x - w, _pos([g["worst_err"] for g in groups]), w, color="#d62728", label="worst tensor")
    ax.bar(x, _pos([g["median_err"] for g in groups]), w, color=COLORS["jittor"], label="median tensor")
    if any(g.get("median_floor") is not None for g in groups):
        ax.bar(x + w, _pos([g.get("median_floor") for g in groups]), w, color=COLORS["ref"], label="median floor (T32 vs T64)")
    ax.set_xticks(x)
    ax.set_xticklabels([g["label"] for g in groups], fontsize=7, rotation=15, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("gradient rel L2 error")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=7)
    return _png(fig)
