"""``parity run --stage forward|grad``: build a case, run one worker per backend, compare.

Flow (float32, the default)::

    case folder  ->  torch float32 (base)  ->  jittor float32 (candidate)  ->  torch float64 (reference)
                                  \\-- top-k + matches --> reference (always) and candidate (--share-decisions)

With ``--dtype float64`` there is no reference (torch float64 is the base).  Each worker runs
in its own environment's interpreter (``python -m parity.worker``, see parity/worker.py for
the protocol); everything is exchanged through files under ``--out``::

    <out>/case/            the case folder (parity/case.py)
    <out>/work/<X>.npz     worker results (X = T32, T64, J32, J64), deleted after the
                           comparison unless --keep-arrays; <X>.log holds the worker's output
    <out>/result.json      every tensor's errors, rule and verdict; groups; first divergence
    <out>/summary.md       the same for people

Exit codes: 0 every check passed, 1 a threshold failed, 2 usage or environment error
(missing environment, corrupt weights, config mismatch between the sides, a backend crash).
On exit 2 ``result.json`` says ``"status": "error"`` (never a pass).
"""
from __future__ import annotations

import datetime
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from . import compare as C
from .case import CaseError, build_case, repo_root, runner_versions
from .faults import FaultError, check_faults_against_spec, parse_faults
from .fileio import read_npz_meta, write_json, write_text
from .thresholds import ThresholdError, load_thresholds

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
STAGES = ("forward", "grad")
ENV_VARS = {"torch": "RTDETR_PARITY_TORCH_PYTHON", "jittor": "RTDETR_PARITY_JITTOR_PYTHON"}
GROUP_ORDER = ("intermediates", "outputs", "train_intermediates", "train_outputs", "decisions", "losses",
               "grads", "step")


class RunError(Exception):
    """A usage or environment error: one clear line naming the side and the cause; exit 2."""

    def __init__(self, message: str, side: str = "runner", cause: str = "usage", log: Optional[str] = None):
        super().__init__(message)
        self.side, self.cause, self.log = side, cause, log


# ----------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------

def _opt(args, name, default=None):
    v = getattr(args, name, default)
    return default if v is None else v


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


def default_out(stage: str, config_name: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(repo_root(), "reports", "runs", f"{stamp}-{stage}-{config_name}")
    out, n = base, 2
    while os.path.exists(out):
        out, n = f"{base}-{n}", n + 1
    return out


def label(backend: str, dtype: str, candidate: bool = False, cand_backend: str = "jittor") -> str:
    bits = "32" if dtype == "float32" else "64"
    if candidate and cand_backend == "torch":
        return "C" + bits            # harness self-test: torch against torch
    return ("T" if backend == "torch" else "J") + bits


# ----------------------------------------------------------------------------------------
# workers
# ----------------------------------------------------------------------------------------

@dataclass
class Job:
    label: str
    role: str                   # base | cand | ref
    backend: str
    python: str
    dtype: str
    task: str
    out: str
    share_from: Optional[str] = None       # label whose decisions are injected
    faults: List[str] = field(default_factory=list)
    wall: float = 0.0
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def log(self) -> str:
        return self.out[:-4] + ".log"


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


def _worker_env() -> Dict[str, str]:
    env = dict(os.environ)
    root = repo_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _pump(pipe, log_path: str, echo: bool) -> None:
    with open(log_path, "ab") as fh:
        for line in iter(pipe.readline, b""):
            fh.write(line)
            fh.flush()
            if echo:
                sys.stderr.write(line.decode("utf-8", "replace"))
    pipe.close()


def _tail(path: str, n: int = 12) -> str:
    try:
        with open(path, "rb") as fh:
            lines = fh.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    lines = [ln for ln in lines if ln.strip()]
    return "\n".join("      | " + ln[:200] for ln in lines[-n:])


def preflight(jobs: Sequence[Job], verbose: bool = False) -> Dict[str, Dict[str, Any]]:
    """Import each backend once in its interpreter (in parallel): a missing framework or a
    backend that does not import is reported before any long run starts."""
    import json
    seen: Dict[str, Job] = OrderedDict()
    for j in jobs:
        seen.setdefault(j.backend + "|" + j.python, j)
    procs = []
    for key, j in seen.items():
        cmd = [j.python, "-m", "parity.worker", "--backend", j.backend, "--check"]
        try:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_worker_env(),
                                 cwd=repo_root())
        except OSError as e:
            raise RunError(f"{j.backend} environment broken: cannot start {j.python}: {e.strerror or e}",
                           side=j.backend, cause="environment missing") from None
        procs.append((j, p))
    versions = {}
    for j, p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            msg = err.decode("utf-8", "replace").strip().splitlines()
            detail = next((ln for ln in reversed(msg) if "failed in phase" in ln), msg[-1] if msg else "")
            if "failed in phase" in detail:
                detail = detail.split(": ", 1)[-1]
            raise RunError(f"{j.backend} environment unusable ({j.python}): {detail or f'exit code {p.returncode}'}",
                           side=j.backend, cause="environment missing")
        lines = [ln for ln in out.decode("utf-8", "replace").splitlines() if ln.startswith("{")]
        try:
            versions[j.backend] = json.loads(lines[-1])["versions"]
        except (IndexError, ValueError, KeyError):
            versions[j.backend] = {}
    return versions


