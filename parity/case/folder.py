"""A *case folder*: everything both sides of a parity run consume, written once by the runner.

Layout (every file written atomically; ``manifest.json`` last, so a case with a manifest is
complete)::

    <case>/config.json          RTDETRConfig.to_dict() (what the workers rebuild the model from)
    <case>/config.yaml          the same, for people
    <case>/weights.safetensors  every state_dict entry (spec order on read), float32 / int64
    <case>/inputs.npz           images [B,3,H,W] float32 RGB in [0,1]; target.<i>.labels int64 [n],
                                target.<i>.boxes [n,4] normalised cxcywh; orig_sizes int64 [B,2]
                                (h, w); image_ids int64 [B]; dataset indices int64 [B]
    <case>/dn_draws.npz         the shared denoising draws (rtdetr_core.denoising.draw_denoising),
                                absent when the batch gets no denoising (or for the forward stage)
    <case>/manifest.json        stage, config name + digest, seeds, batch, data and weights source,
                                sha256 of every file above, versions

The case is dtype-free: inputs and weights are float32 (exactly representable in float64);
each worker casts to the dtype it runs in.  ``load_case`` (used by the workers, in either
environment) checks the manifest's hashes and config digest before anything runs.
"""
from __future__ import annotations

import datetime
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import yaml

from parity.facts import runner_versions
from parity.fileio import read_json, sha256_file, write_bytes, write_json, write_npz, write_text


CASE_SCHEMA = 1
CASE_FILES = ("config.json", "config.yaml", "weights.safetensors", "inputs.npz", "dn_draws.npz")


class CaseError(ValueError):
    """A case cannot be built or read (bad data, weights, or a corrupted case folder)."""


# ----------------------------------------------------------------------------------------
# the batch (one swappable function)
# ----------------------------------------------------------------------------------------

