"""The named steps of ``parity run --stage train`` (the flow is in parity/commands/train.py):
the options, the plan of a fresh or a resumed run (an option that contradicts the resumed
run is refused), the sides, the case, running the sides, and the result."""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from rtdetr_core.config import ConfigError, config_from_dict, load_config

from parity.case.shards import expected_train_digests
from parity.case.train import build_train_case, write_streams
from parity.commands.options import given, opt
from parity.errors import RunError
from parity.facts import git_describe, host_info, runner_versions
from parity.fileio import default_out, read_json, write_json
from parity.judge.ranks import train_rank_checks
from parity.sides.process import resolve_python
from parity.sides.train import Side, check_side, kill_side, start_side, wait_sides

# the defaults of the train stage's own options (None on the command line: not given)
DEFAULTS = {"eval_every": 0, "checkpoint_every": 0, "keep_checkpoints": 2, "threads": 1, "backend": "both"}


@dataclass
class TrainRun:
    """What one invocation runs: the options, the config and the plan, where, and its sides."""
    device: str
    threads: int
    verbose: bool
    timeout: Optional[float]
    stop_after: Optional[int]
    which: str
    backends: List[str]
    faults: List[str]
    fault_side: str
    sequential: bool
    dtype: str = "float32"
    reference: bool = True
    nproc: int = 1                        # data-parallel ranks per side (torchrun / mpirun)
    cfg: Any = None
    plan: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    out: Optional[str] = None
    case_dir: str = ""
    manifest: Optional[Dict[str, Any]] = None
    old: Dict[str, Any] = field(default_factory=dict)      # the resumed run's result.json
    resumed: bool = False
    sides: List[Side] = field(default_factory=list)


def read_options(args: argparse.Namespace) -> TrainRun:
    which = opt(args, "backend", DEFAULTS["backend"])
    backends = ["torch", "jittor"] if which == "both" else [which]
    dtype = opt(args, "dtype", "float32")
    run = TrainRun(device=opt(args, "device", "cpu"), threads=int(opt(args, "threads", DEFAULTS["threads"])),
                   verbose=bool(opt(args, "verbose", False)), timeout=opt(args, "timeout", None) or None,
                   stop_after=opt(args, "stop_after_epoch", None), which=which, backends=backends,
                   faults=list(opt(args, "inject_fault", []) or []), fault_side=opt(args, "fault_side", "jittor"),
                   sequential=bool(opt(args, "sequential", False)), dtype=dtype,
                   reference=dtype == "float32" and not opt(args, "no_reference", False) and "torch" in backends)
    run.nproc = int(opt(args, "nproc", 1) or 1)
    if run.nproc < 1:
        raise RunError(f"--nproc must be >= 1, got {run.nproc}")
    for n, k in (("--threads", "threads"), ("--eval-every", "eval_every"), ("--checkpoint-every", "checkpoint_every"),
                 ("--keep-checkpoints", "keep_checkpoints")):
        v = opt(args, k, DEFAULTS[k])
        if int(v) < 0:
            raise RunError(f"{n} must be >= 0, got {v}")
    return run


# ----------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------

def apply_overrides(cfg, lr: Optional[float], batch_size: Optional[int]):
    """--lr: the optimizer's base lr becomes ``lr``; groups with an explicit lr (the backbone's)
    keep their ratio to it.  --batch-size: ``train.batch_size``."""
    if lr is not None:
        if not (lr > 0 and math.isfinite(lr)):
            raise RunError(f"--lr must be a positive number, got {lr}")
        f = lr / cfg.optimizer.lr
        cfg.optimizer.lr = float(lr)
        for g in cfg.optimizer.groups:
            if g.lr is not None:
                g.lr = float(g.lr * f)
    if batch_size is not None:
        if batch_size < 1:
            raise RunError(f"--batch-size must be >= 1, got {batch_size}")
        cfg.train.batch_size = int(batch_size)
    return cfg


