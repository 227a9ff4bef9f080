"""Broken data-parallel rules, planted on one side of a ``--nproc`` run to prove the engine
check and the rank comparison name them (``--inject-fault dist:RULE``; parity/judge/ranks.py).

Each patch replaces one name the backend's adapter or criterion imported from its
``distributed`` module, so exactly one rule breaks:

* ``grad-sum``         gradients summed over the ranks instead of averaged (DDP's and
                       jittor.optim's mean forgotten): every gradient x N;
* ``num-boxes-local``  the criterion's box count not all-reduced: each rank divides its loss by
                       its own box count;
* ``bn-local``         BatchNorm not converted to SyncBN: each rank normalises with its own
                       shard's statistics;
* ``same-shard``       (applied by the worker's ``join_world``) every rank reads rank 0's images.

Jittor only: the issue's faults are the ones a Jittor port gets wrong (torch's rules are
DDP's own).
"""
from __future__ import annotations

from parity.case.faults import FaultError


def install_dist_fault(backend: str, rule: str) -> str:
    if backend != "jittor":
        raise FaultError(f"fault 'dist:{rule}': data-parallel faults are planted on the jittor side "
                         f"(--fault-side jittor)")
    from backends.jittor_impl import adapter, criterion
    from backends.jittor_impl.distributed import World

    if rule == "grad-sum":
        def summed(grads):
            return type(grads)((n, None if g is None else g.mpi_all_reduce("add")) for n, g in grads.items())
        adapter.average_gradients = summed
        return "gradients summed over ranks (not averaged)"
    if rule == "num-boxes-local":
        criterion.all_reduce_sum = float
        criterion.current_world = World
        return "num_boxes not all-reduced (each rank's own box count)"
    if rule == "bn-local":
        adapter.convert_sync_batchnorm = lambda model, device="cpu": model
        return "BatchNorm not synced (each rank's own statistics)"
    raise FaultError(f"fault 'dist:{rule}': not a runtime patch")
