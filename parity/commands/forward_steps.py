"""The named steps of ``parity run --stage forward|grad`` (the flow is in
parity/commands/forward.py): the options, the output folder, the jobs (which side runs what,
which decisions it takes), the case, running the jobs (the Jittor float64 run skipped over
--float64-budget), re-running a candidate whose decisions differ, the comparisons and the
verdict, and the result files."""
from __future__ import annotations

import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from rtdetr_core.config import ConfigError, load_config
from rtdetr_core.param_spec import param_spec

from parity.case.contract import write_decisions_from
from parity.case.faults import FaultError, check_faults_against_spec, parse_faults
from parity.case.folder import Case, CaseError, build_case
from parity.commands.options import opt
from parity.errors import EXIT_FAIL, EXIT_OK, RunError
from parity.facts import runner_versions
from parity.fileio import default_out, jsonable, write_json, write_text
from parity.judge.run_compare import compare_results, decisions_agree, pair_result
from parity.judge.run_verdict import combine, explain_float32
from parity.judge.thresholds import ThresholdError, load_thresholds
from parity.report.forward import print_final, summary_markdown
from parity.sides.jobs import STAGES, Job, label, run_job
from parity.sides.process import resolve_python

# Jittor float64 / PyTorch float64 wall time, worst measured on CPU: parity-r50vd grad at
# 576x640, batch 2, one thread per side: J64 1359 s vs T64 41 s (33x; forward 501 vs 19 s,
# 27x); at 640 with torch's default threads: 2134 vs 165 s (13x); smoke: 2.8x; r18vd: ~6x.
# Jittor has no float64 GEMM on CPU and its float64 convolutions are generated loops.
J64_OVER_T64 = 33.0


@dataclass
class ForwardRun:
    """One invocation: the options, the config, where, the jobs and what they produced."""
    stage: str
    cfg: Any
    dtype: str
    device: str
    seed: int
    bs: int
    reference: bool
    share: bool
    budget64: float
    verbose: bool
    keep: bool
    timeout: Optional[float]
    cand_backend: str
    fault_side: str
    fault_specs: List[str]
    thresholds: Any
    pys: Dict[str, str] = field(default_factory=dict)
    out: str = ""
    work: str = ""
    case_dir: str = ""
    dts: tuple = ()
    jobs: List[Job] = field(default_factory=list)
    pairs: "OrderedDict[str, Dict[str, Job]]" = field(default_factory=OrderedDict)
    order: List[Job] = field(default_factory=list)        # the jobs that ran, in order
    manifest: Dict[str, Any] = field(default_factory=dict)
    skipped64: Optional[str] = None
    reruns: Dict[str, str] = field(default_factory=dict)


def clear_old_verdict(out: Optional[str]) -> Optional[str]:
    """Never leave an older verdict behind, whatever fails next."""
    if not out:
        return None
    out = os.path.abspath(out)
    for stale in ("result.json", "summary.md"):
        p = os.path.join(out, stale)
        if os.path.isfile(p):
            os.unlink(p)
    return out


