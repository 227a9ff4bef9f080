"""``parity run --stage train``: train the same model with both backends, compare the curves.

Flow::

    runner: case folder (config, initial weights, decoded data, every epoch's streams)
        ├── T32  torch  float32   (base)        python -m parity.train_worker  (torch env)
        ├── J32  jittor float32   (candidate)   python -m parity.train_worker  (jittor env)
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
import datetime
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .fileio import read_json, read_npz_meta, sha256_file, write_json, write_npz, write_text

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
TRAIN_SCHEMA = 1
CASE_FILES_FIXED = ("config.json", "config.yaml", "weights.safetensors", "data.npz")


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


class RunError(Exception):
    def __init__(self, message: str, side: str = "runner", cause: str = "usage", log: Optional[str] = None):
        super().__init__(message)
        self.side, self.cause, self.log = side, cause, log


def _opt(args, name, default=None):
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
# the case: data and streams
# ----------------------------------------------------------------------------------------

class _Items:
    """Decoded items as a dataset for ``rtdetr_core.data.iterate_batches``."""

    def __init__(self, images: np.ndarray, targets: List[Dict[str, Any]]):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


def load_split(root: str, split: str, image_size, limit: Optional[int]):
    """(dataset, images [N,3,H,W] float32, targets) of the first ``limit`` images."""
    from rtdetr_core.data import DataError, open_split
    try:
        ds = open_split(root, split, tuple(image_size))
    except DataError as e:
        raise RunError(f"data: {e}", cause="data") from None
    n = len(ds) if limit is None else min(int(limit), len(ds))
    if n < 1:
        raise RunError(f"data: the {split} split of {root} has no images", cause="data")
    items = [ds[i] for i in range(n)]
    images = np.ascontiguousarray(np.stack([it[0] for it in items]), dtype=np.float32)
    targets = [it[1] for it in items]
    return ds, images, targets


def generate_streams(cfg, items: _Items, batch_size: int, seed: int, epochs: int) -> List[Dict[str, Any]]:
    """Every epoch's order and draws, from ONE ``Streams(seed)`` continued across epochs (as
    ``BatchLoader`` does): epoch e's draws do not depend on the total number of epochs."""
    from rtdetr_core.data import iterate_batches
    from rtdetr_core.rng import Streams, epoch_order

    from .train_worker import batch_digest
    st = Streams(seed)
    out = []
    for e in range(1, epochs + 1):
        before = st.state()
        its = []
        for images, targets, meta in iterate_batches(items, batch_size, seed=seed, epoch=e - 1, shuffle=True,
                                                     drop_last=False, multi_scale=cfg.train.multi_scale, streams=st,
                                                     num_denoising=cfg.decoder.num_denoising,
                                                     num_classes=cfg.num_classes):
            tg = [{"labels": np.asarray(t["labels"], dtype=np.int64), "boxes": np.asarray(t["boxes"], dtype=np.float32)}
                  for t in targets]
            its.append({"indices": np.asarray(meta["indices"], dtype=np.int64), "dn_draws": meta["dn_draws"],
                        "multi_scale_size": meta["multi_scale_size"],
                        "batch": batch_digest(images, tg, meta["dn_draws"], meta["multi_scale_size"])})
        out.append({"epoch": e, "order": epoch_order(len(items), seed, e - 1), "iterations": its,
                    "state_before": before, "state_after": st.state()})
    return out


def write_epoch_streams(path: str, ep: Dict[str, Any]) -> None:
    arrays: Dict[str, np.ndarray] = {"order": ep["order"]}
    for k, it in enumerate(ep["iterations"]):
        arrays[f"it{k}.indices"] = it["indices"]
        arrays[f"it{k}.ms"] = np.asarray(-1 if it["multi_scale_size"] is None else it["multi_scale_size"], dtype=np.int64)
        if it["dn_draws"] is not None:
            for key, v in it["dn_draws"].items():
                arrays[f"it{k}.dn.{key}"] = np.asarray(v)
    meta = {"epoch": ep["epoch"], "iterations": len(ep["iterations"]), "state_before": ep["state_before"],
            "state_after": ep["state_after"], "batch": [it["batch"] for it in ep["iterations"]]}
    write_npz(path, arrays, meta)


