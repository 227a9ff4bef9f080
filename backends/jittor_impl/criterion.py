"""SetCriterion: VFL + L1 + GIoU on the final, auxiliary, encoder top-k and dn outputs
(official rtdetr_criterion.py; only the losses RT-DETR v1 uses: 'vfl' and 'boxes').

Targets are a list of {"labels": int64 numpy [n], "boxes": Var [n, 4] cxcywh}.  Matches can
be injected per call name ("final", "aux_0", ...), else the matcher computes them."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
from jittor import nn

from . import framework as fw
from .box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from .capture import note_decision, wants_evidence
from .distributed import all_reduce_sum, current_world
from .framework import jt


def _diag(m):
    """[N, N] -> [N] (torch.diag of a square matrix)."""
    n = m.shape[0]
    i = fw.constant(np.arange(n))
    return m[i, i]


class SetCriterion(nn.Module):
    def __init__(self, matcher, weight_dict, losses, alpha=0.2, gamma=2.0, eos_coef=1e-4, num_classes=80):
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = list(losses)
        self.eos_coef = eos_coef            # used by the CE loss only (not in RT-DETR v1)
        self.alpha, self.gamma = alpha, gamma

    @staticmethod
    def _get_src_permutation_idx(indices):
        batch_idx = np.concatenate([np.full(len(src), i, dtype=np.int64) for i, (src, _) in enumerate(indices)])
        src_idx = np.concatenate([np.asarray(src, dtype=np.int64) for src, _ in indices])
        return batch_idx, src_idx

    @staticmethod
    def _matched_targets(targets, indices, key):
        parts = [t[key][fw.constant(np.asarray(j))] for t, (_, j) in zip(targets, indices) if len(j)]
        return jt.concat(parts, dim=0)

    def loss_labels_vfl(self, outputs, targets, indices, num_boxes):
        """Varifocal loss: target score = IoU of the matched box (detached) on the gt class;
        weight alpha * p^gamma on negatives.  mean over queries, sum, * Q / num_boxes."""
        src_logits = outputs["pred_logits"]                                   # [B, Q, C]
        b, q, c = src_logits.shape
        bi, si = self._get_src_permutation_idx(indices)
        target_score = np.zeros((b, q, c), dtype=str(src_logits.dtype))
        target = np.zeros((b, q, c), dtype=str(src_logits.dtype))
        if len(bi):
            src_boxes = outputs["pred_boxes"][fw.constant(bi), fw.constant(si)]
            target_boxes = self._matched_targets(targets, indices, "boxes")
            ious, _ = box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))
            ious = fw.to_numpy(_diag(ious).detach())
            labels = np.concatenate([np.asarray(t["labels"], dtype=np.int64)[np.asarray(j, dtype=np.int64)]
                                     for t, (_, j) in zip(targets, indices)])
            target[bi, si, labels] = 1
            target_score[bi, si, labels] = ious          # one-hot target times IoU
        target, target_score = fw.constant(target), fw.constant(target_score)
        pred_score = fw.sigmoid(src_logits).detach()
        weight = self.alpha * pred_score ** self.gamma * (1 - target) + target_score
        loss = fw.bce_with_logits(src_logits, target_score, weight=weight)
        loss = fw.mean(loss, 1).sum() * fw.scalar(q / num_boxes, loss)   # one exact factor (see _weighted)
        return {"loss_vfl": loss}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        """L1 and (1 - GIoU) of matched pairs, summed, / num_boxes."""
        bi, si = self._get_src_permutation_idx(indices)
        if len(bi) == 0:      # nothing matched: zero losses still linked to the graph
            z = outputs["pred_boxes"].sum() * 0.0
            return {"loss_bbox": z, "loss_giou": z}
        src_boxes = outputs["pred_boxes"][fw.constant(bi), fw.constant(si)]
        target_boxes = self._matched_targets(targets, indices, "boxes")
        loss_bbox = fw.abs_(src_boxes - target_boxes).sum() / fw.scalar(num_boxes, src_boxes)
        giou = _diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)))
        loss_giou = (1 - giou).sum() / fw.scalar(num_boxes, giou)
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def get_loss(self, loss, outputs, targets, indices, num_boxes):
        loss_map = {"vfl": self.loss_labels_vfl, "boxes": self.loss_boxes}
        assert loss in loss_map, f"loss {loss!r} is not part of RT-DETR v1"
        return loss_map[loss](outputs, targets, indices, num_boxes)

    def _weighted(self, outputs, targets, indices, num_boxes, suffix=""):
        out = OrderedDict()
        for loss in self.losses:
            for k, v in self.get_loss(loss, outputs, targets, indices, num_boxes).items():
                if k in self.weight_dict:
                    # Var factors: Jittor folds chains of Python-float factors (/ 11 * 5)
                    # into one float32 constant, also in float64 graphs (grads 3e-8 off)
                    out[k + suffix] = v * fw.scalar(self.weight_dict[k], v)
        return out

    def _note_match(self, name: str, outputs, targets, injected: bool) -> None:
        """While the harness records: keep the cost matrix [B, Q, T] (evidence for judging a
        flipped assignment) and, when another side's assignment is injected, our own."""
        if not wants_evidence():
            return
        if sum(len(t["labels"]) for t in targets):
            note_decision(f"match_cost/{name}", self.matcher.cost_matrix(outputs, targets))
        if injected:
            note_decision(f"match_own/{name}", self.matcher(outputs, targets))

    def compute(self, outputs, targets, matches: Optional[Dict[str, List[np.ndarray]]] = None):
        """-> (losses OrderedDict name -> scalar Var in the official order,
               matches used: call name -> list over images of int64 [2, n]).
        ``matches`` overrides the matcher per call name (final, aux_0, ...)."""
        matches = matches or {}
        used: "OrderedDict[str, List[np.ndarray]]" = OrderedDict()

        def match(name, outs):
            self._note_match(name, outs, targets, name in matches)
            if name in matches:
                ind = [np.asarray(m, dtype=np.int64).reshape(2, -1) for m in matches[name]]
                if len(ind) != len(targets):
                    raise ValueError(f"matches[{name!r}] has {len(ind)} images, batch has {len(targets)}")
            else:
                ind = self.matcher(outs, targets)
            used[name] = ind
            return [(m[0], m[1]) for m in ind]

        # official: the box count all-reduced over the ranks and divided by the world size, so
        # each rank's loss is its share of the global batch's (gradients are then averaged)
        num_boxes = float(max(all_reduce_sum(sum(len(t["labels"]) for t in targets)) / current_world().size, 1))
        losses = OrderedDict()
        main = {k: v for k, v in outputs.items() if "aux" not in k}
        losses.update(self._weighted(main, targets, match("final", main), num_boxes))
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._weighted(aux, targets, match(f"aux_{i}", aux), num_boxes, f"_aux_{i}"))
        if "dn_aux_outputs" in outputs:
            meta = outputs["dn_meta"]
            indices = self.get_cdn_matched_indices(meta, targets)
            dn_num_boxes = num_boxes * meta["dn_num_group"]
            for i, aux in enumerate(outputs["dn_aux_outputs"]):
                losses.update(self._weighted(aux, targets, indices, dn_num_boxes, f"_dn_{i}"))
        return losses, used

    def execute(self, outputs, targets, matches=None):
        """-> OrderedDict of weighted losses (as the official criterion)."""
        return self.compute(outputs, targets, matches)[0]

    @staticmethod
    def get_cdn_matched_indices(dn_meta, targets):
        """dn query q (positive, real) is paired with gt q % G: tile(arange(n_gt), num_group)."""
        out = []
        for i, t in enumerate(targets):
            n = len(t["labels"])
            if n > 0:
                gt_idx = np.tile(np.arange(n, dtype=np.int64), dn_meta["dn_num_group"])
                pos = np.asarray(dn_meta["dn_positive_idx"][i], dtype=np.int64)
                if len(pos) != len(gt_idx):
                    raise ValueError(f"image {i}: {len(pos)} dn positives for {len(gt_idx)} gt slots")
                out.append((pos, gt_idx))
            else:
                out.append((np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))
        return out
