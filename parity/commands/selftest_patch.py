"""Mechanics of ``parity selftest``: the bug list, a patched copy of the repository, one
harness run in it, and what that run says about the bug.

The harness is run as a user would run it, ``python -m parity ...`` with the copy as the
working directory: the runner computes its workers' PYTHONPATH from its own location
(parity/case/folder.py ``repo_root``), so both workers import the copy and the Jittor worker gets
the patched backend while the PyTorch backend is untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from parity.facts import PARITY_DIR, repo_root


BUGS_FILE = os.path.join(PARITY_DIR, "selftest_bugs.yaml")
BACKEND_DIR = os.path.join("backends", "jittor_impl")
PARTS = ("backbone", "encoder", "decoder", "deformable attention", "denoising", "criterion", "matcher",
         "postprocess", "BN buffers", "optimiser")
TAGS = ("nonsquare", "train", "detect")
STAGES = ("forward", "grad")
# never copied: version control, environments, earlier run output, caches
IGNORE = shutil.ignore_patterns(".git", ".venvs", "runs", ".cache", "__pycache__", ".pytest_cache", "*.pyc")


class PatchError(Exception):
    """A bug that cannot be planted as written (one line; exit 2)."""


@dataclass
class Bug:
    id: str
    description: str
    file: str
    old: str
    new: str
    part: str
    kind: str
    expected: List[str]
    tags: List[str] = field(default_factory=list)
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    fast: bool = False


def load_bugs(path: Optional[str] = None) -> List[Bug]:
    path = path or BUGS_FILE
    with open(path, "r", encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    bugs, seen = [], set()
    for i, b in enumerate(data.get("bugs") or []):
        where = f"{path}: bug {i} ({b.get('id', '?') if isinstance(b, dict) else '?'})"
        if not isinstance(b, dict):
            raise PatchError(f"{where}: expected a mapping")
        missing = [k for k in ("id", "description", "file", "old", "new", "part", "kind", "expected") if k not in b]
        if missing:
            raise PatchError(f"{where}: missing {', '.join(missing)}")
        unknown = set(b) - set(Bug.__dataclass_fields__)
        if unknown:
            raise PatchError(f"{where}: unknown keys {sorted(unknown)}")
        bug = Bug(**{**b, "expected": list(b["expected"]), "tags": list(b.get("tags") or []),
                     "stages": list(b.get("stages") or STAGES)})
        if bug.id in seen:
            raise PatchError(f"{where}: duplicate id")
        seen.add(bug.id)
        if bug.part not in PARTS:
            raise PatchError(f"{where}: part {bug.part!r} not one of {', '.join(PARTS)}")
        if set(bug.tags) - set(TAGS) or set(bug.stages) - set(STAGES):
            raise PatchError(f"{where}: tags must be among {TAGS}, stages among {STAGES}")
        if bug.old == bug.new:
            raise PatchError(f"{where}: old and new are the same text")
        bugs.append(bug)
    return bugs


def copy_repo(dest: str, src: Optional[str] = None) -> str:
    """Copy the repository tree (no .git, .venvs, reports/runs, caches) to ``dest``."""
    src = src or repo_root()
    shutil.copytree(src, dest, ignore=IGNORE, symlinks=True)
    return dest


def apply_patch(root: str, file: str, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in ``root/backends/jittor_impl/file``; ``old`` must occur
    exactly once (a patch that silently applies nowhere, or in two places, proves nothing)."""
    rel = os.path.normpath(file)
    if rel.startswith("..") or os.path.isabs(rel):
        raise PatchError(f"{file}: must be a path under {BACKEND_DIR}/")
    path = os.path.join(root, BACKEND_DIR, rel)
    if not os.path.isfile(path):
        raise PatchError(f"{BACKEND_DIR}/{file}: no such file")
    with open(path, "r", encoding="utf-8") as fh:
        text = fh.read()
    n = text.count(old)
    if n != 1:
        raise PatchError(f"{BACKEND_DIR}/{file}: the old text occurs {n} times (must be exactly once): {old[:60]!r}")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text.replace(old, new, 1))


def check_patches(bugs: Sequence[Bug]) -> None:
    """Every bug applies exactly once to the current tree (checked before hours of runs)."""
    base = os.path.join(repo_root(), BACKEND_DIR)
    for b in bugs:
        path = os.path.join(base, b.file)
        text = open(path, encoding="utf-8").read() if os.path.isfile(path) else None
        n = -1 if text is None else text.count(b.old)
        if n != 1:
            what = "no such file" if n < 0 else f"the old text occurs {n} times (must be exactly once)"
            raise PatchError(f"bug {b.id}: {BACKEND_DIR}/{b.file}: {what}")


# ----------------------------------------------------------------------------------------
# one harness run in a copy
# ----------------------------------------------------------------------------------------

