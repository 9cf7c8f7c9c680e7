"""Offline rosbag replay: a bag's camera frames through the FramePipeline, scored and timed.

ROS-free and torch-free. Reads rosbag2 (mcap, sqlite3) and ROS 1 bags through
:mod:`anomaly_seg_node.bag_reader` (which also finds the camera topic, raw or compressed),
decodes frames with :mod:`anomaly_seg_node.image_codec`, runs :class:`FramePipeline`, matches
label frames to images by header stamp and streams the metrics of :mod:`metrics` (per frame and
pooled) in memory that does not grow with the bag.

With ``objects`` (an :class:`ObjectParams` at the pipeline's threshold), every processed frame's
anomaly objects are found on its outputs (:func:`objects.find_objects`: the anomaly score and
semantic mask at output resolution; NaN = unseen is never part of an object), timed as the stage
``objects`` and counted in ``process`` (the node's worker will publish them). Labelled frames
then also give the component metrics of SegmentMeIfYouCan (:class:`metrics.ComponentMetrics`,
no size filters) twice: of the pixel mask ``score > threshold`` (the benchmark's protocol) and of
the objects as a planner sees them (``update_instances``), plus :class:`metrics.BoxMetrics` of
their boxes.

Two modes:

- as fast as possible (``rate=None``): every frame is processed, one after the other;
- ``rate=R``: frames arrive at their bag timestamps divided by R, on a simulated clock, and meet
  the node's newest-frame policy: while the worker is busy the newest frame waits in a one-frame
  slot, a newer one replaces it and the replaced one counts as dropped. A processed frame's
  end-to-end latency is its finish time minus its arrival time, where the processing time is the
  measured wall time of decoding plus the pipeline. That is what the node would see live.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math
from pathlib import Path
import time
from typing import Any

import numpy as np

from anomaly_seg_node.bag_reader import (
    BagSource,
    BagTopics,
    choose_topics,
    open_bag,
)
from anomaly_seg_node.errors import (
    AnomalySegError,
    BagError,
    ConfigError,
    ImageDecodeError,
)
from anomaly_seg_node.image_codec import decode_compressed, decode_image, stamp_ns
from anomaly_seg_node.labels import LabelSpec, fitting_conventions
from anomaly_seg_node.metrics import (
    BinnedPerImageOOD,
    BoxMetrics,
    ComponentMetrics,
    ConfusionMatrix,
    OpenSetConfusion,
    PerImageOOD,
    PooledOOD,
)
from anomaly_seg_node.objects import (
    AnomalyObject,
    ObjectParams,
    find_objects,
    find_objects_with_ids,
)
from anomaly_seg_node.pipeline import FramePipeline, FrameResult
from anomaly_seg_node.replay_outputs import ReplaySink

METRIC_OUTPUTS = ('semantic_mask', 'anomaly_score', 'anomaly_mask')
# Points of the pooled PR / ROC curve kept in the report (for plots).
CURVE_POINTS = 400


# ---------------------------------------------------------------------------------------------
# Small pure parts: memory, latency statistics, the live schedule, stamp matching.


def rss_mb() -> float | None:
    """Resident set size of this process in MiB from /proc/self/status (None off Linux)."""
    try:
        with open('/proc/self/status', encoding='ascii') as status:
            for line in status:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


class LatencyStats:
    """Count, mean, min, max and percentiles of durations in ms, in constant memory.

    Percentiles come from a fixed log-spaced histogram (200 bins per decade, 1e-3 ms to 1e7 ms):
    the reported value is the upper edge of the bin holding the nearest-rank sample, clipped to
    [min, max], so it is at most 1.2 % above the exact nearest-rank percentile.
    """

    BINS_PER_DECADE = 200
    LOW_MS, HIGH_MS = 1e-3, 1e7

    def __init__(self) -> None:
        decades = math.log10(self.HIGH_MS / self.LOW_MS)
        self._counts = np.zeros(int(decades * self.BINS_PER_DECADE) + 2, dtype=np.int64)
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, ms: float) -> None:
        ms = float(ms)
        if not math.isfinite(ms) or ms < 0.0:
            raise ValueError(f'a duration must be a finite number of ms >= 0, got {ms}')
        self.count += 1
        self.total += ms
        self.min = min(self.min, ms)
        self.max = max(self.max, ms)
        self._counts[self._bin(ms)] += 1

    def _bin(self, ms: float) -> int:
        if ms <= self.LOW_MS:
            return 0
        index = math.ceil(math.log10(ms / self.LOW_MS) * self.BINS_PER_DECADE)
        return min(index, self._counts.size - 1)

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile ``q`` in (0, 100] (binned as described above)."""
        if self.count == 0:
            return math.nan
        rank = max(1, math.ceil(q / 100.0 * self.count))
        index = int(np.searchsorted(np.cumsum(self._counts), rank))
        upper = self.LOW_MS * 10.0 ** (index / self.BINS_PER_DECADE)
        return min(max(upper, self.min), self.max)

    def summary(self) -> dict[str, Any]:
        if self.count == 0:
            return {'count': 0}
        return {'count': self.count, 'mean': self.total / self.count, 'min': self.min,
                'p50': self.percentile(50), 'p90': self.percentile(90),
                'p99': self.percentile(99), 'max': self.max}


