"""Adapter: the numpy-in / numpy-out interface the harness calls (see backends/README.md)."""
from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np

from rtdetr_core.config import RTDETRConfig, load_config
from rtdetr_core.param_spec import param_spec

from . import framework as fw
from .capture import Recorder, recorder_for
from .common import named_batchnorms
from .criterion import SetCriterion
from .distributed import World, average_gradients, convert_sync_batchnorm, init_world, mean_over_ranks
from .ema import ModelEMA
from .framework import jt
from .matcher import HungarianMatcher
from .optim import (AdamW, build_optimizer, build_param_groups, clip_grad_norm, export_optimizer_state,
                    load_optimizer_state, parse_optimizer_state, trainable_parameters)
from .postprocessor import RTDETRPostProcessor
from .rtdetr import build_model, check_against_spec


class WeightsError(ValueError):
    """A weights dict does not fit the model; the message lists every problem."""


# the train loop's discrete decisions: this intermediate plus the matcher's assignments
TOPK_INDEX = ("decoder.enc_topk_index",)


def _matches_numpy(used) -> "OrderedDict[str, List[np.ndarray]]":
    """Criterion's assignments -> call name -> per image int64 [2, n] (query, target)."""
    return OrderedDict((k, [np.asarray(m, dtype=np.int64).reshape(2, -1) for m in v]) for k, v in used.items())


def _tree_to_numpy(x):
    if isinstance(x, jt.Var):
        a = fw.to_numpy(x)
        return a.astype(np.int64) if a.dtype == np.int32 else a
    if isinstance(x, dict):
        return {k: _tree_to_numpy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_tree_to_numpy(v) for v in x]
    return x


