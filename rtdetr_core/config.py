"""Typed model/training configuration loaded from YAML presets.

A preset mirrors the sections of the official RT-DETR v1 YAML files (``PResNet``,
``HybridEncoder``, ``RTDETRTransformer``, ``SetCriterion``, ``HungarianMatcher``,
optimizer, EMA), under lower-case section names.  Every field has the official default,
so a preset only lists what differs.  Unknown keys or ill-typed values raise
:class:`ConfigError` with a one-line message naming the file and the key.

Presets ship in ``rtdetr_core/presets/*.yaml``; a preset may say ``base: NAME`` to start
from another preset (deep-merged, the child wins).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional, Union, get_args, get_origin, get_type_hints

import yaml

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")


class ConfigError(ValueError):
    """A user mistake in a config file; the message is one line and names the key."""


@dataclass
class BackboneConfig:
    """PResNet (ResNet-vd).  Official defaults of ``PResNet`` in presnet.py."""
    depth: int = 50
    variant: str = "d"
    num_stages: int = 4
    return_idx: List[int] = field(default_factory=lambda: [1, 2, 3])
    act: str = "relu"
    freeze_at: int = 0          # -1: nothing frozen; 0: stem frozen; k: stem + first k stages
    freeze_norm: bool = True    # every BatchNorm2d of the backbone becomes FrozenBatchNorm2d


@dataclass
class EncoderConfig:
    """HybridEncoder (AIFI + CCFM)."""
    in_channels: List[int] = field(default_factory=lambda: [512, 1024, 2048])
    feat_strides: List[int] = field(default_factory=lambda: [8, 16, 32])
    hidden_dim: int = 256
    nhead: int = 8
    dim_feedforward: int = 1024
    dropout: float = 0.0
    enc_act: str = "gelu"
    use_encoder_idx: List[int] = field(default_factory=lambda: [2])
    num_encoder_layers: int = 1
    pe_temperature: float = 10000.0
    expansion: float = 1.0
    depth_mult: float = 1.0
    act: str = "silu"
    # Kept for fidelity with the official YAML.  Our backends always build the position
    # embedding for the actual feature size, which equals the official precomputed one
    # whenever the input has this size.
    eval_spatial_size: Optional[List[int]] = field(default_factory=lambda: [640, 640])


@dataclass
class DecoderConfig:
    """RTDETRTransformer (deformable decoder, query selection, denoising)."""
    hidden_dim: int = 256
    num_queries: int = 300
    position_embed_type: str = "sine"
    feat_channels: List[int] = field(default_factory=lambda: [256, 256, 256])
    feat_strides: List[int] = field(default_factory=lambda: [8, 16, 32])
    num_levels: int = 3
    num_decoder_points: int = 4
    nhead: int = 8
    num_decoder_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.0
    activation: str = "relu"
    num_denoising: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    learnt_init_query: bool = False
    eval_spatial_size: Optional[List[int]] = field(default_factory=lambda: [640, 640])
    eval_idx: int = -1
    eps: float = 0.01
    aux_loss: bool = True


@dataclass
class MatcherConfig:
    """HungarianMatcher (focal-style class cost)."""
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    alpha: float = 0.25
    gamma: float = 2.0


@dataclass
class CriterionConfig:
    """SetCriterion: VFL + L1 + GIoU."""
    weight_dict: Dict[str, float] = field(
        default_factory=lambda: {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0})
    losses: List[str] = field(default_factory=lambda: ["vfl", "boxes"])
    alpha: float = 0.75
    gamma: float = 2.0
    eos_coef: float = 1e-4
    matcher: MatcherConfig = field(default_factory=MatcherConfig)


@dataclass
class ParamGroupConfig:
    """One optimiser parameter group: ``params`` is a regex matched with ``re.findall``
    against each parameter name (first group that matches wins, as in the official
    ``YAMLConfig.get_optim_params``); lr / weight_decay override the optimiser's."""
    params: str = ""
    lr: Optional[float] = None
    weight_decay: Optional[float] = None


@dataclass
class OptimizerConfig:
    type: str = "AdamW"
    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 1e-4
    groups: List[ParamGroupConfig] = field(default_factory=lambda: [
        ParamGroupConfig(params="backbone", lr=1e-5),
        ParamGroupConfig(params="^(?=.*encoder(?=.*bias|.*norm.*weight)).*$", weight_decay=0.0),
        ParamGroupConfig(params="^(?=.*decoder(?=.*bias|.*norm.*weight)).*$", weight_decay=0.0),
    ])
    clip_max_norm: float = 0.1


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    warmups: int = 2000


@dataclass
class TrainConfig:
    """Schedule of a training run (the harness' ``train`` stage)."""
    image_size: List[int] = field(default_factory=lambda: [640, 640])   # [H, W]
    multi_scale: Optional[List[int]] = None   # official: [480, ..., 800]; None = fixed size
    batch_size: int = 2
    epochs: int = 72
    lr_milestones: List[int] = field(default_factory=lambda: [1000])
    lr_gamma: float = 0.1


@dataclass
class PostprocessConfig:
    num_top_queries: int = 300
    use_focal_loss: bool = True


@dataclass
class RTDETRConfig:
    """A whole RT-DETR model plus its criterion and training recipe."""
    name: str = "custom"
    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # --- derived values the backends need -------------------------------------------
    @property
    def eval_idx(self) -> int:
        """The decoder layer whose output is returned in eval mode (``-1`` resolved)."""
        n = self.decoder.num_decoder_layers
        return self.decoder.eval_idx if self.decoder.eval_idx >= 0 else n + self.decoder.eval_idx

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Short hash of every value: two sides built from equal digests are the same model."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


