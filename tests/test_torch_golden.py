"""The PyTorch backend reproduces the official RT-DETR outputs stored in official_golden.npz
(seed-3 weights, see tests/data/GOLDEN.md).

Tolerances, and why:
* eval outputs / intermediates: 1e-4 absolute (float32; measured worst ~5e-6), up to the
  order of near-tied top-k queries (evalns: two queries whose encoder scores differ by
  1e-6 come out swapped; outputs are compared after pairing each query with its match).
* train-mode predictions: 5e-4 absolute after the same pairing: batch-statistics BN
  amplifies rounding, the official float32 run and our float64 run differ by 1.2e-4.
* losses: 1e-5 relative (measured worst ~3e-6); matches: exact.
* gradient norms: the official float32 gradients themselves differ from a float64 run of
  the same function by up to 2.0e-3 relative (r18vd and r50vd alike; BN batch statistics,
  grid_sample kinks), and our float32 run sits at the same distance.  So 1e-4 relative
  cannot hold for every tensor unless both runs round identically (they do not: different
  CPU kernels -- the official code itself, run on this AVX2 machine with the same torch and
  thread count, misses the golden norms by the same 1.3e-3 / 1.8e-3 while agreeing with this
  backend bit for bit: every loss, prediction and gradient tensor of train_r18vd/r50vd).
  Checked instead: every norm within 5e-3 relative (2.5x the measured float32
  noise floor), at least 70 % of them within 1e-4, median within 1e-4, and the three
  noise-level gradients (true value 0) within 1e-6 absolute.
* optimiser step: delta norms within 3e-3 relative (the three noise-level parameters: 1e-6
  absolute); delta sums within 2*lr*(2 + 0.2*sqrt(numel)), i.e. a couple of sign flips plus a
  share growing like sqrt(numel): AdamW's first step is lr*g/(|g|+1e-8), so elements whose
  clipped gradient is near 1e-8 can land on either side.  Measured: at most 0.6 flips for
  the <=256-element tensors and 0.078*sqrt(numel) for the large ones.
"""
from __future__ import annotations


import numpy as np
import pytest

from backends.torch_impl import Adapter
from golden_match import rows_match, selection_matches, top_scores
from rtdetr_core.init import seeded_weights

pytestmark = pytest.mark.torch

NOISE_GRADS = ("encoder.input_proj.0.1.bias", "encoder.input_proj.1.1.bias",
               "encoder.encoder.0.layers.0.norm2.bias")
DRAW_KEYS = ("label_mask_rand", "new_label", "box_sign_rand01", "box_rand_part")


def _adapter(preset):
    a = Adapter(preset)
    w = seeded_weights(a.cfg, 3)
    a.load_weights(w)
    return a, w


@pytest.fixture(scope="module")
def r18():
    return _adapter("r18vd")


@pytest.fixture(scope="module")
def r50():
    return _adapter("r50vd")


@pytest.fixture(scope="module")
def batch(golden):
    labels, boxes, counts = golden["train_tgt_labels"], golden["train_tgt_boxes"], golden["train_tgt_counts"]
    targets, s = [], 0
    for n in counts:
        targets.append({"labels": labels[s:s + n], "boxes": boxes[s:s + n]})
        s += n
    return golden["train_input"], targets


def draws_of(golden, preset):
    return {k: golden[f"train_{preset}_dn_{k}"] for k in DRAW_KEYS}


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check_eval(adapter, weights, golden, case):
    adapter.load_weights(weights)             # fresh running stats whatever ran before
    out = adapter.forward(golden[f"{case}_input"], capture=True)
    check_outputs(out, golden, case)
    return out


def check_outputs(out, golden, case, tol=1e-4, mode="eval"):
    """pred_logits / pred_boxes within ``tol`` of the reference, up to the order of queries
    whose top-k scores are near-tied (``out`` from a captured forward: its own scores say
    which rows may move; tests/golden_match.py)."""
    for k in ("pred_logits", "pred_boxes"):
        assert out[k].shape == golden[f"{case}_{k}"].shape
    both = lambda o, p="": np.concatenate([o[f"{p}pred_logits"], o[f"{p}pred_boxes"]], -1)  # noqa: E731
    rows_match(both(out), both(golden, f"{case}_"), tol, top_scores(out["intermediates"]), mode)


# --- eval ---------------------------------------------------------------------------------
def test_eval640_r18vd(r18, golden):
    check_eval(*r18, golden, "eval640_r18vd")


