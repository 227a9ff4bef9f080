"""One side of ``parity run --stage train``, in that framework's own interpreter.

    python -m parity.train_worker --backend torch|jittor --run RUN_DIR --side LABEL \
        [--dtype float32|float64] [--device cpu|cuda] [--threads N] [--resume] \
        [--stop-after-epoch N] [--inject-fault SPEC ...]

Input: the run's case folder ``RUN_DIR/case`` written once by the runner
(``parity/train_stage.py``): ``config.json``, ``weights.safetensors`` (initial weights),
``data.npz`` (every train/val image already decoded and resized, float32, and the targets),
``streams/epoch_NNNN.npz`` (per epoch: the image order and, per iteration, the dataset
indices, the denoising draws and the multi-scale size) and ``manifest.json`` (hashes, plan).
Both sides read the very same files, so they consume identical data, order, denoising
draws and sizes; nothing random is drawn here.

Output, all under ``RUN_DIR/LABEL/`` (every file written atomically)::

    status.json                       {"phase", "epoch", "iteration", "elapsed"}: progress
    log.json                          per-iteration records (every loss term, total, lr per
                                      group, pre-clip grad norm, batch digest, seconds), per-epoch
                                      means, status (running | completed | stopped | nonfinite),
                                      the non-finite event, versions, threads, peak RSS;
                                      rewritten after every epoch
    eval/epoch_NNNN.npz               pred_logits / pred_boxes / topk_index / topk_scores of the val images (EMA model when
                                      EMA is on); the runner turns them into COCO mAP
    checkpoints/epoch_NNNN/           weights.safetensors (adapter dtype), train_state.npz
                                      (optimizer moments/steps/lr, EMA), state.json (epoch,
                                      stream states, the log up to here) — written to a
                                      temporary folder, then renamed: a folder is complete
    final.safetensors                 the weights after the last epoch (parameter drift)
    error.json                        on failure (phase, message, traceback); exit code 3
                                      environment, 4 input (case / config / weights / fault), 1 crash

A non-finite loss term (or total, or gradient norm) stops this side at once: ``log.json``
gets ``status: nonfinite`` and ``nonfinite: {"epoch", "iteration", "term", "value"}``; exit 0
(it is a result, the report says so).

``--resume``: continue from the newest complete checkpoint (weights, optimizer + EMA state,
log; stream states checked against the case) — the curve then equals an uninterrupted run
bit for bit.  ``--stop-after-epoch N``: stop after epoch N as if interrupted there, after
writing a checkpoint of epoch N.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .fileio import read_json, read_npz_meta, sha256_file, write_bytes, write_json, write_npz
from .topk_capture import TOPK_CAPTURE, topk_selection
from .worker import EXIT_CRASH, EXIT_ENV, EXIT_INPUT, EXIT_OK, Worker, WorkerFailure, peak_rss_mb

LOG_SCHEMA = 1
NONFINITE_PREFIX = "nonfinite:"


# ----------------------------------------------------------------------------------------
# shared helpers (also imported by the runner: numpy + stdlib only)
# ----------------------------------------------------------------------------------------

def lr_factor(epoch: int, milestones: Sequence[int], gamma: float) -> float:
    """Official MultiStepLR stepped once per epoch: during epoch ``epoch`` (1-based) the
    scheduler has stepped ``epoch - 1`` times, so lr = base * gamma^#{m in milestones: m <= epoch-1}."""
    return float(gamma) ** sum(1 for m in milestones if int(m) <= epoch - 1)


def epoch_file(case_dir: str, epoch: int) -> str:
    return os.path.join(case_dir, "streams", f"epoch_{epoch:04d}.npz")


