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
  network``), the ``max_input_age`` check, and the diagnostics.
- ``Transport`` is what the core needs from ROS: subscriber counts, publishing, the node clock
  and the logger. node.py implements it with rclpy; the tests implement it with lists.
"""

from collections import deque
from collections.abc import Callable, Mapping, Sequence
import dataclasses
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
    ConfigError,
    ImageDecodeError,
)
from anomaly_seg_node.image_codec import ImageFields, decode_compressed, decode_image, encode_image
from anomaly_seg_node.imaging import DEFAULT_RESIZE_MODE, RESIZE_MODES
from anomaly_seg_node.pipeline import OUTPUTS, RESOLUTIONS, FramePipeline, scale_camera_info

INPUT_TRANSPORTS = ('raw', 'compressed')
RELIABILITIES = ('best_effort', 'reliable')
# Topics, relative to the node's namespace so that namespaces and remaps work.
INPUT_TOPICS = {'raw': 'image', 'compressed': 'image/compressed'}
CAMERA_INFO_INPUT = 'camera_info'
CAMERA_INFO_OUTPUT = 'network/camera_info'
LABEL_INFO_TOPIC = 'label_info'
ENCODINGS = {'semantic_mask': 'mono8', 'anomaly_score': '32FC1', 'anomaly_mask': 'mono8',
             'semantic_color': 'rgb8', 'overlay': 'rgb8'}
STARTUP, CONFIGURE, RUNTIME = 'startup', 'configure', 'runtime'
OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels
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
    def constraints(self) -> str:
        """The descriptor's additional_constraints: allowed values and when a change applies."""
        parts = []
        if self.choices:
            parts.append('one of: ' + ', '.join(self.choices))
        if self.value_range is not None:
            parts.append(f'from {self.value_range[0]:g} to {self.value_range[1]:g}')
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
    ParamSpec('device', 'cuda', 'Device asked for; running on the CPU although cuda was asked '
              'is reported as ERROR on /diagnostics.', choices=DEVICES),
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
    ParamSpec('max_input_age', 0.5, 'Seconds; frames whose header stamp is older are dropped '
              '(0 disables the check; frames with a zero stamp are never dropped).',
              value_range=(0.0, _MAX_AGE_S)),
    ParamSpec('input_timeout', 2.0, 'Seconds without an input frame after which /diagnostics '
              'reports WARN (0 disables the watchdog).', value_range=(0.0, _MAX_AGE_S)),
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
    ParamSpec('autostart', True, 'Configure and activate the lifecycle node on start; false: '
              'wait for ros2 lifecycle set.', kind=STARTUP),
)
SPECS: dict[str, ParamSpec] = {spec.name: spec for spec in PARAMS}


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """Checked parameter values (the names and meanings of ``PARAMS``)."""

    artifact: str = ''
    backend: str = 'auto'
    device: str = 'cuda'
    precision: str = 'fp16'
    engine_cache_dir: str = ''
    allow_engine_build: bool = False
    input_transport: str = 'raw'
    input_reliability: str = 'best_effort'
    max_input_age: float = 0.5
    input_timeout: float = 2.0
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)
    resize_mode: str = DEFAULT_RESIZE_MODE
    output_resolution: str = 'input'
    anomaly_threshold: str | float = ''
    overlay_alpha: float = 0.5
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


def wanted_outputs(counts: Mapping[str, int]) -> set[str]:
    """The image outputs worth computing: those with at least one subscriber."""
    return {name for name in OUTPUTS if counts.get(name, 0) > 0}


def wants_camera_info(output_resolution: str, subscribers: int) -> bool:
    """network/camera_info goes out only for network-size outputs, and only when listened to."""
    return output_resolution == 'network' and subscribers > 0


def stamp_ns(header: Any) -> int:
    """A std_msgs/Header stamp in nanoseconds (0 when it has none)."""
    stamp = getattr(header, 'stamp', None)
    if stamp is None:
        return 0
    return int(getattr(stamp, 'sec', 0)) * 1_000_000_000 + int(getattr(stamp, 'nanosec', 0))


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

    def publish(self, topic: str, payload: ImageFields | CameraInfoOut | LabelInfoOut) -> None:
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


