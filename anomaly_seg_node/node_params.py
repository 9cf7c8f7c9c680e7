"""The anomaly_seg node's parameters, without ROS: what they are and how they are checked.

- ``PARAMS``: every parameter with its type, default, description, allowed values or range and
  when it may change (``startup``: read-only; ``configure``: only while unconfigured, read at the
  next configure; ``runtime``: any time). node.py declares them with these descriptors.
- ``check_value`` and ``validate_params`` check values into a ``NodeConfig`` and say what is
  wrong and how to fix it; ``NodeCore.update_parameters`` (node_logic) applies them.
- The settings read from the artifact: its path, the threshold setting as a number, the object
  parameters (drivable classes by name) and the source of the objects' confidence.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from anomaly_seg_node.artifact import Sidecar, resolve_threshold
from anomaly_seg_node.backends import BACKENDS, DEVICES, PRECISIONS
from anomaly_seg_node.errors import ArtifactError, ConfigError
from anomaly_seg_node.image_codec import MAX_PIXELS, MAX_SIDE
from anomaly_seg_node.imaging import DEFAULT_RESIZE_MODE, RESIZE_MODES
from anomaly_seg_node.node_health import WINDOW_S
from anomaly_seg_node.objects import ObjectParams, fpr_table_from_thresholds
from anomaly_seg_node.pipeline import RESOLUTIONS, check_crop

INPUT_TRANSPORTS = ('raw', 'compressed')
# auto: a GPU when the backend finds one, else the CPU (WARN); cuda: a GPU or ERROR.
NODE_DEVICES = ('auto', *DEVICES)
RELIABILITIES = ('best_effort', 'reliable')
# Topics, relative to the node's namespace so that namespaces and remaps work.
INPUT_TOPICS = {'raw': 'image', 'compressed': 'image/compressed'}
# objects_drivable_classes: [auto] = those of these classes the artifact has (StreetHazards and
# CARLA name the lane markings 'road line'); [none] = no restriction.
ROAD_LIKE_CLASSES = ('road', 'road line', 'lane marking')
DRIVABLE_AUTO, DRIVABLE_NONE = 'auto', 'none'
STARTUP, CONFIGURE, RUNTIME = 'startup', 'configure', 'runtime'
_MAX_AGE_S = 3600.0
_MAX_THREADS = 1024


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One node parameter: what ParameterDescriptor says about it, and how it is checked."""

    name: str
    default: Any
    description: str
    kind: str = CONFIGURE
    choices: tuple[str, ...] = ()
    value_range: tuple[float, float] | None = None
    dynamic_typing: bool = False

    @property
    def read_only(self) -> bool:
        return self.kind == STARTUP

    @property
    def integer(self) -> bool:
        """An integer parameter (ROS type INTEGER, range an IntegerRange)."""
        return isinstance(self.default, int) and not isinstance(self.default, bool)

    @property
    def constraints(self) -> str:
        """The descriptor's additional_constraints: allowed values and when a change applies."""
        parts = []
        if self.choices:
            parts.append('one of: ' + ', '.join(self.choices))
        if self.value_range is not None:
            low, high = self.value_range
            if self.integer:
                parts.append(f'from {int(low)} to {int(high)}')
            else:
                parts.append(f'from {low:g} to {high:g}')
        parts.append({STARTUP: 'read-only (set it at start)',
                      CONFIGURE: 'read at configure; change it while unconfigured',
                      RUNTIME: 'changeable at run time'}[self.kind])
        return '; '.join(parts)


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec('artifact', '', 'Path to the artifact sidecar NAME.json written by anomaly-seg '
              'export (NAME.onnx, and NAME.pt2 unless exported ONNX-only, lie beside it). Empty: '
              'models/demo.json of the package share, when installed.'),
    ParamSpec('backend', 'auto', 'Inference backend; auto picks tensorrt (cached engine), then '
              'torch on CUDA, then onnxruntime, and says which on /diagnostics.',
              choices=BACKENDS),
    ParamSpec('device', 'auto', 'auto: a GPU when the backend finds one, else the CPU with a '
              'WARN on /diagnostics; cuda: a GPU (running on the CPU anyway is an ERROR on '
              '/diagnostics); cpu.', choices=NODE_DEVICES),
    ParamSpec('precision', 'fp16', 'Inference precision (fp16 applies on CUDA only).',
              choices=PRECISIONS),
    ParamSpec('engine_cache_dir', '', 'Folder of TensorRT engines built by anomaly-seg '
              'build-engine; empty: $ANOMALY_SEG_ENGINE_CACHE or ~/.cache/anomaly_seg/engines.'),
    ParamSpec('allow_engine_build', False, 'Build and verify a missing TensorRT engine at '
              'configure when the backend is tensorrt (or auto with torch_tensorrt and a GPU); '
              'takes minutes. false: run anomaly-seg build-engine beforehand.'),
    ParamSpec('ort_threads', 0, 'Intra-op threads of the onnxruntime backend (0: the '
              'onnxruntime default, one per physical core). Fewer threads than cores leave the '
              'rest to the camera driver and other nodes; on a busy CPU 1 can beat 2. The torch '
              'and tensorrt backends ignore it.', kind=STARTUP, value_range=(0, _MAX_THREADS)),
    ParamSpec('overlap_stages', False, 'true: the worker runs as three threads (decode and '
              'pre-processing, inference, post-processing and publishing), so that the host '
              'work of the next and the last frame overlaps inference: more frames per second '
              'when inference is short (a GPU), up to three frames in flight, output order '
              'kept. false: one thread takes each frame from start to end, which leaves the '
              'CPU cores to inference on a CPU-only machine.', kind=STARTUP),
    ParamSpec('input_transport', 'raw', 'raw subscribes to image (sensor_msgs/Image), compressed '
              'to image/compressed (sensor_msgs/CompressedImage, jpeg or png).',
              choices=INPUT_TRANSPORTS),
    ParamSpec('input_reliability', 'best_effort', 'QoS reliability of the input subscription '
              '(keep last 1); best_effort matches reliable and best-effort cameras.',
              choices=RELIABILITIES),
    ParamSpec('max_input_pixels', MAX_PIXELS, 'The largest frame the node takes, in pixels '
              '(width x height): larger frames are dropped and counted as rejected_decode on '
              '/diagnostics; a compressed one before it is decompressed, from the size its '
              f'header declares. Default: 4K UHD plus 10 %. No 0 = off: {MAX_SIDE ** 2} '
              f'({MAX_SIDE} x {MAX_SIDE}) leaves only the limit of {MAX_SIDE} pixels per side.',
              value_range=(1, MAX_SIDE ** 2)),
    ParamSpec('max_input_age', 0.5, 'Seconds; frames whose header stamp is older are dropped '
              '(0 disables the check; frames with a zero stamp are never dropped).',
              value_range=(0.0, _MAX_AGE_S)),
    ParamSpec('input_timeout', 2.0, 'Seconds without an input frame after which /diagnostics '
              'reports WARN (0 disables the watchdog).', value_range=(0.0, _MAX_AGE_S)),
    ParamSpec('output_timeout', 10.0, 'Seconds of input arriving while nothing is published '
              '(every frame rejected, stale or failing) after which /diagnostics reports ERROR; '
              f'it reports WARN, naming the cause, after {WINDOW_S:g} s. 0: never ERROR.',
              value_range=(0.0, _MAX_AGE_S)),
    ParamSpec('camera_rate', 0.0, 'Nominal frame rate of the camera in Hz; /diagnostics counts '
              'the frames lost before the node from header stamp gaps against it. 0: the rate '
              'of the camera_info stamps, else of the shortest image stamp gaps.',
              value_range=(0.0, 1000.0)),
    ParamSpec('crop', [0, 0, 0, 0], 'Pixels cut from the top, bottom, left and right edges '
              'before inference (e.g. the bonnet); 4 non-negative integers.'),
    ParamSpec('resize_mode', DEFAULT_RESIZE_MODE, 'How the (cropped) frame is fitted to the '
              "artifact's input size when their aspect ratios differ by more than 5 %: "
              'letterbox keeps the aspect ratio and pads (every pixel is seen), crop_center '
              'cuts the edges (label void, score NaN there), stretch distorts. Logged once at '
              'the first frame of each size that differs.', choices=RESIZE_MODES),
    ParamSpec('output_resolution', 'input', 'input: outputs at the camera size, crop undone; '
              'network: at the artifact size, with a scaled network/camera_info.',
              choices=RESOLUTIONS),
    ParamSpec('anomaly_threshold', '', 'Anomaly mask threshold: a number (score units of '
              'the artifact) or a threshold name of the sidecar (e.g. tpr95, fpr1, fpr0.1); '
              'empty: the sidecar default.', kind=RUNTIME, dynamic_typing=True),
    ParamSpec('overlay_alpha', 0.5, 'Weight of the colour mask in the overlay.', kind=RUNTIME,
              value_range=(0.0, 1.0)),
    ParamSpec('objects_drivable_classes', [DRIVABLE_AUTO], 'Anomaly objects only on these classes '
              'of the artifact and objects_margin_px around them. [auto]: its road-like classes '
              f'({", ".join(ROAD_LIKE_CLASSES)}: those it has; none of them: no restriction); '
              '[none]: no restriction; else class names of the artifact (checked at configure '
              'and when set).', kind=RUNTIME),
    ParamSpec('objects_margin_px', 16, 'Pixels (of the output maps) the drivable area is grown '
              'by, to keep the parts of an object that stands on it.', kind=RUNTIME,
              value_range=(0, 4096)),
    ParamSpec('objects_merge_px', 4, 'Anomaly fragments at most this many pixels apart form one '
              'object (0: 8-connected components only).', kind=RUNTIME, value_range=(0, 4096)),
    ParamSpec('objects_min_area_px', 50, 'Smallest anomaly object, in pixels of the output maps.',
              kind=RUNTIME, value_range=(1, MAX_SIDE ** 2)),
    ParamSpec('objects_min_area_fraction', 0.0, 'Smallest anomaly object as a share of the '
              'output map (the larger of this and objects_min_area_px applies; 0: off).',
              kind=RUNTIME, value_range=(0.0, 0.5)),
    ParamSpec('objects_max', 32, 'Most anomaly objects per frame, the largest first.',
              kind=RUNTIME, value_range=(1, 1000)),
    ParamSpec('autostart', True, 'Configure and activate the lifecycle node on start; false: '
              'wait for ros2 lifecycle set.', kind=STARTUP),
)
SPECS: dict[str, ParamSpec] = {spec.name: spec for spec in PARAMS}


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """Checked parameter values (the names and meanings of ``PARAMS``)."""

    artifact: str = ''
    backend: str = 'auto'
    device: str = 'auto'
    precision: str = 'fp16'
    engine_cache_dir: str = ''
    allow_engine_build: bool = False
    ort_threads: int = 0
    overlap_stages: bool = False
    input_transport: str = 'raw'
    input_reliability: str = 'best_effort'
    max_input_pixels: int = MAX_PIXELS
    max_input_age: float = 0.5
    input_timeout: float = 2.0
    output_timeout: float = 10.0
    camera_rate: float = 0.0
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)
    resize_mode: str = DEFAULT_RESIZE_MODE
    output_resolution: str = 'input'
    anomaly_threshold: str | float = ''
    overlay_alpha: float = 0.5
    objects_drivable_classes: tuple[str, ...] = (DRIVABLE_AUTO,)
    objects_margin_px: int = 16
    objects_merge_px: int = 4
    objects_min_area_px: int = 50
    objects_min_area_fraction: float = 0.0
    objects_max: int = 32
    autostart: bool = True

    @property
    def input_topic(self) -> str:
        return INPUT_TOPICS[self.input_transport]


