"""RT-DETR decoder: encoder-side query selection (top-k), deformable decoder layers, heads."""
from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
from jittor import nn

from . import framework as fw
from .attention import MultiheadAttention
from .capture import is_recording, note_decision, record, wants_evidence
from .common import MLP, Dropout, inverse_sigmoid
from .conv import Conv2d
from .deformable_attention import MSDeformableAttention
from .denoising import get_contrastive_denoising_training_group
from .framework import jt
from .normalization import BatchNorm2d, LayerNorm


class TransformerDecoderLayer(nn.Module):
    """self-attention (+dn mask) -> deformable cross-attention -> FFN, each post-norm."""

    def __init__(self, d_model=256, n_head=8, dim_feedforward=1024, dropout=0.0, activation="relu",
                 n_levels=4, n_points=4):
        self.self_attn = MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = Dropout(dropout)
        self.norm1 = LayerNorm(d_model)
        self.cross_attn = MSDeformableAttention(d_model, n_head, n_levels, n_points)
        self.dropout2 = Dropout(dropout)
        self.norm2 = LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        assert activation == "relu", "official decoder layer uses F.relu"
        self.dropout3 = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = Dropout(dropout)
        self.norm3 = LayerNorm(d_model)

    @staticmethod
    def with_pos_embed(tensor, pos):
        return tensor if pos is None else tensor + pos

    def forward_ffn(self, tgt):
        return self.linear2(self.dropout3(nn.relu(self.linear1(tgt))))

    def execute(self, tgt, reference_points, memory, memory_spatial_shapes, memory_level_start_index,
                attn_mask=None, memory_mask=None, query_pos_embed=None):
        # tgt [B, Lq, C], reference_points [B, Lq, 1, 4], memory [B, S, C]
        q = k = self.with_pos_embed(tgt, query_pos_embed)
        tgt2, _ = self.self_attn(q, k, value=tgt, attn_mask=attn_mask, need_weights=False)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.cross_attn(self.with_pos_embed(tgt, query_pos_embed), reference_points, memory,
                               memory_spatial_shapes, memory_mask)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.forward_ffn(tgt)
        return self.norm3(fw.clamp(tgt + self.dropout4(tgt2), min=-65504, max=65504))


class TransformerDecoder(nn.Module):
    def __init__(self, hidden_dim, decoder_layer, num_layers, eval_idx=-1):
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.hidden_dim, self.num_layers = hidden_dim, num_layers
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx

    def execute(self, tgt, ref_points_unact, memory, memory_spatial_shapes, memory_level_start_index,
                bbox_head, score_head, query_pos_head, attn_mask=None, memory_mask=None):
        """Returns (boxes [L', B, Lq, 4], logits [L', B, Lq, C]): every layer in training,
        only layer eval_idx in eval.  In training, layer i > 0 boxes are re-derived from the
        previous layer's NON-detached boxes, so the loss reaches earlier box heads."""
        output = tgt
        dec_out_bboxes, dec_out_logits = [], []
        ref_points_detach = fw.sigmoid(ref_points_unact)
        ref_points = None
        training = self.is_training()
        for i, layer in enumerate(self.layers):
            ref_points_input = ref_points_detach.unsqueeze(2)
            query_pos_embed = query_pos_head(ref_points_detach)
            output = layer(output, ref_points_input, memory, memory_spatial_shapes,
                           memory_level_start_index, attn_mask, memory_mask, query_pos_embed)
            record(f"decoder.decoder.layers.{i}", output)
            delta = bbox_head[i](output)
            inter_ref_bbox = fw.sigmoid(delta + inverse_sigmoid(ref_points_detach))
            if training:
                logits = score_head[i](output)
                boxes = inter_ref_bbox if i == 0 else fw.sigmoid(delta + inverse_sigmoid(ref_points))
                dec_out_logits.append(logits)
                dec_out_bboxes.append(boxes)
            elif i == self.eval_idx:
                logits, boxes = score_head[i](output), inter_ref_bbox
                dec_out_logits.append(logits)
                dec_out_bboxes.append(boxes)
            elif is_recording():        # capture only: what the training path would compute
                logits, boxes = score_head[i](output), inter_ref_bbox
            if is_recording():
                record(f"decoder.dec_logits.{i}", logits)
                record(f"decoder.dec_boxes.{i}", boxes)
            if not training and i == self.eval_idx:
                break
            ref_points = inter_ref_bbox
            ref_points_detach = inter_ref_bbox.detach() if training else inter_ref_bbox
        return jt.stack(dec_out_bboxes), jt.stack(dec_out_logits)


