"""Record the PyTorch values the Jittor pitfall tests compare against.

Run in the torch environment (never imported by the Jittor backend):
    .venvs/torch/bin/python tests/data/pitfalls/make_pitfall_refs.py
Writes one small ``<pitfall>.npz`` per pitfall next to this file: the inputs (numpy,
seeded) and torch's outputs / gradients.  tests/test_jittor_pitfalls.py reads them.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

OUT = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(1)


def save(name, **arrays):
    arrays = {k: (v.detach().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in arrays.items()}
    np.savez_compressed(os.path.join(OUT, f"{name}.npz"), **arrays)
    print(f"{name}.npz: {', '.join(sorted(arrays))}")


def t(a, grad=False):
    x = torch.from_numpy(np.array(a))
    return x.requires_grad_(grad) if grad else x


def ieee():
    """-Ofast -> -O2: NaN checks, denormals, log_softmax at large logits."""
    x = np.array([1.0, np.nan, -1.0, 0.0], dtype=np.float32)
    tiny = np.array([1e-45, 1e-40, 1e-38], dtype=np.float32)
    logits = np.array([[1000.0, 999.0, 998.0, 990.0]], dtype=np.float32)
    save("ieee", x=x, isnan=(t(x) != t(x)), gt0=(t(x) > 0), tiny=tiny, log_tiny=torch.log(t(tiny)),
         logits=logits, log_softmax=F.log_softmax(t(logits), -1))


def batchnorm():
    """train: two-pass stats, unbiased running_var, num_batches_tracked; eval; grads."""
    rng = np.random.default_rng(1)
    x = (50 + rng.normal(0, 0.5, (2, 8, 6, 6))).astype(np.float32)
    w = (1 + rng.normal(0, 0.1, 8)).astype(np.float32)
    b = rng.normal(0, 0.1, 8).astype(np.float32)
    rm = rng.normal(0, 0.1, 8).astype(np.float32)
    rv = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    g = rng.normal(0, 1, x.shape).astype(np.float32)
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.copy_(t(w)); bn.bias.copy_(t(b)); bn.running_mean.copy_(t(rm)); bn.running_var.copy_(t(rv))
    xt = t(x, True)
    y = bn(xt)
    y.backward(t(g))
    y2 = bn(t(x))          # second train forward: counter 2
    bn.eval()
    xe = t(x, True)
    ye = bn(xe)
    ye.backward(t(g))
    save("batchnorm", x=x, w=w, b=b, rm=rm, rv=rv, g=g, y_train=y, dx_train=xt.grad,
         running_mean=bn.running_mean, running_var=bn.running_var, num_batches_tracked=bn.num_batches_tracked,
         y_eval=ye, dx_eval=xe.grad, keys=np.array(list(bn.state_dict())))


def layernorm():
    rng = np.random.default_rng(2)
    x = (20 + rng.normal(0, 1, (3, 5, 16))).astype(np.float32)
    w = (1 + rng.normal(0, 0.1, 16)).astype(np.float32)
    b = rng.normal(0, 0.1, 16).astype(np.float32)
    g = rng.normal(0, 1, x.shape).astype(np.float32)
    ln = nn.LayerNorm(16)
    with torch.no_grad():
        ln.weight.copy_(t(w)); ln.bias.copy_(t(b))
    xt = t(x, True)
    y = ln(xt)
    y.backward(t(g))
    save("layernorm", x=x, w=w, b=b, g=g, y=y, dx=xt.grad, dw=ln.weight.grad, db=ln.bias.grad)


def eval_grads():
    """eval() does not stop gradients in torch: conv + BN(eval) weight grads."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (2, 3, 5, 5)).astype(np.float32)
    cw = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    with torch.no_grad():
        m[0].weight.copy_(t(cw)); m[1].running_mean.fill_(0.1); m[1].running_var.fill_(2.0)
    m.eval()
    m(t(x)).square().sum().backward()
    save("eval_grads", x=x, cw=cw, dcw=m[0].weight.grad, dbw=m[1].weight.grad, dbb=m[1].bias.grad)


