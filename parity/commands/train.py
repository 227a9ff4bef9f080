"""``parity run --stage train``: train the same model with both backends, compare the curves.

Flow::

    runner: case folder (config, initial weights, decoded data, every epoch's streams)
        ├── T32  torch  float32   (base)        python -m parity.workers.train  (torch env)
        ├── J32  jittor float32   (candidate)   python -m parity.workers.train  (jittor env)
        └── T64  torch  float64   (reference: the float32 noise floor; --no-reference skips it)
    runner: COCO mAP of every side's saved predictions, curve metrics, thresholds -> result.json

With ``--dtype float64`` the sides are T64 (base) and J64 (candidate), no reference.

Shared streams: the runner decodes every train/val image once (``data.npz``) and draws, once,
from ``rtdetr_core`` (the official loader ``iterate_batches`` with one ``Streams(seed)`` for the
whole run), the image order of every epoch, every iteration's denoising draws and multi-scale
size (``streams/epoch_NNNN.npz``).  Both workers read the same files; each logs a digest of
what every iteration consumed and the runner checks them against the case's digests.

Run folder::

    <out>/case/                 manifest.json (plan, hashes), config.json/.yaml, weights.safetensors,
                                data.npz, streams/epoch_NNNN.npz
    <out>/<LABEL>/              one folder per side (see parity/workers/train.py): log.json,
                                eval/, checkpoints/, final.safetensors, worker.log, status.json
    <out>/result.json           curve metrics, mAP, checks, verdict, environment (parity report reads it)
    <out>/summary.md            the same for people

Exit codes: 0 pass (or a run stopped on purpose with --stop-after-epoch), 1 a threshold
failed or a side hit a non-finite loss, 2 usage or environment error.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, Optional

from parity.case.train import TRAIN_SCHEMA
from parity.commands import train_steps as steps
from parity.commands import train_ties
from parity.errors import EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, RunError
from parity.fileio import error_result, jsonable, read_json, write_json, write_text
from parity.judge import curves
from parity.judge.coco import evaluate_side
from parity.judge.thresholds import ThresholdError, load_thresholds
from parity.judge.train_checks import compare, side_checks, verdict
from parity.report.train import train_markdown
from parity.report.train_lines import error_markdown, print_summary, verdict_text
from parity.sides.jobs import Job, preflight
from parity.sides.process import Progress, run_interruptible
from parity.sides.train import kill_side


# the options of this stage beyond the shared ones (parity/cli/args.py): their defaults here,
# None on the command line (so that an option given on --resume is known to be given)
RUN_GROUPS = ("faults", "reference", "ranks")
RUN_DEFAULTS = {"epochs": None, "limit_images": None, "limit_val": None, "resume": None, "lr": None,
                "stop_after_epoch": None, "sequential": False, **steps.DEFAULTS}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--epochs", type=int, help="train: epochs (default: the config's train.epochs)")
    add("--limit-images", type=int, metavar="N", help="train: train on the first N images of the train split "
                                                      "(dataset order)")
    add("--limit-val", type=int, metavar="N", help="train: COCO mAP on the first N images of the val split "
                                                   "(default: all)")
    add("--eval-every", type=int, metavar="N",
        help="train: COCO mAP every N epochs (always after the last; EMA model if enabled)")
    add("--checkpoint-every", type=int, metavar="N",
        help="train: checkpoint every N epochs (weights, optimizer/EMA state, stream states, log)")
    add("--keep-checkpoints", type=int, metavar="K", help="train: keep the newest K checkpoints per side "
                                                          "(0: all; default 2)")
    add("--resume", metavar="RUN_DIR",
        help="train: continue RUN_DIR from each side's newest checkpoint (same curve as uninterrupted)")
    add("--lr", type=float, help="train: base learning rate; groups with their own lr are scaled by the same factor")
    add("--stop-after-epoch", type=int, metavar="N",
        help="train: stop after epoch N (with a checkpoint), as if interrupted; continue with --resume")
    add("--threads", type=int, metavar="N",
        help="train: CPU threads per side (torch intra-op threads, Jittor OMP_NUM_THREADS; default 1)")
    add("--backend", choices=["both", "torch", "jittor"], help="train: run both backends (default) or one "
                                                                "(no comparison)")
    add("--sequential", action="store_true", default=None,
        help="train: run the sides one after another instead of concurrently")


def run(args: argparse.Namespace) -> int:
    """``parity run --stage train`` (see the module docstring).  Returns the exit code."""
    return run_interruptible(_run, args)


def _run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    progress = Progress()
    base_info: Dict[str, Any] = {"schema": TRAIN_SCHEMA, "stage": "train"}
    run: Optional[steps.TrainRun] = None
    try:
        run = steps.read_options(args)
        thresholds, max_tie_rows = load_rules(args)
        (steps.plan_resumed if opt_resume(args) else steps.plan_fresh)(run, args)
        steps.make_sides(run, args)
        base_info.update(describe(run))
        announce(run)
        versions = preflight([Job(s.label, s.role, s.backend, s.python, s.dtype, "train", "") for s in run.sides],
                             run.verbose)
        steps.write_case(run, args, progress)
        base_info.update(plan=run.plan, data=run.manifest["data"], weights=run.manifest["weights"])
        steps.run_sides(run, progress)
        progress.line("  evaluating and comparing ...")
        res, code, inputs_ok = judge_run(run, thresholds, max_tie_rows, base_info, versions)
        res, code = train_ties.settle(run, thresholds, res, code,
                                      lambda: judge_run(run, thresholds, max_tie_rows, base_info, versions), progress)
        finish(run, args, res, t_start)
        for lab, ok in inputs_ok.items():
            if not ok:
                print(f"  WARNING: {lab} did not consume the case's streams", file=sys.stderr)
        return code
    except RunError as e:
        print(f"parity: error: [{e.side}] {e}", file=sys.stderr)
        _write_error(run.out if run else None, base_info, e, t_start)
        return EXIT_USAGE
    except KeyboardInterrupt:
        for s in (run.sides if run else []):
            kill_side(s)
        print("parity: interrupted", file=sys.stderr)
        _write_error(run.out if run else None, base_info, RunError("interrupted by the user", cause="interrupted"),
                     t_start)
        return EXIT_INTERRUPTED


def opt_resume(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "resume", None))


def load_rules(args: argparse.Namespace):
    """The train section of the thresholds file, and the eval stage's tie pairing (one number)."""
    try:
        tfile = load_thresholds(getattr(args, "thresholds", None), stage_tables=False)
        return tfile.train(), int(tfile.section("eval")["max_tie_rows"])
    except ThresholdError as e:
        raise RunError(f"thresholds: {e}", cause="thresholds") from None


