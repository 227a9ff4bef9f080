"""``parity run --stage eval``: both backends predict every image of a split; COCO metrics.

    parity run --stage eval --config PRESET [--weights FILE] [--data COCO_DIR] [--split val]
               [--limit N] [--batch-size B] [--conf 0.3] [--worst 10] [--thresholds YAML] [--timeout S]

The runner reads each batch once (``rtdetr_core`` data pipeline: Pillow, EXIF, official
validation transform) and hands the same float32 tensor to both predict workers
(``parity/workers/predict.py``, one per environment, running side by side).  Streaming: a
batch's raw outputs are deleted as soon as both answers are in; detections go straight to
``detections_<backend>.json`` (a JSON array written incrementally, renamed into place at
the end) and per-image agreement to ``per_image.csv``, so memory stays flat over the split.
Then pycocotools' 12 metrics per backend, their difference, and the images that disagree most.

Output folder::

    detections_<backend>.json  COCO results (every top-K detection; labels mapped to the
                               dataset's category ids, labels without a category dropped)
    per_image.csv              image_id, file, n_gt, detections of each side >= score_threshold,
                               matched, mean/min IoU, max score diff, label agreement, agreement
    result.json                written last: "status": "ok", passed, exit code, metrics per
                               backend, differences, thresholds, agreement summary, worst
                               images, raw-output errors (max over batches, row by row) and
                               the raw-output gate (``raw_gate``: worst error per key, failing
                               batches, tie flips); on an error
                               "status": "error" and the message (as parity.commands.forward's result.json)
    summary.md                 the same as tables

Exit codes: 0 every AP difference within ``eval.max_ap_diff`` (thresholds.yaml) and every
batch's raw outputs (pred_logits, pred_boxes) within ``forward.<dtype>.outputs`` — the AP alone
cannot fail with untrained weights (AP ~0 on both sides); a float32 top-k near-tie that
reorders a few queries is paired and reported, not failed (``parity/judge/outputs_match.py``) —
1 not, 2 error (one line on stderr; result.json says "error").
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Any, Dict, Tuple

from rtdetr_core.config import load_config
from rtdetr_core.data import DataError, open_split, resolve_data

from parity.case.folder import CaseError, make_weights
from parity.case.model import SEEDED_NOTE, write_model_case
from parity.commands.eval_stream import CSV_FIELDS, EvalStream
from parity.errors import EXIT_FAIL, EXIT_OK, EXIT_USAGE, UsageError, WorkerError
from parity.fileio import default_out, prepare_out, write_error_result, write_json, write_text
from parity.judge.coco import eval_passed, evaluate_file, metric_diffs
from parity.judge.detmatch import summarize, worst
from parity.judge.thresholds import ThresholdError, load_thresholds
from parity.report.eval import print_result, render_md, verdict_line
from parity.sides.process import resolve_python, run_interruptible
from parity.sides.serving import run_workers

BACKENDS = ("torch", "jittor")
# the options of this stage beyond the shared ones (parity/cli/args.py)
RUN_GROUPS = ()
RUN_DEFAULTS = {"split": "val", "limit": None, "worst": 10, "conf": None}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--split", help="eval: dataset split (val, train, or a folder name; default val)")
    add("--limit", type=int, help="eval: only the first N images of the split")
    add("--worst", type=int, help="eval: how many most-disagreeing images to list")
    add("--conf", type=float,
        help="eval: score threshold of the per-image agreement (default: eval.score_threshold of thresholds.yaml)")


def run(args: argparse.Namespace) -> int:
    return run_interruptible(_run, args)


def _run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    s = prepare(args)
    weights, winfo = model_weights(args, s["cfg"])
    out = prepare_out(args.out or default_out("eval", s["cfg"].name), ("result.json", "summary.md"))
    base_info = {"stage": "eval", "config": s["cfg"].name, "config_digest": s["cfg"].digest(), "dtype": args.dtype,
                 "device": args.device, "out": out}
    announce(args, s, winfo, out)
    case_dir = os.path.join(out, ".case")
    stream = EvalStream(out, case_dir, s["ds"], s["n"], s["bs"], s["img_ids"], BACKENDS, s["sec"],
                        s["th"].get("forward", args.dtype, "outputs"))
    try:
        try:
            write_model_case(case_dir, s["cfg"], weights, winfo, stage="eval", seed=args.seed)
            del weights
            info = run_workers(BACKENDS, s["pythons"], case_dir, stream.batches(), os.path.join(out, "logs"),
                               args.device, args.dtype, args.verbose, stream.on_batch, timeout=s["timeout"])
        finally:
            shutil.rmtree(case_dir, ignore_errors=True)
        stream.close()
    except (WorkerError, DataError) as e:
        stream.abort()
        write_error_result(out, "result.json", str(e), base_info, side=getattr(e, "backend", None),
                           phase=getattr(e, "phase", None))
        print(f"parity: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BaseException as e:
        stream.abort(remove_csv=False)
        write_error_result(out, "result.json", f"{type(e).__name__}: {e}", base_info)
        raise
    print("\nCOCO evaluation (pycocotools) ...", flush=True)
    metrics = {}
    for be in BACKENDS:
        try:
            metrics[be] = evaluate_file(s["ds"].coco, os.path.join(out, f"detections_{be}.json"), s["img_ids"])
        except DataError as e:
            write_error_result(out, "result.json", f"{be} detections: {e}", base_info, side=be)
            print(f"parity: error: {be} detections: {e}", file=sys.stderr)
            return EXIT_USAGE
    result = judge(args, s, stream, metrics, info, winfo, out, t_start)
    print_result(result)
    write_text(os.path.join(out, "summary.md"), render_md(result))
    write_json(os.path.join(out, "result.json"), result)       # last: the verdict
    print(verdict_line(result))
    return result["exit_code"]


def prepare(args: argparse.Namespace) -> Dict[str, Any]:
    """Config, interpreters, thresholds and the split, checked before anything is written."""
    cfg = load_config(args.config)
    pythons = {be: resolve_python(be, getattr(args, f"{be}_python", None)) for be in BACKENDS}
    try:
        th = load_thresholds(getattr(args, "thresholds", None))
        sec = th.section("eval")
    except ThresholdError as e:
        raise UsageError(str(e)) from None
    limit, conf = getattr(args, "limit", None), getattr(args, "conf", None)
    if conf is not None:
        if not 0.0 <= conf <= 1.0:
            raise UsageError(f"--conf {conf}: must be in [0, 1]")
        sec["score_threshold"] = float(conf)
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit}: must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    size_hw = tuple(int(x) for x in cfg.train.image_size)
    if size_hw[0] % 32 or size_hw[1] % 32:
        raise UsageError(f"config {cfg.name}: train.image_size {list(size_hw)} is not a multiple of 32")
    split, root, ds = open_data(args, cfg, size_hw)
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise UsageError(f"data: the {split} split of {root} has no images")
    return {"cfg": cfg, "pythons": pythons, "th": th, "sec": sec, "timeout": getattr(args, "timeout", None) or None,
            "split": split, "root": root, "ds": ds, "n": n, "size_hw": size_hw,
            "n_worst": max(0, int(getattr(args, "worst", 10) or 0)), "bs": args.batch_size or cfg.train.batch_size,
            "synthetic": args.data is None, "img_ids": [int(i) for i in ds.ids[:n]]}


def open_data(args: argparse.Namespace, cfg, size_hw) -> Tuple[str, str, Any]:
    split = getattr(args, "split", None) or "val"
    try:
        root = resolve_data(args.data)
        ds = open_split(root, split, size_hw)
    except DataError as e:
        raise UsageError(f"data: {e}") from None
    if ds.num_classes > cfg.num_classes:
        raise UsageError(f"data: {ds.ann_file} has {ds.num_classes} categories, the config '{cfg.name}' only "
                         f"{cfg.num_classes} classes")
    return split, root, ds


def model_weights(args: argparse.Namespace, cfg):
    try:
        weights, winfo = make_weights(cfg, args.seed, args.weights)
    except CaseError as e:
        raise UsageError(str(e)) from None
    if winfo.get("source") == "seeded":
        winfo = dict(winfo, note=SEEDED_NOTE)
    return weights, winfo


def announce(args: argparse.Namespace, s: Dict[str, Any], winfo: Dict[str, Any], out: str) -> None:
    cfg, ds, size_hw = s["cfg"], s["ds"], s["size_hw"]
    seeded = winfo.get("source") == "seeded"
    print(f"parity run --stage eval: config {cfg.name} ({cfg.digest()}), {s['n']} of {len(ds)} images of "
          f"{'the bundled synthetic ' if s['synthetic'] else ''}{s['split']} ({ds.ann_file}), batch {s['bs']}, "
          f"{size_hw[0]}x{size_hw[1]}, device {args.device}, {args.dtype}")
    print(f"weights: {'SEEDED INIT (seed %d) - untrained, AP is ~0; only the agreement counts' % args.seed if seeded else winfo.get('path')}")
    if ds.num_classes < cfg.num_classes:
        print(f"note: the data has {ds.num_classes} categories, the model {cfg.num_classes} classes: detections "
              f"of labels >= {ds.num_classes} have no category and are not evaluated")
    print(f"output: {out}", flush=True)


def judge(args, s, stream: EvalStream, metrics, info, winfo, out: str, t_start: float) -> Dict[str, Any]:
    """The verdict (every AP difference, the per-image agreement, the raw-output gate) as result.json."""
    sec, cfg, ds = s["sec"], s["cfg"], s["ds"]
    diffs = metric_diffs(metrics["torch"], metrics["jittor"], sec["max_ap_diff"])
    ag = summarize(stream.rows)
    raw_gate = stream.gate.summary()
    passed = eval_passed(diffs, ag, raw_gate, sec)
    fth = s["th"].get("forward", args.dtype, "outputs")
    raw_cmp = {k: {**v, "threshold_rel_l2": fth.rel_l2, "within_forward_threshold": v["rel_l2"] <= fth.rel_l2}
               for k, v in stream.raw_err.items()}
    code = EXIT_OK if passed else EXIT_FAIL
    return {
        "schema": 1, "status": "ok", "stage": "eval", "passed": passed, "exit_code": code,
        "config": cfg.name, "config_digest": cfg.digest(), "dtype": args.dtype,
        "device": args.device, "out": out,
        "data": {"root": os.path.abspath(s["root"]), "synthetic": s["synthetic"], "split": s["split"],
                 "ann_file": ds.ann_file, "images": s["n"], "images_in_split": len(ds),
                 "categories": int(ds.num_classes)},
        "weights": winfo, "batch_size": s["bs"], "thresholds": sec, "thresholds_file": s["th"].path,
        "metrics": {be: dict(metrics[be]) for be in BACKENDS}, "diffs": diffs,
        "max_abs_ap_diff": max(abs(d["diff"]) for d in diffs),
        "agreement": ag, "mean_agreement": ag["mean_agreement"],
        "worst_images": [{k: r[k] for k in CSV_FIELDS} for r in worst(stream.rows, s["n_worst"])],
        "raw_outputs": raw_cmp, "raw_gate": raw_gate, "dropped_without_category": stream.dropped,
        "workers": {be: {"versions": info[be]["ready"].get("versions"), "threads": info[be]["ready"].get("threads"),
                         "timing": info[be]["ready"].get("timing"),
                         "forward_seconds_total": float(sum(info[be]["seconds"])),
                         "forward_seconds_first": info[be]["seconds"][0] if info[be]["seconds"] else None,
                         "peak_rss_mb": info[be]["bye"].get("peak_rss_mb")} for be in BACKENDS},
        "files": ["detections_torch.json", "detections_jittor.json", "per_image.csv", "result.json", "summary.md"],
        "wall_s": time.perf_counter() - t_start,
    }
