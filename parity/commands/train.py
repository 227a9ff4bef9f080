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
    <out>/<LABEL>/              one folder per side (see parity/train_worker.py): log.json,
                                eval/, checkpoints/, final.safetensors, worker.log, status.json
    <out>/result.json           curve metrics, mAP, checks, verdict, environment (parity report reads it)
    <out>/summary.md            the same for people

Exit codes: 0 pass (or a run stopped on purpose with --stop-after-epoch), 1 a threshold
failed or a side hit a non-finite loss, 2 usage or environment error.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from parity.case.train import TRAIN_SCHEMA, build_train_case, write_streams
from parity.commands.eval import coco_results_from
from parity.errors import EXIT_FAIL, EXIT_OK, EXIT_USAGE, RunError
from parity.facts import git_describe, host_info, runner_versions
from parity.fileio import default_out, read_json, read_npz_meta, write_json, write_text
from parity.judge import curves
from parity.judge.thresholds import ThresholdError, load_thresholds
from parity.judge.train_state import buffer_errors, eval_output_errors, state_names
from parity.report.train import train_markdown
from parity.sides.jobs import Job, preflight
from parity.sides.process import Progress, resolve_python
from parity.sides.train import Side, check_side, kill_side, start_side, wait_sides


def _add_once(parser: argparse.ArgumentParser, *flags: str, **kw: Any) -> None:
    """Add an option unless another stage module already added it (shared ``run`` parser)."""
    if any(f in parser._option_string_actions for f in flags):   # noqa: SLF001
        return
    parser.add_argument(*flags, **kw)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    _add_once(parser, "--epochs", type=int, default=None, help="train: epochs (default: the config's train.epochs)")
    _add_once(parser, "--limit-images", type=int, default=None, metavar="N",
              help="train: train on the first N images of the train split (dataset order)")
    _add_once(parser, "--limit-val", type=int, default=None, metavar="N",
              help="train: COCO mAP on the first N images of the val split (default: all)")
    _add_once(parser, "--eval-every", type=int, default=0, metavar="N",
              help="train: COCO mAP every N epochs (always after the last; EMA model if enabled)")
    _add_once(parser, "--checkpoint-every", type=int, default=0, metavar="N",
              help="train: checkpoint every N epochs (weights, optimizer/EMA state, stream states, log)")
    _add_once(parser, "--keep-checkpoints", type=int, default=2, metavar="K",
              help="train: keep the newest K checkpoints per side (0: all; default 2)")
    _add_once(parser, "--resume", default=None, metavar="RUN_DIR",
              help="train: continue RUN_DIR from each side's newest checkpoint (same curve as uninterrupted)")
    _add_once(parser, "--lr", type=float, default=None,
              help="train: base learning rate; groups with their own lr are scaled by the same factor")
    _add_once(parser, "--stop-after-epoch", type=int, default=None, metavar="N",
              help="train: stop after epoch N (with a checkpoint), as if interrupted; continue with --resume")
    _add_once(parser, "--threads", type=int, default=1, metavar="N",
              help="train: CPU threads per side (torch intra-op threads, Jittor OMP_NUM_THREADS; default 1)")
    _add_once(parser, "--backend", default="both", choices=["both", "torch", "jittor"],
              help="train: run both backends (default) or one (no comparison)")
    _add_once(parser, "--sequential", action="store_true",
              help="train: run the sides one after another instead of concurrently")


def opt(args, name, default=None):
    v = getattr(args, name, default)
    return default if v is None else v


# ----------------------------------------------------------------------------------------
# config / plan
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


# ----------------------------------------------------------------------------------------
# evaluation and comparison
# ----------------------------------------------------------------------------------------

