"""RT-DETR decoder: input projection, anchor-based query selection, deformable decoder
layers with iterative box refinement, and the contrastive-denoising training branch."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MultiheadAttention
from .capture import active, note_decision, record, wants_evidence
from .common import MLP, inverse_sigmoid
from .deformable_attention import MSDeformableAttention
from .denoising import get_contrastive_denoising_training_group
from .framework import Embedding, topk
from .normalization import BatchNorm2d, LayerNorm


class TransformerDecoderLayer(nn.Module):
    """self-attention -> deformable cross-attention -> FFN, each post-norm.

    tgt [B, Lq, C], reference_points [B, Lq, 1, 4], memory [B, S, C] -> [B, Lq, C]
    """

    def __init__(self, d_model: int = 256, n_head: int = 8, dim_feedforward: int = 1024, dropout: float = 0.0,
                 activation: str = "relu", n_levels: int = 4, n_points: int = 4):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = LayerNorm(d_model)
        self.cross_attn = MSDeformableAttention(d_model, n_head, n_levels, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = getattr(F, activation.lower())
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = LayerNorm(d_model)

    def forward(self, tgt, reference_points, memory, memory_spatial_shapes, memory_level_start_index=None,
                attn_mask=None, memory_mask=None, query_pos_embed=None) -> torch.Tensor:
        q = k = tgt if query_pos_embed is None else tgt + query_pos_embed
        tgt2, _ = self.self_attn(q, k, value=tgt, attn_mask=attn_mask, need_weights=False)
        tgt = self.norm1(tgt + self.dropout1(tgt2))

        query = tgt if query_pos_embed is None else tgt + query_pos_embed
        tgt2 = self.cross_attn(query, reference_points, memory, memory_spatial_shapes, memory_mask)
        tgt = self.norm2(tgt + self.dropout2(tgt2))

        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        tgt = tgt + self.dropout4(tgt2)
        # official clamp to the float16 range before the last norm (a no-op in practice)
        return self.norm3(tgt.clamp(min=-65504, max=65504))


class TransformerDecoder(nn.Module):
    """Stack of decoder layers with iterative refinement.

    Returns (boxes [L', B, Lq, 4], logits [L', B, Lq, n_cls]): every layer in training,
    only layer ``eval_idx`` in eval (L' = 1).
    """

    def __init__(self, hidden_dim: int, decoder_layer: nn.Module, num_layers: int, eval_idx: int = -1):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx

    def forward(self, tgt, ref_points_unact, memory, memory_spatial_shapes, memory_level_start_index,
                bbox_head, score_head, query_pos_head, attn_mask=None, memory_mask=None):
        """tgt [B, Lq, C] (dn queries first, then the Q selected ones), ref_points_unact
        [B, Lq, 4] (logit space, detached), memory [B, S, C], memory_spatial_shapes [(h, w)]
        per level, attn_mask [Lq, Lq] bool (True = blocked) or None."""
        output = tgt
        out_bboxes, out_logits = [], []
        ref_points_detach = torch.sigmoid(ref_points_unact)
        ref_points = ref_points_detach
        for i, layer in enumerate(self.layers):
            query_pos_embed = query_pos_head(ref_points_detach)
            output = layer(output, ref_points_detach.unsqueeze(2), memory, memory_spatial_shapes,
                           memory_level_start_index, attn_mask, memory_mask, query_pos_embed)
            record(f"decoder.decoder.layers.{i}", output)
            inter_ref_bbox = torch.sigmoid(bbox_head[i](output) + inverse_sigmoid(ref_points_detach))

            if self.training:
                logits = score_head[i](output)
                # box loss of layer i > 0 flows into layer i-1's head through the
                # non-detached previous reference (the layer input itself is detached)
                boxes = inter_ref_bbox if i == 0 else torch.sigmoid(bbox_head[i](output) + inverse_sigmoid(ref_points))
                out_logits.append(logits)
                out_bboxes.append(boxes)
                record(f"decoder.dec_logits.{i}", logits)
                record(f"decoder.dec_boxes.{i}", boxes)
            elif i == self.eval_idx:
                logits = score_head[i](output)
                out_logits.append(logits)
                out_bboxes.append(inter_ref_bbox)
                record(f"decoder.dec_logits.{i}", logits)
                record(f"decoder.dec_boxes.{i}", inter_ref_bbox)
                break
            elif active():
                # the official eval path skips these; computed only to expose them
                record(f"decoder.dec_logits.{i}", score_head[i](output))
                record(f"decoder.dec_boxes.{i}", inter_ref_bbox)

            ref_points = inter_ref_bbox
            ref_points_detach = inter_ref_bbox.detach() if self.training else inter_ref_bbox
        return torch.stack(out_bboxes), torch.stack(out_logits)


class RTDETRTransformer(nn.Module):
    """feats (list of [B, C, h_l, w_l]) -> {"pred_logits" [B, Q, n_cls], "pred_boxes" [B, Q, 4]}
    (+ "aux_outputs", "dn_aux_outputs", "dn_meta" in training).

    Anchors are always generated for the actual feature sizes, in the memory's dtype.
    """

    def __init__(self, num_classes: int = 80, hidden_dim: int = 256, num_queries: int = 300,
                 position_embed_type: str = "sine", feat_channels: Sequence[int] = (512, 1024, 2048),
                 feat_strides: Sequence[int] = (8, 16, 32), num_levels: int = 3, num_decoder_points: int = 4,
                 nhead: int = 8, num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.0,
                 activation: str = "relu", num_denoising: int = 100, label_noise_ratio: float = 0.5,
                 box_noise_scale: float = 1.0, learnt_init_query: bool = False, eval_spatial_size=None,
                 eval_idx: int = -1, eps: float = 1e-2, aux_loss: bool = True):
        super().__init__()
        if position_embed_type not in ("sine", "learned"):
            raise ValueError(f"position_embed_type not supported: {position_embed_type}")
        if len(feat_channels) > num_levels or len(feat_strides) != len(feat_channels):
            raise ValueError("need len(feat_channels) == len(feat_strides) <= num_levels")
        feat_strides = list(feat_strides)
        for _ in range(num_levels - len(feat_strides)):
            feat_strides.append(feat_strides[-1] * 2)
        self.hidden_dim = hidden_dim
        self.nhead = nhead
        self.feat_strides = feat_strides
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.eps = eps
        self.num_decoder_layers = num_decoder_layers
        self.eval_spatial_size = eval_spatial_size   # kept for fidelity; anchors use actual sizes
        self.aux_loss = aux_loss
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.learnt_init_query = learnt_init_query

        self._build_input_proj_layer(list(feat_channels))
        layer = TransformerDecoderLayer(hidden_dim, nhead, dim_feedforward, dropout, activation,
                                        num_levels, num_decoder_points)
        self.decoder = TransformerDecoder(hidden_dim, layer, num_decoder_layers, eval_idx)
        if num_denoising > 0:
            self.denoising_class_embed = Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
        if learnt_init_query:
            self.tgt_embed = Embedding(num_queries, hidden_dim)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, num_layers=2)
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, num_layers=3)
        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_decoder_layers))
        self.dec_bbox_head = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, num_layers=3)
                                           for _ in range(num_decoder_layers))

    def _build_input_proj_layer(self, feat_channels: List[int]) -> None:
        self.input_proj = nn.ModuleList()
        for c in feat_channels:
            self.input_proj.append(nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c, self.hidden_dim, 1, bias=False)),
                ("norm", BatchNorm2d(self.hidden_dim))])))
        c = feat_channels[-1]
        for _ in range(self.num_levels - len(feat_channels)):   # extra strided levels
            self.input_proj.append(nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c, self.hidden_dim, 3, 2, padding=1, bias=False)),
                ("norm", BatchNorm2d(self.hidden_dim))])))
            c = self.hidden_dim

    def _get_encoder_input(self, feats: List[torch.Tensor]):
        """-> memory [B, S, C] (levels flattened row-major, concatenated), spatial_shapes [(h, w)],
        level_start_index [L]"""
        proj = [self.input_proj[i](f) for i, f in enumerate(feats)]
        for i in range(len(feats), self.num_levels):
            proj.append(self.input_proj[i](feats[-1] if i == len(feats) else proj[-1]))
        flat, shapes, starts = [], [], [0]
        for i, p in enumerate(proj):
            record(f"decoder.input_proj.{i}", p)
            _, _, h, w = p.shape
            flat.append(p.flatten(2).permute(0, 2, 1))
            shapes.append([int(h), int(w)])
            starts.append(starts[-1] + int(h) * int(w))
        memory = torch.cat(flat, 1)
        record("decoder.memory", memory)
        return memory, shapes, starts[:-1]

    def _generate_anchors(self, spatial_shapes, grid_size: float = 0.05, dtype=torch.float32, device="cpu"):
        """-> anchors [1, S, 4] (logit space; inf where invalid), valid_mask [1, S, 1] bool.

        Anchor of cell (x, y) on level l: centre ((x+0.5)/w, (y+0.5)/h), size 0.05 * 2^l;
        invalid when any coordinate is within eps of 0 or 1.
        """
        anchors = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            grid_y, grid_x = torch.meshgrid(torch.arange(end=h, dtype=dtype), torch.arange(end=w, dtype=dtype),
                                            indexing="ij")
            grid_xy = torch.stack([grid_x, grid_y], -1)
            valid_wh = torch.tensor([w, h]).to(dtype)
            grid_xy = (grid_xy.unsqueeze(0) + 0.5) / valid_wh
            wh = torch.ones_like(grid_xy) * grid_size * (2.0 ** lvl)
            anchors.append(torch.cat([grid_xy, wh], -1).reshape(-1, h * w, 4))
        anchors = torch.cat(anchors, 1).to(device)
        valid_mask = ((anchors > self.eps) * (anchors < 1 - self.eps)).all(-1, keepdim=True)
        anchors = torch.log(anchors / (1 - anchors))
        anchors = torch.where(valid_mask, anchors, torch.inf)
        return anchors, valid_mask

    def _get_decoder_input(self, memory, spatial_shapes, denoising_class=None, denoising_bbox_unact=None,
                           topk_index: Optional[torch.Tensor] = None):
        """Query selection: score every memory token, keep the top Q as decoder queries.

        Returns target [B, (N_dn+)Q, C] (detached content), ref_points_unact [B, (N_dn+)Q, 4]
        (detached), enc_topk_bboxes [B, Q, 4], enc_topk_logits [B, Q, n_cls].
        """
        bs = memory.shape[0]
        anchors, valid_mask = self._generate_anchors(spatial_shapes, dtype=memory.dtype, device=memory.device)
        memory = valid_mask.to(memory.dtype) * memory           # invalid anchors see zero memory
        output_memory = self.enc_output(memory)
        record("decoder.enc_output", output_memory)
        enc_class = self.enc_score_head(output_memory)
        enc_coord_unact = self.enc_bbox_head(output_memory) + anchors

        enc_scores = enc_class.max(-1).values                      # [B, S]: what top-k ranks
        note_decision("topk_scores", enc_scores)
        if topk_index is None:
            _, topk_ind = topk(enc_scores, self.num_queries, dim=1)
        else:
            topk_ind = topk_index.to(device=memory.device, dtype=torch.int64)
            if tuple(topk_ind.shape) != (bs, self.num_queries):
                raise ValueError(f"topk_index has shape {tuple(topk_ind.shape)}, expected {(bs, self.num_queries)}")
            if wants_evidence():
                # the harness injected another side's choice: keep our own, so that it is still judged
                note_decision("topk_own", topk(enc_scores, self.num_queries, dim=1)[1])
        record("decoder.enc_topk_index", topk_ind)

        ref_unact = enc_coord_unact.gather(1, topk_ind.unsqueeze(-1).repeat(1, 1, enc_coord_unact.shape[-1]))
        enc_topk_bboxes = torch.sigmoid(ref_unact)
        if denoising_bbox_unact is not None:
            ref_unact = torch.cat([denoising_bbox_unact, ref_unact], 1)
        enc_topk_logits = enc_class.gather(1, topk_ind.unsqueeze(-1).repeat(1, 1, enc_class.shape[-1]))
        record("decoder.enc_topk_logits", enc_topk_logits)
        record("decoder.enc_topk_bboxes", enc_topk_bboxes)

        if self.learnt_init_query:
            target = self.tgt_embed.weight.unsqueeze(0).tile([bs, 1, 1])
        else:
            target = output_memory.gather(1, topk_ind.unsqueeze(-1).repeat(1, 1, output_memory.shape[-1]))
            target = target.detach()
        if denoising_class is not None:
            target = torch.cat([denoising_class, target], 1)
        return target, ref_unact.detach(), enc_topk_bboxes, enc_topk_logits

    def forward(self, feats: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None,
                dn_draws: Optional[Dict[str, np.ndarray]] = None,
                topk_index: Optional[torch.Tensor] = None) -> Dict[str, object]:
        memory, spatial_shapes, level_start_index = self._get_encoder_input(feats)

        dn_class = dn_bbox_unact = attn_mask = dn_meta = None
        if self.training and self.num_denoising > 0 and targets is not None:
            dn_class, dn_bbox_unact, attn_mask, dn_meta = get_contrastive_denoising_training_group(
                targets, self.num_classes, self.num_queries, self.denoising_class_embed, dn_draws,
                num_denoising=self.num_denoising, label_noise_ratio=self.label_noise_ratio,
                box_noise_scale=self.box_noise_scale)

        target, init_ref_unact, enc_topk_bboxes, enc_topk_logits = self._get_decoder_input(
            memory, spatial_shapes, dn_class, dn_bbox_unact, topk_index)

        out_bboxes, out_logits = self.decoder(
            target, init_ref_unact, memory, spatial_shapes, level_start_index, self.dec_bbox_head,
            self.dec_score_head, self.query_pos_head, attn_mask=attn_mask)

        if self.training and dn_meta is not None:
            dn_out_bboxes, out_bboxes = torch.split(out_bboxes, dn_meta["dn_num_split"], dim=2)
            dn_out_logits, out_logits = torch.split(out_logits, dn_meta["dn_num_split"], dim=2)

        out = {"pred_logits": out_logits[-1], "pred_boxes": out_bboxes[-1]}
        if self.training and self.aux_loss:
            out["aux_outputs"] = self._set_aux_loss(out_logits[:-1], out_bboxes[:-1])
            # the encoder's top-k is the last auxiliary output (aux_{L-1})
            out["aux_outputs"].extend(self._set_aux_loss([enc_topk_logits], [enc_topk_bboxes]))
            if dn_meta is not None:
                out["dn_aux_outputs"] = self._set_aux_loss(dn_out_logits, dn_out_bboxes)
                out["dn_meta"] = dn_meta
        return out

    @staticmethod
    def _set_aux_loss(outputs_class, outputs_coord) -> List[Dict[str, torch.Tensor]]:
        return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class, outputs_coord)]
