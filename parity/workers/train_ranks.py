"""The rank side of a data-parallel train worker (``--nproc N``): which rank this process
is, what it may write, joining the engine's world, its shard of each global batch and the
record of what it consumed (``ranks/rank<r>.json``).  Rank 0 writes the side's files; the
other ranks only read the case and checkpoints, and write their own rank file (and
``error.rank<r>.json`` on failure)."""
from __future__ import annotations

import os
import shutil
from typing import Any, List

from parity.case.shards import ShardError, shard_digest, shard_inputs
from parity.fileio import read_json, write_json
from parity.workers.common import EXIT_INPUT, WorkerFailure, launched_rank, peak_rss_mb


def error_path(side_dir: str, rank: int) -> str:
    """error.json (rank 0, or one process), error.rank<r>.json (the other ranks)."""
    return os.path.join(side_dir, "error.json" if rank == 0 else f"error.rank{rank}.json")


class Ranks:
    """Mixin of parity.workers.train.TrainWorker (uses its ``args``, ``dir``, ``adapter``,
    ``log``, ``iteration``, ``status``)."""

    def init_ranks(self, nproc: int) -> None:
        self.rank = launched_rank() if nproc > 1 else 0
        self.read_rank = self.rank
        self.writer = self.rank == 0
        self.shard_digests: List[List[Any]] = []      # [iteration, digest of the shard consumed]

    def rank_file(self) -> str:
        return os.path.join(self.dir, "ranks", f"rank{self.rank}.json")

    def remove(self, path: str) -> None:
        """Delete an earlier run's file or folder (rank 0 only: the other ranks never write
        the side's files)."""
        if not self.writer:
            return
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)

    def join_world(self, faults) -> None:
        """Rank ``self.rank`` of ``--nproc`` ranks (after the weights are loaded: DDP
        broadcasts rank 0's state when it wraps the model)."""
        self.status("world")
        world = self.adapter.data_parallel()
        if world.size != self.args.nproc or world.rank != self.rank:
            launcher = "torchrun" if self.args.backend == "torch" else "mpirun"
            raise WorkerFailure("world", EXIT_INPUT, f"--nproc {self.args.nproc} but this process is rank "
                                f"{world.rank} of {world.size} (start it under {launcher})")
        # fault dist:same-shard (tests): every rank reads rank 0's images
        if any(f.kind == "dist" and f.target == "same-shard" for f in faults):
            self.read_rank = 0
        self.log["nproc"] = world.size

    def shard(self, images, targets, dn):
        """This rank's images [B/N, 3, H, W], targets and dn draws of the global batch."""
        try:
            images, targets, dn = shard_inputs(images, targets, dn, self.args.nproc, self.read_rank)
        except ShardError as e:
            raise WorkerFailure("case", EXIT_INPUT, f"iteration {self.iteration}: {e}") from None
        self.shard_digests.append([self.iteration, shard_digest(images, targets, dn)])
        return images, targets, dn

    def write_rank_file(self) -> None:
        if self.args.nproc > 1:
            write_json(self.rank_file(), {"rank": self.rank, "world": self.args.nproc, "peak_rss_mb": peak_rss_mb(),
                                          "digests": self.shard_digests})

    def restore_rank_digests(self, upto: int) -> None:
        """On --resume: what this rank consumed before the checkpoint."""
        if self.args.nproc > 1 and os.path.isfile(self.rank_file()):
            self.shard_digests = [d for d in read_json(self.rank_file()).get("digests", []) if int(d[0]) <= upto]
