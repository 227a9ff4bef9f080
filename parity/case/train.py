"""The case of ``parity run --stage train`` (see parity/commands/train.py): the decoded data
(``data.npz``), the initial weights, the config, and every epoch's shared streams (image order,
denoising draws, multi-scale sizes) drawn once from ``rtdetr_core``, with their hashes."""
from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from rtdetr_core.data import DataError, open_split, resolve_data

from parity.case.folder import CaseError, make_weights, write_config_and_weights
from parity.errors import RunError
from parity.facts import runner_versions
from parity.fileio import read_npz_meta, sha256_file, write_json, write_npz


TRAIN_SCHEMA = 1
CASE_FILES_FIXED = ("config.json", "config.yaml", "weights.safetensors", "data.npz")


class _Items:
    """Decoded items as a dataset for ``rtdetr_core.data.iterate_batches``."""

    def __init__(self, images: np.ndarray, targets: List[Dict[str, Any]]):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


def load_split(root: str, split: str, image_size, limit: Optional[int]):
    """(dataset, images [N,3,H,W] float32, targets) of the first ``limit`` images."""
    try:
        ds = open_split(root, split, tuple(image_size))
    except DataError as e:
        raise RunError(f"data: {e}", cause="data") from None
    n = len(ds) if limit is None else min(int(limit), len(ds))
    if n < 1:
        raise RunError(f"data: the {split} split of {root} has no images", cause="data")
    items = [ds[i] for i in range(n)]
    images = np.ascontiguousarray(np.stack([it[0] for it in items]), dtype=np.float32)
    targets = [it[1] for it in items]
    return ds, images, targets


def generate_streams(cfg, items: _Items, batch_size: int, seed: int, epochs: int) -> List[Dict[str, Any]]:
    """Every epoch's order and draws, from ONE ``Streams(seed)`` continued across epochs (as
    ``BatchLoader`` does): epoch e's draws do not depend on the total number of epochs."""
    from rtdetr_core.data import iterate_batches
    from rtdetr_core.rng import Streams, epoch_order

    st = Streams(seed)
    out = []
    for e in range(1, epochs + 1):
        before = st.state()
        its = []
        for images, targets, meta in iterate_batches(items, batch_size, seed=seed, epoch=e - 1, shuffle=True,
                                                     drop_last=False, multi_scale=cfg.train.multi_scale, streams=st,
                                                     num_denoising=cfg.decoder.num_denoising,
                                                     num_classes=cfg.num_classes):
            tg = [{"labels": np.asarray(t["labels"], dtype=np.int64), "boxes": np.asarray(t["boxes"], dtype=np.float32)}
                  for t in targets]
            its.append({"indices": np.asarray(meta["indices"], dtype=np.int64), "dn_draws": meta["dn_draws"],
                        "multi_scale_size": meta["multi_scale_size"],
                        "batch": batch_digest(images, tg, meta["dn_draws"], meta["multi_scale_size"])})
        out.append({"epoch": e, "order": epoch_order(len(items), seed, e - 1), "iterations": its,
                    "state_before": before, "state_after": st.state()})
    return out


def write_epoch_streams(path: str, ep: Dict[str, Any]) -> None:
    arrays: Dict[str, np.ndarray] = {"order": ep["order"]}
    for k, it in enumerate(ep["iterations"]):
        arrays[f"it{k}.indices"] = it["indices"]
        arrays[f"it{k}.ms"] = np.asarray(-1 if it["multi_scale_size"] is None else it["multi_scale_size"], dtype=np.int64)
        if it["dn_draws"] is not None:
            for key, v in it["dn_draws"].items():
                arrays[f"it{k}.dn.{key}"] = np.asarray(v)
    meta = {"epoch": ep["epoch"], "iterations": len(ep["iterations"]), "state_before": ep["state_before"],
            "state_after": ep["state_after"], "batch": [it["batch"] for it in ep["iterations"]]}
    write_npz(path, arrays, meta)


