"""``parity run --stage train``, float32: when the curves fail, was it a tie?

Two correct float32 programs resolve a near-tied top-k score or matching cost differently now
and then, and from that iteration on their trajectories differ by more than the float32 floor
(T32 vs T64) measured on a run where T32 and T64 happened to choose alike.  Failing such a run
would be a FAIL for a tie; passing it unexamined could be a PASS for a bug.  So, when a float32
run fails and the candidate's decisions diverged from the base side's:

1. **locate**: the first iteration whose canonical choices differ (parity/judge/train_decisions.py:
   the top-k token set and the (token, target) pairs; a re-ordering inside the top-k is not a
   choice);
2. **probe**: the base (T32) and the reference (T64) are replayed from their newest checkpoint
   before that iteration, bit for bit, and record the evidence there: encoder scores [b, S]
   and matching costs [b, Q, T] (parity/workers/train_decisions.py);
3. **classify** the candidate's logged choice (parity/judge/decisions.py): under T64's values, the
   gap of every pair the two sides rank oppositely (top-k) or the extra cost of the
   candidate's assignment (matching), against tie_k x the T32 - T64 difference of those values;
4. a **flip** is a real difference: the run FAILs and the check names the iteration, rank,
   image and decision.  A **tie**: the candidate is replayed from its checkpoint before that
   iteration, taking the base side's choice there (``--follow``), into ``<LABEL>.follow/``, and
   the run is judged again on that replay.  A later divergence is handled the same way, at
   most ``MAX_FOLLOW`` times.

The candidate's own run stays untouched beside the replay; result.json's ``decisions`` keeps
every classification, and the ``decisions`` check fails on a flip or when ties keep coming.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Dict, List

import numpy as np

from parity.commands.train_steps import faults_of
from parity.errors import EXIT_FAIL, EXIT_OK, RunError
from parity.fileio import read_json, write_npz
from parity.judge import decisions as D
from parity.judge import train_decisions as TD
from parity.sides.train import Side, check_side, kill_side, start_side, wait_sides

MAX_FOLLOW = 4          # ties followed per run before the decisions check gives up


def settle(run, thresholds, res: Dict[str, Any], code: int, rejudge: Callable[[], tuple], progress):
    """The run's verdict after its decisions were examined -> ``(result, exit code)``."""
    by_role = {s.role: s for s in run.sides}
    cand, base, ref = by_role.get("cand"), by_role.get("base"), by_role.get("ref")
    if run.dtype != "float32" or cand is None or base is None:
        return res, code
    info = TD.divergences(cand.dir, base.dir, run.nproc)
    if info["compared"] == 0:
        return res, code          # no decisions logged (a run made before they were)
    record: Dict[str, Any] = {"candidate": cand.label, "base": base.label, "initial": info, "events": [],
                              "followed": [], "replay": None}
    if ref is not None:       # does the floor itself hold a divergence? (T64 vs T32, the same comparison)
        record["reference"] = {"label": ref.label, **TD.divergences(ref.dir, base.dir, run.nproc)}
    res["decisions"] = record
    if res.get("status") == "fail" and info["first"] is not None and ref is None:
        record["note"] = "no float64 reference side (--no-reference): the divergence cannot be classified"
    if res.get("status") != "fail" or info["first"] is None or ref is None:
        return res, code
    ipe = int(run.plan["iterations_per_epoch"])
    twin_dir = os.path.join(run.out, cand.label + ".follow")
    record["own_dir"] = os.path.basename(cand.dir)
    first, source, check = info["first"], cand.dir, None
    for _ in range(MAX_FOLLOW):
        i = int(first["iteration"])
        progress.line(f"  {cand.label} chose differently from {base.label} at iteration {i} "
                      f"({first['what']}, rank {first['rank']}, image {first['image']}): probing the evidence ...")
        ev = probe_and_classify(run, source, base, ref, i, ipe, thresholds.tie_k, progress)
        record["events"].append(ev)
        progress.line(f"  iteration {i}: {ev['kind']} ({ev['text']})")
        if ev["kind"] == "flip":
            check = _check(False, f"{cand.label} at iteration {i}: {ev['text']}")
            break
        record["followed"].append(i)
        progress.line(f"  replaying {cand.label} with {base.label}'s choice at iteration(s) "
                      f"{', '.join(map(str, record['followed']))} -> {os.path.basename(twin_dir)}/")
        replay_follow(run, cand, source, twin_dir, record["followed"], base.dir, progress)
        source = cand.dir = twin_dir
        res, code, _ = rejudge()
        res["decisions"] = record
        record["replay"] = os.path.basename(twin_dir)
        after = TD.divergences(twin_dir, base.dir, run.nproc, after=i)
        record["after_replay"] = after
        if res.get("status") != "fail" or after["first"] is None:
            break          # judged on the replay; a failure left without a divergence is arithmetic
        first = after["first"]
    else:
        check = _check(False, f"still failing after following {MAX_FOLLOW} ties "
                              f"(iterations {', '.join(map(str, record['followed']))})")
    if check is None:
        n = len(record["followed"])
        check = _check(True, f"{n} tie(s) followed at iteration(s) {', '.join(map(str, record['followed']))}"
                       if n else "no divergence")
    res["checks"] = [c for c in res.get("checks", []) if c.get("check") != "decisions"] + [check]
    passed = all(c["passed"] for c in res["checks"])
    res["passed"] = passed
    res["status"] = "pass" if passed else "fail"
    res["exit_code"] = code = EXIT_OK if passed else EXIT_FAIL
    return res, code


