"""How ``parity detect`` shows its result: one PNG per image with the backends side by side,
the agreement table on the terminal, and the verdict line."""
from __future__ import annotations

import os
from typing import Any, Dict, List

from parity.fileio import write_bytes
from parity.report.draw import chw_to_image, png_bytes, side_by_side


def write_pictures(out: str, inp: Dict[str, Any], res, backends, rows, conf: float, name_of, max_side: int,
                   seeded: bool, winfo: Dict[str, Any]) -> List[str]:
    footer = "weights: seeded init (untrained)" if seeded else f"weights: {os.path.basename(str(winfo.get('path')))}"
    pngs = []
    for i in range(len(inp["images"])):
        img = inp["originals"][i] if inp["originals"][i] is not None else chw_to_image(inp["images"][i])
        panels = [(be, {k: res[be][k][i] for k in ("scores", "labels", "boxes")}) for be in backends]
        ft = footer
        if rows:
            r = rows[i]
            ft += (f" | matched {r['matched']}/{max(r['n_base'], r['n_cand'])}, mean IoU {r['mean_iou']:.4f}, "
                   f"max |dscore| {r['max_score_diff']:.2g}")
        stem = os.path.splitext(inp["names"][i])[0].replace("[", "_").replace("]", "").replace(os.sep, "_")
        fn = f"{i:03d}_{stem}.png"
        write_bytes(os.path.join(out, fn), png_bytes(side_by_side(img, panels, conf, name_of, max_side=max_side,
                                                                  footer=ft)))
        pngs.append(fn)
    return pngs


def print_agreement(raw_cmp, rows, conf: float, match_iou: float) -> None:
    print()
    print("raw outputs (jittor vs torch, forward thresholds):")
    for e in raw_cmp:
        print(f"  {e['name']:<12} rel_l2 {e['err']:.3g}  max_abs {e['max_abs']:.3g}  "
              f"{'PASS (' + str(e['rule']) + ')' if e['passed'] else 'FAIL: ' + e.get('reason', '')}")
    w = max(12, max(len(r["image"]) for r in rows))
    print(f"\ndetections >= {conf:g} (IoU >= {match_iou:g} to match):")
    print(f"  {'image':<{w}}  torch  jittor  matched  mean IoU  max |dscore|  labels  agreement")
    for r in rows:
        print(f"  {r['image']:<{w}}  {r['n_base']:5d}  {r['n_cand']:6d}  {r['matched']:7d}  {r['mean_iou']:8.4f}  "
              f"{r['max_score_diff']:12.3g}  {r['label_agreement']:6.3f}  {r['agreement']:9.3f}")


def verdict_line(summary: Dict[str, Any], min_agreement: float, n_files: int, out: str, seeded: bool) -> str:
    lines = []
    if len(summary["backends"]) == 2:
        ag = summary["agreement"]
        lines.append(f"\n{'PASS' if summary['passed'] else 'FAIL'}: raw outputs "
                     f"{'agree' if all(e['passed'] for e in summary['raw_outputs']) else 'DIFFER'}; "
                     f"detections: mean agreement {ag.get('mean_agreement', 1.0):.3f} "
                     f"(min {ag.get('min_agreement', 1.0):.3f}, threshold {min_agreement:g})")
    lines.append(f"wrote {n_files} files to {out}" + (" (weights: seeded init)" if seeded else ""))
    return "\n".join(lines)
