"""``parity bench --profile`` without running a model: each side's profiler rows
(parity/workers/bench_profile.py) and the side-by-side family table of bench.md
(parity/report/bench_profile.py), from small synthetic inputs.

Pure Python: runs in both environments.  The end-to-end run is in test_parity_bench.py.
"""
from __future__ import annotations

import pytest

from parity.report.bench import render_md
from parity.report.bench_profile import family_rows, family_table, sides_of
from parity.workers.bench_profile import _window, group_ops, jittor_rows, summarize_op, torch_rows

HEAD = ["Name", "FileName", "Count", "TotalTime", "AvgTime", "MinTime", "MaxTime"]
CONV = "mkl_conv«Txd:float32«JIT:1"
ADAM = "«opkey0:array«T:float32«opkey1:broadcast_to«opkey2:binary«OP:multiply«opkey3:binary«OP:add"
RELAY = "«opkey0:broadcast_to«opkey1:reindex«opkey2:binary«OP:multiply«opkey3:reduce«OP:add«choices:relay0:1,"


def _rep(*rows):
    return [HEAD] + [[k, f"/jit/{k[:8]}.cc shapes:\n[1,2,]:3(100%)", str(n), str(ns), "0", "0", "0"]
                     for k, n, ns in rows]


def test_jittor_rows_drop_relayed_ops_and_split_the_optimizer_share():
    rep = _rep((CONV, 3, 6e6), (ADAM, 5, 4e6), (RELAY, 3, 0))
    before = _rep((CONV, 3, 6e6), (ADAM, 1, 1e6))
    after = _rep((CONV, 3, 6e6), (ADAM, 4, 3.5e6))
    rows = jittor_rows(rep, _window(before, after))
    got = {(r["op"], r["family"]): (r["count"], r["total_ms"]) for r in rows}
    assert got == {("mkl_conv", "convolution"): (3, 6.0),
                   ("array+broadcast_to+binary(multiply)+binary(add)", "optimiser"): (3, 2.5),
                   ("array+broadcast_to+binary(multiply)+binary(add)", "elementwise"): (2, 1.5)}
    assert sum(r["total_ms"] for r in rows) == pytest.approx(10.0)
    assert [r["op"] for r in rows][0] == "mkl_conv" and rows[0]["percent"] == pytest.approx(60.0)
    assert rows[0]["shapes"] == "[1,2,]:3(100%)" and rows[0]["avg_ms"] == pytest.approx(2.0)


def test_summarize_op_names_fused_kernels():
    assert summarize_op(CONV) == "mkl_conv"
    assert summarize_op(ADAM) == "array+broadcast_to+binary(multiply)+binary(add)"
    many = "«" + "«".join(f"opkey{i}:binary«OP:add" for i in range(8))
    assert summarize_op(many) == "fused[binary(add) x8, ...]"


class Ev:
    """The fields of a torch.profiler FunctionEvent that torch_rows reads."""

    def __init__(self, name, self_us, parent=None, shapes=()):
        self.name, self.self_cpu_time_total, self.cpu_parent = name, self_us, parent
        self.input_shapes = list(shapes)


def test_torch_rows_use_self_time_and_the_optimizer_scope():
    step = Ev("Optimizer.step#AdamW.step", 500)
    conv = Ev("aten::conv2d", 100)
    events = [conv, Ev("aten::mkldnn_convolution", 4000, conv, [[1, 3, 8, 8]]), step,
              Ev("aten::mul_", 300, step, [[4]]), Ev("aten::mul_", 200, Ev("aten::foo", 0, step), [[4]]),
              Ev("aten::mul_", 1000, None, [[4]])]
    rows = torch_rows(events)
    got = {(r["op"], r["family"]): (r["count"], r["total_ms"]) for r in rows}
    assert got[("aten::mkldnn_convolution", "convolution")] == (1, 4.0)
    assert got[("aten::conv2d", "convolution")] == (1, 0.1)
    assert got[("aten::mul_", "optimiser")] == (2, 0.5)            # nested two deep under the step
    assert got[("aten::mul_", "elementwise")] == (1, 1.0)
    assert got[("Optimizer.step#AdamW.step", "optimiser")] == (1, 0.5)
    assert sum(r["total_ms"] for r in rows) == pytest.approx(6.1)  # self times: every event once
    by = {(g["op"], g["family"]): g for g in group_ops(rows)}
    assert by[("aten::mul_", "optimiser")]["kernels"] == 1 and by[("aten::mul_", "optimiser")]["count"] == 2


