"""The worker processes of a ``parity run --stage forward|grad``: which interpreter runs a
side, starting one worker per side and watching it (progress, timeout, crash reports), the
pre-flight import check, and the decisions file handed from one side to another.  The
protocol a worker follows is in parity/worker.py."""
from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .case import repo_root
from .fileio import read_npz_meta
from .worker import write_decisions

STAGES = ("forward", "grad")
ENV_VARS = {"torch": "RTDETR_PARITY_TORCH_PYTHON", "jittor": "RTDETR_PARITY_JITTOR_PYTHON"}


class RunError(Exception):
    """A usage or environment error: one clear line naming the side and the cause; exit 2."""

    def __init__(self, message: str, side: str = "runner", cause: str = "usage", log: Optional[str] = None):
        super().__init__(message)
        self.side, self.cause, self.log = side, cause, log


# ----------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------

def _opt(args, name, default=None):
    v = getattr(args, name, default)
    return default if v is None else v


def resolve_python(backend: str, given: Optional[str]) -> str:
    """--<backend>-python, else $RTDETR_PARITY_<BACKEND>_PYTHON, else <repo>/.venvs/<backend>/bin/python."""
    var = ENV_VARS[backend]
    src = f"--{backend}-python"
    path = given
    if not path:
        path, src = os.environ.get(var), f"${var}"
    if not path:
        path, src = os.path.join(repo_root(), ".venvs", backend, "bin", "python"), "the default location"
    if not os.path.exists(path):
        raise RunError(f"{backend} environment missing: {path} (from {src}) does not exist; run "
                       f"`bash envs/setup.sh`, or give --{backend}-python / set {var}",
                       side=backend, cause="environment missing")
    if not os.access(path, os.X_OK) or os.path.isdir(path):
        raise RunError(f"{backend} environment broken: {path} (from {src}) is not an executable interpreter",
                       side=backend, cause="environment missing")
    return path


