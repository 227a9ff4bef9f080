"""``parity run --stage forward|grad``: build a case, run one worker per backend, compare.

Flow (float32, the default)::

    case folder  ->  torch float32 (base)  ->  jittor float32 (candidate)  ->  torch float64 (reference)
                                  \\-- top-k + matches --> reference (always) and candidate (--share-decisions)

With ``--dtype float64`` there is no reference (torch float64 is the base).  Each worker runs
in its own environment's interpreter (``python -m parity.workers.forward``, see parity/worker.py for
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

import argparse
import os
import shutil
import sys
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional

from parity.case.contract import write_decisions_from
from parity.case.faults import FaultError, check_faults_against_spec, parse_faults
from parity.case.folder import Case, CaseError, build_case
from parity.commands.options import opt
from parity.errors import EXIT_FAIL, EXIT_OK, EXIT_USAGE, RunError
from parity.facts import runner_versions
from parity.fileio import default_out, error_result, jsonable, write_json, write_text
from parity.judge.run_compare import build_result, compare_results, decisions_agree
from parity.judge.run_verdict import combine, explain_float32
from parity.judge.thresholds import ThresholdError, load_thresholds
from parity.report.forward import print_final, summary_markdown
from parity.sides.jobs import Job, STAGES, label, preflight, run_job
from parity.sides.process import Progress, resolve_python


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


# the options of this stage beyond the shared ones (parity/cli/args.py)
RUN_GROUPS = ("faults", "reference")
RUN_DEFAULTS = {"share_decisions": False, "float64_budget": 1800.0, "keep_arrays": False, "candidate_backend": "jittor"}


def add_run_arguments(rp: argparse.ArgumentParser) -> None:
    rp.add_argument("--share-decisions", action="store_true", default=None,
                    help="feed PyTorch's top-k selection and matches to the Jittor side")
    rp.add_argument("--float64-budget", type=float, metavar="SECONDS",
                    help="--dtype both: skip the Jittor float64 run when its estimate exceeds this; the "
                         "verdict is then float32 only and provisional (default 1800; 0 = never skip)")
    rp.add_argument("--keep-arrays", action="store_true", default=None,
                    help="keep the workers' result arrays (<out>/work/*.npz) after comparing")
    # harness self-test: compare torch against torch (expects exact agreement)
    rp.add_argument("--candidate-backend", choices=["jittor", "torch"], help=argparse.SUPPRESS)


# Jittor float64 / PyTorch float64 wall time, worst measured on CPU (parity-r50vd grad at
# 640, batch 2: J64 2134 s vs T64 165 s; smoke: 2.8x; r18vd: ~6x): Jittor has no float64 GEMM
# on CPU and its float64 convolutions are generated loops.
J64_OVER_T64 = 13.0


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
    res = error_result(base, {"side": err.side, "cause": err.cause, "message": str(err).splitlines()[0],
                              "log": err.log})
    write_json(os.path.join(out, "result.json"), res)
    write_text(os.path.join(out, "summary.md"), summary_markdown(res))


def run(args) -> int:
    """``parity run --stage forward|grad`` (see the module docstring).  Returns the exit code."""
    from rtdetr_core.config import ConfigError, load_config

    t_start = time.perf_counter()
    stage = args.stage
    base_info: Dict[str, Any] = {"schema": 1, "stage": stage}
    out: Optional[str] = None
    progress = Progress()
    try:
        if opt(args, "out", None):      # never leave an older verdict behind, whatever fails next
            out = os.path.abspath(args.out)
            for stale in ("result.json", "summary.md"):
                p = os.path.join(out, stale)
                if os.path.isfile(p):
                    os.unlink(p)
        if stage not in STAGES:
            raise RunError(f"--stage {stage}: not handled by parity.commands.forward (forward, grad)")
        try:
            cfg = load_config(opt(args, "config", "smoke"))
        except ConfigError as e:
            raise RunError(f"config: {e}", cause="config") from None
        dtype = opt(args, "dtype", "both")
        device = opt(args, "device", "cpu")
        seed = int(opt(args, "seed", 0))
        bs = opt(args, "batch_size", None)
        bs = cfg.train.batch_size if bs is None else int(bs)
        if bs < 1:
            raise RunError(f"--batch-size must be >= 1, got {bs}")
        if seed < 0:
            raise RunError(f"--seed must be >= 0, got {seed}")
        reference = dtype == "float32" and not opt(args, "no_reference", False)
        share = bool(opt(args, "share_decisions", False))
        budget64 = float(opt(args, "float64_budget", 1800.0))
        verbose = bool(opt(args, "verbose", False))
        keep = bool(opt(args, "keep_arrays", False))
        timeout = opt(args, "timeout", None) or None
        cand_backend = opt(args, "candidate_backend", "jittor")
        fault_side = opt(args, "fault_side", "jittor")
        try:
            thresholds = load_thresholds(opt(args, "thresholds", None))
        except ThresholdError as e:
            raise RunError(f"thresholds: {e}", cause="thresholds") from None
        fault_specs = list(opt(args, "inject_fault", []) or [])
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
        pys = {"torch": resolve_python("torch", opt(args, "torch_python", None))}
        if cand_backend == "jittor":
            pys["jittor"] = resolve_python("jittor", opt(args, "jittor_python", None))

        out = os.path.abspath(opt(args, "out", None) or default_out(stage, cfg.name))
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
                                  data_root=opt(args, "data", None), weights_path=opt(args, "weights", None))
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
        res = jsonable(res)
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