class LiveSchedule:
    """The node's newest-frame slot and one worker, on a simulated clock in integer ns.

    ``arrive(t, item)`` delivers a frame at time ``t`` (non-decreasing). ``run(item)`` processes
    a frame and returns its duration in ns; ``on_done(item, arrival, start, finish)`` and
    ``on_drop(item)`` report the outcome. Call ``finish()`` after the last frame.
    """

    def __init__(self, run: Callable[[Any], int],
                 on_done: Callable[[Any, int, int, int], None],
                 on_drop: Callable[[Any], None]) -> None:
        self._run, self._on_done, self._on_drop = run, on_done, on_drop
        self.free_at: int | None = None  # when the worker finishes its current frame
        self._pending: tuple[int, Any] | None = None
        self.arrived = self.processed = self.dropped = 0
        self._last: int | None = None

    def arrive(self, t_ns: int, item: Any) -> None:
        t_ns = int(t_ns)
        if self._last is not None and t_ns < self._last:
            raise ValueError(f'arrivals must not go back in time: {t_ns} after {self._last}')
        self._last = t_ns
        self.arrived += 1
        # The worker took the waiting frame when it became free, before this arrival.
        if self._pending is not None and self.free_at is not None and self.free_at <= t_ns:
            self._start(*self._pending)
        if self._pending is not None:  # still busy: the newest frame replaces the waiting one
            self.dropped += 1
            self._on_drop(self._pending[1])
        self._pending = (t_ns, item)
        if self.free_at is None or self.free_at <= t_ns:
            self._start(*self._pending)

    def finish(self) -> None:
        if self._pending is not None:
            self._start(*self._pending)

    def _start(self, arrival: int, item: Any) -> None:
        self._pending = None
        start = arrival if self.free_at is None else max(arrival, self.free_at)
        duration = int(self._run(item))
        self.free_at = start + max(duration, 0)
        self.processed += 1
        self._on_done(item, arrival, start, self.free_at)


@dataclasses.dataclass
class Frame:
    """One camera frame read from the bag; ``label`` is the matched label message or None.

    While the sinks see a processed frame, ``image`` holds its decoded RGB uint8 `[H, W, 3]`,
    ``anomaly_target`` its labelled anomaly target (uint8 1 anomaly / 0 inlier / ignore, at the
    image size) when it has labels and ``objects`` its anomaly objects (in pixels of the
    outputs) when the replay finds them; all are dropped afterwards to keep memory flat.
    """

    index: int
    bag_ns: int
    stamp_ns: int
    msg: Any
    frame_id: str = ''
    label: Any = None
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    image: np.ndarray | None = None
    anomaly_target: np.ndarray | None = None
    objects: list[AnomalyObject] | None = None


class StampMatcher:
    """Pairs images with label frames of equal header stamp, emitting images in arrival order.

    An image waits for its label while fewer than ``max_waiting`` images wait and until the bag
    has moved ``window_ns`` past it; a label waits for its image among at most ``max_labels``
    (the oldest is then given up and counted unmatched). Memory stays bounded either way.
    """

    def __init__(self, max_waiting: int = 8, window_ns: int = 10 ** 9,
                 max_labels: int = 16) -> None:
        self.max_waiting, self.window_ns, self.max_labels = max_waiting, window_ns, max_labels
        self._images: deque[Frame] = deque()
        self._labels: OrderedDict[int, Any] = OrderedDict()
        self._now = -(2 ** 63)
        self.matched = 0
        self.unmatched_labels = 0

    @property
    def waiting(self) -> int:
        return len(self._images)

    def add_image(self, frame: Frame) -> list[Frame]:
        self._now = max(self._now, frame.bag_ns)
        label = self._labels.pop(frame.stamp_ns, None)
        if label is not None:
            frame.label = label
            self.matched += 1
        self._images.append(frame)
        return self._ready()

    def add_label(self, stamp_ns: int, bag_ns: int, msg: Any) -> list[Frame]:
        self._now = max(self._now, bag_ns)
        for frame in self._images:
            if frame.stamp_ns == stamp_ns and frame.label is None:
                frame.label = msg
                self.matched += 1
                return self._ready()
        self._labels[stamp_ns] = msg
        self._labels.move_to_end(stamp_ns)
        while len(self._labels) > self.max_labels:
            self._labels.popitem(last=False)
            self.unmatched_labels += 1
        return self._ready()

    def flush(self) -> list[Frame]:
        frames = list(self._images)
        self._images.clear()
        self.unmatched_labels += len(self._labels)
        self._labels.clear()
        return frames

    def _ready(self) -> list[Frame]:
        out = []
        while self._images:
            front = self._images[0]
            if (front.label is None and len(self._images) <= self.max_waiting
                    and self._now - front.bag_ns <= self.window_ns):
                break
            out.append(self._images.popleft())
        return out


# ---------------------------------------------------------------------------------------------
# Labels and metrics.


