"""What the anomaly_seg node does, without ROS: node.py is thin rclpy glue over this module.

- ``NodeCore`` holds the transition duties (configure: validate the parameters of node_params, load
  the artifact, warm up; activate: start the worker of node_worker, which runs each frame through
  ``prepare`` -> ``infer`` -> ``publish``, on one thread or, with ``overlap_stages``, one thread
  each; deactivate/cleanup: stop it and free the model), the publish decisions (lazy outputs by
  subscriber count, camera_info only at ``output_resolution: network``), the ``max_input_age`` and
  ``max_input_pixels`` checks, the anomaly objects (objects.py on the output maps, boxes in input
  pixels, drawn on the overlay), and the diagnostics (figures and conditions from node_health;
  status named after the fully qualified node, topics resolved).
- The payloads it publishes beside the images (``CameraInfoOut``, ``LabelInfoOut``,
  ``ObjectsOut``, ``DiagnosticReport``); ``detection_array_message`` builds the
  vision_msgs/Detection2DArray of the anomaly objects (``objects.detection_array``) from message
  classes passed in, so that it is tested without ROS.
- ``Transport`` is what the core needs from ROS: subscriber counts, publishing, the node clock
  and the logger. node.py implements it with rclpy; the tests implement it with lists.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import math
import os
import sys
import threading
import time
from typing import Any, Protocol

import numpy as np

from anomaly_seg_node.artifact import Sidecar, read_sidecar
from anomaly_seg_node.errors import AnomalySegError, BackendError, ConfigError, ImageDecodeError
from anomaly_seg_node.image_codec import (
    ImageFields,
    decode_compressed,
    decode_image,
    encode_image,
    stamp_ns,
)
from anomaly_seg_node.imaging import Fit, plan_fit
from anomaly_seg_node.node_health import (
    ERROR,
    OK,
    WARN,
    Condition,
    FrameStats,
    LossEstimate,
    WindowSnapshot,
    loss_condition,
    loss_estimate,
    stall_condition,
)
from anomaly_seg_node.node_params import (
    CONFIGURE,
    SPECS,
    STARTUP,
    NodeConfig,
    build_object_params,
    check_value,
    object_confidence_source,
    resolve_artifact,
    resolve_threshold_setting,
    validate_params,
)
from anomaly_seg_node.node_worker import Frame, FrameWorker, NewestFrameSlot
from anomaly_seg_node.objects import (
    OBJECTS_TOPIC,
    AnomalyObject,
    ObjectParams,
    detection_array,
    draw_objects,
    find_objects,
)
from anomaly_seg_node.pipeline import (
    ENCODINGS,
    OUTPUTS,
    FramePipeline,
    InferredFrame,
    PreparedFrame,
    scale_camera_info,
)

# Topics, relative to the node's namespace so that namespaces and remaps work.
CAMERA_INFO_INPUT = 'camera_info'
CAMERA_INFO_OUTPUT = 'network/camera_info'
LABEL_INFO_TOPIC = 'label_info'
LOG_PERIOD_S = 5.0  # at most one warning of a kind per period


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


def detection_array_message(payload: 'ObjectsOut', types: Mapping[str, Any]) -> Any:
    """The vision_msgs/Detection2DArray of ``payload`` (``objects.detection_array``) from the
    message classes ``types`` (``objects.message_classes`` of rclpy's vision_msgs.msg and
    geometry_msgs.msg, or a rosbags typestore's): the input image's header, one Detection2D per
    object with its box in input pixels and its confidence."""
    return detection_array(types, payload.header, payload.boxes,
                           [obj.confidence for obj in payload.objects])


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


@dataclasses.dataclass
class FrameJob:
    """One frame between the worker's stages, with what was decided when it was taken."""

    frame: Frame
    header: Any
    stamp: int  # ns; 0: none
    pipeline: FramePipeline
    config: NodeConfig
    frame_hw: tuple[int, int]  # of the decoded frame
    want: set[str]  # the image outputs to publish
    objects_subscribed: bool
    object_params: ObjectParams | None  # None: no anomaly objects for this frame
    info_wanted: bool  # network/camera_info
    prepared: PreparedFrame | None  # None: no output to compute (camera_info only)
    inferred: InferredFrame | None = None


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
                 engine_cache_dir: str | None, ort_threads: int) -> Any: ...


def _load_backend(sidecar: Sidecar, backend: str, device: str, precision: str,
                  engine_cache_dir: str | None, ort_threads: int) -> Any:
    from anomaly_seg_node.backends import load

    return load(sidecar, backend=backend, device=device, precision=precision,
                engine_cache_dir=engine_cache_dir, ort_threads=ort_threads)