class Adapter:
    """One RT-DETR model (+ criterion, post-processor, optimiser) driven with numpy arrays."""

    framework = "jittor"

    def __init__(self, cfg: Union[str, RTDETRConfig], dtype: str = "float32", device: str = "cpu"):
        self.cfg = load_config(cfg)
        fw.get_dtype(dtype)
        self.dtype, self.device = dtype, device
        fw.set_device(device)
        self.spec = param_spec(self.cfg)
        model = build_model(self.cfg)
        # every entry is zero (in the adapter dtype) until load_weights(): Jittor's random
        # initialisers are replaced before they ever run
        for v in model.state_dict().values():
            fw.assign(v, np.zeros(v.shape), dtype)
        self.model = model
        self._bn = named_batchnorms(model)
        check_against_spec(model, self.spec, self._bn)
        c, m = self.cfg.criterion, self.cfg.criterion.matcher
        matcher = HungarianMatcher({"cost_class": m.cost_class, "cost_bbox": m.cost_bbox, "cost_giou": m.cost_giou},
                                   use_focal_loss=self.cfg.postprocess.use_focal_loss, alpha=m.alpha, gamma=m.gamma)
        self.criterion = SetCriterion(matcher, c.weight_dict, c.losses, alpha=c.alpha, gamma=c.gamma,
                                      eos_coef=c.eos_coef, num_classes=self.cfg.num_classes)
        self.postprocessor = RTDETRPostProcessor(self.cfg.num_classes, self.cfg.postprocess.use_focal_loss,
                                                 self.cfg.postprocess.num_top_queries)
        self.optimizer: Optional[AdamW] = None
        self.ema: Optional[ModelEMA] = None
        self.world = World()

    def data_parallel(self) -> World:
        """Join the MPI world of an mpirun launch, as the official training does in torch:
        BatchNorm synced (distributed.convert_sync_batchnorm), gradients averaged over the
        ranks after jt.grad (as jittor.optim does), and the criterion's num_boxes
        all-reduced.  World size 1: nothing changes."""
        self.world = init_world(self.device)
        if self.world.active:
            convert_sync_batchnorm(self.model, self.device)
        return self.world

    # --- weights -----------------------------------------------------------------------
    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Strict load: every spec entry present with its shape, nothing extra.  Floating
        arrays are cast to the adapter dtype, integer buffers stay int64.  (Jittor's own
        load_state_dict never raises and adopts the array dtype: not used.)"""
        problems = []
        want = {e.name: e for e in self.spec}
        for name in want:
            if name not in weights:
                problems.append(f"missing: {name}")
        for name, arr in weights.items():
            e = want.get(name)
            if e is None:
                problems.append(f"unexpected: {name}")
                continue
            a = np.asarray(arr)
            if tuple(a.shape) != e.shape:
                problems.append(f"shape: {name} is {tuple(a.shape)}, expected {e.shape}")
            elif e.dtype == "int64" and not np.issubdtype(a.dtype, np.integer):
                problems.append(f"dtype: {name} is {a.dtype}, expected an integer array")
            elif e.dtype != "int64" and not np.issubdtype(a.dtype, np.floating):
                problems.append(f"dtype: {name} is {a.dtype}, expected a floating array")
        if problems:
            raise WeightsError(f"{len(problems)} problem(s) loading weights into {self.cfg.name}: "
                               + "; ".join(problems))
        sd = self.model.state_dict()
        for e in self.spec:
            a = np.asarray(weights[e.name])
            if e.dtype == "int64":
                self._bn[e.name[:-len(".num_batches_tracked")]]._num_batches_tracked = int(a)
            else:
                fw.assign(sd[e.name], a, self.dtype)
        jt.sync(list(sd.values()))

    def export_weights(self) -> "OrderedDict[str, np.ndarray]":
        """Every state_dict entry in spec order (floating in the adapter dtype, counters int64)."""
        return self._export(self.model, self._bn)

    def _export(self, model, bns) -> "OrderedDict[str, np.ndarray]":
        sd, out = model.state_dict(), OrderedDict()
        for e in self.spec:
            if e.dtype == "int64":
                out[e.name] = np.array(bns[e.name[:-len(".num_batches_tracked")]]._num_batches_tracked, dtype=np.int64)
            else:
                out[e.name] = fw.to_numpy(sd[e.name])
        return out

    # --- inputs --------------------------------------------------------------------------
    def _images(self, images: np.ndarray):
        return fw.from_numpy(np.asarray(images), self.dtype)

    def _targets(self, targets: Optional[Sequence[Mapping[str, np.ndarray]]]):
        """labels stay numpy int64 (index arithmetic is done in numpy), boxes become Vars."""
        if targets is None:
            return None
        return [{"labels": np.asarray(t["labels"], dtype=np.int64).reshape(-1),
                 "boxes": fw.constant(np.asarray(t["boxes"], dtype=np.float64).reshape(-1, 4), self.dtype)}
                for t in targets]

    # --- forward / loss --------------------------------------------------------------------
    def forward(self, images, *, train: bool = False, targets=None, dn_draws=None, topk_index=None,
                multi_scale_size=None, capture: Union[bool, Sequence[str]] = False) -> dict:
        """Eval (default) or train-mode forward, no gradients.  Train mode uses batch
        statistics and updates BN running statistics, as the official train forward does."""
        fw.set_training(self.model, train)
        x = self._images(images).stop_grad()
        rec = recorder_for(capture)
        # no_grad: otherwise Jittor keeps every activation for a backward that never comes
        # (r18vd eval at 640: peak RSS 915 -> 427 MB)
        with fw.no_grad(), (rec if rec is not None else nullcontext()):
            out = self.model(x, self._targets(targets) if train else None, dn_draws, topk_index, multi_scale_size)
        res = _tree_to_numpy(out)
        if rec is not None:
            res["intermediates"] = rec.numpy()
            res["decisions"] = rec.decisions
        jt.sync_all()
        return res

    def _unused(self, out) -> set:
        """Trainable parameters the loss cannot reach (torch: grad None, skipped by clipping
        and AdamW): the dn class embedding when the batch has no denoising."""
        if self.cfg.decoder.num_denoising > 0 and "dn_meta" not in out:
            return {"decoder.denoising_class_embed.weight"}
        return set()

    def _train_forward_loss(self, images, targets, dn_draws, matches, topk_index, multi_scale_size=None):
        fw.set_training(self.model, True)
        tgts = self._targets(targets)
        out = self.model(self._images(images), tgts, dn_draws, topk_index, multi_scale_size)
        losses, used = self.criterion.compute(out, tgts, matches)
        total = None
        for v in losses.values():        # Python sum in dict order, as the official loop
            total = v if total is None else total + v
        return out, losses, used, total

    def _grads(self, out, total):
        """name -> grad Var (None for unreachable parameters), trainable spec order."""
        named = trainable_parameters(self.model)
        skip = self._unused(out)
        names = [n for n in named if n not in skip]
        # retain_graph=False, as jittor.optim does: jt.grad's default (True) keeps every backward
        # tensor between a parameter and a held gradient alive for a second-order grad (the
        # activation gradient each conv's weight gradient reads stays until the step ends);
        # r18vd at 640: +1 activation per conv layer at the training peak (pitfalls 22)
        gs = jt.grad(total, [named[n] for n in names], retain_graph=False)
        grads = OrderedDict((n, None) for n in named)
        grads.update(zip(names, gs))
        return average_gradients(grads)

    def loss(self, images, targets, dn_draws=None, *, matches=None, topk_index=None,
             backward: bool = False, capture: Union[bool, Sequence[str]] = False, multi_scale_size=None) -> dict:
        """Train-mode forward + criterion (+ backward).  Gradients are returned for every
        trainable parameter in spec order (zeros for a parameter the loss did not reach)."""
        rec = recorder_for(capture)
        with (rec if rec is not None else nullcontext()):
            out, losses, used, total = self._train_forward_loss(images, targets, dn_draws, matches, topk_index,
                                                                multi_scale_size)
        res = {"losses": OrderedDict((k, float(v.item())) for k, v in losses.items()),
               "total": float(total.item()), "matches": used, "outputs": _tree_to_numpy(out)}
        if backward:
            grads = self._grads(out, total)
            res["grads"] = OrderedDict(
                (n, fw.to_numpy(g) if g is not None else np.zeros(tuple(self.model.state_dict()[n].shape),
                                                                  dtype=self.dtype))
                for n, g in grads.items())
        if rec is not None:
            res["intermediates"] = rec.numpy()
            res["decisions"] = rec.decisions
        jt.sync_all()
        return res

    # --- training ----------------------------------------------------------------------
    def _ensure_optimizer(self) -> None:
        if self.optimizer is None:
            self.optimizer = build_optimizer(self.model, self.cfg)
            if self.cfg.ema.enabled:
                self.ema = ModelEMA(self.model, self.cfg.ema.decay, self.cfg.ema.warmups)

    def train_step(self, images, targets, dn_draws=None, *, matches=None, topk_index=None,
                   multi_scale_size=None) -> dict:
        """Official loop without AMP: zero_grad, forward, loss, backward, clip_grad_norm,
        AdamW step, EMA update (if enabled).  Gradients are fresh each step (jt.grad), so
        zero_grad is implicit.  ``decisions``: the step's top-k index [B, Q] and assignments
        (call -> per image [2, n]), which the train stage logs and compares."""
        self._ensure_optimizer()
        with Recorder(TOPK_INDEX, evidence=False) as rec:
            out, losses, used, total = self._train_forward_loss(images, targets, dn_draws, matches, topk_index,
                                                                multi_scale_size)
        grads = self._grads(out, total)
        grad_norm = clip_grad_norm(grads, self.cfg.optimizer.clip_max_norm)
        self.optimizer.step(grads)
        if self.ema is not None:
            self.ema.update(self.model)
        # data parallel: the global batch's losses (the mean over ranks, as the official loop logs)
        vals = mean_over_ranks([float(v.item()) for v in losses.values()] + [float(total.item())])
        res = {"losses": OrderedDict(zip(losses, vals[:-1])), "total": vals[-1], "grad_norm": grad_norm,
               "lr": [float(g["lr"]) for g in self.optimizer.param_groups],
               "decisions": {"topk_index": rec.numpy()[TOPK_INDEX[0]],
                             "matches": _matches_numpy(used)}}
        jt.sync_all()
        return res

    def param_groups(self) -> "OrderedDict[str, int]":
        """Trainable parameter name -> optimiser group index, in spec order."""
        idx = {n: i for i, g in enumerate(build_param_groups(self.model, self.cfg)) for n in g["names"]}
        return OrderedDict((e.name, idx[e.name]) for e in self.spec if e.kind == "param" and e.trainable)

    # --- training state: LR schedule, checkpoint / resume (parity run --stage train) ------
    def get_lr(self) -> List[float]:
        """Learning rate of every optimiser group, group order (builds the optimiser)."""
        self._ensure_optimizer()
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def set_lr(self, lrs: Sequence[float]) -> None:
        """Set the learning rate of every optimiser group (one LR-schedule step)."""
        self._ensure_optimizer()
        if len(lrs) != len(self.optimizer.param_groups):
            raise ValueError(f"set_lr: {len(lrs)} rates for {len(self.optimizer.param_groups)} groups")
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = float(lr)

    def export_train_state(self) -> "OrderedDict[str, np.ndarray]":
        """Optimiser (+ EMA) state as flat arrays (same keys as the torch adapter):
        ``optimizer.lr.<i>``, ``optimizer.state.<name>.{step,exp_avg,exp_avg_sq}``, and with
        EMA ``ema.updates`` and ``ema.module.<name>`` for every spec entry."""
        self._ensure_optimizer()
        out = export_optimizer_state(self.optimizer, [n for n in self._trainable_shapes()])
        if self.ema is not None:
            out["ema.updates"] = np.array(int(self.ema.updates), dtype=np.int64)
            out.update((f"ema.module.{k}", v) for k, v in self.export_ema_weights().items())
        return out

    def load_train_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`export_train_state` output (after ``load_weights`` of the same
        checkpoint).  Strict: unknown keys, missing moments or other shapes raise ValueError."""
        self._ensure_optimizer()
        opt_keys = {k: v for k, v in state.items() if k.startswith("optimizer.")}
        lrs, moments, problems = parse_optimizer_state(self.optimizer, opt_keys, self._trainable_shapes())
        ema = OrderedDict((k[len("ema.module."):], np.asarray(v)) for k, v in state.items() if k.startswith("ema.module."))
        problems += [f"unexpected: {k}" for k in state if not k.startswith(("optimizer.", "ema.module.", "ema.updates"))]
        if (self.ema is not None) != ("ema.updates" in state):
            problems.append("EMA state present/absent but cfg.ema.enabled is " + str(self.cfg.ema.enabled))
        elif self.ema is not None:
            problems += self.ema.array_problems(self.spec, ema)
        if problems:
            raise ValueError(f"load_train_state: {len(problems)} problem(s): " + "; ".join(problems[:10]))
        load_optimizer_state(self.optimizer, lrs, moments, self.dtype)
        if self.ema is not None:
            self.ema.load_arrays(self.spec, ema, self.dtype, int(np.asarray(state["ema.updates"])))

    def export_ema_weights(self) -> "Optional[OrderedDict[str, np.ndarray]]":
        """The EMA model's state in spec order (as :meth:`export_weights`); None when EMA is
        disabled or no optimiser exists yet."""
        return None if self.ema is None else self._export(self.ema.module, named_batchnorms(self.ema.module))

    def _trainable_shapes(self):
        return OrderedDict((e.name, e.shape) for e in self.spec if e.kind == "param" and e.trainable)

    def sync(self) -> None:
        """Wait until every queued kernel has finished (Jittor is lazy: timing needs this)."""
        jt.sync_all(True)

    # --- post-processing -----------------------------------------------------------------
    def postprocess(self, outputs: Mapping[str, np.ndarray], orig_sizes, label_to_category=None) -> List[dict]:
        """Top-k detections per image: {"scores" [K], "labels" [K] int64, "boxes" [K, 4] xyxy px}.
        orig_sizes [B, 2] is (h, w); ``label_to_category`` optionally maps labels to ids."""
        pp = self.postprocessor
        if label_to_category is not None:
            pp = RTDETRPostProcessor(self.cfg.num_classes, self.cfg.postprocess.use_focal_loss,
                                     self.cfg.postprocess.num_top_queries, label_to_category)
        outs = {k: fw.from_numpy(np.asarray(outputs[k]), self.dtype) for k in ("pred_logits", "pred_boxes")}
        sizes = fw.from_numpy(np.asarray(orig_sizes, dtype=np.float64).reshape(-1, 2), self.dtype)
        return [_tree_to_numpy(r) for r in pp(outs, sizes)]
