"""Helpers shared by the weights_convert tests (test_weights_convert*.py): seeded weights,
bit-exact comparison, the CLI run in-process and its one-line user errors."""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from rtdetr_core.init import seeded_weights
from weights_convert.cli import main as cli_main

_SEEDED: dict = {}


def seeded(preset: str) -> "OrderedDict[str, np.ndarray]":
    if preset not in _SEEDED:
        _SEEDED[preset] = seeded_weights(preset, 3)
    return OrderedDict((k, v.copy()) for k, v in _SEEDED[preset].items())


def assert_bit_exact(got, want):
    assert list(got) == list(want), "names or order differ"
    for k in want:
        a, b = got[k], want[k]
        assert a.dtype == b.dtype, f"{k}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{k}: shape {a.shape} != {b.shape}"
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), f"{k}: bits differ"


def run_cli(argv, capsys):
    rc = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, *needles):
    assert rc == 2, f"exit code {rc}, stderr: {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("weights-convert: error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def files_in(folder):
    return sorted(os.listdir(folder))
