"""``parity bench``: speed and memory of both backends side by side.

    parity bench --config PRESET [PRESET ...] [--size 640] [--batch 1] [--mode eval|train|both]
                 [--repeat 5] [--warmup 2] [--threads N] [--sequential] [--profile] [--out DIR]

Per config, one case folder (``parity/case/folder.py``, stage ``grad``: seeded or given weights, one
batch of the bundled synthetic train split resized to ``--size``, targets, shared
denoising draws); per mode, one ``parity/workers/bench.py`` process per backend in that
backend's environment.  The runner drives the calls one at a time and interleaves the
backends (T J, J T, T J, ...): never two calls at once, and a burst of other work on a
shared machine slows both alike (``--sequential``: one backend after the other).
Warm-up calls are excluded from the statistics and reported separately (Jittor compiles
its kernels in the first call).

Output folder: ``bench.json`` (schema below), ``bench.md`` (tables), ``bench.png`` (bar
chart), ``profile_<config>_<mode>_<backend>.json`` with ``--profile``, ``logs/``.

``--profile``: after the timed calls, one more call per backend and mode, not timed, under
that backend's own profiler: torch.profiler (self CPU time per op, so nested ops are not
counted twice) and Jittor's ``jt.profile_scope()`` (time per jit kernel).  Both map their
ops to the same op families (parity/workers/op_families.py, rules and limits there), so
``bench.md`` shows per config and mode where each side spends a step, family by family.

bench.json schema (``schema: 2``; consumed by ``parity report``; 2: ``profile`` per backend,
was Jittor only)::

    {"schema": 2, "kind": "parity-bench", "created": ISO time, "command": [...argv],
     "host": {"platform", "machine", "cpu_model", "cpu_count", "affinity", "memory_gb",
              "loadavg", "loadavg_end"},     # load average: other work on the machine
     "settings": {"device", "dtype", "batch", "repeat", "warmup", "threads", "modes"},
     "runs": [                                   # one per --config, in order
       {"config": "r18vd", "config_digest": "…", "size": [H, W], "batch": 1,
        "weights": {"source": "seeded", "seed": 0} | {"source": "file", "path": …},
        "backends": {"torch": {"versions": {…}, "threads": {"threads": 2, …}, "device": "cpu"},
                     "jittor": {…}},
        "measures": {                            # ordered; every measure has both backends
          NAME: {"unit": "ms" | "s" | "MB", "kind": "latency" | "warmup" | "memory",
                 "description": "…",
                 "torch":  {"min": x, "median": x, "max": x, "mean": x, "samples": [x, …]},
                 "jittor": {…same…},
                 "ratio": jittor median / torch median}   # > 1: Jittor slower / bigger
        },
        "profile": {MODE: {BACKEND: {            # only with --profile: one more call per
            "profiler": "…", "total_ms": x,      # backend, not timed; lists slowest first
            "seconds_profiled": x, "file": "profile_<config>_<mode>_<backend>.json",
            "by_family": [{"family", "ops", "count", "total_ms", "percent", "top_ops"}, …],
            "by_op": [{"op", "family", "kernels", "count", "total_ms", "percent"}, …],
            "top_ops": [{"op", "key", "family", "count", "total_ms", "avg_ms", "percent",
                         "shapes"}, …]}}}        # (file layout: parity/workers/bench_profile.py)
       }]}

Measures (per mode run): ``eval_forward`` / ``train_step`` (ms, the timed calls),
``eval_first_call`` / ``train_first_call`` (s, first warm-up call: Jittor's kernel compile
or cache load), ``eval_startup`` / ``train_startup`` (s, import + build + load weights),
``eval_peak_rss`` / ``train_peak_rss`` (MB, the worker process), and on CUDA
``eval_peak_device_mem`` / ``train_peak_device_mem`` (MB).

Exit codes: 0 done, 2 error (one line; no bench.json, error.json says "status": "error").  Speed has no threshold.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from rtdetr_core.config import available_presets, config_from_dict, load_config

from parity.case.folder import CaseError, build_case
from parity.case.images import parse_size
from parity.errors import EXIT_OK, EXIT_USAGE, UsageError, WorkerError
from parity.facts import host_info
from parity.fileio import default_out, prepare_out, read_json, write_bytes, write_error_result, write_json, write_text
from parity.numfmt import fmt_s
from parity.report.bench import render_md, render_png, short_table
from parity.sides.process import progress, resolve_python, run_interruptible
from parity.sides.serving import WorkerProcess


BENCH_SCHEMA = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, nargs="+",
                   help=f"preset(s) ({', '.join(available_presets())}) or YAML path(s); several -> one table")
    p.add_argument("--size", default=None, help="input size N or HxW, multiples of 32 (default: each config's "
                                                "train.image_size: 640 for the official presets, 96x160 for smoke)")
    p.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    p.add_argument("--mode", choices=["eval", "train", "both"], default="both")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per measure (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls first (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both backends (OMP_NUM_THREADS + torch.set_num_threads); default: theirs")
    p.add_argument("--backend", choices=["both", "torch", "jittor"], default="both")
    p.add_argument("--weights", default=None, help="weights file (default: seeded init; speed does not depend on it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--sequential", action="store_true",
                   help="time one backend after the other (default: interleave their calls, fairer on a busy "
                        "machine; needs both models in memory)")
    p.add_argument("--profile", action="store_true",
                   help="also run one more call (not timed) per backend under its own profiler (torch.profiler, "
                        "jt.profile_scope()): time per op family side by side, and each side's slowest ops")
    p.add_argument("--out", default=None, help="output folder (default reports/runs/<time>-bench-<config>)")


# ----------------------------------------------------------------------------------------
# host
# ----------------------------------------------------------------------------------------

def stats(samples: Sequence[float], scale: float = 1.0) -> Dict[str, Any]:
    a = np.asarray(samples, dtype=np.float64) * scale
    return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max()), "mean": float(a.mean()),
            "samples": [float(x) for x in a]}


MEASURE_TEXT = {
    "forward": ("eval_forward", "ms", "latency", "eval-mode forward, no grad (warm)"),
    "train": ("train_step", "ms", "latency", "train step: forward, loss with matching, backward, clip, AdamW (warm)"),
}


def measures_of(results: Dict[str, Dict[str, Dict[str, Any]]], modes: Sequence[str], backends: Sequence[str],
                device: str) -> "OrderedDict[str, Dict[str, Any]]":
    """``results[mode][backend]`` (bench_worker result events) -> ordered measures."""
    m: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()

    def add(name, unit, kind, desc, per_backend):
        entry: Dict[str, Any] = {"unit": unit, "kind": kind, "description": desc}
        for be in backends:
            entry[be] = per_backend[be]
        if "torch" in entry and "jittor" in entry and entry["torch"]["median"] > 0:
            entry["ratio"] = entry["jittor"]["median"] / entry["torch"]["median"]
        else:
            entry["ratio"] = None
        m[name] = entry

    for mode in modes:
        r = results[mode]
        name, unit, kind, desc = MEASURE_TEXT["forward" if mode == "eval" else "train"]
        add(name, unit, kind, desc, {be: stats(r[be]["seconds"], 1000.0) for be in backends})
    for mode in modes:
        r = results[mode]
        add(f"{mode}_first_call", "s", "warmup",
            f"{mode}: first call (Jittor: kernel compile or compile-cache load)",
            {be: stats(r[be]["warmup_seconds"][:1] or [r[be]["seconds"][0]]) for be in backends})
    for mode in modes:
        r = results[mode]
        add(f"{mode}_startup", "s", "warmup", f"{mode} worker: import + build model + load weights",
            {be: stats([sum(r[be]["timing"].get(k, 0.0) for k in ("import", "build", "load_weights"))])
             for be in backends})
    for mode in modes:
        r = results[mode]
        add(f"{mode}_peak_rss", "MB", "memory", f"{mode} worker: peak resident memory (VmHWM)",
            {be: stats([r[be]["peak_rss_mb"]]) for be in backends})
    if device == "cuda":
        for mode in modes:
            r = results[mode]
            add(f"{mode}_peak_device_mem", "MB", "memory", f"{mode}: peak device memory",
                {be: stats([(r[be].get("device_memory") or {}).get("peak_mb", 0.0)]) for be in backends})
    return m


# ----------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------

def _bench_config(cfg, size_hw):
    """The config with ``train.image_size`` = the bench size and no multi-scale."""
    d = cfg.to_dict()
    d["train"]["image_size"] = [int(size_hw[0]), int(size_hw[1])]
    d["train"]["multi_scale"] = None
    return config_from_dict(d, src=f"{cfg.name} (bench {size_hw[0]}x{size_hw[1]})")


def bench_mode(config_name: str, case_dir: str, mode: str, backends: Sequence[str], pythons: Dict[str, str],
               args: argparse.Namespace, out: str, env: Optional[Dict[str, str]]):
    """Time one mode of one config: -> ({backend: result event}, profile or None).

    Interleaved (default): both workers are started, then every warm-up and timed call
    alternates between them (the first backend alternates each round); the idle one waits
    on stdin, so they never compete.  ``--sequential``: one backend after the other, one
    worker alive at a time (half the memory)."""

    wargs = ["--case", case_dir, "--mode", mode, "--device", args.device, "--dtype", args.dtype]
    if args.threads:
        wargs += ["--threads", str(args.threads)]
    tags = {be: f"[{be:6s}] {config_name} {mode}" for be in backends}
    groups = [list(backends)] if not args.sequential else [[be] for be in backends]
    results: Dict[str, Dict[str, Any]] = {}
    prof = None
    for group in groups:
        workers: Dict[str, WorkerProcess] = {}
        try:
            for be in group:
                t0 = time.perf_counter()
                workers[be] = WorkerProcess(be, pythons[be], "parity.workers.bench", wargs,
                                            os.path.join(out, "logs", f"bench_{config_name}_{mode}_{be}.log"),
                                            verbose=args.verbose, env=env)
                ev = workers[be].wait_for("ready")
                tm = ev.get("timing", {})
                progress(f"{tags[be]}: ready in {fmt_s(time.perf_counter() - t0)} (build {fmt_s(tm.get('build', 0))}, "
                         f"{ev.get('threads', {}).get('threads')} threads)")
            for phase, n in (("warm-up", args.warmup), ("timed", args.repeat)):
                for i in range(n):
                    order = group if i % 2 == 0 else group[::-1]
                    for be in order:
                        workers[be].send({"cmd": "call", "phase": phase})
                        ev = workers[be].wait_for("timed")
                        extra = " (Jittor kernel compile)" if be == "jittor" and phase == "warm-up" and i == 0 else ""
                        progress(f"{tags[be]}: {phase} {i + 1}/{n} {fmt_s(ev.get('seconds', 0.0))}{extra}")
            for be in group:          # results (peak RSS) before the profiled call
                workers[be].send({"cmd": "result"})
                res = workers[be].wait_for("result")
                results[be] = res
                progress(f"{tags[be]}: median {res['median'] * 1000:.1f} ms (min {res['min'] * 1000:.1f}, max "
                         f"{res['max'] * 1000:.1f}), peak RSS {res['peak_rss_mb']:.0f} MB")
            if args.profile:          # one more call per backend, untimed, under its own profiler
                prof = prof or {}
                for be in group:
                    prof[be] = profile_side(workers[be], tags[be], be, config_name, mode, out)
            for w in workers.values():
                w.close()
        finally:
            for w in workers.values():
                w.kill()
    return results, prof


PROFILER_TEXT = {"torch": "torch.profiler (self CPU time per op)", "jittor": "jt.profile_scope() (time per kernel)"}


def profile_side(worker: WorkerProcess, tag: str, backend: str, config_name: str, mode: str, out: str) -> Dict[str, Any]:
    """One more call of ``backend`` under its profiler -> its entry of bench.json's ``profile``."""
    path = os.path.join(out, f"profile_{config_name}_{mode}_{backend}.json")
    progress(f"{tag}: one more call under {PROFILER_TEXT[backend]} ...")
    worker.send({"cmd": "profile", "out": path})
    worker.wait_for("profiled")
    pj = read_json(path)
    entry = {k: pj.get(k) for k in ("profiler", "total_ms", "seconds_profiled", "by_family", "by_op", "top_ops")}
    entry["file"] = os.path.basename(path)
    return entry


