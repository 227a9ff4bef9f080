"""Data parallelism on Jittor's MPI (``mpirun -np N``), with the official training's rules:
SyncBN, ``num_boxes`` all-reduced, gradients averaged (mirror of
backends/torch_impl/distributed.py).

Jittor reads the MPI world at import (``jt.in_mpi``, ``jt.rank``, ``jt.world_size``); its
collectives are Var methods (``mpi_all_reduce("add"|"mean")``, ``mpi_broadcast``), each with
its own gradient.  Jittor's optimiser averages gradients with ``mpi_all_reduce("mean")``
after ``jt.grad``; this backend computes its gradients itself (adapter ``_grads``) and does
the same there (``average_gradients``).

* ``World``: this process's rank and the world size (size 1 = not under mpirun).
* ``all_reduce_sum``: a Python number summed over ranks (box counts).
* ``SyncBatchNorm2d``: Jittor's own ``nn.BatchNorm`` syncs under MPI from E[x] and E[x^2]
  (float32, and it assumes equal shards), but this backend has its own BatchNorm2d
  (normalization.py: torch's two-pass float64 statistics and analytic backward).  This is that
  BatchNorm2d on the global batch: channel sums all-reduced (two passes, float64), unbiased
  running variance over the global count, backward all-reducing ``sum(g)`` and
  ``sum(g * xhat)``; weight and bias gradients local (averaged with the others).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from .framework import from_numpy, jt, scalar, update_
from .normalization import BatchNorm2d, batchnorm_affine


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1


def init_world(device: str = "cpu") -> World:
    """The MPI world of an mpirun launch (none outside mpirun)."""
    return current_world()


def current_world() -> World:
    if jt.in_mpi and jt.world_size > 1:
        return World(int(jt.rank), int(jt.world_size))
    return World()


def all_reduce_sum(value: float) -> float:
    """``value`` summed over every rank (itself outside MPI)."""
    if not current_world().active:
        return float(value)
    v = from_numpy(np.asarray([float(value)], dtype=np.float64), "float64")   # jt.array would make it float32
    return float(v.mpi_all_reduce("add").item())


def mean_over_ranks(values: "list[float]") -> "list[float]":
    """Python numbers averaged over the ranks in one all-reduce (the logged losses: the
    official loop logs ``reduce_dict``'s mean, which is the global batch's loss)."""
    w = current_world()
    if not w.active:
        return [float(v) for v in values]
    v = from_numpy(np.asarray(values, dtype=np.float64), "float64").mpi_all_reduce("add")
    return [float(x) / w.size for x in v.numpy().tolist()]


def average_gradients(grads: Dict[str, Optional[jt.Var]]) -> Dict[str, Optional[jt.Var]]:
    """Every gradient replaced by its mean over ranks (what jittor.optim does after jt.grad;
    DDP's all-reduce in torch).  None (unreachable parameter) stays None on every rank."""
    if not current_world().active:
        return grads
    return type(grads)((n, None if g is None else g.mpi_all_reduce("mean")) for n, g in grads.items())


def _sum_over_ranks(v: jt.Var) -> jt.Var:
    return v.mpi_all_reduce("add")


class _SyncBatchNormTrain(jt.Function):
    """``y = x * scale + shift`` on the global batch's statistics (detached by the caller)
    with the synced analytic backward.  x, g [N, C, H, W]; weight, bias, mu, invstd [C];
    n: the global count (float64 Var [1])."""

    def execute(self, x, weight, bias, mu, invstd, n):
        self.saved = (x, weight, mu, invstd, n)
        return batchnorm_affine(x, weight, bias, mu, invstd)

    def grad(self, g):
        x, weight, mu, invstd, n = self.saved
        c = (1, -1, 1, 1)
        xhat = (x - mu.reshape(c)) * invstd.reshape(c)
        gd = g.float64()
        sum_g = gd.sum([0, 2, 3])
        sum_gx = (gd * xhat.float64()).sum([0, 2, 3])
        both = _sum_over_ranks(jt.concat([sum_g, sum_gx]))
        k = sum_g.shape[0]
        a, b = (both[:k] / n).cast(x.dtype), (both[k:] / n).cast(x.dtype)
        dx = (g - a.reshape(c) - xhat * b.reshape(c)) * (weight * invstd).reshape(c)
        return dx, sum_gx.cast(weight.dtype), sum_g.cast(weight.dtype), None, None, None


class SyncBatchNorm2d(BatchNorm2d):
    """normalization.BatchNorm2d whose train-mode statistics are those of the global batch."""

    def execute(self, x: jt.Var) -> jt.Var:
        if not (self.is_training() and current_world().active):
            return super().execute(x)
        c = (1, -1, 1, 1)
        xd = x.float64()
        n_local = from_numpy(np.asarray([x.numel() // x.shape[1]], dtype=np.float64), "float64")
        packed = _sum_over_ranks(jt.concat([xd.sum([0, 2, 3]), n_local]))
        k = x.shape[1]
        n = packed[k:]
        mu = packed[:k] / n
        var = _sum_over_ranks(((xd - mu.reshape(c)) ** 2).sum([0, 2, 3])) / n
        m, keep = scalar(self.momentum, xd), scalar(1 - self.momentum, xd)
        unbiased = var * (n / jt.maximum(n - 1, scalar(1.0, n)))
        update_(self.running_mean, (keep * self.running_mean.float64() + m * mu.detach()).cast(self.running_mean.dtype))
        update_(self.running_var, (keep * self.running_var.float64() + m * unbiased.detach()).cast(self.running_var.dtype))
        self._num_batches_tracked += 1
        invstd = (1.0 / jt.sqrt(var + scalar(self.eps, var))).cast(x.dtype)
        return _SyncBatchNormTrain.apply(x, self.weight, self.bias, mu.cast(x.dtype).detach(), invstd.detach(),
                                         n.detach())


def convert_sync_batchnorm(model, device: str = "cpu"):
    """Every normalization.BatchNorm2d of ``model`` synced over the MPI world (the frozen BN of
    the backbone is another class and stays frozen).  The module keeps its state (the
    class is swapped in place, so Sequential children need no re-insertion)."""
    for mod in model.modules():
        if type(mod) is BatchNorm2d:
            mod.__class__ = SyncBatchNorm2d
    return model


__all__ = ["World", "init_world", "current_world", "all_reduce_sum", "mean_over_ranks", "average_gradients",
           "SyncBatchNorm2d", "convert_sync_batchnorm"]