def run_job(job: Job, case_dir: str, device: str, progress: Progress, index: int, total: int,
            verbose: bool = False, timeout: Optional[float] = None) -> None:
    cmd = [job.python, "-m", "parity.worker", "--backend", job.backend, "--case", case_dir, "--out", job.out,
           "--dtype", job.dtype, "--task", job.task, "--device", device]
    if job.share_from:
        cmd += ["--share-decisions", os.path.join(os.path.dirname(job.out), f"decisions-{job.share_from}.npz")]
    for f in job.faults:
        cmd += ["--inject-fault", f]
    with open(job.log, "wb") as fh:
        fh.write(("$ " + " ".join(cmd) + "\n").encode())
    name = f"[{index}/{total}] {job.backend:<6} {job.dtype} {job.task:<7} ({job.label}, {job.role})"
    if not progress.tty:
        progress.line(f"  {name} ...")
    t0 = time.perf_counter()
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_worker_env(),
                             cwd=repo_root(), start_new_session=True)
    except OSError as e:
        raise RunError(f"{job.backend} side: cannot start {job.python}: {e.strerror or e}", side=job.backend,
                       cause="environment missing") from None
    th = threading.Thread(target=_pump, args=(p.stdout, job.log, verbose), daemon=True)
    th.start()
    status = job.out + ".status"
    timed_out = False
    try:
        while p.poll() is None:
            el = time.perf_counter() - t0
            phase = ""
            try:
                import json
                with open(status) as fh:
                    phase = json.load(fh).get("phase", "")
            except (OSError, ValueError):
                pass
            progress.update(f"  {name}  {phase:<14} {el:7.1f}s")
            if timeout and el > timeout:
                timed_out = True
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                break
            time.sleep(0.25)
    except KeyboardInterrupt:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait()
        raise
    th.join(timeout=5)
    job.wall = time.perf_counter() - t0
    rc = p.returncode
    err_file = job.out + ".error.json"
    if rc == 0 and os.path.isfile(job.out):
        import json
        with np.load(job.out, allow_pickle=False) as z:
            job.meta = read_npz_meta(z)
        rss = job.meta.get("peak_rss_mb")
        progress.line(f"  {name}  done {job.wall:7.1f}s" + (f"  peak RSS {rss:,.0f} MB" if rss else ""))
        return
    progress.line(f"  {name}  FAILED after {job.wall:.1f}s")
    where = f"{job.backend} side ({job.dtype} {job.task})"
    if timed_out:
        raise RunError(f"{where}: killed after the --timeout of {timeout:g}s (log: {job.log})",
                       side=job.backend, cause="timeout", log=job.log)
    if os.path.isfile(err_file):
        import json
        try:
            with open(err_file) as fh:
                e = json.load(fh)
        except (OSError, ValueError):
            e = {}
        phase = e.get("phase", "?")
        cause = {"import": "environment", "case": "case", "config": "config mismatch",
                 "weights": "weights", "faults": "usage"}.get(phase, "backend crash")
        if cause == "backend crash":
            what = f"crashed in phase '{phase}'"
        else:
            what = f"failed ({cause}, phase '{phase}')"
        raise RunError(f"{where} {what}: {e.get('message', '?')} (log: {job.log})", side=job.backend,
                       cause=cause, log=job.log)
    if rc is not None and rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
        how = f"was killed by {sig}"
    else:
        how = f"exited with code {rc} without a result or error report"
    raise RunError(f"{where} crashed: the worker {how} (log: {job.log})\n{_tail(job.log)}",
                   side=job.backend, cause="backend crash", log=job.log)


