"""Exponential moving average of a model's state (parameters and floating buffers)."""
from __future__ import annotations

import copy
import math

import numpy as np

from . import framework as fw


class ModelEMA:
    """Official ModelEMA: after each optimiser step, for every floating state_dict entry
    ema = d * ema + (1 - d) * model with d = decay * (1 - exp(-updates / warmups)).
    (BN counters are plain ints here, never averaged, as torch skips integer buffers.)"""

    def __init__(self, model, decay: float = 0.9999, warmups: int = 2000):
        self.module = fw.set_training(copy.deepcopy(model), False)
        for v in self.module.state_dict().values():
            fw.freeze(v)             # nothing in the EMA copy is trained (deepcopy resets flags)
        self.decay = decay
        self.warmups = warmups
        self.updates = 0

    def decay_at(self, updates: int) -> float:
        return self.decay * (1 - math.exp(-updates / self.warmups))

    def update(self, model) -> None:
        self.updates += 1
        d = self.decay_at(self.updates)
        msd = model.state_dict()
        touched = []
        for k, v in self.module.state_dict().items():
            if v.dtype.is_float():
                fw.update_(v, v * fw.scalar(d, v) + fw.scalar(1 - d, v) * msd[k].detach())  # v *= d; v += (1-d) m
                touched.append(v)
        fw.jt.sync(touched)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "warmups": self.warmups}

    def load_state_dict(self, state: dict) -> None:
        sd = self.module.state_dict()
        for k, v in state["module"].items():
            fw.assign(sd[k], fw.to_numpy(v), str(sd[k].dtype))
        self.updates = state.get("updates", self.updates)

    # --- flat arrays (checkpoint / resume): spec name -> array, as Adapter.export_weights ---
    @staticmethod
    def array_problems(spec, arrays) -> list:
        miss = [x.name for x in spec if x.name not in arrays]
        bad = [x.name for x in spec if x.name in arrays and tuple(np.shape(arrays[x.name])) != x.shape]
        if miss or bad or len(arrays) != len(spec):
            return [f"ema.module.*: {len(miss)} missing, {len(bad)} with other shapes, "
                    f"{len(arrays) - len(spec) + len(miss)} unexpected"]
        return []

    def load_arrays(self, spec, arrays, dtype: str, updates: int) -> None:
        from .common import named_batchnorms
        sd, bns = self.module.state_dict(), named_batchnorms(self.module)
        for x in spec:
            if x.dtype == "int64":
                bns[x.name[:-len(".num_batches_tracked")]]._num_batches_tracked = int(arrays[x.name])
            else:
                fw.assign(sd[x.name], arrays[x.name], dtype)
        self.updates = int(updates)
