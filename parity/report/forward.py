"""What a ``parity run --stage forward|grad`` prints and writes for people: the group table
(terminal and Markdown), ``summary.md`` and the final terminal lines."""
from __future__ import annotations

import sys
from typing import Any, Dict, List

from parity.numfmt import g as num


def _g(x, fmt=".2e") -> str:
    """Tensor errors are shown as .2e by default."""
    return num(x, fmt)


def describe_divergence(fd: Dict[str, Any]) -> str:
    """One line: ``first divergence: decoder.decoder.layers.3 (rel err 4e-2, upstream all < 1e-6)``."""
    if not fd:
        return "no divergence"
    if fd.get("err") is not None:
        what = f"rel err {fd['err']:.2g}"
        if fd.get("ratio") is not None:
            what += f", {fd['ratio']:.3g}x the float32 floor {fd['floor']:.2g}"
    else:
        what = fd.get("reason") or "differs"
    up = fd.get("upstream_max_err")
    ups = f", upstream all <= {up:.2g}" if up is not None else ", nothing upstream"
    return f"first divergence: {fd['module']} [{fd['name']}] ({what}{ups})"


def _rules(r: Dict[str, int]) -> str:
    return " ".join(f"{k} {v}" for k, v in r.items())


def group_table(result: Dict[str, Any], md: bool = False) -> List[str]:
    lab = result["labels"]
    has_ref = "ref" in lab
    head = ["group", "n", "fail", "worst", f"{lab['cand']}-{lab['base']}"]
    if has_ref:
        head += [f"floor {lab['base']}-{lab['ref']}", f"{lab['cand']}-{lab['ref']}", "ratio"]
    head += ["rules"]
    rows = []
    for g, s in result["groups"].items():      # in the judge's group order
        if not s:
            continue
        if g == "decisions":
            row = [g, str(s["n"]), str(s["failed"]), s["worst"],
                   f"agree {100 * (s.get('worst_agreement') or 0):.1f}%"]
            if has_ref:
                row += ["", "", ""]
        else:
            row = [g, str(s["n"]), str(s["failed"]), s["worst"], _g(s.get("worst_err"))]
            if has_ref:
                row += [_g(s.get("worst_floor")), _g(s.get("worst_err_ref")), _g(s.get("worst_ratio"), ".3g")]
        row.append(_rules(s["rules"]))
        rows.append(row)
    if md:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r[:3] + [f"`{r[3]}`"] + r[4:]) + " |" for r in rows]
        return out
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    widths[3] = min(widths[3], 44)
    def cut(x, i):
        x = str(x)
        return x if i != 3 or len(x) <= 44 else "…" + x[-43:]
    fmt = lambda r: "  ".join(cut(x, i).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(head)] + [fmt(r) for r in rows]


def _both_markdown(result: Dict[str, Any]) -> str:
    """``--dtype both``: the verdict and what it rests on, then each comparison in full."""
    st = result["status"].upper()
    L = [f"# parity run --stage {result.get('stage')} — {result.get('config')} — float64 + float32: **{st}**", "",
         f"Verdict rests on: {result.get('verdict_basis')}.", ""]
    for dt in ("float64", "float32"):
        r = result["runs"][dt]
        n = len(r["tensors"])
        nf = sum(1 for e in r["tensors"] if not e["passed"])
        fd = r.get("first_divergence")
        L.append(f"- {dt}: **{r['status'].upper()}** {n - nf}/{n} ({r['labels']['cand']} vs {r['labels']['base']}"
                 + (f", floor {r['labels']['base']} vs {r['labels']['ref']}" if "ref" in r["labels"] else "")
                 + f"){'; ' + describe_divergence(fd) if fd else ''}")
    ex = result.get("explained") or []
    if ex:
        L += ["", f"## float32 tensors reported, not failed ({len(ex)}): float64 passes them, and the evidence "
                  "says float32 kink", "", "| tensor | err | floor | ratio | evidence |", "|---|---|---|---|---|"]
        L += [f"| `{x['name']}` | {_g(x.get('err'))} | {_g(x.get('floor'))} | {_g(x.get('ratio'), '.3g')} | "
              f"{x['evidence']} |" for x in ex]
    for dt in ("float64", "float32"):
        # a comparison holds its tensors; the sides, wall time and thresholds file are the run's
        sub = summary_markdown({**result["runs"][dt], "wall_s": result.get("wall_s", 0),
                                "thresholds_file": result.get("thresholds_file"),
                                "sides": [s for s in result.get("sides", [])
                                          if s.get("label") in result["runs"][dt]["labels"].values()]})
        L += ["", "---", ""] + [("#" + ln if ln.startswith("#") else ln) for ln in sub.splitlines()]
    return "\n".join(L) + "\n"