def run(args: argparse.Namespace) -> int:
    return run_interruptible(_run, args)


def _run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    cfgs, backends, pythons, modes, sizes = check_options(args)
    host = host_info()
    tmp = tempfile.mkdtemp(prefix="parity-bench-")
    out = None
    try:
        cases = build_cases(args, cfgs, sizes, tmp)     # bad weights / data fail before any output folder exists
        name = cfgs[0].name if len(cfgs) == 1 else "+".join(c.name for c in cfgs)
        out = prepare_out(args.out or default_out("bench", name), ("bench.json", "error.json", "bench.md", "bench.png"))
        env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
        print(f"parity bench: {', '.join(f'{c.name}@{s[0]}x{s[1]}' for c, s in zip(cfgs, sizes))}, batch {args.batch}, "
              f"modes {', '.join(modes)}, {args.repeat} timed call(s) after {args.warmup} warm-up, device "
              f"{args.device}, {args.dtype}; backends {'one after the other' if args.sequential else 'interleaved call by call'}")
        print(f"output: {out}", flush=True)
        runs = [bench_config(args, case, modes, backends, pythons, out, env) for case in cases]
        doc = {"schema": BENCH_SCHEMA, "kind": "parity-bench",
               "created": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": ["parity", "bench"] + _argv_of(args),
               "host": dict(host, loadavg_end=host_info()["loadavg"]),
               "settings": {"device": args.device, "dtype": args.dtype, "batch": args.batch, "repeat": args.repeat,
                            "warmup": args.warmup, "threads": args.threads, "modes": modes, "backends": backends,
                            "interleaved": not args.sequential},
               "runs": runs, "elapsed": time.perf_counter() - t_start}
        write_text(os.path.join(out, "bench.md"), render_md(doc))
        write_bytes(os.path.join(out, "bench.png"), render_png(doc))
        write_json(os.path.join(out, "bench.json"), doc)        # last: claims success
    except WorkerError as e:
        write_error_result(out, "error.json", str(e), {"kind": "parity-bench"}, side=e.backend, phase=e.phase)
        print(f"parity: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError:
        raise
    except BaseException as e:
        write_error_result(out, "error.json", f"{type(e).__name__}: {e}", {"kind": "parity-bench"})
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(short_table(doc))
    print(f"wrote bench.json, bench.md, bench.png to {out}")
    return EXIT_OK


def check_options(args: argparse.Namespace):
    cfgs = [load_config(c) for c in args.config]
    backends = ["torch", "jittor"] if args.backend == "both" else [args.backend]
    pythons = {be: resolve_python(be, getattr(args, f"{be}_python")) for be in backends}
    modes = ["eval", "train"] if args.mode == "both" else [args.mode]
    for flag, v, lo in (("--batch", args.batch, 1), ("--repeat", args.repeat, 1), ("--warmup", args.warmup, 0)):
        if v < lo:
            raise UsageError(f"{flag} {v}: must be >= {lo}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    if args.weights is not None and not os.path.isfile(args.weights):
        raise UsageError(f"weights: {args.weights}: file not found")
    sizes = [parse_size(args.size, c.train.image_size) for c in cfgs]
    return cfgs, backends, pythons, modes, sizes


def build_cases(args: argparse.Namespace, cfgs, sizes, tmp: str):
    """One case folder per config (stage grad: weights, one batch, targets, denoising draws)."""
    cases = []
    for cfg, size in zip(cfgs, sizes):
        bcfg = _bench_config(cfg, size)
        cdir = os.path.join(tmp, f"case_{len(cases)}")
        try:
            man = build_case(cdir, bcfg, stage="grad", batch_size=args.batch, seed=args.seed,
                             weights_path=args.weights)
        except CaseError as e:
            raise UsageError(str(e)) from None
        cases.append((cfg, bcfg, size, cdir, man))
    return cases


def bench_config(args, case, modes, backends, pythons, out: str, env) -> Dict[str, Any]:
    """Every mode of one config -> its entry of bench.json's ``runs``."""
    cfg, _, size, cdir, man = case
    results: Dict[str, Dict[str, Dict[str, Any]]] = {m: {} for m in modes}
    info: Dict[str, Dict[str, Any]] = {}
    profiles: Dict[str, Any] = {}
    for mode in modes:
        res_mode, prof = bench_mode(cfg.name, cdir, mode, backends, pythons, args, out, env)
        results[mode] = res_mode
        for be, res in res_mode.items():
            info[be] = {"versions": res.get("versions", {}), "threads": res.get("threads", {}),
                        "device": res.get("device")}
        if prof is not None:
            profiles[mode] = prof
    runr = {"config": cfg.name, "config_digest": cfg.digest(), "size": list(size), "batch": args.batch,
            "weights": man["weights"], "data": {k: man["data"][k] for k in ("split", "image_ids", "num_boxes")},
            "backends": info, "measures": measures_of(results, modes, backends, args.device)}
    if profiles:
        runr["profile"] = profiles
    return runr


def _argv_of(args: argparse.Namespace) -> List[str]:
    out = ["--config", *args.config]
    for k in ("size", "batch", "mode", "repeat", "warmup", "threads", "device", "dtype"):
        v = getattr(args, k)
        if v is not None:
            out += [f"--{k}", str(v)]
    return out
