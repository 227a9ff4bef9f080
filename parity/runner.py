"""``parity run --stage forward|grad``: build a case, run one worker per backend, compare.

Flow (float32, the default)::

    case folder  ->  torch float32 (base)  ->  jittor float32 (candidate)  ->  torch float64 (reference)
                                  \\-- top-k + matches --> reference (always) and candidate (--share-decisions)

With ``--dtype float64`` there is no reference (torch float64 is the base).  Each worker runs
in its own environment's interpreter (``python -m parity.worker``, see parity/worker.py for
the protocol); everything is exchanged through files under ``--out``::

    <out>/case/            the case folder (parity/case.py)
    <out>/work/<X>.npz     worker results (X = T32, T64, J32, J64), deleted after the
                           comparison unless --keep-arrays; <X>.log holds the worker's output
    <out>/result.json      every tensor's errors, rule and verdict; groups; first divergence
    <out>/summary.md       the same for people

Exit codes: 0 every check passed, 1 a threshold failed, 2 usage or environment error
(missing environment, corrupt weights, config mismatch between the sides, a backend crash).
On exit 2 ``result.json`` says ``"status": "error"`` (never a pass).

The worker processes live in parity/run_jobs.py, the comparisons in parity/run_compare.py (decisions
classified by parity/decisions.py), the --dtype both verdict in parity/run_verdict.py, what is
printed and written for people in parity/run_summary.py.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional

from . import compare as C
from .case import Case, CaseError, build_case, runner_versions
from .faults import FaultError, check_faults_against_spec, parse_faults
from .fileio import write_json, write_text
from .run_compare import build_result, compare_results, decisions_agree
from .run_verdict import combine, explain_float32
from .run_summary import print_final, summary_markdown
from .run_jobs import STAGES, Job, Progress, RunError, _opt, default_out, label, preflight, resolve_python, \
    run_job, write_decisions_from
from .thresholds import ThresholdError, load_thresholds

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _check_side(j: Job, manifest: Dict[str, Any]) -> None:
    """The side ran the case's config and weights, in the asked backend and dtype."""
    if j.meta.get("config_digest") != manifest["config_digest"]:
        raise RunError(f"config mismatch: the {j.backend} side ran config digest "
                       f"{j.meta.get('config_digest')}, the case is {manifest['config_digest']}",
                       side=j.backend, cause="config mismatch")
    if j.meta.get("case_weights_sha256") != manifest["files"]["weights.safetensors"]:
        raise RunError(f"the {j.backend} side loaded other weights than the case's", side=j.backend,
                       cause="weights")
    if j.meta.get("dtype") != j.dtype or j.meta.get("backend") != j.backend:
        raise RunError(f"the {j.backend} side reported {j.meta.get('backend')} {j.meta.get('dtype')}, "
                       f"expected {j.backend} {j.dtype}", side=j.backend, cause="protocol")


# Jittor float64 / PyTorch float64 wall time, worst measured on CPU: parity-r50vd grad at
# 576x640, batch 2, one thread per side: J64 1359 s vs T64 41 s (33x; forward 501 vs 19 s,
# 27x); at 640 with torch's default threads: 2134 vs 165 s (13x); smoke: 2.8x; r18vd: ~6x.
# Jittor has no float64 GEMM on CPU and its float64 convolutions are generated loops.
J64_OVER_T64 = 33.0


def _float64_too_long(t64: Job, budget_s: float) -> Optional[str]:
    """Why the Jittor float64 run is skipped (its estimate exceeds --float64-budget), or None."""
    est = t64.wall * J64_OVER_T64
    if budget_s > 0 and est > budget_s:
        return (f"the Jittor float64 run would take ~{est / 60:.0f} min (PyTorch float64 took {t64.wall:.0f} s, "
                f"x{J64_OVER_T64:g} measured worst), over --float64-budget {budget_s:g} s")
    return None


