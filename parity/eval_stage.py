"""``parity run --stage eval``: both backends predict every image of a split; COCO metrics.

    parity run --stage eval --config PRESET [--weights FILE] [--data COCO_DIR] [--split val]
               [--limit N] [--batch-size B] [--conf 0.3] [--worst 10] [--thresholds YAML] [--timeout S]

The runner reads each batch once (``rtdetr_core`` data pipeline: Pillow, EXIF, official
validation transform) and hands the same float32 tensor to both predict workers
(``parity/predict_worker.py``, one per environment, running side by side).  Streaming: a
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
                               "status": "error" and the message (as parity.runner's result.json)
    summary.md                 the same as tables

Exit codes: 0 every AP difference within ``eval.max_ap_diff`` (thresholds.yaml) and every
batch's raw outputs (pred_logits, pred_boxes) within ``forward.<dtype>.outputs`` — the AP alone
cannot fail with untrained weights (AP ~0 on both sides); a float32 top-k near-tie that
reorders a few queries is paired and reported, not failed (``parity/outputs_match.py``) —
1 not, 2 error (one line on stderr; result.json says "error").
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from collections import OrderedDict
from typing import Any, Dict, IO, List, Optional, Sequence

import numpy as np

from .outputs_match import OutputsGate
from .procs import WorkerError, default_out, find_python, mark_failed, prepare_out, write_model_case

CSV_FIELDS = ("image_id", "file_name", "n_gt", "n_torch", "n_jittor", "matched", "mean_iou", "min_iou",
              "max_score_diff", "label_agreement", "agreement")


def _add_once(parser: argparse.ArgumentParser, *flags: str, **kw: Any) -> None:
    """Add an option unless another stage module already added it (shared ``run`` parser)."""
    if any(f in parser._option_string_actions for f in flags):   # noqa: SLF001 - argparse has no public test
        return
    parser.add_argument(*flags, **kw)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    _add_once(parser, "--split", default="val", help="eval: dataset split (val, train, or a folder name; default val)")
    _add_once(parser, "--limit", type=int, default=None, help="eval: only the first N images of the split")
    _add_once(parser, "--worst", type=int, default=10, help="eval: how many most-disagreeing images to list")
    _add_once(parser, "--conf", type=float, default=None,
              help="eval: score threshold of the per-image agreement (default: eval.score_threshold of thresholds.yaml)")


# ----------------------------------------------------------------------------------------
# results writing (streamed) and evaluation
# ----------------------------------------------------------------------------------------

class JsonArrayWriter:
    """A JSON array written item by item to ``PATH.partial``; ``close()`` fsyncs and renames
    it to ``PATH`` (so ``PATH`` is complete or absent); ``abort()`` removes the partial file."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = path + ".partial"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f: Optional[IO[str]] = open(self.tmp, "w", encoding="utf-8")
        self.f.write("[")
        self.n = 0

    def extend(self, items: Sequence[Dict[str, Any]]) -> None:
        for it in items:
            self.f.write(("\n" if self.n == 0 else ",\n") + json.dumps(it, allow_nan=False))
            self.n += 1

    def close(self) -> None:
        if self.f is None:
            return
        self.f.write("\n]\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def coco_results_from(dets: Dict[str, np.ndarray], image_ids: Sequence[int],
                      label_to_category: Sequence[int]) -> (List[Dict[str, Any]], int):
    """COCO results of stacked detections (``scores`` [N,K], ``labels`` [N,K] contiguous,
    ``boxes`` [N,K,4] xyxy px); labels >= len(label_to_category) have no category and are
    dropped (counted).  Returns ``(results, dropped)``."""
    lut = np.asarray(label_to_category, dtype=np.int64)
    out: List[Dict[str, Any]] = []
    dropped = 0
    for i, img_id in enumerate(image_ids):
        s = np.asarray(dets["scores"][i], dtype=np.float64).reshape(-1)
        lab = np.asarray(dets["labels"][i]).astype(np.int64).reshape(-1)
        bx = np.asarray(dets["boxes"][i], dtype=np.float64).reshape(-1, 4)
        ok = (lab >= 0) & (lab < len(lut))
        dropped += int((~ok).sum())
        s, lab, bx = s[ok], lab[ok], bx[ok]
        xywh = np.concatenate([bx[:, :2], bx[:, 2:] - bx[:, :2]], axis=1)
        cats = lut[lab]
        for sc, c, bb in zip(s.tolist(), cats.tolist(), xywh.tolist()):
            out.append({"image_id": int(img_id), "category_id": int(c), "bbox": [float(v) for v in bb],
                        "score": float(sc)})
    return out, dropped


