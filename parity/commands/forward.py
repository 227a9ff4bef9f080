"""``parity run --stage forward|grad``: build a case, run one worker per backend, compare.

Flow (float32, the default)::

    case folder  ->  torch float32 (base)  ->  jittor float32 (candidate)  ->  torch float64 (reference)
                                  \\-- top-k + matches --> reference (always) and candidate (--share-decisions)

With ``--dtype float64`` there is no reference (torch float64 is the base).  Each worker runs
in its own environment's interpreter (``python -m parity.workers.forward``, see parity/workers/forward.py
for the protocol); everything is exchanged through files under ``--out``::

    <out>/case/            the case folder (parity/case/folder.py)
    <out>/work/<X>.npz     worker results (X = T32, T64, J32, J64), deleted after the
                           comparison unless --keep-arrays; <X>.log holds the worker's output
    <out>/result.json      every tensor's errors, rule and verdict; groups; first divergence
    <out>/summary.md       the same for people

Exit codes: 0 every check passed, 1 a threshold failed, 2 usage or environment error
(missing environment, corrupt weights, config mismatch between the sides, a backend crash).
On exit 2 ``result.json`` says ``"status": "error"`` (never a pass).

The steps are in parity/commands/forward_steps.py; the worker processes live in
parity/sides/jobs.py, the comparisons in parity/judge/run_compare.py (decisions classified by
parity/judge/decisions.py), the --dtype both verdict in parity/judge/run_verdict.py, what is
printed and written for people in parity/report/forward.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, Optional

from parity.commands import forward_steps as steps
from parity.commands import grad_ranks
from parity.commands.options import opt
from parity.errors import EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, RunError
from parity.fileio import error_result, write_json, write_text
from parity.report.forward import summary_markdown
from parity.sides.jobs import preflight
from parity.sides.process import Progress

# the options of this stage beyond the shared ones (parity/cli/args.py)
RUN_GROUPS = ("faults", "reference", "ranks")
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


def run(args) -> int:
    """``parity run --stage forward|grad`` (see the module docstring).  Returns the exit code."""
    if int(opt(args, "nproc", 1) or 1) != 1:
        return grad_ranks.run(args)        # the N-process flow (its own jobs and verdict)
    t_start = time.perf_counter()
    base_info: Dict[str, Any] = {"schema": 1, "stage": args.stage}
    out: Optional[str] = None
    progress = Progress()
    try:
        out = steps.clear_old_verdict(opt(args, "out", None))   # whatever fails next
        fr = steps.read_options(args, base_info)
        out = steps.prepare_out(fr, args, base_info)
        steps.plan_jobs(fr, base_info)
        steps.announce(fr)
        versions = preflight(fr.jobs, fr.verbose)
        steps.write_case(fr, args, base_info)
        steps.run_jobs(fr, progress)
        steps.rerun_decision_flips(fr, progress)
        progress.line("  comparing ...")
        res = steps.judge(fr, base_info)
        res = steps.finish(fr, res, versions, t_start)
        return EXIT_OK if res["passed"] else EXIT_FAIL
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
        _write_error(out, base_info, RunError("interrupted by the user", cause="interrupted"))
        return EXIT_INTERRUPTED


def _write_error(out: Optional[str], base: Dict[str, Any], err: RunError) -> None:
    if not out or not os.path.isdir(out):
        return
    res = error_result(base, {"side": err.side, "cause": err.cause, "message": str(err).splitlines()[0],
                              "log": err.log})
    write_json(os.path.join(out, "result.json"), res)
    write_text(os.path.join(out, "summary.md"), summary_markdown(res))
