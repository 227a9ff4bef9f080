"""How ``parity run --stage eval`` shows its result (``result.json``, parity/commands/eval.py):
the terminal table and lines, and ``summary.md``."""
from __future__ import annotations

from typing import Any, Dict


def print_result(r: Dict[str, Any]) -> None:
    """The metric table, the per-image agreement, the raw-output gate and the worst images."""
    sec, ag, diffs, raw = r["thresholds"], r["agreement"], r["diffs"], r["raw_outputs"]
    print(f"\n{'metric':<7} {'torch':>8} {'jittor':>8} {'diff':>9}   (limit +-{sec['max_ap_diff']:g})")
    for d in diffs:
        st = "skip (no GT)" if d["skipped"] else ("ok" if d["passed"] else "FAIL")
        print(f"{d['metric']:<7} {d['torch']:8.4f} {d['jittor']:8.4f} {d['diff']:+9.5f}   {st}")
    print(f"\nper image (detections >= {sec['score_threshold']:g}): mean agreement {ag['mean_agreement']:.4f}, "
          f"{ag['images_fully_agreeing']}/{ag['images']} images agree fully, mean IoU {ag['mean_iou']:.4f}, "
          f"max |dscore| {ag['max_score_diff']:.3g}, label agreement {ag['label_agreement']:.4f}")
    print(f"raw outputs (max over batches): pred_logits rel_l2 {raw['pred_logits']['rel_l2']:.3g}, "
          f"pred_boxes rel_l2 {raw['pred_boxes']['rel_l2']:.3g}")
    print(raw_gate_line(r["raw_gate"]))
    if ag["n_base"] == 0 and ag["n_cand"] == 0:
        print(f"note: no detection scores >= {sec['score_threshold']:g} on either side (untrained weights?): the "
              f"per-image agreement compares nothing; lower the threshold with --conf")
    worst_rows = r["worst_images"]
    if worst_rows and worst_rows[0]["agreement"] < 1.0:
        print("most disagreeing images:")
        for w in worst_rows:
            if w["agreement"] >= 1.0:
                break
            print(f"  {w['file_name']} (id {w['image_id']}): agreement {w['agreement']:.3f}, torch {w['n_torch']} / "
                  f"jittor {w['n_jittor']} detections, {w['matched']} matched, max |dscore| {w['max_score_diff']:.3g}")


def verdict_line(r: Dict[str, Any]) -> str:
    return (f"\n{'PASS' if r['passed'] else 'FAIL'}: max |AP diff| {r['max_abs_ap_diff']:.5f} "
            f"(limit {r['thresholds']['max_ap_diff']:g}); raw outputs {'agree' if r['raw_gate']['passed'] else 'DIFFER'}; "
            f"results in {r['out']}")


def raw_gate_line(g: Dict[str, Any]) -> str:
    """One line on the raw-output gate (printed and in summary.md)."""
    w = g["worst"]
    txt = (f"raw-output gate (forward thresholds, rel_l2 <= {g['threshold'].get('rel_l2'):g}): "
           f"{g['batches'] - g['failed_batches']}/{g['batches']} batches pass, worst pred_logits "
           f"{w['pred_logits']['rel_l2']:.3g}, pred_boxes {w['pred_boxes']['rel_l2']:.3g}")
    if g["tie_flips"]:
        f = g["flips"][0]
        txt += (f"; {g['tie_flips']} batch(es) with a top-k tie flip (compared after pairing queries), first: "
                f"batch {f['batch']}, {f['kind']} flip, score gap {f['score_gap']:.2g}")
    if g["reason"]:
        txt += f"; FAIL: {g['reason']}"
    return txt


def render_md(r: Dict[str, Any]) -> str:
    lines = [f"# Eval parity: {r['config']} ({r['dtype']}, {r['device']})", "",
             f"{r['data']['images']} images of {'the bundled synthetic ' if r['data']['synthetic'] else ''}"
             f"`{r['data']['split']}` (`{r['data']['ann_file']}`); weights: "
             + ("seeded init (untrained)" if r["weights"].get("source") == "seeded" else f"`{r['weights'].get('path')}`"),
             "", f"| metric | PyTorch | Jittor | diff | limit ±{r['thresholds']['max_ap_diff']:g} |", "|---|---:|---:|---:|---|"]
    for d in r["diffs"]:
        st = "n/a (no GT)" if d["skipped"] else ("ok" if d["passed"] else "**FAIL**")
        lines.append(f"| {d['metric']} | {d['torch']:.4f} | {d['jittor']:.4f} | {d['diff']:+.5f} | {st} |")
    ag = r["agreement"]
    lines += ["", f"Per image (detections ≥ {r['thresholds']['score_threshold']:g}, IoU ≥ "
                  f"{r['thresholds']['match_iou']:g}): mean agreement {ag['mean_agreement']:.4f}, "
                  f"{ag['images_fully_agreeing']}/{ag['images']} images agree fully, mean IoU {ag['mean_iou']:.4f}, "
                  f"max |Δscore| {ag['max_score_diff']:.3g}, label agreement {ag['label_agreement']:.4f}.", ""]
    bad = [w for w in r["worst_images"] if w["agreement"] < 1.0]
    if ag["n_base"] == 0 and ag["n_cand"] == 0:
        lines += [f"No detection scores ≥ {r['thresholds']['score_threshold']:g} on either side: the per-image "
                  "agreement compares nothing (use `--conf` with untrained weights).", ""]
    elif not bad:
        lines += ["No image disagrees.", ""]
    if bad:
        lines += ["Most disagreeing images:", "", "| image | id | torch | jittor | matched | agreement | max Δscore |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for w in bad:
            lines.append(f"| {w['file_name']} | {w['image_id']} | {w['n_torch']} | {w['n_jittor']} | {w['matched']} | "
                         f"{w['agreement']:.3f} | {w['max_score_diff']:.3g} |")
    lines += ["", f"Raw outputs, max over batches: pred_logits rel-L2 {r['raw_outputs']['pred_logits']['rel_l2']:.3g}, "
                  f"pred_boxes rel-L2 {r['raw_outputs']['pred_boxes']['rel_l2']:.3g}.", "",
              raw_gate_line(r["raw_gate"]) + ".", "",
              f"**{'PASS' if r['passed'] else 'FAIL'}**", ""]
    return "\n".join(lines)
