"""The lines of a train run outside its Markdown section (parity/report/train.py): the one-line
verdict stored in result.json, the terminal summary and the summary.md of a run that ended
in an error."""
from __future__ import annotations

import sys
from typing import Any, Dict

from parity.numfmt import g


def error_markdown(side: str, cause: str, message: str) -> str:
    """``summary.md`` of a train run that ended in an error."""
    return (f"# parity run --stage train: ERROR\n\n**{side} side, {cause}**: {message}\n\n"
            f"No comparison was made; this run proves nothing.\n")


def verdict_text(res: Dict[str, Any]) -> str:
    st = res["status"]
    if st == "stopped":
        done = min(s["epochs_done"] for s in res["sides"])
        return (f"STOPPED on request after epoch {done} of {res['plan']['epochs']} — continue with: "
                f"parity run --stage train --resume {res['out']}")
    fails = [c for c in res["checks"] if not c["passed"]]
    if st == "single":
        return "single backend run: no comparison"
    if not fails:
        return "PASS: every check held"
    parts = []
    for c in fails:
        r = c.get("reason")
        parts.append(r if c["check"].startswith(("finite_", "inputs_")) else f"{c['check']} {r or 'failed'}")
    return "FAIL: " + "; ".join(parts)


def print_summary(res: Dict[str, Any], stream=None) -> None:
    w = (stream or sys.stdout).write
    w("\n")
    for s in res["sides"]:
        w(f"  {s['label']:<4} {s['backend']:<6} {s['dtype']}: {s['status']}, {s['epochs_done']} epochs / "
          f"{s['iterations_done']} iterations, median epoch {g(s['median_epoch_s'])}s, "
          f"peak RSS {g(s['peak_rss_mb'], ',.0f')} MB\n")
        if s.get("nonfinite"):
            nf = s["nonfinite"]
            w(f"       NON-FINITE {nf['term']} at iteration {nf['iteration']} (epoch {nf['epoch']}): side stopped\n")
    for lab, m in res.get("map", {}).items():
        if m:
            last = list(m)[-1]
            w(f"  {lab} mAP (epoch {last}): AP {g(m[last]['AP'], '.4f')} AP50 {g(m[last]['AP50'], '.4f')}\n")
    cb = res.get("metrics", {}).get("cand_base")
    if cb:
        ls = cb["lockstep"]
        w(f"  lock-step: {ls['length']}/{ls['iterations_compared']} iterations"
          + (f" (first difference > {ls['tolerance']:g} at iteration {ls['first_iteration']}, {ls['term']}, "
             f"rel {g(ls['rel'])}, {ls['kind']})" if ls["first_iteration"] else "") + "\n")
    for c in res.get("checks", []):
        if c["check"].startswith("inputs_"):
            continue
        fl = f" floor {g(c.get('floor'))}" if c.get("floor") is not None else ""
        w(f"    {'ok  ' if c['passed'] else 'FAIL'} {c['check']:<18} {g(c.get('value'))}{fl}"
          f"{' (' + c['rule'] + ')' if c.get('rule') else ''}\n")
    w(f"  {res['verdict']}  ({res['wall_s']:.1f}s)\n")
    w(f"  result: {res['out']}/result.json\n")