def read_options(args, base_info: Dict[str, Any]) -> ForwardRun:
    stage = args.stage
    if stage not in STAGES:
        raise RunError(f"--stage {stage}: not handled by parity.commands.forward (forward, grad)")
    try:
        cfg = load_config(opt(args, "config", "smoke"))
    except ConfigError as e:
        raise RunError(f"config: {e}", cause="config") from None
    dtype = opt(args, "dtype", "both")
    seed = int(opt(args, "seed", 0))
    bs = opt(args, "batch_size", None)
    bs = cfg.train.batch_size if bs is None else int(bs)
    if bs < 1:
        raise RunError(f"--batch-size must be >= 1, got {bs}")
    if seed < 0:
        raise RunError(f"--seed must be >= 0, got {seed}")
    try:
        thresholds = load_thresholds(opt(args, "thresholds", None))
    except ThresholdError as e:
        raise RunError(f"thresholds: {e}", cause="thresholds") from None
    fr = ForwardRun(stage=stage, cfg=cfg, dtype=dtype, device=opt(args, "device", "cpu"), seed=seed, bs=bs,
                    reference=dtype == "float32" and not opt(args, "no_reference", False),
                    share=bool(opt(args, "share_decisions", False)),
                    budget64=float(opt(args, "float64_budget", 1800.0)), verbose=bool(opt(args, "verbose", False)),
                    keep=bool(opt(args, "keep_arrays", False)), timeout=opt(args, "timeout", None) or None,
                    cand_backend=opt(args, "candidate_backend", "jittor"), fault_side=opt(args, "fault_side", "jittor"),
                    fault_specs=list(opt(args, "inject_fault", []) or []), thresholds=thresholds)
    try:
        check_faults_against_spec(parse_faults(fr.fault_specs), [e.name for e in param_spec(cfg)])
    except FaultError as e:
        raise RunError(str(e), cause="usage") from None
    base_info.update(config=cfg.name, config_digest=cfg.digest(), dtype=dtype, device=fr.device, seed=seed,
                     batch_size=bs, reference=fr.reference, share_decisions=fr.share,
                     faults=fr.fault_specs, fault_side=fr.fault_side if fr.fault_specs else None)
    if fr.cand_backend not in ("jittor", "torch"):
        raise RunError(f"unknown candidate backend {fr.cand_backend!r} (jittor; torch for a harness self-test)")
    if fr.fault_side not in ("jittor", "torch"):
        raise RunError(f"--fault-side must be jittor or torch, got {fr.fault_side!r}")
    fr.pys = {"torch": resolve_python("torch", opt(args, "torch_python", None))}
    if fr.cand_backend == "jittor":
        fr.pys["jittor"] = resolve_python("jittor", opt(args, "jittor_python", None))
    return fr


def prepare_out(fr: ForwardRun, args, base_info: Dict[str, Any]) -> str:
    fr.out = out = os.path.abspath(opt(args, "out", None) or default_out(fr.stage, fr.cfg.name))
    os.makedirs(out, exist_ok=True)
    base_info["out"] = out
    clear_old_verdict(out)
    fr.work = os.path.join(out, "work")
    if os.path.isdir(fr.work):
        shutil.rmtree(fr.work)
    os.makedirs(fr.work)
    fr.case_dir = os.path.join(out, "case")
    return out


def plan_jobs(fr: ForwardRun, base_info: Dict[str, Any]) -> None:
    """float32 = T32 base, J32 candidate, T64 reference (with T32's decisions); float64 = T64
    base, J64 candidate; both = the two, where J64 and T64 take T32's decisions (each still
    records its own, which are judged) so that the float64 arbiter compares the continuous
    tensors under one set of decisions."""
    dtype, stage, pys, cb = fr.dtype, fr.stage, fr.pys, fr.cand_backend
    fr.dts = dts = ("float32", "float64") if dtype == "both" else (dtype,)
    for dt in dts:
        base = Job(label("torch", dt), "base", "torch", pys["torch"], dt, stage, "")
        cand = Job(label(cb, dt, True, cb), "cand", cb, pys[cb], dt, stage, "")
        if dt == "float64" and dtype == "both":
            base.role, base.share_from, cand.share_from = "ref", label("torch", "float32"), label("torch", "float32")
        elif fr.share:
            cand.share_from = base.label
        fr.pairs[dt] = {"base": base, "cand": cand}
        if base.label not in {j.label for j in fr.jobs}:
            fr.jobs.append(base)
        fr.jobs.append(cand)
    if dtype == "float32" and fr.reference:
        ref = Job(label("torch", "float64"), "ref", "torch", pys["torch"], "float64", stage, "",
                  share_from=label("torch", "float32"))
        fr.jobs.append(ref)
        fr.pairs["float32"]["ref"] = ref
    if dtype == "both":
        fr.pairs["float32"]["ref"] = fr.pairs["float64"]["base"]
    for j in fr.jobs:
        j.out = os.path.join(fr.work, f"{j.label}.npz")
        if fr.fault_specs and ((fr.fault_side == "jittor" and j.role == "cand")
                               or (fr.fault_side == "torch" and j.backend == "torch" and j.role != "cand")):
            j.faults = fr.fault_specs
    labels = {dt: {r: j.label for r, j in pr.items()} for dt, pr in fr.pairs.items()}
    base_info["labels"] = labels[dts[0]] if len(dts) == 1 else labels
    base_info["dtypes"] = list(dts)