def _side_info(j: Job) -> Dict[str, Any]:
    return {"label": j.label, "role": j.role, "backend": j.backend, "dtype": j.dtype, "python": j.python,
            "wall_s": j.wall, "timing": j.meta.get("timing", {}), "peak_rss_mb": j.meta.get("peak_rss_mb"),
            "versions": j.meta.get("versions", {}), "faults": j.meta.get("faults", []),
            "decisions_injected": j.meta.get("decisions_injected"), "step": j.meta.get("step")}


def _compare_pair(stage, dt, pr, thresholds, cand_backend, before, base_info, rerun_of) -> Dict[str, Any]:
    """One comparison (candidate vs base, with the reference's floor in float32) as a result dict."""
    base, cand, ref = pr["base"], pr["cand"], pr.get("ref")
    cmpd = compare_results(stage, dt, base.out, cand.out, ref.out if ref else None, thresholds,
                           cand_shared=cand.meta.get("decisions_injected", {}), cand_side=cand_backend,
                           before=before)
    entries = cmpd["entries"]
    if not entries:
        raise RunError("nothing to compare: the base side recorded no tensors", side="torch", cause="protocol")
    labels = {"cand": cand.label, "base": base.label}
    if ref:
        labels["ref"] = ref.label
    res = dict(base_info)
    res.update(dtype=dt, labels=labels, reference=ref is not None)
    res.update(build_result(stage, dt, entries, labels))
    passed = all(e["passed"] for e in entries)
    res.update(status="pass" if passed else "fail", passed=passed, exit_code=EXIT_OK if passed else EXIT_FAIL,
               thresholds={g: t.to_dict() for g, t in thresholds.for_run(stage, dt).items()},
               warnings=cmpd["warnings"], tensors=entries,
               decisions_rerun=({"own_run": rerun_of, "judged_run": cand.label} if rerun_of else None))
    return res


# ----------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------

def _write_error(out: Optional[str], base: Dict[str, Any], err: RunError) -> None:
    if not out or not os.path.isdir(out):
        return
    res = dict(base)
    res.update(status="error", passed=False, exit_code=EXIT_USAGE,
               error={"side": err.side, "cause": err.cause, "message": str(err).splitlines()[0], "log": err.log})
    res = C.jsonable(res)
    write_json(os.path.join(out, "result.json"), res)
    write_text(os.path.join(out, "summary.md"), summary_markdown(res))


