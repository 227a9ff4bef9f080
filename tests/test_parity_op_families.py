"""Op families (parity/workers/op_families.py): both sides' recorded op names map to the
families the bench report puts side by side, and almost nothing is left in "other".

Pure Python (standard library): runs in both environments.  The recorded names are in
tests/data/bench_profile_ops_smoke.json (one smoke eval and one smoke train call under each
side's profiler, see its "recorded" field).
"""
from __future__ import annotations

import json
import os

import pytest

from conftest import DATA
from parity.workers.op_families import FAMILIES, by_family, jittor_family, jittor_ops, strip_marks, torch_family

RECORDED = os.path.join(DATA, "bench_profile_ops_smoke.json")

TORCH = {
    "aten::mkldnn_convolution": "convolution", "aten::_slow_conv2d_forward": "convolution",
    "aten::_slow_conv2d_backward": "convolution", "aten::convolution_backward": "convolution",
    "aten::addmm": "matmul", "aten::mm": "matmul", "aten::bmm": "matmul", "aten::linear": "matmul",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "attention",
    "aten::grid_sampler_2d": "deformable sampling", "aten::grid_sampler_2d_backward": "deformable sampling",
    "aten::_softmax": "softmax", "aten::_softmax_backward_data": "softmax",
    "aten::native_batch_norm": "normalisation", "aten::native_batch_norm_backward": "normalisation",
    "aten::native_layer_norm_backward": "normalisation",
    "aten::mul": "elementwise", "aten::threshold_backward": "elementwise", "aten::where": "elementwise",
    "aten::sigmoid": "elementwise", "aten::_foreach_mul_": "elementwise",
    "aten::sum": "reductions", "aten::linalg_vector_norm": "reductions", "aten::_foreach_norm": "reductions",
    "aten::max_pool2d_with_indices": "reductions", "aten::topk": "reductions",
    "aten::copy_": "copies/layout", "aten::cat": "copies/layout", "aten::transpose": "copies/layout",
    "aten::view": "copies/layout", "aten::index": "copies/layout", "aten::fill_": "copies/layout",
    "aten::empty": "framework", "aten::item": "framework", "detach": "framework",
    "autograd::engine::evaluate_function: ConvolutionBackward0": "framework", "MulBackward0": "framework",
    "torch::autograd::AccumulateGrad": "framework", "Optimizer.zero_grad#AdamW.zero_grad": "framework",
    "Optimizer.step#AdamW.step": "optimiser", "aten::some_new_op": "other",
}

# Jittor profiler keys (shortened: type annotations dropped, as in the recorded file)
MUL_SUM = "«opkey0:broadcast_to«Tx:float32«DIM=3«opkey1:broadcast_to«Tx:float32«opkey2:binary«OP:multiply«opkey3:reduce«OP:add"
JITTOR = {
    "mkl_conv«Txd:float32«Tyd:float32«XFORMAT:abcd«JIT:1": "convolution",
    "mkl_conv_backward_x«Tyd:float32": "convolution", "mkl_conv_backward_w«Txd:float32": "convolution",
    "mkl_matmul«T:float32«Trans_a:N«Trans_b:T«JIT:1": "matmul",
    MUL_SUM: "matmul",                                                   # matmul lowered to broadcast-multiply-sum
    "«opkey0:broadcast_to«opkey1:reindex«XDIM=4«opkey2:binary«OP:multiply«opkey3:reduce«OP:add": "convolution",
    "code«IN_SIZE:4«HEADER:\ntemplate <typename T> struct MsdaSample {": "deformable sampling",
    "code«IN_SIZE:1«CODE:\n int k3 = i3*2-1; int k3_ = min(k3 + 3, in0_shape3);": "reductions",   # max pool
    "code«IN_SIZE:1«CODE:something else": "other",
    "code«IN_SIZE:1«HEADER:\n#define CHANNEL_SUM(R, E)«CODE:\n// op family: normalisation\ntypedef in0_type T;": "normalisation",
    "code«IN_SIZE:2«CODE:// op family: softmax\ntypedef in0_type T;": "softmax",
    "code«IN_SIZE:257«HEADER:#include <cmath>\n«CODE:// op family: optimiser\ntypedef in1_type T;": "optimiser",
    "code«IN_SIZE:2«CODE:// op family: no-such-family\ntypedef in0_type T;": "other",
    "«opkey0:broadcast_to«opkey1:binary«OP:subtract«opkey2:unary«OP:exp«opkey3:reduce«OP:add": "softmax",
    "«opkey0:broadcast_to«opkey1:binary«OP:subtract«opkey2:unary«OP:exp«opkey3:broadcast_to«opkey4:binary«OP:divide":
        "softmax",
    "«opkey0:unary«OP:negative«opkey1:unary«OP:exp«opkey2:binary«OP:add«opkey3:binary«OP:divide": "elementwise",  # sigmoid
    "«opkey0:array«T:float32«opkey1:broadcast_to«opkey2:binary«OP:multiply«opkey3:reduce«OP:maximum": "reductions",
    "«opkey0:unary«Tx:float32«Ty:float64«OP:cast«opkey1:binary«OP:multiply«opkey2:reduce«OP:add": "reductions",
    "«opkey0:array«opkey1:broadcast_to«opkey2:ternary«Tc:bool": "elementwise",
    "«opkey0:array«T:float32«opkey1:broadcast_to«Tx:float32": "copies/layout",          # a fill
    "«opkey0:unary«Tx:float32«Ty:float64«OP:cast": "copies/layout",
    "«opkey0:array«opkey1:binary«OP:multiply«opkey2:reindex_reduce«OP:add": "copies/layout",
    "«opkey0:reindex«XDIM=4«YDIM=4": "copies/layout",
    "getitem«Ti:float32«IDIM=2": "copies/layout", "setitem«OP:void«Td:float32": "copies/layout",
    "transpose«Tx:float32«DIM=3": "copies/layout", "argsort«Tx:float32«Ty:int32": "reductions",
    "[marks:opt,]mkl_matmul«T:float32": "matmul", "something_new«T:float32": "other",
}