def announce(fr: ForwardRun) -> None:
    cfg = fr.cfg
    print(f"parity run --stage {fr.stage}: config {cfg.name} ({cfg.digest()}), {fr.dtype}"
          f"{' + float64 reference' if fr.reference else ''}, batch {fr.bs}, seed {fr.seed}"
          f"{', shared decisions' if fr.share else ''} -> {fr.out}")
    if fr.fault_specs:
        print(f"  injecting fault on the {fr.fault_side} side: {', '.join(fr.fault_specs)}")


def write_case(fr: ForwardRun, args, base_info: Dict[str, Any]) -> None:
    try:
        fr.manifest = build_case(fr.case_dir, fr.cfg, stage=fr.stage, batch_size=fr.bs, seed=fr.seed,
                                 data_root=opt(args, "data", None), weights_path=opt(args, "weights", None))
    except CaseError as e:
        msg = str(e)
        raise RunError(msg, side="case", cause=msg.split(":", 1)[0] if ":" in msg else "case") from None
    base_info["case"] = {k: fr.manifest[k] for k in ("batch_size", "image_size", "data", "weights", "dn_draws")}
    base_info["case"]["dir"] = fr.case_dir


def check_side(j: Job, manifest: Dict[str, Any]) -> None:
    """The side ran the case's config and weights, in the asked backend and dtype (every rank
    of a data-parallel side)."""
    for meta in j.rank_meta or [j.meta]:
        if meta.get("config_digest") != manifest["config_digest"]:
            raise RunError(f"config mismatch: the {j.backend} side ran config digest "
                           f"{meta.get('config_digest')}, the case is {manifest['config_digest']}",
                           side=j.backend, cause="config mismatch")
        if meta.get("case_weights_sha256") != manifest["files"]["weights.safetensors"]:
            raise RunError(f"the {j.backend} side loaded other weights than the case's", side=j.backend,
                           cause="weights")
        if meta.get("dtype") != j.dtype or meta.get("backend") != j.backend:
            raise RunError(f"the {j.backend} side reported {meta.get('backend')} {meta.get('dtype')}, "
                           f"expected {j.backend} {j.dtype}", side=j.backend, cause="protocol")


def float64_too_long(t64: Job, budget_s: float) -> Optional[str]:
    """Why the Jittor float64 run is skipped (its estimate exceeds --float64-budget), or None."""
    est = t64.wall * J64_OVER_T64
    if budget_s > 0 and est > budget_s:
        return (f"the Jittor float64 run would take ~{est / 60:.0f} min (PyTorch float64 took {t64.wall:.0f} s, "
                f"x{J64_OVER_T64:g} measured worst), over --float64-budget {budget_s:g} s")
    return None


def run_jobs(fr: ForwardRun, progress) -> None:
    """Every job in order; the base side's decisions written for the sides that take them."""
    fr.order = list(fr.jobs)
    n_total = len(fr.order)
    for i, j in enumerate(list(fr.order), 1):
        if fr.dtype == "both" and j is fr.pairs["float64"]["cand"]:
            fr.skipped64 = float64_too_long(fr.pairs["float64"]["base"], fr.budget64)
            if fr.skipped64:
                progress.line(f"  {fr.skipped64}: the verdict rests on float32 only (provisional)")
                fr.order.remove(j)
                del fr.pairs["float64"]
                break
        run_job(j, fr.case_dir, fr.device, progress, i, n_total, fr.verbose, fr.timeout)
        check_side(j, fr.manifest)
        if j.role == "base" and j.dtype == fr.dts[0]:
            write_decisions_from(j.out, os.path.join(fr.work, f"decisions-{j.label}.npz"))


