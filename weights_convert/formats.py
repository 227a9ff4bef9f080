"""Readers and writers of the four weight formats: torch .pth/.pt, Jittor .pkl,
safetensors, npz.  Nothing here executes code from a file:

* torch: ``torch.load(map_location="cpu", weights_only=True)`` (torch env only);
* Jittor .pkl: the restricted unpickler of :mod:`.jittor_pickle` (no Jittor needed);
* safetensors: ``safetensors.numpy`` (no pickle at all);
* npz: ``np.load(allow_pickle=False)``.

Readers return the raw object found in the file (for torch/pkl possibly a nested
checkpoint; tensors already turned into numpy); :mod:`.layout` finds the state_dict in it.
"""
from __future__ import annotations

import os
import re
import sys
import zipfile
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional

import numpy as np

from . import jittor_pickle
from .atomic import atomic_output, atomic_write_bytes
from .errors import WeightsError, one_line

FORMATS = ("torch", "jittor", "safetensors", "npz")
EXTENSIONS = {
    ".pth": "torch", ".pt": "torch", ".bin": "torch",
    ".pkl": "jittor",
    ".safetensors": "safetensors",
    ".npz": "npz",
}
DEFAULT_EXTENSION = {"torch": ".pth", "jittor": ".pkl", "safetensors": ".safetensors", "npz": ".npz"}
# Accepted spellings of --to / fmt
_ALIASES = {"torch": "torch", "pytorch": "torch", "pth": "torch", "pt": "torch",
            "jittor": "jittor", "pkl": "jittor", "jt": "jittor",
            "safetensors": "safetensors", "st": "safetensors", "npz": "npz", "numpy": "npz"}

def _c_order(a: np.ndarray) -> np.ndarray:
    """C-contiguous without changing the shape (np.ascontiguousarray turns 0-d into 1-d)."""
    return a if a.flags.c_contiguous else np.array(a, order="C", copy=True)


TORCH_ENV_HINT = "run it in the PyTorch environment (.venvs/torch/bin/weights-convert or .venvs/torch/bin/python)"


def normalize_format(fmt: str) -> str:
    try:
        return _ALIASES[str(fmt).lower()]
    except KeyError:
        raise WeightsError(f"unknown weights format '{fmt}' (expected one of: {', '.join(FORMATS)})") from None


def format_from_extension(path: str) -> Optional[str]:
    name = os.path.basename(str(path)).lower()
    for ext, fmt in EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    return None


def sniff_format(path: str) -> Optional[str]:
    """Guess a format from the first bytes (used when the extension says nothing)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head[:1] == b"\x80":
        return "jittor"                    # a bare pickle: read it restricted
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return None
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        return None
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return None


def _require_torch(action: str):
    if "torch" in sys.modules and sys.modules["torch"] is None:
        raise WeightsError(f"{action} needs PyTorch, which this environment lacks; {TORCH_ENV_HINT}")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise WeightsError(f"{action} needs PyTorch, which this environment ({sys.executable}) lacks; "
                           f"{TORCH_ENV_HINT}") from None
    return torch


# ----------------------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------------------

def is_tensor(v: Any) -> bool:
    """A numpy array or a torch tensor (without importing torch)."""
    if isinstance(v, (np.ndarray, np.generic)):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(v, torch.Tensor)


def to_numpy(obj: Any) -> Any:
    """Torch tensors -> numpy through nested containers; numpy scalars -> 0-d arrays."""
    torch = sys.modules.get("torch")
    return _torch_to_numpy(obj, torch)


def _torch_to_numpy(obj: Any, torch) -> Any:
    """Tensors -> numpy (bfloat16 widened to float32) through nested containers."""
    if isinstance(obj, np.generic):
        return np.asarray(obj)
    if torch is not None and isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        if t.is_quantized or t.layout != torch.strided:
            raise WeightsError(f"unsupported tensor layout/quantization ({t.layout}, {t.dtype})")
        return t.numpy()
    if isinstance(obj, Mapping):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _torch_to_numpy(v, torch)
        return out
    if isinstance(obj, list):
        return [_torch_to_numpy(v, torch) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_torch_to_numpy(v, torch) for v in obj)
    return obj


def read_torch(path: str) -> tuple:
    torch = _require_torch(f"reading the PyTorch checkpoint {path}")
    import pickle
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = re.search(r"GLOBAL ([\w.]+)", text)
        if m:
            raise WeightsError(f"{path}: refused by torch.load(weights_only=True): global '{m.group(1)}' "
                               f"(a weights file may only hold tensors and plain containers)") from None
        m = re.search(r"WeightsUnpickler error:(.*?)(Check the documentation|$)", text, re.S)
        detail = one_line(m.group(1)) if m else one_line(text)
        raise WeightsError(f"{path}: cannot read PyTorch checkpoint (not a torch file, truncated or "
                           f"corrupted): {detail[:200]}") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        msg = one_line(e)
        if "central directory" in msg or isinstance(e, EOFError) or "truncated" in msg:
            msg = "file is truncated or corrupted"
        raise WeightsError(f"{path}: cannot read PyTorch checkpoint: {msg[:300]}") from None
    return obj, {"torch_version": torch.__version__}


def read_safetensors(path: str) -> tuple:
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise WeightsError("reading .safetensors needs the 'safetensors' package (pip install safetensors)") from None
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except (SafetensorError, ValueError, TypeError) as e:
        raise WeightsError(f"{path}: cannot read safetensors file (truncated or corrupted?): {one_line(e)[:300]}") from None
    return out, {"metadata": dict(meta)}


def read_npz(path: str) -> tuple:
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise WeightsError(f"{path}: is a single .npy array, expected an .npz archive of named arrays")
            for k in z.files:
                out[k] = z[k]
    except WeightsError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise WeightsError(f"{path}: refused an object array (would need pickle); "
                               f"weights must be numeric arrays") from None
        raise WeightsError(f"{path}: cannot read npz file (truncated or corrupted?): {one_line(e)[:300]}") from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise WeightsError(f"{path}: cannot read npz file (truncated or corrupted?): {one_line(e)[:300]}") from None
    return out, {}


def read_jittor(path: str) -> tuple:
    return jittor_pickle.read_jittor_pkl(path)


READERS = {"torch": read_torch, "jittor": read_jittor, "safetensors": read_safetensors, "npz": read_npz}


def read_raw(path: str, fmt: Optional[str] = None) -> tuple:
    """``(raw object, format, extra info)`` of a weights file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file")
    if os.path.isdir(path):
        raise WeightsError(f"{path}: is a folder, expected a weights file")
    fmt = normalize_format(fmt) if fmt else (format_from_extension(path) or sniff_format(path))
    if fmt is None:
        raise WeightsError(f"{path}: cannot tell the format (extension not one of "
                           f"{', '.join(EXTENSIONS)} and content not recognised)")
    try:
        raw, extra = READERS[fmt](path)
    except PermissionError as e:
        raise WeightsError(f"{path}: cannot read: {e.strerror}") from None
    return raw, fmt, extra