class FrameStats:
    """Counters and recent timings of the running node (thread-safe)."""

    def __init__(self, window: int = 300) -> None:
        self._lock = threading.Lock()
        self.counts = {'processed': 0, 'rejected_decode': 0, 'rejected_stale': 0,
                       'failed': 0, 'skipped_unsubscribed': 0}
        self._done_ns: deque[int] = deque(maxlen=window)  # monotonic completion times
        self._arrivals_ns: deque[int] = deque(maxlen=window)
        self._processing_ms: deque[float] = deque(maxlen=window)  # arrival -> published
        self._latency_ms: deque[float] = deque(maxlen=window)  # header stamp -> published
        self._infer_ms: deque[float] = deque(maxlen=window)
        self.last_arrival_ns: int | None = None

    def arrived(self, now_ns: int) -> None:
        with self._lock:
            self._arrivals_ns.append(now_ns)
            self.last_arrival_ns = now_ns

    def count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def done(self, now_ns: int, processing_ms: float, latency_ms: float | None,
             infer_ms: float | None) -> None:
        with self._lock:
            self.counts['processed'] += 1
            self._done_ns.append(now_ns)
            self._processing_ms.append(processing_ms)
            if latency_ms is not None:
                self._latency_ms.append(latency_ms)
            if infer_ms is not None:
                self._infer_ms.append(infer_ms)

    def summary(self, now_ns: int, window_s: float = 5.0) -> dict[str, float]:
        """Rates over the last ``window_s`` seconds and timings of the recent frames."""
        with self._lock:
            start = now_ns - int(window_s * 1e9)
            out = {'input_rate_hz': _rate([t for t in self._arrivals_ns if t >= start]),
                   'output_rate_hz': _rate([t for t in self._done_ns if t >= start])}
            for key, values in (('processing_ms', self._processing_ms),
                                ('latency_ms', self._latency_ms), ('infer_ms', self._infer_ms)):
                if values:
                    array = np.asarray(values)
                    out[f'{key}_mean'] = float(array.mean())
                    out[f'{key}_max'] = float(array.max())
            return out


def _rate(times_ns: Sequence[int]) -> float:
    """Events per second between the first and the last of ``times_ns`` (0 for fewer than 2)."""
    if len(times_ns) < 2 or times_ns[-1] <= times_ns[0]:
        return 0.0
    return (len(times_ns) - 1) * 1e9 / (times_ns[-1] - times_ns[0])


