"""``parity selftest``: plant realistic porting bugs in the Jittor backend, one at a time,
and measure how often the harness catches them and whether it names the right place.

    parity selftest [--bugs ID,ID] [--fast] [--all-stages] [--no-baseline] [--out DIR]

For each bug of parity/selftest_bugs.yaml: copy the repository (no .git/.venvs/runs) to a
temporary folder, apply the bug (exact text replacement, must apply exactly once), run
``python -m parity run --stage forward`` then ``--stage grad`` (default ``--dtype both``)
from the copy, stopping at the first stage that catches it unless ``--all-stages`` (a bug
the forward stage catches is in the train-mode forward of the grad stage too; the grad
stage would name the same place).  The smoke preset is non-square (96x160); bugs tagged
``nonsquare`` also run the forward stage on a square 128x128 config, where a swapped width
and height is mathematically invisible (that run shows the blind spot and does not count as
a catch); ``train`` bugs also get a short ``--stage train`` run;
``detect`` bugs (post-processing, not part of forward/grad) get ``parity detect --input``
with --conf 0 (every top-K detection compared), in float64 and in the default float32.  A baseline on the clean copy runs first.

Output: a table on the terminal, ``<out>/selftest.md`` and ``<out>/selftest.json``
(rewritten after every bug, so an interrupted run keeps what it measured), each run's own
folder under ``<out>/runs/``.  Exit 0: every bug caught and localised; 1: some bug missed or
mislocalised; 2: usage or environment error (one line).
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

from parity.commands.selftest_patch import (Bug, PatchError, Run, apply_patch, check_patches, copy_repo, load_bugs,
    localised, run_in)
from parity.errors import EXIT_FAIL, EXIT_OK, EXIT_USAGE, RunError
from parity.facts import repo_root
from parity.fileio import write_json, write_text
from parity.sides.process import resolve_python


NONSQUARE_HW = (96, 160)         # the smoke preset's own input size (H x W)
SQUARE_YAML = "base: smoke\nname: smoke-128x128\ntrain: {image_size: [128, 128]}\n"
TRAIN_ARGS = ["--epochs", "2", "--limit-images", "4"]
RUN_TIMEOUT_S = 1800.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bugs", default=None, metavar="ID,ID", help="run only these bugs (see parity/selftest_bugs.yaml)")
    p.add_argument("--fast", action="store_true",
                   help="the test-suite subset: bugs marked fast, their first stage only, --dtype float64, no train")
    p.add_argument("--all-stages", action="store_true", help="run every stage even after one caught the bug")
    p.add_argument("--no-baseline", action="store_true", help="skip the clean-copy baseline runs")
    p.add_argument("--list", action="store_true", help="list the bugs and exit")
    p.add_argument("--out", default=None, help="output folder (default reports/runs/<time>-selftest)")
    p.add_argument("--bugs-file", default=None, help=argparse.SUPPRESS)      # tests: a bad patch list


def _say(msg: str) -> None:
    print(msg, flush=True)


def _env(args) -> Dict[str, str]:
    """Both interpreters resolved (flag, $RTDETR_PARITY_*_PYTHON, <repo>/.venvs) and passed to
    the runs in the copy explicitly: the copy has no .venvs of its own."""
    env = dict(os.environ)
    try:
        env["RTDETR_PARITY_TORCH_PYTHON"] = resolve_python("torch", args.torch_python)
        env["RTDETR_PARITY_JITTOR_PYTHON"] = resolve_python("jittor", args.jittor_python)
    except RunError as e:
        raise PatchError(str(e)) from None
    return env


def _select(bugs: List[Bug], args) -> List[Bug]:
    if args.bugs:
        want = [s.strip() for s in args.bugs.split(",") if s.strip()]
        known = {b.id for b in bugs}
        bad = [w for w in want if w not in known]
        if bad:
            raise PatchError(f"--bugs: unknown id(s) {', '.join(bad)} (known: {', '.join(sorted(known))})")
        bugs = [b for b in bugs if b.id in want]
    if args.fast:
        bugs = [b for b in bugs if b.fast]
    if not bugs:
        raise PatchError("no bugs selected")
    return bugs


def _plan(bug: Bug, fast: bool, inputs: Dict[str, str], square_cfg: str) -> List[List[Run]]:
    """Runs of one bug in groups; within a group, later runs are skipped once one catches it
    (unless --all-stages).  Each group is one input geometry or the train run."""
    groups: List[List[Run]] = []
    if "detect" in bug.tags:
        shapes = ["96x160"] + (["128x128"] if "nonsquare" in bug.tags and not fast else [])
        # float64 on every shape; the default float32 too (not in --fast) on the non-square
        # input: detect pairs queries that near-tied encoder scores reorder by their encoder
        # token, so the clean float32 run passes (baseline)
        for shape in shapes:
            groups.append([Run("detect", shape, ["detect", "--config", "smoke", "--input", inputs[shape], "--conf", "0",
                                                 "--dtype", "float64"], "")])
        if not fast:
            groups.append([Run("detect", "96x160", ["detect", "--config", "smoke", "--input", inputs["96x160"],
                                                    "--conf", "0"], "")])
        return groups
    dtype = ["--dtype", "float64"] if fast else []
    stages = bug.stages[:1] if fast else bug.stages
    groups.append([Run(st, "smoke", ["run", "--stage", st, "--config", "smoke", *dtype], "") for st in stages])
    if "nonsquare" in bug.tags and not fast:
        groups.append([Run("forward", "128x128", ["run", "--stage", "forward", "--config", square_cfg], "")])
    if "train" in bug.tags and not fast:
        groups.append([Run("train", "smoke", ["run", "--stage", "train", "--config", "smoke", *TRAIN_ARGS], "")])
    return groups


def _run_groups(root: str, groups: List[List[Run]], out_dir: str, env, all_stages: bool, expected) -> List[Run]:
    done: List[Run] = []
    for group in groups:
        for r in group:
            dt = next((r.argv[i + 1] for i, a in enumerate(r.argv) if a == "--dtype"), "")
            r.out = os.path.join(out_dir, f"{r.stage}-{r.config}" + (f"-{dt}" if dt else ""))
            _say(f"    {r.stage:<7} {r.config:<7} {dt or ('both' if r.stage in ('forward', 'grad') else 'float32')} ...")
            run_in(root, r, env, RUN_TIMEOUT_S, _say)
            done.append(r)
            verdict = "error" if r.error else ("CAUGHT" if r.caught else "not caught")
            loc = (" (localised)" if localised(r, expected) else " (NOT at an expected place)") if r.caught else ""
            _say(f"      -> {verdict}{loc} {r.where}  [{r.seconds:.0f} s]")
            if r.caught and not all_stages and r.stage != "detect":
                break
    return done


def _row(bug: Bug, runs: List[Run], seconds: float, error: str = "") -> Dict[str, Any]:
    main = [r for r in runs if r.stage != "train"]
    train = [r for r in runs if r.stage == "train"]
    big = [r for r in main if r.config != "128x128"]           # the square run only shows the blind spot

    def any_(vals):
        vals = [v for v in vals if v is not None]
        return None if not vals else any(vals)
    catching = [r for r in runs if r.caught and r.config != "128x128"]
    first = next((r for r in catching if r.stage != "train"), catching[0] if catching else None)
    caught = bool(catching)
    loc = caught and all(localised(r, bug.expected) for r in catching)
    notes = []
    if "nonsquare" in bug.tags:
        sq = [r for r in main if r.config == "128x128"]
        notes.append("square 128x128: " + ("caught" if any(r.caught for r in sq) else "invisible (passes)"))
    for r in runs:
        if r.error:
            notes.append(f"{r.stage} {r.config}: error: {r.error}")
    return {
        "id": bug.id, "part": bug.part, "kind": bug.kind, "description": bug.description,
        "file": bug.file, "expected": bug.expected, "tags": bug.tags,
        "stages_run": [f"{r.stage}/{r.config}" for r in runs],
        "caught_float64": any_([r.caught64 for r in big]), "caught_float32": any_([r.caught32 for r in big]),
        "caught_train": any_([r.caught for r in train]) if train else None,
        "caught": caught, "localised": loc, "ok": caught and loc and not error,
        "first_divergence": (f"{first.where} ({first.stage}/{first.config})" if first else ""),
        "train_checks": train[0].where if train else None,
        "seconds": round(seconds, 1), "notes": "; ".join(notes) + (f"; {error}" if error else ""),
        "runs": [r.to_dict() for r in runs],
    }


def _yn(v) -> str:
    return "–" if v is None else ("yes" if v else "**no**")


def table_markdown(rows: List[Dict[str, Any]], summary: Dict[str, Any]) -> str:
    head = ("| bug | part | kind | caught f64 | caught f32 | caught train | first divergence (stage/config) | "
            "expected | localised | s | notes |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| `{r['id']}` {r['description']} | {r['part']} | {r['kind']} | {_yn(r['caught_float64'])} | "
             f"{_yn(r['caught_float32'])} | {_yn(r['caught_train'])}"
             + (f" ({r['train_checks']})" if r["train_checks"] else "")
             + f" | {r['first_divergence'] or '—'} | {', '.join(r['expected'])} | {_yn(r['localised'])} | "
               f"{r['seconds']:.0f} | {r['notes']} |" for r in rows]
    s = summary
    foot = (f"\nCaught in float64: {s['caught_float64']}/{s['n']} · float32: {s['caught_float32']}/{s['n']} · "
            f"by the train stage: {s['caught_train']}/{s['n_train']} · caught at all: {s['caught']}/{s['n']} · "
            f"localised: {s['localised']}/{s['n']} · total {s['seconds'] / 60:.1f} min\n")
    return head + "\n".join(lines) + "\n" + foot


def _summary(rows: List[Dict[str, Any]], t_total: float) -> Dict[str, Any]:
    return {"n": len(rows), "caught_float64": sum(bool(r["caught_float64"]) for r in rows),
            "caught_float32": sum(bool(r["caught_float32"]) for r in rows),
            "caught_train": sum(bool(r["caught_train"]) for r in rows),
            "n_train": sum(r["caught_train"] is not None for r in rows),
            "caught": sum(r["caught"] for r in rows), "localised": sum(bool(r["localised"]) for r in rows),
            "ok": sum(r["ok"] for r in rows), "seconds": t_total}


def _write(out: str, rows, baseline, t0: float, argv_note: str) -> Dict[str, Any]:
    summary = _summary(rows, time.perf_counter() - t0)
    passed = bool(rows) and summary["ok"] == summary["n"]
    base_md = "".join(f"- clean copy, {b['stage']}/{b['config']}: {'passes' if not b['caught'] else 'FAILS: ' + b['where']}"
                      f"{' (error: ' + b['error'] + ')' if b['error'] else ''} [{b['seconds']:.0f} s]\n" for b in baseline)
    md = (f"# parity selftest\n\n`{argv_note}`\n\n" + (f"Baseline (no bug planted):\n\n{base_md}\n" if baseline else "")
          + table_markdown(rows, summary))
    write_text(os.path.join(out, "selftest.md"), md)
    write_json(os.path.join(out, "selftest.json"), {"schema": 1, "command": argv_note, "passed": passed,
                                                    "summary": summary, "baseline": baseline, "bugs": rows})
    return {"passed": passed, "summary": summary, "markdown": md}


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except PatchError as e:
        print(f"parity: error: selftest: {e}", file=sys.stderr)
        return EXIT_USAGE


def _run(args) -> int:
    t0 = time.perf_counter()
    bugs = load_bugs(args.bugs_file)
    if args.list:
        for b in bugs:
            _say(f"{b.id:<28} {b.part:<20} {b.kind:<16} {b.description}")
        return EXIT_OK
    bugs = _select(bugs, args)
    check_patches(bugs)                               # every patch applies, before any run
    env = _env(args)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = os.path.abspath(args.out or os.path.join(repo_root(), "reports", "runs", f"{stamp}-selftest"))
    os.makedirs(out, exist_ok=True)
    square_cfg = os.path.join(out, "smoke-128x128.yaml")
    write_text(square_cfg, SQUARE_YAML)
    rng = np.random.default_rng(0)                    # detect inputs: any image-like batch will do
    inputs = {}
    for shape, (h, w) in (("128x128", (128, 128)), ("96x160", NONSQUARE_HW)):
        inputs[shape] = os.path.join(out, f"input-{shape}.npy")
        np.save(inputs[shape], rng.uniform(0, 1, (2, 3, h, w)).astype(np.float32))
    note = "parity " + " ".join(sys.argv[1:])
    tmp = tempfile.mkdtemp(prefix="parity-selftest-")
    _say(f"parity selftest: {len(bugs)} bug(s) -> {out}")
    baseline: List[Dict[str, Any]] = []
    rows: List[Dict[str, Any]] = []
    try:
        if not args.no_baseline:
            _say("  baseline (clean copy)")
            root = copy_repo(os.path.join(tmp, "clean"))
            # every forward/grad/detect run some bug may get, once, on the clean copy: a
            # bug counts as caught only where the clean code passes (the train stage's
            # clean pass is covered by tests/test_parity_train.py and costs minutes here)
            first: Dict[tuple, Run] = {}
            for b in bugs:
                for grp in _plan(b, args.fast, inputs, square_cfg):
                    for r in grp:
                        if r.stage != "train":
                            first.setdefault(tuple(r.argv), r)
            runs = [[Run(r.stage, r.config, list(r.argv), "")] for r in first.values()]
            done = _run_groups(root, runs, os.path.join(out, "runs", "baseline"), env, False, [])
            baseline = [{"stage": r.stage, "config": r.config, "caught": r.caught, "where": r.where,
                         "error": r.error, "seconds": r.seconds} for r in done]
            shutil.rmtree(root, ignore_errors=True)
            bad = [b for b in baseline if b["caught"] or b["error"]]
            if bad:
                _write(out, rows, baseline, t0, note)
                b = bad[0]
                raise PatchError(f"the clean copy does not pass {b['stage']}/{b['config']}: "
                                 f"{b['error'] or b['where']} (see {out}/runs/baseline)")
        for i, bug in enumerate(bugs, 1):
            _say(f"  [{i}/{len(bugs)}] {bug.id} ({bug.part}): {bug.description}")
            t_bug = time.perf_counter()
            root = copy_repo(os.path.join(tmp, bug.id))
            apply_patch(root, bug.file, bug.old, bug.new)
            runs = _run_groups(root, _plan(bug, args.fast, inputs, square_cfg), os.path.join(out, "runs", bug.id),
                               env, args.all_stages, bug.expected)
            shutil.rmtree(root, ignore_errors=True)
            rows.append(_row(bug, runs, time.perf_counter() - t_bug))
            r = rows[-1]
            _say(f"    => {'OK' if r['ok'] else 'MISSED' if not r['caught'] else 'NOT LOCALISED'}: "
                 f"f64 {_yn(r['caught_float64'])}, f32 {_yn(r['caught_float32'])}, train {_yn(r['caught_train'])}; "
                 f"{r['first_divergence'] or 'no divergence'}")
            _write(out, rows, baseline, t0, note)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = _write(out, rows, baseline, t0, note)
    _say("\n" + res["markdown"])
    _say(f"wrote {out}/selftest.md and selftest.json")
    return EXIT_OK if res["passed"] else EXIT_FAIL