def plan_fresh(run: TrainRun, args: argparse.Namespace) -> None:
    try:
        cfg = load_config(opt(args, "config", "smoke"))
    except ConfigError as e:
        raise RunError(f"config: {e}", cause="config") from None
    cfg = apply_overrides(cfg, opt(args, "lr", None), opt(args, "batch_size", None))
    seed = int(opt(args, "seed", 0))
    if seed < 0:
        raise RunError(f"--seed must be >= 0, got {seed}")
    epochs = int(opt(args, "epochs", cfg.train.epochs))
    if epochs < 1:
        raise RunError(f"--epochs must be >= 1, got {epochs}")
    for n in ("limit_images", "limit_val"):
        v = opt(args, n, None)
        if v is not None and v < 1:
            raise RunError(f"--{n.replace('_', '-')} must be >= 1, got {v}")
    run.cfg, run.seed = cfg, seed
    run.plan = {"epochs": epochs, "batch_size": cfg.train.batch_size, "eval_batch_size": cfg.train.batch_size,
                "eval_every": int(opt(args, "eval_every", DEFAULTS["eval_every"])),
                "checkpoint_every": int(opt(args, "checkpoint_every", DEFAULTS["checkpoint_every"])),
                "keep_checkpoints": int(opt(args, "keep_checkpoints", DEFAULTS["keep_checkpoints"])),
                "lr": cfg.optimizer.lr, "lr_override": opt(args, "lr", None),
                "group_lrs": [g.lr for g in cfg.optimizer.groups],
                "lr_milestones": list(cfg.train.lr_milestones), "lr_gamma": cfg.train.lr_gamma,
                "limit_images": opt(args, "limit_images", None), "limit_val": opt(args, "limit_val", None),
                "image_size": list(cfg.train.image_size), "multi_scale": cfg.train.multi_scale,
                "ema": cfg.ema.enabled, "clip_max_norm": cfg.optimizer.clip_max_norm,
                "dtype": run.dtype, "reference": run.reference, "backends": run.backends, "seed": seed,
                "config": str(opt(args, "config", "smoke")), "nproc": run.nproc}
    run.out = os.path.abspath(opt(args, "out", None) or default_out("train", cfg.name))
    run.case_dir = os.path.join(run.out, "case")


def plan_resumed(run: TrainRun, args: argparse.Namespace) -> None:
    resume_dir = args.resume
    run.resumed = True
    out = os.path.abspath(resume_dir)      # run.out only once the resume is accepted: a refused
    run.case_dir = os.path.join(out, "case")
    mpath = os.path.join(run.case_dir, "manifest.json")
    if not os.path.isfile(mpath):
        raise RunError(f"--resume {resume_dir}: not a train run folder (no case/manifest.json)")
    if opt(args, "out", None) and os.path.abspath(args.out) != out:
        raise RunError("--resume continues the run in its own folder: do not give a different --out")
    run.manifest = read_json(mpath)
    try:
        run.cfg = config_from_dict(read_json(os.path.join(run.case_dir, "config.json")))
    except ConfigError as e:
        raise RunError(f"--resume: {e}", cause="config") from None
    plan = run.plan = run.manifest["plan"]
    run.seed = int(run.manifest["seed"])
    res = os.path.join(out, "result.json")
    run.old = read_json(res) if os.path.isfile(res) else {}
    refuse_contradictions(run, args)       # resume leaves the run's result.json as it was
    run.out = out
    run.dtype = run.old.get("dtype", plan.get("dtype", run.dtype))
    run.reference = plan.get("reference", run.reference) if run.which == "both" else run.reference
    if opt(args, "epochs", None) is not None:
        plan["epochs"] = int(args.epochs)
    for k in ("eval_every", "checkpoint_every", "keep_checkpoints"):
        if given(args, k):                 # an explicit value is honoured, whatever it is
            plan[k] = int(getattr(args, k))
        elif k not in plan:
            plan[k] = DEFAULTS[k]
    run.backends = plan.get("backends", run.backends) if run.which == "both" else run.backends
    run.nproc = int(plan.get("nproc", 1))


def refuse_contradictions(run: TrainRun, args: argparse.Namespace) -> None:
    """An option given on --resume that contradicts the run is refused (one line), never ignored:
    the settings that define the curve cannot change."""
    plan, cfg = run.plan, run.cfg
    fixed = {"--lr": (opt(args, "lr", None), plan.get("lr_override")),
             "--batch-size": (opt(args, "batch_size", None), cfg.train.batch_size),
             "--limit-images": (opt(args, "limit_images", None), plan.get("limit_images")),
             "--limit-val": (opt(args, "limit_val", None), plan.get("limit_val")),
             "--weights": (opt(args, "weights", None), None), "--data": (opt(args, "data", None), None)}
    for flag, (v, have) in fixed.items():
        if v is not None and v != have:
            raise RunError(f"--resume: {flag} {v} differs from the run's ({have}); the curve would change")
    if given(args, "nproc") and int(args.nproc) != int(plan.get("nproc", 1)):
        raise RunError(f"--resume: --nproc {args.nproc} differs from the run's ({plan.get('nproc', 1)})")
    if given(args, "seed") and int(args.seed) != run.seed:
        raise RunError(f"--resume: --seed {args.seed} differs from the run's seed {run.seed}")
    run_dtype = run.old.get("dtype", plan.get("dtype", "float32"))
    if given(args, "dtype") and args.dtype != run_dtype:
        raise RunError(f"--resume: --dtype {args.dtype} differs from the run's ({run_dtype})")
    if given(args, "config") and str(args.config) not in (plan.get("config"), cfg.name):
        raise RunError(f"--resume: --config {args.config} differs from the run's ({plan.get('config') or cfg.name})")
    if given(args, "no_reference") and args.no_reference and run.which == "both" and plan.get("reference"):
        raise RunError("--resume: --no-reference, but the run has the float64 reference side (T64)")