def evaluate_side(side_dir: str, manifest: Dict[str, Any], cfg) -> "OrderedDict[int, Dict[str, float]]":
    """COCO metrics of every saved prediction file of a side (numpy post-processing of
    rtdetr_core for both sides: differences come from the models only)."""
    import glob

    from rtdetr_core.coco_eval import evaluate
    from rtdetr_core.data.coco import load_coco
    from rtdetr_core.postprocess import postprocess

    files = sorted(glob.glob(os.path.join(side_dir, "eval", "epoch_[0-9][0-9][0-9][0-9].npz")))
    out: "OrderedDict[int, Dict[str, float]]" = OrderedDict()
    if not files:
        return out
    with np.load(os.path.join(side_dir, "..", "case", "data.npz"), allow_pickle=False) as z:
        l2c = z["label_to_category"]
    gt = load_coco(manifest["data"]["val_ann_file"])
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            meta = read_npz_meta(z)
            dets = postprocess(z["pred_logits"], z["pred_boxes"], z["orig_sizes"],
                               num_top_queries=cfg.postprocess.num_top_queries,
                               use_focal_loss=cfg.postprocess.use_focal_loss)
            ids = [int(i) for i in z["image_ids"]]
        stacked = {k: [d[k] for d in dets] for k in ("scores", "labels", "boxes")}
        # model classes without a dataset category (80-class head, 6-category set) are dropped
        res, dropped = coco_results_from(stacked, ids, l2c)
        m = evaluate(gt, res, img_ids=ids)
        m = OrderedDict((k, float(v)) for k, v in m.items())
        m["ema"] = bool(meta.get("ema", False))
        m["detections"] = len(res)
        m["dropped_no_category"] = dropped
        out[int(meta.get("epoch", int(os.path.basename(f)[6:10])))] = m
    return out


def _read_weights(path: str) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(path)


def _trainable_names(cfg) -> List[str]:
    from rtdetr_core.param_spec import param_spec
    return [e.name for e in param_spec(cfg) if e.kind == "param" and e.trainable]


def expected_evals(plan: Dict[str, Any], epochs_done: int) -> List[int]:
    """Epochs the plan evaluates (every ``eval_every`` and the last), up to ``epochs_done``."""
    E, every = int(plan["epochs"]), int(plan.get("eval_every") or 0)
    return [e for e in range(1, min(epochs_done, E) + 1) if e == E or (every > 0 and e % every == 0)]


def _epochs_done(log: Dict[str, Any]) -> int:
    return len([e for e in log.get("epochs", []) if e.get("complete", True)])


def compare(out: str, sides: Sequence[Side], logs: Dict[str, Dict[str, Any]], maps: Dict[str, Any], cfg,
            thresholds, plan: Optional[Dict[str, Any]] = None, max_tie_rows: int = 4) -> Dict[str, Any]:
    base = next((s for s in sides if s.role == "base"), None)
    cand = next((s for s in sides if s.role == "cand"), None)
    ref = next((s for s in sides if s.role == "ref"), None)
    names = _trainable_names(cfg)
    floating, integer = state_names(cfg)
    w_init = _read_weights(os.path.join(out, "case", "weights.safetensors"))
    finals = {}
    for s in sides:
        p = os.path.join(s.dir, "final.safetensors")
        if os.path.isfile(p):
            finals[s.label] = _read_weights(p)

    def metrics(a: Side, b: Side, judged: bool):
        # what the plan asked for (judged pair only; the floor pair is context): every eval
        # epoch both sides completed, and the final state when both completed
        la, lb = logs[a.label], logs[b.label]
        both_done = la.get("status") == "completed" and lb.get("status") == "completed"
        want = expected_evals(plan, min(_epochs_done(la), _epochs_done(lb))) if (judged and plan) else []
        return curves.curve_metrics(la, lb, map_cand=maps.get(a.label), map_base=maps.get(b.label),
                                    w_cand=finals.get(a.label), w_base=finals.get(b.label), w_init=w_init, names=names,
                                    buffers=buffer_errors(a.dir, b.dir, floating, integer),
                                    eval_outputs=eval_output_errors(a.dir, b.dir, max_tie_rows),
                                    expect_evals=want, expect_final=judged and both_done, labels=(a.label, b.label),
                                    lockstep_rel=thresholds.lockstep_rel, window=thresholds.window)
    res: Dict[str, Any] = {}
    if base is not None and cand is not None:
        res["cand_base"] = metrics(cand, base, True)
    if base is not None and ref is not None:
        res["base_ref"] = metrics(base, ref, False)
    if cand is not None and ref is not None:
        res["cand_ref"] = metrics(cand, ref, False)
    # each side's movement: how far training moved the weights (context for the drift)
    res["update_l2"] = {lab: float(np.sqrt(sum(float(np.sum((np.asarray(w[n], np.float64) - np.asarray(w_init[n], np.float64)) ** 2))
                                               for n in names))) for lab, w in finals.items()}
    return res