def build_train_case(case_dir: str, cfg, *, seed: int, data_root: Optional[str], weights_path: Optional[str],
                     plan: Dict[str, Any], limit_images: Optional[int], limit_val: Optional[int]) -> Dict[str, Any]:
    import yaml

    from rtdetr_core.data import ensure_synthetic_dataset

    from .case import CaseError, make_weights, runner_versions, save_weights
    os.makedirs(case_dir, exist_ok=True)
    mpath = os.path.join(case_dir, "manifest.json")
    if os.path.exists(mpath):
        os.unlink(mpath)
    try:
        weights, winfo = make_weights(cfg, seed, weights_path)
    except CaseError as e:
        raise RunError(str(e), side="case", cause="weights") from None
    synthetic = data_root is None
    root = ensure_synthetic_dataset() if synthetic else data_root
    tr_ds, tr_images, tr_targets = load_split(root, "train", cfg.train.image_size, limit_images)
    va_ds, va_images, va_targets = load_split(root, "val", cfg.train.image_size, limit_val)
    max_label = max((int(t["labels"].max()) for t in tr_targets if len(t["labels"])), default=-1)
    if max_label >= cfg.num_classes:
        raise RunError(f"data: {root} has label {max_label}, the config '{cfg.name}' only {cfg.num_classes} classes",
                       cause="data")
    bs = cfg.train.batch_size
    if len(tr_images) < bs:
        raise RunError(f"data: {len(tr_images)} train images, fewer than the batch size {bs}", cause="data")

    arrays: Dict[str, np.ndarray] = {"train.images": tr_images,
                                     "train.image_ids": np.asarray([t["image_id"] for t in tr_targets], dtype=np.int64),
                                     "val.images": va_images,
                                     "val.image_ids": np.asarray([t["image_id"] for t in va_targets], dtype=np.int64),
                                     "val.orig_sizes": np.stack([np.asarray(t["orig_size"], dtype=np.int64)
                                                                 for t in va_targets]),
                                     "label_to_category": np.asarray(va_ds.label_to_category, dtype=np.int64)}
    for i, t in enumerate(tr_targets):
        arrays[f"train.{i}.labels"] = np.asarray(t["labels"], dtype=np.int64).reshape(-1)
        arrays[f"train.{i}.boxes"] = np.asarray(t["boxes"], dtype=np.float32).reshape(-1, 4)
    dinfo = {"root": os.path.abspath(root), "synthetic": synthetic, "n_train": len(tr_images),
             "n_train_total": len(tr_ds), "n_val": len(va_images), "n_val_total": len(va_ds),
             "val_ann_file": os.path.abspath(va_ds.ann_file), "train_ann_file": os.path.abspath(tr_ds.ann_file),
             "num_boxes_train": int(sum(len(t["labels"]) for t in tr_targets)),
             "num_boxes_val": int(sum(len(t["labels"]) for t in va_targets)),
             "image_size": list(cfg.train.image_size)}
    write_npz(os.path.join(case_dir, "data.npz"), arrays, dict(dinfo, n_train=len(tr_images), n_val=len(va_images)))

    digest = cfg.digest()
    cd = cfg.to_dict()
    write_json(os.path.join(case_dir, "config.json"), cd)
    write_text(os.path.join(case_dir, "config.yaml"),
               f"# config '{cfg.name}', digest {digest} (generated; the workers read config.json)\n"
               + yaml.safe_dump(cd, sort_keys=False))
    save_weights(os.path.join(case_dir, "weights.safetensors"), weights, digest)
    plan = dict(plan, n_train=len(tr_images), n_val=len(va_images),
                iterations_per_epoch=-(-len(tr_images) // bs))
    manifest = {"schema": TRAIN_SCHEMA, "stage": "train",
                "created": datetime.datetime.now().isoformat(timespec="seconds"),
                "config": cfg.name, "config_digest": digest, "seed": int(seed), "plan": plan, "data": dinfo,
                "weights": winfo, "versions": runner_versions(), "files": {}, "streams": {}}
    _write_streams(case_dir, cfg, manifest, tr_images, tr_targets)
    return manifest


def _write_streams(case_dir: str, cfg, manifest: Dict[str, Any], tr_images=None, tr_targets=None,
                   verify_existing: bool = False) -> None:
    """(Re)generate the streams of every planned epoch; existing epoch files must be identical
    (resume / extension), new ones are written; then the manifest (last)."""
    plan = manifest["plan"]
    if tr_images is None:
        from .train_worker import load_data
        d = load_data(case_dir)
        tr_images, tr_targets = d["train_images"], d["train_targets"]
    eps = generate_streams(cfg, _Items(tr_images, tr_targets), cfg.train.batch_size, manifest["seed"], plan["epochs"])
    os.makedirs(os.path.join(case_dir, "streams"), exist_ok=True)
    from .train_worker import epoch_file
    files = {}
    for ep in eps:
        p = epoch_file(case_dir, ep["epoch"])
        rel = os.path.relpath(p, case_dir)
        if verify_existing and os.path.isfile(p):
            with np.load(p, allow_pickle=False) as z:
                old = read_npz_meta(z)
            if old.get("batch") != [it["batch"] for it in ep["iterations"]] or old.get("state_after") != ep["state_after"]:
                raise RunError(f"--resume: {p} differs from the streams regenerated from seed {manifest['seed']} "
                               f"(the case was built by another rtdetr_core?)", side="case", cause="streams")
        else:
            write_epoch_streams(p, ep)
        files[rel] = sha256_file(p)
    manifest["streams"] = {"epochs": len(eps), "batch_digests": {str(ep["epoch"]): [it["batch"] for it in ep["iterations"]]
                                                                for ep in eps},
                           "dn_batches": sum(1 for ep in eps for it in ep["iterations"] if it["dn_draws"] is not None),
                           "multi_scale": cfg.train.multi_scale}
    manifest["files"] = {f: sha256_file(os.path.join(case_dir, f)) for f in CASE_FILES_FIXED}
    manifest["files"].update(files)
    write_json(os.path.join(case_dir, "manifest.json"), manifest)


# ----------------------------------------------------------------------------------------
# workers
# ----------------------------------------------------------------------------------------

class Side:
    def __init__(self, label: str, role: str, backend: str, dtype: str, python: str, out: str):
        self.label, self.role, self.backend, self.dtype, self.python = label, role, backend, dtype, python
        self.dir = os.path.join(out, label)
        self.proc: Optional[subprocess.Popen] = None
        self.t0 = 0.0
        self.wall = 0.0
        self.rc: Optional[int] = None
        self.pump: Optional[threading.Thread] = None
        self.last_epoch = 0

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "worker.log")

    def status(self) -> Dict[str, Any]:
        try:
            return read_json(os.path.join(self.dir, "status.json"))
        except (OSError, ValueError):
            return {}


def _start(side: Side, out: str, device: str, threads: int, resume: bool, stop_after: Optional[int],
           faults: Sequence[str], verbose: bool) -> None:
    from .runner import _pump, _worker_env
    os.makedirs(side.dir, exist_ok=True)
    for stale in ("status.json", "error.json"):       # an earlier run's progress is not ours
        if os.path.exists(os.path.join(side.dir, stale)):
            os.unlink(os.path.join(side.dir, stale))
    cmd = [side.python, "-m", "parity.train_worker", "--backend", side.backend, "--run", out, "--side", side.label,
           "--dtype", side.dtype, "--device", device, "--threads", str(threads)]
    if resume:
        cmd.append("--resume")
    if stop_after is not None:
        cmd += ["--stop-after-epoch", str(stop_after)]
    for f in faults:
        cmd += ["--inject-fault", f]
    env = _worker_env()
    env["OMP_NUM_THREADS"] = str(threads)
    with open(side.log_path, "ab") as fh:
        fh.write(("$ " + " ".join(cmd) + "\n").encode())
    side.t0 = time.perf_counter()
    try:
        side.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     start_new_session=True)
    except OSError as e:
        raise RunError(f"{side.backend} side: cannot start {side.python}: {e.strerror or e}", side=side.backend,
                       cause="environment missing") from None
    side.pump = threading.Thread(target=_pump, args=(side.proc.stdout, side.log_path, verbose), daemon=True)
    side.pump.start()


