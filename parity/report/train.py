"""How ``parity report`` renders a training run (``parity run --stage train``): the curve
numbers, the plots and the Markdown section (also the run's own summary.md)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional

from parity.numfmt import g
from parity.report import plots
from parity.report.fmt import _df, md_table, shown_path
from parity.report.train_decisions import decisions_section


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
        out["buffers"] = {k: (cb.get("buffers") or {}).get(k) for k in ("worst", "worst_at")} if cb.get("buffers") else None
        out["eval_outputs"] = ({k: cb["eval_outputs"].get(k) for k in ("worst", "worst_at", "tie_flips")}
                               if cb.get("eval_outputs") else None)
        out["missing"] = cb.get("missing") or {}
        out["map_diff"] = {k: v for k, v in (cb.get("map") or {}).items() if k != "per_epoch"} if cb.get("map") else None
        out["epochs"] = [{"epoch": d["epoch"], "base_total": d["base_total"], "cand_total": d["cand_total"],
                          "total_rel": d["total_rel"], "worst_term": d["worst_term"],
                          "worst_term_rel": d["worst_term_rel"]} for d in cb.get("epochs", [])]
    if fl:
        out["floor"] = {"lockstep": fl.get("lockstep"), "epoch_total_rel": fl.get("epoch_total_rel"),   # window: FLOOR_METRIC
                        "epoch_term_rel": fl.get("epoch_term_rel"), "final_window_rel": fl.get("final_window_noise", fl.get("final_window_rel")),
                        "map_abs": fl.get("map_abs"), "param_drift": fl.get("param_drift"),
                        "buffer_rel": fl.get("buffer_rel"), "eval_outputs_rel": fl.get("eval_outputs_rel"),
                        "epochs": [{"epoch": d["epoch"], "total_rel": d["total_rel"],
                                    "worst_term_rel": d["worst_term_rel"]} for d in fl.get("epochs", [])]}
    return out


def train_plots(res: Mapping[str, Any], logs: Mapping[str, Any], prefix: str) -> Dict[str, bytes]:
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
    _overview(res, run_dir, L)
    _nonfinite(res, heading, L)

    def img(name, alt):
        if images and name in images:
            L.extend([f"![{alt}]({images[name]})", ""])

    img("loss_curves.png", "loss curves")
    _checks(res, heading, L)
    decisions_section(res, heading, L)
    _lockstep(res, heading, L, img)
    _map(res, heading, L, img)
    _drift(res, heading, L)
    _buffers(res, heading, L)
    _epochs(res, heading, L, img)
    _start_end(res, heading, L)
    _sides(res, heading, L)
    _environment(res, heading, L)
    return "\n".join(L) + "\n"


def _overview(res: Mapping[str, Any], run_dir: str, L: List[str]) -> None:
    """The run: folder, config, schedule, data, weights, sides, faults, resumes."""
    plan = res.get("plan", {}) or {}
    data = res.get("data", {}) or {}
    w = res.get("weights", {}) or {}
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
    L.append(f"- weights: {'seeded init, seed ' + str(w.get('seed')) if w.get('source') == 'seeded' else shown_path(w.get('path'))}")
    sides_txt = ", ".join(f"{s['label']} = {s['backend']} {s['dtype']} ({s['role']})" for s in res.get("sides", []))
    L.append(f"- sides: {sides_txt}; {'one after another' if res.get('sequential') else 'run concurrently'}, "
             f"{res.get('threads')} thread(s) each")
    ident = res.get("inputs_identical") or {}
    if ident:
        L.append("- shared streams (order, denoising draws, multi-scale sizes) consumed identically: "
                 + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in ident.items()))
    if res.get("faults"):
        L.append(f"- **INJECTED FAULT** on the {res.get('fault_side')} side: {', '.join(res['faults'])}")
    for s in res.get("sides", []):
        if s.get("resumed"):
            L.append(f"- {s['label']} was resumed: " + "; ".join(f"from epoch {r['from_epoch']} ({r['checkpoint']})"
                                                               for r in s["resumed"]))
    L.append("")


def _nonfinite(res: Mapping[str, Any], heading: str, L: List[str]) -> None:
    """Sides stopped by a non-finite loss."""
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


def _checks(res: Mapping[str, Any], heading: str, L: List[str]) -> None:
    """Every check: value, floor, threshold, rule, result."""
    checks = res.get("checks", [])
    if checks:
        L += [f"{heading}# Checks", ""]
        rows = [{"check": c["check"], "value": g(c.get("value")), "floor (T32 vs T64)": g(c.get("floor")),
                 "threshold": ", ".join(f"{k} {g(v)}" for k, v in (c.get("threshold") or {}).items()) or "-",
                 "rule": c.get("rule") or "-", "result": "pass" if c["passed"] else "**FAIL**",
                 "what": c.get("text", "")} for c in checks]
        L += md_table(_df(rows))
        L.append("")
        L.append(f"Thresholds: `{shown_path(res.get('thresholds_file'))}` (train section). A check passes by the fixed rule "
                 f"or, in float32 with the reference, by the floor rule value <= k x floor + allowance.")
        L.append("")


def _lockstep(res: Mapping[str, Any], heading: str, L: List[str], img) -> None:
    """How long the two sides stay in lock-step, and the noise floor's."""
    cb = (res.get("metrics") or {}).get("cand_base")
    fl = (res.get("metrics") or {}).get("base_ref")
    labels = res.get("labels", {})
    if cb:
        ls = cb["lockstep"]
        L += [f"{heading}# Lock-step", ""]
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
            as_early = fls.get("first_iteration") and ls.get("first_iteration") and fls["length"] <= ls["length"]
            L += ["", f"Noise floor: PyTorch float32 vs float64 stays in lock-step for {fls['length']} iterations"
                  + (f" (first difference at iteration {fls['first_iteration']}, `{fls['term']}`, {g(fls['rel'])}, "
                     f"{fls['kind']})." if fls.get("first_iteration") else ".")
                  + (" The floor leaves lock-step no later, so this departure is within float32's own noise: the "
                     "checks above judge it, not the pattern." if as_early else "")]
        L.append("")
        img("rel_diff_iteration.png", "per-iteration relative difference")


