"""Data parallelism on torch.distributed, as the official training runs it (``torchrun``,
DistributedDataParallel, SyncBN, ``num_boxes`` all-reduced).

The process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``...): gloo on CPU, NCCL on CUDA.  Every collective is torch.distributed's own;
nothing here moves bytes by hand.

* ``World``: this process's rank and the world size (size 1 = no process group).
* ``all_reduce_sum``: a Python number summed over ranks (float64 on the wire: box counts).
* ``SyncBatchNorm2d``: torch's ``nn.SyncBatchNorm`` refuses CPU tensors ("expected input
  tensor to be on GPU"), so on CPU BatchNorm statistics are synced by this module instead,
  with torch's SyncBatchNorm arithmetic: global mean and variance from all-reduced channel
  sums (two passes, float64), unbiased running variance over the global count, and the
  backward all-reducing ``sum(dy)`` and ``sum(dy * xhat)`` as torch's does; the weight and
  bias gradients stay local (DDP averages them).  On CUDA, ``convert_sync_batchnorm`` uses
  torch's own ``nn.SyncBatchNorm``.  Mirrored in backends/jittor_impl/distributed.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1


def init_world(device: str = "cpu") -> World:
    """The process group of a torchrun launch (none when WORLD_SIZE is unset or 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def all_reduce_sum(value: float) -> float:
    """``value`` summed over every rank (itself when there is no process group)."""
    w = current_world()
    if not w.active:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_wire_device())
    dist.all_reduce(t)
    return float(t.item())


def mean_over_ranks(values: "list[float]") -> "list[float]":
    """Python numbers averaged over the ranks in one all-reduce (the logged losses: the
    official loop logs ``reduce_dict``'s mean, which is the global batch's loss)."""
    w = current_world()
    if not w.active:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_wire_device())
    dist.all_reduce(t)
    return [float(v) / w.size for v in t.tolist()]


def _wire_device() -> str:
    """Where a host number travels: NCCL all-reduces CUDA tensors only, gloo CPU ones.  (The
    NCCL path has not run here: no GPU on these machines.)"""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Channel sums [C] (float64) added over every rank, in place on a copy."""
    out = t.clone()
    dist.all_reduce(out)
    return out


class _SyncBatchNormTrain(torch.autograd.Function):
    """Train-mode BN on statistics of the global batch.  x [N, C, H, W]; weight, bias [C].
    Returns y and (mean, var) [C] float64 for the running statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        c = (1, -1, 1, 1)
        xd = x.double()
        n_local = torch.tensor([float(x.numel() // x.shape[1])], dtype=torch.float64)
        packed = _sum_over_ranks(torch.cat([xd.sum((0, 2, 3)), n_local]))
        n = packed[-1]
        mean = packed[:-1] / n
        var = _sum_over_ranks(((xd - mean.reshape(c)) ** 2).sum((0, 2, 3))) / n
        invstd = (1.0 / torch.sqrt(var + eps)).to(x.dtype)
        mu = mean.to(x.dtype)
        ctx.save_for_backward(x, weight, mu, invstd)
        ctx.n = n
        ctx.mark_non_differentiable(mean, var, n)
        scale = weight * invstd
        y = x * scale.reshape(c) + (bias - mu * scale).reshape(c)
        return y, mean, var, n

    @staticmethod
    def backward(ctx, g, _gm, _gv, _gn):
        x, weight, mu, invstd = ctx.saved_tensors
        c = (1, -1, 1, 1)
        xhat = (x - mu.reshape(c)) * invstd.reshape(c)
        gd = g.double()
        sum_g = gd.sum((0, 2, 3))
        sum_gx = (gd * xhat.double()).sum((0, 2, 3))
        both = _sum_over_ranks(torch.cat([sum_g, sum_gx]))
        k = sum_g.numel()
        a, b = (both[:k] / ctx.n).to(x.dtype), (both[k:] / ctx.n).to(x.dtype)
        dx = (g - a.reshape(c) - xhat * b.reshape(c)) * (weight * invstd).reshape(c)
        return dx, sum_gx.to(weight.dtype), sum_g.to(weight.dtype), None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose train-mode statistics are those of the global batch (CPU
    process groups; the state_dict keys are BatchNorm2d's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and current_world().active):
            return super().forward(x)
        y, mean, var, n = _SyncBatchNormTrain.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():
            m = self.momentum
            unbiased = var * (n / torch.clamp(n - 1, min=1))
            self.running_mean.copy_((1 - m) * self.running_mean.double() + m * mean)
            self.running_var.copy_((1 - m) * self.running_var.double() + m * unbiased)
            self.num_batches_tracked.add_(1)
        return y


def convert_sync_batchnorm(model: nn.Module, device: str = "cpu") -> nn.Module:
    """Every BatchNorm2d of ``model`` synced over the process group (FrozenBatchNorm2d,
    not a BatchNorm2d, stays as it is).  CUDA: torch's nn.SyncBatchNorm; CPU: SyncBatchNorm2d."""
    if device == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SyncBatchNorm2d):   # normalization.BatchNorm2d too
            new = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats, device="meta")
            # the very same Parameters and buffers (as torch's convert_sync_batchnorm): an
            # optimiser built before the conversion keeps updating the model's tensors
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return model
