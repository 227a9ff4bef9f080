"""``weights-convert SRC DST``: convert RT-DETR weights between PyTorch, Jittor, safetensors, npz.

Reads SRC safely (nothing in it is executed), unwraps official checkpoints
(``{'ema': {'module': ...}}``, ``{'model': ...}``, ``module.`` prefixes), checks it against
the preset's state_dict contract when ``--config`` is given, and writes DST atomically.

Exit codes: 0 done; 2 a user mistake (bad file, wrong preset, missing/extra keys, ...),
reported as one line on stderr, and no output file is left behind; 1 an unexpected
I/O failure (also one line, also no output file).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .errors import WeightsError, one_line

PROG = "weights-convert"
EXIT_OK, EXIT_IO, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        print(f"{PROG}: error: {one_line(message)} (see {PROG} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                epilog="Formats by extension: .pth/.pt (torch, needs the PyTorch env), .pkl (jittor), "
                       ".safetensors, .npz.")
    p.add_argument("src", metavar="SRC", help="weights file to read (.pth/.pt, .pkl, .safetensors, .npz)")
    p.add_argument("dst", metavar="DST", help="file to write (format from its extension unless --to)")
    p.add_argument("--config", default=None, metavar="PRESET",
                   help="preset name or YAML path: check names/shapes strictly and write in spec order")
    p.add_argument("--to", default=None, choices=["jittor", "torch", "safetensors", "npz"],
                   help="output format (default: from DST's extension)")
    p.add_argument("--drop-mismatched-heads", action="store_true",
                   help="drop class-dependent heads whose shape differs from the config (another num_classes)")
    p.add_argument("--fill-seed", type=int, default=None, metavar="SEED",
                   help="fill dropped heads from rtdetr_core seeded init with this seed (needs --config)")
    p.add_argument("--dtype", default=None, choices=["float32", "float64"],
                   help="floating dtype of the output (default: the spec's float32; int64 buffers stay int64)")
    return p


def _human_size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def _run(args: argparse.Namespace) -> int:
    from rtdetr_core.config import ConfigError, load_config

    from .api import read_weights
    from .formats import (DEFAULT_EXTENSION, _require_torch, format_from_extension, normalize_format,
                          write_weights)
    from .validate import fill_from_seed, summarize_report

    # -- everything checkable before reading: fail fast, write nothing -----------------
    dst_ext_fmt = format_from_extension(args.dst)
    out_fmt = normalize_format(args.to) if args.to else dst_ext_fmt
    if out_fmt is None:
        raise WeightsError(f"cannot tell the output format of '{args.dst}' from its extension; "
                           f"use one of {', '.join(sorted(set(DEFAULT_EXTENSION.values())))} or pass --to")
    if args.to and dst_ext_fmt and dst_ext_fmt != out_fmt:
        raise WeightsError(f"--to {args.to} but '{args.dst}' has the extension of {dst_ext_fmt} files; "
                           f"name it *{DEFAULT_EXTENSION[out_fmt]}")
    if args.fill_seed is not None and args.config is None:
        raise WeightsError("--fill-seed needs --config")
    if not os.path.exists(args.src):
        raise WeightsError(f"{args.src}: no such file")
    dst_dir = os.path.dirname(os.path.abspath(args.dst))
    if not os.path.isdir(dst_dir):
        raise WeightsError(f"{args.dst}: output folder {dst_dir} does not exist")
    if out_fmt == "torch":
        _require_torch(f"writing the PyTorch checkpoint {args.dst}")
    cfg = None
    if args.config is not None:
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            raise WeightsError(f"--config: {e}") from None

    # -- read (+ validate) ---------------------------------------------------------------
    weights, info = read_weights(args.src, cfg, drop_mismatched_heads=args.drop_mismatched_heads,
                                 dtype=args.dtype)
    bits = [info["format"], f"layout {info['layout']}"]
    if info.get("prefix_stripped"):
        bits.append(f"prefix '{info['prefix_stripped']}' stripped")
    if info.get("checksum"):
        bits.append(f"checksum {info['checksum']}")
    bits.append(f"{info['num_tensors']} tensors")
    print(f"read {args.src} ({', '.join(bits)})")
    if info.get("unused_keys"):
        unused = info["unused_keys"]
        print(f"  not used: {', '.join(unused[:6])}{' ...' if len(unused) > 6 else ''}")
    if cfg is not None:
        print(f"checked against config '{cfg.name}': ok, {len(weights)} tensors in spec order")
        for line in summarize_report(info["validation"]):
            print(f"  {line}")
        dropped = info["validation"]["dropped_heads"]
        if dropped:
            if args.fill_seed is not None:
                weights, filled = fill_from_seed(weights, cfg, args.fill_seed, args.dtype)
                print(f"  filled {len(filled)} tensor(s) from seeded init (seed {args.fill_seed})")
            else:
                print(f"  note: the output lacks {len(dropped)} head tensor(s); fill them from seeded init "
                      f"(rtdetr_core.init.seeded_weights, or --fill-seed SEED) before loading")
    else:
        print("no --config: tensors written as found, not checked against a spec")

    # -- write (atomic) ------------------------------------------------------------------
    write_weights(args.dst, weights, out_fmt)
    print(f"wrote {args.dst} ({out_fmt}, {len(weights)} tensors, {_human_size(os.path.getsize(args.dst))})")
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except WeightsError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except (OSError, MemoryError) as e:
        print(f"{PROG}: error: {type(e).__name__}: {one_line(e)}; no output written", file=sys.stderr)
        return EXIT_IO


if __name__ == "__main__":
    sys.exit(main())
