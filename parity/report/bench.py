"""How ``parity bench`` renders its ``bench.json`` (schema in parity/commands/bench.py): the
Markdown tables (``bench.md``, also ``parity report``), the bar chart (``bench.png``) and the
terminal table."""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from parity.numfmt import fmt_unit
from parity.report.bench_profile import profile_section


def _load(v) -> str:
    return "/".join(f"{x:.1f}" for x in v) if v else "?"


def render_md(doc: Dict[str, Any]) -> str:
    s = doc["settings"]
    h = doc["host"]
    lines = ["# parity bench", "",
             f"Device `{s['device']}`, {s['dtype']}, batch {s['batch']}, {s['repeat']} timed calls after "
             f"{s['warmup']} warm-up call(s); host: {h.get('cpu_model') or h.get('machine')}, "
             f"{h.get('affinity') or h.get('cpu_count')} usable cores, {h.get('memory_gb') or 0:.0f} GB, "
             f"load average {_load(h.get('loadavg'))} at start, {_load(h.get('loadavg_end'))} at the end "
             f"(other work on the machine slows both backends). "
             f"Created {doc['created']} by `{' '.join(doc['command'])}`.", "",
             "Ratio = Jittor median / PyTorch median (> 1: Jittor slower or bigger). Latencies are "
             "min / median / max over the timed calls; warm-up (Jittor: kernel compilation) is reported "
             "separately and excluded.", ""]
    runs = doc["runs"]
    both = all("torch" in r["backends"] and "jittor" in r["backends"] for r in runs)
    lines += ["| config | size | measure | PyTorch | Jittor | Jittor/PyTorch |", "|---|---|---|---:|---:|---:|"]
    for r in runs:
        size = "x".join(str(x) for x in r["size"])
        for name, m in r["measures"].items():
            cells = []
            for be in ("torch", "jittor"):
                if be not in m:
                    cells.append("-")
                    continue
                st = m[be]
                if m["kind"] == "latency":
                    cells.append(f"{fmt_unit(st['min'], m['unit'])} / **{fmt_unit(st['median'], m['unit'])}** / "
                                 f"{fmt_unit(st['max'], m['unit'])} {m['unit']}")
                else:
                    cells.append(f"{fmt_unit(st['median'], m['unit'])} {m['unit']}")
            ratio = f"{m['ratio']:.2f}x" if m.get("ratio") is not None else "-"
            lines.append(f"| {r['config']} | {size} | {name} | {cells[0]} | {cells[1]} | {ratio} |")
    lines.append("")
    for r in runs:
        lines.append(f"**{r['config']}** ({r['config_digest']}): " + "; ".join(
            f"{be} {b['versions'].get(be, '?')} ({b['threads'].get('threads')} threads, {b['device']})"
            for be, b in r["backends"].items()))
        lines.append("")
    lines += profile_section(runs)
    if not both:
        lines.append("(only one backend was run: no ratios)")
    return "\n".join(lines) + "\n"


def render_png(doc: Dict[str, Any]) -> bytes:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = doc["runs"]
    colors = {"torch": "#ee4c2c", "jittor": "#2c7bb6"}
    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 2.8 * len(runs) + 0.6), squeeze=False)
    for row, r in zip(axes, runs):
        for ax, kinds, title in ((row[0], ("latency",), "latency (median, min-max bars)"),
                                 (row[1], ("memory",), "peak memory")):
            names = [n for n, m in r["measures"].items() if m["kind"] in kinds]
            bes = [be for be in ("torch", "jittor") if be in r["backends"]]
            x = np.arange(len(names))
            w = 0.8 / max(1, len(bes))
            unit = r["measures"][names[0]]["unit"] if names else ""
            for j, be in enumerate(bes):
                med = [r["measures"][n][be]["median"] for n in names]
                lo = [med[i] - r["measures"][n][be]["min"] for i, n in enumerate(names)]
                hi = [r["measures"][n][be]["max"] - med[i] for i, n in enumerate(names)]
                bars = ax.bar(x + (j - (len(bes) - 1) / 2) * w, med, w, yerr=[lo, hi], capsize=3,
                              color=colors[be], label=be)
                for b, v in zip(bars, med):
                    ax.annotate(fmt_unit(v, unit), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                                va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
            labels = []
            for n in names:
                ra = r["measures"][n].get("ratio")
                labels.append(n + (f"\nJ/T {ra:.2f}x" if ra is not None else ""))
            ax.set_xticks(x)
            ax.set_xticklabels(labels, fontsize=8)
            ax.set_ylabel(unit)
            ax.set_title(f"{r['config']} {'x'.join(map(str, r['size']))} b{r['batch']}: {title}", fontsize=9)
            ax.legend(fontsize=8)
            ax.margins(y=0.15)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def short_table(doc: Dict[str, Any]) -> str:
    lines = [f"{'config':<10} {'size':<8} {'measure':<18} {'torch':>12} {'jittor':>12} {'J/T':>7}"]
    for r in doc["runs"]:
        for name, m in r["measures"].items():
            cells = [f"{fmt_unit(m[be]['median'], m['unit'])} {m['unit']}" if be in m else "-" for be in ("torch", "jittor")]
            ratio = f"{m['ratio']:.2f}x" if m.get("ratio") is not None else "-"
            lines.append(f"{r['config']:<10} {'x'.join(map(str, r['size'])):<8} {name:<18} {cells[0]:>12} "
                         f"{cells[1]:>12} {ratio:>7}")
    return "\n".join(lines)