def rerun_decision_flips(fr: ForwardRun, progress) -> None:
    """A candidate whose own decisions differ from the base's is run again with the base's
    (recording its own, which are classified): the continuous tensors are judged there."""
    n_total = len(fr.order)
    for dt, pr in fr.pairs.items():
        cand, base = pr["cand"], pr["base"]
        if cand.share_from or decisions_agree(base.out, cand.out):
            continue
        dec = os.path.join(fr.work, f"decisions-{base.label}.npz")
        if not os.path.exists(dec):
            write_decisions_from(base.out, dec)
        again = Job(cand.label + "s", "cand", cand.backend, cand.python, dt, fr.stage,
                    os.path.join(fr.work, f"{cand.label}s.npz"), share_from=base.label, faults=cand.faults)
        progress.line(f"  {cand.label}'s own decisions differ from {base.label}'s: re-running it with "
                      f"{base.label}'s decisions to measure the continuous tensors apart from the flip")
        n_total += 1
        run_job(again, fr.case_dir, fr.device, progress, n_total, n_total, fr.verbose, fr.timeout)
        check_side(again, fr.manifest)
        fr.order.append(again)
        fr.reruns[dt] = cand.label
        pr["cand"] = again


def compare_pair(fr: ForwardRun, dt: str, pr: Dict[str, Job], before, base_info: Dict[str, Any]) -> Dict[str, Any]:
    """One comparison (candidate vs base, with the reference's floor in float32) as a result dict."""
    base, cand, ref = pr["base"], pr["cand"], pr.get("ref")
    cmpd = compare_results(fr.stage, dt, base.out, cand.out, ref.out if ref else None, fr.thresholds,
                           cand_shared=cand.meta.get("decisions_injected", {}), cand_side=fr.cand_backend,
                           before=before)
    if not cmpd["entries"]:
        raise RunError("nothing to compare: the base side recorded no tensors", side="torch", cause="protocol")
    labels = {"cand": cand.label, "base": base.label}
    if ref:
        labels["ref"] = ref.label
    rerun_of = fr.reruns.get(dt)
    return pair_result(fr.stage, dt, cmpd, labels, fr.thresholds, base_info,
                       {"own_run": rerun_of, "judged_run": cand.label} if rerun_of else None)


def judge(fr: ForwardRun, base_info: Dict[str, Any]) -> Dict[str, Any]:
    """Every pair compared; with --dtype both, float64 arbitrates (or float32 alone, provisional)."""
    before = Case(fr.case_dir, verify=False).weights()     # the step and BN buffers are judged on updates
    results = OrderedDict((dt, compare_pair(fr, dt, pr, before, base_info)) for dt, pr in fr.pairs.items())
    if fr.dtype == "both" and fr.skipped64:
        res = results["float32"]
        explain_float32(res, None, fr.stage)
        res.update(dtype="both", float64_skipped=fr.skipped64,
                   verdict_basis=f"float32 only, PROVISIONAL: {fr.skipped64}")
        res["provisional"] = True
    elif fr.dtype == "both":
        res = combine(results, base_info, fr.stage, fr.dtype)
    else:
        res = results[fr.dtype]
        if fr.dtype == "float32" and "ref" in fr.pairs["float32"]:
            explain_float32(res, None, fr.stage)
    return res


def side_info(j: Job) -> Dict[str, Any]:
    return {"label": j.label, "role": j.role, "backend": j.backend, "dtype": j.dtype, "python": j.python,
            "wall_s": j.wall, "timing": j.meta.get("timing", {}), "peak_rss_mb": j.meta.get("peak_rss_mb"),
            "versions": j.meta.get("versions", {}), "faults": j.meta.get("faults", []),
            "decisions_injected": j.meta.get("decisions_injected"), "step": j.meta.get("step")}


def finish(fr: ForwardRun, res: Dict[str, Any], versions: Dict[str, Any], t_start: float) -> Dict[str, Any]:
    """result.json, summary.md, the arrays removed (unless --keep-arrays), the final lines."""
    res["exit_code"] = EXIT_OK if res["passed"] else EXIT_FAIL    # the judge returns data; the exit code is ours
    res.update(thresholds_file=fr.thresholds.path, versions={"runner": runner_versions(), **versions},
               sides=[side_info(j) for j in fr.order])
    res["wall_s"] = time.perf_counter() - t_start
    res = jsonable(res)
    write_json(os.path.join(fr.out, "result.json"), res)
    write_text(os.path.join(fr.out, "summary.md"), summary_markdown(res))
    if not fr.keep:
        for j in fr.order:
            if os.path.exists(j.out):
                os.unlink(j.out)
    print_final(res)
    return res