def command_of(args: argparse.Namespace, plan: Dict[str, Any], out: str, resumed: bool = False) -> List[str]:
    """The command that reproduces this run (a resumed run: the fresh-run equivalent)."""
    cmd = ["parity", "run", "--stage", "train", "--config", str(opt(args, "config", "smoke")) if not resumed
           else str(plan.get("config") or opt(args, "config", "smoke")),
           "--dtype", plan.get("dtype", "float32"), "--device", str(opt(args, "device", "cpu")),
           "--seed", str(plan.get("seed", 0)), "--epochs", str(plan["epochs"]), "--batch-size", str(plan["batch_size"])]
    for flag, key in (("--limit-images", "limit_images"), ("--limit-val", "limit_val"), ("--lr", "lr_override")):
        if plan.get(key) is not None:
            cmd += [flag, str(plan[key])]
    for flag, key in (("--eval-every", "eval_every"), ("--checkpoint-every", "checkpoint_every")):
        if plan.get(key):
            cmd += [flag, str(plan[key])]
    cmd += ["--threads", str(opt(args, "threads", DEFAULTS["threads"]))]
    if int(plan.get("nproc", 1)) > 1:
        cmd += ["--nproc", str(plan["nproc"])]
    if plan.get("backends") and len(plan["backends"]) == 1:
        cmd += ["--backend", plan["backends"][0]]
    if plan.get("dtype", "float32") == "float32" and not plan.get("reference", True):
        cmd.append("--no-reference")
    if opt(args, "data", None):
        cmd += ["--data", args.data]
    if opt(args, "weights", None):
        cmd += ["--weights", args.weights]
    cmd += ["--out", out]
    return cmd


# ----------------------------------------------------------------------------------------
# sides, case, running
# ----------------------------------------------------------------------------------------

def side_labels(dtype: str, backends: Sequence[str], reference: bool) -> List[Dict[str, str]]:
    bits = "32" if dtype == "float32" else "64"
    sides = []
    if "torch" in backends:
        sides.append({"label": "T" + bits, "role": "base", "backend": "torch", "dtype": dtype})
    if "jittor" in backends:
        sides.append({"label": "J" + bits, "role": "cand", "backend": "jittor", "dtype": dtype})
    if reference and dtype == "float32" and "torch" in backends:
        sides.append({"label": "T64", "role": "ref", "backend": "torch", "dtype": "float64"})
    return sides


def make_sides(run: TrainRun, args: argparse.Namespace) -> None:
    """The sides' interpreters and folders; an older verdict of the run folder is removed."""
    if run.stop_after is not None and run.stop_after < 1:
        raise RunError(f"--stop-after-epoch must be >= 1, got {run.stop_after}")
    if run.faults and run.fault_side not in run.backends:
        raise RunError(f"--inject-fault on the {run.fault_side} side, but that backend does not run")
    spec = side_labels(run.dtype, run.backends, run.reference)
    pys = {be: resolve_python(be, opt(args, f"{be}_python", None)) for be in run.backends}
    os.makedirs(run.out, exist_ok=True)
    for stale in ("result.json", "summary.md", "error.json"):
        p = os.path.join(run.out, stale)
        if os.path.exists(p):
            os.unlink(p)
    run.sides = [Side(d["label"], d["role"], d["backend"], d["dtype"], pys[d["backend"]], run.out) for d in spec]


def write_case(run: TrainRun, args: argparse.Namespace, progress) -> None:
    """A fresh run builds its case; a resumed one regenerates (and checks) the streams of
    every planned epoch, and records the plan."""
    t_case = time.perf_counter()
    if run.resumed:
        write_streams(run.case_dir, run.cfg, run.manifest, verify_existing=True)
        run.manifest["plan"] = run.plan
        write_json(os.path.join(run.case_dir, "manifest.json"), run.manifest)
    else:
        run.manifest = build_train_case(run.case_dir, run.cfg, seed=run.seed, data_root=opt(args, "data", None),
                                        weights_path=opt(args, "weights", None), plan=run.plan,
                                        limit_images=run.plan["limit_images"], limit_val=run.plan["limit_val"])
        run.plan = run.manifest["plan"]
    plan = run.plan
    check_split(plan, run.nproc)
    progress.line(f"  case: {plan['n_train']} train images ({plan['iterations_per_epoch']} iterations/epoch), "
                  f"{plan['n_val']} val images, streams for {plan['epochs']} epochs "
                  f"({time.perf_counter() - t_case:.1f}s)")