def adamw_clip():
    """3 AdamW steps, 2 groups (one with lr/wd overrides), one param with no grad at step 2,
    clip_grad_norm_ before each step."""
    rng = np.random.default_rng(4)
    p0 = [rng.normal(0, 1, s).astype(np.float32) for s in [(3, 4), (4,), (5,)]]
    grads = [[rng.normal(0, 1, s).astype(np.float32) for s in [(3, 4), (4,), (5,)]] for _ in range(3)]
    ps = [nn.Parameter(t(a.copy())) for a in p0]
    opt = torch.optim.AdamW([{"params": ps[:2], "weight_decay": 0.05}, {"params": ps[2:], "lr": 1e-3, "weight_decay": 0.0}],
                            lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    out, norms = {}, []
    for s in range(3):
        opt.zero_grad(set_to_none=True)
        for i, p in enumerate(ps):
            if not (s == 1 and i == 1):        # param 1 gets no gradient at step 2
                p.grad = t(grads[s][i].copy())
        norms.append(float(torch.nn.utils.clip_grad_norm_([p for p in ps if p.grad is not None], 0.5)))
        opt.step()
        for i, p in enumerate(ps):
            out[f"p{i}_step{s}"] = p.detach().clone()
    save("adamw_clip", **{f"p0_{i}": a for i, a in enumerate(p0)},
         **{f"g{s}_{i}": grads[s][i] for s in range(3) for i in range(3)}, **out, norms=np.array(norms))


def adamw_update():
    """One AdamW step from a given state (step 3), 2 groups, float32 and float64, 2 x 2,053
    values per dtype (odd lengths: vector tails): the kernel of
    backends/jittor_impl/optim_kernels.py follows torch's arithmetic."""
    rng = np.random.default_rng(11)
    out = {}
    for dt in ("float32", "float64"):
        p0 = [rng.normal(0, 1, 2053).astype(dt) for _ in range(2)]
        g = [rng.normal(0, 1, 2053).astype(dt) for _ in range(2)]
        m0 = [rng.normal(0, 0.1, 2053).astype(dt) for _ in range(2)]
        v0 = [(rng.random(2053) * 0.01).astype(dt) for _ in range(2)]
        ps = [nn.Parameter(t(a.copy())) for a in p0]
        opt = torch.optim.AdamW([{"params": ps[:1]}, {"params": ps[1:], "lr": 3e-3, "weight_decay": 0.0}],
                                lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
        for i, p in enumerate(ps):
            p.grad = t(g[i].copy())
            opt.state[p] = {"step": torch.tensor(2.0), "exp_avg": t(m0[i].copy()), "exp_avg_sq": t(v0[i].copy())}
        opt.step()
        for i, p in enumerate(ps):
            out.update({f"{dt}_p0_{i}": p0[i], f"{dt}_g_{i}": g[i], f"{dt}_m0_{i}": m0[i], f"{dt}_v0_{i}": v0[i],
                        f"{dt}_p_{i}": p.detach().clone(), f"{dt}_m_{i}": opt.state[p]["exp_avg"],
                        f"{dt}_v_{i}": opt.state[p]["exp_avg_sq"]})
    save("adamw_update", **out)


def load_cast():
    """torch load_state_dict copies a float64 array into a float32 parameter (cast)."""
    a = np.random.default_rng(5).normal(0, 1, (4, 3)) * (1 + 1e-9)
    lin = nn.Linear(3, 4)
    lin.load_state_dict({"weight": t(a), "bias": t(np.zeros(4))})
    save("load_cast", a=a, weight=lin.weight, dtype=np.array(str(lin.weight.dtype)))


def float64():
    """float64 arrays stay float64 (Jittor's auto_convert_64_to_32 would drop them)."""
    x = np.array([1e-300, 1e300, 1.0 + 1e-12, -3.5], dtype=np.float64)
    save("float64", x=x, exp_neg=torch.exp(-t(np.abs(x[2:]))), x_out=t(x) * 1.0,
         sig=torch.sigmoid(t(np.array([-40.0, -1e-12, 0.3, 40.0]))))


def interpolate():
    """nearest resize, torch index rule (Jittor differs at e.g. x0.7)."""
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, (1, 2, 5, 6)).astype(np.float32)
    x2 = rng.normal(0, 1, (1, 1, 10, 10)).astype(np.float32)
    save("interpolate", x=x, x2=x2, up2=F.interpolate(t(x), scale_factor=2.0, mode="nearest"),
         to34=F.interpolate(t(x), size=[3, 4], mode="nearest"), to79=F.interpolate(t(x), size=[7, 9], mode="nearest"),
         x2_to7=F.interpolate(t(x2), size=[7, 7]), x2_to13=F.interpolate(t(x2), size=[13, 13]))


def embedding():
    rng = np.random.default_rng(7)
    w = rng.normal(0, 1, (5, 3)).astype(np.float32)       # padding row 4 is NOT zero
    idx = np.array([[4, 1, 4], [2, 0, 4]], dtype=np.int64)
    g = rng.normal(0, 1, (2, 3, 3)).astype(np.float32)
    emb = nn.Embedding(5, 3, padding_idx=4)
    with torch.no_grad():
        emb.weight.copy_(t(w))
    y = emb(t(idx))
    y.backward(t(g))
    save("embedding", w=w, idx=idx, g=g, y=y, dw=emb.weight.grad)


def topk_max():
    rng = np.random.default_rng(8)
    s = rng.permutation(2 * 500).reshape(2, 500).astype(np.float32) / 7.0   # tie-free
    ties = np.array([1, 3, 3, 2, 3, 1, 0, 3], dtype=np.float32)
    v, i = torch.topk(t(s), 50, dim=1)
    tv, ti = torch.topk(t(ties), 4)
    x = rng.normal(0, 1, (3, 7)).astype(np.float32)
    mv = t(x).max(-1)
    save("topk_max", s=s, values=v, index=i, ties=ties, tie_values=tv, tie_index=ti, x=x,
         max_values=mv.values, argmax=t(x).argmax(-1))


def mha():
    rng = np.random.default_rng(9)
    e, h, L = 8, 2, 6
    q = rng.normal(0, 1, (2, L, e)).astype(np.float32)
    v = rng.normal(0, 1, (2, L, e)).astype(np.float32)
    w_in = rng.normal(0, 0.3, (3 * e, e)).astype(np.float32)
    b_in = rng.normal(0, 0.1, 3 * e).astype(np.float32)
    w_out = rng.normal(0, 0.3, (e, e)).astype(np.float32)
    b_out = rng.normal(0, 0.1, e).astype(np.float32)
    mask = np.zeros((L, L), dtype=bool)
    mask[3:, :3] = True
    mask[0, 4] = True
    g = rng.normal(0, 1, (2, L, e)).astype(np.float32)
    m = nn.MultiheadAttention(e, h, batch_first=True)
    with torch.no_grad():
        m.in_proj_weight.copy_(t(w_in)); m.in_proj_bias.copy_(t(b_in))
        m.out_proj.weight.copy_(t(w_out)); m.out_proj.bias.copy_(t(b_out))
    qt = t(q, True)
    y, _ = m(qt, qt, t(v), attn_mask=t(mask), need_weights=False)
    y.backward(t(g))
    save("mha", q=q, v=v, w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out, mask=mask, g=g, y=y,
         dq=qt.grad, dw_in=m.in_proj_weight.grad, keys=np.array(list(m.state_dict())))


def losses_elementwise():
    """BCE-with-logits reduction='none' with weights over saturating logits; L1 'none'."""
    x = np.array([-200.0, -100.0, -30.5, -10.0, -1e-3, 0.0, 2.0, 30.0, 100.0], dtype=np.float32)
    tgt = np.array([0.0, 0.3, 1.0, 0.0, 0.5, 1.0, 0.2, 0.0, 1.0], dtype=np.float32)
    w = np.linspace(0.5, 2.0, x.size).astype(np.float32)
    xt = t(x, True)
    loss = F.binary_cross_entropy_with_logits(xt, t(tgt), weight=t(w), reduction="none")
    loss.sum().backward()
    a = np.array([0.5, 0.25, -1.0, 2.0], dtype=np.float32)
    bb = np.array([0.5, 0.75, -1.0, 1.0], dtype=np.float32)      # exact ties at 0 and 2
    at = t(a, True)
    l1 = F.l1_loss(at, t(bb), reduction="none")
    l1.sum().backward()
    save("losses", x=x, tgt=tgt, w=w, bce=loss, dbce=xt.grad, a=a, b=bb, l1=l1, dl1=at.grad)


def sigmoid_family():
    x = np.array([-200.0, -100.0, -88.0, -40.0, -30.5, -10.0, 0.0, 10.0, 30.0, 100.0], dtype=np.float32)
    xt = t(x, True)
    s = torch.sigmoid(xt)
    s.sum().backward()
    xt2 = t(x, True)
    ls = F.logsigmoid(xt2)
    ls.sum().backward()
    save("sigmoid", x=x, sigmoid=s, dsigmoid=xt.grad, logsigmoid=ls, dlogsigmoid=xt2.grad)


def boundary_grads():
    """clamp includes its bounds, max/min split ties, abs'(0) = 0, inverse_sigmoid."""
    x = np.array([-0.5, 0.0, 0.25, 1.0, 1.5], dtype=np.float32)
    xt = t(x, True)
    torch.clamp(xt, 0.0, 1.0).sum().backward()
    a = np.array([0.1, 0.5, 0.9], dtype=np.float32)
    b = np.array([0.2, 0.5, 0.3], dtype=np.float32)
    at, bt = t(a, True), t(b, True)
    (torch.max(at, bt) * 3 + torch.min(at, bt)).sum().backward()
    z = np.array([-1.0, 0.0, 2.0], dtype=np.float32)
    zt = t(z, True)
    zt.abs().sum().backward()
    u = np.array([0.0, 1e-6, 1e-5, 0.3, 1.0 - 1e-5, 1.0], dtype=np.float32)
    ut = t(u, True)
    uc = ut.clip(min=0.0, max=1.0)
    inv = torch.log(uc.clip(min=1e-5) / (1 - uc).clip(min=1e-5))
    inv.sum().backward()
    save("boundary", x=x, dclamp=xt.grad, a=a, b=b, da=at.grad, db=bt.grad, z=z, dabs=zt.grad,
         u=u, inv=inv, dinv=ut.grad)


def grid_sample_core():
    """grid_sample (bilinear, zeros, align_corners False) and the official deformable
    attention core function, forward and gradients."""
    rng = np.random.default_rng(10)
    value = rng.normal(0, 1, (2, 3, 5, 7)).astype(np.float32)
    grid = rng.uniform(-1.2, 1.2, (2, 4, 3, 2)).astype(np.float32)
    grid[0, 0, 0] = [-1.0, -1.0]
    grid[0, 0, 1] = [1.0, 1.0]
    grid[1, 1, 1] = [0.0, 0.0]
    g = rng.normal(0, 1, (2, 3, 4, 3)).astype(np.float32)
    vt, gt = t(value, True), t(grid, True)
    out = F.grid_sample(vt, gt, mode="bilinear", padding_mode="zeros", align_corners=False)
    out.backward(t(g))
    # deformable core: bs 2, heads 2, c 3, levels (4,5), (2,3), Lq 5, points 2
    shapes = [(4, 5), (2, 3)]
    S = sum(h * w for h, w in shapes)
    val = rng.normal(0, 1, (2, S, 2, 3)).astype(np.float32)
    loc = rng.uniform(-0.05, 1.05, (2, 5, 2, 2, 2, 2)).astype(np.float32)
    aw = rng.uniform(0, 1, (2, 5, 2, 2, 2)).astype(np.float32)
    gc = rng.normal(0, 1, (2, 5, 6)).astype(np.float32)
    valt, loct, awt = t(val, True), t(loc, True), t(aw, True)
    value_list = valt.split([h * w for h, w in shapes], dim=1)
    grids = 2 * loct - 1
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        v_l = value_list[lvl].flatten(2).permute(0, 2, 1).reshape(2 * 2, 3, h, w)
        g_l = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).flatten(0, 1)
        samples.append(F.grid_sample(v_l, g_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    a_ = awt.permute(0, 2, 1, 3, 4).reshape(2 * 2, 1, 5, 4)
    core = (torch.stack(samples, dim=-2).flatten(-2) * a_).sum(-1).reshape(2, 6, 5).permute(0, 2, 1)
    core.backward(t(gc))
    save("grid_sample", value=value, grid=grid, g=g, out=out, dvalue=vt.grad, dgrid=gt.grad,
         val=val, loc=loc, aw=aw, gc=gc, core=core, dval=valt.grad, dloc=loct.grad, daw=awt.grad,
         shapes=np.array(shapes))


def elementwise():
    x = np.linspace(-6, 6, 25).astype(np.float32)
    m = np.random.default_rng(11).normal(0, 3, (2, 3, 4)).astype(np.float32)
    save("elementwise", x=x, gelu=F.gelu(t(x)), silu=F.silu(t(x)), relu=F.relu(t(x)), m=m,
         softmax_last=F.softmax(t(m), dim=-1), softmax_1=F.softmax(t(m), dim=1))


def float64_constants():
    """Float64 graphs whose constants are not float32-representable: BN momentum and
    unbiased factor, LayerNorm/BN eps, GELU's 1/sqrt(2) (value and gradient), attention
    scale 1/sqrt(d), inverse_sigmoid's clamp eps, AdamW hyper-parameters and clipping."""
    rng = np.random.default_rng(21)
    d = torch.float64
    x = rng.normal(0.3, 2.0, (2, 3, 5, 5))
    gy = rng.normal(0, 1, x.shape)
    bn = nn.BatchNorm2d(3).to(d).train()
    xt = t(x, True)
    y = bn(xt)
    y = bn(xt)                                    # two momentum updates
    y.backward(t(gy))
    g = rng.normal(0, 3, 41)
    gt = t(g, True)
    ge = F.gelu(gt)
    ge.backward(torch.ones_like(ge))
    ln = nn.LayerNorm(6).to(d)
    lx = rng.normal(5.0, 1e-2, (4, 6))
    lnx = t(lx, True)
    lo = ln(lnx)
    lo.backward(t(rng.normal(0, 1, lo.shape)))
    q = rng.normal(0, 1, (2, 5, 24))
    mha = nn.MultiheadAttention(24, 3, batch_first=True).to(d)
    with torch.no_grad():
        mha.in_proj_weight.copy_(t(rng.normal(0, 0.3, (72, 24))))
        mha.in_proj_bias.copy_(t(rng.normal(0, 0.1, 72)))
        mha.out_proj.weight.copy_(t(rng.normal(0, 0.3, (24, 24))))
        mha.out_proj.bias.copy_(t(rng.normal(0, 0.1, 24)))
    att = mha(t(q), t(q), t(q), need_weights=False)[0]
    s = np.array([0.0, 1e-6, 3e-6, 0.3, 1 - 1e-6, 1.0])
    st = t(s).clamp(min=0, max=1)
    inv = torch.log(st.clamp(min=1e-5) / (1 - st).clamp(min=1e-5))
    p0 = [rng.normal(0, 1, sh) for sh in [(3, 4), (5,)]]
    grads = [[rng.normal(0, 1, sh) for sh in [(3, 4), (5,)]] for _ in range(3)]
    ps = [nn.Parameter(t(a.copy())) for a in p0]
    opt = torch.optim.AdamW([{"params": ps[:1]}, {"params": ps[1:], "lr": 3e-4, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    steps, norms = {}, []
    for k in range(3):
        opt.zero_grad(set_to_none=True)
        for i, p in enumerate(ps):
            p.grad = t(grads[k][i].copy())
        norms.append(float(torch.nn.utils.clip_grad_norm_(ps, 0.1)))
        opt.step()
        for i, p in enumerate(ps):
            steps[f"p{i}_step{k}"] = p.detach().clone()
    sd = mha.state_dict()
    save("float64_constants", bn_x=x, bn_gy=gy, bn_y=y, bn_gx=xt.grad, bn_gw=bn.weight.grad,
         bn_rm=bn.running_mean, bn_rv=bn.running_var, gelu_x=g, gelu_y=ge, gelu_g=gt.grad,
         ln_x=lx, ln_y=lo, ln_gx=lnx.grad, mha_q=q, mha_out=att,
         **{f"mha_{k.replace('.', '_')}": v for k, v in sd.items()},
         inv_x=s, inv_y=inv, **{f"p0_{i}": a for i, a in enumerate(p0)},
         **{f"g{k}_{i}": grads[k][i] for k in range(3) for i in range(2)}, **steps, norms=np.array(norms))


ALL = (ieee, batchnorm, layernorm, eval_grads, adamw_clip, adamw_update, load_cast, float64, interpolate, embedding,
       topk_max, mha, losses_elementwise, sigmoid_family, boundary_grads, grid_sample_core, elementwise,
       float64_constants)

if __name__ == "__main__":
    import sys
    print("torch", torch.__version__)
    wanted = set(sys.argv[1:])                    # names to (re)record; none = all
    for f in ALL:
        if not wanted or f.__name__ in wanted:
            f()