def write_decisions_from(result_npz: str, dest: str) -> bool:
    from .worker import write_decisions
    topk = train_topk = None
    matches: Dict[str, Dict[int, np.ndarray]] = OrderedDict()
    with np.load(result_npz, allow_pickle=False) as z:
        meta = read_npz_meta(z)
        if "dec/topk" in z.files:
            topk = z["dec/topk"]
        if "train/dec/topk" in z.files:
            train_topk = z["train/dec/topk"]
        for call in meta.get("order", {}).get("matches", []):
            d = {}
            for k in z.files:
                if k.startswith(f"match/{call}/"):
                    d[int(k.rsplit("/", 1)[1])] = z[k]
            matches[call] = [d[i] for i in sorted(d)]
    if topk is None and train_topk is None and not matches:
        return False
    write_decisions(dest, topk, matches or None, train_topk=train_topk)
    return True


# ----------------------------------------------------------------------------------------
# comparison
# ----------------------------------------------------------------------------------------

def _grad_order(names: Sequence[str]) -> List[str]:
    """Backward order: decoder, then encoder, then backbone; within a part, reverse spec order."""
    rank = {"decoder": 0, "encoder": 1, "backbone": 2}
    idx = {n: i for i, n in enumerate(names)}
    return sorted(names, key=lambda n: (rank.get(n.split(".", 1)[0], 3), -idx[n]))


def compare_results(stage: str, dtype: str, base_path: str, cand_path: str, ref_path: Optional[str],
                    thresholds, *, cand_shared: Dict[str, bool], cand_side: str = "jittor",
                    before: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, Any]:
    """Every comparison of a run, in forward order (then backward order for gradients).
    ``before``: the weights the optimiser step started from (the case's), for the step
    group's update rule."""
    ths = thresholds.for_run(stage, dtype)
    min_ag = thresholds.min_agreement
    zb = np.load(base_path, allow_pickle=False)
    zc = np.load(cand_path, allow_pickle=False)
    zr = np.load(ref_path, allow_pickle=False) if ref_path else None
    mb, mc = read_npz_meta(zb), read_npz_meta(zc)
    entries: List[Dict[str, Any]] = []
    warnings: List[str] = []
    fc, fb = set(zc.files), set(zb.files)

    def missing(name, group, key, module=None):
        entries.append({"name": name, "group": group, "kind": "missing", "module": module or name,
                        "passed": False, "rule": None, "shape": list(zb[key].shape),
                        "reason": f"missing on the {cand_side} side (contract: every name of backends/README.md)"})

    def ref_of(key):
        if zr is None or key not in zr.files:
            return None
        return zr[key]

    def one(key, name, group, module=None, prior=None, mode="eval" if stage == "forward" else "train"):
        if key not in fc:
            missing(name, group, key, module)
        else:
            b, c = zb[key], zc[key]
            if b.dtype.kind in "iub" or c.dtype.kind in "iub":
                if name.endswith("enc_topk_index"):
                    shared = cand_shared.get("train_topk" if mode == "train" and stage == "forward" else "topk", False)
                    e = C.judge_topk(name, c, b, min_ag, shared=shared)
                    e["module"] = module or name
                else:
                    e = C.judge_exact(name, group, c, b, module=module)
            else:
                e = C.judge_tensor(name, group, c, b, ref_of(key), ths[group], module=module, before=prior)
            entries.append(e)
        entries[-1]["mode"] = mode       # first_divergence looks upstream within one forward pass

    # 1. intermediates (forward order), outputs; the forward stage then does the same for its
    #    train-mode pass (BN batch statistics): groups train_intermediates / train_outputs,
    #    names and modules prefixed "train."
    passes = [("", "", "intermediates", "outputs", "eval" if stage == "forward" else "train")]
    if stage == "forward":
        passes.append(("train/", "train.", "train_intermediates", "train_outputs", "train"))
    for kp, np_, g_int, g_out, mode in passes:
        inter = mb.get("order", {}).get(kp + "intermediates", [])
        if kp and not inter:
            continue          # a result written before the forward stage had a train-mode pass
        for n in inter:
            one(f"{kp}int/{n}", np_ + n, g_out if n in ("pred_logits", "pred_boxes") else g_int,
                module=np_ + n if np_ else None, mode=mode)
        extra = [n for n in mc.get("order", {}).get(kp + "intermediates", []) if n not in set(inter)]
        if extra:
            warnings.append(f"{cand_side} side records {len(extra)} {mode}-mode intermediate(s) the base side "
                            f"does not: {', '.join(extra[:5])}")
        for n in mb.get("order", {}).get(kp + "outputs", []):
            if n in inter:
                continue          # the same tensor as the intermediate of that name
            one(f"{kp}out/{n}", f"{np_}outputs.{n}", g_out, module=np_ + "outputs", mode=mode)

    if stage == "grad":
        # 2. decisions: Hungarian matches per loss call
        for call in mb.get("order", {}).get("matches", []):
            bl = [zb[k] for k in sorted((k for k in fb if k.startswith(f"match/{call}/")),
                                        key=lambda k: int(k.rsplit("/", 1)[1]))]
            cl = [zc[k] for k in sorted((k for k in fc if k.startswith(f"match/{call}/")),
                                        key=lambda k: int(k.rsplit("/", 1)[1]))]
            if not cl:
                entries.append({"name": f"matches.{call}", "group": "decisions", "kind": "missing",
                                "module": "matcher", "passed": False, "rule": None, "shape": [],
                                "reason": f"no matches for call '{call}' on the {cand_side} side"})
                continue
            entries.append(C.judge_matches(f"matches.{call}", cl, bl, min_ag,
                                           shared=cand_shared.get("matches", False)))
        # 3. losses
        for n in mb.get("order", {}).get("losses", []):
            one(f"loss/{n}", f"loss.{n}", "losses", module="criterion")
        one("loss_total", "loss.total", "losses", module="criterion")
        cl = mc.get("order", {}).get("losses", [])
        if cl and cl != mb.get("order", {}).get("losses", []):
            warnings.append(f"loss names/order differ: base {len(mb['order']['losses'])} terms, "
                            f"{cand_side} {len(cl)} terms")
        # 4. gradients (backward order)
        for n in _grad_order(mb.get("order", {}).get("grads", [])):
            one(f"grad/{n}", f"grad.{n}", "grads", module=C.module_of(n))
        # the total gradient norm clip_grad_norm saw in train_step (a gradient quantity)
        one("step_grad_norm", "grad.total_norm", "grads", module="optimizer")
        # 5. parameters (and BN statistics) after one optimiser step
        for n in mb.get("order", {}).get("step", []):
            one(f"step/{n}", f"step.{n}", "step", module=C.module_of(n),
                prior=None if before is None else before.get(n))
    zb.close()
    zc.close()
    if zr is not None:
        zr.close()
    for m, side in ((mc, cand_side),):
        for w in m.get("warnings", []):
            warnings.append(f"{side} side: {w}")
    for w in mb.get("warnings", []):
        warnings.append(f"base side: {w}")
    return {"entries": entries, "warnings": warnings}