def check_split(plan: Dict[str, Any], nproc: int) -> None:
    """Every batch of an epoch splits over the ranks (the last one may be short)."""
    if nproc <= 1:
        return
    n, bs = int(plan["n_train"]), int(plan["batch_size"])
    sizes = {bs} | ({n % bs} if n % bs else set())
    bad = sorted(b for b in sizes if b % nproc)
    if bad:
        raise RunError(f"--nproc {nproc}: a batch of {bad[0]} image(s) does not split over {nproc} processes "
                       f"({n} train images, batch {bs}: use a batch size and an image count whose batches are "
                       f"multiples of {nproc})", cause="usage")


def faults_of(run: TrainRun, side: Side) -> List[str]:
    """The --inject-fault specs this side runs with (the fault side's, never the reference's)."""
    return list(run.faults) if run.faults and side.backend == run.fault_side and side.role != "ref" else []


def run_sides(run: TrainRun, progress) -> None:
    """Every side to its end (one after the other with --sequential); a failing side is one line."""
    fault_for = {s.label: faults_of(run, s) for s in run.sides}

    def start(s):
        start_side(s, run.out, run.device, run.threads, run.resumed, run.stop_after, fault_for[s.label], run.verbose,
                   run.nproc)
    try:
        groups = [[s] for s in run.sides] if run.sequential else [run.sides]
        for group in groups:
            for s in group:
                start(s)
            wait_sides(group, progress, run.plan["epochs"], run.timeout)
            for s in group:
                check_side(s)
    except BaseException:
        for s in run.sides:
            kill_side(s)
        raise


# ----------------------------------------------------------------------------------------
# the result
# ----------------------------------------------------------------------------------------

def shard_checks(run: TrainRun, logs: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """--nproc > 1: each side's ranks consumed exactly their shards (parity/judge/ranks.py)."""
    if run.nproc <= 1:
        return []
    expected = expected_train_digests(run.case_dir, range(1, int(run.plan["epochs"]) + 1), run.nproc)
    return [train_rank_checks(s.dir, s.label, expected, [r["iteration"] for r in logs[s.label].get("iterations", [])])
            for s in run.sides]


def start_end(log: Dict[str, Any]) -> Dict[str, Any]:
    """Where a side's loss started and ended: the first iteration's total, the first and the
    last complete epoch's mean total (the seed experiment's "start loss" / "final loss")."""
    its = log.get("iterations", [])
    eps = [e for e in log.get("epochs", []) if e.get("complete", True)]
    return {"first_iteration_total": its[0].get("total") if its else None,
            "first_epoch_mean_total": eps[0].get("mean_total") if eps else None,
            "last_epoch": eps[-1].get("epoch") if eps else None,
            "last_epoch_mean_total": eps[-1].get("mean_total") if eps else None}


def side_summary(s: Side, log: Dict[str, Any]) -> Dict[str, Any]:
    eps = log.get("epochs", [])
    secs = [e.get("seconds") for e in eps if e.get("seconds") is not None]
    its = [r["seconds"] for r in log.get("iterations", []) if r.get("seconds") is not None]
    timing = log.get("timing") or {}
    return {"label": s.label, "role": s.role, "backend": s.backend, "dtype": s.dtype, "python": s.python,
            "status": log.get("status"), "epochs_done": len([e for e in eps if e.get("complete", True)]),
            "iterations_done": len(log.get("iterations", [])), "nonfinite": log.get("nonfinite"),
            "wall_s": float(timing.get("wall_s_total") or timing.get("wall_s") or s.wall),
            "epoch_seconds": secs,
            "first_epoch_s": secs[0] if secs else None,
            "median_epoch_s": float(np.median(secs[1:] if len(secs) > 1 else secs)) if secs else None,
            "median_iteration_s": float(np.median(its)) if its else None,
            "first_iteration_s": its[0] if its else None,
            "peak_rss_mb": log.get("peak_rss_mb"), "versions": log.get("versions", {}),
            "threads": log.get("threads", {}), "resumed": log.get("resumed", []), "faults": log.get("faults", []),
            "evals": log.get("evals", []), "model": log.get("model", {}),
            "start_end": start_end(log)}


def environment(versions: Dict[str, Any], logs: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    return {"host": host_info(), "git": git_describe(), "runner": runner_versions(), "preflight": versions,
            "workers": {lab: lg.get("versions", {}) for lab, lg in logs.items()}}
