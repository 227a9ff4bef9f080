"""PyTorch <-> Jittor <-> safetensors <-> npz weights for RT-DETR; nothing executed on load.

Library::

    from weights_convert import read_weights, write_weights, validate, WeightsError
    weights, info = read_weights("rtdetr_r50vd_6x_coco_from_paddle.pth", config="r50vd")
    write_weights("r50vd.pkl", weights, "jittor")

CLI: ``weights-convert SRC DST [--config PRESET] [--to jittor|torch|safetensors|npz]
[--drop-mismatched-heads] [--dtype float32|float64] [--fill-seed N]``.
"""
from .api import cast_floats, convert, read_weights
from .errors import WeightsError
from .formats import FORMATS, format_from_extension, write_weights
from .jittor_pickle import dumps_jittor, loads_restricted
from .layout import unwrap
from .validate import CLASS_HEAD_PREFIXES, fill_from_seed, is_class_head, summarize_report, validate

__all__ = [
    "read_weights", "write_weights", "validate", "convert", "fill_from_seed", "unwrap",
    "cast_floats", "summarize_report", "is_class_head", "format_from_extension",
    "dumps_jittor", "loads_restricted", "WeightsError", "FORMATS", "CLASS_HEAD_PREFIXES",
]