# ----------------------------------------------------------------------------------------
# reports
# ----------------------------------------------------------------------------------------

def _g(x, fmt=".2e") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("nan" if math.isnan(x) else "-inf")
    return format(x, fmt)


def _rules(r: Dict[str, int]) -> str:
    return " ".join(f"{k} {v}" for k, v in r.items())


def group_table(result: Dict[str, Any], md: bool = False) -> List[str]:
    lab = result["labels"]
    has_ref = "ref" in lab
    head = ["group", "n", "fail", "worst", f"{lab['cand']}-{lab['base']}"]
    if has_ref:
        head += [f"floor {lab['base']}-{lab['ref']}", f"{lab['cand']}-{lab['ref']}", "ratio"]
    head += ["rules"]
    rows = []
    for g in GROUP_ORDER:
        s = result["groups"].get(g)
        if not s:
            continue
        if g == "decisions":
            row = [g, str(s["n"]), str(s["failed"]), s["worst"],
                   f"agree {100 * (s.get('worst_agreement') or 0):.1f}%"]
            if has_ref:
                row += ["", "", ""]
        else:
            row = [g, str(s["n"]), str(s["failed"]), s["worst"], _g(s.get("worst_err"))]
            if has_ref:
                row += [_g(s.get("worst_floor")), _g(s.get("worst_err_ref")), _g(s.get("worst_ratio"), ".3g")]
        row.append(_rules(s["rules"]))
        rows.append(row)
    if md:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r[:3] + [f"`{r[3]}`"] + r[4:]) + " |" for r in rows]
        return out
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    widths[3] = min(widths[3], 44)
    def cut(x, i):
        x = str(x)
        return x if i != 3 or len(x) <= 44 else "…" + x[-43:]
    fmt = lambda r: "  ".join(cut(x, i).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(head)] + [fmt(r) for r in rows]


