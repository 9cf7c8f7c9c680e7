"""What the anomaly_seg node does, without ROS: node.py is thin rclpy glue over this module.

- ``PARAMS``: every parameter with its type, default, description, allowed values or range and
  when it may change (``startup``: read-only; ``configure``: only while unconfigured, read at the
  next configure; ``runtime``: any time). ``validate_params`` and ``NodeCore.update_parameters``
  check values and say what is wrong and how to fix it.
- ``NewestFrameSlot`` keeps only the newest frame (a put replaces the pending one and counts it
  as dropped) and ``FrameWorker`` is the thread that takes frames from it, so latency never grows
  with a queue.
- ``NodeCore`` holds the transition duties (configure: validate, load the artifact, warm up;
  activate: start the worker; deactivate/cleanup: stop it and free the model), the publish
  decisions (lazy outputs by subscriber count, camera_info only at ``output_resolution:
  network``), the ``max_input_age`` and ``max_input_pixels`` checks, the anomaly objects
  (objects.py on the output maps, boxes in input pixels, drawn on the overlay), and the
  diagnostics (figures and conditions from node_health; status named after the fully qualified
  node, topics resolved).
- ``detection_array_message`` builds the vision_msgs/Detection2DArray of the anomaly objects
  from message classes passed in, so that it is tested without ROS.
- ``Transport`` is what the core needs from ROS: subscriber counts, publishing, the node clock
  and the logger. node.py implements it with rclpy; the tests implement it with lists.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import math
import os
from pathlib import Path
import sys
import threading
import time
from typing import Any, Protocol

import numpy as np

from anomaly_seg_node.artifact import Sidecar, read_sidecar, resolve_threshold
from anomaly_seg_node.backends import BACKENDS, DEVICES, PRECISIONS
from anomaly_seg_node.errors import (
    AnomalySegError,
    ArtifactError,
    BackendError,
    ConfigError,
    ImageDecodeError,
)
from anomaly_seg_node.image_codec import (
    MAX_PIXELS,
    MAX_SIDE,
    ImageFields,
    decode_compressed,
    decode_image,
    encode_image,
    stamp_ns,
)
from anomaly_seg_node.imaging import DEFAULT_RESIZE_MODE, RESIZE_MODES, Fit, plan_fit
from anomaly_seg_node.node_health import (
    ERROR,
    OK,
    WARN,
    WINDOW_S,
    Condition,
    FrameStats,
    LossEstimate,
    WindowSnapshot,
    loss_condition,
    loss_estimate,
    stall_condition,
)
from anomaly_seg_node.objects import (
    AnomalyObject,
    ObjectParams,
    draw_objects,
    find_objects,
    fpr_table_from_thresholds,
)
from anomaly_seg_node.pipeline import OUTPUTS, RESOLUTIONS, FramePipeline, scale_camera_info

INPUT_TRANSPORTS = ('raw', 'compressed')
# auto: a GPU when the backend finds one, else the CPU (WARN); cuda: a GPU or ERROR.
NODE_DEVICES = ('auto', *DEVICES)
RELIABILITIES = ('best_effort', 'reliable')
# Topics, relative to the node's namespace so that namespaces and remaps work.
INPUT_TOPICS = {'raw': 'image', 'compressed': 'image/compressed'}
CAMERA_INFO_INPUT = 'camera_info'
CAMERA_INFO_OUTPUT = 'network/camera_info'
LABEL_INFO_TOPIC = 'label_info'
OBJECTS_TOPIC = 'anomaly_objects'
OBJECT_CLASS_ID = 'anomaly'  # hypothesis.class_id of every anomaly object
# objects_drivable_classes: [auto] = those of these classes the artifact has (StreetHazards and
# CARLA name the lane markings 'road line'); [none] = no restriction.
ROAD_LIKE_CLASSES = ('road', 'road line', 'lane marking')
DRIVABLE_AUTO, DRIVABLE_NONE = 'auto', 'none'
ENCODINGS = {'semantic_mask': 'mono8', 'anomaly_score': '32FC1', 'anomaly_mask': 'mono8',
             'semantic_color': 'rgb8', 'overlay': 'rgb8'}
STARTUP, CONFIGURE, RUNTIME = 'startup', 'configure', 'runtime'
LOG_PERIOD_S = 5.0  # at most one warning of a kind per period
_MAX_AGE_S = 3600.0


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
        if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
            raise ConfigError(f'parameter crop must be 4 integers [top, bottom, left, right], '
                              f'got {value!r}')
        values = list(value)
        if len(values) != 4 or not all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
                for v in values):
            raise ConfigError(
                'parameter crop must be 4 non-negative integers [top, bottom, left, right] '
                f'(pixels cut from each edge), got {values!r}')
        return tuple(int(v) for v in values)
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


def check_raw_pixels(msg: Any, max_pixels: int) -> None:
    """ImageDecodeError when a sensor_msgs/Image declares more than ``max_pixels`` pixels
    (malformed sizes are left to decode_image, which names the field)."""
    height: Any = getattr(msg, 'height', None)
    width: Any = getattr(msg, 'width', None)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (height, width)):
        pixels = int(height) * int(width)
        if pixels > max_pixels:
            raise ImageDecodeError(
                f'Image is {int(height)} x {int(width)}, {pixels} pixels, above the budget of '
                f'{max_pixels} pixels (max_input_pixels); raise max_input_pixels for this '
                'camera, or check the publisher')


def network_box_to_input(box: tuple[int, int, int, int], fit: Fit,
                         crop_top_left: tuple[int, int] = (0, 0)) -> tuple[int, int, int, int]:
    """A box (x, y, width, height) on the network-size maps as a box of the input frame that
    covers the same region: the fit undone outward (whole pixels), then the crop offset added."""
    x, y, width, height = box
    net_top, net_left = fit.net_box[:2]
    src_top, src_left, src_h, src_w = fit.src_box
    scale_y, scale_x = fit.scale

    def span(start: int, size: int, net_start: int, scale: float, src_start: int,
             src_size: int) -> tuple[int, int]:
        # rounded first, so that 3.0000000000000004 does not grow a box by a pixel
        low = max(math.floor(round((start - net_start) / scale, 6)), 0)
        high = min(math.ceil(round((start + size - net_start) / scale, 6)), src_size)
        return src_start + low, max(high - low, 1)

    col, out_w = span(x, width, net_left, scale_x, src_left, src_w)
    row, out_h = span(y, height, net_top, scale_y, src_top, src_h)
    return col + crop_top_left[1], row + crop_top_left[0], out_w, out_h


def detection_array_message(payload: 'ObjectsOut', array_cls: type, detection_cls: type,
                            hypothesis_cls: type) -> Any:
    """The vision_msgs/Detection2DArray of ``payload``, from the message classes given
    (vision_msgs.msg Detection2DArray, Detection2D and ObjectHypothesisWithPose, or stand-ins).

    Header: the input image's, on the array and on every detection. One Detection2D per object,
    id its index; results: one hypothesis, class_id 'anomaly', score = the object's confidence;
    bbox: centre and size of the box in input pixels (pixel (0, 0) covers [0, 1) x [0, 1), so a
    box of columns x .. x + width - 1 is centred at x + width / 2), theta 0.
    """
    msg = array_cls()
    if payload.header is not None:
        msg.header = payload.header
    detections = []
    for index, (obj, (x, y, width, height)) in enumerate(
            zip(payload.objects, payload.boxes, strict=True)):
        detection = detection_cls()
        if payload.header is not None:
            detection.header = payload.header
        detection.id = str(index)
        hypothesis = hypothesis_cls()
        hypothesis.hypothesis.class_id = OBJECT_CLASS_ID
        hypothesis.hypothesis.score = float(obj.confidence)
        detection.results = [hypothesis]
        # rosidl's float64 setters refuse ints: every value is a float
        detection.bbox.center.position.x = float(x + width / 2)
        detection.bbox.center.position.y = float(y + height / 2)
        detection.bbox.center.theta = 0.0
        detection.bbox.size_x = float(width)
        detection.bbox.size_y = float(height)
        detections.append(detection)
    msg.detections = detections
    return msg


def expand_topic(node_name: str, topic: str) -> str:
    """``topic`` in the namespace of the fully qualified ``node_name`` (no remapping applied)."""
    if topic.startswith('/'):
        return topic
    return f'{node_name.rsplit("/", 1)[0]}/{topic}'


def wanted_outputs(counts: Mapping[str, int]) -> set[str]:
    """The image outputs worth computing: those with at least one subscriber."""
    return {name for name in OUTPUTS if counts.get(name, 0) > 0}


def wants_objects(objects_subscribed: bool, want: set[str]) -> bool:
    """Anomaly objects are found for anomaly_objects subscribers and for the overlay, which
    draws their boxes."""
    return objects_subscribed or 'overlay' in want


def wants_camera_info(output_resolution: str, subscribers: int) -> bool:
    """network/camera_info goes out only for network-size outputs, and only when listened to."""
    return output_resolution == 'network' and subscribers > 0


class Throttle:
    """At most one message per key and period; counts what it held back."""

    def __init__(self, period_s: float = LOG_PERIOD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = period_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> tuple[bool, int]:
        """(log now?, how many were held back since the last one logged)."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period_s:
                self._held[key] = self._held.get(key, 0) + 1
                return False, 0
            self._last[key] = now
            return True, self._held.pop(key, 0)