# ----------------------------------------------------------------------------------------
# YAML loading with strict validation
# ----------------------------------------------------------------------------------------

def _fail(src: str, key: str, msg: str) -> None:
    raise ConfigError(f"{src}: key '{key}': {msg}")


def _coerce(tp: Any, value: Any, src: str, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Union:  # Optional[X]
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, src, key)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(src, key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, src, key)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            _fail(src, key, f"expected a list, got {value!r}")
        (inner,) = get_args(tp)
        return [_coerce(inner, v, src, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            _fail(src, key, f"expected a mapping, got {value!r}")
        _, vt = get_args(tp)
        return {str(k): _coerce(vt, v, src, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            _fail(src, key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(src, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-4 (no dot) as a string: accept numeric strings.
            try:
                return float(value)
            except (TypeError, ValueError):
                _fail(src, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(src, key, f"expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Dict[str, Any], src: str, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = ", ".join(sorted(names))
            _fail(src, full, f"unknown key (allowed here: {close})")
        kwargs[k] = _coerce(hints[k], v, src, full)
    return cls(**kwargs)


def _deep_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "weight_dict":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def available_presets() -> List[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def _read_yaml(path: str) -> Dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _resolve_raw(name_or_path: str, seen: tuple = ()) -> tuple:
    if os.path.exists(name_or_path) or name_or_path.endswith((".yaml", ".yml")):
        path = name_or_path
    else:
        path = os.path.join(PRESET_DIR, f"{name_or_path}.yaml")
        if not os.path.exists(path):
            raise ConfigError(
                f"unknown preset '{name_or_path}' (presets: {', '.join(available_presets())}; or give a YAML path)")
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: key 'base': expected a preset name or path, got {base!r}")
        base_path = base if os.path.isabs(base) or base in available_presets() else os.path.join(os.path.dirname(path), base)
        if base in available_presets():
            base_path = base
        base_data, _ = _resolve_raw(base_path, seen + (path,))
        data = _deep_merge(base_data, data)
    return data, path


def _validate(cfg: RTDETRConfig, src: str) -> None:
    b, e, d = cfg.backbone, cfg.encoder, cfg.decoder
    if b.depth not in (18, 34, 50, 101):
        _fail(src, "backbone.depth", f"must be one of 18, 34, 50, 101, got {b.depth}")
    if b.variant not in ("a", "b", "c", "d"):
        _fail(src, "backbone.variant", f"must be a, b, c or d, got {b.variant!r}")
    for sec, key, val in (("encoder", "act", e.act), ("encoder", "enc_act", e.enc_act), ("decoder", "activation", d.activation),
                          ("backbone", "act", b.act)):
        if val.lower() not in ("relu", "silu", "gelu"):
            _fail(src, f"{sec}.{key}", f"unsupported activation {val!r} (relu, silu, gelu)")
    if cfg.num_classes < 1:
        _fail(src, "num_classes", f"must be >= 1, got {cfg.num_classes}")
    expect_in = [(128, 256, 512)[i] if b.depth < 50 else (512, 1024, 2048)[i] for i in [x - 1 for x in b.return_idx]]
    if list(e.in_channels) != expect_in:
        _fail(src, "encoder.in_channels", f"{e.in_channels} does not match PResNet{b.depth} outputs {expect_in}")
    if len(d.feat_channels) != len(e.in_channels) or any(c != e.hidden_dim for c in d.feat_channels):
        _fail(src, "decoder.feat_channels", f"{d.feat_channels} must be [encoder.hidden_dim]*{len(e.in_channels)}")
    if e.hidden_dim % e.nhead:
        _fail(src, "encoder.nhead", f"hidden_dim {e.hidden_dim} not divisible by nhead {e.nhead}")
    if e.hidden_dim % 4:
        _fail(src, "encoder.hidden_dim", f"must be divisible by 4 (2D sin-cos embedding), got {e.hidden_dim}")
    if d.hidden_dim % d.nhead:
        _fail(src, "decoder.nhead", f"hidden_dim {d.hidden_dim} not divisible by nhead {d.nhead}")
    if d.num_levels < len(d.feat_channels):
        _fail(src, "decoder.num_levels", f"{d.num_levels} < number of feature levels {len(d.feat_channels)}")
    if not -d.num_decoder_layers <= d.eval_idx < d.num_decoder_layers:
        _fail(src, "decoder.eval_idx", f"{d.eval_idx} out of range for {d.num_decoder_layers} layers")
    if d.num_queries < 1:
        _fail(src, "decoder.num_queries", f"must be >= 1, got {d.num_queries}")
    for i, s in enumerate(cfg.train.image_size):
        if s % 32:
            _fail(src, f"train.image_size[{i}]", f"{s} is not a multiple of 32")
    if len(cfg.train.image_size) != 2:
        _fail(src, "train.image_size", f"expected [H, W], got {cfg.train.image_size}")


def load_config(name_or_path: Union[str, RTDETRConfig]) -> RTDETRConfig:
    """Load a preset by name (``r50vd``, ``smoke``...) or a YAML file path."""
    if isinstance(name_or_path, RTDETRConfig):
        return name_or_path
    data, path = _resolve_raw(str(name_or_path))
    cfg = _build(RTDETRConfig, data, path)
    if "name" not in data:
        cfg.name = os.path.splitext(os.path.basename(path))[0]
    _validate(cfg, path)
    return cfg


def config_from_dict(data: Dict[str, Any], src: str = "<dict>") -> RTDETRConfig:
    """Rebuild a config from :meth:`RTDETRConfig.to_dict` output (used by worker processes)."""
    cfg = _build(RTDETRConfig, data, src)
    _validate(cfg, src)
    return cfg