def test_evalns_r18vd(r18, golden):
    """Non-square input: the AIFI position-embedding orientation quirk and 96 invalid anchors."""
    a, w = r18
    a.load_weights(w)
    out = a.forward(golden["evalns_r18vd_input"], capture=True)
    inter = out["intermediates"]
    np.testing.assert_array_equal(inter["encoder.encoder.0.pos_embed"], golden["evalns_r18vd_aifi_pos_embed"])
    assert max_abs(inter["encoder.encoder.0"], golden["evalns_r18vd_aifi_out"]) <= 1e-4
    check_outputs(out, golden, "evalns_r18vd")


def test_inter_r18vd_every_intermediate(r18, golden):
    a, w = r18
    a.load_weights(w)
    g = lambda k: golden[f"inter_r18vd_{k}"]  # noqa: E731
    own = a.forward(g("input"), capture=True)["intermediates"]
    # this CPU's float32 may order near-tied encoder scores differently from the golden
    # machine's: the own selection equals the golden one up to such order flips, and the
    # continuous intermediates are compared under the golden selection
    selection_matches(own["decoder.enc_topk_index"], g("enc_topk_index"), top_scores(own))
    a.load_weights(w)
    out = a.forward(g("input"), capture=True, topk_index=g("enc_topk_index"))
    inter = out["intermediates"]
    pairs = [(f"backbone.res_layers.{i + 1}", g(f"backbone_{i}")) for i in range(3)]
    pairs += [("encoder.encoder.0.pos_embed", g("aifi_pos_embed")), ("encoder.encoder.0", g("aifi_out"))]
    pairs += [(f"encoder.outputs.{i}", g(f"encoder_{i}")) for i in range(3)]
    pairs += [("decoder.enc_topk_logits", g("enc_topk_logits")), ("decoder.enc_topk_bboxes", g("enc_topk_bboxes"))]
    pairs += [(f"decoder.dec_logits.{i}", g("dec_logits")[i]) for i in range(3)]
    pairs += [(f"decoder.dec_boxes.{i}", g("dec_boxes")[i]) for i in range(3)]
    pairs += [("pred_logits", g("pred_logits")), ("pred_boxes", g("pred_boxes"))]
    for name, ref in pairs:
        assert inter[name].shape == ref.shape, name
        assert max_abs(inter[name], ref) <= 1e-4, (name, max_abs(inter[name], ref))
    np.testing.assert_array_equal(inter["decoder.enc_topk_index"], g("enc_topk_index"))
    np.testing.assert_array_equal(inter["encoder.encoder.0.pos_embed"], g("aifi_pos_embed"))   # bit-exact
    assert inter["decoder.memory"].shape == (1, 2100, 256)
    names = list(inter)
    assert names[0] == "backbone.conv1" and names[-2:] == ["pred_logits", "pred_boxes"]


# --- train: losses, matches, gradients ------------------------------------------------------
def check_train(adapter, weights, golden, batch, preset):
    P = f"train_{preset}_"
    adapter.load_weights(weights)
    images, targets = batch
    res = adapter.loss(images, targets, draws_of(golden, preset), backward=True, capture=True)

    names = list(res["losses"])
    assert names == [str(n) for n in golden[P + "loss_names"]]
    vals = np.array(list(res["losses"].values()))
    ref = golden[P + "loss_values"]
    assert np.all(np.abs(vals - ref) <= 1e-5 * np.abs(ref)), np.max(np.abs(vals - ref) / np.abs(ref))
    assert abs(res["total"] - float(golden[P + "loss_total"])) <= 1e-5 * abs(float(golden[P + "loss_total"]))

    # matches: final per image, and every matcher call (rows image, query, gt)
    np.testing.assert_array_equal(res["matches"]["final"][0], golden[P + "match_final_img0"])
    np.testing.assert_array_equal(res["matches"]["final"][1], golden[P + "match_final_img1"])
    calls = [str(c) for c in golden[P + "match_call_names"]]
    L = len(calls) - 1
    assert list(res["matches"]) == ["final"] + [f"aux_{i}" for i in range(L)]
    assert calls[-1] == f"aux_{L - 1}_enc_topk"
    for c, name in enumerate(res["matches"]):
        rows = np.concatenate([np.stack([np.full(m.shape[1], b), m[0], m[1]], 1)
                               for b, m in enumerate(res["matches"][name])])
        np.testing.assert_array_equal(rows, golden[P + "match_all"][c], err_msg=name)

    # dn meta
    meta = res["outputs"]["dn_meta"]
    assert meta["dn_num_group"] == int(golden[P + "dn_num_group"])
    assert list(meta["dn_num_split"]) == golden[P + "dn_num_split"].tolist()
    for b in range(2):
        np.testing.assert_array_equal(meta["dn_positive_idx"][b], golden[P + f"dn_positive_idx_img{b}"])

    # train-mode predictions (up to the order of near-tied top-k entries)
    # train mode (batch-statistics BN) amplifies rounding: official float32 vs our float64
    # differ by 1.2e-4 (r18vd), so 5e-4 here
    check_outputs({**res["outputs"], "intermediates": res["intermediates"]}, golden, f"train_{preset}",
                  tol=5e-4, mode="train")

    # gradients
    gnames = [str(n) for n in golden[P + "grad_names"]]
    assert list(res["grads"]) == gnames
    ours = np.array([np.linalg.norm(res["grads"][n].astype(np.float64)) for n in gnames])
    ref = golden[P + "grad_norms"]
    noise = np.array([n in NOISE_GRADS for n in gnames])
    assert noise.sum() == 3
    assert np.all(np.abs(ours - ref)[noise] <= 1e-6)
    rel = (np.abs(ours - ref) / ref)[~noise]
    assert rel.max() <= 5e-3, (rel.max(), np.array(gnames)[~noise][rel.argmax()])
    assert np.median(rel) <= 1e-4 and np.mean(rel <= 1e-4) >= 0.70, (np.median(rel), np.mean(rel <= 1e-4))
    total = float(np.sqrt((ours ** 2).sum()))
    assert abs(total - float(golden[P + "grad_total_norm"])) <= 2e-4 * float(golden[P + "grad_total_norm"])
    pad_row = res["grads"]["decoder.denoising_class_embed.weight"][80]
    assert np.all(pad_row == 0)
    return res


