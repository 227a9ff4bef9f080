"""The commands of ``parity`` and the stages of ``parity run``: name -> module.

A command module has ``add_arguments(parser)`` and ``run(args) -> int``; a stage module has
``add_run_arguments(parser)`` (its own options, no defaults on the command line),
``RUN_DEFAULTS`` (their defaults), ``RUN_GROUPS`` (the shared groups of
parity/cli/args.py it takes) and ``run(args) -> int``.
"""
from __future__ import annotations

from parity.commands import bench, detect, eval as eval_stage, forward, report, same, selftest, spec, train

STAGE_MODULES = {"forward": forward, "grad": forward, "train": train, "eval": eval_stage}
STAGES = tuple(STAGE_MODULES)

# name -> (module, help, shared option groups of parity/cli/args.py it takes)
COMMANDS = {
    "spec": (spec, "print the parameter spec (the state_dict contract) of a config", ()),
    "run": (None, "run a parity stage in both environments and compare", ()),
    "report": (report, "render run folders into report.md/json + plots", ()),
    "same": (same, "are two train runs identical, bit for bit (rerun, resume)", ()),
    "detect": (detect, "run both backends on images and draw their detections", ("interpreters", "verbose")),
    "bench": (bench, "speed and memory of both backends side by side", ("interpreters", "verbose")),
    "selftest": (selftest, "plant porting bugs in the Jittor backend and measure what the harness catches",
                 ("interpreters",)),
}


def stage_module(stage: str):
    return STAGE_MODULES[stage]