class FrameEvaluator:
    """Streams per-frame and pooled anomaly metrics, closed mIoU, open-mIoU and the component
    metrics at the threshold.

    Labels without class ids (``labels.has_classes`` False, e.g. ``--labels binary``) give the
    anomaly and component metrics only; closed and open-set mIoU then report why they are not
    available. ``objects`` (the replay's object parameters, with the class names of their
    drivable ids) adds the component and box metrics of the objects (`update_components`).
    The per-image anomaly metrics are `BinnedPerImageOOD`'s (each frame's curve in the pooled
    binning, with error bounds); ``exact_per_image`` gives `PerImageOOD`'s exact ones instead,
    at the cost of a sort of every frame's scores.
    """

    def __init__(self, classes: Sequence[str], labels: LabelSpec, threshold: float,
                 pooled_bits: int = 20, objects: dict[str, Any] | None = None,
                 exact_per_image: bool = False) -> None:
        self.classes = list(classes)
        self.labels = labels
        self.threshold = float(threshold)
        k = len(self.classes)
        # Per-image AP from each frame's histogram in the pooled binning: linear per frame,
        # where the exact curve sorted every frame's scores (half the non-inference time).
        self.per_image = (PerImageOOD() if exact_per_image
                          else BinnedPerImageOOD(bits=pooled_bits))
        self.pooled = PooledOOD(bits=pooled_bits)
        self.closed = ConfusionMatrix(k, labels.ignore)
        self.open_set = OpenSetConfusion(k, self.threshold, labels.ignore)
        # No size filters: SegmentMeIfYouCan's are pixels at its own images' resolution.
        self.mask_components = ComponentMetrics()
        self.object_params = objects
        self.object_components = ComponentMetrics() if objects is not None else None
        self.boxes = BoxMetrics() if objects is not None else None
        self.frames = 0
        self.pixels = {'anomaly': 0, 'inlier': 0}
        self.label_ids = np.zeros(256, dtype=np.int64)  # pixels per raw label id

    def update(self, semantic_mask: np.ndarray, anomaly_score: np.ndarray,
               raw_labels: np.ndarray, seen: np.ndarray | None = None
               ) -> tuple[dict[str, Any], np.ndarray]:
        """Add one frame (all at the same resolution); returns its own metrics and its anomaly
        target (uint8 1 anomaly / 0 inlier / ignore). Pixels where ``seen`` (bool, optional) is
        False were never shown to the model (``resize_mode`` crop_center) and are ignored."""
        k = len(self.classes)
        closed, anomaly, open_set = self.labels.targets(raw_labels, k)
        if seen is not None:
            ignore = np.uint8(self.labels.ignore)
            closed, anomaly, open_set = (np.where(seen, target, ignore)
                                         for target in (closed, anomaly, open_set))
            # Their void labels and NaN scores are ignored, but the metrics check every pixel.
            semantic_mask = np.where(seen, semantic_mask, np.uint8(0))
            anomaly_score = np.where(seen, anomaly_score, np.float32(0.0))
        scored = raw_labels.reshape(-1) if seen is None else raw_labels[seen]
        self.label_ids += np.bincount(scored, minlength=256)
        histogram = self.pooled.update(anomaly_score, anomaly)
        if isinstance(self.per_image, BinnedPerImageOOD):
            frame = self.per_image.add(histogram)
        else:
            frame = self.per_image.update(anomaly_score, anomaly)
        if self.labels.has_classes:
            self.closed.update(semantic_mask, closed)
            self.open_set.update(semantic_mask, anomaly_score, open_set)
        self.frames += 1
        n_anomaly = int(np.count_nonzero(anomaly == 1))
        self.pixels['anomaly'] += n_anomaly
        self.pixels['inlier'] += int(np.count_nonzero(anomaly == 0))
        out: dict[str, Any] = {'n_anomaly_pixels': n_anomaly}
        if frame is not None:
            out.update({key: frame[key] for key in ('ap', 'auroc', 'fpr95')})
        return out, anomaly

    def update_components(self, anomaly_score: np.ndarray, anomaly_target: np.ndarray,
                          objects: Sequence[AnomalyObject] | None = None,
                          object_ids: np.ndarray | None = None) -> dict[str, Any]:
        """Add one frame to the component metrics: the mask ``anomaly_score > threshold`` (NaN =
        unseen is never anomalous) and, when the replay finds objects, their id map
        (`find_objects_with_ids`) and boxes, all against `anomaly_target` from `update`.
        Returns the frame's figures for its record."""
        mask = self.mask_components.update(np.greater(anomaly_score, self.threshold),
                                           anomaly_target)
        out: dict[str, Any] = {'components': {'n_gt': mask['n_gt'], 'n_mask': mask['n_pred']}}
        if self.object_components is not None and self.boxes is not None \
                and objects is not None and object_ids is not None:
            self.object_components.update_instances(object_ids, anomaly_target)
            boxes = self.boxes.update(objects, anomaly_target)
            out['boxes'] = {key: boxes[key] for key in ('tp', 'fp', 'fn')}
        return out

    def _components(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            'threshold': self.threshold,
            'protocol': 'SegmentMeIfYouCan component metrics (sIoU, PPV, F1 averaged over '
                        'sIoU/PPV thresholds 0.25..0.75), no size filters (min_pred_area = '
                        "min_gt_area = 0: the benchmark's filters are pixels at its own "
                        'resolution), at the camera resolution; labels 1 anomaly, 0 inlier, '
                        'others ignored. mask: the pixels score > threshold, 8-connected '
                        "(the benchmark's protocol); objects: the anomaly objects as published "
                        '(drivable restriction, merge, size and count limits applied); boxes: '
                        'their boxes against the boxes of the labelled components, matched '
                        'one-to-one at IoU >= 0.5'}
        parts: list[tuple[str, Any]] = [('mask', self.mask_components)]
        if self.object_components is not None:
            parts += [('objects', self.object_components), ('boxes', self.boxes)]
            result['params'] = dict(self.object_params or {})
        for key, metric in parts:
            try:
                result[key] = metric.compute()
            except AnomalySegError as error:
                result[key] = {'error': str(error)}
        return result

    def compute(self) -> dict[str, Any]:
        labelled = self.pixels['anomaly'] + self.pixels['inlier']
        result: dict[str, Any] = {
            'frames': self.frames, 'threshold': self.threshold, 'labels': self.labels.name,
            'convention': self.labels.convention or None,
            # The AP of a random score: the share of anomaly pixels among the scored ones.
            'anomaly_pixel_share': self.pixels['anomaly'] / labelled if labelled else None,
            'label_ids': _id_counts(self.label_ids),
            'unknown_label_ids': self.labels.unknown_ids(self.label_ids),
        }
        metrics: tuple[tuple[str, Any], ...] = (('per_image', self.per_image),
                                                ('pooled', self.pooled))
        if self.labels.has_classes:
            metrics += (('closed', self.closed), ('open_set', self.open_set))
        else:  # not a number: nothing was measured
            result['closed'] = {'error': self.labels.no_class_reason}
            result['open_set'] = {'error': self.labels.no_class_reason}
        for key, metric in metrics:
            try:
                result[key] = metric.compute()
            except AnomalySegError as error:  # e.g. no frame with anomalies: say so, go on
                result[key] = {'error': str(error)}
        result['components'] = self._components()
        if 'iou' in result['closed']:
            result['closed']['classes'] = self.classes
        if 'ap' in result['pooled']:
            curve = self.pooled.curve_points(CURVE_POINTS)
            result['pooled']['curve'] = {key: [round(float(v), 6) for v in values]
                                         for key, values in curve.items()}
        return result

    def warnings(self) -> list[str]:
        """What hints at the wrong --labels convention: no anomaly pixel in any labelled frame,
        or label ids the convention does not define."""
        if self.frames == 0:
            return []
        spec, counts, name = self.labels, self.label_ids, self.labels.display_name
        others = [kind for kind in fitting_conventions(counts, self.classes)
                  if kind != spec.convention]
        fits = (f'--labels {" or --labels ".join(others)} would fit these ids' if others
                else 'no --labels convention has anomaly pixels and only ids it defines here')
        out = []
        if self.pixels['anomaly'] == 0:
            seen = ', '.join(f'{i}: {n}' for i, n in _id_counts(counts, 16).items())
            ids = ', '.join(map(str, spec.anomaly_ids))
            out.append(f'no anomaly pixel in the {self.frames} labelled frames with {name} '
                       f'(anomaly id {ids}); label ids seen (id: pixels): {seen}. {fits}')
        unknown = spec.unknown_ids(counts)
        if unknown:
            n = sum(unknown.values())
            listed = ', '.join(f'{i}: {c}' for i, c in list(unknown.items())[:16])
            out.append(f'{n} labelled pixels ({n / int(counts.sum()):.2%}) hold ids that '
                       f'{name} does not define; they were ignored (id: pixels): {listed}'
                       + ('' if self.pixels['anomaly'] == 0 else f'. {fits}'))
        return out