# ----------------------------------------------------------------------------------------
# writers (always atomic)
# ----------------------------------------------------------------------------------------

def _check_arrays(weights: Mapping[str, Any]) -> "OrderedDict[str, np.ndarray]":
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for k, v in weights.items():
        if not isinstance(k, str):
            raise WeightsError(f"weight names must be strings, got {type(k).__name__} {k!r}")
        a = np.asarray(v)
        if a.dtype.kind not in "biuf":
            raise WeightsError(f"'{k}' has dtype {a.dtype}; only numeric arrays can be written")
        out[k] = _c_order(a)
    return out


def write_safetensors(path: str, weights: Mapping[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> None:
    try:
        from safetensors.numpy import save
    except ImportError:
        raise WeightsError("writing .safetensors needs the 'safetensors' package (pip install safetensors)") from None
    meta = {"format": "pt", "writer": "rtdetr-parity weights_convert"}
    meta.update(metadata or {})
    atomic_write_bytes(path, save(dict(_check_arrays(weights)), metadata=meta))


def write_npz(path: str, weights: Mapping[str, np.ndarray]) -> None:
    arrays = _check_arrays(weights)
    with atomic_output(path) as f:
        np.savez(f, **arrays)


def write_jittor(path: str, weights: Mapping[str, np.ndarray]) -> None:
    if format_from_extension(path) == "torch":
        raise WeightsError(f"{path}: a Jittor pickle must not end in .pth/.pt/.bin "
                           f"(jt.load would read it as a PyTorch file); use .pkl")
    atomic_write_bytes(path, jittor_pickle.dumps_jittor(_check_arrays(weights)))


def write_torch(path: str, weights: Mapping[str, np.ndarray]) -> None:
    torch = _require_torch(f"writing the PyTorch checkpoint {path}")
    sd = OrderedDict((k, torch.from_numpy(np.array(v, copy=True, order="C")))
                     for k, v in _check_arrays(weights).items())
    with atomic_output(path) as f:
        torch.save(sd, f)


WRITERS = {"torch": write_torch, "jittor": write_jittor, "safetensors": write_safetensors, "npz": write_npz}


def write_weights(path: str, weights: Mapping[str, np.ndarray], fmt: Optional[str] = None) -> str:
    """Write ``weights`` (name -> array) to ``path`` atomically; ``fmt`` defaults to the
    extension's format.  Returns the format written.

    * ``safetensors``: ``safetensors.numpy`` (metadata ``format=pt``);
    * ``npz``: ``np.savez`` (uncompressed, insertion order kept);
    * ``jittor``: a ``.pkl`` that ``jt.load`` and ``Module.load`` read (dict of numpy arrays,
      pickle protocol 4 + SHA1 + ``HCAJSLHD``), no Jittor needed to write it;
    * ``torch``: ``torch.save`` of a plain ``OrderedDict`` of tensors (torch env only).
    """
    path = os.fspath(path)
    fmt = normalize_format(fmt) if fmt else format_from_extension(path)
    if fmt is None:
        raise WeightsError(f"{path}: cannot tell the output format from the extension; "
                           f"pass fmt (one of {', '.join(FORMATS)})")
    WRITERS[fmt](path, weights)
    return fmt