def batch_digest(images: np.ndarray, targets: Sequence[Dict[str, np.ndarray]], dn: Optional[Dict[str, np.ndarray]],
                 ms: Optional[int]) -> str:
    """sha1 of everything one iteration consumes (images as float32, labels, boxes, dn draws,
    multi-scale size): equal digests on both sides = identical inputs."""
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    for t in targets:
        h.update(np.ascontiguousarray(t["labels"], dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(t["boxes"], dtype=np.float32).tobytes())
    if dn is not None:
        for k in sorted(dn):
            h.update(k.encode())
            h.update(np.ascontiguousarray(dn[k]).tobytes())
    h.update(repr(ms).encode())
    return h.hexdigest()[:16]


def read_epoch_streams(path: str) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """``(meta, iterations)``; each iteration ``{"indices", "dn_draws" (dict | None), "multi_scale_size"}``."""
    with np.load(path, allow_pickle=False) as z:
        meta = read_npz_meta(z)
        its = []
        for k in range(int(meta["iterations"])):
            dn_keys = [f for f in z.files if f.startswith(f"it{k}.dn.")]
            dn = {f[len(f"it{k}.dn."):]: z[f] for f in dn_keys} if dn_keys else None
            ms = int(np.asarray(z[f"it{k}.ms"]).reshape(-1)[0])
            its.append({"indices": z[f"it{k}.indices"], "dn_draws": dn, "multi_scale_size": None if ms < 0 else ms})
    return meta, its


def load_data(case_dir: str) -> Dict[str, Any]:
    """The decoded images and targets of ``data.npz``."""
    with np.load(os.path.join(case_dir, "data.npz"), allow_pickle=False) as z:
        meta = read_npz_meta(z)
        d = {"train_images": z["train.images"],
             "train_targets": [{"labels": z[f"train.{i}.labels"], "boxes": z[f"train.{i}.boxes"]}
                               for i in range(int(meta["n_train"]))],
             "train_ids": z["train.image_ids"],
             "val_images": z["val.images"], "val_orig_sizes": z["val.orig_sizes"], "val_ids": z["val.image_ids"],
             "meta": meta}
    return d


def finite_check(res: Dict[str, Any]) -> Optional[Tuple[str, float]]:
    """First non-finite value of a train_step result: a loss term (official order), the
    total, or the gradient norm."""
    for k, v in res["losses"].items():
        if not math.isfinite(float(v)):
            return k, float(v)
    if not math.isfinite(float(res["total"])):
        return "total", float(res["total"])
    if not math.isfinite(float(res["grad_norm"])):
        return "grad_norm", float(res["grad_norm"])
    return None


def write_npz_exact(path: str, arrays: Dict[str, np.ndarray]) -> None:
    """Atomic uncompressed npz keeping every array's exact shape (0-d scalars stay 0-d;
    ``fileio.write_npz`` makes them [1])."""
    from .fileio import atomic_output
    with atomic_output(path) as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def nonfinite_weights(adapter) -> List[str]:
    """Names of floating state entries holding NaN or inf (diagnostics of a non-finite stop)."""
    return [k for k, v in adapter.export_weights().items() if v.dtype.kind == "f" and not np.all(np.isfinite(v))]


def _json_float(x: float) -> Any:
    """JSON has no NaN/inf: keep them as strings (the log must stay valid JSON)."""
    x = float(x)
    return x if math.isfinite(x) else repr(x)


def epoch_summary(records: Sequence[Dict[str, Any]], epoch: int) -> Dict[str, Any]:
    """Means of every loss term, the total and the grad norm over one epoch's iterations."""
    recs = [r for r in records if r["epoch"] == epoch]
    # a batch without boxes gets no denoising, hence no dn terms (as the official criterion):
    # every term is averaged over the iterations that have it (``counts``)
    terms: List[str] = []
    for r in recs:
        terms += [t for t in r["losses"] if t not in terms]
    vals = {t: [float(r["losses"][t]) for r in recs if t in r["losses"]] for t in terms}
    mean = OrderedDict((t, float(np.mean(vals[t]))) for t in terms)
    counts = OrderedDict((t, len(vals[t])) for t in terms if len(vals[t]) != len(recs))
    return {"epoch": epoch, "iterations": len(recs), "mean": mean, "term_counts": counts,
            "mean_total": float(np.mean([float(r["total"]) for r in recs])) if recs else None,
            "mean_grad_norm": float(np.mean([float(r["grad_norm"]) for r in recs])) if recs else None,
            "lr": recs[0]["lr"] if recs else None}


# ----------------------------------------------------------------------------------------
# the worker
# ----------------------------------------------------------------------------------------

class TrainWorker:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.perf_counter()
        self.phase = "start"
        self.dir = os.path.join(args.run, args.side)
        self.case_dir = os.path.join(args.run, "case")
        self.epoch = 0
        self.iteration = 0
        self.prev_wall = 0.0

    # --- bookkeeping ---------------------------------------------------------------------
    def status(self, phase: str, **extra: Any) -> None:
        self.phase = phase
        try:
            write_json(os.path.join(self.dir, "status.json"),
                       {"phase": phase, "epoch": self.epoch, "iteration": self.iteration,
                        "elapsed": time.perf_counter() - self.t0, **extra})
        except OSError:
            pass

    def write_log(self) -> None:
        self.log["peak_rss_mb"] = peak_rss_mb()
        self.log["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json(os.path.join(self.dir, "log.json"), self.log)

    # --- setup -----------------------------------------------------------------------------
    def import_backend(self):
        w = Worker(argparse.Namespace(backend=self.args.backend, out=None))
        mod = w.import_backend()
        self.versions = w.versions
        return mod

    def read_case(self) -> None:
        from rtdetr_core.config import ConfigError, config_from_dict
        mpath = os.path.join(self.case_dir, "manifest.json")
        if not os.path.isfile(mpath):
            raise WorkerFailure("case", EXIT_INPUT, f"{self.case_dir}: not a complete train case (no manifest.json)")
        self.manifest = read_json(mpath)
        if self.manifest.get("stage") != "train":
            raise WorkerFailure("case", EXIT_INPUT, f"{self.case_dir}: case stage {self.manifest.get('stage')!r}, expected 'train'")
        for name, want in self.manifest["files"].items():
            p = os.path.join(self.case_dir, name)
            if not os.path.isfile(p):
                raise WorkerFailure("case", EXIT_INPUT, f"{p}: case file missing")
            if sha256_file(p) != want:
                raise WorkerFailure("case", EXIT_INPUT, f"{p}: case file corrupted (sha256 differs from the manifest)")
        try:
            self.cfg = config_from_dict(read_json(os.path.join(self.case_dir, "config.json")),
                                        src=os.path.join(self.case_dir, "config.json"))
        except ConfigError as e:
            raise WorkerFailure("config", EXIT_INPUT, f"config: {e}") from None
        if self.cfg.digest() != self.manifest["config_digest"]:
            raise WorkerFailure("config", EXIT_INPUT, f"config mismatch: this side built config digest "
                                                      f"{self.cfg.digest()}, the case says {self.manifest['config_digest']}")
        self.plan = self.manifest["plan"]

    def read_safetensors(self, path: str) -> "OrderedDict[str, np.ndarray]":
        from safetensors.numpy import load_file
        from rtdetr_core.param_spec import param_spec
        try:
            raw = load_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors has its own error types
            raise WorkerFailure("weights", EXIT_INPUT, f"{path}: cannot read ({' '.join(str(e).split())[:200]})") from None
        spec = param_spec(self.cfg)
        missing = [e.name for e in spec if e.name not in raw]
        if missing:
            raise WorkerFailure("weights", EXIT_INPUT, f"{path}: {len(missing)} entries missing, e.g. {missing[0]}")
        bad = [e.name for e in spec if raw[e.name].size != int(np.prod(e.shape))]
        if bad:
            raise WorkerFailure("weights", EXIT_INPUT, f"{path}: {len(bad)} entries with other shapes, e.g. {bad[0]}")
        # safetensors stores 0-d tensors (num_batches_tracked) as [1]: back to the spec shape
        return OrderedDict((e.name, np.array(raw[e.name]).reshape(e.shape)) for e in spec)

    def save_safetensors(self, path: str, weights: Dict[str, np.ndarray]) -> None:
        from safetensors.numpy import save
        data = save({k: np.ascontiguousarray(v) for k, v in weights.items()},
                    metadata={"config_digest": self.cfg.digest(), "written_by": "parity.train_worker",
                              "backend": self.args.backend, "dtype": self.args.dtype})
        write_bytes(path, data)

    # --- checkpoints -------------------------------------------------------------------------
    def ckpt_root(self) -> str:
        return os.path.join(self.dir, "checkpoints")

    def latest_checkpoint(self) -> Optional[str]:
        best = None
        for d in sorted(glob.glob(os.path.join(self.ckpt_root(), "epoch_[0-9][0-9][0-9][0-9]"))):
            if os.path.isfile(os.path.join(d, "state.json")):
                best = d
        return best

    def write_checkpoint(self, epoch: int, stream_state_after: Any) -> str:
        root = self.ckpt_root()
        final = os.path.join(root, f"epoch_{epoch:04d}")
        tmp = os.path.join(root, f".epoch_{epoch:04d}.partial")
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        self.save_safetensors(os.path.join(tmp, "weights.safetensors"), self.adapter.export_weights())
        write_npz_exact(os.path.join(tmp, "train_state.npz"), self.adapter.export_train_state())
        state = {"schema": LOG_SCHEMA, "epoch": epoch, "iteration": self.iteration, "backend": self.args.backend,
                 "dtype": self.args.dtype, "config_digest": self.cfg.digest(),
                 "stream_state_after": stream_state_after,
                 "files": {f: sha256_file(os.path.join(tmp, f)) for f in ("weights.safetensors", "train_state.npz")},
                 "log": {k: self.log[k] for k in ("iterations", "epochs", "evals")}}
        write_json(os.path.join(tmp, "state.json"), state)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        keep = int(self.plan.get("keep_checkpoints", 0) or 0)
        if keep > 0:
            done = sorted(glob.glob(os.path.join(root, "epoch_[0-9][0-9][0-9][0-9]")))
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, d: str) -> Dict[str, Any]:
        state = read_json(os.path.join(d, "state.json"))
        for f, want in state["files"].items():
            if sha256_file(os.path.join(d, f)) != want:
                raise WorkerFailure("resume", EXIT_INPUT, f"{d}/{f}: checkpoint file corrupted")
        if state["config_digest"] != self.cfg.digest() or state["dtype"] != self.args.dtype \
                or state["backend"] != self.args.backend:
            raise WorkerFailure("resume", EXIT_INPUT, f"{d}: checkpoint of {state['backend']} {state['dtype']} "
                                                      f"config {state['config_digest']}, this side is "
                                                      f"{self.args.backend} {self.args.dtype} {self.cfg.digest()}")
        self.adapter.load_weights(self.read_safetensors(os.path.join(d, "weights.safetensors")))
        with np.load(os.path.join(d, "train_state.npz"), allow_pickle=False) as z:
            ts = OrderedDict((k, z[k]) for k in z.files if k != "__meta__")
        self.adapter.load_train_state(ts)
        return state

    # --- evaluation ------------------------------------------------------------------------
    def evaluate(self, epoch: int) -> None:
        """Eval-mode forward of the val images (EMA weights when EMA is on); predictions saved
        for the runner's COCO evaluation."""
        self.status("eval")
        t = time.perf_counter()
        model = self.adapter
        ema = self.adapter.export_ema_weights() if self.cfg.ema.enabled else None
        if ema is not None:
            if self.eval_adapter is None:
                self.eval_adapter = self.mod.Adapter(self.cfg, dtype=self.args.dtype, device=self.args.device)
            self.eval_adapter.load_weights(ema)
            model = self.eval_adapter
        imgs = self.data["val_images"]
        bs = int(self.plan["eval_batch_size"])
        logits, boxes, topk = [], [], []
        for s in range(0, len(imgs), bs):
            out = model.forward(imgs[s:s + bs].astype(self.args.dtype, copy=False), capture=TOPK_CAPTURE)
            logits.append(np.asarray(out["pred_logits"]))
            boxes.append(np.asarray(out["pred_boxes"]))
            topk.append(topk_selection(out))
        arrays = {"pred_logits": np.concatenate(logits), "pred_boxes": np.concatenate(boxes),
                  **{k: np.concatenate([t[k] for t in topk]) for k in ("topk_index", "topk_scores")},
                  "image_ids": self.data["val_ids"], "orig_sizes": self.data["val_orig_sizes"]}
        write_npz(os.path.join(self.dir, "eval", f"epoch_{epoch:04d}.npz"), arrays,
                  {"epoch": epoch, "ema": ema is not None, "backend": self.args.backend, "dtype": self.args.dtype})
        sec = time.perf_counter() - t
        self.log["evals"].append({"epoch": epoch, "ema": ema is not None, "seconds": sec,
                                  "file": f"eval/epoch_{epoch:04d}.npz"})

    # --- main loop ---------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        os.makedirs(self.dir, exist_ok=True)
        for stale in ("error.json",):
            p = os.path.join(self.dir, stale)
            if os.path.exists(p):
                os.unlink(p)
        self.status("import")
        from .faults import FaultError, apply_weight_faults, install_runtime_faults, maybe_crash, parse_faults
        nonfinite_at = None
        specs = []
        for s in a.inject_fault or []:
            if s.startswith(NONFINITE_PREFIX):
                try:
                    nonfinite_at = int(s[len(NONFINITE_PREFIX):])
                except ValueError:
                    raise WorkerFailure("faults", EXIT_INPUT, f"fault '{s}': expected nonfinite:ITERATION") from None
            else:
                specs.append(s)
        try:
            faults = parse_faults(specs)
        except FaultError as e:
            raise WorkerFailure("faults", EXIT_INPUT, str(e)) from None
        if any(f.kind == "config" for f in faults):
            raise WorkerFailure("faults", EXIT_INPUT, "config faults are not supported by the train stage")
        self.mod = self.import_backend()
        applied = install_runtime_faults(a.backend, faults)
        if a.threads and a.backend == "torch":
            import torch
            torch.set_num_threads(int(a.threads))
        from .predict_worker import check_device, threads_info
        check_device(a.backend, a.device)

        self.status("case")
        self.read_case()
        self.data = load_data(self.case_dir)
        E = int(self.plan["epochs"])

        self.status("build")
        try:
            self.adapter = self.mod.Adapter(self.cfg, dtype=a.dtype, device=a.device)
        except Exception as e:  # noqa: BLE001
            raise WorkerFailure("build", EXIT_CRASH, f"building the {a.backend} model failed: {type(e).__name__}: {e}") from None
        self.eval_adapter = None
        weights = self.read_safetensors(os.path.join(self.case_dir, "weights.safetensors"))
        applied += apply_weight_faults(weights, faults)
        try:
            self.adapter.load_weights(weights)
        except Exception as e:  # noqa: BLE001
            code = EXIT_INPUT if type(e).__name__ == "WeightsError" else EXIT_CRASH
            raise WorkerFailure("weights", code, f"load_weights: {type(e).__name__}: {e}") from None
        base_lrs = self.adapter.get_lr()      # the config's rates (built before any state is loaded)

        self.log: Dict[str, Any] = {
            "schema": LOG_SCHEMA, "backend": a.backend, "side": a.side, "dtype": a.dtype, "device": a.device,
            "config": self.cfg.name, "config_digest": self.cfg.digest(), "status": "running",
            "epochs_planned": E, "base_lrs": base_lrs, "versions": self.versions, "threads": threads_info(a.backend),
            "faults": applied + ([f"nonfinite at iteration {nonfinite_at}"] if nonfinite_at else []),
            "resumed": [], "nonfinite": None, "iterations": [], "epochs": [], "evals": [], "timing": {}}
        start = 1
        if a.resume:
            self.status("resume")
            prev_path = os.path.join(self.dir, "log.json")
            prev = read_json(prev_path) if os.path.isfile(prev_path) else None
            if prev and prev.get("status") == "completed" and prev.get("epochs_planned") == E \
                    and os.path.isfile(os.path.join(self.dir, "final.safetensors")):
                self.status("done", note="already complete")
                print(f"[{a.side}] already complete ({E} epochs): nothing to do", file=sys.stderr)
                return EXIT_OK
            ck = self.latest_checkpoint()
            if ck is not None:
                state = self.load_checkpoint(ck)
                start = int(state["epoch"]) + 1
                self.iteration = int(state["iteration"])
                for k in ("iterations", "epochs", "evals"):
                    self.log[k] = state["log"][k]
                if prev:
                    self.log["resumed"] = list(prev.get("resumed", []))
                    self.prev_wall = float((prev.get("timing") or {}).get("wall_s_total",
                                                                          (prev.get("timing") or {}).get("wall_s", 0.0)))
                self.log["resumed"].append({"from_epoch": int(state["epoch"]), "checkpoint": os.path.relpath(ck, self.dir),
                                            "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
                if start <= E:
                    m0, _ = read_epoch_streams(epoch_file(self.case_dir, start))
                    if m0["state_before"] != state["stream_state_after"]:
                        raise WorkerFailure("resume", EXIT_INPUT, f"{ck}: the stream state after epoch {state['epoch']} "
                                                                  f"differs from the case's epoch {start} streams "
                                                                  f"(case regenerated with other settings?)")
                print(f"[{a.side}] resuming from {ck} (epoch {state['epoch']} done)", file=sys.stderr)
            else:
                print(f"[{a.side}] --resume: no checkpoint yet, starting from epoch 1", file=sys.stderr)
                for d in glob.glob(os.path.join(self.dir, "eval", "*.npz")):
                    os.unlink(d)
        else:
            for d in (self.ckpt_root(), os.path.join(self.dir, "eval")):
                if os.path.isdir(d):
                    shutil.rmtree(d)
            for f in ("final.safetensors", "log.json"):
                if os.path.exists(os.path.join(self.dir, f)):
                    os.unlink(os.path.join(self.dir, f))
        # a resumed run's later artefacts are recomputed: drop evals past the restart point
        self.log["evals"] = [ev for ev in self.log["evals"] if ev["epoch"] < start]
        for f in glob.glob(os.path.join(self.dir, "eval", "epoch_*.npz")):
            if int(os.path.basename(f)[6:10]) >= start:
                os.unlink(f)
        if os.path.exists(os.path.join(self.dir, "final.safetensors")):
            os.unlink(os.path.join(self.dir, "final.safetensors"))

        maybe_crash(faults)
        self.status("train")
        milestones, gamma = self.plan["lr_milestones"], float(self.plan["lr_gamma"])
        eval_every, ckpt_every = int(self.plan["eval_every"]), int(self.plan["checkpoint_every"])
        images_all, targets_all = self.data["train_images"], self.data["train_targets"]
        stop_after = a.stop_after_epoch
        stopped = False
        for epoch in range(start, E + 1):
            self.epoch = epoch
            f = lr_factor(epoch, milestones, gamma)
            self.adapter.set_lr([b * f for b in base_lrs])
            meta, its = read_epoch_streams(epoch_file(self.case_dir, epoch))
            t_epoch = time.perf_counter()
            for step, it in enumerate(its):
                self.iteration += 1
                self.status("train")
                idx = it["indices"]
                images = images_all[idx].astype(a.dtype, copy=False)
                targets = [targets_all[int(i)] for i in idx]
                dn, ms = it["dn_draws"], it["multi_scale_size"]
                if nonfinite_at is not None and self.iteration == nonfinite_at:
                    w = self.adapter.export_weights()
                    name = next(n for n in w if n.startswith("decoder.dec_score_head") and n.endswith("bias"))
                    w[name] = np.full_like(w[name], np.nan)
                    self.adapter.load_weights(w)
                t = time.perf_counter()
                try:
                    res = self.adapter.train_step(images, targets, dn, multi_scale_size=ms)
                except Exception as e:  # noqa: BLE001 - a NaN may surface as an error (matcher)
                    bad_w = nonfinite_weights(self.adapter)
                    msg = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                    if not bad_w and "nan" not in msg.lower() and "inf" not in msg.lower():
                        raise
                    term = "matching cost" if "matching cost" in msg else type(e).__name__
                    self.log["status"] = "nonfinite"
                    self.log["nonfinite"] = {"epoch": epoch, "iteration": self.iteration, "step": step,
                                             "term": term, "value": "error", "error": msg,
                                             "nonfinite_weights": len(bad_w), "examples": bad_w[:5]}
                    print(f"[{a.side}] non-finite values at iteration {self.iteration} (epoch {epoch}): "
                          f"{msg}; {len(bad_w)} non-finite weight tensors: stopping this side", file=sys.stderr)
                    break
                sec = time.perf_counter() - t
                rec = {"iteration": self.iteration, "epoch": epoch, "step": step,
                       "losses": OrderedDict((k, _json_float(v)) for k, v in res["losses"].items()),
                       "total": _json_float(res["total"]), "grad_norm": _json_float(res["grad_norm"]),
                       "lr": [float(x) for x in res["lr"]], "multi_scale_size": ms,
                       "num_boxes": [int(len(tg["labels"])) for tg in targets],
                       "batch": batch_digest(images_all[idx], targets, dn, ms), "seconds": sec}
                self.log["iterations"].append(rec)
                bad = finite_check(res)
                if bad is not None:
                    self.log["status"] = "nonfinite"
                    bad_w = nonfinite_weights(self.adapter)
                    self.log["nonfinite"] = {"epoch": epoch, "iteration": self.iteration, "step": step,
                                             "term": bad[0], "value": repr(bad[1]),
                                             "nonfinite_weights": len(bad_w), "examples": bad_w[:5]}
                    print(f"[{a.side}] non-finite {bad[0]} = {bad[1]} at iteration {self.iteration} "
                          f"(epoch {epoch}): stopping this side", file=sys.stderr)
                    break
            train_s = time.perf_counter() - t_epoch
            summ = epoch_summary(self.log["iterations"], epoch)
            summ.update(seconds=train_s, seconds_per_iteration=train_s / max(1, summ["iterations"]),
                        peak_rss_mb=peak_rss_mb(), complete=self.log["status"] != "nonfinite")
            if summ["mean_total"] is not None and not math.isfinite(summ["mean_total"]):
                summ["mean_total"] = _json_float(summ["mean_total"])
                summ["mean"] = OrderedDict((k, _json_float(v)) for k, v in summ["mean"].items())
                summ["mean_grad_norm"] = _json_float(summ["mean_grad_norm"])
            self.log["epochs"].append(summ)
            if self.log["status"] == "nonfinite":
                self.write_log()
                break
            if epoch == E or (eval_every > 0 and epoch % eval_every == 0):
                self.evaluate(epoch)
            stop_here = stop_after is not None and epoch == stop_after and epoch < E
            if (ckpt_every > 0 and (epoch % ckpt_every == 0 or epoch == E)) or stop_here:
                self.status("checkpoint")
                self.write_checkpoint(epoch, meta["state_after"])
            self.write_log()
            print(f"[{a.side}] epoch {epoch}/{E}: mean loss {summ['mean_total']:.6g}, "
                  f"{train_s:.1f}s", file=sys.stderr)
            if stop_here:
                stopped = True
                break
        if self.log["status"] == "running":
            if stopped:
                self.log["status"] = "stopped"
            else:
                self.status("final")
                self.save_safetensors(os.path.join(self.dir, "final.safetensors"), self.adapter.export_weights())
                self.log["status"] = "completed"
        wall = time.perf_counter() - self.t0
        self.log["timing"]["wall_s"] = wall                     # this invocation
        self.log["timing"]["wall_s_total"] = self.prev_wall + wall   # over every invocation (resumes)
        self.write_log()
        self.status("done")
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m parity.train_worker", description="one side of a parity train run")
    p.add_argument("--backend", required=True, choices=["torch", "jittor"])
    p.add_argument("--run", required=True, help="run folder (holds case/)")
    p.add_argument("--side", required=True, help="this side's label (T32, J32, T64, ...): its folder in the run")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (Jittor: OMP_NUM_THREADS)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--stop-after-epoch", type=int, default=None, help="stop (with a checkpoint) after this epoch")
    p.add_argument("--inject-fault", action="append", default=[], metavar="SPEC",
                   help="tests: weight:NAME:OP=V, upsample:bilinear, bn-momentum:V, crash:KIND, nonfinite:ITERATION")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.run = os.path.abspath(args.run)
    w = TrainWorker(args)
    try:
        return w.run()
    except BaseException as e:  # noqa: BLE001 - every failure must leave an error file
        if isinstance(e, SystemExit):
            raise
        if isinstance(e, WorkerFailure):
            phase, code, msg = e.phase, e.code, str(e)
        elif isinstance(e, KeyboardInterrupt):
            phase, code, msg = w.phase, 130, "interrupted"
        else:
            phase, code = w.phase, EXIT_CRASH
            msg = f"{type(e).__name__}: {' '.join(str(e).split())[:800]}"
        tb = traceback.format_exc()
        print(f"parity.train_worker [{args.side} {args.backend} {args.dtype}] failed in phase '{phase}': {msg}",
              file=sys.stderr)
        if code == EXIT_CRASH:
            print(tb, file=sys.stderr)
        try:
            write_json(os.path.join(w.dir, "error.json"), {
                "backend": args.backend, "side": args.side, "dtype": args.dtype, "phase": phase, "exit_code": code,
                "type": type(e).__name__, "message": msg, "traceback": tb, "epoch": w.epoch,
                "iteration": w.iteration, "peak_rss_mb": peak_rss_mb(), "elapsed": time.perf_counter() - w.t0})
        except OSError:
            pass
        return code


if __name__ == "__main__":
    sys.exit(main())
