"""``parity run --stage grad --nproc N``: one training step of each side as N data-parallel
processes on its own engine (torchrun + DistributedDataParallel for PyTorch, mpirun + Jittor
MPI for Jittor), compared rank by rank, and each side checked against itself on one process.

Flow (float64: the engine check's arbiter)::

    case folder (global batch B, B % N == 0)
      T64 x N ranks (torchrun)   J64 x N ranks (mpirun)      each rank: its B/N images
      T64 x 1 process            J64 x 1 process             the same global batch

    J vs T, rank by rank         exactly as the one-process grad stage compares J64 with T64
    engine check, per side       N ranks vs 1 process (parity/judge/ranks.py): shards,
                                 ranks agree, losses, gradients, the step

Files: ``<out>/work/<X>.rank<r>.npz`` per rank, ``<out>/work/<X>1.npz`` for the one-process
runs, ``result.json`` and ``summary.md``.  Exit codes as every stage: 0 pass, 1 a check
failed, 2 usage or environment error (no mpirun, a batch that does not split, a crash).
"""
from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from typing import Any, Dict, List

from parity.case.folder import Case
from parity.case.shards import expected_digests
from parity.commands import forward_steps as steps
from parity.commands.options import opt
from parity.errors import EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, RunError
from parity.facts import runner_versions
from parity.fileio import error_result, jsonable, write_json, write_text
from parity.judge.ranks import engine_check, summary_lines
from parity.judge.run_compare import compare_results, pair_result
from parity.report.ranks import ranks_markdown
from parity.sides.jobs import Job, preflight, run_job
from parity.sides.launch import find_mpirun
from parity.sides.process import Progress


def check_options(fr, nproc: int) -> None:
    """What an N-rank grad run takes (one-line usage errors)."""
    if fr.stage != "grad":
        raise RunError(f"--nproc is for --stage grad and --stage train, not --stage {fr.stage}", cause="usage")
    if fr.dtype != "float64":
        raise RunError(f"--stage grad --nproc runs in float64 (the engine check's arbiter: N ranks must equal one "
                       f"process to ~1e-12), got --dtype {fr.dtype}; float32 at N ranks: --stage train --nproc",
                       cause="usage")
    if fr.share:
        raise RunError("--share-decisions is not taken with --nproc (each rank makes its own decisions)",
                       cause="usage")
    if fr.cand_backend != "jittor":
        raise RunError("--nproc compares jittor with torch", cause="usage")
    if fr.bs % nproc:
        raise RunError(f"--batch-size {fr.bs} does not split over --nproc {nproc} (each rank takes batch / nproc "
                       f"images: use a multiple of {nproc})", cause="usage")


def plan(fr, nproc: int) -> Dict[str, Job]:
    pys, work = fr.pys, fr.work
    jobs = OrderedDict()
    jobs["T64"] = Job("T64", "base", "torch", pys["torch"], "float64", "grad", os.path.join(work, "T64.npz"),
                      nproc=nproc)
    jobs["J64"] = Job("J64", "cand", "jittor", pys["jittor"], "float64", "grad", os.path.join(work, "J64.npz"),
                      nproc=nproc, faults=fr.fault_specs if fr.fault_side == "jittor" else [])
    jobs["T64_1"] = Job("T64_1", "one", "torch", pys["torch"], "float64", "grad", os.path.join(work, "T64_1.npz"))
    jobs["J64_1"] = Job("J64_1", "one", "jittor", pys["jittor"], "float64", "grad", os.path.join(work, "J64_1.npz"))
    if fr.fault_specs and fr.fault_side == "torch":
        jobs["T64"].faults = fr.fault_specs
    fr.jobs = list(jobs.values())
    return jobs


def compare_ranks(fr, jobs: Dict[str, Job], nproc: int, before) -> List[Dict[str, Any]]:
    """J64 rank r against T64 rank r, with the one-process grad stage's comparison (``before``:
    the case's weights, the step's starting point)."""
    out = []
    t, j = jobs["T64"], jobs["J64"]
    for r in range(nproc):
        cmpd = compare_results("grad", "float64", t.outs[r], j.outs[r], None, fr.thresholds,
                               cand_shared=j.rank_meta[r].get("decisions_injected", {}), cand_side="jittor",
                               before=before)
        if not cmpd["entries"]:
            raise RunError(f"nothing to compare on rank {r}", side="torch", cause="protocol")
        res = pair_result("grad", "float64", cmpd, {"cand": f"J64 rank {r}", "base": f"T64 rank {r}"},
                          fr.thresholds, {"rank": r}, None)
        out.append(res)
    return out


