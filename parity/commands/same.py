"""``parity same RUN_A RUN_B [--json OUT]``: are two train runs identical, bit for bit?

The check behind "a second run gives the same curves" and "interrupt + ``--resume`` gives
the same result" (what is compared: parity/judge/same_run.py).  Exit 0 identical, 1 a
difference (named per side), 2 a folder that is not a finished train run.
"""
from __future__ import annotations

import argparse
import os
import sys

from parity.errors import EXIT_FAIL, EXIT_OK, EXIT_USAGE
from parity.fileio import write_json
from parity.judge.same_run import same_runs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", metavar="RUN_A", help="a train run folder")
    p.add_argument("run_b", metavar="RUN_B", help="the train run folder to compare with it")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the comparison as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        res = same_runs(args.run_a, args.run_b)
    except (OSError, ValueError, KeyError) as e:
        print(f"parity same: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"parity same: {res['run_a']} vs {res['run_b']}")
    if not res["same_config"]:
        print(f"  configs differ: digest {res['config_digest'][0]} vs {res['config_digest'][1]}")
    for label, s in res["sides"].items():
        what = (f"{s['iterations']} iterations, {s['epochs']} epochs, mAP at epochs {s['map_epochs']}, "
                f"{s['tensors']} final tensors" + (f"; B resumed from epoch {s['resumed']}" if s["resumed"] else ""))
        print(f"  {label}: {'identical' if s['same'] else 'DIFFERENT'} ({what})")
        for k, v in s["differences"].items():
            if v:
                print(f"      {k}: {v}")
    if args.json:
        write_json(os.path.abspath(args.json), res)
    print("  SAME: bit for bit" if res["same"] else "  NOT THE SAME")
    return EXIT_OK if res["same"] else EXIT_FAIL