def summary_markdown(result: Dict[str, Any]) -> str:
    L: List[str] = []
    st = result["status"].upper()
    L.append(f"# parity run --stage {result.get('stage')} — {result.get('config')} — {result.get('dtype')}: **{st}**")
    L.append("")
    if result["status"] == "error":
        e = result["error"]
        L += [f"**Error** ({e['side']} side, {e['cause']}): {e['message']}", ""]
        if e.get("log"):
            L += [f"Log: `{e['log']}`", ""]
        L.append("No comparison was made; this run proves nothing.")
        return "\n".join(L) + "\n"
    lab = result["labels"]
    case = result.get("case", {})
    L.append(f"- config `{result['config']}` (digest `{result['config_digest']}`), batch {case.get('batch_size')} "
             f"at {case.get('image_size')}, seed {result.get('seed')}, device {result.get('device')}")
    d = case.get("data", {})
    L.append(f"- data: {'bundled synthetic set' if d.get('synthetic') else d.get('root')} ({d.get('split')} split, "
             f"indices {d.get('indices')}, boxes {d.get('num_boxes')})")
    w = case.get("weights", {})
    L.append(f"- weights: {'seeded init, seed ' + str(w.get('seed')) if w.get('source') == 'seeded' else w.get('path')}")
    cmp_ = f"{lab['cand']} vs {lab['base']}"
    if "ref" in lab:
        cmp_ += f"; float32 noise floor {lab['base']} vs {lab['ref']} (float64 reference), ratio = err({lab['cand']},{lab['ref']}) / floor"
    L.append(f"- compared: {cmp_}")
    L.append(f"- decisions: {'shared from torch (--share-decisions)' if result.get('share_decisions') else 'each side its own'}"
             + ("; the float64 reference always uses the base side's decisions" if "ref" in lab else ""))
    if result.get("faults"):
        L.append(f"- **INJECTED FAULT** on the {result['fault_side']} side: {', '.join(result['faults'])}")
    L.append("")
    fd = result.get("first_divergence") or {}
    L.append(f"**{C.describe_divergence(fd)}**" if fd else "**No divergence: every check passed.**")
    if fd:
        L.append("")
        L.append(f"- reason: {fd.get('reason')}")
        L.append(f"- last passing before it: `{fd.get('last_passing')}` (rel err {_g(fd.get('last_passing_err'))})")
        L.append(f"- failing checks in total: {fd.get('n_failed')}")
    L.append("")
    L.append("## Groups")
    L.append("")
    L += group_table(result, md=True)
    L.append("")
    dec = [e for e in result["tensors"] if e["group"] == "decisions"]
    if dec:
        L.append("## Decisions")
        L.append("")
        for e in dec:
            ov = e.get("overlap", {})
            if e["kind"] == "topk":
                L.append(f"- `{e['name']}`: top-k set overlap {100 * ov.get('set', 0):.2f}%, positions "
                         f"{100 * ov.get('positions', 0):.2f}%{' (shared)' if e.get('shared') else ''} — "
                         f"{'ok' if e['passed'] else 'FLIP'}")
            else:
                L.append(f"- `{e['name']}`: {ov.get('same')}/{ov.get('total')} pairs agree"
                         f"{' (shared)' if e.get('shared') else ''} — {'ok' if e['passed'] else 'FLIP'}")
        L.append("")
    fails = [e for e in result["tensors"] if not e["passed"]]
    if fails:
        L.append(f"## Failing checks (forward order, first 40 of {len(fails)})")
        L.append("")
        L.append("| name | group | err | floor | ratio | reason |")
        L.append("|---|---|---|---|---|---|")
        for e in fails[:40]:
            L.append(f"| `{e['name']}` | {e['group']} | {_g(e.get('err'))} | {_g(e.get('floor'))} | "
                     f"{_g(e.get('ratio'), '.3g')} | {e.get('reason', '')} |")
        L.append("")
    gm = result.get("grads_by_module")
    if gm:
        L.append("## Gradients by module (worst first)")
        L.append("")
        L.append("| module | params | failed | worst parameter | err | ratio |")
        L.append("|---|---|---|---|---|---|")
        for m in gm[:25]:
            L.append(f"| `{m['module']}` | {m['n']} | {m['failed']} | `{m['worst_name']}` | {_g(m['worst_err'])} | "
                     f"{_g(m['worst_ratio'], '.3g')} |")
        if len(gm) > 25:
            L.append(f"| ... {len(gm) - 25} more modules in result.json | | | | | |")
        L.append("")
    L.append("## Sides")
    L.append("")
    L.append("| side | backend | dtype | versions | wall s | in-worker timing s | peak RSS MB |")
    L.append("|---|---|---|---|---|---|---|")
    for s in result.get("sides", []):
        v = s.get("versions", {})
        vs = ", ".join(f"{k} {v[k]}" for k in (s["backend"], "numpy", "python") if k in v)
        tm = ", ".join(f"{k} {x:.1f}" for k, x in s.get("timing", {}).items())
        L.append(f"| {s['label']} ({s['role']}) | {s['backend']} | {s['dtype']} | {vs} | {s['wall_s']:.1f} | {tm} | "
                 f"{_g(s.get('peak_rss_mb'), ',.0f')} |")
    L.append("")
    for wmsg in result.get("warnings", []):
        L.append(f"- warning: {wmsg}")
    L.append(f"Total wall time {result.get('wall_s', 0):.1f}s. Thresholds: `{result.get('thresholds_file')}`.")
    return "\n".join(L) + "\n"