def side_checks(sides: Sequence[Side], logs: Dict[str, Dict[str, Any]],
                case_digests: Dict[str, Any]) -> Tuple[Dict[str, bool], List[Dict[str, Any]]]:
    """``(inputs_ok, checks)``: per side, did it consume exactly the case's streams, and did
    its losses stay finite (verdict sides)."""
    inputs_ok: Dict[str, bool] = {}
    checks: List[Dict[str, Any]] = []
    for s in sides:
        got = [(r["epoch"], r["step"], r["batch"]) for r in logs[s.label]["iterations"]]
        # all([]) is True: a side that consumed nothing proved nothing about its inputs
        inputs_ok[s.label] = bool(got) and all(case_digests[str(e)][k] == b for e, k, b in got)
        c = {"check": f"inputs_{s.label}", "text": f"{s.label} consumed exactly the case's streams",
             "value": inputs_ok[s.label], "passed": inputs_ok[s.label], "rule": "exact"}
        if not inputs_ok[s.label]:
            c["reason"] = f"{s.label} logged no iteration" if not got else f"{s.label} did not consume the case's streams"
        checks.append(c)
    verdict_sides = [s for s in sides if s.role != "ref"]
    for s in verdict_sides:
        nf = logs[s.label].get("nonfinite")
        if nf:
            # never a pass, even when both sides blow up at the same iteration: a run that
            # ends in NaN compares nothing after it (and a shared NaN may be a shared bug)
            others = [logs[o.label].get("nonfinite") for o in verdict_sides if o is not s]
            same = bool(others) and all(o and o["iteration"] == nf["iteration"] for o in others)
            checks.append({"check": f"finite_{s.label}", "passed": False, "rule": "exact",
                           "text": f"{s.label} losses stay finite", "same_iteration_on_all_sides": same,
                           "value": f"non-finite {nf['term']} at iteration {nf['iteration']} (epoch {nf['epoch']})",
                           "reason": f"{s.label} stopped: non-finite {nf['term']} at iteration {nf['iteration']}"
                                     + (" (every side at the same iteration: nothing is compared after it)"
                                        if same else "")})
    return inputs_ok, checks


# ----------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------