class _Picked:
    """A dataset view holding the chosen indices, in order (the case's batch)."""

    def __init__(self, ds, indices):
        self.ds, self.indices = ds, [int(i) for i in indices]
        self.num_classes = getattr(ds, "num_classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.ds[self.indices[i]]


def _with_empty_image(ds, indices: np.ndarray) -> np.ndarray:
    """The seeded first batch; at batch >= 2 with no image lacking boxes, its last image is
    replaced by the split's first one without boxes, so that every default case has unequal
    box counts and one image without any (criterion, matcher and denoising edge cases)."""
    idx = np.asarray(indices, dtype=np.int64).copy()
    if len(idx) < 2:
        return idx
    counts = getattr(ds, "box_counts", None)
    counts = counts() if callable(counts) else None
    if counts is None or any(counts[i] == 0 for i in idx):
        return idx
    empty = [i for i, c in enumerate(counts) if c == 0]
    if empty:
        idx[-1] = empty[0]
    return idx


def make_batch(cfg, stage: str, batch_size: int, seed: int, data_root: Optional[str] = None
               ) -> Tuple[np.ndarray, List[Dict[str, np.ndarray]], Optional[Dict[str, np.ndarray]], Dict[str, Any]]:
    """First batch of epoch 0 of a COCO-layout dataset (default: the bundled synthetic set),
    seeded order, resized to ``cfg.train.image_size``; dn draws from the ``denoise`` stream
    for the grad stage (``None`` for forward, or when the batch has no boxes).

    Returns ``(images, targets, dn_draws, meta)``."""
    from rtdetr_core.data import DataError, iterate_batches, open_split, resolve_data
    from rtdetr_core.data.loader import epoch_order

    synthetic = data_root is None
    try:
        root = resolve_data(data_root)
        split = "val" if stage == "forward" else "train"
        try:
            ds = open_split(root, split, tuple(cfg.train.image_size))
        except DataError:
            other = "train" if split == "val" else "val"
            try:
                ds = open_split(root, other, tuple(cfg.train.image_size))
            except DataError:
                ds = None
            if ds is None:
                raise
            split = other
        if len(ds) < batch_size:
            raise CaseError(f"{root}: the {split} split has {len(ds)} images, fewer than --batch-size {batch_size}")
        num_dn = cfg.decoder.num_denoising if stage == "grad" else 0
        picked = _with_empty_image(ds, epoch_order(len(ds), seed, 0, shuffle=True)[:batch_size])
        it = iterate_batches(_Picked(ds, picked), batch_size, seed=seed, epoch=0, shuffle=False,
                             num_denoising=num_dn, num_classes=cfg.num_classes)
        images, targets, meta = next(iter(it))
        meta["indices"] = picked
    except DataError as e:
        raise CaseError(f"data: {e}") from None
    max_label = max((int(t["labels"].max()) for t in targets if len(t["labels"])), default=-1)
    if max_label >= cfg.num_classes:
        raise CaseError(f"data: {root} has label {max_label}, the config '{cfg.name}' only "
                        f"{cfg.num_classes} classes")
    tg = [{"labels": np.asarray(t["labels"], dtype=np.int64).reshape(-1),
           "boxes": np.asarray(t["boxes"], dtype=np.float32).reshape(-1, 4)} for t in targets]
    info = {"root": os.path.abspath(root), "synthetic": synthetic, "split": split,
            "indices": [int(i) for i in meta["indices"]], "image_ids": [int(i) for i in meta["image_ids"]],
            "orig_sizes": meta["orig_sizes"].tolist(), "num_boxes": [len(t["labels"]) for t in tg],
            "image_size": list(images.shape[2:])}
    if batch_size >= 2:
        info["empty_image"] = "the last image is the split's first image without boxes (a hard case: no " \
                              "targets, no denoising queries of its own)" if any(n == 0 for n in info["num_boxes"]) \
                              else "the split has no image without boxes"
    return np.ascontiguousarray(images, dtype=np.float32), tg, meta["dn_draws"], info


# ----------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------

def make_weights(cfg, seed: int, weights_path: Optional[str] = None) -> Tuple["OrderedDict[str, np.ndarray]", Dict[str, Any]]:
    """Seeded weights (``rtdetr_core.init.seeded_weights(cfg, seed)``) or a weights file read
    and validated against the config (``weights_convert.read_weights``)."""
    if weights_path is None:
        from rtdetr_core.init import seeded_weights
        return seeded_weights(cfg, seed), {"source": "seeded", "seed": int(seed)}
    try:
        from weights_convert import read_weights
        from weights_convert.errors import WeightsError
    except ImportError as e:      # pragma: no cover - the weights helper is part of the project
        raise CaseError(f"weights: cannot import weights_convert ({e})") from None
    try:
        w, info = read_weights(weights_path, cfg)
    except WeightsError as e:
        raise CaseError(f"weights: {e}") from None
    except OSError as e:
        raise CaseError(f"weights: {weights_path}: {e.strerror or e}") from None
    bad = [k for k, v in w.items() if v.dtype.kind == "f" and not np.all(np.isfinite(v))]
    if bad:
        raise CaseError(f"weights: {weights_path}: {len(bad)} tensor(s) hold NaN/inf, e.g. {bad[0]}")
    return w, {"source": "file", "path": os.path.abspath(weights_path), "format": info.get("format"),
               "sha256": sha256_file(weights_path)}


def save_weights(path: str, weights: "OrderedDict[str, np.ndarray]", digest: str) -> None:
    from safetensors.numpy import save
    data = save({k: np.ascontiguousarray(v) for k, v in weights.items()},
                metadata={"config_digest": digest, "written_by": "parity.case"})
    write_bytes(path, data)


def write_config_and_weights(case_dir: str, cfg, weights: "OrderedDict[str, np.ndarray]") -> None:
    """``config.json`` (what the workers read), ``config.yaml`` (for people) and
    ``weights.safetensors`` (stamped with the config digest) into ``case_dir``."""
    cd, digest = cfg.to_dict(), cfg.digest()
    write_json(os.path.join(case_dir, "config.json"), cd)
    write_text(os.path.join(case_dir, "config.yaml"),
               f"# config '{cfg.name}', digest {digest} (generated; the workers read config.json)\n"
               + yaml.safe_dump(cd, sort_keys=False))
    save_weights(os.path.join(case_dir, "weights.safetensors"), weights, digest)


def read_case_weights(path: str, cfg) -> "OrderedDict[str, np.ndarray]":
    """Read the case's weights in spec order (strict: names, shapes, dtypes)."""
    from rtdetr_core.param_spec import param_spec
    from safetensors.numpy import load_file
    try:
        raw = load_file(path)
    except Exception as e:  # safetensors raises its own error types
        raise CaseError(f"{path}: cannot read case weights ({' '.join(str(e).split())[:200]})") from None
    spec = param_spec(cfg)
    for e in spec:      # safetensors may hand 0-d tensors back as shape [1]
        a = raw.get(e.name)
        if a is not None and tuple(a.shape) != e.shape and a.size == 1 and e.shape == ():
            raw[e.name] = a.reshape(())
    missing = [e.name for e in spec if e.name not in raw]
    extra = sorted(set(raw) - {e.name for e in spec})
    bad = [e.name for e in spec if e.name in raw and tuple(raw[e.name].shape) != e.shape]
    if missing or extra or bad:
        raise CaseError(f"{path}: case weights do not match config '{cfg.name}': "
                        f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected "
                        f"(e.g. {extra[:2]}), {len(bad)} with other shapes (e.g. {bad[:2]})")
    return OrderedDict((e.name, raw[e.name]) for e in spec)


# ----------------------------------------------------------------------------------------
# build / load
# ----------------------------------------------------------------------------------------

def build_case(case_dir: str, cfg, *, stage: str, batch_size: int, seed: int,
               data_root: Optional[str] = None, weights_path: Optional[str] = None) -> Dict[str, Any]:
    """Write a complete case folder; return its manifest.  Raises :class:`CaseError`."""
    os.makedirs(case_dir, exist_ok=True)
    mpath = os.path.join(case_dir, "manifest.json")
    if os.path.exists(mpath):
        os.unlink(mpath)           # an unfinished rebuild must not look complete
    digest = cfg.digest()
    weights, winfo = make_weights(cfg, seed, weights_path)
    images, targets, dn, dinfo = make_batch(cfg, stage, batch_size, seed, data_root)

    write_config_and_weights(case_dir, cfg, weights)
    arrays: Dict[str, np.ndarray] = {"images": images,
                                     "orig_sizes": np.asarray(dinfo["orig_sizes"], dtype=np.int64),
                                     "image_ids": np.asarray(dinfo["image_ids"], dtype=np.int64),
                                     "indices": np.asarray(dinfo["indices"], dtype=np.int64)}
    for i, t in enumerate(targets):
        arrays[f"target.{i}.labels"] = t["labels"]
        arrays[f"target.{i}.boxes"] = t["boxes"]
    write_npz(os.path.join(case_dir, "inputs.npz"), arrays)
    dn_file = os.path.join(case_dir, "dn_draws.npz")
    if dn is not None:
        write_npz(dn_file, dn)
    elif os.path.exists(dn_file):
        os.unlink(dn_file)

    files = {f: sha256_file(os.path.join(case_dir, f)) for f in CASE_FILES
             if os.path.exists(os.path.join(case_dir, f))}
    manifest = {
        "schema": CASE_SCHEMA,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "stage": stage,
        "config": cfg.name,
        "config_digest": digest,
        "seed": int(seed),
        "batch_size": int(batch_size),
        "image_size": list(images.shape[2:]),
        "data": dinfo,
        "weights": winfo,
        "dn_draws": dn is not None,
        "files": files,
        "versions": runner_versions(),
    }
    write_json(mpath, manifest)
    return manifest


class Case:
    """A loaded case folder (what a worker needs)."""

    def __init__(self, case_dir: str, verify: bool = True):
        from rtdetr_core.config import ConfigError, config_from_dict
        self.dir = case_dir
        mpath = os.path.join(case_dir, "manifest.json")
        if not os.path.isfile(mpath):
            raise CaseError(f"{case_dir}: not a complete case folder (no manifest.json)")
        try:
            self.manifest = read_json(mpath)
        except ValueError as e:
            raise CaseError(f"{mpath}: not valid JSON ({e})") from None
        if self.manifest.get("schema") != CASE_SCHEMA:
            raise CaseError(f"{mpath}: case schema {self.manifest.get('schema')}, this harness reads {CASE_SCHEMA}")
        if verify:
            for name, want in self.manifest["files"].items():
                p = os.path.join(case_dir, name)
                if not os.path.isfile(p):
                    raise CaseError(f"{p}: case file missing")
                got = sha256_file(p)
                if got != want:
                    raise CaseError(f"{p}: case file corrupted (sha256 {got[:12]} != manifest {want[:12]})")
        self.config_dict = read_json(os.path.join(case_dir, "config.json"))
        try:
            self.cfg = config_from_dict(self.config_dict, src=os.path.join(case_dir, "config.json"))
        except ConfigError as e:
            raise CaseError(f"config: {e}") from None

    @property
    def digest(self) -> str:
        return self.manifest["config_digest"]

    def weights(self) -> "OrderedDict[str, np.ndarray]":
        return read_case_weights(os.path.join(self.dir, "weights.safetensors"), self.cfg)

    def inputs(self) -> Tuple[np.ndarray, List[Dict[str, np.ndarray]]]:
        with np.load(os.path.join(self.dir, "inputs.npz"), allow_pickle=False) as z:
            images = z["images"]
            b = images.shape[0]
            targets = [{"labels": z[f"target.{i}.labels"], "boxes": z[f"target.{i}.boxes"]} for i in range(b)]
        return images, targets

    def dn_draws(self) -> Optional[Dict[str, np.ndarray]]:
        if not self.manifest.get("dn_draws"):
            return None
        with np.load(os.path.join(self.dir, "dn_draws.npz"), allow_pickle=False) as z:
            return {k: z[k] for k in z.files if k != "__meta__"}