def run_stage(args) -> int:
    """``parity run --stage forward|grad`` (see the module docstring).  Returns the exit code."""
    from rtdetr_core.config import ConfigError, load_config

    t_start = time.perf_counter()
    stage = args.stage
    base_info: Dict[str, Any] = {"schema": 1, "stage": stage}
    out: Optional[str] = None
    progress = Progress()
    try:
        if _opt(args, "out", None):      # never leave an older verdict behind, whatever fails next
            out = os.path.abspath(args.out)
            for stale in ("result.json", "summary.md"):
                p = os.path.join(out, stale)
                if os.path.isfile(p):
                    os.unlink(p)
        if stage not in STAGES:
            raise RunError(f"--stage {stage}: not handled by run_stage (forward, grad)")
        try:
            cfg = load_config(_opt(args, "config", "smoke"))
        except ConfigError as e:
            raise RunError(f"config: {e}", cause="config") from None
        dtype = _opt(args, "dtype", "both")
        device = _opt(args, "device", "cpu")
        seed = int(_opt(args, "seed", 0))
        bs = _opt(args, "batch_size", None)
        bs = cfg.train.batch_size if bs is None else int(bs)
        if bs < 1:
            raise RunError(f"--batch-size must be >= 1, got {bs}")
        if seed < 0:
            raise RunError(f"--seed must be >= 0, got {seed}")
        reference = dtype == "float32" and not _opt(args, "no_reference", False)
        share = bool(_opt(args, "share_decisions", False))
        budget64 = float(_opt(args, "float64_budget", 1800.0))
        verbose = bool(_opt(args, "verbose", False))
        keep = bool(_opt(args, "keep_arrays", False))
        timeout = _opt(args, "timeout", None) or None
        cand_backend = _opt(args, "candidate_backend", "jittor")
        fault_side = _opt(args, "fault_side", "jittor")
        try:
            thresholds = load_thresholds(_opt(args, "thresholds", None))
        except ThresholdError as e:
            raise RunError(f"thresholds: {e}", cause="thresholds") from None
        fault_specs = list(_opt(args, "inject_fault", []) or [])
        try:
            faults = parse_faults(fault_specs)
            from rtdetr_core.param_spec import param_spec
            check_faults_against_spec(faults, [e.name for e in param_spec(cfg)])
        except FaultError as e:
            raise RunError(str(e), cause="usage") from None
        base_info.update(config=cfg.name, config_digest=cfg.digest(), dtype=dtype, device=device, seed=seed,
                         batch_size=bs, reference=reference, share_decisions=share,
                         faults=fault_specs, fault_side=fault_side if fault_specs else None)

        if cand_backend not in ("jittor", "torch"):
            raise RunError(f"unknown candidate backend {cand_backend!r} (jittor; torch for a harness self-test)")
        if fault_side not in ("jittor", "torch"):
            raise RunError(f"--fault-side must be jittor or torch, got {fault_side!r}")
        pys = {"torch": resolve_python("torch", _opt(args, "torch_python", None))}
        if cand_backend == "jittor":
            pys["jittor"] = resolve_python("jittor", _opt(args, "jittor_python", None))

        out = os.path.abspath(_opt(args, "out", None) or default_out(stage, cfg.name))
        os.makedirs(out, exist_ok=True)
        base_info["out"] = out
        for stale in ("result.json", "summary.md"):     # never leave an older verdict behind
            p = os.path.join(out, stale)
            if os.path.exists(p):
                os.unlink(p)
        work = os.path.join(out, "work")
        if os.path.isdir(work):
            shutil.rmtree(work)
        os.makedirs(work)
        case_dir = os.path.join(out, "case")

        # jobs: float32 = T32 base, J32 candidate, T64 reference (with T32's decisions);
        # float64 = T64 base, J64 candidate; both = the two, where J64 and T64 take T32's
        # decisions (each still records its own, which are judged) so that the float64
        # arbiter compares the continuous tensors under one set of decisions
        dts = ("float32", "float64") if dtype == "both" else (dtype,)
        jobs: List[Job] = []
        pairs: Dict[str, Dict[str, Job]] = OrderedDict()
        for dt in dts:
            base = Job(label("torch", dt), "base", "torch", pys["torch"], dt, stage, "")
            cand = Job(label(cand_backend, dt, True, cand_backend), "cand", cand_backend, pys[cand_backend], dt,
                       stage, "")
            if dt == "float64" and dtype == "both":
                base.role, base.share_from, cand.share_from = "ref", label("torch", "float32"), label("torch", "float32")
            elif share:
                cand.share_from = base.label
            pairs[dt] = {"base": base, "cand": cand}
            if base.label not in {j.label for j in jobs}:
                jobs.append(base)
            jobs.append(cand)
        if dtype == "float32" and reference:
            ref = Job(label("torch", "float64"), "ref", "torch", pys["torch"], "float64", stage, "",
                      share_from=label("torch", "float32"))
            jobs.append(ref)
            pairs["float32"]["ref"] = ref
        if dtype == "both":
            pairs["float32"]["ref"] = pairs["float64"]["base"]
        for j in jobs:
            j.out = os.path.join(work, f"{j.label}.npz")
            if fault_specs and ((fault_side == "jittor" and j.role == "cand")
                                or (fault_side == "torch" and j.backend == "torch" and j.role != "cand")):
                j.faults = fault_specs
        labels = {dt: {r: j.label for r, j in pr.items()} for dt, pr in pairs.items()}
        base_info["labels"] = labels[dts[0]] if len(dts) == 1 else labels
        base_info["dtypes"] = list(dts)

        print(f"parity run --stage {stage}: config {cfg.name} ({cfg.digest()}), {dtype}"
              f"{' + float64 reference' if reference else ''}, batch {bs}, seed {seed}"
              f"{', shared decisions' if share else ''} -> {out}")
        if fault_specs:
            print(f"  injecting fault on the {fault_side} side: {', '.join(fault_specs)}")
        versions = preflight(jobs, verbose)
        try:
            manifest = build_case(case_dir, cfg, stage=stage, batch_size=bs, seed=seed,
                                  data_root=_opt(args, "data", None), weights_path=_opt(args, "weights", None))
        except CaseError as e:
            msg = str(e)
            raise RunError(msg, side="case", cause=msg.split(":", 1)[0] if ":" in msg else "case") from None
        base_info["case"] = {k: manifest[k] for k in ("batch_size", "image_size", "data", "weights", "dn_draws")}
        base_info["case"]["dir"] = case_dir

        order = list(jobs)
        n_total = len(order)
        skipped64 = None
        for i, j in enumerate(list(order), 1):
            if dtype == "both" and j is pairs["float64"]["cand"]:
                skipped64 = _float64_too_long(pairs["float64"]["base"], budget64)
                if skipped64:
                    progress.line(f"  {skipped64}: the verdict rests on float32 only (provisional)")
                    order.remove(j)
                    del pairs["float64"]
                    break
            run_job(j, case_dir, device, progress, i, n_total, verbose, timeout)
            _check_side(j, manifest)
            if j.role == "base" and j.dtype == dts[0]:
                write_decisions_from(j.out, os.path.join(work, f"decisions-{j.label}.npz"))
        # a candidate whose own decisions differ from the base's is run again with the base's
        # (recording its own, which are classified): the continuous tensors are judged there
        reruns = {}
        for dt, pr in pairs.items():
            cand, base = pr["cand"], pr["base"]
            if cand.share_from or decisions_agree(base.out, cand.out):
                continue
            dec = os.path.join(work, f"decisions-{base.label}.npz")
            if not os.path.exists(dec):
                write_decisions_from(base.out, dec)
            again = Job(cand.label + "s", "cand", cand.backend, cand.python, dt, stage,
                        os.path.join(work, f"{cand.label}s.npz"), share_from=base.label, faults=cand.faults)
            progress.line(f"  {cand.label}'s own decisions differ from {base.label}'s: re-running it with "
                          f"{base.label}'s decisions to measure the continuous tensors apart from the flip")
            n_total += 1
            run_job(again, case_dir, device, progress, n_total, n_total, verbose, timeout)
            _check_side(again, manifest)
            order.append(again)
            reruns[dt] = cand.label
            pr["cand"] = again

        # compare
        progress.line("  comparing ...")
        before = Case(case_dir, verify=False).weights()     # the step and BN buffers are judged on updates
        results = OrderedDict()
        for dt, pr in pairs.items():
            results[dt] = _compare_pair(stage, dt, pr, thresholds, cand_backend, before, base_info, reruns.get(dt))
        if dtype == "both" and skipped64:
            res = results["float32"]
            explain_float32(res, None, stage)
            res.update(dtype="both", float64_skipped=skipped64,
                       verdict_basis=f"float32 only, PROVISIONAL: {skipped64}")
            res["provisional"] = True
        elif dtype == "both":
            res = combine(results, base_info, stage, dtype)
        else:
            res = results[dtype]
            if dtype == "float32" and "ref" in pairs["float32"]:
                explain_float32(res, None, stage)
        res.update(thresholds_file=thresholds.path, versions={"runner": runner_versions(), **versions},
                   sides=[_side_info(j) for j in order])
        res["wall_s"] = time.perf_counter() - t_start
        res = C.jsonable(res)
        passed = bool(res["passed"])
        write_json(os.path.join(out, "result.json"), res)
        write_text(os.path.join(out, "summary.md"), summary_markdown(res))
        if not keep:
            for j in order:
                if os.path.exists(j.out):
                    os.unlink(j.out)
        print_final(res)
        return EXIT_OK if passed else EXIT_FAIL
    except RunError as e:
        print(f"parity: error: [{e.side}] {e}", file=sys.stderr)
        base_info["wall_s"] = time.perf_counter() - t_start
        try:
            _write_error(out, base_info, e)
        except OSError:
            pass
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("parity: interrupted", file=sys.stderr)
        err = RunError("interrupted by the user", cause="interrupted")
        _write_error(out, base_info, err)
        return 130
