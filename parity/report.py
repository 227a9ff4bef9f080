"""``parity report RUN_DIR [RUN_DIR ...] [--out DIR]``: render run folders into one report.

Reads what the runs wrote — ``result.json`` of ``parity run --stage forward|grad|train``
(train runs also their sides' ``log.json``), ``bench.json`` of ``parity bench``,
``summary.json`` of ``parity run --stage eval`` — and writes (atomically) into ``--out``
(default: ``RUN_DIR/report`` for one run, ``reports/runs/<time>-report`` for several)::

    report.md     for people: verdicts, tables (pandas), plots, environment facts
    report.json   the numbers shown, taken verbatim from the runs (never recomputed)
    *.png         plots (matplotlib, Agg): loss curves of both backends overlaid, relative
                  difference per epoch and per iteration, per-term curves, mAP, forward error
                  per module (forward order), gradient error per parameter group

Exit codes: 0 rendered, 2 usage error (a folder that is not a run, unreadable files).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import sys
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .fileio import read_json, write_bytes, write_json, write_text

EXIT_OK, EXIT_USAGE = 0, 2
REPORT_SCHEMA = 1
KINDS = ("forward", "grad", "train", "eval", "bench")


class ReportError(Exception):
    """A usage problem (one line, exit 2)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (forward/grad/train/eval/bench)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report for one run, "
                                                "reports/runs/<time>-report for several)")
    p.add_argument("--title", default=None, help="report title")


# ----------------------------------------------------------------------------------------
# formatting helpers
# ----------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------
# loading runs
# ----------------------------------------------------------------------------------------

def load_run(run_dir: str) -> Dict[str, Any]:
    """``{"dir", "kind", "doc"}`` of a run folder."""
    d = os.path.abspath(run_dir)
    if not os.path.isdir(d):
        raise ReportError(f"{run_dir}: not a folder")
    for name in ("result.json", "bench.json", "summary.json"):
        p = os.path.join(d, name)
        if not os.path.isfile(p):
            continue
        try:
            doc = read_json(p)
        except (OSError, ValueError) as e:
            raise ReportError(f"{p}: unreadable ({e})") from None
        if name == "bench.json":
            return {"dir": d, "kind": "bench", "doc": doc, "file": p}
        kind = doc.get("stage")
        if kind in KINDS:
            return {"dir": d, "kind": kind, "doc": doc, "file": p}
    raise ReportError(f"{run_dir}: no result.json / bench.json / summary.json of a parity run")


