"""RT-DETR (v1) in Jittor: the mirror of ``backends.torch_impl`` (see backends/README.md).

Importing this package imports ``framework`` first, which prepares Jittor (CUDA-less
import guard, -O2 kernels) before any other module touches it."""
from . import framework  # noqa: F401
