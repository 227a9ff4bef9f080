"""``parity report RUN_DIR [RUN_DIR ...] [--out DIR]``: render run folders into one report
(``parity/report/render.py`` says what is read and written)."""
from __future__ import annotations

import argparse
import os
import sys

from parity.errors import EXIT_OK, EXIT_USAGE, ReportError
from parity.fileio import default_out
from parity.report.render import render


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (forward/grad/train/eval/bench)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report for one run, "
                                                "reports/runs/<time>-report for several)")
    p.add_argument("--title", default=None, help="report title")


def run(args: argparse.Namespace) -> int:
    try:
        dirs = list(args.runs)
        if args.out:
            out = os.path.abspath(args.out)
        elif len(dirs) == 1:
            out = os.path.join(os.path.abspath(dirs[0]), "report")
        else:
            out = default_out("report", "runs")
        doc = render(dirs, out, args.title)
    except ReportError as e:
        print(f"parity report: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    n_img = sum(len(r["images"]) for r in doc["runs"])
    print(f"parity report: {len(doc['runs'])} run(s) -> {out}/report.md, report.json, {n_img} plot(s)")
    return EXIT_OK