@dataclasses.dataclass
class Frame:
    """An input message as it arrived: when (monotonic ns) and whether it is compressed."""

    msg: Any
    compressed: bool
    arrival_ns: int


class NewestFrameSlot:
    """A one-frame mailbox: a put replaces the pending frame (counted as dropped)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._closed = False
        self.received = 0
        self.dropped = 0

    def put(self, item: Any) -> bool:
        """Store ``item``; True when it replaced a frame nobody had taken (a drop)."""
        with self._cond:
            replaced = self._item is not None
            self.dropped += replaced
            self.received += 1
            self._item = item
            self._cond.notify()
        return replaced

    def take(self, timeout: float | None = None) -> Any:
        """The pending frame, waiting up to ``timeout`` s; None on timeout or once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        """Wake every taker; the pending frame is discarded."""
        with self._cond:
            self._closed = True
            self._item = None
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False
            self._item = None

    @property
    def closed(self) -> bool:
        return self._closed


class FrameWorker:
    """The thread that takes frames from the slot and handles them until stopped.

    An exception from ``handle`` goes to ``on_error`` and the loop goes on: bad input or a
    failing frame never kills the worker.
    """

    def __init__(self, slot: NewestFrameSlot, handle: Callable[[Any], None],
                 on_error: Callable[[BaseException], None],
                 name: str = 'anomaly_seg_worker') -> None:
        self.slot = slot
        self.handle = handle
        self.on_error = on_error
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.slot.reopen()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Close the slot and join; False when the thread is still busy after ``timeout``."""
        self.slot.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self.slot.closed:
            item = self.slot.take(timeout=0.5)
            if item is None:
                continue
            try:
                self.handle(item)
            except Exception as error:  # logged and counted by on_error
                self.on_error(error)


@dataclasses.dataclass(frozen=True)
class CameraInfoOut:
    """network/camera_info: the input CameraInfo with K and P scaled to the artifact size."""

    header: Any
    height: int
    width: int
    k: np.ndarray  # float64 [9]
    p: np.ndarray  # float64 [12]
    source: Any  # the input CameraInfo (distortion model, D and R are copied from it)


@dataclasses.dataclass(frozen=True)
class LabelInfoOut:
    """vision_msgs/LabelInfo: class ids and names, and the current anomaly threshold."""

    class_map: tuple[tuple[int, str], ...]
    threshold: float


@dataclasses.dataclass(frozen=True)
class ObjectsOut:
    """anomaly_objects (vision_msgs/Detection2DArray): one frame's anomaly objects."""

    header: Any  # the input image's
    objects: tuple[AnomalyObject, ...]  # as found on the output maps (largest first)
    boxes: tuple[tuple[int, int, int, int], ...]  # (x, y, width, height) of each, input pixels


