"""RT-DETR (v1) in PyTorch, mirroring backends/jittor_impl file for file (see backends/README.md)."""
from .adapter import Adapter, WeightsError  # noqa: F401
