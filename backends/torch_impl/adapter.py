"""Adapter: the numpy-in / numpy-out interface the harness calls (see backends/README.md)."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from rtdetr_core.config import RTDETRConfig, load_config
from rtdetr_core.param_spec import param_spec

from .capture import Recorder, recorder_for
from .criterion import SetCriterion
from .distributed import World, convert_sync_batchnorm, init_world, mean_over_ranks
from .ema import ModelEMA
from .framework import from_numpy, get_dtype, no_grad, to_numpy
from .matcher import HungarianMatcher
from .optim import build_optimizer, build_param_groups, clip_grad_norm
from .postprocessor import RTDETRPostProcessor
from .rtdetr import build_model


class WeightsError(ValueError):
    """A weights dict does not fit the model; the message lists every problem."""


# the train loop's discrete decisions: this intermediate plus the matcher's assignments
TOPK_INDEX = ("decoder.enc_topk_index",)


def _matches_numpy(used) -> "OrderedDict[str, List[np.ndarray]]":
    """Criterion's assignments -> call name -> per image int64 [2, n] (query, target)."""
    return OrderedDict((k, [np.stack([to_numpy(s), to_numpy(t)]).astype(np.int64).reshape(2, -1) for s, t in v])
                       for k, v in used.items())


def _tree_to_numpy(x):
    if isinstance(x, torch.Tensor):
        return to_numpy(x)
    if isinstance(x, dict):
        return {k: _tree_to_numpy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_tree_to_numpy(v) for v in x]
    return x


