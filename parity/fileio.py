"""Atomic file output (temp file in the same folder, fsync, rename) and npz/JSON helpers.

Used by the runner and by the workers (both environments: numpy 1.26 and 2.x), so only
numpy and the standard library here.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import Any, BinaryIO, Dict, Iterator, Mapping

import numpy as np


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
