"""``parity detect``: run both backends on images and draw their detections side by side.

    parity detect --config PRESET [--weights FILE] --image PATH [PATH ...] [--backend both]
                  [--conf 0.5] [--out DIR]
    parity detect --config PRESET --input X.npy ...        # [B,3,H,W] float32, H, W % 32 == 0

Images are read once here (Pillow, EXIF orientation applied, grayscale/RGBA -> RGB) and
preprocessed with the official validation transform (resize to the config's image size,
/255); the same float32 tensor goes to each backend's worker (``parity/workers/predict.py``,
each in its own environment).  Output folder::

    raw_<backend>.npz          input, pred_logits, pred_boxes exactly as the backend returned
                               them (+ orig_sizes)
    detections_<backend>.json  COCO results (image_id, category_id, bbox xywh px, score,
                               category_name when known): every top-K detection
    images.json                COCO skeleton (images + categories): COCO(images.json).loadRes(...)
    <nnn>_<name>.png           one per image: the backends side by side, detections >= --conf
    agreement.json             raw-output comparison (forward thresholds) + per-image agreement
    result.json                written last: "status": "ok", passed, exit code, what ran
                               (on an error: "status": "error" and the message, nothing else new)

Exit codes: 0 agree, 1 outputs or detections disagree beyond thresholds.yaml (``forward``
outputs; ``detect`` section), 2 error (one line on stderr; result.json says "error").
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Any, Dict, List

import numpy as np
from rtdetr_core.config import available_presets, load_config

from parity.case.folder import CaseError, make_weights
from parity.case.images import Categories, load_images, load_input, parse_size
from parity.case.model import SEEDED_NOTE, write_model_case
from parity.errors import EXIT_FAIL, EXIT_OK, EXIT_USAGE, UsageError, WorkerError
from parity.fileio import default_out, prepare_out, write_error_result, write_json, write_npz
from parity.judge.coco import coco_results
from parity.judge.detmatch import judge_detect
from parity.judge.thresholds import ThresholdError, load_thresholds
from parity.report.detect import print_agreement, verdict_line, write_pictures
from parity.sides.process import BACKENDS, resolve_python, run_interruptible
from parity.sides.serving import run_workers

OUT_KEYS = ("pred_logits", "pred_boxes", "scores", "labels", "boxes", "topk_index", "topk_scores")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help=f"preset ({', '.join(available_presets())}) or YAML path")
    p.add_argument("--weights", default=None, help="weights file (official .pth/.pkl, .safetensors, .npz); "
                                                   "default: seeded init (said so in the output)")
    p.add_argument("--seed", type=int, default=0, help="seed of the seeded init (without --weights)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", metavar="PATH", help="image files (any Pillow format)")
    src.add_argument("--input", metavar="X.npy", help="a preprocessed batch [B,3,H,W] float32 in [0,1], H, W multiples of 32")
    p.add_argument("--backend", choices=["both", "torch", "jittor"], default="both")
    p.add_argument("--conf", type=float, default=0.5, help="score threshold for drawing and agreement (default 0.5)")
    p.add_argument("--out", default=None, help="output folder (default reports/runs/<time>-detect-<config>)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--size", default=None, metavar="HxW",
                   help="input size for --image (N or HxW, multiples of 32; default: the config's train.image_size)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward (default: all --input, 8 images)")
    p.add_argument("--max-side", type=int, default=640, help="longer side of each panel of the PNGs (default 640)")
    p.add_argument("--categories", default="auto",
                   help="label names/ids: auto (COCO when the model has 80 classes), coco, none, or a COCO "
                        "annotation JSON whose 'categories' give the ids and names")
    p.add_argument("--thresholds", default=None, metavar="YAML", help="thresholds file (default: parity/thresholds.yaml)")


def run(args: argparse.Namespace) -> int:
    return run_interruptible(_run, args)


def _run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    cfg = load_config(args.config)
    backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    pythons = {be: resolve_python(be, getattr(args, f"{be}_python")) for be in backends}
    th, sec = check_options(args)
    cats = Categories(args.categories, cfg.num_classes)
    inp = read_inputs(args, cfg)                    # read and preprocessed once, here
    try:
        weights, winfo = make_weights(cfg, args.seed, args.weights)
    except CaseError as e:
        raise UsageError(str(e)) from None
    seeded = winfo.get("source") == "seeded"
    if seeded:
        winfo = dict(winfo, note=SEEDED_NOTE)
    out = prepare_out(args.out or default_out("detect", cfg.name), ("result.json", "agreement.json"))
    base_info = {"command": "detect", "config": cfg.name, "config_digest": cfg.digest(), "backends": backends,
                 "device": args.device, "dtype": args.dtype}
    images = inp["images"]
    print(f"parity detect: config {cfg.name} ({cfg.digest()}), {len(images)} image(s) at {images.shape[2]}x"
          f"{images.shape[3]}, backends {', '.join(backends)}, device {args.device}, {args.dtype}")
    print(f"weights: {'SEEDED INIT (seed %d) - untrained, detections are meaningless' % args.seed if seeded else winfo.get('path')}")
    print(f"output: {out}", flush=True)
    try:
        res, info = predict(args, cfg, backends, pythons, inp, weights, winfo, out)
    except WorkerError as e:
        write_error_result(out, "result.json", str(e), base_info, side=e.backend, phase=e.phase)
        print(f"parity: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BaseException as e:
        write_error_result(out, "result.json", f"{type(e).__name__}: {e}", base_info)
        raise
    files = write_outputs(args, cfg, backends, inp, res, winfo, cats, out)
    passed, raw_cmp, rows, summary_ag = True, [], [], {}
    if len(backends) == 2:
        passed, raw_cmp, rows, summary_ag = judge_detect(res["jittor"], res["torch"], inp["names"], inp["ids"],
                                                         args.conf, th.get("forward", args.dtype, "outputs"), sec)
    files += write_pictures(out, inp, res, backends, rows, args.conf, cats.name, args.max_side, seeded, winfo)
    if len(backends) == 2:
        print_agreement(raw_cmp, rows, args.conf, sec["match_iou"])
    agreement = {"conf": args.conf, "thresholds": {"outputs": th.get("forward", args.dtype, "outputs").to_dict(), **sec},
                 "raw_outputs": raw_cmp, "per_image": rows, "summary": summary_ag}
    write_json(os.path.join(out, "agreement.json"), agreement)
    files.append("agreement.json")
    code = EXIT_OK if passed else EXIT_FAIL
    summary = {
        "schema": 1, "status": "ok", "command": "detect", "passed": passed, "exit_code": code,
        "config": cfg.name, "config_digest": cfg.digest(), "weights": winfo, "backends": backends,
        "device": args.device, "dtype": args.dtype, "conf": args.conf, "categories": cats.source,
        "input_size": list(images.shape[2:]), "images": [{"id": i, "name": nm, "source": s, "orig_size": hw}
                                                          for i, nm, s, hw in zip(inp["ids"], inp["names"], inp["sources"],
                                                                                  inp["orig_sizes"].tolist())],
        "dropped_without_category": {be: res[be]["dropped"] for be in backends},
        "agreement": summary_ag, "raw_outputs": raw_cmp,
        "workers": {be: {"versions": info[be]["ready"].get("versions"), "threads": info[be]["ready"].get("threads"),
                         "timing": info[be]["ready"].get("timing"), "forward_seconds": info[be]["seconds"],
                         "peak_rss_mb": info[be]["bye"].get("peak_rss_mb")} for be in backends},
        "files": files, "elapsed": time.perf_counter() - t_start,
    }
    write_json(os.path.join(out, "result.json"), summary)
    print(verdict_line(summary, sec["min_agreement"], len(files), out, seeded))
    return code


def check_options(args: argparse.Namespace):
    if not 0.0 <= args.conf <= 1.0:
        raise UsageError(f"--conf {args.conf}: must be in [0, 1]")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.max_side < 32:
        raise UsageError(f"--max-side {args.max_side}: must be >= 32")
    try:
        th = load_thresholds(args.thresholds)
        return th, th.section("detect")
    except ThresholdError as e:
        raise UsageError(str(e)) from None


def read_inputs(args: argparse.Namespace, cfg) -> Dict[str, Any]:
    if args.image:
        size_hw = parse_size(args.size, cfg.train.image_size)
        images, originals, orig_sizes = load_images(args.image, size_hw)
        names = [os.path.basename(p) for p in args.image]
        sources = [os.path.abspath(p) for p in args.image]
    else:
        if args.size is not None:
            raise UsageError("--size applies to --image only (an --input batch is used as it is)")
        images = load_input(args.input)
        originals = [None] * len(images)
        orig_sizes = np.asarray([images.shape[2:]] * len(images), dtype=np.int64)
        names = [f"input[{i}]" for i in range(len(images))]
        sources = [f"{os.path.abspath(args.input)}[{i}]" for i in range(len(images))]
    n = len(images)
    return {"images": images, "originals": originals, "orig_sizes": orig_sizes, "names": names, "sources": sources,
            "ids": list(range(1, n + 1)), "bs": args.batch_size or (n if args.input else min(n, 8))}


def predict(args, cfg, backends, pythons, inp, weights, winfo, out):
    """Every batch through every backend's predict worker -> ``({backend: stacked outputs}, worker info)``."""
    images, orig_sizes, n, bs = inp["images"], inp["orig_sizes"], len(inp["images"]), inp["bs"]
    case_dir = os.path.join(out, ".case")
    raw: Dict[str, Dict[str, List[np.ndarray]]] = {be: {k: [] for k in OUT_KEYS} for be in backends}
    try:
        write_model_case(case_dir, cfg, weights, winfo, stage="detect", seed=args.seed)
        del weights

        def batches():
            for k, s in enumerate(range(0, n, bs)):
                p = os.path.join(case_dir, f"batch_{k:06d}.npz")
                write_npz(p, {"images": images[s:s + bs], "orig_sizes": orig_sizes[s:s + bs]})
                yield k, p, len(images[s:s + bs]), n

        def on_batch(k, outs):
            for be, p in outs.items():
                with np.load(p, allow_pickle=False) as z:
                    for key in raw[be]:
                        raw[be][key].append(z[key])

        info = run_workers(backends, pythons, case_dir, batches(), os.path.join(out, "logs"), args.device,
                           args.dtype, args.verbose, on_batch)
    finally:
        shutil.rmtree(case_dir, ignore_errors=True)
    return {be: {k: np.concatenate(v) for k, v in raw[be].items()} for be in backends}, info


