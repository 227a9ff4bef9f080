"""The comparisons of a ``parity run --stage forward|grad``: every tensor of the candidate
(Jittor) result against the base (PyTorch) one, with the float64 reference's noise floor,
in forward order (then decisions, losses, gradients in backward order, the optimiser step),
and the run's groups, first divergence and worst gradient modules (``build_result``)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from parity.fileio import read_npz_meta
from parity.judge import compare as C, decisions as D, summary as S


GROUP_ORDER = ("intermediates", "outputs", "train_intermediates", "train_outputs", "train_buffers", "decisions",
               "losses", "grads", "step")


def _grad_order(names: Sequence[str]) -> List[str]:
    """Backward order: decoder, then encoder, then backbone; within a part, reverse spec order."""
    rank = {"decoder": 0, "encoder": 1, "backbone": 2}
    idx = {n: i for i, n in enumerate(names)}
    return sorted(names, key=lambda n: (rank.get(n.split(".", 1)[0], 3), -idx[n]))


def compare_results(stage: str, dtype: str, base_path: str, cand_path: str, ref_path: Optional[str],
                    thresholds, *, cand_shared: Dict[str, bool], cand_side: str = "jittor",
                    before: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, Any]:
    """Every comparison of a run, in forward order (then backward order for gradients).
    ``before``: the weights the optimiser step started from (the case's), for the step
    group's update rule."""
    ths = thresholds.for_run(stage, dtype)
    zb = np.load(base_path, allow_pickle=False)
    zc = np.load(cand_path, allow_pickle=False)
    zr = np.load(ref_path, allow_pickle=False) if ref_path else None
    mb, mc = read_npz_meta(zb), read_npz_meta(zc)
    entries: List[Dict[str, Any]] = []
    warnings: List[str] = []
    fc, fb = set(zc.files), set(zb.files)

    def missing(name, group, key, module=None):
        entries.append({"name": name, "group": group, "kind": "missing", "module": module or name,
                        "passed": False, "rule": None, "shape": list(zb[key].shape),
                        "reason": f"missing on the {cand_side} side (contract: every name of backends/README.md)"})

    def only_cand(name, group, mode=None, module=None):
        """A name only the candidate records: the contract differs, which fails like a missing one."""
        entries.append({"name": name, "group": group, "kind": "missing", "module": module or name,
                        "passed": False, "rule": None, "shape": [], "mode": mode,
                        "reason": f"recorded only on the {cand_side} side, missing on the base side"})

    def extras(kind, group, name_of, module_of=None, mode=None):
        """Every name of the candidate's order list ``kind`` that the base lacks fails."""
        known = set(mb.get("order", {}).get(kind, []))
        for n in mc.get("order", {}).get(kind, []):
            if n not in known:
                only_cand(name_of(n), group, mode, module_of(n) if module_of else None)

    def ref_of(key):
        if zr is None or key not in zr.files:
            return None
        return zr[key]

    def one(key, name, group, module=None, prior=None, mode="eval" if stage == "forward" else "train"):
        if key not in fc:
            missing(name, group, key, module)
        else:
            b, c = zb[key], zc[key]
            if b.dtype.kind in "iub" or c.dtype.kind in "iub":
                if name.endswith("enc_topk_index"):
                    kp = "train/" if key.startswith("train/") else ""
                    shared = cand_shared.get("train_topk" if kp else "topk", False)
                    e = _judge_topk(name, kp, zc, zb, zr, thresholds, dtype, shared)
                    e["module"] = module or name
                else:
                    e = C.judge_exact(name, group, c, b, module=module)
            else:
                e = C.judge_tensor(name, group, c, b, ref_of(key), ths[group], module=module, before=prior)
            entries.append(e)
        entries[-1]["mode"] = mode       # first_divergence looks upstream within one forward pass

    # 1. intermediates (forward order), outputs; the forward stage then does the same for its
    #    train-mode pass (BN batch statistics): groups train_intermediates / train_outputs,
    #    names and modules prefixed "train."
    passes = [("", "", "intermediates", "outputs", "eval" if stage == "forward" else "train")]
    if stage == "forward":
        passes.append(("train/", "train.", "train_intermediates", "train_outputs", "train"))
    for kp, name_pre, g_int, g_out, mode in passes:
        inter = mb.get("order", {}).get(kp + "intermediates", [])
        if kp and not inter:
            continue          # a result written before the forward stage had a train-mode pass
        for n in inter:
            one(f"{kp}int/{n}", name_pre + n, g_out if n in ("pred_logits", "pred_boxes") else g_int,
                module=name_pre + n if name_pre else None, mode=mode)
        for n in mc.get("order", {}).get(kp + "intermediates", []):
            if n not in set(inter):
                only_cand(name_pre + n, g_int, mode)
        for n in mb.get("order", {}).get(kp + "outputs", []):
            if n in inter:
                continue          # the same tensor as the intermediate of that name
            one(f"{kp}out/{n}", f"{name_pre}outputs.{n}", g_out, module=name_pre + "outputs", mode=mode)
        extras(kp + "outputs", g_out, lambda n: f"{name_pre}outputs.{n}", lambda n: name_pre + "outputs", mode)

    if stage == "forward" and mb.get("order", {}).get("train/buffers"):
        # BatchNorm running statistics after the train-mode pass, judged on their update
        for n in mb["order"]["train/buffers"]:
            one(f"train/buf/{n}", f"train.buffer.{n}", "train_buffers", module="train." + S.module_of(n),
                prior=None if before is None else before.get(n), mode="train")
        extras("train/buffers", "train_buffers", lambda n: f"train.buffer.{n}", lambda n: "train." + S.module_of(n),
               "train")
    if stage == "grad":
        # 2. the matching costs (continuous: a wrong cost term may leave every assignment of a
        #    batch unchanged, so only the costs themselves show it), then the decisions
        for call in mb.get("order", {}).get("matches", []):
            key = f"note/match_cost/{call}"
            if key in fb or key in fc:
                if key not in fb:
                    only_cand(f"matcher.cost.{call}", "outputs", "train", "matcher")
                else:
                    one(key, f"matcher.cost.{call}", "outputs", module="matcher")
        for call in mb.get("order", {}).get("matches", []):
            bl, cl = _own_matches(zb, call), _own_matches(zc, call)
            if not cl:
                entries.append({"name": f"matches.{call}", "group": "decisions", "kind": "missing",
                                "module": "matcher", "passed": False, "rule": None, "shape": [],
                                "reason": f"no matches for call '{call}' on the {cand_side} side"})
                continue
            entries.append(_judge_matches(call, cl, bl, zb, zr, thresholds, dtype,
                                          cand_shared.get("matches", False)))
        # 3. losses
        for n in mb.get("order", {}).get("losses", []):
            one(f"loss/{n}", f"loss.{n}", "losses", module="criterion")
        one("loss_total", "loss.total", "losses", module="criterion")
        extras("losses", "losses", lambda n: f"loss.{n}", lambda n: "criterion")
        extras("matches", "decisions", lambda n: f"matches.{n}", lambda n: "matcher")
        # 4. gradients (backward order)
        for n in _grad_order(mb.get("order", {}).get("grads", [])):
            one(f"grad/{n}", f"grad.{n}", "grads", module=S.module_of(n))
        # the total gradient norm clip_grad_norm saw in train_step (a gradient quantity)
        one("step_grad_norm", "grad.total_norm", "grads", module="optimizer")
        extras("grads", "grads", lambda n: f"grad.{n}", S.module_of)
        # 5. parameters (and BN statistics) after one optimiser step
        for n in mb.get("order", {}).get("step", []):
            one(f"step/{n}", f"step.{n}", "step", module=S.module_of(n),
                prior=None if before is None else before.get(n))
            if not entries[-1]["passed"] and zr is not None and before is not None and n in before:
                _near_zero_gradient(entries[-1], n, zb, zc, zr, before[n])
        extras("step", "step", lambda n: f"step.{n}", S.module_of)
    zb.close()
    zc.close()
    if zr is not None:
        zr.close()
    for m, side in ((mc, cand_side),):
        for w in m.get("warnings", []):
            warnings.append(f"{side} side: {w}")
    for w in mb.get("warnings", []):
        warnings.append(f"base side: {w}")
    return {"entries": entries, "warnings": warnings}


# ----------------------------------------------------------------------------------------
# decisions: each side's OWN choice (recorded even when another's was injected), classified
# against float32's noise on the exact scores / costs (parity/judge/decisions.py)

def _noise_args(zb, zr, thresholds, dtype):
    """(base-dtype evidence file, exact evidence file, noise_rel): float32 with a float64
    reference judges against T32-vs-T64 noise; a float64 run (or float32 without a
    reference, then marked by a crude float32 bound) against a relative rounding bound."""
    if zr is not None:
        return zb, zr, None
    return zb, zb, thresholds.float64_noise_rel if dtype == "float64" else 16 * D.EPS32


def _own_topk(z, kp: str):
    for key in (kp + "note/topk_own", kp + "dec/topk", kp + "int/decoder.enc_topk_index"):
        if key in z.files:
            return z[key]
    return None


def _own_matches(z, call: str) -> List[np.ndarray]:
    for pre in (f"note/match_own/{call}/", f"match/{call}/"):
        keys = sorted((k for k in z.files if k.startswith(pre)), key=lambda k: int(k.rsplit("/", 1)[1]))
        if keys:
            return [z[k] for k in keys]
    return []


def _judge_topk(name, kp, zc, zb, zr, thresholds, dtype, shared):
    own_c, own_b = _own_topk(zc, kp), _own_topk(zb, kp)
    zs, ze, nrel = _noise_args(zb, zr, thresholds, dtype)
    sk = kp + "note/topk_scores"
    cls = None
    if sk in zs.files and sk in ze.files:
        cls = D.classify_topk(own_c, own_b, zs[sk], ze[sk], k=thresholds.tie_k, noise_rel=nrel)
    return C.judge_topk(name, own_c, own_b, cls, shared=shared)


def _judge_matches(call, cl, bl, zb, zr, thresholds, dtype, shared):
    zs, ze, nrel = _noise_args(zb, zr, thresholds, dtype)
    ck = f"note/match_cost/{call}"
    sizes = [np.asarray(m).reshape(2, -1).shape[1] for m in bl]
    cls = None
    if ck in zs.files and ck in ze.files:
        cls = D.classify_matches(cl, bl, zs[ck], ze[ck], sizes, k=thresholds.tie_k, noise_rel=nrel)
    elif sum(sizes) == 0:
        cls = D.classify_matches(cl, bl, None, None, sizes, k=thresholds.tie_k, noise_rel=nrel)
    return C.judge_matches(f"matches.{call}", cl, bl, cls, shared=shared)


ADAM_EPS = 1e-8     # the official AdamW eps: an element with |g| near it steps by a fraction of lr


def _near_zero_gradient(e, n, zb, zc, zr, before) -> None:
    """Evidence for a failing float32 step tensor: the share of its update error (candidate vs
    the float64 reference) held by elements whose gradient lies within float32's own noise
    of zero, i.e. where |g32 - g64| >= 0.1 (|g64| + eps) on either side -- there AdamW's
    g/(|g|+eps) is decided by rounding.  A wrong learning rate, bias correction or weight
    decay moves every element instead."""
    key = f"grad/{n}"
    if key not in zr.files or key not in zb.files or key not in zc.files:
        return
    g64 = zr[key].astype(np.float64)
    noise = np.maximum(np.abs(zb[key] - g64), np.abs(zc[key] - g64))
    sensitive = noise >= 0.1 * (np.abs(g64) + ADAM_EPS)
    b0 = np.asarray(before, dtype=np.float64)
    d2 = ((zc[f"step/{n}"].astype(np.float64) - b0) - (zr[f"step/{n}"].astype(np.float64) - b0)) ** 2
    tot = float(d2.sum())
    if tot > 0 and sensitive.shape == d2.shape:
        e["near_zero_grad"] = {"share": float(d2[sensitive].sum()) / tot, "elements": int(sensitive.sum()),
                               "n": int(sensitive.size)}


def decisions_agree(base_path: str, cand_path: str) -> bool:
    """True when the candidate's own decisions (top-k of both passes, every assignment)
    equal the base side's: no re-run with shared decisions is needed."""
    with np.load(base_path, allow_pickle=False) as zb, np.load(cand_path, allow_pickle=False) as zc:
        for kp in ("", "train/"):
            b, c = _own_topk(zb, kp), _own_topk(zc, kp)
            if (b is None) != (c is None) or (b is not None and not np.array_equal(b, c)):
                return False
        for call in read_npz_meta(zb).get("order", {}).get("matches", []):
            bl, cl = _own_matches(zb, call), _own_matches(zc, call)
            if len(bl) != len(cl) or any(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(bl, cl)):
                return False
    return True


# ----------------------------------------------------------------------------------------


def build_result(stage, dtype, entries, labels) -> Dict[str, Any]:
    present = [g for g in GROUP_ORDER if any(e["group"] == g for e in entries)]
    groups = S.group_summary(entries, present)
    fd = S.first_divergence(entries)
    res: Dict[str, Any] = {"labels": labels, "groups": groups, "first_divergence": fd or None}
    grads = [e for e in entries if e["group"] == "grads"]
    if grads:
        res["grads_by_module"] = S.by_module(grads)
        res["grads_worst_first"] = [e["name"] for e in sorted(grads, key=S.severity, reverse=True)]
    return res


def pair_result(stage: str, dt: str, cmpd: Dict[str, Any], labels: Dict[str, str], thresholds,
                base_info: Dict[str, Any], decisions_rerun: Optional[Dict[str, str]]) -> Dict[str, Any]:
    """The result of one comparison (candidate vs base, with the reference's floor in float32):
    the run's facts (``base_info``), the groups, first divergence, every tensor, the verdict."""
    entries = cmpd["entries"]
    res = dict(base_info)
    res.update(dtype=dt, labels=labels, reference="ref" in labels)
    res.update(build_result(stage, dt, entries, labels))
    passed = all(e["passed"] for e in entries)
    res.update(status="pass" if passed else "fail", passed=passed, exit_code=0 if passed else 1,
               thresholds={g: t.to_dict() for g, t in thresholds.for_run(stage, dt).items()},
               warnings=cmpd["warnings"], tensors=entries, decisions_rerun=decisions_rerun)
    return res