class Adapter:
    """One RT-DETR model (+ criterion, post-processor, optimiser) driven with numpy arrays."""

    framework = "torch"

    def __init__(self, cfg: Union[str, RTDETRConfig], dtype: str = "float32", device: str = "cpu"):
        self.cfg = load_config(cfg)
        self.dtype = dtype
        self.torch_dtype = get_dtype(dtype)
        self.device = torch.device(device)
        self.spec = param_spec(self.cfg)
        # Built on the meta device: no framework RNG ever runs; every entry is zero until
        # load_weights() (weights always come from a name -> array dict).
        with torch.device("meta"):
            model = build_model(self.cfg)
        model = model.to_empty(device=self.device).to(self.torch_dtype)
        with torch.no_grad():
            for t in model.state_dict().values():
                t.zero_()
        self.model = model
        c = self.cfg.criterion
        m = c.matcher
        matcher = HungarianMatcher({"cost_class": m.cost_class, "cost_bbox": m.cost_bbox, "cost_giou": m.cost_giou},
                                   use_focal_loss=self.cfg.postprocess.use_focal_loss, alpha=m.alpha, gamma=m.gamma)
        self.criterion = SetCriterion(matcher, c.weight_dict, c.losses, alpha=c.alpha, gamma=c.gamma,
                                      eos_coef=c.eos_coef, num_classes=self.cfg.num_classes)
        self.postprocessor = RTDETRPostProcessor(self.cfg.num_classes, self.cfg.postprocess.use_focal_loss,
                                                 self.cfg.postprocess.num_top_queries)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.ema: Optional[ModelEMA] = None
        self.net: torch.nn.Module = model        # what train-mode forwards run: model, or its DDP wrapper
        self.world = World()

    def data_parallel(self) -> World:
        """Join the process group of a torchrun launch, as the official training does:
        BatchNorm synced (distributed.convert_sync_batchnorm), the model wrapped in
        DistributedDataParallel (gradients averaged; find_unused_parameters as the official
        config), and the criterion's num_boxes all-reduced.  World size 1: nothing changes."""
        self.world = init_world(str(self.device))
        if self.world.active and self.net is self.model:
            convert_sync_batchnorm(self.model, self.device.type)
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True)
        return self.world

    # --- weights -----------------------------------------------------------------------
    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Strict load: every spec entry present with its shape, nothing extra.  Floating
        arrays are cast to the adapter dtype, integer buffers stay int64."""
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
        sd = OrderedDict()
        for e in self.spec:
            a = np.asarray(weights[e.name])
            sd[e.name] = from_numpy(a.astype(np.int64) if e.dtype == "int64" else a, self.dtype, str(self.device))
        self.model.load_state_dict(sd, strict=True)

    def export_weights(self) -> "OrderedDict[str, np.ndarray]":
        """Every state_dict entry in spec order (floating in the adapter dtype, counters int64)."""
        sd = self.model.state_dict()
        return OrderedDict((e.name, to_numpy(sd[e.name])) for e in self.spec)

    # --- inputs --------------------------------------------------------------------------
    def _images(self, images: np.ndarray) -> torch.Tensor:
        return from_numpy(np.asarray(images), self.dtype, str(self.device))

    def _targets(self, targets: Optional[Sequence[Mapping[str, np.ndarray]]]):
        if targets is None:
            return None
        out = []
        for t in targets:
            labels = np.asarray(t["labels"], dtype=np.int64).reshape(-1)
            boxes = np.asarray(t["boxes"]).reshape(-1, 4)
            out.append({"labels": from_numpy(labels, None, str(self.device)),
                        "boxes": from_numpy(boxes.astype(np.float64), self.dtype, str(self.device))})
        return out

    def _topk(self, topk_index):
        return None if topk_index is None else from_numpy(np.asarray(topk_index, dtype=np.int64), None,
                                                         str(self.device))

    # --- forward / loss --------------------------------------------------------------------
    def forward(self, images, *, train: bool = False, targets=None, dn_draws=None, topk_index=None,
                multi_scale_size=None, capture: Union[bool, Sequence[str]] = False) -> dict:
        """Eval (default) or train-mode forward, no gradients.  Train mode uses batch
        statistics and updates BN running statistics, as the official train forward does."""
        self.model.train(train)
        x = self._images(images)
        rec = recorder_for(capture)
        with no_grad(), (rec if rec is not None else contextlib.nullcontext()):
            out = self.model(x, self._targets(targets) if train else None, dn_draws,
                             self._topk(topk_index), multi_scale_size)
        res = _tree_to_numpy(out)
        if rec is not None:
            res["intermediates"] = rec.numpy()
            res["decisions"] = rec.decisions
        return res

    def _train_forward_loss(self, x, tgts, dn_draws, matches, topk_index, multi_scale_size=None):
        out = self.net(x, tgts, dn_draws, topk_index, multi_scale_size)
        losses, used = self.criterion.compute(out, tgts, matches)
        total = sum(losses.values())   # Python sum in dict order, as the official loop
        return out, losses, used, total

    def loss(self, images, targets, dn_draws=None, *, matches=None, topk_index=None,
             backward: bool = False, capture: Union[bool, Sequence[str]] = False, multi_scale_size=None) -> dict:
        """Train-mode forward + criterion (+ backward).  Gradients are returned for every
        trainable parameter in spec order (zeros for a parameter the loss did not reach)."""
        self.model.train()
        self.criterion.train()
        x, tgts = self._images(images), self._targets(targets)
        if backward:
            self.model.zero_grad(set_to_none=True)
        rec = recorder_for(capture)
        with torch.set_grad_enabled(backward):
            with rec if rec is not None else contextlib.nullcontext():
                out, losses, used, total = self._train_forward_loss(x, tgts, dn_draws, matches,
                                                                    self._topk(topk_index), multi_scale_size)
            if backward:
                total.backward()
        res = {
            "losses": OrderedDict((k, float(v.detach())) for k, v in losses.items()),
            "total": float(total.detach()),
            "matches": _matches_numpy(used),
            "outputs": _tree_to_numpy(out),
        }
        if backward:
            params = dict(self.model.named_parameters())
            grads = OrderedDict()
            for e in self.spec:
                if e.kind == "param" and e.trainable:
                    p = params[e.name]
                    grads[e.name] = to_numpy(p.grad) if p.grad is not None else np.zeros(e.shape, dtype=self.dtype)
            res["grads"] = grads
        if rec is not None:
            res["intermediates"] = rec.numpy()
            res["decisions"] = rec.decisions
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
        AdamW step, EMA update (if enabled).  ``decisions``: the step's top-k index [B, Q] and
        assignments (call -> per image [2, n]), which the train stage logs and compares."""
        self._ensure_optimizer()
        self.model.train()
        self.criterion.train()
        x, tgts = self._images(images), self._targets(targets)
        self.optimizer.zero_grad(set_to_none=True)
        with Recorder(TOPK_INDEX, evidence=False) as rec:
            _, losses, used, total = self._train_forward_loss(x, tgts, dn_draws, matches, self._topk(topk_index),
                                                              multi_scale_size)
        total.backward()
        grad_norm = clip_grad_norm(self.model.parameters(), self.cfg.optimizer.clip_max_norm)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        # data parallel: the global batch's losses (the mean over ranks, as the official loop logs)
        vals = mean_over_ranks([float(v.detach()) for v in losses.values()] + [float(total.detach())])
        return {"losses": OrderedDict(zip(losses, vals[:-1])), "total": vals[-1], "grad_norm": grad_norm,
                "lr": [float(g["lr"]) for g in self.optimizer.param_groups],
                "decisions": {"topk_index": rec.numpy()[TOPK_INDEX[0]].astype(np.int64),
                              "matches": _matches_numpy(used)}}

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
        """Optimiser (+ EMA) state as flat arrays, for a checkpoint:
        ``optimizer.lr.<i>`` float64 [], per parameter with AdamW state (trainable spec order)
        ``optimizer.state.<name>.step`` int64 [], ``.exp_avg``, ``.exp_avg_sq`` (adapter dtype);
        with EMA ``ema.updates`` int64 [] and ``ema.module.<name>`` for every spec entry."""
        self._ensure_optimizer()
        out: "OrderedDict[str, np.ndarray]" = OrderedDict()
        for i, g in enumerate(self.optimizer.param_groups):
            out[f"optimizer.lr.{i}"] = np.array(float(g["lr"]), dtype=np.float64)
        params = dict(self.model.named_parameters())
        for e in self.spec:
            if not (e.kind == "param" and e.trainable):
                continue
            st = self.optimizer.state.get(params[e.name])
            if not st:
                continue
            out[f"optimizer.state.{e.name}.step"] = np.array(int(float(st["step"])), dtype=np.int64)
            out[f"optimizer.state.{e.name}.exp_avg"] = to_numpy(st["exp_avg"])
            out[f"optimizer.state.{e.name}.exp_avg_sq"] = to_numpy(st["exp_avg_sq"])
        if self.ema is not None:
            out["ema.updates"] = np.array(int(self.ema.updates), dtype=np.int64)
            for k, v in self.export_ema_weights().items():
                out[f"ema.module.{k}"] = v
        return out

    def load_train_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`export_train_state` output (after ``load_weights`` of the same
        checkpoint).  Strict: unknown keys, missing moments or other shapes raise ValueError."""
        self._ensure_optimizer()
        params = dict(self.model.named_parameters())
        trainable = {e.name: e for e in self.spec if e.kind == "param" and e.trainable}
        ngroups = len(self.optimizer.param_groups)
        problems, lrs, moments, ema = [], {}, {}, OrderedDict()
        for k, v in state.items():
            if k.startswith("optimizer.lr."):
                lrs[int(k.rsplit(".", 1)[1])] = float(np.asarray(v))
            elif k.startswith("optimizer.state."):
                name, field = k[len("optimizer.state."):].rsplit(".", 1)
                if name not in trainable or field not in ("step", "exp_avg", "exp_avg_sq"):
                    problems.append(f"unexpected: {k}")
                else:
                    moments.setdefault(name, {})[field] = np.asarray(v)
            elif k.startswith("ema.module."):
                ema[k[len("ema.module."):]] = np.asarray(v)
            elif k != "ema.updates":
                problems.append(f"unexpected: {k}")
        if sorted(lrs) != list(range(ngroups)):
            problems.append(f"optimizer.lr.*: {len(lrs)} groups in the state, the optimiser has {ngroups}")
        for name, m in moments.items():
            if set(m) != {"step", "exp_avg", "exp_avg_sq"}:
                problems.append(f"optimizer.state.{name}: incomplete ({sorted(m)})")
            elif m["exp_avg"].shape != trainable[name].shape or m["exp_avg_sq"].shape != trainable[name].shape:
                problems.append(f"optimizer.state.{name}: shape {m['exp_avg'].shape}, expected {trainable[name].shape}")
        if (self.ema is not None) != ("ema.updates" in state):
            problems.append("EMA state present/absent but cfg.ema.enabled is " + str(self.cfg.ema.enabled))
        elif self.ema is not None:
            miss = [e.name for e in self.spec if e.name not in ema]
            bad = [e.name for e in self.spec if e.name in ema and tuple(ema[e.name].shape) != e.shape]
            if miss or bad or len(ema) != len(self.spec):
                problems.append(f"ema.module.*: {len(miss)} missing, {len(bad)} with other shapes, "
                                f"{len(ema) - len(self.spec) + len(miss)} unexpected")
        if problems:
            raise ValueError(f"load_train_state: {len(problems)} problem(s): " + "; ".join(problems[:10]))
        for i, g in enumerate(self.optimizer.param_groups):
            g["lr"] = lrs[i]
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        self.optimizer.state.clear()
        for name, m in moments.items():
            p = params[name]
            self.optimizer.state[p] = {
                "step": torch.tensor(float(m["step"]), dtype=scalar),
                "exp_avg": from_numpy(m["exp_avg"], self.dtype, str(self.device)).clone(),
                "exp_avg_sq": from_numpy(m["exp_avg_sq"], self.dtype, str(self.device)).clone()}
        if self.ema is not None:
            sd = self.ema.module.state_dict()
            with torch.no_grad():
                for e in self.spec:
                    a = ema[e.name]
                    sd[e.name].copy_(from_numpy(a.astype(np.int64) if e.dtype == "int64" else a, self.dtype,
                                                str(self.device)))
            self.ema.updates = int(np.asarray(state["ema.updates"]))

    def export_ema_weights(self) -> "Optional[OrderedDict[str, np.ndarray]]":
        """The EMA model's state_dict in spec order (as :meth:`export_weights`); None when
        EMA is disabled or no optimiser exists yet."""
        if self.ema is None:
            return None
        sd = self.ema.module.state_dict()
        return OrderedDict((e.name, to_numpy(sd[e.name])) for e in self.spec)

    def sync(self) -> None:
        """Wait until every queued kernel has finished (timing: ``parity bench``): CUDA
        synchronise on a GPU; a no-op on CPU, where torch runs eagerly."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- post-processing -----------------------------------------------------------------
    def postprocess(self, outputs: Mapping[str, np.ndarray], orig_sizes, label_to_category=None) -> List[dict]:
        """Top-k detections per image: {"scores" [K], "labels" [K] int64, "boxes" [K, 4] xyxy px}.
        orig_sizes [B, 2] is (h, w); ``label_to_category`` optionally maps labels to ids."""
        pp = self.postprocessor
        if label_to_category is not None:
            pp = RTDETRPostProcessor(self.cfg.num_classes, self.cfg.postprocess.use_focal_loss,
                                     self.cfg.postprocess.num_top_queries, label_to_category)
        outs = {k: from_numpy(np.asarray(outputs[k]), self.dtype, str(self.device))
                for k in ("pred_logits", "pred_boxes")}
        sizes = from_numpy(np.asarray(orig_sizes, dtype=np.float64).reshape(-1, 2), self.dtype, str(self.device))
        return [_tree_to_numpy(r) for r in pp(outs, sizes)]
