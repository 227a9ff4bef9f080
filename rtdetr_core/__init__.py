"""Backend-agnostic core of rtdetr-parity (numpy only): configs, parameter spec, seeded
draws, data pipeline, box ops, matching, post-processing and COCO evaluation."""
from .config import ConfigError, RTDETRConfig, available_presets, load_config  # noqa: F401
from .param_spec import ParamEntry, param_spec, spec_totals  # noqa: F401
