"""Atomic file output (temp file in the same folder, fsync, rename), npz/JSON helpers, the
one JSON conversion (``jsonable``) and the run folders (``default_out``, ``prepare_out``,
``write_error_result``).

Used by the runner and by the workers (both environments: numpy 1.26 and 2.x), so only
numpy and the standard library here.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import tempfile
from typing import IO, Any, BinaryIO, Dict, Iterator, Mapping, Optional, Sequence

import numpy as np

from parity.errors import EXIT_USAGE, UsageError
from parity.facts import repo_root


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[BinaryIO]:
    """``with atomic_output(path) as f: ...`` — ``path`` appears complete or not at all."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        old = os.umask(0)
        os.umask(old)
        os.chmod(tmp, 0o666 & ~old)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    with atomic_output(path) as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str) -> Any:
    with open(path, "r", encoding="utf-8") as fh:
        return json.load(fh)


def write_npz(path: str, arrays: Mapping[str, np.ndarray], meta: Dict[str, Any] = None) -> None:
    """Uncompressed npz; ``meta`` (JSON) is stored as the 0-d unicode array ``__meta__``
    (readable with ``allow_pickle=False``)."""
    items = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    if meta is not None:
        items["__meta__"] = np.array(json.dumps(meta, allow_nan=True))
    with atomic_output(path) as f:
        np.savez(f, **items)


def read_npz_meta(z) -> Dict[str, Any]:
    return json.loads(str(z["__meta__"][()])) if "__meta__" in z.files else {}


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def jsonable(x: Any) -> Any:
    """Strict JSON: non-finite floats become the strings 'nan' / 'inf' / '-inf', numpy scalars
    and arrays Python numbers and lists, tuples lists, keys strings."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


# ----------------------------------------------------------------------------------------
# run folders
# ----------------------------------------------------------------------------------------

def default_out(kind: str, config_name: str) -> str:
    """``<repo>/reports/runs/<time>-<kind>-<config>`` (``-2``, ``-3``, ... when taken)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(repo_root(), "reports", "runs", f"{stamp}-{kind}-{config_name}")
    out, n = base, 2
    while os.path.exists(out):
        out, n = f"{base}-{n}", n + 1
    return out


def prepare_out(out: str, stale: Sequence[str]) -> str:
    """Create the output folder; remove old result files first (``stale``), so an
    interrupted rerun never shows an older verdict."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a folder")
    os.makedirs(out, exist_ok=True)
    for name in stale:
        m = os.path.join(out, name)
        if os.path.isfile(m):
            os.unlink(m)
    return out


def error_result(base: Mapping[str, Any], error: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
    """The result of a run that ended in an error: ``"status": "error"``, never a pass."""
    res = dict(base)
    res.update(status="error", passed=False, exit_code=EXIT_USAGE, **extra)
    res["error"] = error
    return jsonable(res)


def write_error_result(out: Optional[str], name: str, message: str, base: Optional[Dict[str, Any]] = None,
                       side: Optional[str] = None, phase: Optional[str] = None) -> None:
    """After an error of a serving command: ``<out>/<name>`` says ``"status": "error"``."""
    if not out or not os.path.isdir(out):
        return
    err = {"side": side or "runner", "phase": phase, "message": message.splitlines()[0] if message else ""}
    try:
        write_json(os.path.join(out, name), error_result({"schema": 1, **(base or {})}, err))
    except (OSError, ValueError):
        pass


class JsonArrayWriter:
    """A JSON array written item by item to ``PATH.partial``; ``close()`` fsyncs and renames
    it to ``PATH`` (so ``PATH`` is complete or absent); ``abort()`` removes the partial file."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = path + ".partial"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f: Optional[IO[str]] = open(self.tmp, "w", encoding="utf-8")
        self.f.write("[")
        self.n = 0

    def extend(self, items: Sequence[Dict[str, Any]]) -> None:
        for it in items:
            self.f.write(("\n" if self.n == 0 else ",\n") + json.dumps(it, allow_nan=False))
            self.n += 1

    def close(self) -> None:
        if self.f is None:
            return
        self.f.write("\n]\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def rank_out(out: str, rank: int) -> str:
    """``work/T64.npz`` -> ``work/T64.rank1.npz``: each rank of a data-parallel worker
    (``--nproc``) writes its own result, status and error files."""
    stem = out[:-4] if out.endswith(".npz") else out
    return f"{stem}.rank{rank}.npz"