def _check(passed: bool, text: str) -> Dict[str, Any]:
    e = {"check": "decisions", "text": "discrete decisions (top-k, matching) classified", "value": text,
         "floor": None, "threshold": {}, "rule": "classified" if passed else None, "passed": passed}
    if not passed:
        e["reason"] = text
    return e


# ----------------------------------------------------------------------------------------
# probe, classify, replay
# ----------------------------------------------------------------------------------------

def probe_and_classify(run, cand_dir: str, base: Side, ref: Side, i: int, ipe: int, tie_k: float,
                       progress) -> Dict[str, Any]:
    """Replay the base and the reference to iteration ``i``, classify the candidate's choice there."""
    root = os.path.join(run.out, "ties", f"it{i:06d}")
    probes = {}
    jobs = []
    for s in (base, ref):
        scratch = os.path.join(root, s.label)
        resume = prepare_replay(s.dir, scratch, i)
        out = os.path.join(root, f"{s.label}.probe")
        jobs.append((_side_at(s, scratch), resume, ["--dir", scratch, "--probe-at", str(i), "--probe-out", out]))
        probes[s.label] = out
    _run_jobs(run, jobs, progress)
    epoch = (i - 1) // ipe + 1
    per_rank, worst = [], None
    for r in range(run.nproc):
        cand_dec = TD.read_epoch(cand_dir, epoch, r).get(i)
        base_dec = TD.read_epoch(base.dir, epoch, r).get(i)
        bp = TD.read_probe(os.path.join(probes[base.label], f"rank{r}.npz"))
        rp = TD.read_probe(os.path.join(probes[ref.label], f"rank{r}.npz"))
        if cand_dec is None or base_dec is None:
            raise RunError(f"iteration {i}: decisions of rank {r} missing in {cand_dir} or {base.dir}")
        if TD.compare_iteration(TD.probe_decisions(bp), base_dec) is not None:
            # the replay must reproduce the base's own run; if not, nothing can be classified
            cls = {"kind": "flip", "topk": {"kind": "flip"}, "matches": {},
                   "reason": f"the {base.label} replay did not reproduce its logged choice at iteration {i}"}
        elif TD.compare_iteration(cand_dec, base_dec) is None:
            continue
        else:
            cls = TD.classify(cand_dec, bp, rp, tie_k)
        cls["rank"] = r
        per_rank.append(cls)
        if worst is None or D.KIND_ORDER[cls["kind"]] > D.KIND_ORDER[worst["kind"]]:
            worst = cls
    if worst is None:
        worst = {"kind": "same", "topk": {"kind": "same"}, "matches": {}, "rank": 0}
    return {"iteration": i, "epoch": epoch, "kind": worst["kind"], "text": describe(worst),
            "ranks": [_jsonable_cls(c) for c in per_rank], "probes": os.path.relpath(root, run.out)}