def _id_counts(counts: np.ndarray, limit: int | None = None) -> dict[int, int]:
    """{id: pixels} of the ids present, by id; with ``limit``, of that many most frequent."""
    ids = np.flatnonzero(counts)
    if limit is not None and ids.size > limit:
        ids = np.sort(ids[np.argsort(-counts[ids], kind='stable')[:limit]])
    return {int(i): int(counts[i]) for i in ids}


# ---------------------------------------------------------------------------------------------
# The replay.


class Replay:
    """One pass over a bag. ``run()`` raises BagError on a broken bag, missing topics or labels
    of another size; ``report()`` then still holds everything computed so far.

    The pipeline's warnings (e.g. frames of another aspect ratio than the artifact's) are kept,
    each once, in ``warnings`` and the report: the replay takes over ``pipeline.on_warning`` and
    passes each warning on to the callback that was there.

    ``objects``: find each processed frame's anomaly objects with these parameters, whose
    threshold must be the pipeline's; ``fpr_table`` gives their confidence (see
    :func:`objects.fpr_table_from_thresholds`; None: the logistic). Each frame's record then
    holds ``objects`` (`AnomalyObject.to_dict()`, in pixels of the outputs).
    """

    def __init__(self, bag: str | Path, pipeline: FramePipeline, *,
                 image_topic: str | None = None, label_topic: str | None = None,
                 labels: LabelSpec | None = None, rate: float | None = None,
                 max_frames: int | None = None, want: Sequence[str] = METRIC_OUTPUTS,
                 sinks: Sequence[ReplaySink] = (),
                 on_frame: Callable[[dict[str, Any]], None] | None = None,
                 on_progress: Callable[[int, int | None], None] | None = None,
                 timer: Callable[[], float] = time.perf_counter,
                 warmup: int = 1, pooled_bits: int = 20,
                 objects: ObjectParams | None = None,
                 fpr_table: Mapping[float, float] | None = None) -> None:
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise ConfigError(f'--rate must be a positive number (1.0 = real time), got {rate}')
        if max_frames is not None and max_frames < 1:
            raise ConfigError(f'--max-frames must be at least 1, got {max_frames}')
        if objects is not None and objects.threshold != pipeline.threshold:
            raise ConfigError(f'the object threshold {objects.threshold} differs from the '
                              f"pipeline's {pipeline.threshold}; objects are found at the "
                              "replay's threshold: build ObjectParams with the same one")
        if objects is not None and any(i >= len(pipeline.classes)
                                       for i in objects.drivable_ids):
            raise ConfigError(f'drivable ids {list(objects.drivable_ids)} are not all class ids '
                              f'of the artifact (0..{len(pipeline.classes) - 1}: '
                              f'{", ".join(pipeline.classes)})')
        self.bag = Path(bag)
        self.pipeline = pipeline
        self.image_topic, self.label_topic = image_topic, label_topic
        self.label_spec = labels
        self.rate = rate
        self.max_frames = max_frames
        self.want = tuple(dict.fromkeys((*METRIC_OUTPUTS, *want)))
        self.sinks = list(sinks)
        self.on_frame = on_frame
        self.on_progress = on_progress
        self.timer = timer
        self.pooled_bits = pooled_bits
        self.objects = objects
        self.fpr_table = None if fpr_table is None else dict(fpr_table)
        self.object_counts = {'frames': 0, 'total': 0, 'frames_with_objects': 0, 'max': 0}
        self._warmups = max(int(warmup), 0)
        self.warmup_ms: float | None = None
        self.warnings: list[str] = []
        self._forward_warning = pipeline.on_warning
        pipeline.on_warning = self._warn
        # filled while running
        self.source: BagSource | None = None
        self.topics: BagTopics | None = None
        self.evaluator: FrameEvaluator | None = None
        self.matcher: StampMatcher | None = None
        self.schedule: LiveSchedule | None = None
        self.stages: dict[str, LatencyStats] = {}
        self.end_to_end = LatencyStats()
        self.queue_wait = LatencyStats()
        self.messages_read = 0
        self.frames_read = 0
        self.processed = self.dropped = self.rejected = 0
        self.with_label = self.without_label = 0
        self.unseen_pixels = 0  # of labelled frames, never shown to the model: not scored
        self.rejections: list[str] = []
        self.first_bag_ns: int | None = None
        self.last_bag_ns: int | None = None
        self.last_read_ns: int | None = None
        self.first_arrival_ns: int | None = None
        self.last_arrival_ns: int | None = None
        self.memory: dict[str, float | None] = {}
        self.complete = False
        self.error: str | None = None
        self.started = self.timer()
        self.seconds = 0.0

    # -- running ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            self._run()
            self.complete = True
        except BagError as error:
            self.error = str(error)
            raise
        finally:
            self.seconds = self.timer() - self.started
            if self.source is not None:
                self.source.close()
            if self.evaluator is not None:  # e.g. the wrong --labels: say so on the terminal
                for message in self.evaluator.warnings():
                    self._warn(message)
        return self.report()

    def _run(self) -> None:
        self.memory['start_mb'] = rss_mb()
        self.source = source = open_bag(self.bag)
        self.topics = topics = choose_topics(source.topics, self.image_topic, self.label_topic)
        if topics.label is not None and self.label_spec is not None:
            self.evaluator = FrameEvaluator(self.pipeline.classes, self.label_spec,
                                            self.pipeline.threshold, self.pooled_bits,
                                            self.object_settings())
            self.matcher = StampMatcher()
        if self.rate is not None:
            self.schedule = LiveSchedule(self._process, self._done, self._drop)
        total = topics.image.count
        if self.max_frames is not None and total is not None:
            total = min(total, self.max_frames)
        ids = None if self.sinks else {topics.image.id} | (
            {topics.label.id} if self.matcher is not None and topics.label else set())
        label_id = topics.label.id if topics.label is not None else None
        stream = source.messages(ids)
        seen_ns = 0  # bag time of the last message read
        while True:
            past_limit = self.max_frames is not None and self.frames_read >= self.max_frames
            if past_limit and self._no_label_can_arrive(seen_ns):
                break
            try:
                topic, bag_ns, raw = next(stream)
                seen_ns = bag_ns
                msg = None
                wanted = (topic.id == topics.image.id and not past_limit) or (
                    self.matcher is not None and topic.id == label_id)
                if wanted:
                    msg = source.deserialize(raw, topic.msgtype)
                    stamp = stamp_ns(msg.header)
            except StopIteration:
                break
            except AnomalySegError as error:
                self._drain()
                raise BagError(f'bag {self.bag} ({source.kind}): {error}; '
                               f'{self._progress_words()}') from None
            except Exception as error:  # a third-party reader fails in many ways on bad bytes
                self._drain()
                raise BagError(
                    f'bag {self.bag} ({source.kind}) is truncated or corrupt: reading failed '
                    f'with {type(error).__name__}: {error}; {self._progress_words()}. Results '
                    'up to that point are kept; repair the bag (`ros2 bag reindex`) or '
                    're-record it') from None
            self.messages_read += 1
            for sink in self.sinks:
                if not (past_limit and topic.id == topics.image.id):
                    sink.on_input(topic, bag_ns, raw, source)
            if msg is None:
                continue
            if topic.id == topics.image.id:
                self.last_read_ns = bag_ns
                frame = Frame(self.frames_read, bag_ns, stamp, msg,
                              str(getattr(msg.header, 'frame_id', '')))
                self.frames_read += 1
                if self.on_progress is not None:
                    self.on_progress(self.frames_read, total)
                ready = self.matcher.add_image(frame) if self.matcher else [frame]
            else:  # a label: read only when there is a matcher
                assert self.matcher is not None
                ready = self.matcher.add_label(stamp, bag_ns, msg)
            for frame in ready:
                self._arrive(frame)
        self._drain()
        if self.frames_read == 0:
            raise BagError(f'the image topic {topics.image.topic} of bag {self.bag} holds no '
                           'message; record the camera topic or pick another with --image-topic')

    def _no_label_can_arrive(self, seen_ns: int) -> bool:
        """Past --max-frames: whether the frames that wait for labels can stop waiting (none
        waits, or the bag has moved on by more than the matching window)."""
        matcher = self.matcher
        if matcher is None or matcher.waiting == 0 or self.last_read_ns is None:
            return True
        return seen_ns - self.last_read_ns > matcher.window_ns

    def _drain(self) -> None:
        """Process the frames still waiting for labels, and the one in the live slot."""
        if self.matcher is not None:
            for frame in self.matcher.flush():
                self._arrive(frame)
        if self.schedule is not None:
            self.schedule.finish()

    def _progress_words(self) -> str:
        last = 'none' if self.last_read_ns is None else f'{self.last_read_ns} ns'
        return (f'read {self.messages_read} messages and {self.frames_read} image frames '
                f'(last image bag time {last}), processed {self.processed} frames')

    def _arrive(self, frame: Frame) -> None:
        if self.first_bag_ns is None:
            self.first_bag_ns = frame.bag_ns
        self.last_bag_ns = frame.bag_ns
        if self.schedule is None or self.rate is None:  # the schedule exists with a rate only
            duration = self._process(frame)
            self._done(frame, 0, 0, duration)
            return
        arrival = int(round((frame.bag_ns - self.first_bag_ns) / self.rate))
        if self.last_arrival_ns is not None:
            arrival = max(arrival, self.last_arrival_ns)  # an out-of-order bag: clamp
        if self.first_arrival_ns is None:
            self.first_arrival_ns = arrival
        self.last_arrival_ns = arrival
        self.schedule.arrive(arrival, frame)

    def _process(self, frame: Frame) -> int:
        """Decode and run the pipeline (the node worker's job); returns its wall time in ns."""
        record = frame.record
        record.update({'index': frame.index, 'stamp_ns': frame.stamp_ns,
                       'bag_ns': frame.bag_ns})
        assert self.topics is not None  # chosen by _run before the first frame
        start = self.timer()
        try:
            if self.topics.image_kind == 'compressed':
                rgb = decode_compressed(frame.msg)
            else:
                rgb = decode_image(frame.msg, 'rgb8')
        except ImageDecodeError as error:
            elapsed = self.timer() - start
            self.rejected += 1
            if len(self.rejections) < 5:
                self.rejections.append(f'frame {frame.index}: {error}')
            record.update({'status': 'rejected', 'error': str(error)})
            frame.msg = None
            return int(round(elapsed * 1e9))
        decode_s = self.timer() - start
        if self._warmups:
            # Like the node's configure step: first calls (allocations, kernel choice) untimed.
            begin = self.timer()
            for _ in range(self._warmups):
                self.pipeline.process(rgb, self.want)
            self.warmup_ms = (self.timer() - begin) * 1e3
            self._warmups = 0
        begin = self.timer()
        result = self.pipeline.process(rgb, self.want)
        process_s = decode_s + self.timer() - begin
        frame.msg = None  # the message is no longer needed; keep memory flat
        timings = dict(result.timings_ms)
        ids = None
        if self.objects is not None:
            begin = self.timer()
            score = result.anomaly_score
            assert score is not None  # self.want holds METRIC_OUTPUTS
            if self.evaluator is not None and frame.label is not None:  # ids: for metrics
                frame.objects, ids = find_objects_with_ids(
                    score, result.semantic_mask, self.objects, self.fpr_table)
            else:
                frame.objects = find_objects(score, result.semantic_mask, self.objects,
                                             self.fpr_table)
            objects_s = self.timer() - begin
            process_s += objects_s
            timings['objects'] = objects_s * 1e3
            self._count_objects(frame.objects)
            record['objects'] = [obj.to_dict() for obj in frame.objects]
        self._stage('decode', decode_s * 1e3)
        for stage, ms in timings.items():
            self._stage(stage, ms)
        self._stage('process', process_s * 1e3)
        record.update({'status': 'processed',
                       'process_ms': process_s * 1e3,
                       'timings_ms': {k: round(v, 3) for k, v in timings.items()}})
        self.processed += 1
        self._evaluate(frame, rgb.shape[:2], result, ids)
        frame.image = rgb
        for sink in self.sinks:
            sink.on_result(frame, result)
        frame.image = frame.anomaly_target = frame.objects = None
        self._sample_memory()
        return int(round(process_s * 1e9))

    def object_settings(self) -> dict[str, Any] | None:
        """The object parameters as reported (None without objects): ObjectParams' fields, the
        class names of the drivable ids and how the confidence is computed."""
        if self.objects is None:
            return None
        settings: dict[str, Any] = dataclasses.asdict(self.objects)
        settings['drivable_ids'] = list(self.objects.drivable_ids)
        settings['drivable_classes'] = [self.pipeline.classes[i]
                                        for i in self.objects.drivable_ids]
        settings['confidence'] = (
            'logistic of (max score - threshold) / confidence_scale' if self.fpr_table is None
            else "1 - false-alarm rate of the max score, interpolated in the sidecar's fpr "
                 'thresholds')
        settings['fpr_table'] = (None if self.fpr_table is None
                                 else [[k, v] for k, v in sorted(self.fpr_table.items())])
        return settings

    def _count_objects(self, objects: Sequence[AnomalyObject]) -> None:
        counts = self.object_counts
        counts['frames'] += 1
        counts['total'] += len(objects)
        counts['frames_with_objects'] += int(bool(objects))
        counts['max'] = max(counts['max'], len(objects))

    def _evaluate(self, frame: Frame, size: tuple[int, int], result: FrameResult,
                  object_ids: np.ndarray | None = None) -> None:
        if self.evaluator is None:
            return
        if frame.label is None:
            self.without_label += 1
            return
        # The evaluator exists only for a bag with a label topic; self.want holds
        # METRIC_OUTPUTS.
        assert self.topics is not None and self.topics.label is not None
        label_topic, image_topic = self.topics.label.topic, self.topics.image.topic
        semantic, score = result.semantic_mask, result.anomaly_score
        assert semantic is not None and score is not None
        try:
            raw = decode_image(frame.label, 'native')
        except ImageDecodeError as error:
            raise BagError(f'label frame at stamp {frame.stamp_ns} on {label_topic} '
                           f'cannot be decoded: {error}') from None
        frame.label = None
        if raw.ndim != 2 or raw.dtype != np.uint8:
            raise BagError(
                f'label frame at stamp {frame.stamp_ns} on {label_topic} is '
                f'{raw.dtype} with shape {raw.shape}; expected mono8 (8UC1) class ids, one '
                'channel')
        if raw.shape != tuple(size):
            raise BagError(
                f'label frame at stamp {frame.stamp_ns} on {label_topic} is '
                f'{raw.shape[0]}x{raw.shape[1]} but its image on {image_topic} is '
                f'{size[0]}x{size[1]}; labels must have the camera resolution (record them at '
                'the image size or pass the matching --label-topic)')
        self.with_label += 1
        seen = self.pipeline.seen_mask(size)  # None: the model saw every pixel
        if seen is not None:
            self.unseen_pixels += seen.size - int(np.count_nonzero(seen))
        figures, frame.anomaly_target = self.evaluator.update(semantic, score, raw, seen)
        figures.update(self.evaluator.update_components(
            score, frame.anomaly_target, frame.objects, object_ids))
        frame.record.update(figures)

    def _done(self, frame: Frame, arrival: int, start: int, finish: int) -> None:
        record = frame.record
        if self.schedule is not None and record.get('status') == 'processed':
            record['arrival_ms'] = arrival / 1e6
            record['queue_ms'] = (start - arrival) / 1e6
            record['end_to_end_ms'] = (finish - arrival) / 1e6
            self.queue_wait.add((start - arrival) / 1e6)
            self.end_to_end.add((finish - arrival) / 1e6)
        if self.on_frame is not None:
            self.on_frame(record)
        frame.record = {}

    def _drop(self, frame: Frame) -> None:
        self.dropped += 1
        if self.on_frame is not None:
            self.on_frame({'index': frame.index, 'stamp_ns': frame.stamp_ns,
                           'bag_ns': frame.bag_ns, 'status': 'dropped'})
        frame.msg = frame.label = None

    def _warn(self, message: str) -> None:
        if message in self.warnings:
            return
        self.warnings.append(message)
        if self._forward_warning is not None:
            self._forward_warning(message)

    def _stage(self, name: str, ms: float) -> None:
        self.stages.setdefault(name, LatencyStats()).add(max(ms, 0.0))

    def _sample_memory(self) -> None:
        now = rss_mb()
        if now is None:
            return
        if 'after_first_frame_mb' not in self.memory:
            self.memory['after_first_frame_mb'] = now
            self.memory['max_mb'] = now
        self.memory['end_mb'] = now
        self.memory['max_mb'] = max(self.memory['max_mb'] or now, now)

    # -- reporting ----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Everything computed so far, as JSON-ready values."""
        source, topics = self.source, self.topics
        report: dict[str, Any] = {'complete': self.complete, 'error': self.error}
        report['bag'] = {
            'path': str(self.bag),
            'kind': source.kind if source else None,
            'note': source.note if source else '',
            'topics': {t.topic: t.msgtype for t in source.topics} if source else {},
            'image_topic': topics.image.topic if topics else None,
            'image_kind': topics.image_kind if topics else None,
            'label_topic': topics.label.topic if topics and topics.label else None,
            'messages_read': self.messages_read,
        }
        span = None
        if self.first_bag_ns is not None and self.last_bag_ns is not None:
            span = (self.last_bag_ns - self.first_bag_ns) / 1e9
        rate_hz = (self.frames_read - 1) / span if span and self.frames_read > 1 else None
        report['bag'].update({'image_span_s': span, 'image_rate_hz': rate_hz})
        report['mode'] = ('as fast as possible' if self.rate is None
                          else f'live at {self.rate:g}x the bag rate (simulated clock)')
        report['rate'] = self.rate
        report['frames'] = {
            'read': self.frames_read, 'processed': self.processed, 'dropped': self.dropped,
            'rejected': self.rejected, 'with_labels': self.with_label,
            'without_labels': self.without_label,
            'unmatched_labels': self.matcher.unmatched_labels if self.matcher else 0,
            'rejections': list(self.rejections),
        }
        latency = {name: stats.summary() for name, stats in self.stages.items()}
        if self.schedule is not None:
            latency['queue_wait'] = self.queue_wait.summary()
            latency['end_to_end'] = self.end_to_end.summary()
        report['latency_ms'] = latency
        report['warmup_ms'] = self.warmup_ms
        if self.schedule is not None:
            report['live'] = self._live_figures(self.schedule, rate_hz)
        memory = dict(self.memory)
        end_mb, first_mb = memory.get('end_mb'), memory.get('after_first_frame_mb')
        if end_mb is not None and first_mb is not None:
            memory['growth_mb'] = end_mb - first_mb
        report['memory'] = memory
        if self.objects is not None:
            counts = self.object_counts
            report['objects'] = {
                **counts, 'per_frame': counts['total'] / counts['frames'] if counts['frames']
                else None, 'params': self.object_settings()}
        if self.evaluator is not None:
            report['metrics'] = self.evaluator.compute()
            report['metrics']['unseen_pixels'] = self.unseen_pixels
        elif topics is not None and topics.label is None:
            report['metrics'] = {'skipped': 'the bag has no label topic (pass --label-topic)'}
        else:
            report['metrics'] = {'skipped': 'no label mapping given'}
        report['warnings'] = list(self.warnings)
        report['seconds'] = self.seconds or (self.timer() - self.started)
        return report

    def _live_figures(self, schedule: LiveSchedule, rate_hz: float | None) -> dict[str, Any]:
        process = self.stages.get('process')
        arrived = schedule.arrived
        figures: dict[str, Any] = {'arrived': arrived, 'processed': schedule.processed,
                                   'dropped': self.dropped}
        figures['drop_ratio'] = self.dropped / arrived if arrived else None
        if process is None or process.count == 0 or arrived < 2:
            return figures
        assert self.first_arrival_ns is not None and self.last_arrival_ns is not None
        span_s = (self.last_arrival_ns - self.first_arrival_ns) / 1e9
        input_hz = (arrived - 1) / span_s if span_s > 0 else None
        mean_s = process.total / process.count / 1e3
        figures['input_rate_hz'] = input_hz
        figures['processing_rate_hz'] = 1.0 / mean_s if mean_s > 0 else None
        if input_hz:
            # A worker busier than the input period takes one frame per processing time.
            figures['predicted_drop_ratio'] = max(0.0, 1.0 - 1.0 / (input_hz * mean_s))
            figures['drop_ratio_minus_predicted'] = (figures['drop_ratio']
                                                     - figures['predicted_drop_ratio'])
        if self.end_to_end.count:
            p99 = self.end_to_end.percentile(99)
            figures['p99_end_to_end_over_mean_process'] = p99 / (process.total / process.count)
            figures['p99_end_to_end_over_p99_process'] = p99 / process.percentile(99)
        return figures
