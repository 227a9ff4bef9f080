"""weights_convert's safety and its CLI's user errors: a malicious pickle never runs, and every
user mistake exits 2 with one line on stderr and writes no output.

Runs in both environments (numpy 2 in the torch env, numpy 1.26 in the Jittor env).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from weights_convert import WeightsError, read_weights, write_weights
from weights_convert.cli import main as cli_main
from weights_convert.jittor_pickle import MAGIC, dumps_jittor, loads_restricted
from weights_helpers import assert_user_error, files_in, run_cli, seeded

# ----------------------------------------------------------------------------------------
# safety: malicious pickles never run
# ----------------------------------------------------------------------------------------

class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvalEvil:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


@pytest.mark.parametrize("trailer", [True, False])
@pytest.mark.parametrize("where", ["top", "value", "nested"])
def test_malicious_pickle_refused(tmp_path, capsys, trailer, where):
    marker = tmp_path / "PWNED"
    evil = _Evil(f"touch {marker}")
    sd = dict(seeded("smoke"))
    obj = {"top": evil, "value": {**sd, "decoder.x": evil},
           "nested": {"model": sd, "extra": [1, 2, {"k": evil}]}}[where]
    body = pickle.dumps(obj, 4)
    blob = body + hashlib.sha1(body).digest() + MAGIC if trailer else body
    src = tmp_path / "evil.pkl"
    src.write_bytes(blob)
    with pytest.raises(WeightsError) as ei:
        read_weights(src)
    assert "refused to unpickle global" in str(ei.value) and "system" in str(ei.value)
    dst = tmp_path / "out.safetensors"
    rc, out, err = run_cli([src, dst, "--config", "smoke"], capsys)
    assert_user_error(rc, err, "refused to unpickle global", "system")
    assert not marker.exists(), "the payload ran"
    assert not dst.exists()
    assert files_in(tmp_path) == ["evil.pkl"]


def test_other_globals_refused(tmp_path):
    marker = tmp_path / "PWNED"
    payloads = [
        _EvalEvil(f"open({str(marker)!r}, 'w').write('x')"),
        _Evil(f"touch {marker}"),
    ]
    for pl in payloads:
        with pytest.raises(WeightsError, match="refused to unpickle global"):
            loads_restricted(pickle.dumps({"a": pl}, 2), "x.pkl")
        with pytest.raises(WeightsError, match="refused to unpickle global"):
            loads_restricted(pickle.dumps({"a": pl}, 0), "x.pkl")
    # a class from an allowed module but not on the list is refused too
    with pytest.raises(WeightsError, match="numpy.load"):
        loads_restricted(b"\x80\x04\x8c\x05numpy\x8c\x04load\x93)R.", "x.pkl")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------
# CLI: user mistakes -> exit 2, one line, no output file
# ----------------------------------------------------------------------------------------

def _make_case(tmp_path, case):
    w = seeded("smoke")
    if case == "truncated-pkl":
        blob = dumps_jittor(w)
        (tmp_path / "src.pkl").write_bytes(blob[: len(blob) // 2])
        return tmp_path / "src.pkl", "smoke", "truncated or corrupted"
    if case in ("truncated-safetensors", "truncated-npz"):
        ext = case.split("-")[1]
        full, src = tmp_path / f"full.{ext}", tmp_path / f"src.{ext}"
        write_weights(full, w)
        blob = full.read_bytes()
        full.unlink()
        src.write_bytes(blob[: len(blob) // 2])
        return src, "smoke", f"cannot read {ext} file"
    if case == "wrong-preset":
        write_weights(tmp_path / "src.npz", w)
        return tmp_path / "src.npz", "r18vd", "do not match config 'r18vd'"
    if case == "missing-key":
        del w["decoder.query_pos_head.layers.1.bias"]
        write_weights(tmp_path / "src.npz", w)
        return tmp_path / "src.npz", "smoke", "1 missing: decoder.query_pos_head.layers.1.bias"
    if case == "extra-key":
        w["decoder.bogus.weight"] = np.ones(3, np.float32)
        write_weights(tmp_path / "src.npz", w)
        return tmp_path / "src.npz", "smoke", "1 unexpected: decoder.bogus.weight"
    if case == "wrong-shape":
        w["decoder.enc_output.1.weight"] = np.ones(65, np.float32)
        write_weights(tmp_path / "src.npz", w)
        return tmp_path / "src.npz", "smoke", "1 shape mismatch: decoder.enc_output.1.weight (file [65], spec [64])"
    if case == "object-array-npz":
        np.savez(tmp_path / "src.npz", a=np.array([{"x": 1}], dtype=object))
        return tmp_path / "src.npz", "smoke", "refused an object array"
    if case == "unknown-preset":
        write_weights(tmp_path / "src.npz", w)
        return tmp_path / "src.npz", "r9000", "--config"
    raise AssertionError(case)


CASES = ["truncated-pkl", "truncated-safetensors", "truncated-npz", "wrong-preset", "missing-key",
         "extra-key", "wrong-shape", "object-array-npz", "unknown-preset"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("out_ext", [".pkl", ".safetensors"])
def test_cli_user_errors(tmp_path, capsys, case, out_ext):
    src, preset, needle = _make_case(tmp_path, case)
    before = files_in(tmp_path)
    dst = tmp_path / f"out{out_ext}"
    rc, out, err = run_cli([src, dst, "--config", preset], capsys)
    assert_user_error(rc, err, needle)
    assert not dst.exists()
    assert files_in(tmp_path) == before                # no temp file either


def test_cli_error_keeps_existing_output(tmp_path, capsys):
    src, preset, needle = _make_case(tmp_path, "missing-key")
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"previous content")
    rc, out, err = run_cli([src, dst, "--config", preset], capsys)
    assert_user_error(rc, err, needle)
    assert dst.read_bytes() == b"previous content"


@pytest.mark.parametrize("argv,needle", [
    (["{src}", "{d}/out.bin2"], "cannot tell the output format"),
    (["{src}", "{d}/out.safetensors", "--to", "jittor"], "name it *.pkl"),
    (["{d}/nope.npz", "{d}/out.pkl"], "no such file"),
    (["{src}", "{d}/no/such/dir/out.pkl"], "does not exist"),
    (["{src}", "{d}/out.pkl", "--fill-seed", "3"], "--fill-seed needs --config"),
    (["{src}", "{d}/out.pkl", "--dtype", "float16"], "invalid choice"),
    (["{src}"], "required"),
])
def test_cli_usage_errors(tmp_path, capsys, argv, needle):
    write_weights(tmp_path / "src.npz", {"a": np.zeros(2, np.float32)})
    before = files_in(tmp_path)
    args = [a.format(src=tmp_path / "src.npz", d=tmp_path) for a in argv]
    with pytest.raises(SystemExit) if needle in ("invalid choice", "required") else _nullctx() as ex:
        rc = cli_main(args)
    if ex is not None and hasattr(ex, "value"):
        rc = ex.value.code
    err = capsys.readouterr().err
    assert_user_error(rc, err, needle)
    assert files_in(tmp_path) == before


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_cli_without_config_and_dtype(tmp_path, capsys):
    w = {"a": np.arange(4, dtype=np.float32), "n": np.array(3, np.int64)}
    write_weights(tmp_path / "a.npz", w)
    rc, out, err = run_cli([tmp_path / "a.npz", tmp_path / "b.pkl", "--dtype", "float64"], capsys)
    assert rc == 0, err
    assert "no --config" in out
    got, _ = read_weights(tmp_path / "b.pkl")
    assert got["a"].dtype == np.float64 and got["n"].dtype == np.int64


def test_cli_console_script_subprocess(tmp_path):
    """The installed entry point: exit 2, one line on stderr, no traceback, no output."""
    exe = os.path.join(os.path.dirname(sys.executable), "weights-convert")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "weights_convert.cli"]
    src, preset, needle = _make_case(tmp_path, "wrong-shape")
    dst = tmp_path / "out.pkl"
    r = subprocess.run(cmd + [str(src), str(dst), "--config", preset], capture_output=True, text=True,
                       cwd=str(tmp_path))
    assert_user_error(r.returncode, r.stderr, needle)
    assert not dst.exists()
    w = seeded("smoke")
    write_weights(tmp_path / "ok.npz", w)
    r = subprocess.run(cmd + [str(tmp_path / "ok.npz"), str(tmp_path / "ok.pkl"), "--config", "smoke"],
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
