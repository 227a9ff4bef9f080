"""summary.md of a ``parity run --stage grad --nproc N`` (parity/commands/grad_ranks.py):
the verdict, each side's engine check (N ranks vs one process) and the rank-by-rank
comparison of Jittor with PyTorch."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

from parity.numfmt import g


def _value(v: Any) -> str:
    return g(v) if isinstance(v, float) else str(v)


def ranks_markdown(res: Mapping[str, Any]) -> str:
    n = res.get("nproc")
    L: List[str] = [f"# parity run --stage grad --nproc {n}: {res.get('config')}", ""]
    if res.get("status") == "error":
        e = res.get("error") or {}
        return "\n".join(L + [f"**ERROR** ({e.get('cause')}): {e.get('message')}", ""]) + "\n"
    verdict = "PASS" if res.get("passed") else "FAIL: " + "; ".join(res.get("failing") or [])
    case = res.get("case") or {}
    L += [f"**{verdict}**", "",
          f"Global batch {res.get('batch_size')} images ({(res.get('batch_size') or 0) // (n or 1)} per rank), "
          f"float64, seed {res.get('seed')}; PyTorch under torchrun (DistributedDataParallel, gloo on CPU), Jittor "
          f"under mpirun (Jittor MPI).  Case: {case.get('dir')}.  Thresholds: `{res.get('thresholds_file')}` "
          f"(section `ranks`).", "",
          "## Each side at N ranks against itself on one process", "",
          "| side | check | value | threshold | verdict | worst at |", "|---|---|---:|---:|---|---|"]
    for lab, e in (res.get("engine") or {}).items():
        for c in e["checks"]:
            L.append(f"| {lab} | {c['check']} | {_value(c['value'])} | {_value(c['threshold'])} | "
                     f"{'pass' if c['passed'] else 'FAIL: ' + str(c.get('reason'))} | {c.get('worst_at') or ''} |")
    L += ["", "Shards (digest of the images, boxes and denoising draws each rank consumed):", "",
          "| side | rank | images | digest | expected |", "|---|---:|---|---|---|"]
    for lab, e in (res.get("engine") or {}).items():
        sh = next((c for c in e["checks"] if c["check"] == "shards"), {})
        for r in sh.get("ranks", []):
            L.append(f"| {lab} | {r['rank']} | {r.get('images')} | `{r.get('digest')}` | `{r.get('expected')}` |")
    L += ["", "## Jittor against PyTorch, rank by rank", "",
          "| rank | verdict | group | tensors | failed | worst | worst error |", "|---:|---|---|---:|---:|---|---:|"]
    for r in res.get("ranks") or []:
        for grp, s in (r.get("groups") or {}).items():
            L.append(f"| {r['rank']} | {'pass' if r['passed'] else 'FAIL'} | {grp} | {s['n']} | {s['failed']} | "
                     f"`{s.get('worst')}` | {_value(s.get('worst_err'))} |")
    L += ["", "## Sides", "", "| side | processes | wall | peak RSS per rank |", "|---|---:|---:|---|"]
    for s in res.get("sides") or []:
        rss = ", ".join(f"{x:,.0f} MB" for x in s.get("peak_rss_mb") or [] if x)
        L.append(f"| {s['label']} | {s['nproc']} | {s['wall_s']:.1f} s | {rss} |")
    return "\n".join(L) + "\n"


__all__ = ["ranks_markdown"]
