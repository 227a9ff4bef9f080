"""BatchNorm2d and LayerNorm (PyTorch side): torch's own, but for one gradient layout that
torch 2.13's CPU BatchNorm backward misreads.  Mirrors ``backends/jittor_impl/normalization.py``,
where both layers are rebuilt to match torch's CPU arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _memory_format(x: torch.Tensor):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _misread_by_batchnorm_backward(g: torch.Tensor) -> bool:
    """True for the one gradient layout torch 2.13's CPU BatchNorm backward gets wrong: torch
    calls it channels-last contiguous, but its batch stride is not C*H*W (legal only because
    the batch dimension has size 1).  Measured: a canonical channels-last gradient, or the
    same strided gradient at batch 2 (not "contiguous" in any format, so torch copies it),
    are handled correctly."""
    return (g.dim() == 4 and g.is_contiguous(memory_format=torch.channels_last)
            and not g.is_contiguous() and g.stride(0) != g[0].numel())


class BatchNorm2d(nn.BatchNorm2d):
    """torch's BatchNorm2d (unbiased running variance, momentum 0.1, eps 1e-5; same keys),
    except that in training a gradient in the layout torch's backward misreads is first copied
    to its input's layout.

    Why: torch 2.13's CPU BatchNorm backward (train mode) silently returns wrong input,
    weight and bias gradients when the input is NCHW-contiguous and grad_output is
    channels-last with a non-canonical batch stride -- a legal layout at batch size 1, and
    exactly what ``feat.flatten(2).permute(0, 2, 1)`` + ``torch.cat`` (decoder memory, AIFI
    tokens) send back.  Measured: decoder.input_proj.*.norm.bias gradients 3x off at batch
    1; the official RT-DETR code has the same problem on this torch.  Every other layout is
    passed through untouched, so at batch >= 2 the gradients are bit-identical to the
    official code's (a copy would round the backward differently).
    Test: tests/test_torch_model.py::test_batchnorm_backward_strided_grad."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.training and y.requires_grad:
            fmt = _memory_format(x)
            y.register_hook(lambda g: g.contiguous(memory_format=fmt) if _misread_by_batchnorm_backward(g) else g)
        return y


LayerNorm = nn.LayerNorm          # two-pass statistics already, eps 1e-5
