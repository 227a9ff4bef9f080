"""The one-shot workers of a ``parity run --stage forward|grad`` (``python -m
parity.workers.forward``): the pre-flight import check, and one worker per side started and
watched (progress, timeout, crash reports).  The protocol a worker follows is in
parity/workers/forward.py; the files it exchanges in parity/case/contract.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from parity.errors import RunError
from parity.fileio import rank_out, read_npz_meta
from parity.sides.launch import rank_command
from parity.sides.process import PHASE_CAUSE, Progress, spawn, start, stop_group, tail


STAGES = ("forward", "grad")


# ----------------------------------------------------------------------------------------
# labels and jobs
# ----------------------------------------------------------------------------------------

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
    nproc: int = 1                          # data-parallel ranks (parity/sides/launch.py)
    rank_meta: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def log(self) -> str:
        return self.out[:-4] + ".log"

    @property
    def outs(self) -> List[str]:
        """The result file of every rank (``out`` itself for one process)."""
        return [self.out] if self.nproc <= 1 else [rank_out(self.out, r) for r in range(self.nproc)]


def preflight(jobs: Sequence[Job], verbose: bool = False) -> Dict[str, Dict[str, Any]]:
    """Import each backend once in its interpreter (in parallel): a missing framework or a
    backend that does not import is reported before any long run starts."""
    seen: Dict[str, Job] = OrderedDict()
    for j in jobs:
        seen.setdefault(j.backend + "|" + j.python, j)
    procs = []
    for key, j in seen.items():
        cmd = [j.python, "-m", "parity.workers.forward", "--backend", j.backend, "--check"]
        p = start(cmd, j.backend, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
    cmd = ["-m", "parity.workers.forward", "--backend", job.backend, "--case", case_dir, "--out", job.out,
           "--dtype", job.dtype, "--task", job.task, "--device", device]
    if job.nproc > 1:
        cmd += ["--nproc", str(job.nproc)]
    if job.share_from:
        cmd += ["--share-decisions", os.path.join(os.path.dirname(job.out), f"decisions-{job.share_from}.npz")]
    for f in job.faults:
        cmd += ["--inject-fault", f]
    cmd = rank_command(job.backend, job.python, job.nproc, cmd)
    name = f"[{index}/{total}] {job.backend:<6} {job.dtype} {job.task:<7} ({job.label}, {job.role})"
    if job.nproc > 1:
        name += f" x{job.nproc} ranks"
    if not progress.tty:
        progress.line(f"  {name} ...")
    t0 = time.perf_counter()
    p, th = spawn(cmd, job.log, job.backend, verbose)
    status = job.outs[0] + ".status"
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
                stop_group(p, signal.SIGKILL)
                break
            time.sleep(0.25)
    except KeyboardInterrupt:
        stop_group(p, signal.SIGTERM)
        raise
    th.join(timeout=5)
    job.wall = time.perf_counter() - t0
    rc = p.returncode
    errs = [o + ".error.json" for o in job.outs if os.path.isfile(o + ".error.json")]
    err_file = errs[0] if errs else job.out + ".error.json"
    if rc == 0 and all(os.path.isfile(o) for o in job.outs):
        job.rank_meta = []
        for o in job.outs:
            with np.load(o, allow_pickle=False) as z:
                job.rank_meta.append(read_npz_meta(z))
        job.meta = job.rank_meta[0]
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
        cause = PHASE_CAUSE.get(phase, "backend crash")
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
    raise RunError(f"{where} crashed: the worker {how} (log: {job.log})\n{tail(job.log)}",
                   side=job.backend, cause="backend crash", log=job.log)