def run(args) -> int:
    t_start = time.perf_counter()
    nproc = int(opt(args, "nproc", 1))
    base_info: Dict[str, Any] = {"schema": 1, "stage": "grad", "nproc": nproc}
    out = None
    progress = Progress()
    try:
        out = steps.clear_old_verdict(opt(args, "out", None))
        fr = steps.read_options(args, base_info)
        check_options(fr, nproc)
        find_mpirun()
        out = steps.prepare_out(fr, args, base_info)
        jobs = plan(fr, nproc)
        base_info["labels"] = {"base": "T64", "cand": "J64", "one": ["T64_1", "J64_1"]}
        print(f"parity run --stage grad --nproc {nproc}: config {fr.cfg.name} ({fr.cfg.digest()}), float64, "
              f"global batch {fr.bs} ({fr.bs // nproc} per rank), seed {fr.seed} -> {fr.out}")
        if fr.fault_specs:
            print(f"  injecting fault on the {fr.fault_side} side: {', '.join(fr.fault_specs)}")
        versions = preflight(fr.jobs, fr.verbose)
        steps.write_case(fr, args, base_info)
        for i, job in enumerate(fr.jobs, 1):
            run_job(job, fr.case_dir, fr.device, progress, i, len(fr.jobs), fr.verbose, fr.timeout)
            steps.check_side(job, fr.manifest)
        fr.order = list(fr.jobs)
        progress.line("  comparing ...")
        case = Case(fr.case_dir, verify=False)
        images, targets = case.inputs()
        digests = expected_digests(images, targets, case.dn_draws(), nproc)
        rules = fr.thresholds.section("ranks")
        engines = OrderedDict((side, engine_check(jobs[side].outs, jobs[side + "_1"].out, digests, rules, side))
                              for side in ("T64", "J64"))
        per_rank = compare_ranks(fr, jobs, nproc, case.weights())
        res = finish(fr, base_info, engines, per_rank, versions, t_start)
        return EXIT_OK if res["passed"] else EXIT_FAIL
    except RunError as e:
        print(f"parity: error: [{e.side}] {e}", file=sys.stderr)
        base_info["wall_s"] = time.perf_counter() - t_start
        if out and os.path.isdir(out):
            write_json(os.path.join(out, "result.json"), error_result(base_info, {
                "side": e.side, "cause": e.cause, "message": str(e).splitlines()[0], "log": e.log}))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("parity: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def finish(fr, base_info, engines, per_rank, versions, t_start) -> Dict[str, Any]:
    passed = all(e["passed"] for e in engines.values()) and all(r["passed"] for r in per_rank)
    failing = [f"{lab} engine: {c['check']}" for lab, e in engines.items() for c in e["checks"] if not c["passed"]]
    failing += [f"rank {r['rank']}: {r['first_divergence']['name'] if r.get('first_divergence') else 'J64 vs T64'}"
                for r in per_rank if not r["passed"]]
    res = dict(base_info)
    res.update(status="pass" if passed else "fail", passed=passed, exit_code=EXIT_OK if passed else EXIT_FAIL,
               failing=failing, engine=engines,
               ranks=[{k: r.get(k) for k in ("rank", "passed", "groups", "first_divergence", "warnings")}
                      for r in per_rank],
               tensors={f"rank{r['rank']}": r["tensors"] for r in per_rank},
               thresholds_file=fr.thresholds.path, rank_thresholds=fr.thresholds.section("ranks"),
               versions={"runner": runner_versions(), **versions},
               sides=[{"label": j.label, "backend": j.backend, "nproc": j.nproc, "wall_s": j.wall,
                       "peak_rss_mb": [m.get("peak_rss_mb") for m in (j.rank_meta or [j.meta])]} for j in fr.order],
               wall_s=time.perf_counter() - t_start)
    res = jsonable(res)
    write_json(os.path.join(fr.out, "result.json"), res)
    write_text(os.path.join(fr.out, "summary.md"), ranks_markdown(res))
    if not fr.keep:
        for j in fr.order:
            for o in j.outs:
                if os.path.exists(o):
                    os.unlink(o)
    for lab, e in engines.items():
        print(f"  {lab} at {e['nproc']} ranks vs 1 process:")
        print("\n".join(summary_lines(e["checks"])))
    for r in per_rank:
        g = r["groups"]
        print(f"  J64 vs T64, rank {r['rank']}: {'PASS' if r['passed'] else 'FAIL'} ("
              + ", ".join(f"{k} {v['n'] - v['failed']}/{v['n']}" for k, v in g.items()) + ")")
    verdict = "PASS" if passed else "FAIL: " + "; ".join(failing)
    print(f"  {verdict}  ({res['wall_s']:.1f}s)\n  result: {os.path.join(fr.out, 'result.json')}")
    return res