def _side(fams, total):
    return {"total_ms": total, "file": "p.json", "by_family": [
        {"family": f, "total_ms": ms, "percent": 100.0 * ms / total} for f, ms in fams],
        "by_op": [{"op": "x", "family": fams[0][0], "kernels": 1, "count": 2, "total_ms": fams[0][1],
                   "percent": 100.0 * fams[0][1] / total}]}


def _doc(profile):
    m = {"unit": "ms", "kind": "latency", "description": "", "ratio": 2.0,
         "torch": {"min": 1, "median": 1, "max": 1}, "jittor": {"min": 2, "median": 2, "max": 2}}
    return {"settings": {"device": "cpu", "dtype": "float32", "batch": 1, "repeat": 1, "warmup": 1},
            "host": {"cpu_model": "cpu", "memory_gb": 1}, "created": "now", "command": ["parity", "bench"],
            "runs": [{"config": "smoke", "config_digest": "d", "size": [96, 160], "batch": 1,
                      "backends": {be: {"versions": {}, "threads": {}, "device": "cpu"} for be in ("torch", "jittor")},
                      "measures": {"train_step": m}, "profile": profile}]}


def test_family_table_is_sorted_by_jittor_minus_pytorch():
    sides = {"torch": _side([("convolution", 50.0), ("normalisation", 30.0), ("matmul", 20.0)], 100.0),
             "jittor": _side([("matmul", 90.0), ("convolution", 60.0), ("softmax", 10.0)], 160.0)}
    rows = family_rows(sides)
    assert [r["family"] for r in rows] == ["matmul", "convolution", "softmax", "normalisation"]
    assert [r["diff_ms"] for r in rows] == [70.0, 10.0, 10.0, -30.0]
    table = family_table(sides)
    assert table[0] == "| family | PyTorch ms | % | Jittor ms | % | J−T ms |"
    assert table[2] == "| matmul | 20.0 | 20.0 | 90.0 | 56.2 | +70.0 |"
    assert table[5] == "| normalisation | 30.0 | 30.0 | - | - | -30.0 |"
    assert table[-1] == "| **profiled total** | 100.0 | 100 | 160.0 | 100 | |"


def test_bench_md_shows_the_family_table_and_both_sides_top_ops():
    sides = {"torch": _side([("convolution", 50.0), ("matmul", 20.0)], 70.0),
             "jittor": _side([("matmul", 90.0), ("convolution", 60.0)], 150.0)}
    md = render_md(_doc({"train": sides}))
    assert "Where each side spends a step, smoke train, by op family" in md and "not a timed call" in md
    assert md.index("| matmul | 20.0 |") < md.index("| convolution | 50.0 |")
    assert "Slowest PyTorch ops, smoke train" in md and "Slowest Jittor ops, smoke train" in md
    assert "Op families:" in md


def test_one_backend_profile_and_old_jittor_only_profile_still_render():
    one = render_md(_doc({"eval": {"torch": _side([("convolution", 5.0), ("matmul", 7.0)], 12.0)}}))
    assert "| matmul | 7.0 | 58.3 | - | - | - |" in one and "Slowest Jittor ops" not in one
    old = {"by_op": [{"op": "mkl_conv", "kernels": 1, "count": 3, "total_ms": 6.0, "percent": 60.0}],
           "top_kernels": [], "file": "profile_smoke_eval.json"}
    assert sides_of(old) == {"jittor": old}
    md = render_md(_doc({"eval": old}))
    assert "| `mkl_conv` | - | 1 | 3 | 6.0 | 60.0 |" in md and "by op family" not in md and "Op families" not in md
