"""Runner side of the *serving* workers of ``parity detect``, ``parity run --stage eval`` and
``parity bench`` (``parity/workers/predict.py``, ``parity/workers/bench.py``), and the feeding
of batches to the predict workers (``run_workers``).

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
``parity/workers/common.py``: 3 environment, 4 input (case/config/weights), 1 crash.  Any failure
reaches the user as one line (``WorkerError``) and exit code 2.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from typing import Any, Dict, Optional, Sequence

from parity.errors import RunError, WorkerError
from parity.numfmt import fmt_s
from parity.sides.process import progress, start, stop_group, worker_threads_env


PROGRESS_EVERY_S = 5.0


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
        self.cmd = [python, "-m", module, "--backend", backend, *args]
        self._log.write((" ".join(self.cmd) + "\n").encode())
        self._log.flush()
        try:
            self.proc = start(self.cmd, backend, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=None if verbose else self._log, env=env)
        except RunError as ex:
            self._log.close()
            raise WorkerError(backend, str(ex)) from None
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
            stop_group(self.proc, grace=10.0)
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


def wait_event(w, event: str, timeout: Optional[float]):
    try:
        return w.wait_for(event, timeout=timeout)
    except TimeoutError:
        w.kill()
        raise WorkerError(w.backend, f"{w.backend} worker: no answer in {timeout:g} s (--timeout); "
                                     f"log: {w.log_path}") from None


def run_workers(backends: Sequence[str], pythons: Dict[str, str], case_dir: str, batches, log_dir: str,
                device: str, dtype: str, verbose: bool, on_batch=None, timeout: Optional[float] = None
                ) -> Dict[str, Dict[str, Any]]:
    """Start one predict worker per backend, feed every batch to all of them (they run side
    by side), call ``on_batch(k, {backend: result npz path})`` after each; return per backend
    ``{"ready": event, "bye": event, "seconds": [per batch]}``.  ``batches`` yields
    ``(k, path_of_batch_npz, n_images, total)``.  ``timeout``: seconds a worker may take to
    start or to answer one batch (``WorkerError`` after that)."""
    wargs = ["--case", case_dir, "--device", device, "--dtype", dtype]
    env = worker_threads_env(len(backends))
    workers = start_workers(backends, pythons, "parity.workers.predict", wargs, log_dir, verbose=verbose, env=env)
    info: Dict[str, Dict[str, Any]] = {be: {"seconds": []} for be in backends}
    try:
        t0 = time.perf_counter()
        for be, w in workers.items():
            ev = wait_event(w, "ready", timeout)
            info[be]["ready"] = ev
            tm = ev.get("timing", {})
            progress(f"[{be:6s}] ready after {fmt_s(time.perf_counter() - t0)} (import {fmt_s(tm.get('import', 0))}, "
                     f"build {fmt_s(tm.get('build', 0))}, load weights {fmt_s(tm.get('load_weights', 0))}; "
                     f"{ev.get('threads', {}).get('threads')} threads, {ev.get('device')})")
        done_images = 0
        last_print = 0.0
        for k, batch_path, n_img, total in batches:
            outs = {be: os.path.join(os.path.dirname(batch_path), f"raw_{k:06d}_{be}.npz") for be in backends}
            for be, w in workers.items():
                w.send({"cmd": "predict", "id": k, "inputs": batch_path, "out": outs[be], "postprocess": True})
            done_images += n_img
            show = k == 0 or done_images >= total or time.perf_counter() - last_print >= PROGRESS_EVERY_S
            for be, w in workers.items():
                ev = wait_event(w, "done", timeout)
                info[be]["seconds"].append(float(ev.get("seconds", 0.0)))
                if show:      # one line per backend, at most every few seconds
                    first = " (first call: includes Jittor's kernel compile)" if be == "jittor" and k == 0 else ""
                    sec = info[be]["seconds"]
                    progress(f"[{be:6s}] {done_images}/{total} images  forward {fmt_s(sec[-1])}{first}  "
                             f"(total {fmt_s(sum(sec))})")
            if show:
                last_print = time.perf_counter()
            if on_batch is not None:
                on_batch(k, outs)
            for p in outs.values():
                if os.path.exists(p):
                    os.unlink(p)
            if os.path.exists(batch_path):
                os.unlink(batch_path)
        for be, w in workers.items():
            info[be]["bye"] = w.close() or {}
    finally:
        for w in workers.values():
            w.kill()
    return info