def train_logs(run_dir: str, res: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    logs = {}
    for s in res.get("sides", []):
        p = os.path.join(run_dir, s["label"], "log.json")
        if os.path.isfile(p):
            logs[s["label"]] = read_json(p)
    return logs


# ----------------------------------------------------------------------------------------
# training runs
# ----------------------------------------------------------------------------------------

def _side(res, role):
    return next((s for s in res.get("sides", []) if s["role"] == role), None)


def train_numbers(res: Mapping[str, Any]) -> Dict[str, Any]:
    """The numbers of a train run shown in the report (verbatim from result.json)."""
    m = res.get("metrics", {}) or {}
    cb, fl = m.get("cand_base"), m.get("base_ref")
    out: Dict[str, Any] = {
        "status": res.get("status"), "passed": res.get("passed"), "verdict": res.get("verdict"),
        "config": res.get("config"), "config_digest": res.get("config_digest"), "dtype": res.get("dtype"),
        "device": res.get("device"), "seed": res.get("seed"), "plan": res.get("plan"),
        "checks": res.get("checks", []), "map": res.get("map", {}), "nonfinite": res.get("nonfinite", {}),
        "inputs_identical": res.get("inputs_identical"),
        "sides": [{k: s.get(k) for k in ("label", "role", "backend", "dtype", "status", "epochs_done", "iterations_done",
                                         "first_epoch_s", "median_epoch_s", "median_iteration_s", "first_iteration_s", "wall_s",
                                         "peak_rss_mb", "epoch_seconds", "nonfinite", "resumed")}
                  for s in res.get("sides", [])],
    }
    if cb:
        out["lockstep"] = cb.get("lockstep")
        out["final_window"] = cb.get("final_window")
        out["drift"] = cb.get("drift")
        out["map_diff"] = {k: v for k, v in (cb.get("map") or {}).items() if k != "per_epoch"} if cb.get("map") else None
        out["epochs"] = [{"epoch": d["epoch"], "base_total": d["base_total"], "cand_total": d["cand_total"],
                          "total_rel": d["total_rel"], "worst_term": d["worst_term"],
                          "worst_term_rel": d["worst_term_rel"]} for d in cb.get("epochs", [])]
    if fl:
        out["floor"] = {"lockstep": fl.get("lockstep"), "epoch_total_rel": fl.get("epoch_total_rel"),
                        "epoch_term_rel": fl.get("epoch_term_rel"), "final_window_rel": fl.get("final_window_rel"),
                        "map_abs": fl.get("map_abs"), "param_drift": fl.get("param_drift"),
                        "epochs": [{"epoch": d["epoch"], "total_rel": d["total_rel"],
                                    "worst_term_rel": d["worst_term_rel"]} for d in fl.get("epochs", [])]}
    return out


def train_plots(res: Mapping[str, Any], logs: Mapping[str, Any], prefix: str) -> Dict[str, bytes]:
    from . import plots
    sides = res.get("sides", [])
    m = res.get("metrics", {}) or {}
    cb, fl = m.get("cand_base"), m.get("base_ref")
    tol = (res.get("thresholds") or {}).get("lockstep_rel", 1e-4)
    out: Dict[str, bytes] = OrderedDict()
    if logs:
        out[f"{prefix}loss_curves.png"] = plots.loss_curves(sides, logs, f"{res.get('config')} {res.get('dtype')}: total loss")
        out[f"{prefix}term_curves.png"] = plots.term_curves(sides, logs)
    if cb and cb.get("epochs"):
        out[f"{prefix}rel_diff_epoch.png"] = plots.epoch_rel_diff(cb, fl, None)
    if cb and cb.get("iterations"):
        out[f"{prefix}rel_diff_iteration.png"] = plots.iteration_rel_diff(cb, fl, tol)
    if any(res.get("map", {}).get(s["label"]) for s in sides):
        out[f"{prefix}map.png"] = plots.map_curves(sides, res.get("map", {}))
    return out


LOCKSTEP_KIND = {
    "gradient": "the losses of the previous iteration agreed but its gradients did not (pre-clip norm "
                "differs beyond 1e-3): the two backward passes differ, so the optimiser steps differ — a "
                "backend discrepancy, not training noise (localise it with parity run --stage grad)",
    "jump": "a jump of orders of magnitude in one iteration from agreement below 1e-5: a discrete decision "
            "(a Hungarian assignment or an encoder top-k selection) went differently on the two sides, or "
            "Adam's first, sign-like steps (update ~ lr * sign(g)) moved gradient elements that sit within "
            "rounding noise of zero in different directions",
    "growth": "steady growth: float32 rounding differences (different but equally valid kernels) amplified "
              "by the optimiser step after step",
}


def train_markdown(res: Mapping[str, Any], run_dir: str, images: Optional[Mapping[str, str]] = None,
                   heading: str = "#") -> str:
    """Markdown of a train run (``images``: plot name -> relative path, None: no plots)."""
    L: List[str] = []
    st = str(res.get("status", "?")).upper()
    L.append(f"{heading} Training parity — {res.get('config')} — {res.get('dtype')}: **{st}**")
    L.append("")
    if res.get("status") == "error":
        e = res.get("error", {})
        L += [f"**Error** ({e.get('side')} side, {e.get('cause')}): {e.get('message')}", "",
              "No comparison was made; this run proves nothing.", ""]
        return "\n".join(L) + "\n"
    L += [f"**Verdict:** {res.get('verdict')}", ""]
    plan = res.get("plan", {}) or {}
    data = res.get("data", {}) or {}
    w = res.get("weights", {}) or {}
    labels = res.get("labels", {})
    L.append(f"- run folder: `{shown_path(run_dir)}`")
    L.append(f"- config `{res.get('config')}` (digest `{res.get('config_digest')}`), {res.get('dtype')}, device "
             f"`{res.get('device')}`, seed {res.get('seed')}")
    L.append(f"- schedule: {plan.get('epochs')} epochs x {plan.get('iterations_per_epoch')} iterations "
             f"(batch {plan.get('batch_size')}, {plan.get('n_train')} train images of {data.get('n_train_total')}), "
             f"image size {plan.get('image_size')}, multi-scale {plan.get('multi_scale') or 'off'}, "
             f"EMA {'on' if plan.get('ema') else 'off'}, lr {g(plan.get('lr'))} (groups {plan.get('group_lrs')}), "
             f"milestones {plan.get('lr_milestones')} x{plan.get('lr_gamma')}, clip {plan.get('clip_max_norm')}")
    L.append(f"- data: {'bundled synthetic set' if data.get('synthetic') else data.get('root')}; mAP on "
             f"{plan.get('n_val')} val images (of {data.get('n_val_total')}), evaluated every "
             f"{plan.get('eval_every') or '-'} epoch(s) and after the last")
    L.append(f"- weights: {'seeded init, seed ' + str(w.get('seed')) if w.get('source') == 'seeded' else w.get('path')}")
    sides_txt = ", ".join(f"{s['label']} = {s['backend']} {s['dtype']} ({s['role']})" for s in res.get("sides", []))
    L.append(f"- sides: {sides_txt}; {'one after another' if res.get('sequential') else 'run concurrently'}, "
             f"{res.get('threads')} thread(s) each")
    ident = res.get("inputs_identical") or {}
    if ident:
        L.append(f"- shared streams (order, denoising draws, multi-scale sizes) consumed identically: "
                 + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in ident.items()))
    if res.get("faults"):
        L.append(f"- **INJECTED FAULT** on the {res.get('fault_side')} side: {', '.join(res['faults'])}")
    for s in res.get("sides", []):
        if s.get("resumed"):
            L.append(f"- {s['label']} was resumed: " + "; ".join(f"from epoch {r['from_epoch']} ({r['checkpoint']})"
                                                               for r in s["resumed"]))
    L.append("")
    nf = res.get("nonfinite") or {}
    if nf:
        L.append(f"{heading}# Non-finite losses")
        L.append("")
        for lab, e in nf.items():
            extra = f" ({e['error']})" if e.get("error") else ""
            L.append(f"- **{lab} stopped at iteration {e['iteration']} (epoch {e['epoch']})**: non-finite "
                     f"`{e['term']}` = {e.get('value')}{extra}; {e.get('nonfinite_weights', '?')} weight tensor(s) "
                     f"non-finite" + (f", e.g. `{e['examples'][0]}`" if e.get("examples") else ""))
        L.append("")

    def img(name, alt):
        if images and name in images:
            L.extend([f"![{alt}]({images[name]})", ""])

    img("loss_curves.png", "loss curves")
    checks = res.get("checks", [])
    if checks:
        L.append(f"{heading}# Checks")
        L.append("")
        rows = [{"check": c["check"], "value": g(c.get("value")), "floor (T32 vs T64)": g(c.get("floor")),
                 "threshold": ", ".join(f"{k} {g(v)}" for k, v in (c.get("threshold") or {}).items()) or "-",
                 "rule": c.get("rule") or "-", "result": "pass" if c["passed"] else "**FAIL**",
                 "what": c.get("text", "")} for c in checks]
        L += md_table(_df(rows))
        L.append("")
        L.append(f"Thresholds: `{shown_path(res.get('thresholds_file'))}` (train section). A check passes by the fixed rule "
                 f"or, in float32 with the reference, by the floor rule value <= k x floor + allowance.")
        L.append("")
    cb = (res.get("metrics") or {}).get("cand_base")
    fl = (res.get("metrics") or {}).get("base_ref")
    if cb:
        ls = cb["lockstep"]
        L.append(f"{heading}# Lock-step")
        L.append("")
        if ls.get("first_iteration"):
            L.append(f"{labels.get('cand')} and {labels.get('base')} agree on every loss term to "
                     f"{g(ls['tolerance'])} relative for the first **{ls['length']}** of {ls['iterations_compared']} "
                     f"iterations. At iteration {ls['first_iteration']} (epoch {ls['epoch']}) `{ls['term']}` differs by "
                     f"{g(ls['rel'])} (worst difference one iteration earlier: {g(ls['previous_rel'])}; "
                     f"pre-clip gradient norms one iteration earlier differ by {g(ls.get('previous_grad_norm_rel'))}). "
                     f"Pattern: **{ls['kind']}** — {LOCKSTEP_KIND.get(ls['kind'], '')}.")
        else:
            L.append(f"{labels.get('cand')} and {labels.get('base')} agree on every loss term to {g(ls['tolerance'])} "
                     f"relative in all {ls['iterations_compared']} iterations.")
        if fl:
            fls = fl["lockstep"]
            L.append("")
            L.append(f"Noise floor: PyTorch float32 vs float64 stays in lock-step for {fls['length']} iterations"
                     + (f" (first difference at iteration {fls['first_iteration']}, `{fls['term']}`, {g(fls['rel'])}, "
                        f"{fls['kind']})." if fls.get("first_iteration") else "."))
        L.append("")
        img("rel_diff_iteration.png", "per-iteration relative difference")
    maps = res.get("map") or {}
    if any(maps.values()):
        L.append(f"{heading}# COCO mAP (val)")
        L.append("")
        rows = []
        for s in res.get("sides", []):
            m = maps.get(s["label"]) or {}
            if not m:
                continue
            last = sorted(m, key=int)[-1]
            r = {"side": f"{s['label']} ({s['backend']} {s['dtype']})", "epoch": int(last)}
            r.update({k: m[last].get(k) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")})
            r["EMA"] = "yes" if m[last].get("ema") else "no"
            rows.append(r)
        L += md_table(_df(rows), ".4f")
        if cb and cb.get("map") and cb["map"].get("abs"):
            L.append("")
            L.append("Absolute difference " + f"{labels.get('cand')} - {labels.get('base')}: "
                     + ", ".join(f"{k} {g(v, '.4f')}" for k, v in cb["map"]["abs"].items()))
        L.append("")
        img("map.png", "mAP per evaluated epoch")
    if cb and cb.get("drift"):
        d = cb["drift"]
        L.append(f"{heading}# Parameter drift (final weights, trainable parameters)")
        L.append("")
        def row(part, p):
            return {"part": part, "‖J−T‖ / ‖T‖": p["rel_l2"], "‖J−T‖": p["abs_l2"],
                    "‖T − init‖ (training update)": p.get("update_l2"), "‖J−T‖ / update": p.get("vs_update")}
        rows = [row("all", d)] + [row(part, p) for part, p in d.get("parts", {}).items()]
        L += md_table(_df(rows))
        if fl and fl.get("drift"):
            L.append("")
            L.append(f"Floor (T32 vs T64): rel L2 {g(fl['drift']['rel_l2'])}, |T32-T64| / update "
                     f"{g(fl['drift'].get('vs_update'))}.")
        L.append("")
    if cb and cb.get("epochs"):
        L.append(f"{heading}# Per-epoch difference")
        L.append("")
        img("rel_diff_epoch.png", "relative difference per epoch")
        fe = {d["epoch"]: d for d in (fl or {}).get("epochs", [])}
        rows = []
        for d in cb["epochs"]:
            r = OrderedDict([("epoch", d["epoch"]), (f"{labels.get('base')} mean loss", d["base_total"]),
                             (f"{labels.get('cand')} mean loss", d["cand_total"]), ("rel diff", d["total_rel"]),
                             ("worst term", d["worst_term"]), ("its rel diff", d["worst_term_rel"])])
            if fe:
                r["floor rel diff"] = fe.get(d["epoch"], {}).get("total_rel")
            rows.append(r)
        L += md_table(_df(rows), ".6g")
        L.append("")
        img("term_curves.png", "per-term curves")
    L.append(f"{heading}# Sides: time and memory")
    L.append("")
    rows = []
    for s in res.get("sides", []):
        v = s.get("versions", {})
        th = s.get("threads", {}) or {}
        rows.append({"side": s["label"], "backend": s["backend"], "dtype": s["dtype"], "status": s.get("status"),
                     "epochs": s.get("epochs_done"), "iterations": s.get("iterations_done"),
                     "first epoch s": g(s.get("first_epoch_s"), ".1f"), "median epoch s": g(s.get("median_epoch_s"), ".1f"),
                     "first iteration s": g(s.get("first_iteration_s"), ".2f"),
                     "median iteration s": g(s.get("median_iteration_s"), ".2f"), "wall s": g(s.get("wall_s"), ".1f"),
                     "peak RSS MB": g(s.get("peak_rss_mb"), ".0f"), "threads": th.get("threads"),
                     "versions": ", ".join(f"{k} {v[k]}" for k in (s["backend"], "numpy", "python") if k in v)})
    L += md_table(_df(rows))
    L.append("")
    L.append("The first epoch (and first iteration) includes Jittor's kernel compilation or its cache load; the "
             "median epoch is taken over the later epochs. Training time only (evaluation and checkpoints excluded). "
             + ("The sides ran concurrently on a shared machine: times include contention."
                if not res.get("sequential") else ""))
    L.append("")
    env = res.get("env", {}) or {}
    host = env.get("host", {}) or {}
    L.append(f"{heading}# Environment")
    L.append("")
    L.append(f"- host: {host.get('cpu_model')}, {host.get('affinity') or host.get('cpu_count')} usable cores, "
             f"{g(host.get('memory_gb'), '.0f')} GB, {host.get('platform')}")
    L.append(f"- git: `{env.get('git')}`; runner python {(env.get('runner') or {}).get('python')}, numpy "
             f"{(env.get('runner') or {}).get('numpy')}")
    for lab, v in (env.get("workers") or {}).items():
        L.append(f"- {lab}: " + ", ".join(f"{k} {x}" for k, x in v.items() if k != "executable")
                 + f" (`{v.get('executable')}`)")
    if res.get("command"):
        L.append(f"- command: `{' '.join(res['command'])}`")
    if res.get("invocations", 1) > 1:
        L.append(f"- wall time: {g(res.get('wall_s_total'), '.1f')} s over {res['invocations']} invocations "
                 f"(the last, a resume, {g(res.get('wall_s'), '.1f')} s); per side: the table above")
    else:
        L.append(f"- wall time of the whole run: {g(res.get('wall_s'), '.1f')} s")
    L.append("")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------------------
# forward / grad runs
# ----------------------------------------------------------------------------------------

def optimizer_groups(run_dir: str) -> Optional[List[Tuple[str, Any]]]:
    """The official regex groups of the run's config (case/config.json): [(label, regex)]."""
    p = os.path.join(run_dir, "case", "config.json")
    if not os.path.isfile(p):
        return None
    cfg = read_json(p)
    o = cfg.get("optimizer", {})
    out = []
    for i, gr in enumerate(o.get("groups", [])):
        lab = f"{i}: /{gr['params']}/"
        bits = []
        if gr.get("lr") is not None:
            bits.append(f"lr {g(gr['lr'])}")
        if gr.get("weight_decay") is not None:
            bits.append(f"wd {g(gr['weight_decay'])}")
        out.append((lab + (" (" + ", ".join(bits) + ")" if bits else ""), re.compile(gr["params"])))
    return out


def grad_group_errors(res: Mapping[str, Any], run_dir: str) -> List[Dict[str, Any]]:
    """Gradient errors aggregated per optimiser parameter group (first matching regex, rest
    in a default group, as ``build_param_groups``)."""
    import numpy as np
    grads = [e for e in res.get("tensors", []) if e.get("group") == "grads"]
    if not grads:
        return []
    groups = optimizer_groups(run_dir) or []
    buckets: "OrderedDict[str, List[Dict[str, Any]]]" = OrderedDict((lab, []) for lab, _ in groups)
    rest = "default group (optimizer defaults)"
    for e in grads:
        name = e["name"][len("grad."):] if e["name"].startswith("grad.") else e["name"]
        lab = next((lab for lab, pat in groups if pat.findall(name)), rest)
        buckets.setdefault(lab, []).append(e)
    out = []
    for lab, es in buckets.items():
        if not es:
            continue
        errs = [float(e["err"]) for e in es if e.get("err") is not None and not isinstance(e.get("err"), str)]
        fls = [float(e["floor"]) for e in es if e.get("floor") is not None and not isinstance(e.get("floor"), str)]
        worst = max(es, key=lambda e: float(e["err"]) if isinstance(e.get("err"), (int, float)) else math.inf)
        out.append({"label": lab, "n": len(es), "failed": sum(1 for e in es if not e.get("passed")),
                    "worst_err": max(errs) if errs else None, "median_err": float(np.median(errs)) if errs else None,
                    "median_floor": float(np.median(fls)) if fls else None, "worst": worst["name"]})
    return out


def stage_numbers(res: Mapping[str, Any], run_dir: str) -> Dict[str, Any]:
    ents = [e for e in res.get("tensors", []) if e.get("group") in ("intermediates", "outputs")]
    return {"status": res.get("status"), "passed": res.get("passed"), "stage": res.get("stage"),
            "config": res.get("config"), "config_digest": res.get("config_digest"), "dtype": res.get("dtype"),
            "device": res.get("device"), "seed": res.get("seed"), "groups": res.get("groups"),
            "first_divergence": res.get("first_divergence"),
            "forward_errors": [{"name": e["name"], "err": e.get("err"), "floor": e.get("floor"), "passed": e.get("passed")}
                               for e in ents],
            "grad_groups": grad_group_errors(res, run_dir),
            "sides": [{k: s.get(k) for k in ("label", "role", "backend", "dtype", "wall_s", "peak_rss_mb")}
                      for s in res.get("sides", [])]}


def stage_plots(res: Mapping[str, Any], run_dir: str, prefix: str) -> Dict[str, bytes]:
    from . import plots
    out: Dict[str, bytes] = OrderedDict()
    ents = [e for e in res.get("tensors", []) if e.get("group") in ("intermediates", "outputs") and e.get("kind") == "tensor"]
    if ents:
        out[f"{prefix}forward_errors.png"] = plots.module_errors(
            ents, f"{res.get('stage')} {res.get('dtype')}: error per module, forward order")
    tents = [e for e in res.get("tensors", []) if e.get("group") in ("train_intermediates", "train_outputs")
             and e.get("kind") == "tensor"]
    if tents:
        out[f"{prefix}forward_train_errors.png"] = plots.module_errors(
            tents, f"{res.get('stage')} {res.get('dtype')}, train mode: error per module, forward order")
    gg = grad_group_errors(res, run_dir)
    if gg:
        out[f"{prefix}grad_groups.png"] = plots.group_errors(gg, f"gradient error per parameter group ({res.get('dtype')})")
    return out


def stage_markdown(res: Mapping[str, Any], run_dir: str, images: Optional[Mapping[str, str]], heading: str = "#") -> str:
    from . import compare as C
    from .run_summary import group_table
    L: List[str] = []
    L.append(f"{heading} {str(res.get('stage')).capitalize()} parity — {res.get('config')} — {res.get('dtype')}: "
             f"**{str(res.get('status')).upper()}**")
    L.append("")
    if res.get("status") == "error":
        e = res.get("error", {})
        L += [f"**Error** ({e.get('side')} side, {e.get('cause')}): {e.get('message')}", ""]
        return "\n".join(L) + "\n"
    case = res.get("case", {}) or {}
    L.append(f"- run folder: `{shown_path(run_dir)}`")
    L.append(f"- config `{res.get('config')}` (digest `{res.get('config_digest')}`), batch {case.get('batch_size')} at "
             f"{case.get('image_size')}, seed {res.get('seed')}, device `{res.get('device')}`")
    fd = res.get("first_divergence")
    L.append(f"- {C.describe_divergence(fd) if fd else 'no divergence: every check passed'}")
    L.append("")
    if res.get("groups"):
        L += group_table(res, md=True)
        L.append("")
    if images:
        for name, alt in (("forward_errors.png", "forward error per module"), ("grad_groups.png", "gradient error per group")):
            if name in images:
                L.extend([f"![{alt}]({images[name]})", ""])
    gg = grad_group_errors(res, run_dir)
    if gg:
        L.append(f"{heading}# Gradient error per parameter group")
        L.append("")
        L += md_table(_df([{"group": x["label"], "tensors": x["n"], "failed": x["failed"], "worst err": x["worst_err"],
                            "median err": x["median_err"], "median floor": x["median_floor"],
                            "worst tensor": f"`{x['worst']}`"} for x in gg]))
        L.append("")
    gm = res.get("grads_by_module") or []
    if gm:
        L.append(f"{heading}# Gradients by module (worst 10)")
        L.append("")
        L += md_table(_df([{"module": f"`{m['module']}`", "params": m["n"], "failed": m["failed"],
                            "worst err": m["worst_err"], "ratio to floor": m.get("worst_ratio")} for m in gm[:10]]))
        L.append("")
    rows = []
    for s in res.get("sides", []):
        v = s.get("versions", {})
        rows.append({"side": s["label"], "role": s["role"], "backend": s["backend"], "dtype": s["dtype"],
                     "wall s": s.get("wall_s"), "peak RSS MB": s.get("peak_rss_mb"),
                     "versions": ", ".join(f"{k} {v[k]}" for k in (s["backend"], "numpy", "python") if k in v)})
    if rows:
        L.append(f"{heading}# Sides")
        L.append("")
        L += md_table(_df(rows))
        L.append("")
    rv = (res.get("versions") or {}).get("runner", {})
    L.append(f"- git `{rv.get('git')}`, platform {rv.get('platform')}; threads: not recorded by this stage")
    L.append(f"- total wall time {g(res.get('wall_s'), '.1f')} s; thresholds `{shown_path(res.get('thresholds_file'))}`")
    L.append("")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------------------
# eval / bench runs
# ----------------------------------------------------------------------------------------

def eval_markdown(doc: Mapping[str, Any], run_dir: str, heading: str = "#") -> str:
    L = [f"{heading} Eval parity — {doc.get('config')}: **{str(doc.get('status')).upper()}**"
         f"{' (passed)' if doc.get('passed') else ''}", "",
         f"- run folder: `{shown_path(run_dir)}`; max |AP diff| {g(doc.get('max_abs_ap_diff'))}, mean agreement "
         f"{g(doc.get('mean_agreement'))}", ""]
    m = doc.get("metrics") or {}
    if m:
        L += md_table(_df([{"backend": be, **vals} for be, vals in m.items()]), ".4f")
        L.append("")
    return "\n".join(L) + "\n"


def bench_markdown(doc: Mapping[str, Any], heading: str = "#") -> str:
    """parity bench's own Markdown (its renderer), or a plain median table if that renderer
    cannot read this (older) bench.json."""
    try:
        from .bench import render_md
        body = render_md(doc).splitlines()
        if body and body[0].startswith("# "):
            body = body[1:]
        return "\n".join([f"{heading} Benchmark"] + body) + "\n"
    except Exception:  # noqa: BLE001
        rows = []
        for r in doc.get("runs", []):
            for name, m in (r.get("measures") or {}).items():
                rows.append({"config": r.get("config"), "size": "x".join(str(x) for x in r.get("size", [])),
                             "measure": name, "unit": m.get("unit"),
                             "PyTorch median": (m.get("torch") or {}).get("median"),
                             "Jittor median": (m.get("jittor") or {}).get("median"), "Jittor/PyTorch": m.get("ratio")})
        h = doc.get("host", {}) or {}
        L = [f"{heading} Benchmark", "", f"Host: {h.get('cpu_model')}, {h.get('affinity') or h.get('cpu_count')} cores; "
             f"created {doc.get('created')}.", ""]
        return "\n".join(L + md_table(_df(rows))) + "\n"


def bench_plot(doc: Mapping[str, Any]) -> Optional[bytes]:
    try:
        from .bench import render_png
        return render_png(doc)
    except Exception:  # noqa: BLE001 - a plot is optional
        return None


# ----------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------

def render(run_dirs: Sequence[str], out: str, title: Optional[str] = None) -> Dict[str, Any]:
    """Write report.md, report.json and the plots of ``run_dirs`` into ``out``; return the JSON."""
    runs = [load_run(d) for d in run_dirs]
    os.makedirs(out, exist_ok=True)
    multi = len(runs) > 1
    heading = "##" if multi else "#"
    md: List[str] = []
    doc: Dict[str, Any] = {"schema": REPORT_SCHEMA, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                           "command": ["parity", "report", *run_dirs], "runs": []}
    if multi or title:
        md += [f"# {title or 'Parity report'}", ""]
        md += md_table(_df([{"run": os.path.basename(r["dir"]), "kind": r["kind"], "config": r["doc"].get("config"),
                             "dtype": r["doc"].get("dtype") or (r["doc"].get("settings") or {}).get("dtype"),
                             "status": r["doc"].get("status") or ("ok" if r["kind"] == "bench" else None)}
                            for r in runs]))
        md.append("")
    for i, r in enumerate(runs):
        prefix = f"r{i + 1}_{r['kind']}_" if multi else f"{r['kind']}_"
        res, d = r["doc"], r["dir"]
        entry: Dict[str, Any] = {"dir": shown_path(d), "kind": r["kind"], "source": shown_path(r["file"])}
        pngs: Dict[str, bytes] = {}
        if r["kind"] == "train":
            logs = train_logs(d, res)
            pngs = train_plots(res, logs, prefix) if res.get("status") != "error" else {}
            images = {k[len(prefix):]: k for k in pngs}
            md.append(train_markdown(res, d, images, heading))
            entry.update(train_numbers(res))
        elif r["kind"] in ("forward", "grad"):
            pngs = stage_plots(res, d, prefix) if res.get("status") != "error" else {}
            images = {k[len(prefix):]: k for k in pngs}
            md.append(stage_markdown(res, d, images, heading))
            entry.update(stage_numbers(res, d))
        elif r["kind"] == "eval":
            md.append(eval_markdown(res, d, heading))
            entry.update({k: res.get(k) for k in ("status", "passed", "config", "metrics", "max_abs_ap_diff",
                                                  "mean_agreement")})
        else:
            md.append(bench_markdown(res, heading))
            png = bench_plot(res)
            if png:
                pngs = {f"{prefix}bench.png": png}
                md.extend([f"![benchmark]({prefix}bench.png)", ""])
            entry.update({"host": res.get("host"), "settings": res.get("settings"),
                          "measures": [{"config": rr.get("config"), "size": rr.get("size"), "measures": rr.get("measures")}
                                       for rr in res.get("runs", [])]})
        for name, data in pngs.items():
            write_bytes(os.path.join(out, name), data)
        entry["images"] = list(pngs)
        doc["runs"].append(entry)
    from .curves import jsonable
    doc = jsonable(doc)
    write_json(os.path.join(out, "report.json"), doc)
    write_text(os.path.join(out, "report.md"), "\n".join(md).rstrip() + "\n")
    return doc


def run(args: argparse.Namespace) -> int:
    try:
        dirs = list(args.runs)
        if args.out:
            out = os.path.abspath(args.out)
        elif len(dirs) == 1:
            out = os.path.join(os.path.abspath(dirs[0]), "report")
        else:
            from .runner import default_out
            out = default_out("report", "runs")
        doc = render(dirs, out, args.title)
    except ReportError as e:
        print(f"parity report: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    n_img = sum(len(r["images"]) for r in doc["runs"])
    print(f"parity report: {len(doc['runs'])} run(s) -> {out}/report.md, report.json, {n_img} plot(s)")
    return EXIT_OK