def build_train_case(case_dir: str, cfg, *, seed: int, data_root: Optional[str], weights_path: Optional[str],
                     plan: Dict[str, Any], limit_images: Optional[int], limit_val: Optional[int]) -> Dict[str, Any]:
    os.makedirs(case_dir, exist_ok=True)
    mpath = os.path.join(case_dir, "manifest.json")
    if os.path.exists(mpath):
        os.unlink(mpath)
    try:
        weights, winfo = make_weights(cfg, seed, weights_path)
    except CaseError as e:
        raise RunError(str(e), side="case", cause="weights") from None
    synthetic = data_root is None
    try:
        root = resolve_data(data_root)
    except DataError as e:
        raise RunError(f"data: {e}", cause="data") from None
    tr_ds, tr_images, tr_targets = load_split(root, "train", cfg.train.image_size, limit_images)
    va_ds, va_images, va_targets = load_split(root, "val", cfg.train.image_size, limit_val)
    max_label = max((int(t["labels"].max()) for t in tr_targets if len(t["labels"])), default=-1)
    if max_label >= cfg.num_classes:
        raise RunError(f"data: {root} has label {max_label}, the config '{cfg.name}' only {cfg.num_classes} classes",
                       cause="data")
    bs = cfg.train.batch_size
    if len(tr_images) < bs:
        raise RunError(f"data: {len(tr_images)} train images, fewer than the batch size {bs}", cause="data")

    arrays: Dict[str, np.ndarray] = {"train.images": tr_images,
                                     "train.image_ids": np.asarray([t["image_id"] for t in tr_targets], dtype=np.int64),
                                     "val.images": va_images,
                                     "val.image_ids": np.asarray([t["image_id"] for t in va_targets], dtype=np.int64),
                                     "val.orig_sizes": np.stack([np.asarray(t["orig_size"], dtype=np.int64)
                                                                 for t in va_targets]),
                                     "label_to_category": np.asarray(va_ds.label_to_category, dtype=np.int64)}
    for i, t in enumerate(tr_targets):
        arrays[f"train.{i}.labels"] = np.asarray(t["labels"], dtype=np.int64).reshape(-1)
        arrays[f"train.{i}.boxes"] = np.asarray(t["boxes"], dtype=np.float32).reshape(-1, 4)
    dinfo = {"root": os.path.abspath(root), "synthetic": synthetic, "n_train": len(tr_images),
             "n_train_total": len(tr_ds), "n_val": len(va_images), "n_val_total": len(va_ds),
             "val_ann_file": os.path.abspath(va_ds.ann_file), "train_ann_file": os.path.abspath(tr_ds.ann_file),
             "num_boxes_train": int(sum(len(t["labels"]) for t in tr_targets)),
             "num_boxes_val": int(sum(len(t["labels"]) for t in va_targets)),
             "image_size": list(cfg.train.image_size)}
    write_npz(os.path.join(case_dir, "data.npz"), arrays, dict(dinfo, n_train=len(tr_images), n_val=len(va_images)))

    digest = cfg.digest()
    write_config_and_weights(case_dir, cfg, weights)
    plan = dict(plan, n_train=len(tr_images), n_val=len(va_images),
                iterations_per_epoch=-(-len(tr_images) // bs))
    manifest = {"schema": TRAIN_SCHEMA, "stage": "train",
                "created": datetime.datetime.now().isoformat(timespec="seconds"),
                "config": cfg.name, "config_digest": digest, "seed": int(seed), "plan": plan, "data": dinfo,
                "weights": winfo, "versions": runner_versions(), "files": {}, "streams": {}}
    write_streams(case_dir, cfg, manifest, tr_images, tr_targets)
    return manifest


def write_streams(case_dir: str, cfg, manifest: Dict[str, Any], tr_images=None, tr_targets=None,
                   verify_existing: bool = False) -> None:
    """(Re)generate the streams of every planned epoch; existing epoch files must be identical
    (resume / extension), new ones are written; then the manifest (last)."""
    plan = manifest["plan"]
    if tr_images is None:
        d = load_data(case_dir)
        tr_images, tr_targets = d["train_images"], d["train_targets"]
    eps = generate_streams(cfg, _Items(tr_images, tr_targets), cfg.train.batch_size, manifest["seed"], plan["epochs"])
    os.makedirs(os.path.join(case_dir, "streams"), exist_ok=True)
    files = {}
    for ep in eps:
        p = epoch_file(case_dir, ep["epoch"])
        rel = os.path.relpath(p, case_dir)
        if verify_existing and os.path.isfile(p):
            with np.load(p, allow_pickle=False) as z:
                old = read_npz_meta(z)
            if old.get("batch") != [it["batch"] for it in ep["iterations"]] or old.get("state_after") != ep["state_after"]:
                raise RunError(f"--resume: {p} differs from the streams regenerated from seed {manifest['seed']} "
                               f"(the case was built by another rtdetr_core?)", side="case", cause="streams")
        else:
            write_epoch_streams(p, ep)
        files[rel] = sha256_file(p)
    manifest["streams"] = {"epochs": len(eps), "batch_digests": {str(ep["epoch"]): [it["batch"] for it in ep["iterations"]]
                                                                for ep in eps},
                           "dn_batches": sum(1 for ep in eps for it in ep["iterations"] if it["dn_draws"] is not None),
                           "multi_scale": cfg.train.multi_scale}
    manifest["files"] = {f: sha256_file(os.path.join(case_dir, f)) for f in CASE_FILES_FIXED}
    manifest["files"].update(files)
    write_json(os.path.join(case_dir, "manifest.json"), manifest)


# ----------------------------------------------------------------------------------------
# reading the case (the train workers and the runner)
# ----------------------------------------------------------------------------------------

def epoch_file(case_dir: str, epoch: int) -> str:
    return os.path.join(case_dir, "streams", f"epoch_{epoch:04d}.npz")


def batch_digest(images: np.ndarray, targets: Sequence[Dict[str, np.ndarray]], dn: Optional[Dict[str, np.ndarray]],
                 ms: Optional[int]) -> str:
    """sha1 of everything one iteration consumes (images as float32, labels, boxes, dn draws,
    multi-scale size): equal digests on both sides = identical inputs."""
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    for t in targets:
        h.update(np.ascontiguousarray(t["labels"], dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(t["boxes"], dtype=np.float32).tobytes())
    if dn is not None:
        for k in sorted(dn):
            h.update(k.encode())
            h.update(np.ascontiguousarray(dn[k]).tobytes())
    h.update(repr(ms).encode())
    return h.hexdigest()[:16]


def read_epoch_streams(path: str) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """``(meta, iterations)``; each iteration ``{"indices", "dn_draws" (dict | None), "multi_scale_size"}``."""
    with np.load(path, allow_pickle=False) as z:
        meta = read_npz_meta(z)
        its = []
        for k in range(int(meta["iterations"])):
            dn_keys = [f for f in z.files if f.startswith(f"it{k}.dn.")]
            dn = {f[len(f"it{k}.dn."):]: z[f] for f in dn_keys} if dn_keys else None
            ms = int(np.asarray(z[f"it{k}.ms"]).reshape(-1)[0])
            its.append({"indices": z[f"it{k}.indices"], "dn_draws": dn, "multi_scale_size": None if ms < 0 else ms})
    return meta, its


def load_data(case_dir: str) -> Dict[str, Any]:
    """The decoded images and targets of ``data.npz``."""
    with np.load(os.path.join(case_dir, "data.npz"), allow_pickle=False) as z:
        meta = read_npz_meta(z)
        d = {"train_images": z["train.images"],
             "train_targets": [{"labels": z[f"train.{i}.labels"], "boxes": z[f"train.{i}.boxes"]}
                               for i in range(int(meta["n_train"]))],
             "train_ids": z["train.image_ids"],
             "val_images": z["val.images"], "val_orig_sizes": z["val.orig_sizes"], "val_ids": z["val.image_ids"],
             "meta": meta}
    return d
