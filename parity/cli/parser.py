"""``parity`` command line: run, report, spec, detect, bench, selftest.

User mistakes end with a one-line message on stderr and exit code 2 (never a traceback);
a failed threshold ends with exit code 1.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from rtdetr_core.config import ConfigError

from parity.cli.args import COMMAND_GROUPS, add_common, add_groups, apply_stage_options
from parity.cli.registry import COMMANDS, STAGES, stage_module
from parity.errors import EXIT_OK, EXIT_USAGE, UsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parity", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, (mod, helptext, groups) in COMMANDS.items():
        if name == "run":
            _add_run(sub, helptext)
            continue
        xp = sub.add_parser(name, help=helptext)
        mod.add_arguments(xp)
        for g in groups:
            COMMAND_GROUPS[g](xp)
        xp.set_defaults(func=mod.run)
    return p


def _add_run(sub, helptext: str) -> None:
    rp = sub.add_parser("run", help=helptext)
    add_common(rp, STAGES)
    add_groups(rp)
    seen = []
    for stage in STAGES:              # forward and grad share one module: its options once
        mod = stage_module(stage)
        if mod not in seen:
            mod.add_run_arguments(rp)
            seen.append(mod)
    rp.set_defaults(func=lambda args: _cmd_run(args, rp))


def _cmd_run(args: argparse.Namespace, rp: argparse.ArgumentParser) -> int:
    mod = stage_module(args.stage)
    apply_stage_options(args, rp, mod)
    return mod.run(args)


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