def build_result(stage, dtype, entries, labels) -> Dict[str, Any]:
    present = [g for g in GROUP_ORDER if any(e["group"] == g for e in entries)]
    groups = C.group_summary(entries, present)
    fd = C.first_divergence(entries)
    res: Dict[str, Any] = {"labels": labels, "groups": groups, "first_divergence": fd or None}
    grads = [e for e in entries if e["group"] == "grads"]
    if grads:
        res["grads_by_module"] = C.by_module(grads)
        res["grads_worst_first"] = [e["name"] for e in sorted(grads, key=C.severity, reverse=True)]
    return res


def print_final(result: Dict[str, Any], stream=None) -> None:
    stream = stream or sys.stdout
    w = stream.write
    w("\n")
    for ln in group_table(result):
        w("  " + ln + "\n")
    dec = [e for e in result["tensors"] if e["group"] == "decisions"]
    if dec:
        parts = []
        for e in dec:
            ov = e.get("overlap", {})
            if e["kind"] == "topk":
                parts.append(("train-mode " if e["name"].startswith("train.") else "")
                             + f"top-k {100 * ov.get('set', 0):.1f}%" + (" (shared)" if e.get("shared") else ""))
        nm = [e for e in dec if e["kind"] == "matches"]
        if nm:
            same = sum(e["overlap"].get("same", 0) for e in nm)
            tot = sum(e["overlap"].get("total", 0) for e in nm)
            parts.append(f"matches {same}/{tot} over {len(nm)} calls" + (" (shared)" if nm[0].get("shared") else ""))
        w("  decisions: " + "; ".join(parts) + "\n")
    gm = result.get("grads_by_module")
    if gm:
        w("  worst gradient modules: " + ", ".join(
            f"{m['module']} {_g(m['worst_err'])}" + (f" (x{_g(m['worst_ratio'], '.2g')} floor)" if m.get("worst_ratio") is not None else "")
            for m in gm[:3]) + "\n")
    for wm in result.get("warnings", []):
        w(f"  warning: {wm}\n")
    if result.get("faults"):
        w(f"  INJECTED FAULT ({result['fault_side']} side): {', '.join(result['faults'])}\n")
    fd = result.get("first_divergence")
    w("  " + (C.describe_divergence(fd) if fd else "no divergence") + "\n")
    n = len(result["tensors"])
    nf = sum(1 for e in result["tensors"] if not e["passed"])
    verdict = "PASS" if result["passed"] else "FAIL"
    w(f"  {verdict}: {n - nf}/{n} checks passed  ({result['stage']}, {result['config']}, {result['dtype']}, "
      f"{result['wall_s']:.1f}s)\n")
    w(f"  result: {result['out']}/result.json\n")
    stream.flush()


# ----------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------

def _write_error(out: Optional[str], base: Dict[str, Any], err: RunError) -> None:
    if not out or not os.path.isdir(out):
        return
    res = dict(base)
    res.update(status="error", passed=False, exit_code=EXIT_USAGE,
               error={"side": err.side, "cause": err.cause, "message": str(err).splitlines()[0], "log": err.log})
    res = C.jsonable(res)
    write_json(os.path.join(out, "result.json"), res)
    write_text(os.path.join(out, "summary.md"), summary_markdown(res))


