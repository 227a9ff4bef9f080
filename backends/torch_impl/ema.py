"""Exponential moving average of a model's state (parameters and floating buffers)."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


class ModelEMA:
    """Official ModelEMA: after each optimiser step, for every floating state_dict entry
    ema = d * ema + (1 - d) * model with d = decay * (1 - exp(-updates / warmups)), so early
    averages follow the model closely.  Integer buffers (num_batches_tracked) are not averaged."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 2000):
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        self.warmups = warmups
        self.updates = 0
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        return self.decay * (1 - math.exp(-updates / self.warmups))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay_at(self.updates)
        msd = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v *= d
                v += (1 - d) * msd[k].detach()

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "warmups": self.warmups}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state.get("updates", self.updates)
