"""``parity spec --config PRESET [--json]``: the parameter spec (the state_dict contract) of a config."""
from __future__ import annotations

import argparse
import json
import sys

from rtdetr_core.config import available_presets, load_config
from rtdetr_core.param_spec import param_spec, spec_totals

from parity.errors import EXIT_OK


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--config", required=True, help=f"preset ({', '.join(available_presets())}) or YAML path")
    sp.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
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