def run_stage(args) -> int:
    """``parity run --stage forward|grad`` (see the module docstring).  Returns the exit code."""
    from rtdetr_core.config import ConfigError, load_config

    t_start = time.perf_counter()
    stage = args.stage
    base_info: Dict[str, Any] = {"schema": 1, "stage": stage}
    out: Optional[str] = None
    progress = Progress()
    try:
        if _opt(args, "out", None):      # never leave an older verdict behind, whatever fails next
            out = os.path.abspath(args.out)
            for stale in ("result.json", "summary.md"):
                p = os.path.join(out, stale)
                if os.path.isfile(p):
                    os.unlink(p)
        if stage not in STAGES:
            raise RunError(f"--stage {stage}: not handled by run_stage (forward, grad)")
        try:
            cfg = load_config(_opt(args, "config", "smoke"))
        except ConfigError as e:
            raise RunError(f"config: {e}", cause="config") from None
        dtype = _opt(args, "dtype", "float32")
        device = _opt(args, "device", "cpu")
        seed = int(_opt(args, "seed", 0))
        bs = _opt(args, "batch_size", None)
        bs = cfg.train.batch_size if bs is None else int(bs)
        if bs < 1:
            raise RunError(f"--batch-size must be >= 1, got {bs}")
        if seed < 0:
            raise RunError(f"--seed must be >= 0, got {seed}")
        reference = dtype == "float32" and not _opt(args, "no_reference", False)
        share = bool(_opt(args, "share_decisions", False))
        verbose = bool(_opt(args, "verbose", False))
        keep = bool(_opt(args, "keep_arrays", False))
        timeout = _opt(args, "timeout", None) or None
        cand_backend = _opt(args, "candidate_backend", "jittor")
        fault_side = _opt(args, "fault_side", "jittor")
        try:
            thresholds = load_thresholds(_opt(args, "thresholds", None))
        except ThresholdError as e:
            raise RunError(f"thresholds: {e}", cause="thresholds") from None
        fault_specs = list(_opt(args, "inject_fault", []) or [])
        try:
            faults = parse_faults(fault_specs)
            from rtdetr_core.param_spec import param_spec
            check_faults_against_spec(faults, [e.name for e in param_spec(cfg)])
        except FaultError as e:
            raise RunError(str(e), cause="usage") from None
        base_info.update(config=cfg.name, config_digest=cfg.digest(), dtype=dtype, device=device, seed=seed,
                         batch_size=bs, reference=reference, share_decisions=share,
                         faults=fault_specs, fault_side=fault_side if fault_specs else None)

        if cand_backend not in ("jittor", "torch"):
            raise RunError(f"unknown candidate backend {cand_backend!r} (jittor; torch for a harness self-test)")
        if fault_side not in ("jittor", "torch"):
            raise RunError(f"--fault-side must be jittor or torch, got {fault_side!r}")
        pys = {"torch": resolve_python("torch", _opt(args, "torch_python", None))}
        if cand_backend == "jittor":
            pys["jittor"] = resolve_python("jittor", _opt(args, "jittor_python", None))

        out = os.path.abspath(_opt(args, "out", None) or default_out(stage, cfg.name))
        os.makedirs(out, exist_ok=True)
        base_info["out"] = out
        for stale in ("result.json", "summary.md"):     # never leave an older verdict behind
            p = os.path.join(out, stale)
            if os.path.exists(p):
                os.unlink(p)
        work = os.path.join(out, "work")
        if os.path.isdir(work):
            shutil.rmtree(work)
        os.makedirs(work)
        case_dir = os.path.join(out, "case")

        # jobs
        bdt = dtype
        base = Job(label("torch", bdt), "base", "torch", pys["torch"], bdt, stage, "")
        cand = Job(label(cand_backend, bdt, True, cand_backend), "cand", cand_backend, pys[cand_backend], bdt, stage, "")
        jobs = [base, cand]
        ref = None
        if reference:
            ref = Job(label("torch", "float64"), "ref", "torch", pys["torch"], "float64", stage, "",
                      share_from=base.label)
            jobs.append(ref)
        if share:
            cand.share_from = base.label
        for j in jobs:
            j.out = os.path.join(work, f"{j.label}.npz")
            if fault_specs and ((fault_side == "jittor" and j.role == "cand")
                                or (fault_side == "torch" and j.backend == "torch" and j.role != "cand")):
                j.faults = fault_specs
        labels = {"cand": cand.label, "base": base.label}
        if ref:
            labels["ref"] = ref.label
        base_info["labels"] = labels

        print(f"parity run --stage {stage}: config {cfg.name} ({cfg.digest()}), {dtype}"
              f"{' + float64 reference' if reference else ''}, batch {bs}, seed {seed}"
              f"{', shared decisions' if share else ''} -> {out}")
        if fault_specs:
            print(f"  injecting fault on the {fault_side} side: {', '.join(fault_specs)}")
        versions = preflight(jobs, verbose)
        try:
            manifest = build_case(case_dir, cfg, stage=stage, batch_size=bs, seed=seed,
                                  data_root=_opt(args, "data", None), weights_path=_opt(args, "weights", None))
        except CaseError as e:
            msg = str(e)
            raise RunError(msg, side="case", cause=msg.split(":", 1)[0] if ":" in msg else "case") from None
        base_info["case"] = {k: manifest[k] for k in ("batch_size", "image_size", "data", "weights", "dn_draws")}
        base_info["case"]["dir"] = case_dir

        order = [base, cand] + ([ref] if ref else [])
        for i, j in enumerate(order, 1):
            run_job(j, case_dir, device, progress, i, len(order), verbose, timeout)
            if j is base and (reference or share):
                write_decisions_from(base.out, os.path.join(work, f"decisions-{base.label}.npz"))
            if j.meta.get("config_digest") != manifest["config_digest"]:
                raise RunError(f"config mismatch: the {j.backend} side ran config digest "
                               f"{j.meta.get('config_digest')}, the case is {manifest['config_digest']}",
                               side=j.backend, cause="config mismatch")
            if j.meta.get("case_weights_sha256") != manifest["files"]["weights.safetensors"]:
                raise RunError(f"the {j.backend} side loaded other weights than the case's", side=j.backend,
                               cause="weights")
            if j.meta.get("dtype") != j.dtype or j.meta.get("backend") != j.backend:
                raise RunError(f"the {j.backend} side reported {j.meta.get('backend')} {j.meta.get('dtype')}, "
                               f"expected {j.backend} {j.dtype}", side=j.backend, cause="protocol")

        # compare
        progress.line("  comparing ...")
        before = None
        if stage == "grad":
            from .case import Case
            before = Case(case_dir, verify=False).weights()
        cmpd = compare_results(stage, dtype, base.out, cand.out, ref.out if ref else None, thresholds,
                               cand_shared=cand.meta.get("decisions_injected", {}), cand_side=cand_backend,
                               before=before)
        entries = cmpd["entries"]
        if not entries:
            raise RunError("nothing to compare: the base side recorded no tensors", side="torch", cause="protocol")
        res = dict(base_info)
        res.update(build_result(stage, dtype, entries, labels))
        passed = all(e["passed"] for e in entries)
        res.update(status="pass" if passed else "fail", passed=passed, exit_code=EXIT_OK if passed else EXIT_FAIL,
                   thresholds_file=thresholds.path,
                   thresholds={g: t.to_dict() for g, t in thresholds.for_run(stage, dtype).items()},
                   warnings=cmpd["warnings"],
                   versions={"runner": runner_versions(), **versions},
                   sides=[{"label": j.label, "role": j.role, "backend": j.backend, "dtype": j.dtype,
                           "python": j.python, "wall_s": j.wall, "timing": j.meta.get("timing", {}),
                           "peak_rss_mb": j.meta.get("peak_rss_mb"), "versions": j.meta.get("versions", {}),
                           "faults": j.meta.get("faults", []), "decisions_injected": j.meta.get("decisions_injected"),
                           "step": j.meta.get("step")} for j in order],
                   tensors=entries)
        res["wall_s"] = time.perf_counter() - t_start
        res = C.jsonable(res)
        write_json(os.path.join(out, "result.json"), res)
        write_text(os.path.join(out, "summary.md"), summary_markdown(res))
        if not keep:
            for j in order:
                if os.path.exists(j.out):
                    os.unlink(j.out)
        print_final(res)
        return EXIT_OK if passed else EXIT_FAIL
    except RunError as e:
        print(f"parity: error: [{e.side}] {e}", file=sys.stderr)
        base_info["wall_s"] = time.perf_counter() - t_start
        try:
            _write_error(out, base_info, e)
        except OSError:
            pass
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("parity: interrupted", file=sys.stderr)
        err = RunError("interrupted by the user", cause="interrupted")
        _write_error(out, base_info, err)
        return 130