def check_value(name: str, value: Any) -> Any:
    """``value`` of parameter ``name`` in its checked form, or ConfigError saying the fix."""
    spec = SPECS[name]
    if isinstance(spec.default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f'parameter {name} must be true or false, got {value!r}')
        return value
    if name == 'crop':
        return check_crop(value, 'parameter crop')
    if name == 'anomaly_threshold':
        return _check_threshold(value)
    if name == 'objects_drivable_classes':
        return _check_class_names(value)
    if spec.integer:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f'parameter {name} must be an integer ({spec.constraints}), got '
                              f'{value!r}')
        low, high = spec.value_range or (-math.inf, math.inf)
        if not low <= value <= high:
            raise ConfigError(f'parameter {name} must be {spec.constraints}, got {int(value)}')
        return int(value)
    if isinstance(spec.default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'parameter {name} must be a number ({spec.constraints}), got '
                              f'{value!r}')
        number = float(value)
        low, high = spec.value_range or (-math.inf, math.inf)
        if not low <= number <= high:
            raise ConfigError(f'parameter {name} must be {spec.constraints}, got {number:g}')
        return number
    if not isinstance(value, str):
        raise ConfigError(f'parameter {name} must be a string, got {value!r}')
    if spec.choices and value not in spec.choices:
        raise ConfigError(f'parameter {name} must be one of {", ".join(spec.choices)}; got '
                          f'{value!r}')
    return value