def describe(run: "steps.TrainRun") -> Dict[str, Any]:
    cfg = run.cfg
    return dict(config=cfg.name, config_digest=cfg.digest(), dtype=run.dtype, device=run.device, seed=run.seed,
                out=run.out, labels={s.role: s.label for s in run.sides}, plan=run.plan, threads=run.threads,
                sequential=run.sequential, faults=run.faults, fault_side=run.fault_side if run.faults else None,
                nproc=run.nproc)


def announce(run: "steps.TrainRun") -> None:
    cfg, plan = run.cfg, run.plan
    print(f"parity run --stage train: config {cfg.name} ({cfg.digest()}), {run.dtype}"
          f"{' + float64 reference' if run.reference else ''}, {plan['epochs']} epochs, batch {cfg.train.batch_size}, "
          f"seed {run.seed}, sides {', '.join(s.label for s in run.sides)}{' (resume)' if run.resumed else ''}"
          f"{f', {run.nproc} ranks per side' if run.nproc > 1 else ''} "
          f"-> {run.out}", flush=True)


def judge_run(run: "steps.TrainRun", thresholds, max_tie_rows: int, base_info: Dict[str, Any],
              versions: Dict[str, Any]):
    """Every side's log, mAP and checks -> ``(result, exit code, inputs_ok)``."""
    sides, manifest, cfg = run.sides, run.manifest, run.cfg
    logs = {s.label: read_json(os.path.join(s.dir, "log.json")) for s in sides}
    maps = {s.label: evaluate_side(s.dir, manifest, cfg) for s in sides}
    cmp_ = compare(run.out, sides, logs, maps, cfg, thresholds, run.plan, max_tie_rows)
    statuses = {s.label: logs[s.label].get("status") for s in sides}
    nonfinite = {lab: logs[lab]["nonfinite"] for lab in logs if logs[lab].get("nonfinite")}
    inputs_ok, checks = side_checks(sides, logs, manifest["streams"]["batch_digests"])
    checks += steps.shard_checks(run, logs)
    cb = cmp_.get("cand_base")
    if cb is not None:
        checks += curves.judge(cb, thresholds.for_dtype(run.dtype), cmp_.get("base_ref"))
    status, passed = verdict(checks, statuses, compared=cb is not None)
    code = EXIT_OK if status == "stopped" or passed else EXIT_FAIL
    res = dict(base_info)
    res.update(status=status, passed=passed if status != "stopped" else None, exit_code=code,
               sides=[steps.side_summary(s, logs[s.label]) for s in sides],
               map={lab: {str(k): v for k, v in m.items()} for lab, m in maps.items()},
               inputs_identical=inputs_ok, nonfinite=nonfinite, checks=checks, metrics=cmp_,
               thresholds_file=thresholds.path, thresholds={"lockstep_rel": thresholds.lockstep_rel,
                                                            "final_window": thresholds.window,
                                                            **{c: r.to_dict() for c, r in
                                                               thresholds.for_dtype(run.dtype).items()}},
               env=steps.environment(versions, logs),
               streams={"epochs": manifest["streams"]["epochs"], "dn_batches": manifest["streams"]["dn_batches"],
                        "multi_scale": manifest["streams"]["multi_scale"]})
    return res, code, inputs_ok


def finish(run: "steps.TrainRun", args: argparse.Namespace, res: Dict[str, Any], t_start: float) -> None:
    """Wall times, the reproducing command and the verdict line; result.json, summary.md, the terminal."""
    old = run.old
    res["wall_s"] = time.perf_counter() - t_start
    prev_total = float(old.get("wall_s_total", old.get("wall_s", 0.0)) or 0.0) if run.resumed else 0.0
    res["wall_s_total"] = prev_total + res["wall_s"]
    res["invocations"] = (int(old.get("invocations", 1)) if run.resumed else 0) + 1
    res["command"] = steps.command_of(args, run.plan, run.out, resumed=run.resumed)
    res["verdict"] = verdict_text(res)
    res = jsonable(res)
    write_json(os.path.join(run.out, "result.json"), res)
    try:
        write_text(os.path.join(run.out, "summary.md"), train_markdown(res, run.out, images=None))
    except ImportError:       # pandas missing: result.json is the verdict, summary.md only its rendering
        pass
    print_summary(res)


def _write_error(out: Optional[str], base: Dict[str, Any], err: RunError, t_start: float) -> None:
    if not out or not os.path.isdir(out):
        return
    message = str(err).splitlines()[0]
    res = error_result(base, {"side": err.side, "cause": err.cause, "message": message, "log": err.log},
                       wall_s=time.perf_counter() - t_start)
    try:
        write_json(os.path.join(out, "result.json"), res)
        write_text(os.path.join(out, "summary.md"), error_markdown(err.side, err.cause, message))
    except OSError:
        pass