@pytest.mark.parametrize("name,family", sorted(TORCH.items()))
def test_torch_op_names_map_to_their_family(name, family):
    assert torch_family(name) == family


def test_torch_ops_under_the_optimizer_step_are_optimiser():
    assert torch_family("aten::mul_", in_optimizer=True) == "optimiser"
    assert torch_family("aten::mul_") == "elementwise"


@pytest.mark.parametrize("key,family", sorted(JITTOR.items()))
def test_jittor_keys_map_to_their_family(key, family):
    assert jittor_family(key) == family


def test_jittor_ops_reads_a_fused_key_in_order():
    assert jittor_ops(MUL_SUM) == ["broadcast_to", "broadcast_to", "binary(multiply)", "reduce(add)"]
    assert jittor_ops("mkl_conv«Tx:f32") == ["mkl_conv"]
    assert jittor_ops("[marks:a,b,]getitem«Ti:f32") == ["getitem"]
    assert strip_marks("[marks:a,]code«X") == "code«X" and jittor_ops("") == []


def _recorded():
    with open(RECORDED, encoding="utf-8") as fh:
        return json.load(fh)


def _shares(rows):
    fams = by_family(rows)
    return {f["family"]: f["percent"] for f in fams}, fams


def test_recorded_smoke_ops_leave_little_in_other():
    """Measured, not guessed: "other" holds under 1 % of each side's recorded time."""
    rec = _recorded()
    t_rows = [{"op": n, "family": torch_family(n, opt), "count": 1, "total_ms": ms} for n, ms, opt in rec["torch"]]
    j_rows = [{"op": k, "family": jittor_family(k), "count": 1, "total_ms": ms} for k, ms in rec["jittor"]]
    for rows in (t_rows, j_rows):
        shares, fams = _shares(rows)
        assert set(shares) <= set(FAMILIES)
        assert shares.get("other", 0.0) < 1.0, fams
        assert sum(f["total_ms"] for f in fams) == pytest.approx(sum(r["total_ms"] for r in rows))
    t_shares, _ = _shares(t_rows)
    j_shares, _ = _shares(j_rows)
    for fam in ("convolution", "matmul", "softmax", "deformable sampling", "elementwise", "reductions"):
        assert t_shares.get(fam, 0) > 0 and j_shares.get(fam, 0) > 0, fam
    assert t_shares["normalisation"] > 0 and t_shares["optimiser"] > 0 and t_shares["attention"] > 0


def test_by_family_sums_counts_and_names_the_top_ops():
    rows = [{"op": "a", "family": "matmul", "count": 2, "total_ms": 3.0},
            {"op": "b", "family": "matmul", "count": 1, "total_ms": 5.0},
            {"op": "a", "family": "matmul", "count": 1, "total_ms": 1.0},
            {"op": "c", "family": "other", "count": 4, "total_ms": 1.0}]
    fams = by_family(rows)
    assert [f["family"] for f in fams] == ["matmul", "other"]
    m = fams[0]
    assert m["total_ms"] == 9.0 and m["count"] == 4 and m["ops"] == 2 and m["top_ops"] == ["b", "a"]
    assert m["percent"] == pytest.approx(90.0) and fams[1]["percent"] == pytest.approx(10.0)