@dataclasses.dataclass(frozen=True)
class DiagnosticReport:
    """One diagnostic_msgs/DiagnosticStatus."""

    level: int
    name: str
    message: str
    hardware_id: str
    values: tuple[tuple[str, str], ...]


class Transport(Protocol):
    """What NodeCore needs from ROS (node.py) or from a test."""

    def subscription_count(self, topic: str) -> int: ...

    def publish(self, topic: str,
                payload: ImageFields | CameraInfoOut | LabelInfoOut | ObjectsOut) -> None:
        ...

    def now_ns(self) -> int: ...

    def log(self, level: str, message: str) -> None: ...


class Loader(Protocol):
    def __call__(self, sidecar: Sidecar, backend: str, device: str, precision: str,
                 engine_cache_dir: str | None) -> Any: ...


def _load_backend(sidecar: Sidecar, backend: str, device: str, precision: str,
                  engine_cache_dir: str | None) -> Any:
    from anomaly_seg_node.backends import load

    return load(sidecar, backend=backend, device=device, precision=precision,
                engine_cache_dir=engine_cache_dir)


class NodeCore:
    """The node without ROS: transitions, newest-frame worker, publish decisions, diagnostics.

    States follow the ROS 2 lifecycle: unconfigured -> (configure) inactive -> (activate) active
    -> (deactivate) inactive -> (cleanup) unconfigured; shutdown -> finalized from any of them.
    """

    def __init__(self, transport: Transport, name: str = '/anomaly_seg',
                 loader: Loader = _load_backend, share_dir: str | os.PathLike | None = None,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns,
                 throttle: Throttle | None = None,
                 resolve_topic: Callable[[str], str] | None = None) -> None:
        """``name``: the fully qualified node name (it names the /diagnostics status);
        ``resolve_topic``: a relative topic as the node sees it after remapping (default: in the
        namespace of ``name``)."""
        self.transport = transport
        self.name = name
        self.resolve_topic = resolve_topic or functools.partial(expand_topic, name)
        self.loader = loader
        self.share_dir = share_dir
        self.monotonic_ns = monotonic_ns
        self.throttle = throttle or Throttle()
        self.state = 'unconfigured'
        self.config = NodeConfig()
        self.sidecar: Sidecar | None = None
        self.segmenter: Any = None
        self.pipeline: FramePipeline | None = None
        self.threshold = math.nan
        self.object_params: ObjectParams | None = None  # replaced whole, never changed in place
        self.fpr_table: dict[float, float] | None = None  # None: logistic object confidence
        self.confidence_source = ''
        self.last_error = ''
        self.device_note = ''  # why device auto ended on the CPU
        self.slot = NewestFrameSlot()
        self.stats = FrameStats()
        self.worker: FrameWorker | None = None
        self.camera_info: Any = None
        self.activated_ns: int | None = None
        self._lock = threading.Lock()  # parameter updates vs. readers of config

    # Transitions -------------------------------------------------------------------------

    def configure(self, values: Mapping[str, Any]) -> None:
        """Validate the parameters, load the artifact into its backend, warm it up.

        Raises a domain error (the node returns FAILURE and stays unconfigured); nothing stays
        loaded after a failure.
        """
        self._expect('configure', 'unconfigured')
        try:
            config = validate_params(values)
            path = resolve_artifact(config.artifact, self.share_dir)
            sidecar = read_sidecar(path)
            threshold = resolve_threshold_setting(config.anomaly_threshold, sidecar)
            object_params = build_object_params(config, sidecar, threshold)
            fpr_table, confidence_source = object_confidence_source(sidecar)
            if config.allow_engine_build:
                from anomaly_seg_node.build_engine import engine_wanted, ensure_engine

                gpu = 'cuda' if config.device == 'auto' else config.device
                if engine_wanted(config.backend, gpu, sidecar):
                    # Blocks configure for minutes when the engine is missing; that is the
                    # trade asked for by allow_engine_build.
                    ensure_engine(sidecar, config.precision, config.engine_cache_dir or None,
                                  allow_build=True, log=self.transport.log)
            self.segmenter = self._load(sidecar, config)
            self.pipeline = FramePipeline(
                self.segmenter, sidecar.classes, sidecar.palette, void_id=sidecar.void_id,
                crop=config.crop, output_resolution=config.output_resolution,
                threshold=threshold, overlay_alpha=config.overlay_alpha,
                resize_mode=config.resize_mode, pad_rgb=sidecar.pad_rgb,
                on_warning=self._on_pipeline_warning)
            warm_ms = self._warm_up(self.pipeline, config.crop)
        except Exception as error:
            self._free()
            self.last_error = f'configure failed: {error}'
            raise
        with self._lock:
            self.config, self.sidecar, self.threshold = config, sidecar, threshold
            self.object_params, self.fpr_table = object_params, fpr_table
            self.confidence_source = confidence_source
        self.camera_info = None
        self.last_error = ''
        self.state = 'inactive'
        self.transport.log('info', f'configured {path.name}: {self.describe_backend()}; '
                           f'threshold {threshold:g} ({config.anomaly_threshold or "default"}); '
                           f'warm-up {warm_ms:.1f} ms')
        if self.cpu_fallback():
            self.transport.log('error', 'device cuda was asked for but inference runs on the '
                               f'CPU ({getattr(self.segmenter, "reason", "")}); expect a low '
                               'frame rate; check the CUDA install or set device auto or cpu')
        elif self.auto_on_cpu():
            self.transport.log('warning', 'no GPU: inference runs on the CPU '
                               f'({self.device_note}); expect a low frame rate')
        self.transport.log('info', f'anomaly objects: {self.describe_objects()}; confidence '
                           f'{confidence_source}')

    def _load(self, sidecar: Sidecar, config: NodeConfig) -> Any:
        """The backend on the device asked for; device auto tries cuda, then the CPU (fp32)."""
        cache = config.engine_cache_dir or None
        self.device_note = ''
        if config.device != 'auto':
            return self.loader(sidecar, config.backend, config.device, config.precision, cache)
        try:
            # backend auto falls back to the CPU by itself and says why in its reason.
            segmenter = self.loader(sidecar, config.backend, 'cuda', config.precision, cache)
        except BackendError as gpu_error:
            if config.backend == 'tensorrt':  # runs on a GPU only
                raise
            try:
                segmenter = self.loader(sidecar, config.backend, 'cpu', 'fp32', cache)
            except BackendError as cpu_error:
                raise BackendError(f'{cpu_error} (device auto tried cuda first: {gpu_error})'
                                   ) from None
            self.device_note = f'device auto, {config.backend} has no GPU here: {gpu_error}'
            return segmenter
        if getattr(segmenter, 'device', 'cpu') != 'cuda':
            self.device_note = str(getattr(segmenter, 'reason', ''))
        return segmenter

    def activate(self) -> None:
        """Start the worker thread; the caller subscribes afterwards."""
        self._expect('activate', 'inactive')
        self.slot = NewestFrameSlot()
        self.stats = FrameStats()
        self.worker = FrameWorker(self.slot, self.process, self._on_worker_error)
        self.worker.start()
        self.activated_ns = self.monotonic_ns()
        self.state = 'active'

    def deactivate(self) -> None:
        """Stop the worker (the caller has destroyed the subscription first)."""
        self._expect('deactivate', 'active')
        self._stop_worker()
        self.state = 'inactive'

    def cleanup(self) -> None:
        """Free the model; back to unconfigured."""
        self._expect('cleanup', 'inactive')
        self._free()
        self.state = 'unconfigured'

    def shutdown(self) -> None:
        """From any state: stop the worker, free the model, finalize. Safe to call twice."""
        self._stop_worker()
        self._free()
        self.state = 'finalized'

    def reset(self) -> None:
        """After an error in a transition: stop and free everything, back to unconfigured."""
        self._stop_worker()
        self._free()
        self.state = 'unconfigured'

    def _expect(self, transition: str, state: str) -> None:
        if self.state != state:
            raise ConfigError(f'cannot {transition} from state {self.state}; {transition} '
                              f'needs state {state}')

    def _stop_worker(self) -> None:
        if self.worker is not None:
            if not self.worker.stop():
                self.transport.log('warning', 'the worker is still busy with a frame after '
                                   '10 s; it will exit after that frame')
            self.worker = None
        self.activated_ns = None

    def _free(self) -> None:
        self.pipeline = None
        self.segmenter = None
        self.sidecar = None
        self.threshold = math.nan
        self.object_params = self.fpr_table = None
        # Free cached GPU memory when a torch backend ran; never import torch here.
        torch = sys.modules.get('torch')
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    @staticmethod
    def _warm_up(pipeline: FramePipeline, crop: Sequence[int]) -> float:
        """One black frame through every output, so the first camera frame is not slow."""
        height, width = pipeline.input_size
        frame = np.zeros((height + crop[0] + crop[1], width + crop[2] + crop[3], 3), np.uint8)
        start = time.perf_counter()
        pipeline.process(frame, OUTPUTS)
        return (time.perf_counter() - start) * 1e3

    # Parameters --------------------------------------------------------------------------

    def update_parameters(self, changes: Mapping[str, Any]) -> str | None:
        """Check a set of parameter changes; apply them all and return None, or none and the
        reason (what ``ros2 param set`` prints)."""
        checked: dict[str, Any] = {}
        threshold = None
        for name, value in changes.items():
            spec = SPECS.get(name)
            if spec is None:
                continue  # not ours (use_sim_time, qos overrides): leave it to rclpy
            if spec.kind == STARTUP:
                return f'{name} is read-only: set it at start (launch or params file)'
            if spec.kind == CONFIGURE and self.state != 'unconfigured':
                return (f'{name} is read at configure and the node is {self.state}; deactivate '
                        'and clean it up (ros2 lifecycle set <node> deactivate, then cleanup), '
                        'set it, then configure again')
            try:
                checked[name] = check_value(name, value)
                if name == 'anomaly_threshold' and self.sidecar is not None:
                    threshold = resolve_threshold_setting(checked[name], self.sidecar)
            except AnomalySegError as error:
                return str(error)
        config = dataclasses.replace(self.config, **checked)
        object_params = None
        objects_changed = any(name.startswith('objects_') for name in checked)
        if self.sidecar is not None and (threshold is not None or objects_changed):
            try:
                object_params = build_object_params(
                    config, self.sidecar, self.threshold if threshold is None else threshold)
            except AnomalySegError as error:
                return str(error)
        with self._lock:
            self.config = config
            if object_params is not None:
                self.object_params = object_params
            if self.pipeline is not None:
                if threshold is not None:
                    self.pipeline.threshold = threshold
                    self.threshold = threshold
                if 'overlay_alpha' in checked:
                    self.pipeline.overlay_alpha = checked['overlay_alpha']
        if threshold is not None:
            self.transport.log('info', f'anomaly threshold now {threshold:g} '
                               f'({checked["anomaly_threshold"] or "default"})')
            info = self.label_info()
            if self.state == 'active' and info is not None:
                self.transport.publish(LABEL_INFO_TOPIC, info)
        if objects_changed and object_params is not None:
            self.transport.log('info', f'anomaly objects: {self.describe_objects()}')
        return None

    # Frames ------------------------------------------------------------------------------

    def on_message(self, msg: Any, compressed: bool = False) -> None:
        """The subscription callback: keep the newest frame for the worker, nothing else."""
        if self.state != 'active':
            return
        now = self.monotonic_ns()
        self.stats.arrived(now, stamp_ns(getattr(msg, 'header', None)))
        self.slot.put(Frame(msg, compressed, now))

    def on_camera_info(self, msg: Any) -> None:
        """The camera_info callback: kept for network/camera_info, stamps for the loss estimate."""
        self.camera_info = msg
        if self.state == 'active':
            self.stats.camera_info(self.monotonic_ns(), stamp_ns(getattr(msg, 'header', None)))

    def process(self, frame: Frame) -> None:
        """Run one frame through the pipeline and publish what is subscribed (worker thread)."""
        pipeline, config = self.pipeline, self.config
        if pipeline is None:
            return
        header = getattr(frame.msg, 'header', None)
        stamp = stamp_ns(header)
        if config.max_input_age > 0 and stamp > 0:
            age_s = (self.transport.now_ns() - stamp) / 1e9
            if age_s > config.max_input_age:
                self.stats.count('rejected_stale', self.monotonic_ns(), f'{age_s:.1f} s')
                self.warn('stale', f'dropped a frame {age_s:.3f} s old (max_input_age '
                          f'{config.max_input_age:g} s); check the camera and node clocks '
                          '(use_sim_time when replaying a bag) or raise max_input_age')
                return
        counts = {name: self.transport.subscription_count(name) for name in OUTPUTS}
        want = wanted_outputs(counts)
        objects_subscribed = self.transport.subscription_count(OBJECTS_TOPIC) > 0
        params = self.object_params
        objects_wanted = params is not None and wants_objects(objects_subscribed, want)
        info_wanted = wants_camera_info(config.output_resolution,
                                        self.transport.subscription_count(CAMERA_INFO_OUTPUT))
        if not want and not objects_wanted and not info_wanted:
            self.stats.count('skipped_unsubscribed', self.monotonic_ns())
            return
        try:
            if frame.compressed:
                rgb = decode_compressed(frame.msg, max_pixels=config.max_input_pixels)
            else:
                check_raw_pixels(frame.msg, config.max_input_pixels)
                rgb = decode_image(frame.msg)
        except ImageDecodeError as error:
            self.stats.count('rejected_decode', self.monotonic_ns(), str(error))
            self.warn('decode', f'dropped a frame that cannot be decoded: {error}')
            return
        compute = set(want)
        if objects_wanted and params is not None:
            compute.add('anomaly_score')
            if params.drivable_ids:
                compute.add('semantic_mask')
        result = pipeline.process(rgb, compute) if compute else None
        found = None
        if objects_wanted and params is not None and result is not None:
            found = self._objects(result, params, pipeline, rgb.shape[:2], header)
        for name in OUTPUTS:
            array = getattr(result, name, None)
            if array is not None and name in want:
                self.transport.publish(name, encode_image(array, ENCODINGS[name], header))
        if found is not None and objects_subscribed:
            self.transport.publish(OBJECTS_TOPIC, found)
        if info_wanted:
            info = self._network_camera_info(header, rgb.shape[:2], pipeline, config)
            if info is not None:
                self.transport.publish(CAMERA_INFO_OUTPUT, info)
        done, now = self.monotonic_ns(), self.transport.now_ns()
        # No latency without a stamp, or before /clock ticks under use_sim_time (now is 0).
        latency = (now - stamp) / 1e6 if stamp > 0 and now > 0 else None
        infer = result.timings_ms.get('infer') if result is not None else None
        self.stats.done(done, (done - frame.arrival_ns) / 1e6, latency, infer,
                        None if found is None else len(found.objects))

    def _objects(self, result: Any, params: ObjectParams, pipeline: FramePipeline,
                 frame_hw: tuple[int, int], header: Any) -> ObjectsOut:
        """The frame's anomaly objects on the output maps, drawn on the overlay, with their
        boxes in input pixels."""
        if params.threshold != result.threshold:  # a threshold change between the two reads
            params = dataclasses.replace(params, threshold=result.threshold)
        objects = find_objects(result.anomaly_score, result.semantic_mask, params,
                               self.fpr_table)
        if result.overlay is not None and objects:
            draw_objects(result.overlay, objects)
        if pipeline.output_resolution == 'input':
            boxes = tuple(obj.box for obj in objects)
        else:
            top, bottom, left, right = pipeline.crop
            fit = plan_fit((frame_hw[0] - top - bottom, frame_hw[1] - left - right),
                           pipeline.input_size, pipeline.resize_mode)
            boxes = tuple(network_box_to_input(obj.box, fit, (top, left)) for obj in objects)
        return ObjectsOut(header=header, objects=tuple(objects), boxes=boxes)

    def _network_camera_info(self, header: Any, size: tuple[int, int],
                             pipeline: FramePipeline, config: NodeConfig) -> CameraInfoOut | None:
        info = self.camera_info
        if info is None:
            self.warn('no_camera_info', f'network/camera_info is subscribed but no CameraInfo '
                      f"arrived on {CAMERA_INFO_INPUT}; remap camera_info to the camera's")
            return None
        if (int(info.height), int(info.width)) != tuple(size):
            self.warn('camera_info_size', f'CameraInfo is {info.width}x{info.height} but the '
                      f'image is {size[1]}x{size[0]}; not publishing network/camera_info '
                      '(remap camera_info to the one of this image)')
            return None
        k, p = scale_camera_info(info.k, info.p, size[1], size[0], config.crop,
                                 pipeline.input_size, pipeline.resize_mode)
        height, width = pipeline.input_size
        return CameraInfoOut(header=header, height=height, width=width, k=k, p=p, source=info)

    def _on_pipeline_warning(self, message: str) -> None:
        # The pipeline calls this once per frame size, so it is not throttled.
        self.transport.log('warning', message)

    def _on_worker_error(self, error: BaseException) -> None:
        self.stats.count('failed', self.monotonic_ns(), f'{type(error).__name__}: {error}')
        self.warn('failed', f'a frame failed ({type(error).__name__}: {error}); the node goes '
                  'on with the next frame')

    def warn(self, key: str, message: str) -> None:
        """A throttled warning: at most one per key and LOG_PERIOD_S."""
        allowed, held = self.throttle.allow(key)
        if allowed:
            suffix = f' ({held} more like this since the last report)' if held else ''
            self.transport.log('warning', message + suffix)

    # Outputs beside the images -----------------------------------------------------------

    def label_info(self) -> LabelInfoOut | None:
        """Class ids and names (void id named 'void') and the current threshold."""
        sidecar = self.sidecar
        if sidecar is None:
            return None
        class_map = tuple(enumerate(sidecar.classes)) + ((sidecar.void_id, 'void'),)
        return LabelInfoOut(class_map=class_map, threshold=self.threshold)

    def describe_objects(self) -> str:
        """The object settings in words (drivable classes by name)."""
        params, sidecar = self.object_params, self.sidecar
        if params is None or sidecar is None:
            return 'not configured'
        if params.drivable_ids:
            names = ', '.join(sidecar.classes[i] for i in params.drivable_ids)
            where = f'on {names} (margin {params.drivable_margin} px)'
        else:
            where = 'anywhere (no drivable restriction)'
        return (f'{where}, fragments within {params.merge_distance} px merged, at least '
                f'{params.min_area_px} px and {params.min_area_fraction:g} of the map, at most '
                f'{params.max_objects}')

    def cpu_fallback(self) -> bool:
        """True when device cuda was asked for but the backend runs on the CPU."""
        return (self.segmenter is not None and self.config.device == 'cuda'
                and getattr(self.segmenter, 'device', 'cpu') != 'cuda')

    def auto_on_cpu(self) -> bool:
        """True when device auto found no GPU and the backend runs on the CPU."""
        return (self.segmenter is not None and self.config.device == 'auto'
                and getattr(self.segmenter, 'device', 'cpu') != 'cuda')

    def describe_backend(self) -> str:
        seg = self.segmenter
        if seg is None:
            return 'no model loaded'
        return (f'{getattr(seg, "backend", "?")} on {getattr(seg, "device", "?")} '
                f'{getattr(seg, "precision", "?")} ({getattr(seg, "reason", "")})')

    def diagnostics(self) -> DiagnosticReport:
        """The node's /diagnostics status now: every active condition, worst first."""
        now = self.monotonic_ns()
        config, seg, sidecar = self.config, self.segmenter, self.sidecar
        snapshot = self.stats.snapshot(now)
        input_topic = self.resolve_topic(config.input_topic)
        values: list[tuple[str, str]] = [('state', self.state)]
        if seg is not None and sidecar is not None:
            kind = 'onnx' if getattr(seg, 'backend', '') == 'onnxruntime' else 'pt2'
            ref = sidecar.files.get(kind)
            values += [('backend', str(getattr(seg, 'backend', '?'))),
                       ('device', str(getattr(seg, 'device', '?'))),
                       ('device_asked', config.device),
                       ('precision', str(getattr(seg, 'precision', '?'))),
                       ('backend_reason', str(getattr(seg, 'reason', ''))),
                       ('artifact', str(sidecar.source)),
                       ('artifact_sha256', ref.sha256 if ref is not None else ''),
                       ('anomaly_threshold', f'{self.threshold:g}')]
        values += [('input_topic', input_topic),
                   ('camera_info_topic', self.resolve_topic(CAMERA_INFO_INPUT)),
                   ('frames_received', str(self.slot.received)),
                   ('frames_dropped', str(self.slot.dropped))]
        values += [(f'frames_{key}', str(number)) for key, number in self.stats.counts.items()]
        # Everything below is over the last window_s seconds, so it ages out.
        values += [('window_s', f'{snapshot.window_s:g}'),
                   ('input_rate_hz', f'{snapshot.input_rate_hz:.3f}'),
                   ('output_rate_hz', f'{snapshot.output_rate_hz:.3f}')]
        values += [(key, f'{number:.3f}') for key, number in snapshot.timings.items()]
        values += [(key, f'{number:.3f}') for key, number in snapshot.objects.items()]
        if self.object_params is not None:
            values.append(('objects_confidence',
                           'fpr table' if self.fpr_table is not None else 'logistic'))
        loss = loss_estimate(snapshot, config.camera_rate) if self.state == 'active' else None
        if loss is not None:
            values += [('frames_lost_estimate', str(loss.lost)),
                       ('frame_loss_ratio', f'{loss.ratio:.3f}'),
                       ('camera_rate_hz', f'{loss.rate_hz:.2f}'),
                       ('camera_rate_source', loss.source)]

        conditions = sorted(self.conditions(now, snapshot, loss, input_topic),
                            key=lambda condition: -condition.level)
        if conditions:
            level = conditions[0].level
            message = '; '.join(condition.text for condition in conditions)
        else:
            level, message = OK, self.state
            if self.state == 'active':
                message = (f'active: {snapshot.output_rate_hz:.1f} Hz out of '
                           f'{snapshot.input_rate_hz:.1f} Hz in')
                if 'processing_ms_mean' in snapshot.timings:
                    message += (f', {snapshot.timings["processing_ms_mean"]:.1f} ms per '
                                'frame')
        return DiagnosticReport(level=level, name=f'{self.name}: anomaly segmentation',
                                message=message, hardware_id=input_topic, values=tuple(values))

    def conditions(self, now: int, snapshot: WindowSnapshot, loss: LossEstimate | None,
                   input_topic: str) -> list[Condition]:
        """Every reason for WARN or ERROR that holds now (a worse one never hides another)."""
        config, seg = self.config, self.segmenter
        found: list[Condition] = []
        if self.last_error:
            found.append(Condition(ERROR, self.last_error))
        if self.worker is not None and not self.worker.alive:
            found.append(Condition(ERROR, 'the worker thread stopped; restart the node'))
        if self.cpu_fallback():
            found.append(Condition(ERROR, 'running on the CPU although device cuda was asked '
                                   f'for: {getattr(seg, "reason", "")}; fix the CUDA install '
                                   'or set device auto'))
        elif self.auto_on_cpu():
            found.append(Condition(WARN, f'no GPU: running on the CPU ({self.device_note}); '
                                   'expect a low frame rate'))
        if self.state != 'active':
            return found
        silence = self._input_silence_s(now, config)
        if silence is not None:
            found.append(Condition(WARN, f'no input on {input_topic} for {silence:.1f} s; '
                                   'check the remap and QoS (input_reliability)'))
        for condition in (stall_condition(snapshot, now, input_topic, config.max_input_age,
                                          config.output_timeout),
                          loss_condition(loss, config.input_reliability)):
            if condition is not None:
                found.append(condition)
        return found

    def _input_silence_s(self, now: int, config: NodeConfig) -> float | None:
        """Seconds without input when the watchdog should fire, else None."""
        if self.state != 'active' or config.input_timeout <= 0 or self.activated_ns is None:
            return None
        last = self.stats.last_arrival_ns or self.activated_ns
        silence = (now - last) / 1e9
        return silence if silence > config.input_timeout else None
