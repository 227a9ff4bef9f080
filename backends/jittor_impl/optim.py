"""Official optimiser: regex parameter groups, AdamW, gradient clipping.

``YAMLConfig.get_optim_params``: each group's regex is matched with ``re.findall`` against
every trainable parameter name, the first group that matches a name takes it, the rest go to
a last default group.  Quirk kept: 1-D tensors whose names hold neither 'bias' nor 'norm'
(input_proj BN scales, enc_output LayerNorm scale) fall in decayed groups."""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List

import numpy as np

from . import framework as fw
from . import optim_kernels
from .framework import jt, scalar, update_


def trainable_parameters(model) -> "OrderedDict[str, jt.Var]":
    """name -> Var of every trainable parameter, state_dict order (buffers and frozen
    parameters are stop_grad in this backend)."""
    return OrderedDict((k, v) for k, v in model.state_dict().items() if fw.is_trainable(v))


def build_param_groups(model, cfg) -> List[dict]:
    """-> [{"names": [str], "params": [Var], optional "lr", "weight_decay"}, ...] in group
    order, parameters in state_dict order.  A name matched by several regexes goes to the
    first (the official code would put it in both and torch would refuse); unmatched
    trainable parameters form one last group with the optimiser defaults (if any)."""
    named = trainable_parameters(model)
    groups, taken = [], set()
    for g in cfg.optimizer.groups:
        pat = re.compile(g.params)
        names = [n for n in named if n not in taken and len(pat.findall(n)) > 0]
        taken.update(names)
        group = {"names": names}
        if g.lr is not None:
            group["lr"] = g.lr
        if g.weight_decay is not None:
            group["weight_decay"] = g.weight_decay
        groups.append(group)
    rest = [n for n in named if n not in taken]
    if rest:
        groups.append({"names": rest})
    for group in groups:
        group["params"] = [named[n] for n in group["names"]]
    return groups


def build_optimizer(model, cfg) -> AdamW:
    o = cfg.optimizer
    if o.type != "AdamW":
        raise ValueError(f"optimizer {o.type!r} not supported (AdamW)")
    return AdamW(build_param_groups(model, cfg), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                 weight_decay=o.weight_decay)


