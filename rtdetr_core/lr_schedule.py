"""The official learning-rate schedule of RT-DETR training: ``MultiStepLR`` stepped once per
epoch (``lr_milestones``, ``lr_gamma`` of the config's ``train`` section)."""
from __future__ import annotations

from typing import Sequence


def multistep_factor(epoch: int, milestones: Sequence[int], gamma: float) -> float:
    """The lr factor during epoch ``epoch`` (1-based): the scheduler has stepped ``epoch - 1``
    times, so the factor is ``gamma ** #{m in milestones: m <= epoch - 1}``."""
    return float(gamma) ** sum(1 for m in milestones if int(m) <= epoch - 1)
