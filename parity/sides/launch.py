"""The command line that starts one side as N data-parallel processes, on the engine its
users have: ``torchrun`` (``python -m torch.distributed.run``, from the torch env) for
PyTorch, OpenMPI's ``mpirun`` for Jittor.  Nothing is launched by hand: the engines start the
ranks, set their world (torchrun: RANK / WORLD_SIZE / MASTER_ADDR; mpirun:
OMPI_COMM_WORLD_*) and carry the collectives.

One machine only (``--standalone`` rendezvous; mpirun's local slots).  Several machines:
README, "Data-parallel runs".
"""
from __future__ import annotations

import os
import shutil
from typing import List, Sequence

from parity.errors import RunError

MPIRUN_ENV = "RTDETR_PARITY_MPIRUN"


def find_mpirun() -> str:
    """$RTDETR_PARITY_MPIRUN, else ``mpirun`` on PATH; a one-line error naming the fix."""
    path = os.environ.get(MPIRUN_ENV) or shutil.which("mpirun")
    if not path or not os.access(path, os.X_OK):
        raise RunError("jittor data-parallel runs need OpenMPI's mpirun, which is not on PATH: run "
                       "`bash envs/setup.sh` (installs openmpi-bin and libopenmpi-dev) or install OpenMPI, "
                       f"or set ${MPIRUN_ENV}", side="jittor", cause="environment missing")
    return path


def rank_command(backend: str, python: str, nproc: int, module_argv: Sequence[str]) -> List[str]:
    """``[python, *module_argv]`` (``-m parity.workers.X ...``) started as ``nproc`` ranks.

    torch:  python -m torch.distributed.run --standalone --nproc-per-node N -m -- parity.workers.X ...
    jittor: mpirun -np N --oversubscribe --bind-to none [--allow-run-as-root] python -m parity.workers.X ...

    ``--oversubscribe``: more ranks than free cores is allowed (a 2-core machine runs 2 ranks
    beside the runner).  ``--bind-to none``: OpenMPI would pin each rank to one core, and a
    pinned rank sharing its core with another job stalls its collective partners.
    ``--allow-run-as-root``: OpenMPI refuses root otherwise (containers, CI).  Thread counts
    are the worker's own (OMP_NUM_THREADS from the runner); torchrun only sets 1 when unset.
    """
    argv = list(module_argv)
    if nproc <= 1:
        return [python] + argv
    if argv[:1] != ["-m"]:
        raise ValueError(f"rank_command wants '-m module ...', got {argv[:2]}")
    if backend == "torch":
        # "--": torchrun's argparse would otherwise read the worker's options as abbreviations
        # of its own (--nproc -> --nproc-per-node, --run -> --run-path) and refuse them
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                "-m", "--"] + argv[1:]
    cmd = [find_mpirun(), "-np", str(nproc), "--oversubscribe", "--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd + [python] + argv