def _map(res: Mapping[str, Any], heading: str, L: List[str], img) -> None:
    """COCO mAP of every side at its last evaluation."""
    cb = (res.get("metrics") or {}).get("cand_base")
    labels = res.get("labels", {})
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
        _map_epochs(res, maps, L)
        if cb and cb.get("map") and cb["map"].get("abs"):
            L.append("")
            L.append("Absolute difference " + f"{labels.get('cand')} - {labels.get('base')}: "
                     + ", ".join(f"{k} {g(v, '.4f')}" for k, v in cb["map"]["abs"].items()))
        L.append("")
        img("map.png", "mAP per evaluated epoch")


def _map_epochs(res: Mapping[str, Any], maps: Mapping[str, Any], L: List[str]) -> None:
    """AP of every side at every evaluated epoch, with candidate - base and reference - base
    (the float32 floor; only when a side was evaluated more than once)."""
    sides = [s["label"] for s in res.get("sides", []) if maps.get(s["label"])]
    epochs = sorted({int(e) for lb in sides for e in maps[lb]})
    if len(epochs) < 2:
        return
    labels = res.get("labels", {})
    base, cand = labels.get("base"), labels.get("cand")
    rows = []
    for e in epochs:
        r = OrderedDict([("epoch", e)])
        for lb in sides:
            r[f"{lb} AP"] = (maps[lb].get(str(e)) or {}).get("AP")
        for other in (cand, labels.get("ref")):       # the difference, then float32's own (floor)
            if base in sides and other in sides and None not in (r.get(f"{base} AP"), r.get(f"{other} AP")):
                r[f"AP {other} - {base}"] = r[f"{other} AP"] - r[f"{base} AP"]
        rows.append(r)
    L.append("")
    L.append("AP at every evaluated epoch:")
    L.append("")
    L += md_table(_df(rows), ".4f")


