"""Markdown of a train run's discrete decisions: where the candidate first chose differently
from the base side, how each such choice was classified, and the replay that followed the
base's choice at a tie (parity/commands/train_ties.py)."""
from __future__ import annotations

from typing import Any, List, Mapping

from parity.numfmt import g


def decisions_section(res: Mapping[str, Any], heading: str, L: List[str]) -> None:
    d = res.get("decisions")
    if not d:
        return
    cand, base = d.get("candidate", "J32"), d.get("base", "T32")
    ini = d.get("initial") or {}
    L.append(f"{heading}# Discrete decisions ({cand} vs {base})")
    L.append("")
    L.append(f"Compared in canonical form (the top-k token set, the assignments as (token, target) pairs) "
             f"over {ini.get('compared', 0)} iteration-ranks: {ini.get('order_only', 0)} differ only in the order "
             f"inside the top-k (the decoder is equivariant to it), {ini.get('diverged', 0)} iteration(s) chose "
             f"differently{_first(ini)}.")
    ref = d.get("reference")
    if ref:
        L.append("")
        L.append(f"The floor's own pair: {ref['label']} chose differently from {base} at {ref.get('diverged', 0)} "
                 f"iteration(s){_first(ref)}.")
    if d.get("note"):
        L += ["", d["note"] + "."]
    L.append("")
    events = d.get("events") or []
    if not events:
        if ini.get("first") is not None:
            L.append("The curves held without examining them: every check passed with the divergence inside the "
                     "float32 floor (T32 vs T64 diverge in the same way).")
            L.append("")
        return
    L.append("| iteration | rank | kind | evidence (gap against tie_k x noise, exact = T64, noise = T32 vs T64) |")
    L.append("|---|---|---|---|")
    for ev in events:
        for r in ev.get("ranks") or [{"rank": "-", "kind": ev["kind"]}]:
            L.append(f"| {ev['iteration']} | {r.get('rank')} | {r.get('kind')} | {_evidence(r) or ev.get('text', '')} |")
    L.append("")
    if d.get("replay"):
        after = d.get("after_replay") or {}
        L.append(f"After the tie(s), `{d['replay']}/` replays {cand} from its checkpoint before iteration "
                 f"{min(d.get('followed') or [0])} taking {base}'s choice at iteration(s) "
                 f"{', '.join(map(str, d.get('followed') or []))}; every check above is judged on that replay "
                 f"({cand}'s own run stays in `{d.get('own_dir', cand)}/`). After it, "
                 f"{after.get('diverged', 0)} iteration(s) chose differently{_first(after)}.")
        L.append("")


def _first(info: Mapping[str, Any]) -> str:
    f = info.get("first")
    if not f:
        return ""
    return f" (first: iteration {f['iteration']}, rank {f['rank']}, image {f['image']}, {f['what']})"


def _evidence(r: Mapping[str, Any]) -> str:
    if r.get("reason"):
        return r["reason"]
    parts = []
    t = r.get("topk") or {}
    if t.get("kind") not in (None, "same"):
        parts.append(f"top-k {t['kind']}: gap {g(t.get('gap'))}, noise {g(t.get('noise'))}")
    for call, c in (r.get("matches") or {}).items():
        parts.append(f"matching {call} {c['kind']}: gap {g(c.get('gap'))}, noise {g(c.get('noise'))}")
    return "; ".join(parts)
