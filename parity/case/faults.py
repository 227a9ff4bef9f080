"""Deliberate faults, to prove the harness catches and localises real bugs (tests only): the
spec forms and their parsing, read by the runner (to refuse a bad spec before anything
runs) and by the workers (which apply them: parity/workers/faults.py, where every form is
described)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

WEIGHT_OPS = ("scale", "add", "noise")
CRASH_KINDS = ("raise", "abort", "exit")
CODE_KINDS = ("backward-detach",)
# a broken data-parallel rule on one side (--nproc > 1; parity/workers/dist_faults.py)
DIST_KINDS = ("grad-sum", "num-boxes-local", "bn-local", "same-shard")


class FaultError(ValueError):
    """A malformed fault spec (one line)."""


@dataclass(frozen=True)
class Fault:
    kind: str                  # weight | upsample | config | bn-momentum | code | optim | dist | crash
    target: str = ""           # weight name/pattern, config key, upsample mode, crash kind
    op: str = ""               # weight op
    value: Any = None          # weight op value / config value
    spec: str = ""

    def describe(self) -> str:
        return self.spec


def parse_fault(spec: str) -> Fault:
    s = spec.strip()
    kind, _, rest = s.partition(":")
    if kind == "weight":
        name, sep, opv = rest.rpartition(":")
        if not sep or "=" not in opv or not name:
            raise FaultError(f"fault '{spec}': expected weight:NAME:OP=VALUE (OP: {', '.join(WEIGHT_OPS)})")
        op, _, v = opv.partition("=")
        if op not in WEIGHT_OPS:
            raise FaultError(f"fault '{spec}': unknown weight op '{op}' (allowed: {', '.join(WEIGHT_OPS)})")
        try:
            val = float(v)
        except ValueError:
            raise FaultError(f"fault '{spec}': value '{v}' is not a number") from None
        return Fault("weight", name, op, val, s)
    if kind == "upsample":
        if rest not in ("bilinear",):
            raise FaultError(f"fault '{spec}': expected upsample:bilinear")
        return Fault("upsample", rest, spec=s)
    if kind == "config":
        key, eq, v = rest.partition("=")
        if not eq or not key:
            raise FaultError(f"fault '{spec}': expected config:KEY=VALUE")
        import yaml
        return Fault("config", key, value=yaml.safe_load(v), spec=s)
    if kind == "bn-momentum":
        try:
            val = float(rest)
        except ValueError:
            raise FaultError(f"fault '{spec}': expected bn-momentum:V with a number V in (0, 1]") from None
        if not 0.0 < val <= 1.0:
            raise FaultError(f"fault '{spec}': momentum must be in (0, 1], got {val:g}")
        return Fault("bn-momentum", value=val, spec=s)
    if kind == "code":
        if rest not in CODE_KINDS:
            raise FaultError(f"fault '{spec}': expected code:{'|'.join(CODE_KINDS)}")
        return Fault("code", rest, spec=s)
    if kind == "optim":
        op, eq, v = rest.partition("=")
        try:
            val = float(v) if op == "lr-scale" and eq else None
        except ValueError:
            val = None
        if val is None or not val > 0:
            raise FaultError(f"fault '{spec}': expected optim:lr-scale=V with a number V > 0")
        return Fault("optim", op, value=val, spec=s)
    if kind == "dist":
        if rest not in DIST_KINDS:
            raise FaultError(f"fault '{spec}': expected dist:{'|'.join(DIST_KINDS)}")
        return Fault("dist", rest, spec=s)
    if kind == "crash":
        if rest not in CRASH_KINDS:
            raise FaultError(f"fault '{spec}': expected crash:{'|'.join(CRASH_KINDS)}")
        return Fault("crash", rest, spec=s)
    raise FaultError(f"fault '{spec}': unknown kind '{kind}' (weight, upsample, config, bn-momentum, code, optim, "
                     f"dist, crash)")


def parse_faults(specs: Optional[Sequence[str]]) -> List[Fault]:
    return [parse_fault(s) for s in (specs or [])]


def check_faults_against_spec(faults: Sequence[Fault], names: Sequence[str]) -> None:
    """Every weight fault must match at least one trainable/loaded tensor name."""
    for f in faults:
        if f.kind == "weight" and not fnmatch.filter(names, f.target):
            close = [n for n in names if f.target.split("*")[0][:20] in n][:3]
            raise FaultError(f"fault '{f.spec}': no weight named '{f.target}'"
                             + (f" (similar: {', '.join(close)})" if close else ""))