class RTDETRTransformer(nn.Module):
    """Encoder maps -> detections.  Official RTDETRTransformer, plus two injection points
    for parity runs: ``dn_draws`` (the denoising noise) and ``topk_index`` (query selection)."""

    def __init__(self, num_classes=80, hidden_dim=256, num_queries=300, position_embed_type="sine",
                 feat_channels=(512, 1024, 2048), feat_strides=(8, 16, 32), num_levels=3,
                 num_decoder_points=4, nhead=8, num_decoder_layers=6, dim_feedforward=1024, dropout=0.0,
                 activation="relu", num_denoising=100, label_noise_ratio=0.5, box_noise_scale=1.0,
                 learnt_init_query=False, eval_spatial_size=None, eval_idx=-1, eps=1e-2, aux_loss=True):
        assert position_embed_type == "sine", "only the sine (default) variant is implemented"
        feat_channels, feat_strides = list(feat_channels), list(feat_strides)
        assert len(feat_channels) <= num_levels and len(feat_strides) == len(feat_channels)
        for _ in range(num_levels - len(feat_strides)):
            feat_strides.append(feat_strides[-1] * 2)
        self.hidden_dim, self.nhead, self.feat_strides = hidden_dim, nhead, feat_strides
        self.num_levels, self.num_classes, self.num_queries = num_levels, num_classes, num_queries
        self.eps, self.num_decoder_layers = eps, num_decoder_layers
        self.eval_spatial_size, self.aux_loss = eval_spatial_size, aux_loss
        self._build_input_proj_layer(feat_channels)
        layer = TransformerDecoderLayer(hidden_dim, nhead, dim_feedforward, dropout, activation,
                                        num_levels, num_decoder_points)
        self.decoder = TransformerDecoder(hidden_dim, layer, num_decoder_layers, eval_idx)
        self.num_denoising, self.label_noise_ratio = num_denoising, label_noise_ratio
        self.box_noise_scale = box_noise_scale
        if num_denoising > 0:
            self.denoising_class_embed = fw.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
        self.learnt_init_query = learnt_init_query
        if learnt_init_query:
            self.tgt_embed = fw.Embedding(num_queries, hidden_dim)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, num_layers=2)
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, num_layers=3)
        self.dec_score_head = nn.ModuleList([nn.Linear(hidden_dim, num_classes) for _ in range(num_decoder_layers)])
        self.dec_bbox_head = nn.ModuleList([MLP(hidden_dim, hidden_dim, 4, num_layers=3)
                                            for _ in range(num_decoder_layers)])

    def _build_input_proj_layer(self, feat_channels):
        self.input_proj = nn.ModuleList()
        for c in feat_channels:
            self.input_proj.append(nn.Sequential(OrderedDict([
                ("conv", Conv2d(c, self.hidden_dim, 1, bias=False)),
                ("norm", BatchNorm2d(self.hidden_dim))])))
        c = feat_channels[-1]
        for _ in range(self.num_levels - len(feat_channels)):
            self.input_proj.append(nn.Sequential(OrderedDict([
                ("conv", Conv2d(c, self.hidden_dim, 3, 2, padding=1, bias=False)),
                ("norm", BatchNorm2d(self.hidden_dim))])))
            c = self.hidden_dim

    def _get_encoder_input(self, feats):
        """-> memory [B, S, C] (levels flattened row-major, concatenated), [(h, w)], starts."""
        proj_feats = [self.input_proj[i](feat) for i, feat in enumerate(feats)]
        n = len(proj_feats)
        for i in range(n, self.num_levels):
            proj_feats.append(self.input_proj[i](feats[-1] if i == n else proj_feats[-1]))
        flat, spatial_shapes, level_start_index = [], [], [0]
        for i, feat in enumerate(proj_feats):
            record(f"decoder.input_proj.{i}", feat)
            b, c, h, w = feat.shape
            flat.append(feat.reshape(b, c, h * w).permute(0, 2, 1))
            spatial_shapes.append((h, w))
            level_start_index.append(h * w + level_start_index[-1])
        level_start_index.pop()
        return jt.concat(flat, dim=1), spatial_shapes, level_start_index

    def _generate_anchors(self, spatial_shapes, grid_size=0.05, dtype="float32"):
        """numpy (anchors [1, S, 4] logit space, +inf where invalid; valid_mask [1, S, 1]):
        cell centres (x, y) / (w, h) and size grid_size * 2^level, in the model dtype."""
        f = np.dtype(dtype).type
        anchors = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            grid_y, grid_x = np.meshgrid(np.arange(h, dtype=dtype), np.arange(w, dtype=dtype), indexing="ij")
            grid_xy = np.stack([grid_x, grid_y], -1)
            grid_xy = (grid_xy[None] + f(0.5)) / np.array([w, h], dtype=dtype)
            wh = np.ones_like(grid_xy) * f(grid_size) * f(2.0 ** lvl)
            anchors.append(np.concatenate([grid_xy, wh], -1).reshape(-1, h * w, 4))
        anchors = np.concatenate(anchors, 1)
        valid_mask = ((anchors > self.eps) & (anchors < 1 - self.eps)).all(-1, keepdims=True)
        with np.errstate(divide="ignore"):
            anchors = np.log(anchors / (f(1) - anchors))
        return np.where(valid_mask, anchors, np.inf).astype(dtype), valid_mask

    def _get_decoder_input(self, memory, spatial_shapes, denoising_class=None, denoising_bbox_unact=None,
                           topk_index=None):
        """Score every memory token, keep the top num_queries (or the injected topk_index
        [B, Q]) as initial queries: content (detached), reference boxes (detached logits)."""
        bs, s, _ = memory.shape
        dtype = str(memory.dtype)
        anchors, valid_mask = self._generate_anchors(spatial_shapes, dtype=dtype)
        record("decoder.memory", memory)     # before the anchor mask, as the torch side records it
        memory = fw.constant(valid_mask.astype(dtype)) * memory
        output_memory = self.enc_output(memory)
        record("decoder.enc_output", output_memory)
        enc_outputs_class = self.enc_score_head(output_memory)                          # [B, S, C]
        enc_outputs_coord_unact = self.enc_bbox_head(output_memory) + fw.constant(anchors)  # [B, S, 4]
        if s < self.num_queries:      # torch.topk raises; Jittor's would silently return fewer
            raise ValueError(f"{s} memory tokens < num_queries {self.num_queries}: input too small")
        enc_scores = fw.max_values(enc_outputs_class, -1)                              # [B, S]: what top-k ranks
        note_decision("topk_scores", enc_scores)
        if topk_index is None:
            _, topk_ind = fw.topk(enc_scores, self.num_queries, dim=1)
        else:
            ti = np.asarray(topk_index)
            if ti.shape != (bs, self.num_queries) or ti.min() < 0 or ti.max() >= s:
                raise ValueError(f"topk_index must be int [{bs}, {self.num_queries}] in [0, {s}), "
                                 f"got shape {ti.shape}")
            topk_ind = fw.constant(ti)
            if wants_evidence():
                # the harness injected another side's choice: keep our own, so that it is still judged
                note_decision("topk_own", fw.topk(enc_scores, self.num_queries, dim=1)[1])
        topk_ind = topk_ind.stop_grad()
        record("decoder.enc_topk_index", topk_ind)
        reference_points_unact = fw.gather_rows(enc_outputs_coord_unact, topk_ind)
        enc_topk_bboxes = fw.sigmoid(reference_points_unact)
        if denoising_bbox_unact is not None:
            reference_points_unact = jt.concat([denoising_bbox_unact, reference_points_unact], 1)
        enc_topk_logits = fw.gather_rows(enc_outputs_class, topk_ind)
        record("decoder.enc_topk_logits", enc_topk_logits)
        record("decoder.enc_topk_bboxes", enc_topk_bboxes)
        if self.learnt_init_query:
            target = self.tgt_embed.weight.unsqueeze(0).repeat(bs, 1, 1)
        else:
            target = fw.gather_rows(output_memory, topk_ind).detach()
        if denoising_class is not None:
            target = jt.concat([denoising_class, target], 1)
        return target, reference_points_unact.detach(), enc_topk_bboxes, enc_topk_logits

    def execute(self, feats, targets=None, dn_draws=None, topk_index=None):
        """feats: encoder maps; targets / dn_draws (training denoising, numpy); topk_index
        [B, Q] optional.  -> {"pred_logits" [B, Q, C], "pred_boxes" [B, Q, 4]} (+ aux in training)."""
        memory, spatial_shapes, level_start_index = self._get_encoder_input(feats)
        training = self.is_training()
        if training and self.num_denoising > 0 and targets is not None:
            dn_class, dn_bbox_unact, attn_mask, dn_meta = get_contrastive_denoising_training_group(
                targets, self.num_classes, self.num_queries, self.denoising_class_embed, dn_draws,
                num_denoising=self.num_denoising, label_noise_ratio=self.label_noise_ratio,
                box_noise_scale=self.box_noise_scale, dtype=str(memory.dtype))
        else:
            dn_class = dn_bbox_unact = attn_mask = dn_meta = None
        target, init_ref_points_unact, enc_topk_bboxes, enc_topk_logits = self._get_decoder_input(
            memory, spatial_shapes, dn_class, dn_bbox_unact, topk_index)
        out_bboxes, out_logits = self.decoder(target, init_ref_points_unact, memory, spatial_shapes,
                                              level_start_index, self.dec_bbox_head, self.dec_score_head,
                                              self.query_pos_head, attn_mask=attn_mask)
        if training and dn_meta is not None:
            n_dn = dn_meta["dn_num_split"][0]
            dn_out_bboxes, out_bboxes = out_bboxes[:, :, :n_dn], out_bboxes[:, :, n_dn:]
            dn_out_logits, out_logits = out_logits[:, :, :n_dn], out_logits[:, :, n_dn:]
        out = {"pred_logits": out_logits[-1], "pred_boxes": out_bboxes[-1]}
        if training and self.aux_loss:
            out["aux_outputs"] = self._set_aux_loss(out_logits[:-1], out_bboxes[:-1])
            out["aux_outputs"].extend(self._set_aux_loss([enc_topk_logits], [enc_topk_bboxes]))
            if dn_meta is not None:
                out["dn_aux_outputs"] = self._set_aux_loss(dn_out_logits, dn_out_bboxes)
                out["dn_meta"] = dn_meta
        return out

    @staticmethod
    def _set_aux_loss(outputs_class, outputs_coord):
        # stacked Vars are indexed explicitly (iterating a Var is not a torch-like unbind)
        return [{"pred_logits": outputs_class[i], "pred_boxes": outputs_coord[i]}
                for i in range(len(outputs_class) if isinstance(outputs_class, list) else outputs_class.shape[0])]