def test_train_r18vd(r18, golden, batch):
    a, w = r18
    check_train(a, w, golden, batch, "r18vd")
    # BN running statistics after that one train forward (momentum 0.1, unbiased variance)
    sd = a.export_weights()
    for i, name in enumerate(golden["train_r18vd_bn_names"]):
        assert max_abs(sd[f"{name}.running_mean"], golden[f"train_r18vd_bn_running_mean_{i}"]) <= 1e-5
        assert max_abs(sd[f"{name}.running_var"], golden[f"train_r18vd_bn_running_var_{i}"]) <= 1e-5
        assert int(sd[f"{name}.num_batches_tracked"]) == 1


def test_float64_eval640_r18vd(r18, golden):
    a32, w = r18
    a64 = Adapter("r18vd", dtype="float64")
    a64.load_weights(w)
    assert all(v.dtype == np.float64 for k, v in a64.export_weights().items() if not k.endswith("num_batches_tracked"))
    out64 = a64.forward(golden["eval640_r18vd_input"].astype(np.float64), capture=True)
    for k, v in out64["intermediates"].items():
        assert v.dtype == (np.int64 if k.endswith("topk_index") else np.float64), k
    out32 = check_eval(a32, w, golden, "eval640_r18vd")
    for k in ("pred_logits", "pred_boxes"):
        assert out64[k].dtype == np.float64
    # float32 vs float64 of the same model: equal up to near-tied top-k order (float32's scores)
    both = lambda o: np.concatenate([o["pred_logits"], o["pred_boxes"]], -1)  # noqa: E731
    rows_match(both(out64), both(out32), 1e-4, top_scores(out64["intermediates"]))
    check_outputs(out64, golden, "eval640_r18vd")


# --- r50vd (slow, still in the default suite) ------------------------------------------
@pytest.mark.slow
def test_eval640_r50vd(r50, golden):
    check_eval(*r50, golden, "eval640_r50vd")


@pytest.fixture(scope="module")
def r50_train(r50, golden, batch):
    """One r50vd train forward + loss + backward, shared by the train and step tests (the
    official step is zero_grad, backward, clip, AdamW step: the step test continues from
    these gradients; test_torch_model checks Adapter.train_step equals that sequence)."""
    a, w = r50
    return check_train(a, w, golden, batch, "r50vd")


@pytest.mark.slow
def test_train_r50vd(r50, r50_train, golden):
    a, w = r50
    frozen = [str(n) for n in golden["train_r50vd_frozen_names"]]
    assert not set(frozen) & set(r50_train["grads"])
    params = dict(a.model.named_parameters())
    assert all(params[n].grad is None for n in frozen)


