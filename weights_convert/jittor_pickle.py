"""Jittor ``.pkl`` weights: a restricted reader and a writer, neither needs Jittor.

What ``jt.save(obj, "x.pkl")`` / ``Module.save("x.pkl")`` write (jittor 1.3.11,
``jittor/__init__.py: safepickle``)::

    pickle.dumps(obj, protocol=4) + sha1(pickle bytes).digest() (20 bytes) + b"HCAJSLHD"

``Module.save`` pickles ``Module.state_dict()``: a plain ``dict`` name -> ``jittor.Var``.
A Var pickles through ``Var.__reduce__ = lambda self: (Var, (self.data,))`` with
``Var.__module__ = "jittor"`` and ``Var.__qualname__ = "jittor_core.Var"``, so the stream
holds ``STACK_GLOBAL('jittor', 'jittor_core.Var')`` applied to one numpy array, itself
pickled the numpy way (``numpy.core.multiarray._reconstruct`` (numpy 1) or
``numpy._core.multiarray._reconstruct`` (numpy 2), ``numpy.ndarray``, ``numpy.dtype``, raw
bytes).  Notes: Jittor has no int64 Vars by default (``jt.array(int64)`` is int32) and
float64 Vars are auto-converted to float32, so a Jittor-saved file never carries int64.

``jt.load`` (``safeunpickle``) checks the SHA1 when the magic trailer is present, reads a
file without the trailer as a plain pickle, and then runs ``pickle.loads`` — which
executes arbitrary code from a crafted file.  This module never does: its unpickler
resolves only an allow-list of globals (numpy array/dtype/scalar reconstruction, the
Jittor Var class mapped to "return the numpy array", ``collections.OrderedDict``) and
refuses anything else with a :class:`WeightsError` naming the global.  Dicts, lists,
tuples, strings and numbers need no globals.

The writer emits a plain ``dict`` name -> ``numpy.ndarray`` (not Vars) with the same
trailer, so dtypes survive exactly (int64 ``num_batches_tracked`` stays int64): ``jt.load``
returns that dict, and ``Module.load`` / ``load_parameters`` accept numpy arrays.  The
numpy pickle names are the local numpy's (numpy 2 writes ``numpy._core``); numpy >= 1.26
reads both spellings.
"""
from __future__ import annotations

import collections
import hashlib
import importlib
import io
import pickle
import warnings
from typing import Any, Dict, Mapping

import numpy as np

from .errors import WeightsError, one_line

MAGIC = b"HCAJSLHD"
_SHA1_LEN = 20


def _numpy_attr(modules, name):
    """First of ``modules`` that imports and has ``name`` (numpy 1 / numpy 2 spellings)."""
    for mod in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise WeightsError(f"this numpy ({np.__version__}) has no {name} in {', '.join(modules)}")


def _c_order(a: np.ndarray) -> np.ndarray:
    """C-contiguous without changing the shape (np.ascontiguousarray turns 0-d into 1-d)."""
    return a if a.flags.c_contiguous else np.array(a, order="C", copy=True)


_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")


def _var_to_numpy(data: Any) -> np.ndarray:
    """Stand-in for ``jittor.Var(data)``: the array the Var was pickled from."""
    if not isinstance(data, np.ndarray):
        raise WeightsError(f"a pickled jittor Var holds {type(data).__name__}, expected a numpy array")
    return data


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as used by protocol-2 pickles of bytes (``latin1``) — data only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise WeightsError("refused a _codecs.encode call that is not the protocol-2 bytes idiom")
    return text.encode("latin1")


def _allowed_globals() -> Dict[tuple, Any]:
    allowed: Dict[tuple, Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _codecs_encode,
        # jittor.Var, however it was spelled by the Jittor version that wrote the file
        ("jittor", "jittor_core.Var"): _var_to_numpy,
        ("jittor", "Var"): _var_to_numpy,
        ("jittor_core", "Var"): _var_to_numpy,
        ("jittor.jittor_core", "Var"): _var_to_numpy,
    }
    for mod in _MULTIARRAY:
        allowed[(mod, "_reconstruct")] = _numpy_attr(_MULTIARRAY, "_reconstruct")
        allowed[(mod, "scalar")] = _numpy_attr(_MULTIARRAY, "scalar")
    for mod in _NUMERIC:
        allowed[(mod, "_frombuffer")] = _numpy_attr(_NUMERIC, "_frombuffer")
    # numpy scalar/dtype classes that numpy pickles by name (e.g. numpy.dtypes.Float32DType)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fileobj, path: str) -> None:
        super().__init__(fileobj)
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise WeightsError(
                f"{self._path}: refused to unpickle global '{module}.{name}' "
                f"(a weights pickle may only hold numpy arrays, jittor Vars and plain containers)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise WeightsError(f"{self._path}: refused a pickle persistent id (not a Jittor weights pickle)")


def split_trailer(blob: bytes, path: str) -> tuple:
    """``(pickle_bytes, checksum_state)`` with state 'ok' or 'absent'; raises on mismatch."""
    if not blob.endswith(MAGIC):
        return blob, "absent"
    if len(blob) < len(MAGIC) + _SHA1_LEN:
        raise WeightsError(f"{path}: file is truncated or corrupted (too short for a Jittor pickle)")
    body, checksum = blob[: -(len(MAGIC) + _SHA1_LEN)], blob[-(len(MAGIC) + _SHA1_LEN): -len(MAGIC)]
    if hashlib.sha1(body).digest() != checksum:
        raise WeightsError(f"{path}: Jittor pickle checksum does not match: the file is corrupted or truncated")
    return body, "ok"


def loads_restricted(blob: bytes, path: str = "<bytes>") -> tuple:
    """Unpickle a Jittor ``.pkl`` payload safely: ``(object, {"checksum": 'ok'|'absent'})``."""
    body, state = split_trailer(blob, path)
    if not body:
        raise WeightsError(f"{path}: file is empty")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(body), path).load()
    except WeightsError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError, OverflowError) as e:
        hint = "file is truncated or corrupted" if state == "absent" else "file is corrupted"
        raise WeightsError(f"{path}: cannot read Jittor pickle ({hint}): "
                           f"{type(e).__name__}: {one_line(e)}") from None
    return obj, {"checksum": state}


def read_jittor_pkl(path: str) -> tuple:
    with open(path, "rb") as f:
        blob = f.read()
    return loads_restricted(blob, path)


def dumps_jittor(weights: Mapping[str, np.ndarray]) -> bytes:
    """Bytes of a Jittor-style ``.pkl``: ``{name: ndarray}`` + SHA1 + magic (protocol 4)."""
    payload = {}
    for k, v in weights.items():
        a = np.asarray(v)
        if a.dtype.kind not in "biuf":
            raise WeightsError(f"'{k}' has dtype {a.dtype}, only numeric arrays can be written")
        payload[str(k)] = _c_order(a)
    body = pickle.dumps(payload, protocol=4)
    return body + hashlib.sha1(body).digest() + MAGIC