def _kill(side: Side, sig=signal.SIGTERM) -> None:
    if side.proc is not None and side.proc.poll() is None:
        try:
            os.killpg(side.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            side.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(side.proc.pid, signal.SIGKILL)
            side.proc.wait()


def _wait(sides: Sequence[Side], progress, epochs: int, timeout: Optional[float]) -> None:
    """Poll the running sides until all have exited; progress lines per epoch."""
    running = [s for s in sides if s.proc is not None and s.rc is None]
    while running:
        for s in running:
            st = s.status()
            el = time.perf_counter() - s.t0
            ep = int(st.get("epoch", 0) or 0)
            if s.last_epoch == 0:
                s.last_epoch = ep            # first sight (a resumed side starts past epoch 1)
            elif ep > s.last_epoch and not progress.tty:
                progress.line(f"  {s.label:<4} {s.backend:<6} epoch {ep - 1}/{epochs} done ({el:.0f}s)")
            s.last_epoch = max(s.last_epoch, ep)
            if timeout and el > timeout:
                _kill(s, signal.SIGKILL)
                raise RunError(f"{s.label} ({s.backend}): killed after the --timeout of {timeout:g}s (log: {s.log_path})",
                               side=s.backend, cause="timeout", log=s.log_path)
            if s.proc.poll() is not None:
                s.rc = s.proc.returncode
                s.wall = el
                if s.pump is not None:
                    s.pump.join(timeout=5)
                progress.line(f"  {s.label:<4} {s.backend:<6} {s.dtype} exited ({s.rc}) after {el:.1f}s")
        if progress.tty:
            parts = []
            for s in sides:
                st = s.status()
                parts.append(f"{s.label} e{st.get('epoch', 0)}/{epochs} it{st.get('iteration', 0)} {st.get('phase', '')}")
            progress.update("  " + " | ".join(parts))
        running = [s for s in running if s.rc is None]
        if running:
            time.sleep(0.5)


def _check_side(side: Side) -> None:
    if side.rc == 0:
        return
    err = os.path.join(side.dir, "error.json")
    from .runner import _tail
    if os.path.isfile(err):
        try:
            e = read_json(err)
        except (OSError, ValueError):
            e = {}
        phase = e.get("phase", "?")
        cause = {"import": "environment", "case": "case", "config": "config mismatch", "weights": "weights",
                 "faults": "usage", "device": "environment", "resume": "checkpoint"}.get(phase, "backend crash")
        raise RunError(f"{side.label} ({side.backend} {side.dtype}) failed in phase '{phase}' ({cause}): "
                       f"{e.get('message', '?')} (log: {side.log_path})", side=side.backend, cause=cause, log=side.log_path)
    rc = side.rc
    how = f"was killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with code {rc} without an error report"
    raise RunError(f"{side.label} ({side.backend}) crashed: the worker {how} (log: {side.log_path})\n{_tail(side.log_path)}",
                   side=side.backend, cause="backend crash", log=side.log_path)


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

    from .eval_stage import coco_results_from
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


def compare(out: str, sides: Sequence[Side], logs: Dict[str, Dict[str, Any]], maps: Dict[str, Any], cfg,
            thresholds) -> Dict[str, Any]:
    from . import curves
    base = next((s for s in sides if s.role == "base"), None)
    cand = next((s for s in sides if s.role == "cand"), None)
    ref = next((s for s in sides if s.role == "ref"), None)
    names = _trainable_names(cfg)
    w_init = _read_weights(os.path.join(out, "case", "weights.safetensors"))
    finals = {}
    for s in sides:
        p = os.path.join(s.dir, "final.safetensors")
        if os.path.isfile(p):
            finals[s.label] = _read_weights(p)

    def metrics(a: Side, b: Side):
        return curves.curve_metrics(logs[a.label], logs[b.label], map_cand=maps.get(a.label), map_base=maps.get(b.label),
                                    w_cand=finals.get(a.label), w_base=finals.get(b.label), w_init=w_init, names=names,
                                    lockstep_rel=thresholds.lockstep_rel, window=thresholds.window)
    res: Dict[str, Any] = {}
    if base is not None and cand is not None:
        res["cand_base"] = metrics(cand, base)
    if base is not None and ref is not None:
        res["base_ref"] = metrics(base, ref)
    if cand is not None and ref is not None:
        res["cand_ref"] = metrics(cand, ref)
    # each side's movement: how far training moved the weights (context for the drift)
    res["update_l2"] = {lab: float(np.sqrt(sum(float(np.sum((np.asarray(w[n], np.float64) - np.asarray(w_init[n], np.float64)) ** 2))
                                               for n in names))) for lab, w in finals.items()}
    return res


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

    from . import curves
    from .case import git_describe, runner_versions
    from .runner import Job, Progress, preflight, resolve_python
    from .runner import RunError as RunnerError
    from .thresholds import ThresholdError

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
        dtype = _opt(args, "dtype", "float32")
        device = _opt(args, "device", "cpu")
        threads = int(_opt(args, "threads", 1))
        verbose = bool(_opt(args, "verbose", False))
        timeout = _opt(args, "timeout", None) or None
        stop_after = _opt(args, "stop_after_epoch", None)
        which = _opt(args, "backend", "both")
        backends = ["torch", "jittor"] if which == "both" else [which]
        reference = dtype == "float32" and not _opt(args, "no_reference", False) and "torch" in backends
        faults = list(_opt(args, "inject_fault", []) or [])
        fault_side = _opt(args, "fault_side", "jittor")
        for n, v in (("--threads", threads), ("--eval-every", _opt(args, "eval_every", 0)),
                     ("--checkpoint-every", _opt(args, "checkpoint_every", 0)),
                     ("--keep-checkpoints", _opt(args, "keep_checkpoints", 2))):
            if int(v) < 0:
                raise RunError(f"{n} must be >= 0, got {v}")
        try:
            thresholds = curves.load_train_thresholds(_opt(args, "thresholds", None))
        except ThresholdError as e:
            raise RunError(f"thresholds: {e}", cause="thresholds") from None

        resume_dir = _opt(args, "resume", None)
        old: Dict[str, Any] = {}
        if resume_dir:
            out = os.path.abspath(resume_dir)
            case_dir = os.path.join(out, "case")
            mpath = os.path.join(case_dir, "manifest.json")
            if not os.path.isfile(mpath):
                raise RunError(f"--resume {resume_dir}: not a train run folder (no case/manifest.json)")
            if _opt(args, "out", None) and os.path.abspath(args.out) != out:
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
            given = {"--lr": (_opt(args, "lr", None), plan.get("lr_override")),
                     "--batch-size": (_opt(args, "batch_size", None), cfg.train.batch_size),
                     "--limit-images": (_opt(args, "limit_images", None), plan.get("limit_images")),
                     "--limit-val": (_opt(args, "limit_val", None), plan.get("limit_val")),
                     "--weights": (_opt(args, "weights", None), None), "--data": (_opt(args, "data", None), None)}
            for flag, (v, have) in given.items():
                if v is not None and v != have:
                    raise RunError(f"--resume: {flag} {v} differs from the run's ({have}); the curve would change")
            if seed != int(_opt(args, "seed", seed)) and int(_opt(args, "seed", 0)) != 0:
                raise RunError(f"--resume: --seed {args.seed} differs from the run's seed {seed}")
            dtype = old.get("dtype", plan.get("dtype", dtype))
            reference = plan.get("reference", reference) if which == "both" else reference
            if _opt(args, "epochs", None) is not None:
                plan["epochs"] = int(args.epochs)
            for k in ("eval_every", "checkpoint_every", "keep_checkpoints"):
                if getattr(args, k, None) not in (None, 0, 2) or k not in plan:
                    plan[k] = int(_opt(args, k, plan.get(k, 0)))
            backends = plan.get("backends", backends) if which == "both" else backends
        else:
            try:
                cfg = load_config(_opt(args, "config", "smoke"))
            except ConfigError as e:
                raise RunError(f"config: {e}", cause="config") from None
            cfg = apply_overrides(cfg, _opt(args, "lr", None), _opt(args, "batch_size", None))
            seed = int(_opt(args, "seed", 0))
            if seed < 0:
                raise RunError(f"--seed must be >= 0, got {seed}")
            epochs = int(_opt(args, "epochs", cfg.train.epochs))
            if epochs < 1:
                raise RunError(f"--epochs must be >= 1, got {epochs}")
            for n in ("limit_images", "limit_val"):
                v = _opt(args, n, None)
                if v is not None and v < 1:
                    raise RunError(f"--{n.replace('_', '-')} must be >= 1, got {v}")
            plan = {"epochs": epochs, "batch_size": cfg.train.batch_size, "eval_batch_size": cfg.train.batch_size,
                    "eval_every": int(_opt(args, "eval_every", 0)),
                    "checkpoint_every": int(_opt(args, "checkpoint_every", 0)),
                    "keep_checkpoints": int(_opt(args, "keep_checkpoints", 2)),
                    "lr": cfg.optimizer.lr, "lr_override": _opt(args, "lr", None),
                    "group_lrs": [g.lr for g in cfg.optimizer.groups],
                    "lr_milestones": list(cfg.train.lr_milestones), "lr_gamma": cfg.train.lr_gamma,
                    "limit_images": _opt(args, "limit_images", None), "limit_val": _opt(args, "limit_val", None),
                    "image_size": list(cfg.train.image_size), "multi_scale": cfg.train.multi_scale,
                    "ema": cfg.ema.enabled, "clip_max_norm": cfg.optimizer.clip_max_norm,
                    "dtype": dtype, "reference": reference, "backends": backends, "seed": seed,
                    "config": str(_opt(args, "config", "smoke"))}
            out = os.path.abspath(_opt(args, "out", None) or _default_out(cfg.name))
            case_dir = os.path.join(out, "case")
        if stop_after is not None and stop_after < 1:
            raise RunError(f"--stop-after-epoch must be >= 1, got {stop_after}")
        if faults and fault_side not in backends:
            raise RunError(f"--inject-fault on the {fault_side} side, but that backend does not run")

        sides_spec = side_labels(dtype, backends, reference)
        pys = {}
        try:
            for be in backends:
                pys[be] = resolve_python(be, _opt(args, f"{be}_python", None))
        except RunnerError as e:
            raise RunError(str(e), side=e.side, cause=e.cause) from None
        os.makedirs(out, exist_ok=True)
        for stale in ("result.json", "summary.md", "error.json"):
            p = os.path.join(out, stale)
            if os.path.exists(p):
                os.unlink(p)
        sides = [Side(d["label"], d["role"], d["backend"], d["dtype"], pys[d["backend"]], out) for d in sides_spec]
        base_info.update(config=cfg.name, config_digest=cfg.digest(), dtype=dtype, device=device, seed=seed,
                         out=out, labels={s.role: s.label for s in sides}, plan=plan, threads=threads,
                         sequential=bool(_opt(args, "sequential", False)), faults=faults,
                         fault_side=fault_side if faults else None)

        print(f"parity run --stage train: config {cfg.name} ({cfg.digest()}), {dtype}"
              f"{' + float64 reference' if reference else ''}, {plan['epochs']} epochs, batch {cfg.train.batch_size}, "
              f"seed {seed}, sides {', '.join(s.label for s in sides)}{' (resume)' if resume_dir else ''} -> {out}",
              flush=True)
        try:
            versions = preflight([Job(s.label, s.role, s.backend, s.python, s.dtype, "train", "") for s in sides], verbose)
        except RunnerError as e:
            raise RunError(str(e), side=e.side, cause=e.cause) from None

        t_case = time.perf_counter()
        if resume_dir:
            _write_streams(case_dir, cfg, manifest, verify_existing=True)
            manifest["plan"] = plan
            write_json(os.path.join(case_dir, "manifest.json"), manifest)
        else:
            manifest = build_train_case(case_dir, cfg, seed=seed, data_root=_opt(args, "data", None),
                                        weights_path=_opt(args, "weights", None), plan=plan,
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
                    _start(s, out, device, threads, bool(resume_dir), stop_after, fault_for[s.label], verbose)
                    _wait([s], progress, plan["epochs"], timeout)
                    _check_side(s)
            else:
                for s in sides:
                    _start(s, out, device, threads, bool(resume_dir), stop_after, fault_for[s.label], verbose)
                _wait(sides, progress, plan["epochs"], timeout)
                for s in sides:
                    _check_side(s)
        except BaseException:
            for s in sides:
                _kill(s)
            raise

        # collect
        progress.line("  evaluating and comparing ...")
        logs = {s.label: read_json(os.path.join(s.dir, "log.json")) for s in sides}
        maps = {s.label: evaluate_side(s.dir, manifest, cfg) for s in sides}
        case_digests = manifest["streams"]["batch_digests"]
        inputs_ok = {}
        for s in sides:
            got = [(r["epoch"], r["step"], r["batch"]) for r in logs[s.label]["iterations"]]
            inputs_ok[s.label] = all(case_digests[str(e)][k] == b for e, k, b in got)
        cmp_ = compare(out, sides, logs, maps, cfg, thresholds)
        statuses = {s.label: logs[s.label].get("status") for s in sides}
        nonfinite = {lab: logs[lab]["nonfinite"] for lab in logs if logs[lab].get("nonfinite")}

        checks: List[Dict[str, Any]] = []
        for s in sides:
            checks.append({"check": f"inputs_{s.label}", "text": f"{s.label} consumed exactly the case's streams",
                           "value": inputs_ok[s.label], "passed": bool(inputs_ok[s.label]), "rule": "exact"})
        verdict_sides = [s for s in sides if s.role != "ref"]
        for s in verdict_sides:
            nf = logs[s.label].get("nonfinite")
            if nf:
                others = [logs[o.label].get("nonfinite") for o in verdict_sides if o is not s]
                same = all(o and o["iteration"] == nf["iteration"] for o in others) and others
                checks.append({"check": f"finite_{s.label}", "passed": bool(same), "rule": "exact",
                               "text": f"{s.label} losses stay finite",
                               "value": f"non-finite {nf['term']} at iteration {nf['iteration']} (epoch {nf['epoch']})",
                               "reason": "both sides hit it at the same iteration" if same else
                               f"{s.label} stopped: non-finite {nf['term']} at iteration {nf['iteration']}"})
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
        from .bench import host_info
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
            from .report import train_markdown
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
            _kill(s)
        print("parity: interrupted", file=sys.stderr)
        _write_error(out, base_info, RunError("interrupted by the user", cause="interrupted"), t_start)
        return 130
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def command_of(args: argparse.Namespace, plan: Dict[str, Any], out: str, resumed: bool = False) -> List[str]:
    """The command that reproduces this run (a resumed run: the fresh-run equivalent)."""
    cmd = ["parity", "run", "--stage", "train", "--config", str(_opt(args, "config", "smoke")) if not resumed
           else str(getattr(args, "_config_name", None) or plan.get("config") or _opt(args, "config", "smoke")),
           "--dtype", plan.get("dtype", "float32"), "--device", str(_opt(args, "device", "cpu")),
           "--seed", str(plan.get("seed", 0)), "--epochs", str(plan["epochs"]), "--batch-size", str(plan["batch_size"])]
    for flag, key in (("--limit-images", "limit_images"), ("--limit-val", "limit_val"), ("--lr", "lr_override")):
        if plan.get(key) is not None:
            cmd += [flag, str(plan[key])]
    for flag, key in (("--eval-every", "eval_every"), ("--checkpoint-every", "checkpoint_every")):
        if plan.get(key):
            cmd += [flag, str(plan[key])]
    cmd += ["--threads", str(_opt(args, "threads", 1))]
    if plan.get("backends") and len(plan["backends"]) == 1:
        cmd += ["--backend", plan["backends"][0]]
    if plan.get("dtype", "float32") == "float32" and not plan.get("reference", True):
        cmd.append("--no-reference")
    if _opt(args, "data", None):
        cmd += ["--data", args.data]
    if _opt(args, "weights", None):
        cmd += ["--weights", args.weights]
    cmd += ["--out", out]
    return cmd


def _default_out(config_name: str) -> str:
    from .runner import default_out
    return default_out("train", config_name)


def _write_error(out: Optional[str], base: Dict[str, Any], err: RunError, t_start: float) -> None:
    if not out or not os.path.isdir(out):
        return
    from . import curves
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