def write_outputs(args, cfg, backends, inp, res, winfo, cats, out) -> List[str]:
    """raw_<backend>.npz, detections_<backend>.json and images.json."""
    files: List[str] = []
    for be in backends:
        write_npz(os.path.join(out, f"raw_{be}.npz"),
                  {"input": inp["images"], "pred_logits": res[be]["pred_logits"], "pred_boxes": res[be]["pred_boxes"],
                   "orig_sizes": inp["orig_sizes"]},
                  meta={"backend": be, "config": cfg.name, "config_digest": cfg.digest(), "dtype": args.dtype,
                        "device": args.device, "weights": winfo, "images": inp["sources"]})
        dets, dropped = coco_results(res[be], inp["ids"], cats.lut(cfg.num_classes))
        cats.add_names(dets)
        write_json(os.path.join(out, f"detections_{be}.json"), dets)
        res[be]["dropped"] = dropped
        files += [f"raw_{be}.npz", f"detections_{be}.json"]
    write_json(os.path.join(out, "images.json"), {
        "info": {"description": f"parity detect inputs ({cfg.name})"},
        "images": [{"id": i, "file_name": nm, "height": int(hw[0]), "width": int(hw[1])}
                   for i, nm, hw in zip(inp["ids"], inp["names"], inp["orig_sizes"].tolist())],
        "categories": cats.coco_categories(cfg.num_classes), "annotations": []})
    files.append("images.json")
    return files
