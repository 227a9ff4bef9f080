"""Serving prediction worker (one per backend, in that backend's interpreter).

    python -m parity.workers.predict --backend torch|jittor --case DIR [--device cpu|cuda]
                                    [--dtype float32|float64]

Reads the model (config + weights) from a case folder (``parity/case/folder.py``: manifest hashes
and config digest checked), then answers JSON-line requests on stdin (protocol:
``parity/sides/serving.py``)::

    {"cmd": "predict", "id": K, "inputs": "B.npz", "out": "R.npz", "postprocess": true}

``B.npz``: ``images`` [B,3,H,W] float32 (cast to --dtype here), ``orig_sizes`` int64 [B,2]
(h, w).  ``R.npz`` (written atomically): ``pred_logits`` [B,Q,C] and ``pred_boxes`` [B,Q,4]
exactly as ``Adapter.forward`` returned them, ``topk_index`` / ``topk_scores`` [B,Q] (the
encoder token behind each query, ``parity/workers/topk_capture.py``), and with ``postprocess`` this backend's own
``Adapter.postprocess`` output stacked over the batch: ``scores`` [B,K], ``labels`` int64
[B,K] (contiguous labels 0..C-1), ``boxes`` [B,K,4] xyxy in original pixels.

The helpers it shares with ``parity/workers/bench.py`` (``open_channel``, ``emit``,
``import_backend``, ``check_device``, ``load_model``, ``fail_event``) are in
``parity/workers/common.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np

from parity.fileio import write_npz
from parity.workers.common import (EXIT_INPUT, EXIT_OK, WorkerFailure, check_device, emit, fail_event, import_backend,
    load_model, one_line, peak_rss_mb, serving_main, set_threads, threads_info)
from parity.workers.topk_capture import TOPK_CAPTURE, topk_selection


def stack_dets(dets: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    return {"scores": np.stack([np.asarray(d["scores"]) for d in dets]),
            "labels": np.stack([np.asarray(d["labels"]).astype(np.int64) for d in dets]),
            "boxes": np.stack([np.asarray(d["boxes"]) for d in dets])}


def serve(args: argparse.Namespace) -> int:
    be = args.backend
    phase = "import"
    timing: Dict[str, float] = {}
    try:
        t = time.perf_counter()
        mod, versions = import_backend(be)
        timing["import"] = time.perf_counter() - t
        omp = os.environ.get("OMP_NUM_THREADS")
        set_threads(be, int(omp) if omp and omp.isdigit() else None)
        phase = "device"
        check_device(be, args.device)
        phase = "model"
        adapter, case = load_model(mod, be, args.case, args.dtype, args.device, timing)
        emit("ready", backend=be, versions=versions, timing=timing, threads=threads_info(be),
             device=args.device, dtype=args.dtype, config=case.cfg.name, config_digest=case.digest)
        phase = "serve"
        n = 0
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            req = json.loads(line)
            cmd = req.get("cmd")
            if cmd == "quit":
                break
            if cmd != "predict":
                raise WorkerFailure("serve", EXIT_INPUT, f"unknown command {cmd!r}")
            phase = f"predict {req.get('id')}"
            try:
                with np.load(req["inputs"], allow_pickle=False) as z:
                    images = z["images"]
                    sizes = z["orig_sizes"]
            except (OSError, KeyError, ValueError) as e:
                raise WorkerFailure(phase, EXIT_INPUT, f"{req.get('inputs')}: cannot read the batch ({one_line(e)})") \
                    from None
            images = images.astype(args.dtype, copy=False)
            t = time.perf_counter()
            out = adapter.forward(images, capture=TOPK_CAPTURE)
            dt = time.perf_counter() - t
            arrays: Dict[str, np.ndarray] = {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"],
                                             **topk_selection(out)}
            if req.get("postprocess", True):
                arrays.update(stack_dets(adapter.postprocess(out, sizes)))
            write_npz(req["out"], arrays, meta={"backend": be, "seconds": dt, "first": n == 0})
            n += 1
            emit("done", id=req.get("id"), seconds=dt)
            phase = "serve"
        emit("bye", backend=be, peak_rss_mb=peak_rss_mb(), batches=n)
        return EXIT_OK
    except BaseException as e:  # noqa: BLE001 - every failure becomes an error event
        if isinstance(e, SystemExit):
            raise
        return fail_event(be, phase, e)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m parity.workers.predict", description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=["torch", "jittor"])
    p.add_argument("--case", required=True, help="case folder with config + weights")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    return p


def main(argv: Optional[List[str]] = None) -> int:
    return serving_main(build_parser(), serve, argv)


if __name__ == "__main__":
    sys.exit(main())
