"""A model-only case folder for the serving workers of ``parity detect``, ``parity run
--stage eval`` and ``parity bench``: config + weights, the inputs travel per request."""
from __future__ import annotations

import datetime
import os
from typing import Any, Dict, Optional

from parity.case.folder import CASE_SCHEMA, write_config_and_weights
from parity.facts import runner_versions
from parity.fileio import sha256_file, write_json

SEEDED_NOTE = "seeded init (untrained weights): detections are meaningless, only their agreement counts"


def write_model_case(case_dir: str, cfg, weights, winfo: Dict[str, Any], *, stage: str, seed: int,
                     extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A case folder (``parity/case/folder.py`` layout and manifest schema) holding only
    ``config.json``, ``config.yaml`` and ``weights.safetensors``: what a serving worker
    needs to build the model (``Case(dir)`` checks the hashes and the config digest)."""
    os.makedirs(case_dir, exist_ok=True)
    mpath = os.path.join(case_dir, "manifest.json")
    if os.path.exists(mpath):
        os.unlink(mpath)
    digest = cfg.digest()
    write_config_and_weights(case_dir, cfg, weights)
    files = {f: sha256_file(os.path.join(case_dir, f)) for f in ("config.json", "config.yaml", "weights.safetensors")}
    manifest = {"schema": CASE_SCHEMA, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                "stage": stage, "config": cfg.name, "config_digest": digest, "seed": int(seed),
                "weights": winfo, "dn_draws": False, "files": files, "versions": runner_versions(),
                **(extra or {})}
    write_json(mpath, manifest)
    return manifest
