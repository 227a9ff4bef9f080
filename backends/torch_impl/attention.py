"""MultiheadAttention (PyTorch side): torch's nn.MultiheadAttention, the reference.  Mirrors
``backends/jittor_impl/attention.py``, which rebuilds it on 2-D GEMMs.
"""
from __future__ import annotations

import torch.nn as nn

MultiheadAttention = nn.MultiheadAttention