def _check_threshold(value: Any) -> str | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError('parameter anomaly_threshold must be a number or a threshold name of '
                          f'the sidecar (e.g. tpr95), got {value!r}')
    if isinstance(value, str):
        return value.strip()
    if not math.isfinite(value):
        raise ConfigError(f'parameter anomaly_threshold must be finite, got {value!r}')
    return float(value)


def _check_class_names(value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(
            isinstance(name, str) for name in value):
        raise ConfigError('parameter objects_drivable_classes must be a list of class names of '
                          f'the artifact, [{DRIVABLE_AUTO}] or [{DRIVABLE_NONE}], got {value!r}')
    names = tuple(name.strip() for name in value)
    keywords = [name for name in names if name in (DRIVABLE_AUTO, DRIVABLE_NONE)]
    if keywords and len(names) > 1:
        raise ConfigError(f'parameter objects_drivable_classes: {keywords[0]} stands alone '
                          f'([{keywords[0]}]), got {list(names)}')
    return names


def validate_params(values: Mapping[str, Any]) -> NodeConfig:
    """A NodeConfig from parameter values (missing ones take their defaults; others ignored)."""
    checked = {spec.name: check_value(spec.name, values.get(spec.name, spec.default))
               for spec in PARAMS}
    return NodeConfig(**checked)


def resolve_artifact(value: str, share_dir: str | os.PathLike | None = None) -> Path:
    """The sidecar path of the ``artifact`` parameter; empty: the demo artifact of the share."""
    if value:
        return Path(value).expanduser()
    if share_dir is not None:
        demo = Path(share_dir) / 'models' / 'demo.json'
        if demo.is_file():
            return demo
    raise ArtifactError(
        'parameter artifact is empty and no demo artifact is installed; set artifact to a '
        'NAME.json written by anomaly-seg export (e.g. ros2 launch anomaly_seg camera.launch.py '
        'artifact:=/path/NAME.json)')


def resolve_threshold_setting(value: str | float, sidecar: Sidecar) -> float:
    """A threshold setting (number, name, numeric string, or '' for the default) as a number."""
    return resolve_threshold(sidecar, None if value == '' else value)


def drivable_class_ids(names: Sequence[str], classes: Sequence[str]) -> tuple[int, ...]:
    """The label ids of the ``objects_drivable_classes`` setting for an artifact's classes.

    [auto]: the ROAD_LIKE_CLASSES it has (none: no restriction); [none] or []: no restriction;
    else every name must be one of ``classes`` (ConfigError listing them otherwise).
    """
    names = tuple(names)
    classes = list(classes)
    if names == (DRIVABLE_AUTO,):
        return tuple(sorted(classes.index(name) for name in ROAD_LIKE_CLASSES if name in classes))
    if names in ((), (DRIVABLE_NONE,)):
        return ()
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise ConfigError(f'parameter objects_drivable_classes names {unknown}, which are not '
                          f'classes of the artifact; choose among {", ".join(classes)}, or '
                          f'[{DRIVABLE_AUTO}] or [{DRIVABLE_NONE}]')
    return tuple(sorted({classes.index(name) for name in names}))


def build_object_params(config: NodeConfig, sidecar: Sidecar, threshold: float) -> ObjectParams:
    """The ObjectParams of the objects_* parameters, at the node's current threshold."""
    return ObjectParams(
        threshold=threshold,
        drivable_ids=drivable_class_ids(config.objects_drivable_classes, sidecar.classes),
        drivable_margin=config.objects_margin_px, merge_distance=config.objects_merge_px,
        min_area_px=config.objects_min_area_px,
        min_area_fraction=config.objects_min_area_fraction, max_objects=config.objects_max)


def object_confidence_source(sidecar: Sidecar) -> tuple[dict[float, float] | None, str]:
    """The FPR table of the sidecar's fprN thresholds (None: the logistic) and a line saying
    which confidence the objects get."""
    names = sorted(name for name in sidecar.thresholds if name.startswith('fpr'))
    try:
        table = fpr_table_from_thresholds(sidecar.thresholds)
    except ArtifactError as error:
        return None, ('logistic of (max score - threshold), since the sidecar fpr thresholds '
                      f'are inconsistent ({error})')
    if table is None:
        return None, ('logistic of (max score - threshold): the sidecar has fewer than two fprN '
                      'thresholds')
    return table, f'1 - false-alarm rate of the max score (sidecar {", ".join(names)})'