def default_out(stage: str, config_name: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(repo_root(), "reports", "runs", f"{stamp}-{stage}-{config_name}")
    out, n = base, 2
    while os.path.exists(out):
        out, n = f"{base}-{n}", n + 1
    return out


def label(backend: str, dtype: str, candidate: bool = False, cand_backend: str = "jittor") -> str:
    bits = "32" if dtype == "float32" else "64"
    if candidate and cand_backend == "torch":
        return "C" + bits            # harness self-test: torch against torch
    return ("T" if backend == "torch" else "J") + bits


# ----------------------------------------------------------------------------------------
# workers
# ----------------------------------------------------------------------------------------

@dataclass
class Job:
    label: str
    role: str                   # base | cand | ref
    backend: str
    python: str
    dtype: str
    task: str
    out: str
    share_from: Optional[str] = None       # label whose decisions are injected
    faults: List[str] = field(default_factory=list)
    wall: float = 0.0
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def log(self) -> str:
        return self.out[:-4] + ".log"


class Progress:
    """One line per worker: live (\\r) on a terminal, start/end lines otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0

    def update(self, text: str) -> None:
        if self.tty:
            pad = max(0, self._last - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self._last = len(text)

    def line(self, text: str) -> None:
        if self.tty and self._last:
            self.stream.write("\r" + " " * self._last + "\r")
            self._last = 0
        self.stream.write(text + "\n")
        self.stream.flush()


def _worker_env() -> Dict[str, str]:
    env = dict(os.environ)
    root = repo_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _pump(pipe, log_path: str, echo: bool) -> None:
    with open(log_path, "ab") as fh:
        for line in iter(pipe.readline, b""):
            fh.write(line)
            fh.flush()
            if echo:
                sys.stderr.write(line.decode("utf-8", "replace"))
    pipe.close()


def _tail(path: str, n: int = 12) -> str:
    try:
        with open(path, "rb") as fh:
            lines = fh.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    lines = [ln for ln in lines if ln.strip()]
    return "\n".join("      | " + ln[:200] for ln in lines[-n:])


def preflight(jobs: Sequence[Job], verbose: bool = False) -> Dict[str, Dict[str, Any]]:
    """Import each backend once in its interpreter (in parallel): a missing framework or a
    backend that does not import is reported before any long run starts."""
    import json
    seen: Dict[str, Job] = OrderedDict()
    for j in jobs:
        seen.setdefault(j.backend + "|" + j.python, j)
    procs = []
    for key, j in seen.items():
        cmd = [j.python, "-m", "parity.worker", "--backend", j.backend, "--check"]
        try:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_worker_env(),
                                 cwd=repo_root())
        except OSError as e:
            raise RunError(f"{j.backend} environment broken: cannot start {j.python}: {e.strerror or e}",
                           side=j.backend, cause="environment missing") from None
        procs.append((j, p))
    versions = {}
    for j, p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            msg = err.decode("utf-8", "replace").strip().splitlines()
            detail = next((ln for ln in reversed(msg) if "failed in phase" in ln), msg[-1] if msg else "")
            if "failed in phase" in detail:
                detail = detail.split(": ", 1)[-1]
            raise RunError(f"{j.backend} environment unusable ({j.python}): {detail or f'exit code {p.returncode}'}",
                           side=j.backend, cause="environment missing")
        lines = [ln for ln in out.decode("utf-8", "replace").splitlines() if ln.startswith("{")]
        try:
            versions[j.backend] = json.loads(lines[-1])["versions"]
        except (IndexError, ValueError, KeyError):
            versions[j.backend] = {}
    return versions


def run_job(job: Job, case_dir: str, device: str, progress: Progress, index: int, total: int,
            verbose: bool = False, timeout: Optional[float] = None) -> None:
    cmd = [job.python, "-m", "parity.worker", "--backend", job.backend, "--case", case_dir, "--out", job.out,
           "--dtype", job.dtype, "--task", job.task, "--device", device]
    if job.share_from:
        cmd += ["--share-decisions", os.path.join(os.path.dirname(job.out), f"decisions-{job.share_from}.npz")]
    for f in job.faults:
        cmd += ["--inject-fault", f]
    with open(job.log, "wb") as fh:
        fh.write(("$ " + " ".join(cmd) + "\n").encode())
    name = f"[{index}/{total}] {job.backend:<6} {job.dtype} {job.task:<7} ({job.label}, {job.role})"
    if not progress.tty:
        progress.line(f"  {name} ...")
    t0 = time.perf_counter()
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_worker_env(),
                             cwd=repo_root(), start_new_session=True)
    except OSError as e:
        raise RunError(f"{job.backend} side: cannot start {job.python}: {e.strerror or e}", side=job.backend,
                       cause="environment missing") from None
    th = threading.Thread(target=_pump, args=(p.stdout, job.log, verbose), daemon=True)
    th.start()
    status = job.out + ".status"
    timed_out = False
    try:
        while p.poll() is None:
            el = time.perf_counter() - t0
            phase = ""
            try:
                with open(status) as fh:
                    phase = json.load(fh).get("phase", "")
            except (OSError, ValueError):
                pass
            progress.update(f"  {name}  {phase:<14} {el:7.1f}s")
            if timeout and el > timeout:
                timed_out = True
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                break
            time.sleep(0.25)
    except KeyboardInterrupt:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait()
        raise
    th.join(timeout=5)
    job.wall = time.perf_counter() - t0
    rc = p.returncode
    err_file = job.out + ".error.json"
    if rc == 0 and os.path.isfile(job.out):
        with np.load(job.out, allow_pickle=False) as z:
            job.meta = read_npz_meta(z)
        rss = job.meta.get("peak_rss_mb")
        progress.line(f"  {name}  done {job.wall:7.1f}s" + (f"  peak RSS {rss:,.0f} MB" if rss else ""))
        return
    progress.line(f"  {name}  FAILED after {job.wall:.1f}s")
    where = f"{job.backend} side ({job.dtype} {job.task})"
    if timed_out:
        raise RunError(f"{where}: killed after the --timeout of {timeout:g}s (log: {job.log})",
                       side=job.backend, cause="timeout", log=job.log)
    if os.path.isfile(err_file):
        try:
            with open(err_file) as fh:
                e = json.load(fh)
        except (OSError, ValueError):
            e = {}
        phase = e.get("phase", "?")
        cause = {"import": "environment", "case": "case", "config": "config mismatch",
                 "weights": "weights", "faults": "usage"}.get(phase, "backend crash")
        if cause == "backend crash":
            what = f"crashed in phase '{phase}'"
        else:
            what = f"failed ({cause}, phase '{phase}')"
        raise RunError(f"{where} {what}: {e.get('message', '?')} (log: {job.log})", side=job.backend,
                       cause=cause, log=job.log)
    if rc is not None and rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
        how = f"was killed by {sig}"
    else:
        how = f"exited with code {rc} without a result or error report"
    raise RunError(f"{where} crashed: the worker {how} (log: {job.log})\n{_tail(job.log)}",
                   side=job.backend, cause="backend crash", log=job.log)


def write_decisions_from(result_npz: str, dest: str) -> bool:
    topk = train_topk = None
    matches: Dict[str, Dict[int, np.ndarray]] = OrderedDict()
    with np.load(result_npz, allow_pickle=False) as z:
        meta = read_npz_meta(z)
        if "dec/topk" in z.files:
            topk = z["dec/topk"]
        if "train/dec/topk" in z.files:
            train_topk = z["train/dec/topk"]
        for call in meta.get("order", {}).get("matches", []):
            d = {}
            for k in z.files:
                if k.startswith(f"match/{call}/"):
                    d[int(k.rsplit("/", 1)[1])] = z[k]
            matches[call] = [d[i] for i in sorted(d)]
    if topk is None and train_topk is None and not matches:
        return False
    write_decisions(dest, topk, matches or None, train_topk=train_topk)
    return True
