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
    cmp_ = _Comparison(stage, dtype, base_path, cand_path, ref_path, thresholds, cand_shared, cand_side, before)
    try:
        cmp_.forward_passes()
        if stage == "forward":
            cmp_.train_buffers()
        if stage == "grad":
            cmp_.matching()
            cmp_.losses()
            cmp_.gradients()
            cmp_.step()
    finally:
        cmp_.close()
    return {"entries": cmp_.entries, "warnings": cmp_.warnings()}


class _Comparison:
    """The result files of one comparison and the entries judged so far."""

    def __init__(self, stage, dtype, base_path, cand_path, ref_path, thresholds, cand_shared, cand_side, before):
        self.stage, self.dtype, self.thresholds = stage, dtype, thresholds
        self.cand_shared, self.cand_side, self.before = cand_shared, cand_side, before
        self.ths = thresholds.for_run(stage, dtype)
        self.zb = np.load(base_path, allow_pickle=False)
        self.zc = np.load(cand_path, allow_pickle=False)
        self.zr = np.load(ref_path, allow_pickle=False) if ref_path else None
        self.mb, self.mc = read_npz_meta(self.zb), read_npz_meta(self.zc)
        self.entries: List[Dict[str, Any]] = []
        self.fc, self.fb = set(self.zc.files), set(self.zb.files)

    def close(self) -> None:
        self.zb.close()
        self.zc.close()
        if self.zr is not None:
            self.zr.close()

    def warnings(self) -> List[str]:
        out = [f"{self.cand_side} side: {w}" for w in self.mc.get("warnings", [])]
        return out + [f"base side: {w}" for w in self.mb.get("warnings", [])]

    def order(self, meta, kind: str) -> List[str]:
        return meta.get("order", {}).get(kind, [])

    # --- entries ----------------------------------------------------------------------------
    def missing(self, name, group, key, module=None):
        self.entries.append({"name": name, "group": group, "kind": "missing", "module": module or name,
                             "passed": False, "rule": None, "shape": list(self.zb[key].shape),
                             "reason": f"missing on the {self.cand_side} side (contract: every name of "
                                       f"backends/README.md)"})

    def only_cand(self, name, group, mode=None, module=None):
        """A name only the candidate records: the contract differs, which fails like a missing one."""
        self.entries.append({"name": name, "group": group, "kind": "missing", "module": module or name,
                             "passed": False, "rule": None, "shape": [], "mode": mode,
                             "reason": f"recorded only on the {self.cand_side} side, missing on the base side"})

    def extras(self, kind, group, name_of, module_of=None, mode=None):
        """Every name of the candidate's order list ``kind`` that the base lacks fails."""
        known = set(self.order(self.mb, kind))
        for n in self.order(self.mc, kind):
            if n not in known:
                self.only_cand(name_of(n), group, mode, module_of(n) if module_of else None)

    def ref_of(self, key):
        if self.zr is None or key not in self.zr.files:
            return None
        return self.zr[key]

    def one(self, key, name, group, module=None, prior=None, mode=None):
        mode = mode or ("eval" if self.stage == "forward" else "train")
        if key not in self.fc:
            self.missing(name, group, key, module)
        else:
            b, c = self.zb[key], self.zc[key]
            if b.dtype.kind in "iub" or c.dtype.kind in "iub":
                if name.endswith("enc_topk_index"):
                    kp = "train/" if key.startswith("train/") else ""
                    shared = self.cand_shared.get("train_topk" if kp else "topk", False)
                    e = _judge_topk(name, kp, self.zc, self.zb, self.zr, self.thresholds, self.dtype, shared)
                    e["module"] = module or name
                else:
                    e = C.judge_exact(name, group, c, b, module=module)
            else:
                e = C.judge_tensor(name, group, c, b, self.ref_of(key), self.ths[group], module=module, before=prior)
            self.entries.append(e)
        self.entries[-1]["mode"] = mode       # first_divergence looks upstream within one forward pass

    def prior(self, n):
        return None if self.before is None else self.before.get(n)

    # --- the groups, in order ------------------------------------------------------------------
    def forward_passes(self) -> None:
        """1. intermediates (forward order), outputs; the forward stage then does the same for its
        train-mode pass (BN batch statistics): groups train_intermediates / train_outputs, names
        and modules prefixed "train."."""
        passes = [("", "", "intermediates", "outputs", "eval" if self.stage == "forward" else "train")]
        if self.stage == "forward":
            passes.append(("train/", "train.", "train_intermediates", "train_outputs", "train"))
        for kp, name_pre, g_int, g_out, mode in passes:
            inter = self.order(self.mb, kp + "intermediates")
            if kp and not inter:
                continue          # a result written before the forward stage had a train-mode pass
            for n in inter:
                self.one(f"{kp}int/{n}", name_pre + n, g_out if n in ("pred_logits", "pred_boxes") else g_int,
                         module=name_pre + n if name_pre else None, mode=mode)
            for n in self.order(self.mc, kp + "intermediates"):
                if n not in set(inter):
                    self.only_cand(name_pre + n, g_int, mode)
            for n in self.order(self.mb, kp + "outputs"):
                if n in inter:
                    continue          # the same tensor as the intermediate of that name
                self.one(f"{kp}out/{n}", f"{name_pre}outputs.{n}", g_out, module=name_pre + "outputs", mode=mode)
            self.extras(kp + "outputs", g_out, lambda n: f"{name_pre}outputs.{n}", lambda n: name_pre + "outputs",
                        mode)

    def train_buffers(self) -> None:
        """BatchNorm running statistics after the train-mode pass, judged on their update."""
        if not self.order(self.mb, "train/buffers"):
            return
        for n in self.mb["order"]["train/buffers"]:
            self.one(f"train/buf/{n}", f"train.buffer.{n}", "train_buffers", module="train." + S.module_of(n),
                     prior=self.prior(n), mode="train")
        self.extras("train/buffers", "train_buffers", lambda n: f"train.buffer.{n}",
                    lambda n: "train." + S.module_of(n), "train")

    def matching(self) -> None:
        """2. the matching costs (continuous: a wrong cost term may leave every assignment of a
        batch unchanged, so only the costs themselves show it), then the decisions."""
        calls = self.order(self.mb, "matches")
        for call in calls:
            key = f"note/match_cost/{call}"
            if key in self.fb or key in self.fc:
                if key not in self.fb:
                    self.only_cand(f"matcher.cost.{call}", "outputs", "train", "matcher")
                else:
                    self.one(key, f"matcher.cost.{call}", "outputs", module="matcher")
        for call in calls:
            bl, cl = _own_matches(self.zb, call), _own_matches(self.zc, call)
            if not cl:
                self.entries.append({"name": f"matches.{call}", "group": "decisions", "kind": "missing",
                                     "module": "matcher", "passed": False, "rule": None, "shape": [],
                                     "reason": f"no matches for call '{call}' on the {self.cand_side} side"})
                continue
            self.entries.append(_judge_matches(call, cl, bl, self.zb, self.zr, self.thresholds, self.dtype,
                                               self.cand_shared.get("matches", False)))

    def losses(self) -> None:
        """3. every loss term and the total."""
        for n in self.order(self.mb, "losses"):
            self.one(f"loss/{n}", f"loss.{n}", "losses", module="criterion")
        self.one("loss_total", "loss.total", "losses", module="criterion")
        self.extras("losses", "losses", lambda n: f"loss.{n}", lambda n: "criterion")
        self.extras("matches", "decisions", lambda n: f"matches.{n}", lambda n: "matcher")

    def gradients(self) -> None:
        """4. every gradient (backward order), and the total norm clip_grad_norm saw in train_step."""
        for n in _grad_order(self.order(self.mb, "grads")):
            self.one(f"grad/{n}", f"grad.{n}", "grads", module=S.module_of(n))
        self.one("step_grad_norm", "grad.total_norm", "grads", module="optimizer")
        self.extras("grads", "grads", lambda n: f"grad.{n}", S.module_of)

    def step(self) -> None:
        """5. parameters (and BN statistics) after one optimiser step, judged on the update."""
        for n in self.order(self.mb, "step"):
            self.one(f"step/{n}", f"step.{n}", "step", module=S.module_of(n), prior=self.prior(n))
            if (not self.entries[-1]["passed"] and self.zr is not None and self.before is not None
                    and n in self.before):
                _near_zero_gradient(self.entries[-1], n, self.zb, self.zc, self.zr, self.before[n])
        self.extras("step", "step", lambda n: f"step.{n}", S.module_of)


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
    res.update(status="pass" if passed else "fail", passed=passed,
               thresholds={g: t.to_dict() for g, t in thresholds.for_run(stage, dt).items()},
               warnings=cmpd["warnings"], tensors=entries, decisions_rerun=decisions_rerun)
    return res
