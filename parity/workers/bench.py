"""Timing worker of ``parity bench`` (one process per backend and mode, in that backend's env).

    python -m parity.workers.bench --backend torch|jittor --case DIR --mode eval|train
        [--device cpu|cuda] [--dtype float32] [--threads N] [--profile-top 25]

The case folder (``parity/case/folder.py``, stage ``grad``) holds the config, the weights, one
batch of images with targets and the shared denoising draws, so both backends time exactly
the same work.  The call timed:

* ``eval``:  ``Adapter.forward(images)`` (eval mode, no grad)
* ``train``: ``Adapter.train_step(images, targets, dn_draws)`` = zero_grad, train-mode forward,
  loss with Hungarian matching, backward, grad clipping, AdamW step (EMA if the config has it)

Driven by the runner, one call per command, so the runner can interleave the two backends
(torch call, jittor call, jittor call, torch call, ...): a burst of other work on a shared
machine then hits both alike, and the idle worker (blocked on stdin) never competes with
the one being timed.  Commands (JSON lines on stdin; protocol in ``parity/sides/serving.py``)::

    {"cmd": "call", "phase": "warm-up" | "timed"}  ->  {"event": "timed", "phase", "seconds", "i"}
    {"cmd": "profile", "out": "FILE.json"}         ->  {"event": "profiled", "out"}
    {"cmd": "result"}                              ->  {"event": "result", ...every number...}
    {"cmd": "quit"}                                ->  {"event": "bye", "peak_rss_mb"}

Each call is timed as ``sync(); t0; call; sync(); t1`` with the adapters' ``sync()``
(``jt.sync_all(True)`` in Jittor, CUDA synchronise in torch) so lazy / asynchronous work is
inside the region.  Warm-up calls (Jittor compiles its kernels in the first) are kept apart
from the timed ones.  Peak RSS is ``VmHWM`` of this process (model + one mode: each mode gets
its own process; not ``ru_maxrss``, which inherits the runner's RSS across fork + exec).  On CUDA: torch ``max_memory_allocated`` over the timed calls; Jittor
has no allocator peak counter, so the largest ``jt.get_mem_info().total_cuda_used`` sampled
after each call is reported.

``profile``: one more call, not timed, under this backend's own profiler (torch.profiler, self
CPU time per op; Jittor's ``jt.profile_scope()``, time per kernel): the slowest ops, the
per-op and the per-family totals go to FILE (parity/workers/bench_profile.py; families:
parity/workers/op_families.py).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

from parity.fileio import write_json
from parity.workers.bench_profile import profile_jittor, profile_torch
from parity.workers.common import (EXIT_INPUT, EXIT_OK, WorkerFailure, check_device, emit, fail_event, import_backend,
    load_model, peak_rss_mb, serving_main, set_threads, threads_info)


def current_rss_mb() -> Optional[float]:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return None


class DeviceMemory:
    def __init__(self, backend: str, device: str):
        self.backend, self.device = backend, device
        self.sampled_peak = 0.0

    def sample(self) -> None:
        if self.device != "cuda" or self.backend != "jittor":
            return
        from backends.jittor_impl.framework import jt
        self.sampled_peak = max(self.sampled_peak, jt.get_mem_info().total_cuda_used / 2 ** 20)

    def reset(self) -> None:
        if self.device == "cuda" and self.backend == "torch":
            import torch
            torch.cuda.reset_peak_memory_stats()

    def report(self) -> Optional[Dict[str, Any]]:
        if self.device != "cuda":
            return None
        if self.backend == "torch":
            import torch
            return {"peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20,
                    "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2 ** 20,
                    "method": "torch.cuda.max_memory_allocated"}
        return {"peak_mb": self.sampled_peak, "method": "max of jt.get_mem_info().total_cuda_used after each call"}


class BenchServer:
    """One backend's model on the case's batch, timed call by call as the runner asks."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.be = args, args.backend
        self.phase = "import"
        self.timing: Dict[str, float] = {}
        self.warm: List[float] = []
        self.times: List[float] = []
        self.profile_file = None

    def load(self) -> None:
        """Import, build, load the weights and the batch; then ``ready``."""
        args, be = self.args, self.be
        set_threads(be, args.threads)
        t = time.perf_counter()
        mod, self.versions = import_backend(be)
        set_threads(be, args.threads)
        self.timing["import"] = time.perf_counter() - t
        self.phase = "device"
        check_device(be, args.device)
        self.phase = "model"
        self.adapter, case = load_model(mod, be, args.case, args.dtype, args.device, self.timing)
        if case.manifest.get("stage") != "grad":
            raise WorkerFailure("case", EXIT_INPUT, "bench needs a case built for stage grad (targets + dn draws)")
        images, targets = case.inputs()
        self.images = images.astype(args.dtype)
        self.targets, self.dn = targets, case.dn_draws()
        self.rss_loaded = current_rss_mb()
        self.dev = DeviceMemory(be, args.device)
        emit("ready", backend=be, versions=self.versions, timing=self.timing, threads=threads_info(be),
             device=args.device)

    def call(self):
        if self.args.mode == "eval":
            return self.adapter.forward(self.images)
        return self.adapter.train_step(self.images, self.targets, self.dn)

    def timed(self) -> float:
        self.adapter.sync()
        t0 = time.perf_counter()
        self.call()
        self.adapter.sync()
        dt = time.perf_counter() - t0
        self.dev.sample()
        return dt

    def handle(self, req: Dict[str, Any]) -> bool:
        """One request; False on ``quit``."""
        cmd = req.get("cmd")
        if cmd == "quit":
            return False
        if cmd == "call":
            kind = req.get("phase", "timed")
            self.phase = kind
            if kind == "timed" and not self.times:
                gc.collect()
                self.dev.reset()
            dt = self.timed()
            (self.warm if kind == "warm-up" else self.times).append(dt)
            emit("timed", phase=kind, seconds=dt, i=len(self.warm if kind == "warm-up" else self.times))
        elif cmd == "profile":
            self.profile(req["out"])
        elif cmd == "result":
            self.result()
        else:
            raise WorkerFailure("serve", EXIT_INPUT, f"unknown command {cmd!r}")
        return True

    def profile(self, path: str) -> None:
        """One more call under this backend's profiler -> FILE (layout: parity/workers/bench_profile.py)."""
        self.phase = "profile"
        if self.be == "jittor":
            doc = profile_jittor(self.adapter, self.call, self.args.mode, self.args.profile_top)
        else:
            doc = profile_torch(self.adapter, self.call, self.args.mode, self.args.device, self.args.profile_top)
        self.profile_file = path
        write_json(path, doc)
        emit("profiled", out=path)

    def result(self) -> None:
        args, times = self.args, self.times
        if not times:
            raise WorkerFailure("result", EXIT_INPUT, "no timed call was made")
        emit("result", **{
            "backend": self.be, "mode": args.mode, "device": args.device, "dtype": args.dtype,
            "batch": int(self.images.shape[0]), "size": list(self.images.shape[2:]),
            "warmup_seconds": self.warm, "seconds": times,
            "min": float(np.min(times)), "median": float(np.median(times)), "max": float(np.max(times)),
            "mean": float(np.mean(times)),
            "peak_rss_mb": peak_rss_mb(), "rss_after_load_mb": self.rss_loaded, "rss_end_mb": current_rss_mb(),
            "device_memory": self.dev.report(), "threads": threads_info(self.be), "versions": self.versions,
            "timing": self.timing, "profile": self.profile_file})


def run(args: argparse.Namespace) -> int:
    srv = BenchServer(args)
    try:
        srv.load()
        srv.phase = "serve"
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            if not srv.handle(json.loads(line)):
                break
            srv.phase = "serve"
        emit("bye", backend=srv.be, peak_rss_mb=peak_rss_mb())
        return EXIT_OK
    except BaseException as e:  # noqa: BLE001 - every failure becomes an error event
        if isinstance(e, SystemExit):
            raise
        return fail_event(srv.be, srv.phase, e)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m parity.workers.bench", description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=["torch", "jittor"])
    p.add_argument("--case", required=True)
    p.add_argument("--mode", required=True, choices=["eval", "train"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile-top", type=int, default=25)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    return serving_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