class NodeCore:
    """The node without ROS: transitions, the worker's stages, publish decisions, diagnostics.

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
                pad_mode=sidecar.pad_mode,
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
        cache, threads = config.engine_cache_dir or None, config.ort_threads
        self.device_note = ''
        if config.device != 'auto':
            return self.loader(sidecar, config.backend, config.device, config.precision, cache,
                               threads)
        try:
            # backend auto falls back to the CPU by itself and says why in its reason.
            segmenter = self.loader(sidecar, config.backend, 'cuda', config.precision, cache,
                                    threads)
        except BackendError as gpu_error:
            if config.backend == 'tensorrt':  # runs on a GPU only
                raise
            try:
                segmenter = self.loader(sidecar, config.backend, 'cpu', 'fp32', cache, threads)
            except BackendError as cpu_error:
                raise BackendError(f'{cpu_error} (device auto tried cuda first: {gpu_error})'
                                   ) from None
            self.device_note = f'device auto, {config.backend} has no GPU here: {gpu_error}'
            return segmenter
        if getattr(segmenter, 'device', 'cpu') != 'cuda':
            self.device_note = str(getattr(segmenter, 'reason', ''))
        return segmenter

    def activate(self) -> None:
        """Start the worker (one thread, or one per stage with overlap_stages); the caller
        subscribes afterwards."""
        self._expect('activate', 'inactive')
        self.slot = NewestFrameSlot()
        self.stats = FrameStats()
        stages = ((self.prepare, self.infer, self.publish) if self.config.overlap_stages
                  else (self.process,))
        self.worker = FrameWorker(self.slot, stages, self._on_worker_error)
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
        """Run one frame through the pipeline and publish what is subscribed: the worker's
        three stages in one call (worker thread)."""
        job = self.prepare(frame)
        if job is not None:
            self.publish(self.infer(job))

    def prepare(self, frame: Frame) -> FrameJob | None:
        """Stage 1: the checks (age, subscribers, pixel budget), decode, crop and fit; None
        when the frame ends here (counted)."""
        pipeline, config = self.pipeline, self.config
        if pipeline is None:
            return None
        header = getattr(frame.msg, 'header', None)
        stamp = stamp_ns(header)
        if config.max_input_age > 0 and stamp > 0:
            age_s = (self.transport.now_ns() - stamp) / 1e9
            if age_s > config.max_input_age:
                self.stats.count('rejected_stale', self.monotonic_ns(), f'{age_s:.1f} s')
                self.warn('stale', f'dropped a frame {age_s:.3f} s old (max_input_age '
                          f'{config.max_input_age:g} s); check the camera and node clocks '
                          '(use_sim_time when replaying a bag) or raise max_input_age')
                return None
        counts = {name: self.transport.subscription_count(name) for name in OUTPUTS}
        want = wanted_outputs(counts)
        objects_subscribed = self.transport.subscription_count(OBJECTS_TOPIC) > 0
        params = self.object_params
        if params is not None and not wants_objects(objects_subscribed, want):
            params = None
        info_wanted = wants_camera_info(config.output_resolution,
                                        self.transport.subscription_count(CAMERA_INFO_OUTPUT))
        if not want and params is None and not info_wanted:
            self.stats.count('skipped_unsubscribed', self.monotonic_ns())
            return None
        try:
            if frame.compressed:
                rgb = decode_compressed(frame.msg, max_pixels=config.max_input_pixels)
            else:
                check_raw_pixels(frame.msg, config.max_input_pixels)
                rgb = decode_image(frame.msg)
        except ImageDecodeError as error:
            self.stats.count('rejected_decode', self.monotonic_ns(), str(error))
            self.warn('decode', f'dropped a frame that cannot be decoded: {error}')
            return None
        compute = set(want)
        if params is not None:
            compute.add('anomaly_score')
            if params.drivable_ids:
                compute.add('semantic_mask')
        return FrameJob(frame=frame, header=header, stamp=stamp, pipeline=pipeline,
                        config=config, frame_hw=(rgb.shape[0], rgb.shape[1]), want=want,
                        objects_subscribed=objects_subscribed, object_params=params,
                        info_wanted=info_wanted,
                        prepared=pipeline.prepare(rgb, compute) if compute else None)

    def infer(self, job: FrameJob) -> FrameJob:
        """Stage 2: the segmenter."""
        if job.prepared is not None:
            job.inferred = job.pipeline.infer(job.prepared)
        return job

    def publish(self, job: FrameJob) -> None:
        """Stage 3: the outputs at output resolution, the anomaly objects, publishing, the
        frame's figures."""
        pipeline, header = job.pipeline, job.header
        result = pipeline.render(job.inferred) if job.inferred is not None else None
        found = None
        if job.object_params is not None and result is not None:
            found = self._objects(result, job.object_params, pipeline, job.frame_hw, header)
        for name in OUTPUTS:
            array = getattr(result, name, None)
            if array is not None and name in job.want:
                self.transport.publish(name, encode_image(array, ENCODINGS[name], header))
        if found is not None and job.objects_subscribed:
            self.transport.publish(OBJECTS_TOPIC, found)
        if job.info_wanted:
            info = self._network_camera_info(header, job.frame_hw, pipeline, job.config)
            if info is not None:
                self.transport.publish(CAMERA_INFO_OUTPUT, info)
        done, now = self.monotonic_ns(), self.transport.now_ns()
        # No latency without a stamp, or before /clock ticks under use_sim_time (now is 0).
        stamp = job.stamp
        latency = (now - stamp) / 1e6 if stamp > 0 and now > 0 else None
        infer = result.timings_ms.get('infer') if result is not None else None
        self.stats.done(done, (done - job.frame.arrival_ns) / 1e6, latency, infer,
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
