"""What every worker shares (it runs inside a backend's environment: numpy, rtdetr_core, the
backend, and parity's case/fileio modules only): the worker exit codes, failures as
data (``WorkerFailure``), the backend import, peak memory, threads, the model of a case
folder, and the JSON-line channel of the serving workers (``emit``; protocol in
parity/sides/serving.py).

Worker exit codes (the runner maps them to its own exit 2): 0 ok, 1 crash, 3 environment
(import, device), 4 input (case, config, weights, faults).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
import traceback
from typing import Any, Dict, Optional, TextIO

import numpy as np

from parity.case.folder import Case, CaseError
from parity.fileio import jsonable, write_json


EXIT_OK, EXIT_CRASH, EXIT_ENV, EXIT_INPUT = 0, 1, 3, 4


class WorkerFailure(Exception):
    def __init__(self, phase: str, code: int, message: str):
        super().__init__(message)
        self.phase, self.code = phase, code


def peak_rss_mb() -> float:
    """Peak resident memory of THIS process image (MB): ``VmHWM`` of /proc/self/status.

    Not ``getrusage().ru_maxrss``: Linux carries the high-water mark of the pre-exec image
    over ``execve``, and a worker is forked from the runner, so ru_maxrss never reports less
    than the runner's own RSS at fork time (~0.5 GB after it built a case).  ru_maxrss is
    the fallback where /proc is absent (macOS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / (1024.0 * 1024.0)


def import_backend(backend: str):
    """``(adapter module, versions)``: the backend package first (its framework.py holds the
    import guard: Jittor's nvcc_path / -O2 flags must be set before jittor is imported);
    failures as ``WorkerFailure(code 3)``."""
    import importlib.util
    if importlib.util.find_spec(backend) is None:
        raise WorkerFailure("import", EXIT_ENV, f"{backend} is not installed in {sys.executable} "
                            f"(wrong interpreter for the {backend} side?)")
    try:
        mod = importlib.import_module(f"backends.{backend}_impl.adapter")
    except Exception as e:
        raise WorkerFailure("import", EXIT_ENV, f"cannot import backends.{backend}_impl.adapter with "
                            f"{sys.executable}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    fwmod = sys.modules.get(backend) or importlib.import_module(backend)
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                backend: getattr(fwmod, "__version__", "?"), "executable": sys.executable}
    return mod, versions


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
    ch.write(json.dumps(jsonable({"event": event, **fields}), default=str) + "\n")
    ch.flush()


def one_line(e: BaseException, limit: int = 500) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"


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


def failure(e: BaseException, phase: str):
    """``(phase, exit code, one-line message)`` of the exception that ends a worker."""
    if isinstance(e, WorkerFailure):
        return e.phase, e.code, str(e)
    if isinstance(e, KeyboardInterrupt):
        return phase, 130, "interrupted"
    return phase, EXIT_CRASH, one_line(e, 800)


def report_failure(e: BaseException, phase: str, who: str, error_file: Optional[str], head: Dict[str, Any],
                   tail: Dict[str, Any], t0: float) -> int:
    """A one-shot worker's failure: one line (+ the traceback of a crash) on stderr and the
    error file the runner reads (``head``, the failure, ``tail``, memory, time); the exit code."""
    if isinstance(e, SystemExit):
        raise e
    phase, code, msg = failure(e, phase)
    tb = traceback.format_exc()
    print(f"{who} failed in phase '{phase}': {msg}", file=sys.stderr)
    if code == EXIT_CRASH:
        print(tb, file=sys.stderr)
    if error_file:
        try:
            write_json(error_file, {**head, "phase": phase, "exit_code": code, "type": type(e).__name__,
                                    "message": msg, "traceback": tb, **tail, "peak_rss_mb": peak_rss_mb(),
                                    "elapsed": time.perf_counter() - t0})
        except OSError:
            pass
    return code


def fail_event(backend: str, phase: str, e: BaseException) -> int:
    """Report an exception as an ``error`` event (+ traceback on stderr); return the exit code."""
    phase, code, msg = failure(e, phase)
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


def serving_main(parser, serve, argv) -> int:
    """The entry of a serving worker: its options, the protocol channel, then ``serve(args)``."""
    args = parser.parse_args(argv)
    open_channel()
    return serve(args)


def launched_rank() -> int:
    """This process's rank as its launcher set it (torchrun: RANK; OpenMPI: OMPI_COMM_WORLD_RANK),
    known before the framework is imported (the rank's file names need it)."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0