def describe(cls: Dict[str, Any]) -> str:
    if cls.get("reason"):
        return cls["reason"]
    parts = []
    if cls["topk"]["kind"] != "same":
        parts.append("top-k " + D.describe(cls["topk"]))
    for call, c in cls["matches"].items():
        if c["kind"] != "same":
            parts.append(f"matching {call} " + D.describe(c))
    return "; ".join(parts) or "identical"


def _jsonable_cls(cls: Dict[str, Any]) -> Dict[str, Any]:
    def slim(c):
        return {k: (float(v) if isinstance(v, (np.floating, float)) else v)
                for k, v in c.items() if k in ("kind", "gap", "noise", "image", "reason")}
    return {"rank": cls.get("rank"), "kind": cls["kind"], "topk": slim(cls["topk"]),
            "matches": {k: slim(v) for k, v in cls["matches"].items() if v["kind"] != "same"},
            **({"reason": cls["reason"]} if cls.get("reason") else {})}


def replay_follow(run, cand: Side, source: str, twin_dir: str, followed: List[int], base_dir: str,
                  progress) -> None:
    """The candidate again from its newest checkpoint before the latest tie, taking the base
    side's decisions at every followed iteration."""
    resume = prepare_replay(source, twin_dir, max(followed))
    follow = os.path.join(run.out, "ties", "follow.npz")
    write_npz(follow, TD.follow_arrays(base_dir, followed, run.nproc))
    _run_jobs(run, [(_side_at(cand, twin_dir), resume, ["--dir", twin_dir, "--follow", follow])], progress)


def prepare_replay(src: str, dst: str, i: int) -> bool:
    """``dst`` holds ``src``'s newest checkpoint from before iteration ``i`` (and the decisions
    and rank files up to it), ready for --resume; False when none exists (start from epoch 1)."""
    best, best_epoch = None, 0
    root = os.path.join(src, "checkpoints")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        st = os.path.join(root, name, "state.json")
        if name.startswith("epoch_") and os.path.isfile(st):
            state = read_json(st)
            if int(state["iteration"]) < i:
                best, best_epoch = os.path.join(root, name), int(state["epoch"])
    stage = dst + ".staging"
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    if best is not None:
        shutil.copytree(best, os.path.join(stage, "checkpoints", os.path.basename(best)))
        dec = os.path.join(src, "decisions")
        for f in sorted(os.listdir(dec)) if os.path.isdir(dec) else []:
            if f.startswith("epoch_") and int(f[6:10]) <= best_epoch:      # every rank's file of those epochs
                os.makedirs(os.path.join(stage, "decisions"), exist_ok=True)
                shutil.copy2(os.path.join(dec, f), os.path.join(stage, "decisions", f))
        if os.path.isdir(os.path.join(src, "ranks")):
            shutil.copytree(os.path.join(src, "ranks"), os.path.join(stage, "ranks"))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(stage, dst)
    return best is not None


def _side_at(s: Side, folder: str) -> Side:
    twin = Side(s.label, s.role, s.backend, s.dtype, s.python, os.path.dirname(folder))
    twin.dir = folder
    return twin


def _run_jobs(run, jobs, progress) -> None:
    started = []
    try:
        groups = [[j] for j in jobs] if run.sequential else [jobs]
        for group in groups:
            for side, resume, extra in group:
                start_side(side, run.out, run.device, run.threads, resume, None, faults_of(run, side), run.verbose,
                           run.nproc, extra=extra)
                started.append(side)
            wait_sides([j[0] for j in group], progress, run.plan["epochs"], run.timeout)
            for side, _, _ in group:
                check_side(side)
    except BaseException:
        for s in started:
            kill_side(s)
        raise
