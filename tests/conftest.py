"""Test-suite plumbing shared by both environments.

The suite runs twice (see tests/run.sh): in the PyTorch env with ``-m "not jittor"`` and in
the Jittor env with ``-m "not torch"``.  Pure-numpy tests run in both.  Files that import a
framework at module level (``test_torch_*.py``, ``test_jittor_*.py``) are only collected in
the env that has it.  A test that needs the *other* environment (cross-env runs) calls
:func:`env_python`, which FAILS loudly when that environment is missing — never skips.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JITTOR = importlib.util.find_spec("jittor") is not None

collect_ignore_glob = []
if not HAS_TORCH:
    collect_ignore_glob.append("test_torch_*.py")
if not HAS_JITTOR:
    collect_ignore_glob.append("test_jittor_*.py")


def env_python(name: str) -> str:
    """Interpreter of the ``torch`` or ``jittor`` environment; fails the test if missing."""
    var = f"RTDETR_PARITY_{name.upper()}_PYTHON"
    path = os.environ.get(var) or os.path.join(REPO, ".venvs", name, "bin", "python")
    if not os.path.exists(path):
        pytest.fail(f"ENVIRONMENT MISSING: the {name} environment ({path}) does not exist. "
                    f"Run `bash envs/setup.sh` or set {var}.", pytrace=False)
    return path


@pytest.fixture(scope="session")
def golden():
    import numpy as np
    return np.load(os.path.join(DATA, "official_golden.npz"))


@pytest.hookimpl(trylast=True)   # after -m deselection: judge only what will run
def pytest_collection_modifyitems(config, items):
    # A framework-marked test selected in an interpreter without that framework is a
    # misconfigured run, not something to skip quietly: stop the run and say so.
    bad = [item.nodeid for item in items
           for fw, have in (("torch", HAS_TORCH), ("jittor", HAS_JITTOR))
           if item.get_closest_marker(fw) and not have]
    if bad:
        raise pytest.UsageError(
            f"{len(bad)} selected test(s) need a framework this interpreter ({sys.executable}) lacks, "
            f"e.g. {bad[0]}. Run the suite with tests/run.sh (one pass per environment).")