class NodeCore:
    """The node without ROS: transitions, newest-frame worker, publish decisions, diagnostics.

    States follow the ROS 2 lifecycle: unconfigured -> (configure) inactive -> (activate) active
    -> (deactivate) inactive -> (cleanup) unconfigured; shutdown -> finalized from any of them.
    """

    def __init__(self, transport: Transport, name: str = 'anomaly_seg',
                 loader: Loader = _load_backend, share_dir: str | os.PathLike | None = None,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns,
                 throttle: Throttle | None = None) -> None:
        self.transport = transport
        self.name = name
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
        self.last_error = ''
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
            if config.allow_engine_build:
                from anomaly_seg_node.build_engine import engine_wanted, ensure_engine

                if engine_wanted(config.backend, config.device, sidecar):
                    # Blocks configure for minutes when the engine is missing; that is the
                    # trade asked for by allow_engine_build.
                    ensure_engine(sidecar, config.precision, config.engine_cache_dir or None,
                                  allow_build=True, log=self.transport.log)
            self.segmenter = self.loader(sidecar, config.backend, config.device,
                                         config.precision, config.engine_cache_dir or None)
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
        self.camera_info = None
        self.last_error = ''
        self.state = 'inactive'
        self.transport.log('info', f'configured {path.name}: {self.describe_backend()}; '
                           f'threshold {threshold:g} ({config.anomaly_threshold or "default"}); '
                           f'warm-up {warm_ms:.1f} ms')
        if self.cpu_fallback():
            self.transport.log('error', 'device cuda was asked for but inference runs on the '
                               f'CPU ({getattr(self.segmenter, "reason", "")}); expect a low '
                               'frame rate; check the CUDA install or set device cpu')

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
        with self._lock:
            self.config = dataclasses.replace(self.config, **checked)
            if self.pipeline is not None:
                if threshold is not None:
                    self.pipeline.threshold = threshold
                    self.threshold = threshold
                if 'overlay_alpha' in checked:
                    self.pipeline.overlay_alpha = checked['overlay_alpha']
        if threshold is not None:
            self.transport.log('info', f'anomaly threshold now {threshold:g} '
                               f'({checked["anomaly_threshold"] or "default"})')
            if self.state == 'active':
                self.transport.publish(LABEL_INFO_TOPIC, self.label_info())
        return None

    # Frames ------------------------------------------------------------------------------

    def on_message(self, msg: Any, compressed: bool = False) -> None:
        """The subscription callback: keep the newest frame for the worker, nothing else."""
        if self.state != 'active':
            return
        now = self.monotonic_ns()
        self.stats.arrived(now)
        self.slot.put(Frame(msg, compressed, now))

    def on_camera_info(self, msg: Any) -> None:
        self.camera_info = msg

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
                self.stats.count('rejected_stale')
                self.warn('stale', f'dropped a frame {age_s:.3f} s old (max_input_age '
                          f'{config.max_input_age:g} s); check the camera and node clocks '
                          '(use_sim_time when replaying a bag) or raise max_input_age')
                return
        counts = {name: self.transport.subscription_count(name) for name in OUTPUTS}
        want = wanted_outputs(counts)
        info_wanted = wants_camera_info(config.output_resolution,
                                        self.transport.subscription_count(CAMERA_INFO_OUTPUT))
        if not want and not info_wanted:
            self.stats.count('skipped_unsubscribed')
            return
        try:
            rgb = decode_compressed(frame.msg) if frame.compressed else decode_image(frame.msg)
        except ImageDecodeError as error:
            self.stats.count('rejected_decode')
            self.warn('decode', f'dropped a frame that cannot be decoded: {error}')
            return
        result = pipeline.process(rgb, want) if want else None
        for name in OUTPUTS:
            array = getattr(result, name, None)
            if array is not None:
                self.transport.publish(name, encode_image(array, ENCODINGS[name], header))
        if info_wanted:
            info = self._network_camera_info(header, rgb.shape[:2], pipeline, config)
            if info is not None:
                self.transport.publish(CAMERA_INFO_OUTPUT, info)
        done, now = self.monotonic_ns(), self.transport.now_ns()
        # No latency without a stamp, or before /clock ticks under use_sim_time (now is 0).
        latency = (now - stamp) / 1e6 if stamp > 0 and now > 0 else None
        infer = result.timings_ms.get('infer') if result is not None else None
        self.stats.done(done, (done - frame.arrival_ns) / 1e6, latency, infer)

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
        self.stats.count('failed')
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

    def cpu_fallback(self) -> bool:
        """True when device cuda was asked for but the backend runs on the CPU."""
        return (self.segmenter is not None and self.config.device == 'cuda'
                and getattr(self.segmenter, 'device', 'cpu') != 'cuda')

    def describe_backend(self) -> str:
        seg = self.segmenter
        if seg is None:
            return 'no model loaded'
        return (f'{getattr(seg, "backend", "?")} on {getattr(seg, "device", "?")} '
                f'{getattr(seg, "precision", "?")} ({getattr(seg, "reason", "")})')

    def diagnostics(self) -> DiagnosticReport:
        """The node's /diagnostics status now."""
        now = self.monotonic_ns()
        config, seg, sidecar = self.config, self.segmenter, self.sidecar
        summary = self.stats.summary(now)
        values: list[tuple[str, str]] = [('state', self.state)]
        if seg is not None and sidecar is not None:
            kind = 'onnx' if getattr(seg, 'backend', '') == 'onnxruntime' else 'pt2'
            ref = sidecar.files.get(kind)
            values += [('backend', str(getattr(seg, 'backend', '?'))),
                       ('device', str(getattr(seg, 'device', '?'))),
                       ('precision', str(getattr(seg, 'precision', '?'))),
                       ('backend_reason', str(getattr(seg, 'reason', ''))),
                       ('artifact', str(sidecar.source)),
                       ('artifact_sha256', ref.sha256 if ref is not None else ''),
                       ('anomaly_threshold', f'{self.threshold:g}')]
        values += [('input_topic', config.input_topic),
                   ('frames_received', str(self.slot.received)),
                   ('frames_dropped', str(self.slot.dropped))]
        values += [(f'frames_{key}', str(number)) for key, number in self.stats.counts.items()]
        values += [(key, f'{number:.3f}') for key, number in summary.items()]

        level, message = OK, self.state
        silence = self._input_silence_s(now, config)
        if self.last_error:
            level, message = ERROR, self.last_error
        elif self.worker is not None and not self.worker.alive:
            level, message = ERROR, 'the worker thread stopped; restart the node'
        elif self.cpu_fallback():
            level, message = ERROR, (f'running on the CPU although device cuda was asked for: '
                                     f'{getattr(seg, "reason", "")}')
        elif silence is not None:
            level, message = WARN, (f'no input on {config.input_topic} for {silence:.1f} s; '
                                    'check the remap and QoS (input_reliability)')
        elif self.state == 'active':
            message = (f'active: {summary["output_rate_hz"]:.1f} Hz out of '
                       f'{summary["input_rate_hz"]:.1f} Hz in')
            if 'processing_ms_mean' in summary:
                message += f', {summary["processing_ms_mean"]:.1f} ms per frame'
        hardware = str(getattr(seg, 'device', config.device)) if seg is not None else ''
        return DiagnosticReport(level=level, name=f'{self.name}: anomaly segmentation',
                                message=message, hardware_id=hardware, values=tuple(values))

    def _input_silence_s(self, now: int, config: NodeConfig) -> float | None:
        """Seconds without input when the watchdog should fire, else None."""
        if self.state != 'active' or config.input_timeout <= 0 or self.activated_ns is None:
            return None
        last = self.stats.last_arrival_ns or self.activated_ns
        silence = (now - last) / 1e9
        return silence if silence > config.input_timeout else None
