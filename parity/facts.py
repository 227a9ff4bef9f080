"""Facts about where the harness runs: the repository root, the git revision, the runner's
versions and the host (CPU, memory, load).  Standard library and numpy only."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Any, Dict, Optional

import numpy as np

PARITY_DIR = os.path.dirname(os.path.abspath(__file__))


def repo_root() -> str:
    return os.path.dirname(PARITY_DIR)


def git_describe(root: Optional[str] = None) -> Optional[str]:
    root = root or repo_root()
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def runner_versions() -> Dict[str, Any]:
    return {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
            "executable": sys.executable, "git": git_describe()}


def host_info() -> Dict[str, Any]:
    cpu = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        pass
    try:
        aff = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        aff = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        load = None
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu_model": cpu, "loadavg": load,
            "cpu_count": os.cpu_count(), "affinity": aff, "memory_gb": mem, "python": platform.python_version()}