@dataclass
class Run:
    """One harness invocation on one (patched or clean) copy."""
    stage: str                 # forward | grad | train | detect
    config: str                # config label shown in the table (smoke, 96x160)
    argv: List[str]
    out: str
    rc: Optional[int] = None
    seconds: float = 0.0
    caught64: Optional[bool] = None
    caught32: Optional[bool] = None
    where: str = ""            # first divergence "module [group]" / failing checks / detections
    places: List[str] = field(default_factory=list)  # what `expected` is matched against
    error: str = ""

    @property
    def caught(self) -> bool:
        return bool(self.caught64 or self.caught32)

    def to_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in ("stage", "config", "argv", "out", "rc", "seconds", "caught64",
                                              "caught32", "where", "places", "error")} | {"caught": self.caught}


def run_in(copy_root: str, run: Run, env: Dict[str, str], timeout: float, log) -> Run:
    """``python -m parity <argv>`` with the copy as cwd; reads ``<out>/result.json``."""
    os.makedirs(run.out, exist_ok=True)
    t0 = time.perf_counter()
    with open(os.path.join(run.out, "selftest.log"), "w", encoding="utf-8") as fh:
        try:
            p = subprocess.run([sys.executable, "-m", "parity", *run.argv, "--out", run.out], cwd=copy_root,
                               env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
            run.rc = p.returncode
        except subprocess.TimeoutExpired:
            run.rc, run.error = 2, f"timed out after {timeout:.0f} s"
    run.seconds = time.perf_counter() - t0
    res_path = os.path.join(run.out, "result.json")
    res = json.load(open(res_path, encoding="utf-8")) if os.path.isfile(res_path) else None
    if run.rc not in (0, 1) or res is None or res.get("status") == "error":
        run.error = run.error or (res or {}).get("error") or (res or {}).get("message") or _last_line(run.out)
        run.caught64 = run.caught32 = False
        log(f"    {run.stage} {run.config}: ERROR (exit {run.rc}): {run.error}")
        return run
    interpret(run, res)
    return run


def _last_line(out: str) -> str:
    try:
        lines = [ln for ln in open(os.path.join(out, "selftest.log"), encoding="utf-8").read().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "no output"
    except OSError:
        return "no output"


def _fd_places(fd: Optional[Dict[str, Any]]) -> List[str]:
    if not fd:
        return []
    name = str(fd.get("name") or "")
    return [str(fd.get("module") or ""), name, name[len("train."):] if name.startswith("train.") else name,
            f"group:{fd.get('group')}"]


def interpret(run: Run, res: Dict[str, Any]) -> None:
    """Fill caught64/caught32/where/places from a result.json."""
    if run.stage in ("forward", "grad"):
        runs = res.get("runs") or {res.get("dtype", "float64"): res}
        r64, r32 = runs.get("float64"), runs.get("float32")
        run.caught64 = None if r64 is None else not r64["passed"]
        run.caught32 = None if r32 is None else not r32["passed"]
        fd = (r64 or {}).get("first_divergence") if run.caught64 else (r32 or {}).get("first_divergence")
        run.places = _fd_places(fd)
        if fd:
            run.where = f"{fd.get('module')} [{fd.get('group')}]"
    elif run.stage == "train":
        failed = [c["check"] for c in res.get("checks", []) if not c["passed"]]
        caught = not res.get("passed", False)
        if res.get("dtype") == "float64":
            run.caught64 = caught
        else:
            run.caught32 = caught
        run.places = [f"check:{c}" for c in failed]
        run.where = ", ".join(failed)
    elif run.stage == "detect":
        raw_bad = [e["name"] for e in res.get("raw_outputs", []) if not e.get("passed")]
        ag = res.get("agreement") or {}
        caught = not res.get("passed", False)
        if res.get("dtype") == "float64":
            run.caught64 = caught
        else:
            run.caught32 = caught
        run.places = [f"raw:{n}" for n in raw_bad] + (["detections"] if caught and not raw_bad else [])
        run.where = (f"raw {', '.join(raw_bad)}" if raw_bad else
                     f"detections (min agreement {ag.get('min_agreement', 1.0):.3f})" if caught else "")


def localised(run: Run, expected: Sequence[str]) -> bool:
    """Did a run that caught the bug name an expected place?  Train: every failing check is
    an expected one (an optimiser bug must not show in the first gradient, a buffer bug in no
    loss); otherwise: the first divergence's module/name starts with an expected prefix, or
    its group is an expected ``group:G``."""
    if not run.caught:
        return False
    if run.stage == "train":
        return bool(run.places) and all(p in expected for p in run.places)
    if run.stage == "detect":
        return "detections" in expected and run.places == ["detections"]
    for p in run.places:
        for e in expected:
            if (e.startswith("group:") and p == e) or (not e.startswith(("group:", "check:")) and p.startswith(e)):
                return True
    return False
