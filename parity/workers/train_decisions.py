"""The train worker's discrete decisions: logged every iteration, taken from another side on
request, and probed with their evidence at one iteration.

RT-DETR's training step makes two kinds of discrete choice: the encoder's top-k query
selection and one Hungarian assignment per loss call.  Two correct float32 programs can resolve
a near-tie differently, and from then on their trajectories differ by more than arithmetic
noise.  So that the runner can tell such a tie from a bug (parity/commands/train_ties.py), each
side keeps what it chose:

``decisions/epoch_NNNN.rank<r>.npz`` (every rank, its own shard), keys per iteration ``it``::

    <it>/topk_index            int64 [b, Q]   encoder token of each query
    <it>/match/<call>/<img>    int64 [2, n]   (query, target) pairs of that loss call

``--follow FILE``: an npz with the same keys prefixed ``r<rank>/``: at those iterations this
side takes the given top-k and assignments instead of its own (the runner writes it from the
base side's decisions after classifying a tie).

``--probe-at IT --probe-out DIR``: train up to iteration IT - 1 without evaluations or
checkpoints, then run iteration IT's forward and loss once with the decision evidence
recorded (encoder scores [b, S], matching costs [b, Q, T]) into ``DIR/rank<r>.npz``, and stop.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from parity.fileio import write_npz
from parity.workers.common import EXIT_INPUT, WorkerFailure

# what a probe records besides the evidence: the top-k index itself
PROBE_CAPTURE = ("decoder.enc_topk_index",)


def flatten(prefix: str, decisions: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """{"topk_index": [b, Q], "matches": {call: [[2, n] per image]}} -> flat npz keys."""
    out = {f"{prefix}topk_index": np.asarray(decisions["topk_index"], dtype=np.int64)}
    for call, per_image in decisions["matches"].items():
        for i, m in enumerate(per_image):
            out[f"{prefix}match/{call}/{i}"] = np.asarray(m, dtype=np.int64).reshape(2, -1)
    return out


def unflatten(arrays: Mapping[str, np.ndarray], prefix: str) -> Optional[Dict[str, Any]]:
    """The inverse of :func:`flatten` for one prefix (None when it holds nothing)."""
    keys = [k for k in arrays if k.startswith(prefix)]
    if not keys:
        return None
    matches: "OrderedDict[str, List[Tuple[int, np.ndarray]]]" = OrderedDict()
    for k in keys:
        rest = k[len(prefix):]
        if rest.startswith("match/"):
            call, img = rest[len("match/"):].rsplit("/", 1)
            matches.setdefault(call, []).append((int(img), np.asarray(arrays[k])))
    return {"topk_index": np.asarray(arrays[prefix + "topk_index"]) if prefix + "topk_index" in arrays else None,
            "matches": OrderedDict((c, [m for _, m in sorted(v, key=lambda t: t[0])]) for c, v in matches.items())}


def decisions_file(side_dir: str, epoch: int, rank: int) -> str:
    return os.path.join(side_dir, "decisions", f"epoch_{epoch:04d}.rank{rank}.npz")


class DecisionLog:
    """Mixin of parity.workers.train.TrainWorker (uses its ``args``, ``dir``, ``rank``,
    ``adapter``)."""

    def init_decisions(self) -> None:
        self.epoch_decisions: Dict[str, np.ndarray] = {}
        self.follow: Dict[str, np.ndarray] = {}
        path = getattr(self.args, "follow", None)
        if path:
            try:
                with np.load(path, allow_pickle=False) as z:
                    self.follow = {k: z[k] for k in z.files}
            except (OSError, ValueError) as e:
                raise WorkerFailure("case", EXIT_INPUT, f"--follow {path}: {e}") from None

    def keep_decisions(self, iteration: int, decisions: Optional[Mapping[str, Any]]) -> None:
        if decisions is not None:
            self.epoch_decisions.update(flatten(f"{iteration}/", decisions))

    def write_decisions(self, epoch: int) -> None:
        """This rank's decisions of the epoch (also a partial one, stopped by a non-finite value)."""
        write_npz(decisions_file(self.dir, epoch, self.rank), self.epoch_decisions)
        self.epoch_decisions = {}

    def forced(self, iteration: int) -> Tuple[Optional[np.ndarray], Optional[Dict[str, List[np.ndarray]]]]:
        """(topk_index, matches) this rank must take at ``iteration`` (--follow), else (None, None)."""
        d = unflatten(self.follow, f"r{self.rank}/{iteration}/") if self.follow else None
        if d is None:
            return None, None
        return d["topk_index"], (d["matches"] or None)

    def probe(self, images, targets, dn, ms, forced_topk, forced_matches) -> None:
        """Iteration --probe-at: its forward + loss with the decision evidence, into the probe folder."""
        res = self.adapter.loss(images, targets, dn, matches=forced_matches, topk_index=forced_topk,
                                capture=PROBE_CAPTURE, multi_scale_size=ms)
        own = {"topk_index": res["intermediates"][PROBE_CAPTURE[0]], "matches": res["matches"]}
        arrays = flatten("own/", own)
        arrays.update({f"evidence/{k}": np.asarray(v) for k, v in res["decisions"].items()})
        write_npz(os.path.join(self.args.probe_out, f"rank{self.rank}.npz"), arrays,
                  meta={"iteration": int(self.iteration), "side": self.args.side, "dtype": self.args.dtype,
                        "total": float(res["total"])})
