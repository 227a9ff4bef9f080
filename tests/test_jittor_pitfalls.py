"""Each Jittor-vs-PyTorch pitfall handled in backends/jittor_impl/framework.py (and
normalization.py, attention.py, optim.py), checked
against PyTorch values recorded by tests/data/pitfalls/make_pitfall_refs.py."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from conftest import DATA, REPO

from backends.jittor_impl import framework as fw
from backends.jittor_impl.attention import MultiheadAttention
from backends.jittor_impl.normalization import BatchNorm2d, LayerNorm
from backends.jittor_impl.optim import AdamW, clip_grad_norm

jt = fw.jt
pytestmark = pytest.mark.jittor


def ref(name):
    return np.load(os.path.join(DATA, "pitfalls", f"{name}.npz"), allow_pickle=False)


def v(a, dtype=None):
    return fw.from_numpy(a, dtype)


def close(got, want, atol, rtol=0.0):
    np.testing.assert_allclose(fw.to_numpy(got), want, atol=atol, rtol=rtol)


def test_import_guard_and_O2():
    # no GPU driver here: nvcc_path cleared before import, CPU path taken
    if not fw._cuda_usable():
        assert os.environ.get("nvcc_path") == ""
        assert not jt.flags.use_cuda
    assert "-Ofast" not in jt.flags.cc_flags and "-O2" in jt.flags.cc_flags
    assert "-ffast-math" not in jt.flags.cc_flags and "-fvect-cost-model=dynamic" in jt.flags.cc_flags


def test_ieee_kernels_like_torch():
    r = ref("ieee")
    x = v(r["x"])
    np.testing.assert_array_equal(fw.to_numpy(x != x), r["isnan"])       # -Ofast: all False
    np.testing.assert_array_equal(fw.to_numpy(x > 0), r["gt0"])          # -Ofast: nan > 0 True
    np.testing.assert_array_equal(fw.to_numpy(jt.log(v(r["tiny"]))), r["log_tiny"])   # denormals kept
    close(jt.nn.log_softmax(v(r["logits"]), dim=-1), r["log_softmax"], atol=1e-6)


def test_batchnorm_two_pass_unbiased_and_counter():
    r = ref("batchnorm")
    bn = BatchNorm2d(8)
    for k in ("w", "b", "rm", "rv"):
        fw.assign({"w": bn.weight, "b": bn.bias, "rm": bn.running_mean, "rv": bn.running_var}[k], r[k], "float32")
    assert list(bn.state_dict()) + ["num_batches_tracked"] == list(r["keys"])
    x = v(r["x"])
    y = bn(x)
    dx = jt.grad((y * v(r["g"])).sum(), x)
    close(y, r["y_train"], atol=5e-5)              # native Jittor BN: 1e-2 off at mean 50
    close(dx, r["dx_train"], atol=1e-3, rtol=1e-3)
    bn(v(r["x"]))
    close(bn.running_mean, r["running_mean"], atol=1e-6, rtol=1e-6)
    close(bn.running_var, r["running_var"], atol=1e-6, rtol=1e-6)   # unbiased update
    assert bn._num_batches_tracked == int(r["num_batches_tracked"]) == 2
    fw.set_training(bn, False)
    xe = v(r["x"])
    ye = bn(xe)
    close(ye, r["y_eval"], atol=2e-4)
    close(jt.grad((ye * v(r["g"])).sum(), xe), r["dx_eval"], atol=1e-5, rtol=1e-5)


def test_layernorm_two_pass():
    r = ref("layernorm")
    ln = LayerNorm(16)
    fw.assign(ln.weight, r["w"], "float32")
    fw.assign(ln.bias, r["b"], "float32")
    x = v(r["x"])
    y = ln(x)
    dx, dw, db = jt.grad((y * v(r["g"])).sum(), [x, ln.weight, ln.bias])
    close(y, r["y"], atol=2e-5)
    close(dx, r["dx"], atol=2e-4)
    close(dw, r["dw"], atol=2e-5)
    close(db, r["db"], atol=2e-5)


def test_eval_mode_keeps_gradients_and_frozen_state():
    r = ref("eval_grads")
    from backends.jittor_impl.common import ConvNormLayer
    m = ConvNormLayer(3, 4, 3, 1)
    fw.assign(m.conv.weight, r["cw"], "float32")
    fw.assign(m.norm.running_mean, np.full(4, 0.1), "float32")
    fw.assign(m.norm.running_var, np.full(4, 2.0), "float32")
    frozen = fw.freeze(jt.ones(2))
    m.frozen_extra = frozen
    fw.set_training(m, False)          # jittor's m.eval() would stop_grad every weight
    loss = (m(v(r["x"])) ** 2).sum()
    dcw, dbw, dbb = jt.grad(loss, [m.conv.weight, m.norm.weight, m.norm.bias])
    close(dcw, r["dcw"], atol=1e-4, rtol=1e-5)
    close(dbw, r["dbw"], atol=1e-4, rtol=1e-5)
    close(dbb, r["dbb"], atol=1e-4, rtol=1e-5)
    fw.set_training(m, True)           # jittor's m.train() would thaw params frozen in eval
    assert frozen.is_stop_grad() and fw.is_trainable(m.conv.weight)
    # update_ keeps the flag (Var.update copies the flag of the new value)
    fw.update_(m.conv.weight, m.conv.weight.detach() * 2)
    assert fw.is_trainable(m.conv.weight)


def test_adamw_and_clip_like_torch():
    r = ref("adamw_clip")
    ps = [fw.from_numpy(r[f"p0_{i}"]) for i in range(3)]
    names = ["a", "b", "c"]
    opt = AdamW([{"names": names[:2], "params": ps[:2], "weight_decay": 0.05},
                 {"names": names[2:], "params": ps[2:], "lr": 1e-3, "weight_decay": 0.0}],
                lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    for s in range(3):
        grads = {n: (None if (s == 1 and i == 1) else fw.from_numpy(r[f"g{s}_{i}"])) for i, n in enumerate(names)}
        norm = clip_grad_norm(grads, 0.5)
        assert abs(norm - r["norms"][s]) <= 1e-6 * r["norms"][s]
        opt.step(grads)                # None: no decay, no moment update (jittor's would decay)
        for i in range(3):
            close(ps[i], r[f"p{i}_step{s}"], atol=1e-6)
    assert opt.state["b"]["step"] == 2 and opt.state["a"]["step"] == 3     # per-step count


def test_strict_load_validates_and_casts():
    from backends.jittor_impl.adapter import Adapter, WeightsError
    from rtdetr_core.init import seeded_weights
    a = Adapter("smoke")
    w = seeded_weights(a.cfg, 3)
    bad = dict(w)
    k = "decoder.enc_output.0.weight"
    bad[k] = w[k][:-1]
    bad["decoder.extra"] = np.zeros(3, np.float32)
    del bad["decoder.enc_score_head.bias"]
    bad["decoder.enc_output.0.bias"] = w["decoder.enc_output.0.bias"].astype(np.int64)
    with pytest.raises(WeightsError) as ei:          # jittor's load_state_dict never raises
        a.load_weights(bad)
    msg = str(ei.value)
    assert msg.startswith("4 problem(s)") and "missing: decoder.enc_score_head.bias" in msg
    assert "unexpected: decoder.extra" in msg and f"shape: {k}" in msg and "dtype: decoder.enc_output.0.bias" in msg
    # float64 into a float32 model: cast (jittor's Var.update would adopt the dtype)
    r = ref("load_cast")
    w64 = {n: x.astype(np.float64) if x.dtype == np.float32 else x for n, x in w.items()}
    w64["decoder.enc_score_head.weight"] = np.tile(r["a"], (20, 22))[:80, :64]
    a.load_weights(w64)
    out = a.export_weights()
    assert all(x.dtype == (np.int64 if n.endswith("num_batches_tracked") else np.float32) for n, x in out.items())
    np.testing.assert_array_equal(out["decoder.enc_score_head.weight"][:4, :3], r["weight"])


def test_float64_stays_float64():
    r = ref("float64")
    x = fw.from_numpy(r["x"])
    assert str(x.dtype) == "float64"
    np.testing.assert_array_equal(fw.to_numpy(x * 1.0), r["x_out"])       # 1e-300 / 1e300 survive
    close(fw.sigmoid(fw.from_numpy(np.array([-40.0, -1e-12, 0.3, 40.0]))), r["sig"], atol=1e-16, rtol=1e-15)
    with pytest.raises(OverflowError):
        fw.from_numpy(np.array([2 ** 31 + 5]))                           # would wrap as int32


def test_interpolate_nearest_torch_rule():
    r = ref("interpolate")
    x = v(r["x"])
    np.testing.assert_array_equal(fw.to_numpy(fw.interpolate_nearest(x, (10, 12))), r["up2"])
    np.testing.assert_array_equal(fw.to_numpy(fw.interpolate_nearest(x, (3, 4))), r["to34"])
    np.testing.assert_array_equal(fw.to_numpy(fw.interpolate_nearest(x, (7, 9))), r["to79"])
    x2 = v(r["x2"])
    np.testing.assert_array_equal(fw.to_numpy(fw.interpolate_nearest(x2, (7, 7))), r["x2_to7"])   # jittor: other rows
    np.testing.assert_array_equal(fw.to_numpy(fw.interpolate_nearest(x2, (13, 13))), r["x2_to13"])


def test_embedding_padding_row_looked_up_no_grad():
    r = ref("embedding")
    emb = fw.Embedding(5, 3, padding_idx=4)
    fw.assign(emb.weight, r["w"], "float32")
    y = emb(v(r["idx"]))
    close(y, r["y"], atol=0)
    close(jt.grad((y * v(r["g"])).sum(), emb.weight), r["dw"], atol=1e-6)   # row 4: exactly 0
    assert np.all(fw.to_numpy(jt.grad((emb(v(r["idx"])) * v(r["g"])).sum(), emb.weight))[4] == 0)


def test_topk_and_max_conventions():
    r = ref("topk_max")
    vals, idx = fw.topk(v(r["s"]), 50, dim=1)
    close(vals, r["values"], atol=0)
    np.testing.assert_array_equal(fw.to_numpy(idx), r["index"])          # tie-free: same order
    tv, ti = fw.topk(v(r["ties"]), 4, dim=0)
    close(tv, r["tie_values"], atol=0)                                    # ties: values equal,
    assert set(r["ties"][fw.to_numpy(ti)]) == {3.0}                      # order may differ
    close(fw.max_values(v(r["x"]), -1), r["max_values"], atol=0)
    np.testing.assert_array_equal(fw.to_numpy(fw.argmax(v(r["x"]), -1)), r["argmax"])


def test_multihead_attention_bool_mask():
    r = ref("mha")
    m = MultiheadAttention(8, 2, batch_first=True)
    for var, k in ((m.in_proj_weight, "w_in"), (m.in_proj_bias, "b_in"), (m.out_proj.weight, "w_out"),
                   (m.out_proj.bias, "b_out")):
        fw.assign(var, r[k], "float32")
    assert list(m.state_dict()) == list(r["keys"])
    q = v(r["q"])
    y, _ = m(q, q, v(r["v"]), attn_mask=fw.constant(r["mask"]))
    dq, dw = jt.grad((y * v(r["g"])).sum(), [q, m.in_proj_weight])
    close(y, r["y"], atol=2e-6)
    close(dq, r["dq"], atol=5e-6)
    close(dw, r["dw_in"], atol=5e-6)


def _gemm_calls(m, q, g):
    """oneDNN GEMM calls (``mkl_matmul``) of one attention forward + backward."""
    with jt.profile_scope() as report:
        y, _ = m(q, q, q)
        jt.sync(jt.grad((y * g).sum(), [q, m.in_proj_weight, m.out_proj.weight]))
        jt.sync_all(True)
    return sum(int(row[2]) for row in report[1:] if row[0].startswith("mkl_matmul"))


def test_multihead_attention_matmuls_are_gemms(monkeypatch):
    """float32 on CPU: Jittor rewrites only 2-D matmuls into a GEMM, so the attention runs
    per (batch, head): its 2 forward and 4 backward matmuls per (batch, head) all become
    ``mkl_matmul`` (the 4-D form had none: broadcast-multiply-reduce)."""
    rng = np.random.default_rng(0)
    b, length, e, h = 2, 7, 8, 2
    m = MultiheadAttention(e, h)
    for var in (m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias):
        fw.assign(var, rng.normal(0, 0.5, var.shape), "float32")
    q, g = v(rng.normal(0, 1, (b, length, e)), "float32"), v(rng.normal(0, 1, (b, length, e)), "float32")
    per_head = _gemm_calls(m, q, g)
    monkeypatch.setattr(MultiheadAttention, "_attend_2d", MultiheadAttention._attend_batched)
    batched = _gemm_calls(m, q, g)
    assert per_head - batched == 6 * b * h


def test_elementwise_losses_reduction_none():
    r = ref("losses")
    x = v(r["x"])
    loss = fw.bce_with_logits(x, v(r["tgt"]), weight=v(r["w"]))
    close(loss, r["bce"], atol=2e-6, rtol=1e-6)
    close(jt.grad(loss.sum(), x), r["dbce"], atol=1e-7, rtol=1e-6)
    a = v(r["a"])
    l1 = fw.abs_(a - v(r["b"]))
    close(l1, r["l1"], atol=0)
    close(jt.grad(l1.sum(), a), r["dl1"], atol=0)                          # 0 at ties (jittor: 1)


def test_sigmoid_family_saturation():
    r = ref("sigmoid")
    x = v(r["x"])
    s = fw.sigmoid(x)
    close(s, r["sigmoid"], atol=1e-12, rtol=1e-6)                         # jittor: 9.36e-14 below -30
    close(jt.grad(s.sum(), x), r["dsigmoid"], atol=1e-12, rtol=1e-6)
    ls = fw.log_sigmoid(x)
    close(ls, r["logsigmoid"], atol=1e-6, rtol=1e-6)                      # jittor floors at -30
    close(jt.grad(ls.sum(), x), r["dlogsigmoid"], atol=1e-7, rtol=1e-6)


def test_boundary_gradients():
    r = ref("boundary")
    x = v(r["x"])
    close(jt.grad(fw.clamp(x, 0.0, 1.0).sum(), x), r["dclamp"], atol=0)   # bounds included
    a, b = v(r["a"]), v(r["b"])
    da, db = jt.grad((fw.maximum(a, b) * 3 + fw.minimum(a, b)).sum(), [a, b])
    close(da, r["da"], atol=0)
    close(db, r["db"], atol=0)                                           # ties split 0.5 / 0.5
    z = v(r["z"])
    close(jt.grad(fw.abs_(z).sum(), z), r["dabs"], atol=0)
    from backends.jittor_impl.common import inverse_sigmoid
    u = v(r["u"])
    inv = inverse_sigmoid(u)
    close(inv, r["inv"], atol=2e-6, rtol=1e-6)
    close(jt.grad(inv.sum(), u), r["dinv"], atol=1e-6, rtol=1e-5)


def test_grid_sample_and_deformable_core():
    r = ref("grid_sample")
    value, grid = v(r["value"]), v(r["grid"])
    out = fw.grid_sample(value, grid)
    dv, dg = jt.grad((out * v(r["g"])).sum(), [value, grid])
    close(out, r["out"], atol=1e-6)
    close(dv, r["dvalue"], atol=1e-6)
    close(dg, r["dgrid"], atol=5e-6)
    from backends.jittor_impl.deformable_attention import deformable_attention_core_func
    val, loc, aw = v(r["val"]), v(r["loc"]), v(r["aw"])
    core = deformable_attention_core_func(val, [tuple(s) for s in r["shapes"].tolist()], loc, aw)
    grads = jt.grad((core * v(r["gc"])).sum(), [val, loc, aw])
    close(core, r["core"], atol=1e-6)
    for g, k in zip(grads, ("dval", "dloc", "daw")):
        close(g, r[k], atol=1e-5)


def test_activations_and_softmax_dim():
    r = ref("elementwise")
    from backends.jittor_impl.common import get_activation
    x = v(r["x"])
    for k in ("gelu", "silu", "relu"):
        close(get_activation(k)(x), r[k], atol=1e-6)
    m = v(r["m"])
    close(fw.softmax(m, dim=-1), r["softmax_last"], atol=1e-7)
    close(fw.softmax(m, dim=1), r["softmax_1"], atol=1e-7)


def test_no_pickle_loading_and_constants_stay_out_of_state_dict():
    # jt.load / Module.load execute pickles: the backend never calls them
    src = os.path.join(REPO, "backends", "jittor_impl")
    for f in os.listdir(src):
        if f.endswith(".py"):
            text = open(os.path.join(src, f)).read()
            assert not re.search(r"\bjt\.load\(|jittor\.load\(|\.load_parameters\(|\.load\(\s*['\"]", text), f
    # every public jt.Var attribute is registered: the model holds no constants (anchors,
    # position embeddings, masks are rebuilt per forward) and its keys equal the spec
    from backends.jittor_impl.adapter import Adapter
    from rtdetr_core.param_spec import param_spec
    a = Adapter("smoke")
    assert list(a.model.state_dict()) == [e.name for e in param_spec("smoke") if e.dtype != "int64"]


def test_float64_constants_are_exact():
    """Jittor turns every Python float into a float32 constant, also in float64 graphs
    (x64 * 0.1 is 1.5e-9 off): BN momentum, eps, GELU, attention scale, clamp bounds and
    AdamW / clipping hyper-parameters go through ``fw.scalar`` and agree with torch's
    float64 to rounding (1e-13), where the float32 constants were 1e-9..1e-8 off."""
    r = ref("float64_constants")
    tight = dict(atol=0, rtol=1e-12)
    # BatchNorm2d, train mode, two momentum updates; value and gradients
    bn = BatchNorm2d(3)
    for n in ("weight", "bias", "running_mean", "running_var"):
        fw.assign(getattr(bn, n), fw.to_numpy(getattr(bn, n)), "float64")
    x = v(r["bn_x"])
    bn(x)
    y = bn(x)
    gx, gw = jt.grad((y * v(r["bn_gy"])).sum(), [x, bn.weight])
    close(y, r["bn_y"], atol=1e-13)
    close(gx, r["bn_gx"], atol=1e-12)
    close(gw, r["bn_gw"], atol=1e-12)
    close(bn.running_mean, r["bn_rm"], **tight)
    close(bn.running_var, r["bn_rv"], **tight)
    # GELU (erf form): value and gradient
    from backends.jittor_impl.common import GELU, inverse_sigmoid
    g = v(r["gelu_x"])
    ge = GELU()(g)
    close(ge, r["gelu_y"], atol=1e-14)
    close(jt.grad(ge.sum(), g), r["gelu_g"], atol=1e-14)
    # LayerNorm eps
    ln = LayerNorm(6)
    for n in ("weight", "bias"):
        fw.assign(getattr(ln, n), fw.to_numpy(getattr(ln, n)), "float64")
    close(ln(v(r["ln_x"])), r["ln_y"], atol=1e-12)
    # attention scale 1/sqrt(8)
    mha = MultiheadAttention(24, 3)
    fw.assign(mha.in_proj_weight, r["mha_in_proj_weight"], "float64")
    fw.assign(mha.in_proj_bias, r["mha_in_proj_bias"], "float64")
    fw.assign(mha.out_proj.weight, r["mha_out_proj_weight"], "float64")
    fw.assign(mha.out_proj.bias, r["mha_out_proj_bias"], "float64")
    q = v(r["mha_q"])
    close(mha(q, q, q)[0], r["mha_out"], atol=1e-13)
    # inverse_sigmoid: clamp bounds at eps = 1e-5 exactly
    close(inverse_sigmoid(v(r["inv_x"])), r["inv_y"], atol=1e-13)
    # AdamW + clip_grad_norm, 3 steps, group overrides
    ps = [v(r[f"p0_{i}"]) for i in range(2)]
    opt = AdamW([{"names": ["a"], "params": ps[:1]},
                 {"names": ["b"], "params": ps[1:], "lr": 3e-4, "weight_decay": 0.0}],
                lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    for s in range(3):
        grads = {n: v(r[f"g{s}_{i}"]) for i, n in enumerate("ab")}
        assert abs(clip_grad_norm(grads, 0.1) - r["norms"][s]) <= 1e-13 * r["norms"][s]
        opt.step(grads)
        for i in range(2):
            close(ps[i], r[f"p{i}_step{s}"], atol=1e-15)
