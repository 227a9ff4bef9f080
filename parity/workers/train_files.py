"""The files of one train side (parity/workers/train.py): the case it reads, weights as
safetensors, the evaluation outputs, the checkpoints (written to a temporary folder, then renamed: a folder is complete), and the
per-iteration / per-epoch records of its log."""
from __future__ import annotations

import glob
import math
import os
import shutil
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from rtdetr_core.param_spec import param_spec
from safetensors.numpy import load_file, save

from parity.fileio import atomic_output, read_json, sha256_file, write_bytes, write_json, write_npz
from parity.workers.common import EXIT_INPUT, WorkerFailure
from parity.workers.topk_capture import TOPK_CAPTURE, topk_selection


LOG_SCHEMA = 1



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
    with atomic_output(path) as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def nonfinite_weights(adapter) -> List[str]:
    """Names of floating state entries holding NaN or inf (diagnostics of a non-finite stop)."""
    return [k for k, v in adapter.export_weights().items() if v.dtype.kind == "f" and not np.all(np.isfinite(v))]


def nonfinite_error(e: Exception, adapter, epoch: int, iteration: int, step: int) -> Optional[Dict[str, Any]]:
    """The ``nonfinite`` event of a training step that raised because of NaN / inf (the matcher
    refuses a non-finite cost), or None when the error has nothing to do with them."""
    bad_w = nonfinite_weights(adapter)
    msg = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if not bad_w and "nan" not in msg.lower() and "inf" not in msg.lower():
        return None
    term = "matching cost" if "matching cost" in msg else type(e).__name__
    return dict(nonfinite_event(adapter, epoch, iteration, step, term, "error", bad_w), error=msg)


def nonfinite_event(adapter, epoch: int, iteration: int, step: int, term: str, value: str,
                    bad_w: Optional[List[str]] = None) -> Dict[str, Any]:
    """log.json's ``nonfinite``: where, which term, and the weight tensors already poisoned."""
    bad_w = nonfinite_weights(adapter) if bad_w is None else bad_w
    return {"epoch": epoch, "iteration": iteration, "step": step, "term": term, "value": value,
            "nonfinite_weights": len(bad_w), "examples": bad_w[:5]}


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


class SideFiles:
    """The case read, weights, checkpoints and evaluation outputs of a train side (mixed into
    ``TrainWorker``: uses ``self.dir``, ``self.case_dir``, ``self.cfg``, ``self.args``, ``self.plan``,
    ``self.adapter``, ``self.log``, ``self.iteration``, ``self.status``)."""

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
        data = save({k: np.ascontiguousarray(v) for k, v in weights.items()},
                    metadata={"config_digest": self.cfg.digest(), "written_by": "parity.workers.train",
                              "backend": self.args.backend, "dtype": self.args.dtype})
        write_bytes(path, data)

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