def floor_passes(result: Dict[str, Any]) -> List[str]:
    """Markdown lines listing the tensors that passed by the noise-floor rule (apart)."""
    fl = [e for e in result.get("tensors", []) if e.get("rule") == "floor"]
    if not fl:
        return []
    L = [f"## Passed by the float32 noise floor ({len(fl)}), worst ratio first", "",
         "| name | group | err | floor | ratio |", "|---|---|---|---|---|"]
    for e in sorted(fl, key=lambda e: -e.get("ratio", 0))[:30]:
        L.append(f"| `{e['name']}` | {e['group']} | {_g(e.get('err'))} | {_g(e.get('floor'))} | {_g(e.get('ratio'), '.3g')} |")
    if len(fl) > 30:
        L.append(f"| ... {len(fl) - 30} more in result.json | | | | |")
    return L + [""]


def summary_markdown(result: Dict[str, Any]) -> str:
    if "runs" in result and result.get("status") != "error":
        return _both_markdown(result)
    L: List[str] = []
    st = result["status"].upper()
    L.append(f"# parity run --stage {result.get('stage')} — {result.get('config')} — {result.get('dtype')}: **{st}**")
    L.append("")
    if result["status"] == "error":
        e = result["error"]
        L += [f"**Error** ({e['side']} side, {e['cause']}): {e['message']}", ""]
        if e.get("log"):
            L += [f"Log: `{e['log']}`", ""]
        L.append("No comparison was made; this run proves nothing.")
        return "\n".join(L) + "\n"
    for section in (_run_info, _verdict, _groups, _decisions, _failing):
        section(result, L)
    L += floor_passes(result)
    for section in (_explained, _grads_by_module, _sides):
        section(result, L)
    return "\n".join(L) + "\n"


def _run_info(result: Dict[str, Any], L: List[str]) -> None:
    """Config, data, weights, what is compared, decisions, faults."""
    lab = result["labels"]
    case = result.get("case", {})
    L.append(f"- config `{result['config']}` (digest `{result['config_digest']}`), batch {case.get('batch_size')} "
             f"at {case.get('image_size')}, seed {result.get('seed')}, device {result.get('device')}")
    d = case.get("data", {})
    L.append(f"- data: {'bundled synthetic set' if d.get('synthetic') else d.get('root')} ({d.get('split')} split, "
             f"indices {d.get('indices')}, boxes {d.get('num_boxes')})")
    w = case.get("weights", {})
    L.append(f"- weights: {'seeded init, seed ' + str(w.get('seed')) if w.get('source') == 'seeded' else w.get('path')}")
    cmp_ = f"{lab['cand']} vs {lab['base']}"
    if "ref" in lab:
        cmp_ += f"; float32 noise floor {lab['base']} vs {lab['ref']} (float64 reference), ratio = err({lab['cand']},{lab['ref']}) / floor"
    L.append(f"- compared: {cmp_}")
    L.append(f"- decisions: {'shared from torch (--share-decisions)' if result.get('share_decisions') else 'each side its own'}"
             + ("; the float64 reference always uses the base side's decisions" if "ref" in lab else ""))
    if result.get("faults"):
        L.append(f"- **INJECTED FAULT** on the {result['fault_side']} side: {', '.join(result['faults'])}")
    L.append("")


