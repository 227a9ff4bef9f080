"""``parity`` command line: run, report, spec, detect, bench, selftest.

User mistakes end with a one-line message on stderr and exit code 2 (never a traceback);
a failed threshold ends with exit code 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from rtdetr_core.config import ConfigError, available_presets, load_config

from parity.errors import EXIT_OK, EXIT_USAGE, UsageError


def _cmd_spec(args: argparse.Namespace) -> int:
    from rtdetr_core.param_spec import param_spec, spec_totals

    cfg = load_config(args.config)
    entries = param_spec(cfg)
    totals = spec_totals(entries)
    if args.json:
        out = {
            "config": cfg.name,
            "config_digest": cfg.digest(),
            "totals": totals,
            "keys": [{"key": e.name, "shape": list(e.shape), "dtype": e.dtype, "kind": e.kind,
                      "trainable": e.trainable} for e in entries],
        }
        json.dump(out, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return EXIT_OK
    w = max(len(e.name) for e in entries)
    for e in entries:
        kind = e.kind if e.kind == "buffer" else ("param" if e.trainable else "param(frozen)")
        print(f"{e.name:<{w}}  {str(list(e.shape)):<20} {e.dtype:<8} {kind}")
    print()
    for k, v in totals.items():
        print(f"{k:<28} {v:>14,}")
    return EXIT_OK


def _not_implemented(what: str):
    def run(args: argparse.Namespace) -> int:
        print(f"parity {what}: not implemented yet", file=sys.stderr)
        return EXIT_USAGE
    return run


# Stage modules own their logic; the CLI only dispatches.  Each module may define
# ``add_run_arguments(parser)`` (extra ``parity run`` options) and must define ``run(args) -> int``.
STAGE_MODULES = {"forward": "parity.commands.forward", "grad": "parity.commands.forward",
                 "train": "parity.commands.train", "eval": "parity.commands.eval"}
# Other sub-commands: module with ``add_arguments(parser)`` and ``run(args) -> int``.
COMMAND_MODULES = {"report": ("parity.commands.report", "render run folders into report.md/json + plots"),
                   "detect": ("parity.commands.detect", "run both backends on images and draw their detections"),
                   "bench": ("parity.commands.bench", "speed and memory of both backends side by side"),
                   "selftest": ("parity.commands.selftest", "plant porting bugs in the Jittor backend and measure what the "
                                                   "harness catches")}


def _import(modname: str):
    import importlib
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name == modname:
            return None
        raise


def _cmd_run(args: argparse.Namespace) -> int:
    if args.dtype is None:        # forward/grad: float64 arbitrates by default
        args.dtype = "both" if args.stage in ("forward", "grad") else "float32"
    elif args.dtype == "both" and args.stage not in ("forward", "grad"):
        raise UsageError(f"--dtype both: only for --stage forward|grad (the {args.stage} stage runs "
                         f"float32 with a float64 reference, or float64)")
    mod = _import(STAGE_MODULES[args.stage])
    fn = None if mod is None else (getattr(mod, "run", None) or getattr(mod, "run_stage", None))
    if fn is None:
        return _not_implemented(f"run --stage {args.stage}")(args)
    return fn(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parity", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("spec", help="print the parameter spec (the state_dict contract) of a config")
    sp.add_argument("--config", required=True, help=f"preset ({', '.join(available_presets())}) or YAML path")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=_cmd_spec)

    rp = sub.add_parser("run", help="run a parity stage in both environments and compare")
    rp.add_argument("--stage", required=True, choices=["forward", "grad", "train", "eval"])
    rp.add_argument("--config", default="smoke", help="preset or YAML path (default: smoke)")
    rp.add_argument("--dtype", default=None, choices=["float32", "float64", "both"],
                    help="forward/grad: default both (float64 is the arbiter, float32 judged against "
                         "its own noise floor); train/eval: default float32")
    rp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    rp.add_argument("--data", default=None, help="COCO folder (default: the bundled synthetic set)")
    rp.add_argument("--weights", default=None, help="weights file (default: seeded init)")
    rp.add_argument("--batch-size", type=int, default=None)
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--out", default=None, help="output folder (default reports/runs/<time>-<stage>-<config>)")
    rp.add_argument("--torch-python", default=None, help="interpreter of the PyTorch environment")
    rp.add_argument("--jittor-python", default=None, help="interpreter of the Jittor environment")
    rp.add_argument("--share-decisions", action="store_true",
                    help="feed PyTorch's top-k selection and matches to the Jittor side")
    rp.add_argument("--no-reference", action="store_true", help="skip the float64 noise-floor reference")
    rp.add_argument("--float64-budget", type=float, default=1800.0, metavar="SECONDS",
                    help="--dtype both: skip the Jittor float64 run when its estimate exceeds this; the "
                         "verdict is then float32 only and provisional (default 1800; 0 = never skip)")
    rp.add_argument("-v", "--verbose", action="store_true", help="show backend output (Jittor compile chatter)")
    rp.add_argument("--thresholds", default=None, metavar="YAML",
                    help="thresholds file (default: parity/thresholds.yaml)")
    rp.add_argument("--keep-arrays", action="store_true",
                    help="keep the workers' result arrays (<out>/work/*.npz) after comparing")
    rp.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                    help="kill a worker that runs longer than this (exit 2)")
    rp.add_argument("--inject-fault", action="append", default=[], metavar="SPEC",
                    help="harness test: deliberate fault on one side, e.g. "
                         "weight:decoder.decoder.layers.3.linear1.weight:noise=1e-3, upsample:bilinear, "
                         "config:decoder.num_queries=200, crash:raise (see parity/faults.py)")
    rp.add_argument("--fault-side", default="jittor", choices=["jittor", "torch"],
                    help="side that gets --inject-fault (default: jittor)")
    # harness self-test: compare torch against torch (expects exact agreement)
    rp.add_argument("--candidate-backend", default="jittor", choices=["jittor", "torch"], help=argparse.SUPPRESS)
    rp.set_defaults(func=_cmd_run)

    for modname in sorted(set(STAGE_MODULES.values())):
        mod = _import(modname)
        if mod is not None and hasattr(mod, "add_run_arguments"):
            mod.add_run_arguments(rp)

    for name, (modname, helptext) in COMMAND_MODULES.items():
        xp = sub.add_parser(name, help=helptext)
        mod = _import(modname)
        if mod is None:
            xp.add_argument("rest", nargs=argparse.REMAINDER)
            xp.set_defaults(func=_not_implemented(name))
        else:
            mod.add_arguments(xp)
            xp.set_defaults(func=mod.run)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, UsageError) as e:
        print(f"parity: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
