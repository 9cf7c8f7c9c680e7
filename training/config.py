"""Typed training configuration: frozen dataclasses, YAML files and `key=value` overrides.

One `Config` per run: `method` plus the sections data, model, flow, negatives, loss, optim, train
and eval. YAML files are read with `yaml.safe_load`; every value is checked against the field's
type, and an unknown key or a bad type raises ConfigError naming the key, the expected type and
the allowed keys. The defaults are the paper's stage-2 values (methods.md §7); where the official
code differs (methods.md §9) its value is one key away, named in the YAML comments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
import types
import typing
from typing import Any, Literal, Union

import yaml

from anomaly_seg_node.errors import ConfigError
from training.score_info import EVAL_SCORES

Method = Literal['closed_set', 'flow_pretrain', 'densehybrid', 'oodhead', 'nflowjs',
                 'nf_hybrid_js', 'nf_hybrid_ldlx', 'nf_hybrid_ld', 'nf_oodhead']
METHODS: tuple[str, ...] = typing.get_args(Method)

# Which negatives each method pastes into its inlier crops (methods.md §2.3, §3.2).
NEGATIVES: dict[str, str] = {
    'closed_set': 'none', 'flow_pretrain': 'none', 'densehybrid': 'ade20k',
    'oodhead': 'ade20k', 'nflowjs': 'flow', 'nf_hybrid_js': 'flow', 'nf_hybrid_ldlx': 'flow',
    'nf_hybrid_ld': 'flow', 'nf_oodhead': 'flow',
}
# Methods whose segmenter loss has L_d, so the segmenter needs the outlier head.
OUTLIER_HEAD_METHODS = frozenset(
    {'densehybrid', 'oodhead', 'nf_hybrid_js', 'nf_hybrid_ldlx', 'nf_hybrid_ld', 'nf_oodhead'})
# Methods that train a flow (jointly, or alone for flow_pretrain).
FLOW_METHODS = frozenset(m for m, kind in NEGATIVES.items() if kind == 'flow') | {'flow_pretrain'}
SCORES = EVAL_SCORES  # what eval.scores may name (the paper's Table I)


@dataclass(frozen=True)
class DataConfig:
    """Inliers (StreetHazards or CamVid) and the training transform (methods.md §1, §6, §7)."""

    dataset: Literal['streethazards', 'camvid'] = 'streethazards'
    root: str = 'data/streethazards'
    mapping: Literal['densehybrid12', 'creators13'] = 'densehybrid12'
    crop_size: int | tuple[int, int] = 768  # a square side or [h, w]
    jitter: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    mean_fill: tuple[int, int, int] = (84, 88, 95)
    color_jitter: float = 0.0  # brightness/contrast/saturation factors in [1 - x, 1 + x]
    # Letterbox training pairs to this (h, w) aspect with mirrored bars, with letterbox_prob.
    letterbox_hw: tuple[int, int] | None = None
    letterbox_prob: float = 0.5
    num_workers: int = 4


@dataclass(frozen=True)
class ModelConfig:
    """SwiftNet-RN18 segmenter."""

    num_classes: int = 12
    outlier_head: bool = True
    pretrained: bool = False  # ImageNet encoder weights (stage 1)
    init_checkpoint: str | None = None  # stage-1 checkpoint that stage 2 starts from


@dataclass(frozen=True)
class FlowConfig:
    """DenseFlow and its Adamax optimiser (methods.md §3.1, §4)."""

    preset: Literal['25-6', 'tiny'] = '25-6'
    checkpoint: str | None = None  # pretrained flow (paper: Vistas)
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-7
    weight_decay: float = 0.0
    lr_decay: float = 1.0  # multiplies the flow lr after every epoch


@dataclass(frozen=True)
class NegativesConfig:
    """Pasted negatives: flow patches (methods.md §3.2) and ADE20k crops (§2.3)."""

    square: bool = True
    min_size: int = 16
    max_size: int = 216
    step: int = 8
    ade_root: str = 'data/ade20k'
    ade_crop: int = 384
    ade_scale: tuple[float, float] = (1.0, 1.0)  # shrink range of ADE20k crops; [1, 1] = paper
    paste_val: bool = True  # paste negatives into validation crops for AP/FPR95 monitoring


@dataclass(frozen=True)
class LossConfig:
    """Loss weights (methods.md §2.2, §3.3)."""

    beta_x: float = 0.03
    beta_d: float = 0.3
    beta_jsd: float = 0.03
    ld_ignore_void: bool = True  # L_d over non-void pixels only; False: every pixel


@dataclass(frozen=True)
class OptimConfig:
    """Adam for the segmenter with a cosine schedule; decoder and encoder groups."""

    lr: float = 1e-5
    encoder_lr: float = 1e-5
    weight_decay: float = 0.0
    encoder_weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-7
    lr_min: float = 1e-7
    schedule: Literal['cosine', 'constant'] = 'cosine'


@dataclass(frozen=True)
class TrainConfig:
    """Loop, checkpoints and logs."""

    epochs: int = 40
    batch_size: int = 16
    seed: int = 0
    amp: bool = True  # CUDA only; the flow always runs in float32
    device: str = 'auto'
    out_dir: str = 'runs'
    checkpoint_every: int = 1000  # steps
    log_every: int = 20  # steps
    val_every: int = 1  # epochs
    max_steps: int | None = None  # stop early (small budgets, tests)


@dataclass(frozen=True)
class EvalConfig:
    """Anomaly scores and their temperature (methods.md §5)."""

    temperature: float = 2.0  # T for OP, OPxMS and JSD
    scores: tuple[str, ...] = ('DH', 'OP', 'OPxMS')
    tpr: float = 0.95


@dataclass(frozen=True)
class Config:
    """A whole run: the method and one section per concern."""

    method: Method = 'densehybrid'
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def negatives_kind(self) -> str:
        """'none', 'ade20k' or 'flow'."""
        return NEGATIVES[self.method]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, no tuples) for checkpoints, JSON and YAML."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Inverse of `to_dict`, with the same checks as a YAML file."""
        return _build(cls, data, '')

    def with_overrides(self, overrides: Iterable[str]) -> Config:
        """A copy with `section.key=value` overrides applied (values parsed as YAML)."""
        data = self.to_dict()
        for item in overrides:
            key, value = _parse_override(item)
            _set_dotted(data, key, value)
        return Config.from_dict(data)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides, check types and consistency."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f'cannot read config file {path}: {exc.strerror}; pass an existing '
                          'YAML file, e.g. training/configs/densehybrid.yaml') from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f'config file {path} is not valid YAML: {exc}') from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f'config file {path} must hold a mapping of sections, found '
                          f'{type(data).__name__}')
    return Config.from_dict(data).with_overrides(overrides)


