"""Runner side of the *serving* workers of ``parity detect``, ``parity run --stage eval`` and
``parity bench`` (``parity/predict_worker.py``, ``parity/bench_worker.py``).

Protocol (JSON lines)::

    runner --stdin-->  {"cmd": "predict", "id": 3, "inputs": ".../batch.npz", "out": ".../raw.npz"}
                       {"cmd": "quit"}
    worker --stdout->  {"event": "ready", "versions": {...}, "timing": {...}, "threads": ...}
                       {"event": "progress", "phase": "...", "i": 2, "n": 5}
                       {"event": "done", "id": 3, "seconds": 0.21}
                       {"event": "bye", "peak_rss_mb": 812.0}
                       {"event": "error", "phase": "...", "code": 3|4|1, "message": "one line"}

The worker keeps its real stdout for the protocol only (file descriptor 1 is pointed at
stderr, so Jittor's compiler chatter and stray prints cannot corrupt it); stderr goes to a
log file in the run folder (to the terminal with ``-v``).  Worker exit codes are those of
``parity/worker.py``: 3 environment, 4 input (case/config/weights), 1 crash.  Any failure
reaches the user as one line (``WorkerError``) and exit code 2.
"""
from __future__ import annotations

import datetime
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("torch", "jittor")


class WorkerError(RuntimeError):
    """A worker failed: one line naming the backend and the phase."""

    def __init__(self, backend: str, message: str, code: Optional[int] = None, phase: Optional[str] = None):
        super().__init__(message)
        self.backend, self.code, self.phase = backend, code, phase


# ----------------------------------------------------------------------------------------
# interpreters
# ----------------------------------------------------------------------------------------

def env_var(backend: str) -> str:
    return f"RTDETR_PARITY_{backend.upper()}_PYTHON"


def find_python(backend: str, override: Optional[str] = None) -> str:
    """Interpreter of a backend's environment (``parity.runner.resolve_python``: ``override``
    = ``--<backend>-python``, else ``$RTDETR_PARITY_<BACKEND>_PYTHON``, else
    ``<repo>/.venvs/<backend>/bin/python``).  Missing -> :class:`parity.cli.UsageError`."""
    from .cli import UsageError
    from .run_jobs import RunError, resolve_python
    try:
        path = resolve_python(backend, override)
    except RunError as e:
        raise UsageError(str(e)) from None
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise UsageError(f"{backend} environment missing: {path} is not an executable interpreter; run "
                         f"`bash envs/setup.sh`, or give --{backend}-python / set {env_var(backend)}")
    return path


def default_out(kind: str, config_name: str) -> str:
    """``reports/runs/<time>-<kind>-<config>`` (``parity.runner.default_out``)."""
    from .run_jobs import default_out as _d
    return _d(kind, config_name)


