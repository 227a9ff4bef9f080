"""The streaming half of ``parity run --stage eval`` (parity/commands/eval.py): every batch is
read once and written for the workers (``batches``); each pair of answers (``on_batch``)
is turned into COCO results appended to ``detections_<backend>.json``, per-image agreement
appended to ``per_image.csv``, and the raw outputs judged against the forward bound, then
dropped: memory stays flat over the split."""
from __future__ import annotations

import csv
import os
from typing import Any, Dict, List

import numpy as np

from parity.fileio import JsonArrayWriter, write_npz
from parity.judge.coco import coco_results
from parity.judge.compare import tensor_errors
from parity.judge.detmatch import filter_dets, match_detections
from parity.judge.outputs_match import OutputsGate, selection_of

CSV_FIELDS = ("image_id", "file_name", "n_gt", "n_torch", "n_jittor", "matched", "mean_iou", "min_iou",
              "max_score_diff", "label_agreement", "agreement")
RAW_KEYS = ("pred_logits", "pred_boxes")
DET_KEYS = ("scores", "labels", "boxes")
TOPK_KEYS = ("topk_index", "topk_scores")                # the encoder token behind each query


class EvalStream:
    def __init__(self, out: str, case_dir: str, ds, n: int, bs: int, img_ids: List[int], backends, sec: Dict[str, Any],
                 outputs_threshold):
        self.out, self.case_dir, self.ds, self.n, self.bs, self.img_ids = out, case_dir, ds, n, bs, img_ids
        self.sec = sec
        self.lut = np.asarray(ds.label_to_category, dtype=np.int64)
        self.writers = {be: JsonArrayWriter(os.path.join(out, f"detections_{be}.json")) for be in backends}
        self.csv_tmp = os.path.join(out, "per_image.csv.partial")
        self.csv_fh = open(self.csv_tmp, "w", newline="", encoding="utf-8")
        self.cw = csv.DictWriter(self.csv_fh, fieldnames=CSV_FIELDS)
        self.cw.writeheader()
        self.rows: List[Dict[str, Any]] = []
        self.dropped = {be: 0 for be in backends}
        self.raw_err = {k: {"rel_l2": 0.0, "max_abs": 0.0} for k in RAW_KEYS}
        # judged batch by batch as it streams by: only the worst error and the failures are kept
        self.gate = OutputsGate(outputs_threshold, int(sec["max_tie_rows"]))
        self.batch_meta: Dict[int, Dict[str, Any]] = {}

    def batches(self):
        """``(k, batch npz, images in it, total)`` for the workers, read once here."""
        for k, s in enumerate(range(0, self.n, self.bs)):
            idx = list(range(s, min(s + self.bs, self.n)))
            ims, sizes, ngt = [], [], []
            for i in idx:
                im, tg = self.ds[i]
                ims.append(im)
                sizes.append(tg["orig_size"])
                ngt.append(len(tg["labels"]))
            p = os.path.join(self.case_dir, f"batch_{k:06d}.npz")
            write_npz(p, {"images": np.stack(ims).astype(np.float32, copy=False),
                          "orig_sizes": np.asarray(sizes, dtype=np.int64)})
            self.batch_meta[k] = {"indices": idx, "n_gt": ngt}
            yield k, p, len(idx), self.n

    def on_batch(self, k: int, outs: Dict[str, str]) -> None:
        meta = self.batch_meta.pop(k)
        idx = meta["indices"]
        ids = [self.img_ids[i] for i in idx]
        res = {}
        for be, p in outs.items():
            with np.load(p, allow_pickle=False) as z:
                res[be] = {key: z[key] for key in RAW_KEYS + DET_KEYS + TOPK_KEYS}
            results, d = coco_results(res[be], ids, self.lut)
            self.dropped[be] += d
            self.writers[be].extend(results)
        self.gate.add(k, {key: res["jittor"][key] for key in RAW_KEYS}, {key: res["torch"][key] for key in RAW_KEYS},
                      tuple(selection_of(res[be]) for be in ("jittor", "torch")))
        for key in self.raw_err:
            e = tensor_errors(res["jittor"][key], res["torch"][key])
            self.raw_err[key]["rel_l2"] = max(self.raw_err[key]["rel_l2"], float(e["rel_l2"]))
            self.raw_err[key]["max_abs"] = max(self.raw_err[key]["max_abs"], float(e["max_abs"]))
        for j, i in enumerate(idx):
            self._image_row(res, meta, j, i)
        self.csv_fh.flush()

    def _image_row(self, res, meta, j: int, i: int) -> None:
        sec, img_id = self.sec, self.img_ids[i]
        b = {key: res["torch"][key][j] for key in DET_KEYS}
        c = {key: res["jittor"][key][j] for key in DET_KEYS}
        # every detection of the model is compared (also labels without a dataset category:
        # they are not evaluated, but they are still the backends' outputs)
        r = match_detections(filter_dets(b, sec["score_threshold"]), filter_dets(c, sec["score_threshold"]),
                             sec["match_iou"])
        row = {"image_id": img_id, "file_name": self.ds.coco.imgs[img_id]["file_name"],
               "n_gt": meta["n_gt"][j], "n_torch": r["n_base"], "n_jittor": r["n_cand"], "matched": r["matched"],
               "mean_iou": r["mean_iou"], "min_iou": r["min_iou"], "max_score_diff": r["max_score_diff"],
               "label_agreement": r["label_agreement"], "agreement": r["agreement"]}
        self.cw.writerow(row)
        self.rows.append({**row, "n_base": r["n_base"], "n_cand": r["n_cand"]})

    def close(self) -> None:
        """Every file complete: the detections renamed into place, then per_image.csv."""
        for w in self.writers.values():
            w.close()
        self.csv_fh.close()
        os.replace(self.csv_tmp, os.path.join(self.out, "per_image.csv"))

    def abort(self, remove_csv: bool = True) -> None:
        for w in self.writers.values():
            w.abort()
        self.csv_fh.close()
        if remove_csv and os.path.exists(self.csv_tmp):
            os.unlink(self.csv_tmp)
