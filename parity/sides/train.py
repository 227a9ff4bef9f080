"""The sides of ``parity run --stage train`` (see parity/commands/train.py): one
``parity.workers.train`` process per backend and dtype, started, watched, stopped, and their
failures turned into one-line errors."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from parity.errors import RunError
from parity.fileio import read_json
from parity.sides.launch import rank_command
from parity.sides.process import PHASE_CAUSE, spawn, stop_group, tail


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


def start_side(side: Side, out: str, device: str, threads: int, resume: bool, stop_after: Optional[int],
               faults: Sequence[str], verbose: bool, nproc: int = 1, extra: Sequence[str] = ()) -> None:
    """One side's worker; ``nproc`` > 1: as that many ranks under torchrun / mpirun.  ``extra``:
    more worker options (a replay's --dir, --follow, --probe-at: parity/commands/train_ties.py)."""
    os.makedirs(side.dir, exist_ok=True)
    for stale in ["status.json", "error.json"] + [os.path.basename(p) for p in rank_errors(side.dir)]:
        if os.path.exists(os.path.join(side.dir, stale)):      # an earlier run's progress is not ours
            os.unlink(os.path.join(side.dir, stale))
    cmd = ["-m", "parity.workers.train", "--backend", side.backend, "--run", out, "--side", side.label,
           "--dtype", side.dtype, "--device", device, "--threads", str(threads)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    if resume:
        cmd.append("--resume")
    if stop_after is not None:
        cmd += ["--stop-after-epoch", str(stop_after)]
    for f in faults:
        cmd += ["--inject-fault", f]
    cmd += list(extra)
    cmd = rank_command(side.backend, side.python, nproc, cmd)
    side.t0 = time.perf_counter()
    side.proc, side.pump = spawn(cmd, side.log_path, side.backend, verbose, env={"OMP_NUM_THREADS": str(threads)},
                                 append=True)


def rank_errors(side_dir: str) -> List[str]:
    """Error files of ranks other than 0 (``error.rank<r>.json``), rank order."""
    return sorted(glob.glob(os.path.join(side_dir, "error.rank*.json")))


def kill_side(side: Side, sig=signal.SIGTERM) -> None:
    if side.proc is not None and side.proc.poll() is None:
        stop_group(side.proc, sig, grace=20)


def wait_sides(sides: Sequence[Side], progress, epochs: int, timeout: Optional[float]) -> None:
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
                kill_side(s, signal.SIGKILL)
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


def check_side(side: Side) -> None:
    if side.rc == 0:
        return
    err = os.path.join(side.dir, "error.json")
    if not os.path.isfile(err) and rank_errors(side.dir):
        err = rank_errors(side.dir)[0]          # a rank other than 0 failed (data-parallel side)
    if os.path.isfile(err):
        try:
            e = read_json(err)
        except (OSError, ValueError):
            e = {}
        phase = e.get("phase", "?")
        cause = PHASE_CAUSE.get(phase, "backend crash")
        raise RunError(f"{side.label} ({side.backend} {side.dtype}) failed in phase '{phase}' ({cause}): "
                       f"{e.get('message', '?')} (log: {side.log_path})", side=side.backend, cause=cause, log=side.log_path)
    rc = side.rc
    how = f"was killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with code {rc} without an error report"
    raise RunError(f"{side.label} ({side.backend}) crashed: the worker {how} (log: {side.log_path})\n{tail(side.log_path)}",
                   side=side.backend, cause="backend crash", log=side.log_path)
