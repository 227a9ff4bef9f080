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

import datetime
import math
import os
import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from parity.errors import ReportError
from parity.fileio import jsonable, read_json, write_bytes, write_json, write_text
from parity.numfmt import g
from parity.report import plots
from parity.report.bench import render_md, render_png
from parity.report.fmt import _df, md_table, shown_path
from parity.report.forward import describe_divergence, group_table
from parity.report.train import train_markdown, train_numbers, train_plots


REPORT_SCHEMA = 1
KINDS = ("forward", "grad", "train", "eval", "bench")


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
    L.append(f"- {describe_divergence(fd) if fd else 'no divergence: every check passed'}")
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
        elif r["kind"] in ("forward", "grad") and "runs" in res:
            # --dtype both: the verdict, then the float64 and the float32 comparison in full
            md += [f"{heading} {str(res.get('stage')).capitalize()} parity — {res.get('config')} — float64 + "
                   f"float32: **{str(res.get('status')).upper()}**", "",
                   f"Verdict rests on: {res.get('verdict_basis')}.", ""]
            md += [f"- float32 `{x['name']}` reported, not failed: {x['evidence']}" for x in res.get("explained") or []]
            entry.update(status=res.get("status"), passed=res.get("passed"), verdict_basis=res.get("verdict_basis"),
                         explained=res.get("explained"), runs={})
            for dt in ("float64", "float32"):
                sub = {**res, **res["runs"][dt]}
                sub.pop("runs", None)
                p2 = f"{prefix}{dt}_"
                sub_png = stage_plots(sub, d, p2)
                pngs.update(sub_png)
                md.append(stage_markdown(sub, d, {k[len(p2):]: k for k in sub_png}, heading + "#"))
                entry["runs"][dt] = stage_numbers(sub, d)
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
    doc = jsonable(doc)
    write_json(os.path.join(out, "report.json"), doc)
    write_text(os.path.join(out, "report.md"), "\n".join(md).rstrip() + "\n")
    return doc