def _verdict(result: Dict[str, Any], L: List[str]) -> None:
    """What the verdict rests on and the first divergence."""
    lab = result["labels"]
    fd = result.get("first_divergence") or {}
    if result.get("verdict_basis"):
        L.append(f"- verdict rests on: {result['verdict_basis']}")
    if result.get("decisions_rerun"):
        rr = result["decisions_rerun"]
        L.append(f"- {rr['own_run']}'s own decisions differed from {lab['base']}'s (classified under Decisions); "
                 f"the continuous tensors are judged on {rr['judged_run']}, the same side re-run with "
                 f"{lab['base']}'s decisions")
    L.append("")
    L.append(f"**{describe_divergence(fd)}**" if fd else "**No divergence: every check passed.**")
    if fd:
        L.append("")
        L.append(f"- reason: {fd.get('reason')}")
        L.append(f"- last passing before it: `{fd.get('last_passing')}` (rel err {_g(fd.get('last_passing_err'))})")
        L.append(f"- failing checks in total: {fd.get('n_failed')}")
    L.append("")


def _groups(result: Dict[str, Any], L: List[str]) -> None:
    """The group table."""
    L.append("## Groups")
    L.append("")
    L += group_table(result, md=True)
    L.append("")


def _decisions(result: Dict[str, Any], L: List[str]) -> None:
    """Every discrete decision, classified."""
    dec = [e for e in result["tensors"] if e["group"] == "decisions"]
    if dec:
        L.append("## Decisions")
        L.append("")
        for e in dec:
            ov = e.get("overlap", {})
            verdict = ("identical" if e.get("rule") == "exact" else e.get("flip", "")) + ("" if e["passed"] else " — FAIL")
            used = " (continuous tensors judged under the base's decisions)" if e.get("shared") else ""
            if e["kind"] == "topk":
                L.append(f"- `{e['name']}` (own choices): top-k set overlap {100 * ov.get('set', 0):.2f}%, positions "
                         f"{100 * ov.get('positions', 0):.2f}% — {verdict}{used}")
            else:
                L.append(f"- `{e['name']}` (own choices): {ov.get('same')}/{ov.get('total')} pairs agree — "
                         f"{verdict}{used}")
        L.append("")


def _failing(result: Dict[str, Any], L: List[str]) -> None:
    """The failing checks in forward order."""
    fails = [e for e in result["tensors"] if not e["passed"]]
    if fails:
        L.append(f"## Failing checks (forward order, first 40 of {len(fails)})")
        L.append("")
        L.append("| name | group | err | floor | ratio | reason |")
        L.append("|---|---|---|---|---|---|")
        for e in fails[:40]:
            L.append(f"| `{e['name']}` | {e['group']} | {_g(e.get('err'))} | {_g(e.get('floor'))} | "
                     f"{_g(e.get('ratio'), '.3g')} | {e.get('reason', '')} |")
        L.append("")


def _explained(result: Dict[str, Any], L: List[str]) -> None:
    """float32 tensors reported, not failed."""
    ex = result.get("explained") or []
    if ex:
        L += [f"## float32 tensors reported, not failed ({len(ex)})" + (" — PROVISIONAL, no float64 run confirmed them"
                                                                          if result.get("provisional") else ""),
              "", "| tensor | err | floor | ratio | evidence |", "|---|---|---|---|---|"]
        L += [f"| `{x['name']}` | {_g(x.get('err'))} | {_g(x.get('floor'))} | {_g(x.get('ratio'), '.3g')} | "
              f"{x['evidence']} |" for x in ex] + [""]


def _grads_by_module(result: Dict[str, Any], L: List[str]) -> None:
    """Gradients by module, worst first."""
    gm = result.get("grads_by_module")
    if gm:
        L.append("## Gradients by module (worst first)")
        L.append("")
        L.append("| module | params | failed | worst parameter | err | ratio |")
        L.append("|---|---|---|---|---|---|")
        for m in gm[:25]:
            L.append(f"| `{m['module']}` | {m['n']} | {m['failed']} | `{m['worst_name']}` | {_g(m['worst_err'])} | "
                     f"{_g(m['worst_ratio'], '.3g')} |")
        if len(gm) > 25:
            L.append(f"| ... {len(gm) - 25} more modules in result.json | | | | | |")
        L.append("")