@pytest.mark.slow
def test_step_r50vd(r50, r50_train, golden):
    from backends.torch_impl.optim import build_optimizer, clip_grad_norm

    a, w = r50
    S = "step_r50vd_"
    names = [str(n) for n in golden[S + "param_names"]]
    groups = a.param_groups()
    assert list(groups) == names
    assert [groups[n] for n in names] == golden[S + "param_group"].tolist()

    assert abs(r50_train["total"] - float(golden[S + "loss_total"])) <= 1e-5 * float(golden[S + "loss_total"])
    opt = build_optimizer(a.model, a.cfg)
    grad_norm = clip_grad_norm(a.model.parameters(), a.cfg.optimizer.clip_max_norm)
    opt.step()
    assert abs(grad_norm - float(golden[S + "grad_total_norm_preclip"])) <= 2e-4 * grad_norm
    pg = opt.param_groups
    assert [g["lr"] for g in pg] == golden[S + "group_lr"].tolist()
    assert [g["weight_decay"] for g in pg] == golden[S + "group_weight_decay"].tolist()
    assert [len(g["params"]) for g in pg] == golden[S + "group_counts"].tolist()

    new = a.export_weights()
    a.load_weights(w)                          # leave the shared model as it was
    delta = {n: (new[n] - w[n]).astype(np.float64) for n in names}
    dn = np.array([np.linalg.norm(delta[n]) for n in names])
    ds = np.array([delta[n].sum() for n in names])
    ref_n, ref_s = golden[S + "delta_norms"], golden[S + "delta_sums"]
    lr = golden[S + "group_lr"][golden[S + "param_group"]]
    numel = np.array([w[n].size for n in names])
    noise = np.array([n in NOISE_GRADS for n in names])
    assert np.all(np.abs(dn - ref_n)[noise] <= 1e-6)
    rel = (np.abs(dn - ref_n) / ref_n)[~noise]
    assert rel.max() <= 3e-3, (rel.max(), np.array(names)[~noise][rel.argmax()])
    tol_s = 2 * lr * (2 + 0.2 * np.sqrt(numel))
    assert np.all(np.abs(ds - ref_s) <= tol_s), np.max(np.abs(ds - ref_s) / tol_s)
    for n in golden["train_r50vd_frozen_names"]:          # frozen stem convs did not move
        np.testing.assert_array_equal(new[str(n)], w[str(n)])


# --- gradient norms judged against float32's own noise ---------------------------------------
@pytest.mark.parametrize("preset", ["r18vd", pytest.param("r50vd", marks=pytest.mark.slow)])
def test_grad_norms_at_official_float32_noise(preset, golden, batch):
    """Our float32 gradients are as close to the exact (float64) values as the official
    float32 ones are.

    The official gradients were computed in float32 on another CPU (different conv kernels:
    this machine has AVX2 only; inter_r18vd's backbone is 37 % bit-equal), so a per-tensor
    1e-4 match is out of reach where float32 itself is noisier than that (BN batch
    statistics, grid_sample kinks).  Instead, with our float64 run as the exact value:
    * no systematic offset: official32 vs ours64 has median relative error <= 1e-4;
    * same noise: the 50/90/99th percentiles of |ours32 - ours64| / |g| are at most 2x those
      of |official32 - ours64| / |g| (measured r18vd: 1.9e-5/1.0e-4/9.5e-4 vs 1.9e-5/1.1e-4/1.9e-3);
    * every norm within 5e-3 relative of the official one.
    A real bug (wrong formula, missing term) moves norms far beyond float32 noise.
    """
    images, targets = batch
    w = seeded_weights(preset, 3)
    norms = {}
    for dt in ("float32", "float64"):
        a = Adapter(preset, dtype=dt)
        a.load_weights(w)
        res = a.loss(images.astype(dt), targets, draws_of(golden, preset), backward=True)
        norms[dt] = {n: float(np.linalg.norm(g.astype(np.float64))) for n, g in res["grads"].items()}
    P = f"train_{preset}_"
    names = [str(n) for n in golden[P + "grad_names"]]
    keep = np.array([n not in NOISE_GRADS for n in names])     # true value 0: relative error meaningless
    ref = golden[P + "grad_norms"][keep]
    ours32 = np.array([norms["float32"][n] for n in names])[keep]
    ours64 = np.array([norms["float64"][n] for n in names])[keep]
    e_official = np.abs(ref - ours64) / ref
    e_ours = np.abs(ours32 - ours64) / ref
    assert np.median(e_official) <= 1e-4, np.median(e_official)
    for q in (50, 90, 99):
        assert np.percentile(e_ours, q) <= 2 * np.percentile(e_official, q), \
            (q, np.percentile(e_ours, q), np.percentile(e_official, q))
    assert np.max(np.abs(ours32 - ref) / ref) <= 5e-3