def _drift(res: Mapping[str, Any], heading: str, L: List[str]) -> None:
    """Parameter drift of the final weights."""
    cb = (res.get("metrics") or {}).get("cand_base")
    fl = (res.get("metrics") or {}).get("base_ref")
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


def _buffers(res: Mapping[str, Any], heading: str, L: List[str]) -> None:
    """Buffers and eval-mode outputs (what the losses cannot show)."""
    cb = (res.get("metrics") or {}).get("cand_base")
    fl = (res.get("metrics") or {}).get("base_ref")
    if cb and (cb.get("buffers") or cb.get("eval_outputs")):
        # train mode uses batch statistics: only these two show a bug in the running statistics
        L.append(f"{heading}# Buffers and eval-mode outputs")
        L.append("")
        b, eo = cb.get("buffers"), cb.get("eval_outputs")
        if b:
            w = b.get("worst_at") or {}
            L.append(f"- buffers (BN running statistics; counters must be equal), checked at "
                     f"{', '.join(p['point'] for p in b.get('points', []))}: worst rel L2 {g(b.get('worst'))} "
                     f"(`{w.get('tensor')}` at {w.get('point')})"
                     + (f"; floor (T32 vs T64) {g(fl.get('buffer_rel'))}" if fl else ""))
        if eo:
            L.append(f"- eval-mode pred_logits / pred_boxes on the val images, epochs "
                     f"{', '.join(str(e['epoch']) for e in eo.get('epochs', []))}: worst rel L2 {g(eo.get('worst'))}"
                     + (f"; floor {g(fl.get('eval_outputs_rel'))}" if fl else "")
                     + (f"; {eo['tie_flips']} evaluation(s) with a top-k tie flip, compared after pairing queries"
                        if eo.get("tie_flips") else ""))
        L.append("")


def _epochs(res: Mapping[str, Any], heading: str, L: List[str], img) -> None:
    """The per-epoch difference table."""
    cb = (res.get("metrics") or {}).get("cand_base")
    fl = (res.get("metrics") or {}).get("base_ref")
    labels = res.get("labels", {})
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


def _start_end(res: Mapping[str, Any], heading: str, L: List[str]) -> None:
    """Model size and where the loss started and ended, per side (runs written before the
    workers recorded it have no such section)."""
    sides = [s for s in res.get("sides", []) if s.get("start_end")]
    if not sides:
        return
    L.append(f"{heading}# Start and end")
    L.append("")
    rows = []
    for s in sides:
        m, se = s.get("model") or {}, s["start_end"]
        rows.append(OrderedDict([
            ("side", s["label"]), ("parameters", m.get("parameters")), ("queries", m.get("num_queries")),
            ("decoder layers", m.get("num_decoder_layers")), ("denoising", m.get("num_denoising")),
            ("loss, iteration 1", se.get("first_iteration_total")),
            ("mean loss, epoch 1", se.get("first_epoch_mean_total")),
            ("last epoch", se.get("last_epoch")), ("mean loss, last epoch", se.get("last_epoch_mean_total")),
            ("train s", g(sum(s.get("epoch_seconds") or []), ".1f")), ("wall s", g(s.get("wall_s"), ".1f"))]))
    L += md_table(_df(rows), ".6g")
    L.append("")
    L.append("Parameters: trainable elements counted on the model each backend built. Losses: the weighted "
             "total of every term (main, auxiliary and denoising). Train s: the sum of the epochs' training "
             "time; wall s: the side's whole run (evaluations and checkpoints included).")
    L.append("")


def _sides(res: Mapping[str, Any], heading: str, L: List[str]) -> None:
    """Time and memory of every side."""
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


def _environment(res: Mapping[str, Any], heading: str, L: List[str]) -> None:
    """Host, versions, command, wall time."""
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
    L.append(f"- wall time: {g(res.get('wall_s_total'), '.1f')} s over {res['invocations']} invocations "
             f"(the last, a resume, {g(res.get('wall_s'), '.1f')} s); per side: the table above"
             if res.get("invocations", 1) > 1 else f"- wall time of the whole run: {g(res.get('wall_s'), '.1f')} s")
    L.append("")
