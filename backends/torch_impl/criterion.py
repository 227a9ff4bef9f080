"""SetCriterion: varifocal classification loss + L1 + GIoU on matched boxes, repeated for
every auxiliary output (decoder layers, encoder top-k) and for the denoising queries."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from .capture import note_decision, wants_evidence
from .distributed import all_reduce_sum, current_world
from .framework import bce_with_logits

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


class SetCriterion(nn.Module):
    """outputs of RTDETRTransformer (train mode) + targets -> OrderedDict of weighted losses.

    Names and order are the official ones: ``loss_vfl, loss_bbox, loss_giou``, then the same
    triple with ``_aux_{i}`` for each aux output (decoder layers 0..L-2, then the encoder
    top-k as ``aux_{L-1}``), then ``_dn_{i}`` for each decoder layer on the dn queries.
    """

    def __init__(self, matcher: nn.Module, weight_dict: Mapping[str, float], losses: Sequence[str],
                 alpha: float = 0.2, gamma: float = 2.0, eos_coef: float = 1e-4, num_classes: int = 80):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = list(losses)
        self.alpha = alpha
        self.gamma = gamma
        self.eos_coef = eos_coef   # only used by the softmax 'labels' loss, which RT-DETR does not use

    # --- individual losses: outputs {"pred_logits" [B,Q,n_cls], "pred_boxes" [B,Q,4]} -------
    def loss_labels_vfl(self, outputs, targets, indices: Indices, num_boxes: float) -> Dict[str, torch.Tensor]:
        """Varifocal loss: positives target their (detached) IoU, negatives are weighted by
        alpha * p^gamma."""
        idx = self._get_src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        ious, _ = box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))
        ious = torch.diag(ious).detach()

        src_logits = outputs["pred_logits"]
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[idx] = target_classes_o
        target = F.one_hot(target_classes, num_classes=self.num_classes + 1)[..., :-1]

        target_score_o = torch.zeros_like(target_classes, dtype=src_logits.dtype)
        target_score_o[idx] = ious.to(target_score_o.dtype)
        target_score = target_score_o.unsqueeze(-1) * target
        pred_score = torch.sigmoid(src_logits).detach()
        weight = self.alpha * pred_score.pow(self.gamma) * (1 - target) + target_score
        loss = bce_with_logits(src_logits, target_score, weight=weight)
        loss = loss.mean(1).sum() * src_logits.shape[1] / num_boxes
        return {"loss_vfl": loss}

    def loss_boxes(self, outputs, targets, indices: Indices, num_boxes: float) -> Dict[str, torch.Tensor]:
        """L1 on cxcywh and 1 - GIoU, summed over matched pairs / num_boxes."""
        idx = self._get_src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        loss_giou = 1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes),
                                                       box_cxcywh_to_xyxy(target_boxes)))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def get_loss(self, loss: str, outputs, targets, indices: Indices, num_boxes: float):
        loss_map = {"vfl": self.loss_labels_vfl, "boxes": self.loss_boxes}
        if loss not in loss_map:
            raise ValueError(f"unsupported loss {loss!r} (supported: {', '.join(loss_map)})")
        return loss_map[loss](outputs, targets, indices, num_boxes)

    @staticmethod
    def _get_src_permutation_idx(indices: Indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    # --- matching ----------------------------------------------------------------------
    @staticmethod
    def get_cdn_matched_indices(dn_meta, targets) -> Indices:
        """dn positives pair with gt tile(arange(n), num_group): slot j of every group is gt j."""
        out = []
        for i, t in enumerate(targets):
            n = len(t["labels"])
            if n > 0:
                gt_idx = torch.arange(n, dtype=torch.int64).tile(dn_meta["dn_num_group"])
                pos = dn_meta["dn_positive_idx"][i].cpu()
                if len(pos) != len(gt_idx):
                    raise ValueError(f"image {i}: {len(pos)} dn positives for {len(gt_idx)} gt slots")
                out.append((pos, gt_idx))
            else:
                out.append((torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)))
        return out

    def _note_match(self, name: str, outputs, targets, injected: bool) -> None:
        """While the harness records: keep the cost matrix [B, Q, T] (evidence for judging a
        flipped assignment) and, when another side's assignment is injected, our own."""
        if not wants_evidence():
            return
        if sum(len(t["boxes"]) for t in targets):
            note_decision(f"match_cost/{name}", self.matcher.cost_matrix(outputs, targets))
        if injected:
            own = self.matcher(outputs, targets)
            note_decision(f"match_own/{name}", [np.stack([s.numpy(), t.numpy()]) for s, t in own])

    def _match(self, name: str, outputs, targets, matches: Optional[Mapping[str, Sequence]]) -> Indices:
        self._note_match(name, outputs, targets, matches is not None and name in matches)
        if matches is not None and name in matches:
            out = []
            for m in matches[name]:
                m = np.asarray(m, dtype=np.int64).reshape(2, -1)
                out.append((torch.from_numpy(m[0].copy()), torch.from_numpy(m[1].copy())))
            if len(out) != len(targets):
                raise ValueError(f"matches[{name!r}] has {len(out)} images, batch has {len(targets)}")
            return out
        return self.matcher(outputs, targets)

    def _add(self, losses, outputs, targets, indices: Indices, num_boxes: float, suffix: str) -> None:
        dev = outputs["pred_logits"].device
        indices = [(s.to(dev), t.to(dev)) for s, t in indices]
        for loss in self.losses:
            l_dict = self.get_loss(loss, outputs, targets, indices, num_boxes)
            for k, v in l_dict.items():
                if k in self.weight_dict:
                    losses[k + suffix] = v * self.weight_dict[k]

    # --- entry points ------------------------------------------------------------------
    def compute(self, outputs, targets, matches: Optional[Mapping[str, Sequence]] = None):
        """-> (losses OrderedDict[name -> 0-d tensor], used matches OrderedDict[call name ->
        list of (src, tgt) int64 tensors]).  ``matches`` overrides the matcher per call name
        (``final``, ``aux_0`` ...), each a list over images of int64 [2, n]."""
        losses: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        used: "OrderedDict[str, Indices]" = OrderedDict()
        main = {k: v for k, v in outputs.items() if "aux" not in k}
        used["final"] = self._match("final", main, targets, matches)

        # float normaliser, clamped so a batch without boxes still gives finite losses
        # official: the box count all-reduced over the ranks and divided by the world size, so
        # each rank's loss is its share of the global batch's (gradients are then averaged)
        num_boxes = float(max(all_reduce_sum(sum(len(t["labels"]) for t in targets)) / current_world().size, 1))
        self._add(losses, main, targets, used["final"], num_boxes, "")

        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            used[f"aux_{i}"] = self._match(f"aux_{i}", aux, targets, matches)
            self._add(losses, aux, targets, used[f"aux_{i}"], num_boxes, f"_aux_{i}")

        if "dn_aux_outputs" in outputs:
            dn_meta = outputs["dn_meta"]
            dn_indices = self.get_cdn_matched_indices(dn_meta, targets)
            dn_num_boxes = num_boxes * dn_meta["dn_num_group"]
            for i, aux in enumerate(outputs["dn_aux_outputs"]):
                self._add(losses, aux, targets, dn_indices, dn_num_boxes, f"_dn_{i}")
        return losses, used

    def forward(self, outputs, targets, matches: Optional[Mapping[str, Sequence]] = None):
        """-> OrderedDict of weighted losses (as the official criterion)."""
        return self.compute(outputs, targets, matches)[0]