def _sides(result: Dict[str, Any], L: List[str]) -> None:
    """Every side: versions, wall time, timing, memory."""
    L.append("## Sides")
    L.append("")
    L.append("| side | backend | dtype | versions | wall s | in-worker timing s | peak RSS MB |")
    L.append("|---|---|---|---|---|---|---|")
    for s in result.get("sides", []):
        v = s.get("versions", {})
        vs = ", ".join(f"{k} {v[k]}" for k in (s["backend"], "numpy", "python") if k in v)
        tm = ", ".join(f"{k} {x:.1f}" for k, x in s.get("timing", {}).items())
        L.append(f"| {s['label']} ({s['role']}) | {s['backend']} | {s['dtype']} | {vs} | {s['wall_s']:.1f} | {tm} | "
                 f"{_g(s.get('peak_rss_mb'), ',.0f')} |")
    L.append("")
    for wmsg in result.get("warnings", []):
        L.append(f"- warning: {wmsg}")
    L.append(f"Total wall time {result.get('wall_s', 0):.1f}s. Thresholds: `{result.get('thresholds_file')}`.")


def print_final(result: Dict[str, Any], stream=None) -> None:
    stream = stream or sys.stdout
    w = stream.write
    if "runs" in result:
        for dt in ("float64", "float32"):
            r = result["runs"][dt]
            w(f"\n  == {dt}: {r['labels']['cand']} vs {r['labels']['base']}\n")
            _print_run(r, stream)
        for x in result.get("explained") or []:
            w(f"  float32 reported, not failed: {x['name']} (ratio {_g(x.get('ratio'), '.3g')}): {x['evidence']}\n")
        verdict = "PASS" if result["passed"] else "FAIL"
        w(f"  {verdict} ({result['stage']}, {result['config']}, {result['verdict_basis']}, {result['wall_s']:.1f}s)\n")
        w(f"  result: {result['out']}/result.json\n")
        stream.flush()
        return
    w("\n")
    _print_run(result, stream)
    n = len(result["tensors"])
    nf = sum(1 for e in result["tensors"] if not e["passed"])
    verdict = "PASS" if result["passed"] else "FAIL"
    for x in result.get("explained") or []:
        w(f"  float32 reported, not failed: {x['name']} (ratio {_g(x.get('ratio'), '.3g')}): {x['evidence']}\n")
    if result.get("provisional"):
        verdict += f" ({result.get('verdict_basis') or 'PROVISIONAL: float32 only'})"
    w(f"  {verdict}: {n - nf}/{n} checks passed  ({result['stage']}, {result['config']}, {result['dtype']}, "
      f"{result['wall_s']:.1f}s)\n")
    w(f"  result: {result['out']}/result.json\n")
    stream.flush()


def _print_run(result: Dict[str, Any], stream) -> None:
    w = stream.write
    w("\n")
    for ln in group_table(result):
        w("  " + ln + "\n")
    dec = [e for e in result["tensors"] if e["group"] == "decisions"]
    if dec:
        parts = []
        for e in dec:
            ov = e.get("overlap", {})
            if e["kind"] == "topk":
                parts.append(("train-mode " if e["name"].startswith("train.") else "")
                             + f"top-k {100 * ov.get('set', 0):.1f}%" + (f" ({e['flip']})" if e.get("flip") else ""))
        nm = [e for e in dec if e["kind"] == "matches"]
        if nm:
            same = sum(e["overlap"].get("same", 0) for e in nm)
            tot = sum(e["overlap"].get("total", 0) for e in nm)
            flips = [f"{e['name']}: {e['flip']}" for e in nm if e.get("flip")]
            parts.append(f"matches {same}/{tot} over {len(nm)} calls" + (f" ({'; '.join(flips[:3])})" if flips else ""))
        w("  decisions: " + "; ".join(parts) + "\n")
    gm = result.get("grads_by_module")
    if gm:
        w("  worst gradient modules: " + ", ".join(
            f"{m['module']} {_g(m['worst_err'])}" + (f" (x{_g(m['worst_ratio'], '.2g')} floor)" if m.get("worst_ratio") is not None else "")
            for m in gm[:3]) + "\n")
    for wm in result.get("warnings", []):
        w(f"  warning: {wm}\n")
    if result.get("faults"):
        w(f"  INJECTED FAULT ({result['fault_side']} side): {', '.join(result['faults'])}\n")
    fd = result.get("first_divergence")
    w("  " + (describe_divergence(fd) if fd else "no divergence") + "\n")


# ----------------------------------------------------------------------------------------