# ---- parsing and checks -------------------------------------------------------------------


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip('.') or 'the config'
    if not isinstance(data, Mapping):
        raise ConfigError(f'{where} must be a mapping of keys, found {type(data).__name__} '
                          f'{data!r}')
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f'unknown key {prefix}{unknown[0]!s} in {where}; allowed keys: '
                          f'{", ".join(names)}')
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        key = f'{prefix}{name}'
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name] if data[name] is not None else {}, key + '.')
        else:
            kwargs[name] = _coerce(data[name], tp, key)
    obj = cls(**kwargs)
    if cls is Config:
        _check(obj)
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return 'one of ' + ', '.join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return ' or '.join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f'a list of {_type_name(args[0])}'
        return f'a list of {len(args)} values ({", ".join(_type_name(a) for a in args)})'
    if tp is type(None):
        return 'null'
    return getattr(tp, '__name__', str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert lists to tuples and numeric text."""
    def bad() -> ConfigError:
        return ConfigError(f'{key} must be {_type_name(tp)}, found {type(value).__name__} '
                           f'{value!r}')

    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise bad()
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is not bool:
            return value
        raise bad()
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f'{key}[{i}]') for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad()
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_coerce(v, a, f'{key}[{i}]') for i, (v, a) in pairs)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        # PyYAML reads 1e-5 (no dot) as a string; accept any text float() accepts.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise ConfigError(f'{key} has an unsupported annotation {tp!r}')  # internal: a new field


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition('=')
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f'override {item!r} must look like section.key=value, e.g. '
                          'optim.lr=1e-4 or train.batch_size=4')
    try:
        value = yaml.safe_load(text) if text.strip() else ''
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split('.')
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if parts[0] not in sections:
        raise ConfigError(f'unknown key {key}; allowed top-level keys: {", ".join(sections)}')
    is_section = dataclasses.is_dataclass(typing.get_type_hints(Config)[parts[0]])
    if is_section != (len(parts) == 2) or len(parts) > 2:
        form = f'{parts[0]}.<key>' if is_section else parts[0]
        raise ConfigError(f'override key {key} must have the form {form}=value')
    if len(parts) == 1:
        data[key] = value
        return
    section = data[parts[0]]
    if parts[1] not in section:
        raise ConfigError(f'unknown key {key}; allowed keys in {parts[0]}: '
                          f'{", ".join(section)}')
    # Text given for a str field stays text, even if YAML would read it as a number or bool.
    field_tp = typing.get_type_hints(typing.get_type_hints(Config)[parts[0]])[parts[1]]
    if field_tp is str and not isinstance(value, str) and value is not None:
        value = str(value)
    section[parts[1]] = value


def check_letterbox(letterbox_hw: Sequence[int] | None, prob: float, prefix: str = '') -> None:
    """ConfigError unless letterbox_hw is None or a positive (h, w) and prob lies in [0, 1];
    `prefix` names the config section in the message ('data.')."""
    if letterbox_hw is not None and (len(letterbox_hw) != 2 or min(letterbox_hw) < 1):
        raise ConfigError(f'{prefix}letterbox_hw must be null or a positive [h, w] (the artifact '
                          f'size, e.g. [360, 640]), found {list(letterbox_hw)}')
    if not 0 <= prob <= 1:
        raise ConfigError(f'{prefix}letterbox_prob must lie in [0, 1], found {prob}')


def check_shrink_scale(scale: Sequence[float], prefix: str = '') -> tuple[float, float]:
    """The (min, max) shrink range of negatives as floats; ConfigError unless
    0 < min <= max <= 1. `prefix` names the config section in the message ('negatives.ade_')."""
    lo, hi = (float(v) for v in scale)
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f'{prefix}scale must be [min, max] with 0 < min <= max <= 1, found '
                          f'{[lo, hi]}; [1.0, 1.0] keeps the full-size crops of the paper')
    return lo, hi


def _check(cfg: Config) -> None:
    """Value ranges and method consistency, each error naming the key to fix."""
    if cfg.method in OUTLIER_HEAD_METHODS and not cfg.model.outlier_head:
        raise ConfigError(f'method {cfg.method} trains the outlier head with L_d, but '
                          'model.outlier_head is false; set model.outlier_head=true')
    if cfg.method == 'nflowjs' and cfg.model.outlier_head:
        raise ConfigError('method nflowjs has no outlier head (JSD only), but '
                          'model.outlier_head is true; set model.outlier_head=false')
    positive = {
        'model.num_classes': cfg.model.num_classes,
        'flow.lr': cfg.flow.lr, 'flow.eps': cfg.flow.eps, 'flow.lr_decay': cfg.flow.lr_decay,
        'negatives.min_size': cfg.negatives.min_size, 'negatives.step': cfg.negatives.step,
        'negatives.ade_crop': cfg.negatives.ade_crop, 'optim.lr': cfg.optim.lr,
        'optim.encoder_lr': cfg.optim.encoder_lr, 'optim.eps': cfg.optim.eps,
        'train.epochs': cfg.train.epochs, 'train.batch_size': cfg.train.batch_size,
        'train.checkpoint_every': cfg.train.checkpoint_every,
        'train.log_every': cfg.train.log_every, 'train.val_every': cfg.train.val_every,
        'eval.temperature': cfg.eval.temperature,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f'{key} must be positive, found {value!r}')
    non_negative = {
        'loss.beta_x': cfg.loss.beta_x, 'loss.beta_d': cfg.loss.beta_d,
        'loss.beta_jsd': cfg.loss.beta_jsd, 'optim.lr_min': cfg.optim.lr_min,
        'optim.weight_decay': cfg.optim.weight_decay,
        'optim.encoder_weight_decay': cfg.optim.encoder_weight_decay,
        'flow.weight_decay': cfg.flow.weight_decay, 'data.num_workers': cfg.data.num_workers,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f'{key} must be zero or positive, found {value!r}')
    if cfg.train.max_steps is not None and cfg.train.max_steps < 1:
        raise ConfigError(f'train.max_steps must be null or positive, found '
                          f'{cfg.train.max_steps}')
    if cfg.data.dataset == 'camvid' and cfg.model.num_classes != 11:
        raise ConfigError(f'data.dataset=camvid has 11 classes but model.num_classes='
                          f'{cfg.model.num_classes}; set model.num_classes=11')
    crop = cfg.data.crop_size
    if min(crop if isinstance(crop, tuple) else (crop,)) < 1:
        raise ConfigError(f'data.crop_size must be positive (a side or [h, w]), found {crop!r}')
    lo, hi = cfg.data.jitter
    if not 0 < lo <= hi:
        raise ConfigError(f'data.jitter must be [min, max] with 0 < min <= max, found '
                          f'{list(cfg.data.jitter)}; the paper uses [0.5, 2.0]')
    if not 0 <= cfg.data.color_jitter < 1:
        raise ConfigError(f'data.color_jitter must lie in [0, 1), found {cfg.data.color_jitter}')
    check_letterbox(cfg.data.letterbox_hw, cfg.data.letterbox_prob, 'data.')
    if not all(0 <= v <= 255 for v in cfg.data.mean_fill):
        raise ConfigError(f'data.mean_fill must be three RGB values in 0..255, found '
                          f'{list(cfg.data.mean_fill)}')
    neg = cfg.negatives
    check_shrink_scale(neg.ade_scale, 'negatives.ade_')
    # The flow squeezes three times: patch sides must be multiples of 8.
    if neg.step % 8 or neg.min_size % 8:
        raise ConfigError(f'negatives.min_size and negatives.step must be multiples of 8 (the '
                          f'flow downsamples by 8), found {neg.min_size} and {neg.step}')
    if neg.max_size < neg.min_size:
        raise ConfigError(f'negatives.max_size ({neg.max_size}) must be at least '
                          f'negatives.min_size ({neg.min_size})')
    for b in (*cfg.flow.betas, *cfg.optim.betas):
        if not 0 <= b < 1:
            raise ConfigError(f'flow.betas and optim.betas must lie in [0, 1), found {b}')
    if not 0 < cfg.eval.tpr < 1:
        raise ConfigError(f'eval.tpr must lie in (0, 1), found {cfg.eval.tpr}')
    for score in cfg.eval.scores:
        if score not in SCORES:
            raise ConfigError(f'eval.scores has unknown score {score!r}; allowed: '
                              f'{", ".join(SCORES)}')


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