def _versions_of(logs: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    return {lab: lg.get("versions", {}) for lab, lg in logs.items()}


def _side_summary(s: Side, log: Dict[str, Any]) -> Dict[str, Any]:
    eps = log.get("epochs", [])
    secs = [e.get("seconds") for e in eps if e.get("seconds") is not None]
    its = [r["seconds"] for r in log.get("iterations", []) if r.get("seconds") is not None]
    return {"label": s.label, "role": s.role, "backend": s.backend, "dtype": s.dtype, "python": s.python,
            "status": log.get("status"), "epochs_done": len([e for e in eps if e.get("complete", True)]),
            "iterations_done": len(log.get("iterations", [])), "nonfinite": log.get("nonfinite"),
            "wall_s": float((log.get("timing") or {}).get("wall_s_total") or (log.get("timing") or {}).get("wall_s") or s.wall),
            "epoch_seconds": secs,
            "first_epoch_s": secs[0] if secs else None,
            "median_epoch_s": float(np.median(secs[1:] if len(secs) > 1 else secs)) if secs else None,
            "median_iteration_s": float(np.median(its)) if its else None,
            "first_iteration_s": its[0] if its else None,
            "peak_rss_mb": log.get("peak_rss_mb"), "versions": log.get("versions", {}),
            "threads": log.get("threads", {}), "resumed": log.get("resumed", []), "faults": log.get("faults", []),
            "evals": log.get("evals", [])}


def run(args: argparse.Namespace) -> int:
    from rtdetr_core.config import ConfigError, config_from_dict, load_config


    t_start = time.perf_counter()
    progress = Progress()

    def _on_term(signum, frame):          # kill -TERM: clean up the sides like Ctrl-C does
        raise KeyboardInterrupt
    try:
        old_term = signal.signal(signal.SIGTERM, _on_term)
    except ValueError:                    # not the main thread (tests calling run() directly)
        old_term = None
    out: Optional[str] = None
    base_info: Dict[str, Any] = {"schema": TRAIN_SCHEMA, "stage": "train"}
    sides: List[Side] = []
    try:
        dtype = opt(args, "dtype", "float32")
        device = opt(args, "device", "cpu")
        threads = int(opt(args, "threads", 1))
        verbose = bool(opt(args, "verbose", False))
        timeout = opt(args, "timeout", None) or None
        stop_after = opt(args, "stop_after_epoch", None)
        which = opt(args, "backend", "both")
        backends = ["torch", "jittor"] if which == "both" else [which]
        reference = dtype == "float32" and not opt(args, "no_reference", False) and "torch" in backends
        faults = list(opt(args, "inject_fault", []) or [])
        fault_side = opt(args, "fault_side", "jittor")
        for n, v in (("--threads", threads), ("--eval-every", opt(args, "eval_every", 0)),
                     ("--checkpoint-every", opt(args, "checkpoint_every", 0)),
                     ("--keep-checkpoints", opt(args, "keep_checkpoints", 2))):
            if int(v) < 0:
                raise RunError(f"{n} must be >= 0, got {v}")
        try:
            tfile = load_thresholds(opt(args, "thresholds", None), stage_tables=False)
            thresholds = tfile.train()
            # the tie pairing of the eval outputs follows the eval stage's rule (one number)
            max_tie_rows = int(tfile.section("eval")["max_tie_rows"])
        except ThresholdError as e:
            raise RunError(f"thresholds: {e}", cause="thresholds") from None

        resume_dir = opt(args, "resume", None)
        old: Dict[str, Any] = {}
        if resume_dir:
            out = os.path.abspath(resume_dir)
            case_dir = os.path.join(out, "case")
            mpath = os.path.join(case_dir, "manifest.json")
            if not os.path.isfile(mpath):
                raise RunError(f"--resume {resume_dir}: not a train run folder (no case/manifest.json)")
            if opt(args, "out", None) and os.path.abspath(args.out) != out:
                raise RunError("--resume continues the run in its own folder: do not give a different --out")
            manifest = read_json(mpath)
            try:
                cfg = config_from_dict(read_json(os.path.join(case_dir, "config.json")))
            except ConfigError as e:
                raise RunError(f"--resume: {e}", cause="config") from None
            plan = manifest["plan"]
            seed = int(manifest["seed"])
            old = read_json(os.path.join(out, "result.json")) if os.path.isfile(os.path.join(out, "result.json")) else {}
            # settings that define the curve cannot change on resume
            given = {"--lr": (opt(args, "lr", None), plan.get("lr_override")),
                     "--batch-size": (opt(args, "batch_size", None), cfg.train.batch_size),
                     "--limit-images": (opt(args, "limit_images", None), plan.get("limit_images")),
                     "--limit-val": (opt(args, "limit_val", None), plan.get("limit_val")),
                     "--weights": (opt(args, "weights", None), None), "--data": (opt(args, "data", None), None)}
            for flag, (v, have) in given.items():
                if v is not None and v != have:
                    raise RunError(f"--resume: {flag} {v} differs from the run's ({have}); the curve would change")
            if seed != int(opt(args, "seed", seed)) and int(opt(args, "seed", 0)) != 0:
                raise RunError(f"--resume: --seed {args.seed} differs from the run's seed {seed}")
            dtype = old.get("dtype", plan.get("dtype", dtype))
            reference = plan.get("reference", reference) if which == "both" else reference
            if opt(args, "epochs", None) is not None:
                plan["epochs"] = int(args.epochs)
            for k in ("eval_every", "checkpoint_every", "keep_checkpoints"):
                if getattr(args, k, None) not in (None, 0, 2) or k not in plan:
                    plan[k] = int(opt(args, k, plan.get(k, 0)))
            backends = plan.get("backends", backends) if which == "both" else backends
        else:
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
            plan = {"epochs": epochs, "batch_size": cfg.train.batch_size, "eval_batch_size": cfg.train.batch_size,
                    "eval_every": int(opt(args, "eval_every", 0)),
                    "checkpoint_every": int(opt(args, "checkpoint_every", 0)),
                    "keep_checkpoints": int(opt(args, "keep_checkpoints", 2)),
                    "lr": cfg.optimizer.lr, "lr_override": opt(args, "lr", None),
                    "group_lrs": [g.lr for g in cfg.optimizer.groups],
                    "lr_milestones": list(cfg.train.lr_milestones), "lr_gamma": cfg.train.lr_gamma,
                    "limit_images": opt(args, "limit_images", None), "limit_val": opt(args, "limit_val", None),
                    "image_size": list(cfg.train.image_size), "multi_scale": cfg.train.multi_scale,
                    "ema": cfg.ema.enabled, "clip_max_norm": cfg.optimizer.clip_max_norm,
                    "dtype": dtype, "reference": reference, "backends": backends, "seed": seed,
                    "config": str(opt(args, "config", "smoke"))}
            out = os.path.abspath(opt(args, "out", None) or _default_out(cfg.name))
            case_dir = os.path.join(out, "case")
        if stop_after is not None and stop_after < 1:
            raise RunError(f"--stop-after-epoch must be >= 1, got {stop_after}")
        if faults and fault_side not in backends:
            raise RunError(f"--inject-fault on the {fault_side} side, but that backend does not run")

        sides_spec = side_labels(dtype, backends, reference)
        pys = {}
        for be in backends:
            pys[be] = resolve_python(be, opt(args, f"{be}_python", None))
        os.makedirs(out, exist_ok=True)
        for stale in ("result.json", "summary.md", "error.json"):
            p = os.path.join(out, stale)
            if os.path.exists(p):
                os.unlink(p)
        sides = [Side(d["label"], d["role"], d["backend"], d["dtype"], pys[d["backend"]], out) for d in sides_spec]
        base_info.update(config=cfg.name, config_digest=cfg.digest(), dtype=dtype, device=device, seed=seed,
                         out=out, labels={s.role: s.label for s in sides}, plan=plan, threads=threads,
                         sequential=bool(opt(args, "sequential", False)), faults=faults,
                         fault_side=fault_side if faults else None)

        print(f"parity run --stage train: config {cfg.name} ({cfg.digest()}), {dtype}"
              f"{' + float64 reference' if reference else ''}, {plan['epochs']} epochs, batch {cfg.train.batch_size}, "
              f"seed {seed}, sides {', '.join(s.label for s in sides)}{' (resume)' if resume_dir else ''} -> {out}",
              flush=True)
        versions = preflight([Job(s.label, s.role, s.backend, s.python, s.dtype, "train", "") for s in sides], verbose)

        t_case = time.perf_counter()
        if resume_dir:
            write_streams(case_dir, cfg, manifest, verify_existing=True)
            manifest["plan"] = plan
            write_json(os.path.join(case_dir, "manifest.json"), manifest)
        else:
            manifest = build_train_case(case_dir, cfg, seed=seed, data_root=opt(args, "data", None),
                                        weights_path=opt(args, "weights", None), plan=plan,
                                        limit_images=plan["limit_images"], limit_val=plan["limit_val"])
            plan = manifest["plan"]
        base_info.update(plan=plan, data=manifest["data"], weights=manifest["weights"])
        progress.line(f"  case: {plan['n_train']} train images ({plan['iterations_per_epoch']} iterations/epoch), "
                      f"{plan['n_val']} val images, streams for {plan['epochs']} epochs "
                      f"({time.perf_counter() - t_case:.1f}s)")

        # run the sides
        fault_for = {s.label: (faults if faults and s.backend == fault_side and s.role != "ref" else []) for s in sides}
        try:
            if base_info["sequential"]:
                for s in sides:
                    start_side(s, out, device, threads, bool(resume_dir), stop_after, fault_for[s.label], verbose)
                    wait_sides([s], progress, plan["epochs"], timeout)
                    check_side(s)
            else:
                for s in sides:
                    start_side(s, out, device, threads, bool(resume_dir), stop_after, fault_for[s.label], verbose)
                wait_sides(sides, progress, plan["epochs"], timeout)
                for s in sides:
                    check_side(s)
        except BaseException:
            for s in sides:
                kill_side(s)
            raise

        # collect
        progress.line("  evaluating and comparing ...")
        logs = {s.label: read_json(os.path.join(s.dir, "log.json")) for s in sides}
        maps = {s.label: evaluate_side(s.dir, manifest, cfg) for s in sides}
        cmp_ = compare(out, sides, logs, maps, cfg, thresholds, plan, max_tie_rows)
        statuses = {s.label: logs[s.label].get("status") for s in sides}
        nonfinite = {lab: logs[lab]["nonfinite"] for lab in logs if logs[lab].get("nonfinite")}
        inputs_ok, checks = side_checks(sides, logs, manifest["streams"]["batch_digests"])
        stopped = any(v == "stopped" for v in statuses.values())
        cb = cmp_.get("cand_base")
        if cb is not None:
            floor = cmp_.get("base_ref")
            checks += curves.judge(cb, thresholds.for_dtype(dtype), floor)
        passed = all(c["passed"] for c in checks)
        if stopped:
            status, code = "stopped", EXIT_OK
        elif cb is None:
            status, code = ("single" if passed else "fail"), (EXIT_OK if passed else EXIT_FAIL)
        else:
            status, code = ("pass" if passed else "fail"), (EXIT_OK if passed else EXIT_FAIL)
        res = dict(base_info)
        res.update(status=status, passed=passed if not stopped else None, exit_code=code,
                   sides=[_side_summary(s, logs[s.label]) for s in sides],
                   map={lab: {str(k): v for k, v in m.items()} for lab, m in maps.items()},
                   inputs_identical=inputs_ok, nonfinite=nonfinite, checks=checks, metrics=cmp_,
                   thresholds_file=thresholds.path, thresholds={"lockstep_rel": thresholds.lockstep_rel,
                                                                "final_window": thresholds.window,
                                                                **{c: r.to_dict() for c, r in thresholds.for_dtype(dtype).items()}},
                   env={"host": host_info(), "git": git_describe(), "runner": runner_versions(),
                        "preflight": versions, "workers": _versions_of(logs)},
                   streams={"epochs": manifest["streams"]["epochs"], "dn_batches": manifest["streams"]["dn_batches"],
                            "multi_scale": manifest["streams"]["multi_scale"]},
                   wall_s=time.perf_counter() - t_start)
        prev_total = float(old.get("wall_s_total", old.get("wall_s", 0.0)) or 0.0) if resume_dir else 0.0
        res["wall_s_total"] = prev_total + res["wall_s"]
        res["invocations"] = (int(old.get("invocations", 1)) if resume_dir else 0) + 1
        res["command"] = command_of(args, plan, out, resumed=bool(resume_dir))
        res["verdict"] = verdict_text(res)
        res = curves.jsonable(res)
        write_json(os.path.join(out, "result.json"), res)
        try:
            write_text(os.path.join(out, "summary.md"), train_markdown(res, out, images=None))
        except ImportError:
            pass
        print_summary(res)
        for lab, ok in inputs_ok.items():
            if not ok:
                print(f"  WARNING: {lab} did not consume the case's streams", file=sys.stderr)
        return code
    except RunError as e:
        print(f"parity: error: [{e.side}] {e}", file=sys.stderr)
        _write_error(out, base_info, e, t_start)
        return EXIT_USAGE
    except KeyboardInterrupt:
        for s in sides:
            kill_side(s)
        print("parity: interrupted", file=sys.stderr)
        _write_error(out, base_info, RunError("interrupted by the user", cause="interrupted"), t_start)
        return 130
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def command_of(args: argparse.Namespace, plan: Dict[str, Any], out: str, resumed: bool = False) -> List[str]:
    """The command that reproduces this run (a resumed run: the fresh-run equivalent)."""
    cmd = ["parity", "run", "--stage", "train", "--config", str(opt(args, "config", "smoke")) if not resumed
           else str(getattr(args, "_config_name", None) or plan.get("config") or opt(args, "config", "smoke")),
           "--dtype", plan.get("dtype", "float32"), "--device", str(opt(args, "device", "cpu")),
           "--seed", str(plan.get("seed", 0)), "--epochs", str(plan["epochs"]), "--batch-size", str(plan["batch_size"])]
    for flag, key in (("--limit-images", "limit_images"), ("--limit-val", "limit_val"), ("--lr", "lr_override")):
        if plan.get(key) is not None:
            cmd += [flag, str(plan[key])]
    for flag, key in (("--eval-every", "eval_every"), ("--checkpoint-every", "checkpoint_every")):
        if plan.get(key):
            cmd += [flag, str(plan[key])]
    cmd += ["--threads", str(opt(args, "threads", 1))]
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


def _default_out(config_name: str) -> str:
    return default_out("train", config_name)


def _write_error(out: Optional[str], base: Dict[str, Any], err: RunError, t_start: float) -> None:
    if not out or not os.path.isdir(out):
        return
    res = dict(base)
    res.update(status="error", passed=False, exit_code=EXIT_USAGE, wall_s=time.perf_counter() - t_start,
               error={"side": err.side, "cause": err.cause, "message": str(err).splitlines()[0], "log": err.log})
    try:
        write_json(os.path.join(out, "result.json"), curves.jsonable(res))
        write_text(os.path.join(out, "summary.md"),
                   f"# parity run --stage train: ERROR\n\n**{err.side} side, {err.cause}**: {str(err).splitlines()[0]}\n\n"
                   f"No comparison was made; this run proves nothing.\n")
    except OSError:
        pass


def verdict_text(res: Dict[str, Any]) -> str:
    st = res["status"]
    if st == "stopped":
        done = min(s["epochs_done"] for s in res["sides"])
        return (f"STOPPED on request after epoch {done} of {res['plan']['epochs']} — continue with: "
                f"parity run --stage train --resume {res['out']}")
    fails = [c for c in res["checks"] if not c["passed"]]
    if st == "single":
        return "single backend run: no comparison"
    if not fails:
        return "PASS: every check held"
    parts = []
    for c in fails:
        r = c.get("reason")
        parts.append(r if c["check"].startswith(("finite_", "inputs_")) else f"{c['check']} {r or 'failed'}")
    return "FAIL: " + "; ".join(parts)


def _fmt(x, f=".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    try:
        return format(float(x), f)
    except (TypeError, ValueError):
        return str(x)


def print_summary(res: Dict[str, Any], stream=None) -> None:
    w = (stream or sys.stdout).write
    w("\n")
    for s in res["sides"]:
        w(f"  {s['label']:<4} {s['backend']:<6} {s['dtype']}: {s['status']}, {s['epochs_done']} epochs / "
          f"{s['iterations_done']} iterations, median epoch {_fmt(s['median_epoch_s'])}s, "
          f"peak RSS {_fmt(s['peak_rss_mb'], ',.0f')} MB\n")
        if s.get("nonfinite"):
            nf = s["nonfinite"]
            w(f"       NON-FINITE {nf['term']} at iteration {nf['iteration']} (epoch {nf['epoch']}): side stopped\n")
    for lab, m in res.get("map", {}).items():
        if m:
            last = list(m)[-1]
            w(f"  {lab} mAP (epoch {last}): AP {_fmt(m[last]['AP'], '.4f')} AP50 {_fmt(m[last]['AP50'], '.4f')}\n")
    cb = res.get("metrics", {}).get("cand_base")
    if cb:
        ls = cb["lockstep"]
        w(f"  lock-step: {ls['length']}/{ls['iterations_compared']} iterations"
          + (f" (first difference > {ls['tolerance']:g} at iteration {ls['first_iteration']}, {ls['term']}, "
             f"rel {_fmt(ls['rel'])}, {ls['kind']})" if ls["first_iteration"] else "") + "\n")
    for c in res.get("checks", []):
        if c["check"].startswith("inputs_"):
            continue
        fl = f" floor {_fmt(c.get('floor'))}" if c.get("floor") is not None else ""
        w(f"    {'ok  ' if c['passed'] else 'FAIL'} {c['check']:<18} {_fmt(c.get('value'))}{fl}"
          f"{' (' + c['rule'] + ')' if c.get('rule') else ''}\n")
    w(f"  {res['verdict']}  ({res['wall_s']:.1f}s)\n")
    w(f"  result: {res['out']}/result.json\n")
