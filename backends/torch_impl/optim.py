"""Optimiser parameter groups (official regex rules), AdamW and gradient clipping."""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Union

import torch
import torch.nn as nn

from rtdetr_core.config import RTDETRConfig


def build_param_groups(model: nn.Module, cfg: RTDETRConfig) -> List[Dict[str, object]]:
    """Official ``YAMLConfig.get_optim_params``: each config group takes the trainable
    parameters whose name has a ``re.findall`` hit for its regex; a parameter matched by
    several groups goes to the first (the official code would put it in both and torch
    would refuse); unmatched trainable parameters form one last group with the optimiser
    defaults (only when there are any).

    Quirk kept: the regexes test for 'bias' / 'norm' in the *name*, so BN / LayerNorm scales
    named like ``input_proj.0.1.weight`` or ``enc_output.1.weight`` keep weight decay.

    Returns a list of {"names": [str], "params": [Parameter], optional "lr", "weight_decay"}
    in group order, parameters in state_dict order.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups: List[Dict[str, object]] = []
    taken = set()
    for g in cfg.optimizer.groups:
        pat = re.compile(g.params)
        names = [n for n, _ in named if n not in taken and len(pat.findall(n)) > 0]
        taken.update(names)
        group: Dict[str, object] = {"names": names}
        if g.lr is not None:
            group["lr"] = g.lr
        if g.weight_decay is not None:
            group["weight_decay"] = g.weight_decay
        groups.append(group)
    rest = [n for n, _ in named if n not in taken]
    if rest:
        groups.append({"names": rest})
    lookup = dict(named)
    for group in groups:
        group["params"] = [lookup[n] for n in group["names"]]
    return groups


def build_optimizer(model: nn.Module, cfg: RTDETRConfig) -> torch.optim.Optimizer:
    """AdamW over the official groups (lr / betas / eps / weight decay defaults from cfg)."""
    o = cfg.optimizer
    if o.type != "AdamW":
        raise ValueError(f"unsupported optimizer {o.type!r} (AdamW)")
    groups = [{k: v for k, v in g.items() if k != "names"} for g in build_param_groups(model, cfg)]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def clip_grad_norm(grads: Union[Mapping[str, torch.Tensor], Iterable[torch.Tensor]], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ (L2), in place: every gradient is multiplied by
    min(max_norm / (total_norm + 1e-6), 1).  Returns the total norm before clipping.

    ``grads``: parameters (their ``.grad`` is clipped, the official call) or a name -> grad
    tensor dict (the Jittor backend's form; Jittor keeps gradients apart from parameters).
    max_norm <= 0: nothing is clipped, the norm is still returned.
    """
    if isinstance(grads, Mapping):
        tensors = [g for g in grads.values() if g is not None]
    else:
        tensors = [p.grad for p in grads if p.grad is not None]
    if not tensors:
        return 0.0
    total = torch.nn.utils.get_total_norm(tensors, 2.0)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        with torch.no_grad():
            for g in tensors:
                g.mul_(coef.to(g.device))
    return float(total)
