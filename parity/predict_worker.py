"""Serving prediction worker (one per backend, in that backend's interpreter).

    python -m parity.predict_worker --backend torch|jittor --case DIR [--device cpu|cuda]
                                    [--dtype float32|float64]

Reads the model (config + weights) from a case folder (``parity/case.py``: manifest hashes
and config digest checked), then answers JSON-line requests on stdin (protocol:
``parity/procs.py``)::

    {"cmd": "predict", "id": K, "inputs": "B.npz", "out": "R.npz", "postprocess": true}

``B.npz``: ``images`` [B,3,H,W] float32 (cast to --dtype here), ``orig_sizes`` int64 [B,2]
(h, w).  ``R.npz`` (written atomically): ``pred_logits`` [B,Q,C] and ``pred_boxes`` [B,Q,4]
exactly as ``Adapter.forward`` returned them, ``topk_index`` / ``topk_scores`` [B,Q] (the
encoder token behind each query, ``parity/topk_capture.py``), and with ``postprocess`` this backend's own
``Adapter.postprocess`` output stacked over the batch: ``scores`` [B,K], ``labels`` int64
[B,K] (contiguous labels 0..C-1), ``boxes`` [B,K,4] xyxy in original pixels.

The helpers here (``open_channel``, ``emit``, ``import_adapter``, ``check_device``,
``load_model``, ``fail_event``) are shared with ``parity/bench_worker.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, TextIO

import numpy as np

from .topk_capture import TOPK_CAPTURE, topk_selection
from .worker import EXIT_CRASH, EXIT_ENV, EXIT_INPUT, EXIT_OK, WorkerFailure
from .worker import peak_rss_mb

_CHANNEL: Optional[TextIO] = None


def open_channel() -> TextIO:
    """Keep the real stdout for the protocol; point fd 1 at stderr so anything else printed
    (Jittor's compiler output, stray prints) lands in the log instead."""
    global _CHANNEL
    if _CHANNEL is None:
        sys.stdout.flush()
        fd = os.dup(1)
        os.dup2(2, 1)
        _CHANNEL = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
    return _CHANNEL


def emit(event: str, **fields: Any) -> None:
    ch = open_channel()
    ch.write(json.dumps({"event": event, **fields}, default=_jsonable) + "\n")
    ch.flush()


def _jsonable(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def one_line(e: BaseException, limit: int = 500) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"


def import_adapter(backend: str):
    """``(adapter module, versions)`` — the import of ``parity.worker`` (backend package first:
    Jittor's import guard), failures as ``WorkerFailure(code 3)``."""
    from .worker import Worker
    w = Worker(argparse.Namespace(backend=backend, out=None))
    mod = w.import_backend()
    return mod, w.versions


def check_device(backend: str, device: str) -> None:
    if device != "cuda":
        return
    if backend == "torch":
        import torch
        if not torch.cuda.is_available():
            raise WorkerFailure("device", EXIT_ENV, f"torch: --device cuda but torch.cuda.is_available() is False "
                                                    f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    else:
        from backends.jittor_impl.framework import jt
        if not jt.has_cuda:
            raise WorkerFailure("device", EXIT_ENV, "jittor: --device cuda but this Jittor has no CUDA "
                                                    "(jt.has_cuda is False)")


def threads_info(backend: str) -> Dict[str, Any]:
    info: Dict[str, Any] = {"cpu_count": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    try:
        info["affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    if backend == "torch":
        import torch
        info["threads"] = torch.get_num_threads()
        info["interop_threads"] = torch.get_num_interop_threads()
    else:
        # Jittor's CPU kernels are OpenMP loops (-fopenmp): OMP_NUM_THREADS or every core
        omp = os.environ.get("OMP_NUM_THREADS")
        info["threads"] = int(omp) if omp and omp.isdigit() else info.get("affinity", os.cpu_count())
    return info


def set_threads(backend: str, n: Optional[int]) -> None:
    if not n:
        return
    if backend == "torch":
        import torch
        torch.set_num_threads(int(n))


def load_model(mod, backend: str, case_dir: str, dtype: str, device: str, timing: Dict[str, float]):
    """Build the backend model of a case folder and load its weights -> (adapter, case)."""
    from .case import Case, CaseError
    try:
        case = Case(case_dir)
    except CaseError as e:
        raise WorkerFailure("case", EXIT_INPUT, str(e)) from None
    cfg = case.cfg
    if cfg.digest() != case.digest:
        raise WorkerFailure("config", EXIT_INPUT, f"config mismatch: this side built config digest {cfg.digest()}, "
                                                  f"the case says {case.digest}")
    t = time.perf_counter()
    try:
        weights = case.weights()
    except CaseError as e:
        raise WorkerFailure("weights", EXIT_INPUT, str(e)) from None
    timing["read_weights"] = time.perf_counter() - t
    t = time.perf_counter()
    try:
        adapter = mod.Adapter(cfg, dtype=dtype, device=device)
    except Exception as e:
        raise WorkerFailure("build", EXIT_CRASH, f"building the {backend} model failed: {one_line(e)}") from None
    timing["build"] = time.perf_counter() - t
    t = time.perf_counter()
    try:
        adapter.load_weights(weights)
    except Exception as e:
        code = EXIT_INPUT if type(e).__name__ == "WeightsError" else EXIT_CRASH
        raise WorkerFailure("weights", code, f"load_weights: {one_line(e)}") from None
    timing["load_weights"] = time.perf_counter() - t
    return adapter, case


def fail_event(backend: str, phase: str, e: BaseException) -> int:
    """Report an exception as an ``error`` event (+ traceback on stderr); return the exit code."""
    if isinstance(e, WorkerFailure):
        phase, code, msg = e.phase, e.code, str(e)
    elif isinstance(e, KeyboardInterrupt):
        code, msg = 130, "interrupted"
    else:
        code, msg = EXIT_CRASH, one_line(e, 800)
    print(f"{__name__} [{backend}] failed in phase '{phase}': {msg}", file=sys.stderr)
    if code == EXIT_CRASH:
        traceback.print_exc(file=sys.stderr)
    try:
        emit("error", backend=backend, phase=phase, code=code, message=f"{backend} worker failed in phase "
                                                                       f"'{phase}': {msg}",
             peak_rss_mb=peak_rss_mb())
    except (OSError, ValueError):
        pass
    return code


def stack_dets(dets: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    return {"scores": np.stack([np.asarray(d["scores"]) for d in dets]),
            "labels": np.stack([np.asarray(d["labels"]).astype(np.int64) for d in dets]),
            "boxes": np.stack([np.asarray(d["boxes"]) for d in dets])}


def serve(args: argparse.Namespace) -> int:
    from .fileio import write_npz
    be = args.backend
    phase = "import"
    timing: Dict[str, float] = {}
    try:
        t = time.perf_counter()
        mod, versions = import_adapter(be)
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
    p = argparse.ArgumentParser(prog="python -m parity.predict_worker", description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=["torch", "jittor"])
    p.add_argument("--case", required=True, help="case folder with config + weights")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    open_channel()
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
