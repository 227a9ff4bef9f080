"""RT-DETR's decoder is equivariant to the order of its queries: permuting the encoder's top-k
selection permutes the decoder's outputs the same way, leaves the denoising outputs alone
(the attention mask keeps the two parts apart), and with the assignments permuted alike
gives the same losses and the same gradients.  This is why the harness may classify a top-k
*order flip* as harmless and judge the continuous tensors under one order
(parity/judge/decisions.py).  Checked in float64 in both backends (each test imports its own
framework; tests/run.sh runs each in its environment)."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from rtdetr_core.config import load_config


def _case(tmp_path):
    from parity.case.folder import Case, build_case
    build_case(str(tmp_path), load_config("smoke"), stage="grad", batch_size=2, seed=3)
    return Case(str(tmp_path))


def _check_equivariance(backend: str, tmp_path) -> None:
    case = _case(tmp_path)
    adapter = importlib.import_module(f"backends.{backend}_impl.adapter").Adapter(case.cfg, dtype="float64")
    w = case.weights()
    images, targets = case.inputs()
    images = images.astype(np.float64)
    dn = case.dn_draws()
    adapter.load_weights(w)
    r1 = adapter.loss(images, targets, dn, backward=True, capture=True)
    top1 = r1["intermediates"]["decoder.enc_topk_index"]
    rng = np.random.default_rng(0)
    perm = np.stack([rng.permutation(top1.shape[1]) for _ in range(top1.shape[0])])   # row i of run 2 = row perm[i]
    inv = np.argsort(perm, axis=1)
    top2 = np.take_along_axis(top1, perm, 1)
    matches2 = {c: [np.stack([inv[b][m[0]], m[1]]) for b, m in enumerate(per)] for c, per in r1["matches"].items()}
    adapter.load_weights(w)                       # the first loss moved the BN statistics
    r2 = adapter.loss(images, targets, dn, backward=True, capture=True, topk_index=top2, matches=matches2)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))

    o1, o2 = r1["outputs"], r2["outputs"]
    for key in ("pred_logits", "pred_boxes"):
        assert rel(o2[key], np.take_along_axis(o1[key], perm[..., None], 1)) < 1e-12, key
    assert "dn_aux_outputs" in o1 and len(o1["dn_aux_outputs"]) == len(o2["dn_aux_outputs"])
    for a, b in zip(o1["dn_aux_outputs"], o2["dn_aux_outputs"]):            # denoising part untouched
        assert rel(b["pred_logits"], a["pred_logits"]) < 1e-12
    for k in r1["losses"]:
        assert abs(r2["losses"][k] - r1["losses"][k]) <= 1e-12 * max(1.0, abs(r1["losses"][k])), k
    # per tensor, relative to its own size -- except the analytically-zero gradients (BN biases
    # feeding a train-mode BN: float64 residue ~1e-17), judged against the global norm
    total = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in r1["grads"].values()))
    for k, g in r1["grads"].items():
        d = float(np.linalg.norm(r2["grads"][k].astype(np.float64) - g))
        assert d <= 1e-9 * max(float(np.linalg.norm(g)), 1e-6 * total), (k, d, float(np.linalg.norm(g)))
    # and a real change of the selection (not a permutation) is visible
    top3 = top1.copy()
    top3[0, 0] = np.setdiff1d(np.arange(r1["intermediates"]["decoder.enc_output"].shape[1]), top1[0])[0]
    adapter.load_weights(w)
    e1 = adapter.forward(images, topk_index=top1)
    e3 = adapter.forward(images, topk_index=top3)
    assert rel(e3["pred_boxes"][0, 0], e1["pred_boxes"][0, 0]) > 1e-3


@pytest.mark.torch
def test_torch_decoder_is_equivariant_to_query_order(tmp_path):
    _check_equivariance("torch", tmp_path)


@pytest.mark.jittor
def test_jittor_decoder_is_equivariant_to_query_order(tmp_path):
    _check_equivariance("jittor", tmp_path)
