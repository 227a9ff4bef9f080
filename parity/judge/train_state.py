"""Train stage: what the loss curves cannot show — buffers and eval-mode outputs.

Training runs in train mode: BatchNorm normalises by batch statistics, so its running
statistics (``running_mean``, ``running_var``, ``num_batches_tracked``) never touch a loss
or a gradient.  A bug that only touches them (a wrong BN momentum, a biased running
variance — Jittor's own default) leaves every loss term in lock-step and the trainable
parameters equal, and with little training the mAP says nothing either.  Two comparisons
close that hole (judged as ``buffer_rel`` and ``eval_outputs_rel`` in ``parity/judge/curves.py``):

* :func:`buffer_errors`  every state entry that is not a trainable parameter (buffers, frozen
  parameters), side A vs side B, at every checkpoint both sides still hold
  (``checkpoints/epoch_NNNN/weights.safetensors``) and at the end (``final.safetensors``).
  Floating entries: rel L2 per tensor; integer counters must be equal (a different count
  is a different number of BN updates: ``inf``).  The metric is the worst tensor.
* :func:`eval_output_errors`  the eval-mode ``pred_logits`` / ``pred_boxes`` every side saved
  for the mAP (``eval/epoch_NNNN.npz``: running statistics in use), at every epoch evaluated
  on both sides, compared with the tie pairing of ``parity/judge/outputs_match.py``.
"""
from __future__ import annotations

import glob
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from safetensors import safe_open

from parity.judge.outputs_match import DEFAULT_MAX_TIE_ROWS, KEYS, outputs_rel, rel_l2, selection_of


def state_names(cfg) -> Tuple[List[str], List[str]]:
    """``(floating, integer)`` spec entries outside the trainable parameters."""
    from rtdetr_core.param_spec import param_spec
    ent = [e for e in param_spec(cfg) if not (e.kind == "param" and e.trainable)]
    return [e.name for e in ent if e.dtype != "int64"], [e.name for e in ent if e.dtype == "int64"]


def checkpoint_points(dirs: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """``[(point, [file per dir])]``: every checkpoint epoch present in all ``dirs`` (older ones
    may have been pruned by ``--keep-checkpoints``), then ``final`` when every dir has it."""
    def epochs(d):
        return {os.path.basename(p) for p in glob.glob(os.path.join(d, "checkpoints", "epoch_[0-9][0-9][0-9][0-9]"))
                if os.path.isfile(os.path.join(p, "state.json"))}
    common = set.intersection(*(epochs(d) for d in dirs)) if dirs else set()
    pts = [(e, [os.path.join(d, "checkpoints", e, "weights.safetensors") for d in dirs]) for e in sorted(common)]
    finals = [os.path.join(d, "final.safetensors") for d in dirs]
    if dirs and all(os.path.isfile(f) for f in finals):
        pts.append(("final", finals))
    return pts


def _read(path: str, names: Sequence[str]) -> Dict[str, np.ndarray]:
    with safe_open(path, framework="numpy") as f:
        have = set(f.keys())
        return {n: f.get_tensor(n) for n in names if n in have}


def buffer_errors(dir_a: str, dir_b: str, floating: Sequence[str], integer: Sequence[str]) -> Optional[Dict[str, Any]]:
    """Side A vs side B over every common point (see the module docstring); ``None`` when
    no point is common (the caller decides whether that is allowed)."""
    pts = checkpoint_points([dir_a, dir_b])
    if not pts:
        return None
    per_point: List[Dict[str, Any]] = []
    worst, worst_at = 0.0, None
    for point, (pa, pb) in pts:
        a, b = _read(pa, list(floating) + list(integer)), _read(pb, list(floating) + list(integer))
        p_worst, p_name, bad_int, missing = 0.0, None, [], []
        for n in list(floating) + list(integer):
            if n not in a or n not in b:
                missing.append(n)
                r = math.inf
            elif n in integer:
                eq = np.array_equal(np.asarray(a[n]).reshape(-1), np.asarray(b[n]).reshape(-1))
                r = 0.0 if eq else math.inf
                if not eq:
                    bad_int.append(f"{n}: {np.asarray(a[n]).reshape(-1).tolist()} vs {np.asarray(b[n]).reshape(-1).tolist()}")
            else:
                r = rel_l2(a[n], b[n])
            if p_name is None or r > p_worst:
                p_worst, p_name = r, n
        ent = {"point": point, "worst": p_worst, "tensor": p_name, "integer_mismatch": bad_int[:5],
               "n_integer_mismatch": len(bad_int), "missing": missing[:5], "n_missing": len(missing)}
        per_point.append(ent)
        if worst_at is None or p_worst > worst:
            worst, worst_at = p_worst, {"point": point, "tensor": p_name}
    return {"worst": worst, "worst_at": worst_at, "points": per_point, "n_floating": len(floating),
            "n_integer": len(integer)}


def eval_epochs(side_dir: str) -> List[int]:
    return sorted(int(os.path.basename(p)[6:10]) for p in glob.glob(os.path.join(side_dir, "eval", "epoch_[0-9][0-9][0-9][0-9].npz")))


def eval_output_errors(dir_a: str, dir_b: str, max_tie_rows: int = DEFAULT_MAX_TIE_ROWS) -> Optional[Dict[str, Any]]:
    """Eval-mode outputs, side A vs side B, at every epoch evaluated on both; ``None`` if none."""
    common = sorted(set(eval_epochs(dir_a)) & set(eval_epochs(dir_b)))
    if not common:
        return None
    per_epoch = []
    for e in common:
        arr, idx = [], []
        for d in (dir_a, dir_b):
            with np.load(os.path.join(d, "eval", f"epoch_{e:04d}.npz"), allow_pickle=False) as z:
                arr.append({k: z[k] for k in KEYS})
                idx.append(selection_of(z))
        # where both sides recorded which encoder token each query came from: pair by token
        r = outputs_rel(arr[0], arr[1], max_tie_rows, tuple(idx))
        per_epoch.append({"epoch": e, **{k: r[k] for k in KEYS}, "worst": r["worst"], "flip": r["flip"]})
    w = max(per_epoch, key=lambda x: x["worst"])
    return {"worst": w["worst"], "worst_at": w["epoch"], "epochs": per_epoch,
            "tie_flips": sum(1 for p in per_epoch if p["flip"])}