def prepare_out(out: str, stale: Sequence[str]) -> str:
    """Create the output folder; remove old result files first (``stale``), so an
    interrupted rerun never shows an older verdict."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        from .cli import UsageError
        raise UsageError(f"--out {out}: exists and is not a folder")
    os.makedirs(out, exist_ok=True)
    for name in stale:
        m = os.path.join(out, name)
        if os.path.isfile(m):
            os.unlink(m)
    return out


def mark_failed(out: Optional[str], name: str, message: str, base: Optional[Dict[str, Any]] = None,
                side: Optional[str] = None, phase: Optional[str] = None) -> None:
    """After an error: ``<out>/<name>`` says ``"status": "error"`` (as ``parity.runner``'s
    result.json does), never a pass."""
    if not out or not os.path.isdir(out):
        return
    from .fileio import write_json
    try:
        write_json(os.path.join(out, name), {"schema": 1, **(base or {}), "status": "error", "passed": False,
                                             "exit_code": 2, "error": {"side": side or "runner", "phase": phase,
                                                                       "message": message.splitlines()[0] if message else ""}})
    except (OSError, ValueError):
        pass


# ----------------------------------------------------------------------------------------
# a serving worker process
# ----------------------------------------------------------------------------------------

class WorkerProcess:
    """``python -m MODULE --backend B ARGS...`` in the backend's interpreter, spoken to with
    JSON lines (see the module docstring)."""

    def __init__(self, backend: str, python: str, module: str, args: Sequence[str], log_path: str,
                 verbose: bool = False, env: Optional[Dict[str, str]] = None):
        self.backend = backend
        self.log_path = log_path
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        self._log = open(log_path, "ab")
        e = dict(os.environ)
        e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
        e["PYTHONUNBUFFERED"] = "1"
        e.update(env or {})
        self.cmd = [python, "-m", module, "--backend", backend, *args]
        self._log.write((" ".join(self.cmd) + "\n").encode())
        self._log.flush()
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=None if verbose else self._log, cwd=REPO, env=e)
        except OSError as ex:
            self._log.close()
            raise WorkerError(backend, f"{backend} worker: cannot start {python}: {ex.strerror or ex}") from None
        self._q: "queue.Queue[Optional[Dict[str, Any]]]" = queue.Queue()
        self._last_error: Optional[Dict[str, Any]] = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith("{"):
                try:
                    ev = json.loads(line)
                except ValueError:
                    ev = None
                if isinstance(ev, dict) and "event" in ev:
                    self._q.put(ev)
                    continue
            try:                 # not protocol: keep it in the log
                self._log.write(raw)
                self._log.flush()
            except (OSError, ValueError):
                pass
        self._q.put(None)

    def send(self, obj: Dict[str, Any]) -> None:
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self._raise_dead()

    def _raise_dead(self) -> None:
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rc = None
        if self._last_error:
            e = self._last_error
            raise WorkerError(self.backend, e.get("message", "failed"), e.get("code"), e.get("phase"))
        if rc is not None and rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = str(-rc)
            raise WorkerError(self.backend, f"{self.backend} worker was killed by signal {sig} "
                                            f"(out of memory?); log: {self.log_path}", rc)
        raise WorkerError(self.backend, f"{self.backend} worker exited with code {rc} without a result; "
                                        f"log: {self.log_path}", rc)

    def recv(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Next event; raises :class:`WorkerError` on an ``error`` event or a dead worker,
        ``TimeoutError`` when nothing arrived in ``timeout`` seconds."""
        try:
            ev = self._q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.backend} worker: no answer in {timeout} s") from None
        if ev is None:
            self._q.put(None)        # stay dead for later calls
            self._raise_dead()
        if ev.get("event") == "error":
            self._last_error = ev
            msg = ev.get("message", "failed")
            if not msg.startswith(self.backend):
                msg = f"{self.backend} worker failed in phase '{ev.get('phase', '?')}': {msg}"
            raise WorkerError(self.backend, msg, ev.get("code"), ev.get("phase"))
        return ev

    def wait_for(self, event: str, on_progress=None, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Events until one named ``event`` (progress events go to ``on_progress``)."""
        t_end = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if t_end is None else max(0.0, t_end - time.monotonic())
            ev = self.recv(left)
            if ev.get("event") == event:
                return ev
            if ev.get("event") == "progress" and on_progress is not None:
                on_progress(self.backend, ev)

    def close(self, timeout: float = 60.0) -> Optional[Dict[str, Any]]:
        """Ask the worker to quit; return its ``bye`` event (None if it had none)."""
        bye = None
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
            t_end = time.monotonic() + timeout
            while time.monotonic() < t_end:
                try:
                    ev = self._q.get(timeout=max(0.0, t_end - time.monotonic()))
                except queue.Empty:
                    break
                if ev is None:
                    break
                if ev.get("event") == "bye":
                    bye = ev
        self.kill()
        return bye

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.terminate()
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            except OSError:
                pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f:
                    f.close()
            except OSError:
                pass
        self._reader.join(timeout=5)
        try:
            self._log.close()
        except OSError:
            pass


def start_workers(backends: Sequence[str], pythons: Dict[str, str], module: str, args: Sequence[str],
                  log_dir: str, verbose: bool = False, env: Optional[Dict[str, str]] = None
                  ) -> Dict[str, WorkerProcess]:
    out: Dict[str, WorkerProcess] = {}
    try:
        for be in backends:
            out[be] = WorkerProcess(be, pythons[be], module, args, os.path.join(log_dir, f"worker_{be}.log"),
                                    verbose=verbose, env=env)
    except BaseException:
        for w in out.values():
            w.kill()
        raise
    return out


def progress(msg: str) -> None:
    """One progress line (stdout, flushed)."""
    print(msg, flush=True)


def fmt_s(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


# ----------------------------------------------------------------------------------------
# a model-only case folder (config + weights; the inputs travel per request)
# ----------------------------------------------------------------------------------------

def write_model_case(case_dir: str, cfg, weights, winfo: Dict[str, Any], *, stage: str, seed: int,
                     extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A case folder (``parity/case.py`` layout and manifest schema) holding only
    ``config.json``, ``config.yaml`` and ``weights.safetensors``: what a serving worker
    needs to build the model (``Case(dir)`` checks the hashes and the config digest)."""
    from .case import CASE_SCHEMA, runner_versions, write_config_and_weights
    from .fileio import sha256_file, write_json
    os.makedirs(case_dir, exist_ok=True)
    mpath = os.path.join(case_dir, "manifest.json")
    if os.path.exists(mpath):
        os.unlink(mpath)
    digest = cfg.digest()
    write_config_and_weights(case_dir, cfg, weights)
    files = {f: sha256_file(os.path.join(case_dir, f)) for f in ("config.json", "config.yaml", "weights.safetensors")}
    manifest = {"schema": CASE_SCHEMA, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                "stage": stage, "config": cfg.name, "config_digest": digest, "seed": int(seed),
                "weights": winfo, "dn_draws": False, "files": files, "versions": runner_versions(),
                **(extra or {})}
    write_json(mpath, manifest)
    return manifest


# ----------------------------------------------------------------------------------------
# interruption
# ----------------------------------------------------------------------------------------

def run_interruptible(fn, args) -> int:
    """Run a command with SIGTERM turned into KeyboardInterrupt, so every ``finally`` stops
    the workers it started and marks the output folder as failed; Ctrl-C / SIGTERM end with
    one line and exit code 130."""
    import signal as _signal

    def _term(signum, frame):
        raise KeyboardInterrupt("terminated")

    old = None
    if threading.current_thread() is threading.main_thread():
        old = _signal.signal(_signal.SIGTERM, _term)
    try:
        return fn(args)
    except KeyboardInterrupt as e:
        print(f"parity: interrupted{' (' + str(e) + ')' if str(e) else ''}", file=sys.stderr)
        return 130
    finally:
        if old is not None:
            _signal.signal(_signal.SIGTERM, old)