def evaluate_file(coco_gt, path: str, img_ids: Optional[Sequence[int]] = None) -> "OrderedDict[str, float]":
    """The 12 COCO metrics of a results file (``rtdetr_core.coco_eval.evaluate``)."""
    from rtdetr_core.coco_eval import evaluate
    with open(path, "r", encoding="utf-8") as fh:
        results = json.load(fh)
    return evaluate(coco_gt, results, img_ids=img_ids)


def metric_diffs(base: Dict[str, float], cand: Dict[str, float], max_diff: float) -> List[Dict[str, Any]]:
    from rtdetr_core.coco_eval import METRIC_NAMES
    rows = []
    for m in METRIC_NAMES:
        b, c = float(base[m]), float(cand[m])
        if b == -1 and c == -1:
            rows.append({"metric": m, "torch": b, "jittor": c, "diff": 0.0, "passed": True, "skipped": True})
            continue
        d = c - b
        rows.append({"metric": m, "torch": b, "jittor": c, "diff": d, "passed": abs(d) <= max_diff + 1e-12,
                     "skipped": False})
    return rows


# ----------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from .procs import run_interruptible
    return run_interruptible(_run, args)


def _run(args: argparse.Namespace) -> int:
    from rtdetr_core.config import load_config
    from rtdetr_core.data import DataError, ensure_synthetic_dataset, open_split

    from .case import CaseError, make_weights
    from .cli import EXIT_FAIL, EXIT_OK, EXIT_USAGE, UsageError
    from .compare import tensor_errors
    from .detect import SEEDED_NOTE, run_workers
    from .detmatch import filter_dets, load_section, match_detections, summarize, worst
    from .fileio import write_json, write_text
    from .thresholds import ThresholdError, load_thresholds

    t_start = time.perf_counter()
    cfg = load_config(args.config)
    backends = ["torch", "jittor"]
    pythons = {be: find_python(be, getattr(args, f"{be}_python", None)) for be in backends}
    tpath = getattr(args, "thresholds", None)
    timeout = getattr(args, "timeout", None) or None
    try:
        th = load_thresholds(tpath)
        sec = load_section("eval", tpath)
    except ThresholdError as e:
        raise UsageError(str(e)) from None
    limit = getattr(args, "limit", None)
    split = getattr(args, "split", None) or "val"
    n_worst = max(0, int(getattr(args, "worst", 10) or 0))
    conf = getattr(args, "conf", None)
    if conf is not None:
        if not 0.0 <= conf <= 1.0:
            raise UsageError(f"--conf {conf}: must be in [0, 1]")
        sec["score_threshold"] = float(conf)
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit}: must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    size_hw = tuple(int(s) for s in cfg.train.image_size)
    if size_hw[0] % 32 or size_hw[1] % 32:
        raise UsageError(f"config {cfg.name}: train.image_size {list(size_hw)} is not a multiple of 32")
    synthetic = args.data is None
    try:
        root = ensure_synthetic_dataset() if synthetic else args.data
        ds = open_split(root, split, size_hw)
    except DataError as e:
        raise UsageError(f"data: {e}") from None
    if ds.num_classes > cfg.num_classes:
        raise UsageError(f"data: {ds.ann_file} has {ds.num_classes} categories, the config '{cfg.name}' only "
                         f"{cfg.num_classes} classes")
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise UsageError(f"data: the {split} split of {root} has no images")
    bs = args.batch_size or cfg.train.batch_size
    try:
        weights, winfo = make_weights(cfg, args.seed, args.weights)
    except CaseError as e:
        raise UsageError(str(e)) from None
    seeded = winfo.get("source") == "seeded"
    if seeded:
        winfo = dict(winfo, note=SEEDED_NOTE)
    lut = np.asarray(ds.label_to_category, dtype=np.int64)
    img_ids = [int(i) for i in ds.ids[:n]]

    out = prepare_out(args.out or default_out("eval", cfg.name), ("result.json", "summary.md"))
    base_info = {"stage": "eval", "config": cfg.name, "config_digest": cfg.digest(), "dtype": args.dtype,
                 "device": args.device, "out": out}
    print(f"parity run --stage eval: config {cfg.name} ({cfg.digest()}), {n} of {len(ds)} images of "
          f"{'the bundled synthetic ' if synthetic else ''}{split} ({ds.ann_file}), batch {bs}, "
          f"{size_hw[0]}x{size_hw[1]}, device {args.device}, {args.dtype}")
    print(f"weights: {'SEEDED INIT (seed %d) - untrained, AP is ~0; only the agreement counts' % args.seed if seeded else winfo.get('path')}")
    if ds.num_classes < cfg.num_classes:
        print(f"note: the data has {ds.num_classes} categories, the model {cfg.num_classes} classes: detections "
              f"of labels >= {ds.num_classes} have no category and are not evaluated")
    print(f"output: {out}", flush=True)

    case_dir = os.path.join(out, ".case")
    writers = {be: JsonArrayWriter(os.path.join(out, f"detections_{be}.json")) for be in backends}
    csv_tmp = os.path.join(out, "per_image.csv.partial")
    csv_fh = open(csv_tmp, "w", newline="", encoding="utf-8")
    cw = csv.DictWriter(csv_fh, fieldnames=CSV_FIELDS)
    cw.writeheader()
    rows: List[Dict[str, Any]] = []
    dropped = {be: 0 for be in backends}
    raw_err = {k: {"rel_l2": 0.0, "max_abs": 0.0} for k in ("pred_logits", "pred_boxes")}
    # judged batch by batch as it streams by: only the worst error and the failures are kept
    gate = OutputsGate(th.get("forward", args.dtype, "outputs"), int(sec["max_tie_rows"]))
    batch_meta: Dict[int, Dict[str, Any]] = {}

    def batches():
        from .fileio import write_npz
        for k, s in enumerate(range(0, n, bs)):
            idx = list(range(s, min(s + bs, n)))
            ims, sizes, ngt = [], [], []
            for i in idx:
                im, tg = ds[i]
                ims.append(im)
                sizes.append(tg["orig_size"])
                ngt.append(len(tg["labels"]))
            p = os.path.join(case_dir, f"batch_{k:06d}.npz")
            write_npz(p, {"images": np.stack(ims).astype(np.float32, copy=False),
                          "orig_sizes": np.asarray(sizes, dtype=np.int64)})
            batch_meta[k] = {"indices": idx, "n_gt": ngt}
            yield k, p, len(idx), n

    def on_batch(k, outs):
        meta = batch_meta.pop(k)
        idx = meta["indices"]
        ids = [img_ids[i] for i in idx]
        res = {}
        for be, p in outs.items():
            with np.load(p, allow_pickle=False) as z:
                res[be] = {key: z[key] for key in ("pred_logits", "pred_boxes", "scores", "labels", "boxes",
                                                   "topk_index", "topk_scores")}
            results, d = coco_results_from(res[be], ids, lut)
            dropped[be] += d
            writers[be].extend(results)
        gate.add(k, {key: res["jittor"][key] for key in ("pred_logits", "pred_boxes")},
                 {key: res["torch"][key] for key in ("pred_logits", "pred_boxes")},
                 tuple((res[be]["topk_index"], res[be]["topk_scores"]) for be in ("jittor", "torch")))
        for key in raw_err:
            e = tensor_errors(res["jittor"][key], res["torch"][key])
            raw_err[key]["rel_l2"] = max(raw_err[key]["rel_l2"], float(e["rel_l2"]))
            raw_err[key]["max_abs"] = max(raw_err[key]["max_abs"], float(e["max_abs"]))
        for j, i in enumerate(idx):
            b = {key: res["torch"][key][j] for key in ("scores", "labels", "boxes")}
            c = {key: res["jittor"][key][j] for key in ("scores", "labels", "boxes")}
            # every detection of the model is compared (also labels without a dataset category:
            # they are not evaluated, but they are still the backends' outputs)
            r = match_detections(filter_dets(b, sec["score_threshold"]), filter_dets(c, sec["score_threshold"]),
                                 sec["match_iou"])
            row = {"image_id": img_ids[i], "file_name": ds.coco.imgs[img_ids[i]]["file_name"],
                   "n_gt": meta["n_gt"][j], "n_torch": r["n_base"], "n_jittor": r["n_cand"], "matched": r["matched"],
                   "mean_iou": r["mean_iou"], "min_iou": r["min_iou"], "max_score_diff": r["max_score_diff"],
                   "label_agreement": r["label_agreement"], "agreement": r["agreement"]}
            cw.writerow(row)
            rows.append({**row, "n_base": r["n_base"], "n_cand": r["n_cand"]})
        csv_fh.flush()

    try:
        try:
            write_model_case(case_dir, cfg, weights, winfo, stage="eval", seed=args.seed)
            del weights
            info = run_workers(backends, pythons, case_dir, batches(), os.path.join(out, "logs"), args, on_batch,
                               timeout=timeout)
        finally:
            shutil.rmtree(case_dir, ignore_errors=True)
        for w in writers.values():
            w.close()
        csv_fh.close()
        os.replace(csv_tmp, os.path.join(out, "per_image.csv"))
    except (WorkerError, DataError) as e:
        for w in writers.values():
            w.abort()
        csv_fh.close()
        if os.path.exists(csv_tmp):
            os.unlink(csv_tmp)
        mark_failed(out, "result.json", str(e), base_info, side=getattr(e, "backend", None),
                    phase=getattr(e, "phase", None))
        print(f"parity: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BaseException as e:
        for w in writers.values():
            w.abort()
        csv_fh.close()
        mark_failed(out, "result.json", f"{type(e).__name__}: {e}", base_info)
        raise

    # COCO metrics
    print("\nCOCO evaluation (pycocotools) ...", flush=True)
    metrics = {}
    for be in backends:
        try:
            metrics[be] = evaluate_file(ds.coco, os.path.join(out, f"detections_{be}.json"), img_ids)
        except DataError as e:
            mark_failed(out, "result.json", f"{be} detections: {e}", base_info, side=be)
            print(f"parity: error: {be} detections: {e}", file=sys.stderr)
            return EXIT_USAGE
    diffs = metric_diffs(metrics["torch"], metrics["jittor"], sec["max_ap_diff"])
    ag = summarize(rows)
    ap_ok = all(d["passed"] for d in diffs)
    ag_ok = ag.get("mean_agreement", 1.0) >= sec["min_mean_agreement"]
    raw_gate = gate.summary()
    passed = ap_ok and ag_ok and raw_gate["passed"]
    worst_rows = [{k: r[k] for k in CSV_FIELDS} for r in worst(rows, n_worst)]
    fth = th.get("forward", args.dtype, "outputs")
    raw_cmp = {k: {**v, "threshold_rel_l2": fth.rel_l2, "within_forward_threshold": v["rel_l2"] <= fth.rel_l2}
               for k, v in raw_err.items()}

    # print
    print(f"\n{'metric':<7} {'torch':>8} {'jittor':>8} {'diff':>9}   (limit +-{sec['max_ap_diff']:g})")
    for d in diffs:
        st = "skip (no GT)" if d["skipped"] else ("ok" if d["passed"] else "FAIL")
        print(f"{d['metric']:<7} {d['torch']:8.4f} {d['jittor']:8.4f} {d['diff']:+9.5f}   {st}")
    print(f"\nper image (detections >= {sec['score_threshold']:g}): mean agreement {ag['mean_agreement']:.4f}, "
          f"{ag['images_fully_agreeing']}/{ag['images']} images agree fully, mean IoU {ag['mean_iou']:.4f}, "
          f"max |dscore| {ag['max_score_diff']:.3g}, label agreement {ag['label_agreement']:.4f}")
    print(f"raw outputs (max over batches): pred_logits rel_l2 {raw_err['pred_logits']['rel_l2']:.3g}, "
          f"pred_boxes rel_l2 {raw_err['pred_boxes']['rel_l2']:.3g}")
    print(raw_gate_line(raw_gate))
    if ag["n_base"] == 0 and ag["n_cand"] == 0:
        print(f"note: no detection scores >= {sec['score_threshold']:g} on either side (untrained weights?): the "
              f"per-image agreement compares nothing; lower the threshold with --conf")
    if worst_rows and worst_rows[0]["agreement"] < 1.0:
        print("most disagreeing images:")
        for r in worst_rows:
            if r["agreement"] >= 1.0:
                break
            print(f"  {r['file_name']} (id {r['image_id']}): agreement {r['agreement']:.3f}, torch {r['n_torch']} / "
                  f"jittor {r['n_jittor']} detections, {r['matched']} matched, max |dscore| {r['max_score_diff']:.3g}")

    code = EXIT_OK if passed else EXIT_FAIL
    result = {
        "schema": 1, "status": "ok", "stage": "eval", "passed": passed, "exit_code": code,
        "config": cfg.name, "config_digest": cfg.digest(), "dtype": args.dtype,
        "device": args.device, "out": out,
        "data": {"root": os.path.abspath(root), "synthetic": synthetic, "split": split,
                 "ann_file": ds.ann_file, "images": n, "images_in_split": len(ds),
                 "categories": int(ds.num_classes)},
        "weights": winfo, "batch_size": bs, "thresholds": sec, "thresholds_file": th.path,
        "metrics": {be: dict(metrics[be]) for be in backends}, "diffs": diffs,
        "max_abs_ap_diff": max(abs(d["diff"]) for d in diffs),
        "agreement": ag, "mean_agreement": ag["mean_agreement"], "worst_images": worst_rows, "raw_outputs": raw_cmp,
        "raw_gate": raw_gate,
        "dropped_without_category": dropped,
        "workers": {be: {"versions": info[be]["ready"].get("versions"), "threads": info[be]["ready"].get("threads"),
                         "timing": info[be]["ready"].get("timing"),
                         "forward_seconds_total": float(sum(info[be]["seconds"])),
                         "forward_seconds_first": info[be]["seconds"][0] if info[be]["seconds"] else None,
                         "peak_rss_mb": info[be]["bye"].get("peak_rss_mb")} for be in backends},
        "files": ["detections_torch.json", "detections_jittor.json", "per_image.csv", "result.json", "summary.md"],
        "wall_s": time.perf_counter() - t_start,
    }
    write_text(os.path.join(out, "summary.md"), render_md(result))
    write_json(os.path.join(out, "result.json"), result)       # last: the verdict
    print(f"\n{'PASS' if passed else 'FAIL'}: max |AP diff| {max(abs(d['diff']) for d in diffs):.5f} "
          f"(limit {sec['max_ap_diff']:g}); raw outputs {'agree' if raw_gate['passed'] else 'DIFFER'}; results in {out}")
    return code


def raw_gate_line(g: Dict[str, Any]) -> str:
    """One line on the raw-output gate (printed and in summary.md)."""
    w = g["worst"]
    txt = (f"raw-output gate (forward thresholds, rel_l2 <= {g['threshold'].get('rel_l2'):g}): "
           f"{g['batches'] - g['failed_batches']}/{g['batches']} batches pass, worst pred_logits "
           f"{w['pred_logits']['rel_l2']:.3g}, pred_boxes {w['pred_boxes']['rel_l2']:.3g}")
    if g["tie_flips"]:
        f = g["flips"][0]
        txt += (f"; {g['tie_flips']} batch(es) with a top-k tie flip (compared after pairing queries), first: "
                f"batch {f['batch']}, {f['kind']} flip, score gap {f['score_gap']:.2g}")
    if g["reason"]:
        txt += f"; FAIL: {g['reason']}"
    return txt


def render_md(r: Dict[str, Any]) -> str:
    lines = [f"# Eval parity: {r['config']} ({r['dtype']}, {r['device']})", "",
             f"{r['data']['images']} images of {'the bundled synthetic ' if r['data']['synthetic'] else ''}"
             f"`{r['data']['split']}` (`{r['data']['ann_file']}`); weights: "
             + ("seeded init (untrained)" if r["weights"].get("source") == "seeded" else f"`{r['weights'].get('path')}`"),
             "", f"| metric | PyTorch | Jittor | diff | limit ±{r['thresholds']['max_ap_diff']:g} |", "|---|---:|---:|---:|---|"]
    for d in r["diffs"]:
        st = "n/a (no GT)" if d["skipped"] else ("ok" if d["passed"] else "**FAIL**")
        lines.append(f"| {d['metric']} | {d['torch']:.4f} | {d['jittor']:.4f} | {d['diff']:+.5f} | {st} |")
    ag = r["agreement"]
    lines += ["", f"Per image (detections ≥ {r['thresholds']['score_threshold']:g}, IoU ≥ "
                  f"{r['thresholds']['match_iou']:g}): mean agreement {ag['mean_agreement']:.4f}, "
                  f"{ag['images_fully_agreeing']}/{ag['images']} images agree fully, mean IoU {ag['mean_iou']:.4f}, "
                  f"max |Δscore| {ag['max_score_diff']:.3g}, label agreement {ag['label_agreement']:.4f}.", ""]
    bad = [w for w in r["worst_images"] if w["agreement"] < 1.0]
    if ag["n_base"] == 0 and ag["n_cand"] == 0:
        lines += [f"No detection scores ≥ {r['thresholds']['score_threshold']:g} on either side: the per-image "
                  "agreement compares nothing (use `--conf` with untrained weights).", ""]
    elif not bad:
        lines += ["No image disagrees.", ""]
    if bad:
        lines += ["Most disagreeing images:", "", "| image | id | torch | jittor | matched | agreement | max Δscore |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for w in bad:
            lines.append(f"| {w['file_name']} | {w['image_id']} | {w['n_torch']} | {w['n_jittor']} | {w['matched']} | "
                         f"{w['agreement']:.3f} | {w['max_score_diff']:.3g} |")
    lines += ["", f"Raw outputs, max over batches: pred_logits rel-L2 {r['raw_outputs']['pred_logits']['rel_l2']:.3g}, "
                  f"pred_boxes rel-L2 {r['raw_outputs']['pred_boxes']['rel_l2']:.3g}.", "",
              raw_gate_line(r["raw_gate"]) + ".", "",
              f"**{'PASS' if r['passed'] else 'FAIL'}**", ""]
    return "\n".join(lines)
