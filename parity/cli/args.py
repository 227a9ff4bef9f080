"""Argument groups shared by the stages of ``parity run``, each with one owner here.

Every ``parity run`` option is declared with no default (None on the command line means
"not given"); the defaults live in the tables below and in each stage module's
``RUN_DEFAULTS``.  ``apply_stage_options`` then refuses an option the chosen stage does not
take (one line naming it, exit 2), records the options given (``args.explicit``: a resumed
train run refuses the ones that contradict it) and fills in the defaults.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Iterable

from parity.errors import UsageError

# taken by every stage
COMMON_DEFAULTS: Dict[str, Any] = {"config": "smoke", "dtype": None, "device": "cpu", "data": None, "weights": None,
                                   "batch_size": None, "seed": 0, "out": None, "torch_python": None,
                                   "jittor_python": None, "verbose": False, "thresholds": None, "timeout": None}
# optional groups a stage module names in its RUN_GROUPS
GROUP_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "faults": {"inject_fault": [], "fault_side": "jittor"},
    "reference": {"no_reference": False},
    "ranks": {"nproc": 1},
}
SPLIT_DTYPE = ("forward", "grad")      # stages whose default --dtype is both (float64 arbitrates)


def add_common(rp: argparse.ArgumentParser, stages: Iterable[str]) -> None:
    add = rp.add_argument
    add("--stage", required=True, choices=list(stages))
    add("--config", help="preset or YAML path (default: smoke)")
    add("--dtype", choices=["float32", "float64", "both"],
        help="forward/grad: default both (float64 is the arbiter, float32 judged against "
             "its own noise floor); train/eval: default float32")
    add("--device", choices=["cpu", "cuda"])
    add("--data", help="COCO folder, or synthetic:SEED:N_TRAIN:N_VAL (generated into the cache on first use); default: the bundled synthetic set")
    add("--weights", help="weights file (default: seeded init)")
    add("--batch-size", type=int)
    add("--seed", type=int)
    add("--out", help="output folder (default reports/runs/<time>-<stage>-<config>)")
    add_interpreters(rp)
    add_verbose(rp, default=None)
    add("--thresholds", metavar="YAML", help="thresholds file (default: parity/thresholds.yaml)")
    add("--timeout", type=float, metavar="SECONDS", help="kill a worker that runs longer than this (exit 2)")


def add_interpreters(p: argparse.ArgumentParser) -> None:
    """--torch-python / --jittor-python (every command that starts workers)."""
    p.add_argument("--torch-python", default=None, help="interpreter of the PyTorch environment")
    p.add_argument("--jittor-python", default=None, help="interpreter of the Jittor environment")


def add_verbose(p: argparse.ArgumentParser, default=False) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="show backend output (Jittor compile chatter)")


# the groups a command of parity/cli/registry.py can take (added after its own options)
COMMAND_GROUPS = {"interpreters": add_interpreters, "verbose": add_verbose}


def add_groups(rp: argparse.ArgumentParser) -> None:
    rp.add_argument("--no-reference", action="store_true", default=None,
                    help="skip the float64 noise-floor reference")
    rp.add_argument("--inject-fault", action="append", metavar="SPEC",
                    help="harness test: deliberate fault on one side, e.g. "
                         "weight:decoder.decoder.layers.3.linear1.weight:noise=1e-3, upsample:bilinear, "
                         "config:decoder.num_queries=200, crash:raise (see parity/workers/faults.py)")
    rp.add_argument("--fault-side", choices=["jittor", "torch"],
                    help="side that gets --inject-fault (default: jittor)")
    rp.add_argument("--nproc", type=int, metavar="N",
                    help="grad/train: run each side as N data-parallel processes (PyTorch: torchrun + DDP; "
                         "Jittor: mpirun + Jittor MPI); the global batch is split over them (default 1)")


def stage_defaults(module) -> Dict[str, Any]:
    """Every option the stage takes, with its default."""
    out = dict(COMMON_DEFAULTS)
    for g in getattr(module, "RUN_GROUPS", ()):
        out.update(GROUP_DEFAULTS[g])
    out.update(getattr(module, "RUN_DEFAULTS", {}))
    return out


def apply_stage_options(args: argparse.Namespace, rp: argparse.ArgumentParser, module) -> None:
    """Refuse an option of another stage (exit 2, naming it); record the given ones; fill the defaults."""
    takes = stage_defaults(module)
    flags = {a.dest: max(a.option_strings, key=len) for a in rp._actions if a.option_strings}   # noqa: SLF001
    given = {d for d in flags if d not in ("help", "stage") and getattr(args, d, None) is not None}
    for d in sorted(given, key=lambda d: flags[d]):
        if d not in takes:
            raise UsageError(f"{flags[d]}: not an option of --stage {args.stage}")
    args.explicit = frozenset(given)
    for d in flags:
        if d in ("help", "stage"):
            continue
        if d not in takes:
            delattr(args, d)
        elif getattr(args, d) is None:
            v = takes[d]
            setattr(args, d, list(v) if isinstance(v, list) else v)
    if args.dtype is None:        # forward/grad: float64 arbitrates by default
        args.dtype = "both" if args.stage in SPLIT_DTYPE else "float32"
    elif args.dtype == "both" and args.stage not in SPLIT_DTYPE:
        raise UsageError(f"--dtype both: only for --stage forward|grad (the {args.stage} stage runs "
                         f"float32 with a float64 reference, or float64)")