def clip_grad_norm(grads: Dict[str, jt.Var], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_(norm_type=2) on a name -> grad dict, in place.
    Returns the total norm before clipping (per-tensor norms, then the norm of norms,
    accumulated in float64).  max_norm <= 0: no clipping, norm still returned."""
    items = [(k, g) for k, g in grads.items() if g is not None]
    if not items:
        return 0.0
    if optim_kernels.use_kernel():                   # one op per 64 gradients, below
        norms = [float(n) for n in optim_kernels.grad_norms([g for _, g in items])]
    else:
        lazy = [jt.sqrt((g.float64() ** 2).sum()) for _, g in items]
        jt.sync(lazy)                                # one execution, not one per .item()
        norms = [float(n.item()) for n in lazy]
    total = float(np.sqrt(sum(n ** 2 for n in norms)))
    if max_norm > 0:
        coef = min(max_norm / (total + 1e-6), 1.0)
        for k, g in items:
            grads[k] = (g * fw.scalar(coef, g)).stop_grad()
    return total


def export_optimizer_state(opt: AdamW, names) -> "OrderedDict[str, np.ndarray]":
    """``optimizer.lr.<i>`` float64 [] per group, then for every parameter (``names`` order)
    with AdamW state ``optimizer.state.<name>.{step (int64 []), exp_avg, exp_avg_sq}``."""
    out = OrderedDict((f"optimizer.lr.{i}", np.array(float(g["lr"]), dtype=np.float64))
                      for i, g in enumerate(opt.param_groups))
    for n in names:
        st = opt.state.get(n)
        if st:
            out[f"optimizer.state.{n}.step"] = np.array(int(st["step"]), dtype=np.int64)
            out[f"optimizer.state.{n}.exp_avg"] = fw.to_numpy(st["exp_avg"])
            out[f"optimizer.state.{n}.exp_avg_sq"] = fw.to_numpy(st["exp_avg_sq"])
    return out


def parse_optimizer_state(opt: AdamW, state, shapes) -> tuple:
    """Split ``export_optimizer_state`` keys of ``state`` -> (lrs {i: lr}, moments {name:
    {step, exp_avg, exp_avg_sq}}, problems); ``shapes``: trainable name -> shape."""
    lrs, moments, problems = {}, {}, []
    for k, v in state.items():
        if k.startswith("optimizer.lr."):
            lrs[int(k.rsplit(".", 1)[1])] = float(np.asarray(v))
        elif k.startswith("optimizer.state."):
            name, field = k[len("optimizer.state."):].rsplit(".", 1)
            if name not in shapes or field not in ("step", "exp_avg", "exp_avg_sq"):
                problems.append(f"unexpected: {k}")
            else:
                moments.setdefault(name, {})[field] = np.asarray(v)
    if sorted(lrs) != list(range(len(opt.param_groups))):
        problems.append(f"optimizer.lr.*: {len(lrs)} groups in the state, the optimiser has {len(opt.param_groups)}")
    for name, m in moments.items():
        if set(m) != {"step", "exp_avg", "exp_avg_sq"}:
            problems.append(f"optimizer.state.{name}: incomplete ({sorted(m)})")
        elif m["exp_avg"].shape != shapes[name] or m["exp_avg_sq"].shape != shapes[name]:
            problems.append(f"optimizer.state.{name}: shape {m['exp_avg'].shape}, expected {shapes[name]}")
    return lrs, moments, problems


def load_optimizer_state(opt: AdamW, lrs, moments, dtype: str) -> None:
    for i, g in enumerate(opt.param_groups):
        g["lr"] = lrs[i]
    opt.state.clear()
    for name, m in moments.items():
        opt.state[name] = {"step": int(m["step"]),
                           "exp_avg": fw.constant(m["exp_avg"], dtype),
                           "exp_avg_sq": fw.constant(m["exp_avg_sq"], dtype)}


class AdamW:
    """torch.optim.AdamW (single-tensor loop) over explicit gradients.  Jittor's AdamW has
    weight_decay 0 by default, decays parameters without gradient and counts every
    ``opt.backward()`` as a step.  ``step(grads)``: name -> grad, None = skipped entirely
    (torch skips grad None); one count per parameter and step.  Groups {"names", "params", ...}."""

    def __init__(self, param_groups, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        self.defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.param_groups = [{**self.defaults, **g} for g in param_groups]
        self.state = {}                     # name -> {"step", "exp_avg", "exp_avg_sq"}

    def step(self, grads) -> None:
        touched, fused, states = [], [], []
        for g in self.param_groups:
            lr, wd, eps = g["lr"], g["weight_decay"], g["eps"]
            b1, b2 = g["betas"]
            for name, p in zip(g["names"], g["params"]):
                grad = grads.get(name)
                if grad is None:
                    continue
                st = self.state.setdefault(name, {"step": 0, "exp_avg": jt.zeros_like(p).stop_grad(),
                                                  "exp_avg_sq": jt.zeros_like(p).stop_grad()})
                st["step"] += 1
                t = st["step"]
                # (1 - b1, b2, 1 - b2, sqrt(1 - b2^t), eps, 1 - lr wd, lr / (1 - b1^t))
                s = (1 - b1, b2, 1 - b2, float(np.sqrt(1 - b2 ** t)), eps, 1 - lr * wd, lr / (1 - b1 ** t))
                if optim_kernels.use_kernel():             # many parameters per op, below
                    fused.append((p, grad, st["exp_avg"], st["exp_avg_sq"], s))
                    states.append(st)
                    continue
                c = lambda v: scalar(v, p)                                   # exact in float64
                m = st["exp_avg"] + (grad - st["exp_avg"]) * c(s[0])         # lerp, as torch
                v = st["exp_avg_sq"] * c(s[1]) + grad * grad * c(s[2])
                denom = jt.sqrt(v) / c(s[3]) + c(s[4])
                new = p * c(s[5]) - m / denom * c(s[6])                      # decay, then step
                self._store(p, st, new, m, v, touched)
        if fused:
            for (p, *_), st, (new, m, v) in zip(fused, states, optim_kernels.adamw_update(fused)):
                self._store(p, st, new, m, v, touched)
        jt.sync(touched)

    @staticmethod
    def _store(p, st, new, m, v, touched) -> None:
        update_(p, new)
        update_(st["exp_avg"], m)
        update_(st["exp_avg_sq"], v)
        touched += [p, st["exp_avg"], st["exp_avg_sq"]]
