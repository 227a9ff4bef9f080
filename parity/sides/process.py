"""Starting and watching a worker process, the one implementation every side uses.

Which interpreter runs a backend (``resolve_python``), the environment a worker gets
(``worker_env``: the repository first on PYTHONPATH), starting any worker process
(``start``: the only ``Popen`` of the harness; the one-shot, train, serving and pre-flight
workers all go through it), starting one with its output pumped into a log file
(``spawn``), stopping its process group (``stop_group``), the last
lines of a log for a crash report (``tail``), the progress lines (``Progress``) and SIGTERM
turned into KeyboardInterrupt so every ``finally`` stops its workers (``run_interruptible``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Dict, List, Optional, Tuple

from parity.errors import EXIT_INTERRUPTED, RunError
from parity.facts import repo_root


BACKENDS = ("torch", "jittor")
# what a worker's failing phase says about the cause (error.json "phase" -> RunError cause)
PHASE_CAUSE = {"import": "environment", "case": "case", "config": "config mismatch", "weights": "weights",
               "faults": "usage", "device": "environment", "world": "environment", "resume": "checkpoint"}
ENV_VARS = {"torch": "RTDETR_PARITY_TORCH_PYTHON", "jittor": "RTDETR_PARITY_JITTOR_PYTHON"}


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


def worker_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a worker: ours, with the repository first on PYTHONPATH."""
    env = dict(os.environ)
    root = repo_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def pump(pipe, log_path: str, echo: bool) -> None:
    with open(log_path, "ab") as fh:
        for line in iter(pipe.readline, b""):
            fh.write(line)
            fh.flush()
            if echo:
                sys.stderr.write(line.decode("utf-8", "replace"))
    pipe.close()


def start(cmd: List[str], backend: str, *, stdin=None, stdout=None, stderr=None,
          env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """Start ``cmd`` (a backend's interpreter and a worker module) with :func:`worker_env`,
    the repository as working folder and its own process group (so :func:`stop_group` stops
    whatever it started, and a Ctrl-C reaches only the runner, which stops it in a
    ``finally``).  ``stdin``/``stdout``/``stderr`` as for ``Popen``.  A process that cannot
    start is one line: :class:`RunError` naming the backend and the interpreter."""
    try:
        return subprocess.Popen(cmd, stdin=stdin, stdout=stdout, stderr=stderr, env=worker_env(env),
                                cwd=repo_root(), start_new_session=True)
    except OSError as e:
        raise RunError(f"{backend} environment broken: cannot start {cmd[0]}: {e.strerror or e}", side=backend,
                       cause="environment missing") from None


def spawn(cmd: List[str], log_path: str, backend: str, verbose: bool, env: Optional[Dict[str, str]] = None,
          append: bool = False) -> Tuple[subprocess.Popen, threading.Thread]:
    """Start ``cmd`` (:func:`start`), its output (stdout + stderr) pumped into ``log_path``
    (echoed with ``verbose``); the log starts with the command line."""
    with open(log_path, "ab" if append else "wb") as fh:
        fh.write(("$ " + " ".join(cmd) + "\n").encode())
    p = start(cmd, backend, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    th = threading.Thread(target=pump, args=(p.stdout, log_path, verbose), daemon=True)
    th.start()
    return p, th


def stop_group(proc: subprocess.Popen, sig=signal.SIGTERM, grace: Optional[float] = None) -> None:
    """Signal the worker's process group; after ``grace`` seconds, SIGKILL it."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    if grace is None:
        proc.wait()
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tail(path: str, n: int = 12) -> str:
    try:
        with open(path, "rb") as fh:
            lines = fh.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    lines = [ln for ln in lines if ln.strip()]
    return "\n".join("      | " + ln[:200] for ln in lines[-n:])


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


def progress(msg: str) -> None:
    """One progress line (stdout, flushed)."""
    print(msg, flush=True)


def run_interruptible(fn, args) -> int:
    """Run a command with SIGTERM turned into KeyboardInterrupt, so every ``finally`` stops
    the workers it started and marks the output folder as failed; Ctrl-C / SIGTERM end with
    one line and exit code 130."""
    def _term(signum, frame):
        raise KeyboardInterrupt("terminated")

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _term)
    try:
        return fn(args)
    except KeyboardInterrupt as e:
        print(f"parity: interrupted{' (' + str(e) + ')' if str(e) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def worker_threads_env(n_side_by_side: int) -> Optional[Dict[str, str]]:
    """The workers run side by side: give each its share of the cores (OMP_NUM_THREADS =
    usable cores // workers, at least 1) instead of letting both spin on every core, unless
    the user set OMP_NUM_THREADS."""
    if os.environ.get("OMP_NUM_THREADS") or n_side_by_side < 2:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return {"OMP_NUM_THREADS": str(max(1, cores // n_side_by_side))}
