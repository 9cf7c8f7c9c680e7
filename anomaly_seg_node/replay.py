"""Offline rosbag replay: a bag's camera frames through the FramePipeline, scored and timed.

ROS-free and torch-free. Reads rosbag2 (mcap, sqlite3) and ROS 1 bags with
``rosbags.highlevel.AnyReader``; an mcap file that lost its index (a recording that was killed)
is read record by record up to where it breaks. Finds the camera topic (raw or compressed),
decodes frames with :mod:`anomaly_seg_node.image_codec`, runs :class:`FramePipeline`, matches
label frames to images by header stamp and streams the metrics of :mod:`metrics` (per frame and
pooled) in memory that does not grow with the bag.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
import dataclasses
import math
import mmap
from pathlib import Path
import re
import shutil
import struct
import time
from typing import Any, Protocol

import cv2
import numpy as np

from anomaly_seg_node.errors import (
    AnomalySegError,
    BagError,
    ConfigError,
    DataError,
    ImageDecodeError,
)
from anomaly_seg_node.image_codec import decode_compressed, decode_image, encode_image, to_message
from anomaly_seg_node.metrics import (
    ConfusionMatrix,
    OpenSetConfusion,
    PerImageOOD,
    PooledOOD,
)
from anomaly_seg_node.pipeline import FramePipeline, FrameResult

IMAGE_TYPES = {'sensor_msgs/msg/Image': 'raw', 'sensor_msgs/msg/CompressedImage': 'compressed'}
LABEL_WORDS = ('label', 'ground_truth', 'groundtruth')
LABEL_TOKENS = ('gt',)
# The node's own output topics (a bag written with --write-bag holds them): never the camera.
NODE_OUTPUTS = ('semantic_mask', 'anomaly_score', 'anomaly_mask', 'semantic_color', 'overlay')
# Preferred camera topic names when a bag holds several image topics.
CAMERA_SUFFIXES = ('image_raw', 'image_rect_color', 'image_color', 'image_rect', 'image')
METRIC_OUTPUTS = ('semantic_mask', 'anomaly_score', 'anomaly_mask')
_MCAP_MAGIC = b'\x89MCAP0\r\n'


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
        self._last = None

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
    """One camera frame read from the bag; ``label`` is the matched label message or None."""

    index: int
    bag_ns: int
    stamp_ns: int
    msg: Any
    frame_id: str = ''
    label: Any = None
    record: dict[str, Any] = dataclasses.field(default_factory=dict)


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


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """How label frames map to the artifact: ``lut[raw]`` = train id or ``ignore``;
    pixels whose raw id is in ``anomaly_ids`` are anomalies."""

    lut: np.ndarray  # uint8 [256]
    anomaly_ids: tuple[int, ...]
    name: str
    ignore: int = 255

    @classmethod
    def from_names(cls, raw_names: Mapping[int, str], anomaly_ids: Sequence[int],
                   classes: Sequence[str], name: str, ignore: int = 255) -> LabelSpec:
        """Map raw ids to the artifact's classes by class name; other ids are ignored."""
        lut = np.full(256, ignore, dtype=np.uint8)
        index = {cls_name: i for i, cls_name in enumerate(classes)}
        for raw, raw_name in raw_names.items():
            if raw not in anomaly_ids and raw_name in index:
                lut[int(raw)] = index[raw_name]
        if not (lut != ignore).any():
            raise DataError(
                f'none of the artifact classes {list(classes)} appears among the {name} label '
                f'names {sorted(set(raw_names.values()))}; the labels and the artifact do not '
                'describe the same classes')
        return cls(lut=lut, anomaly_ids=tuple(int(v) for v in anomaly_ids), name=name,
                   ignore=ignore)

    @classmethod
    def train_ids(cls, num_classes: int, ignore: int = 255) -> LabelSpec:
        """Labels already in the artifact's ids 0..K-1; id K marks anomalies."""
        lut = np.full(256, ignore, dtype=np.uint8)
        lut[:num_classes] = np.arange(num_classes, dtype=np.uint8)
        return cls(lut=lut, anomaly_ids=(num_classes,), name='train ids', ignore=ignore)

    def targets(self, raw: np.ndarray, num_classes: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(closed-set target, anomaly target 1/0/ignore, open-set target with K = anomaly)."""
        closed = self.lut[raw]
        is_anomaly = np.isin(raw, self.anomaly_ids)
        anomaly = np.where(is_anomaly, np.uint8(1),
                           np.where(closed != self.ignore, np.uint8(0), np.uint8(self.ignore)))
        open_set = np.where(is_anomaly, np.uint8(num_classes), closed)
        return closed, anomaly.astype(np.uint8), open_set.astype(np.uint8)


class FrameEvaluator:
    """Streams per-frame and pooled anomaly metrics, closed mIoU and open-mIoU."""

    def __init__(self, classes: Sequence[str], labels: LabelSpec, threshold: float,
                 pooled_bits: int = 20) -> None:
        self.classes = list(classes)
        self.labels = labels
        self.threshold = float(threshold)
        k = len(self.classes)
        self.per_image = PerImageOOD()
        self.pooled = PooledOOD(bits=pooled_bits)
        self.closed = ConfusionMatrix(k, labels.ignore)
        self.open_set = OpenSetConfusion(k, self.threshold, labels.ignore)
        self.frames = 0

    def update(self, semantic_mask: np.ndarray, anomaly_score: np.ndarray,
               raw_labels: np.ndarray) -> dict[str, Any]:
        """Add one frame (all at the same resolution); returns its own metrics."""
        k = len(self.classes)
        closed, anomaly, open_set = self.labels.targets(raw_labels, k)
        frame = self.per_image.update(anomaly_score, anomaly)
        self.pooled.update(anomaly_score, anomaly)
        self.closed.update(semantic_mask, closed)
        self.open_set.update(semantic_mask, anomaly_score, open_set)
        self.frames += 1
        out: dict[str, Any] = {'n_anomaly_pixels': int(np.count_nonzero(anomaly == 1))}
        if frame is not None:
            out.update({key: frame[key] for key in ('ap', 'auroc', 'fpr95')})
        return out

    def compute(self) -> dict[str, Any]:
        result: dict[str, Any] = {'frames': self.frames, 'threshold': self.threshold,
                                  'labels': self.labels.name}
        for key, metric in (('per_image', self.per_image), ('pooled', self.pooled),
                            ('closed', self.closed), ('open_set', self.open_set)):
            try:
                result[key] = metric.compute()
            except AnomalySegError as error:  # e.g. no frame with anomalies: say so, go on
                result[key] = {'error': str(error)}
        if 'iou' in result['closed']:
            result['closed']['classes'] = self.classes
        return result


# ---------------------------------------------------------------------------------------------
# Bags.


@dataclasses.dataclass(frozen=True)
class Topic:
    id: int
    topic: str
    msgtype: str
    count: int | None  # messages in the bag, None when the bag does not say


class BagSource(Protocol):
    """What the replay reads; see :func:`open_bag`."""

    path: Path
    kind: str
    is_ros1: bool
    typestore: Any
    topics: list[Topic]
    note: str

    def messages(self, ids: set[int] | None = None) -> Iterator[tuple[Topic, int, bytes]]: ...

    def deserialize(self, raw: bytes, msgtype: str) -> Any: ...

    def close(self) -> None: ...


class _AnyReaderSource:
    def __init__(self, path: Path) -> None:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore

        self.path = path
        self.is_ros1 = path.suffix == '.bag'
        default = get_typestore(Stores.ROS1_NOETIC if self.is_ros1 else Stores.ROS2_HUMBLE)
        self.reader = AnyReader([path], default_typestore=default)
        self.reader.open()
        self.typestore = self.reader.typestore
        self._conns = {conn.id: conn for conn in self.reader.connections}
        self.topics = [Topic(conn.id, conn.topic, conn.msgtype, conn.msgcount)
                       for conn in self.reader.connections]
        if self.is_ros1:
            self.kind = 'ROS 1 bag'
        else:
            storage = {'.mcap': 'mcap', '.db3': 'sqlite3'}
            files = sorted({storage.get(p.suffix, p.suffix) for p in path.iterdir()
                            if p.suffix in storage}) if path.is_dir() else []
            self.kind = f'rosbag2 ({", ".join(files) or "unknown storage"})'
        self.note = ''

    def messages(self, ids: set[int] | None = None) -> Iterator[tuple[Topic, int, bytes]]:
        topics = {t.id: t for t in self.topics}
        conns = [c for i, c in self._conns.items() if ids is None or i in ids]
        for conn, bag_ns, raw in self.reader.messages(connections=conns):
            yield topics[conn.id], bag_ns, raw

    def deserialize(self, raw: bytes, msgtype: str) -> Any:
        return self.reader.deserialize(raw, msgtype)

    def close(self) -> None:
        self.reader.close()


class _McapScanSource:
    """An mcap file read record by record, without its index or summary.

    For a recording that was killed: the file has no footer, so indexed readers refuse it.
    Messages come in file order; where the file breaks, iteration raises BagError.
    """

    def __init__(self, path: Path, file: Path, why: str) -> None:
        from rosbags.typesys import Stores, get_types_from_idl, get_types_from_msg, get_typestore

        self.path, self.file = path, file
        self.is_ros1 = False
        self.kind = 'mcap without index (read record by record)'
        self.note = (f'the indexed reader refused {file.name} ({why}); its records were read in '
                     'file order up to where the file breaks')
        self._schemas: dict[int, tuple[str, str, str]] = {}
        self._channels: dict[int, tuple[str, int]] = {}
        counts: dict[int, int] = {}
        self.scan_error = ''
        try:
            for op, body in self._records():
                if op == 0x05:
                    channel = struct.unpack_from('<H', body)[0]
                    counts[channel] = counts.get(channel, 0) + 1
        except BagError as error:
            self.scan_error = str(error)
            self.note += f'; {error}'
        types: dict[str, Any] = {}
        for name, encoding, text in self._schemas.values():
            if not text:
                continue
            if encoding == 'ros2msg':
                types.update(get_types_from_msg(text, name))
            elif encoding == 'ros2idl':
                types.update(get_types_from_idl(text))
        self.typestore = get_typestore(Stores.EMPTY)
        humble = get_typestore(Stores.ROS2_HUMBLE).fielddefs
        self.typestore.register({**{k: v for k, v in humble.items() if k not in types},
                                 **types})
        self.topics = []
        for channel, (topic, schema) in sorted(self._channels.items()):
            name = self._schemas.get(schema, ('', '', ''))[0]
            self.topics.append(Topic(channel, topic, name, counts.get(channel, 0)))

    def _records(self) -> Iterator[tuple[int, bytes]]:
        """(opcode, body) of every record, chunks opened; BagError where the file breaks."""
        with open(self.file, 'rb') as handle:
            if self.file.stat().st_size < 8 or handle.read(8) != _MCAP_MAGIC:
                raise BagError(f'{self.file} does not start with the mcap magic bytes; it is '
                               'not an mcap file or its beginning is damaged')
            # A map, not a read: a recording may be far larger than memory.
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                yield from self._walk(data, 8, len(data), top=True)

    def _walk(self, data: Any, pos: int, end: int, top: bool, base: int = 0
              ) -> Iterator[tuple[int, bytes]]:
        """Records of ``data[pos:end]``; ``base`` = file offset of ``data`` (for messages)."""
        while pos < end:
            if pos + 9 > end:
                raise self._broken(base + pos, 'a record header is cut off')
            op = data[pos]
            size = struct.unpack_from('<Q', data, pos + 1)[0]
            body_start = pos + 9
            cut = body_start + size > end
            if cut and not (top and op == 0x06):
                raise self._broken(base + pos, f'a record of {size} bytes is cut off')
            body = data[body_start:min(body_start + size, end)]
            pos = body_start + size
            if op == 0x03:  # Schema: id, name, encoding, data
                key = struct.unpack_from('<H', body)[0]
                name, at = _mcap_string(body, 2)
                encoding, at = _mcap_string(body, at)
                text, _ = _mcap_string(body, at)
                self._schemas[key] = (name, encoding, text)
            elif op == 0x04:  # Channel: id, schema id, topic, ...
                key, schema = struct.unpack_from('<HH', body)
                topic, _ = _mcap_string(body, 4)
                self._channels[key] = (topic, schema)
            elif op == 0x05:
                yield op, body
            elif op == 0x06 and top:  # Chunk: times, size, crc, compression, records
                yield from self._chunk(body, cut, base + body_start)
                if cut:
                    raise self._broken(base + body_start - 9, 'the last chunk is cut off')
            elif op == 0x0F:  # Data End: the summary section follows
                return

    def _chunk(self, body: bytes, cut: bool, offset: int) -> Iterator[tuple[int, bytes]]:
        """The records of a chunk; of a cut one, those before the cut when uncompressed."""
        try:
            size_raw = struct.unpack_from('<Q', body, 16)[0]
            compression, at = _mcap_string(body, 28)
            length = struct.unpack_from('<Q', body, at)[0]
        except struct.error:
            return
        records = body[at + 8:at + 8 + length]
        if cut:
            if compression != '':
                return  # a cut compressed chunk cannot be opened
        else:
            records = _decompress(records, compression, size_raw)
        yield from self._walk(records, 0, len(records), top=False,
                              base=offset + at + 8 if compression == '' else offset)

    def _broken(self, pos: int, what: str) -> BagError:
        return BagError(f'{self.file.name} breaks at byte {pos}: {what} (the file is truncated '
                        'or corrupt)')

    def messages(self, ids: set[int] | None = None) -> Iterator[tuple[Topic, int, bytes]]:
        topics = {t.id: t for t in self.topics}
        for _, body in self._records():
            channel, _, log_time = struct.unpack_from('<HIQ', body)
            if channel in topics and (ids is None or channel in ids):
                yield topics[channel], log_time, body[22:]

    def deserialize(self, raw: bytes, msgtype: str) -> Any:
        return self.typestore.deserialize_cdr(raw, msgtype)

    def close(self) -> None:
        pass


def _mcap_string(body: bytes, at: int) -> tuple[str, int]:
    length = struct.unpack_from('<I', body, at)[0]
    return body[at + 4:at + 4 + length].decode('utf-8', 'replace'), at + 4 + length


def _decompress(data: bytes, compression: str, size: int) -> bytes:
    if compression == '':
        raw = data
    elif compression == 'zstd':
        try:
            from compression import zstd  # type: ignore[import-not-found]  # Python 3.14
        except ImportError:
            from backports import zstd  # type: ignore[import-not-found,no-redef]
        raw = zstd.decompress(data)
    elif compression == 'lz4':
        from lz4.frame import decompress  # type: ignore[import-untyped]

        raw = decompress(data)
    else:
        raise BagError(f'mcap chunk compression {compression!r} is not supported; expected '
                       'none, zstd or lz4')
    if len(raw) != size:
        raise BagError(f'an mcap chunk decompresses to {len(raw)} bytes, expected {size}; the '
                       'file is corrupt')
    return raw


def open_bag(path: str | Path) -> BagSource:
    """Open a rosbag2 folder (mcap or sqlite3), a ROS 1 ``.bag`` or a bare ``.mcap`` file.

    An mcap recording without index or footer (a killed recorder) is read record by record.
    Anything else unreadable raises BagError saying what is wrong.
    """
    from rosbags.highlevel import AnyReaderError

    path = Path(path)
    if not path.exists():
        raise BagError(f'bag {path} does not exist; pass a rosbag2 folder, a ROS 1 .bag file '
                       'or an .mcap file')
    mcaps = sorted(path.glob('*.mcap')) if path.is_dir() else (
        [path] if path.suffix == '.mcap' else [])
    if path.is_file() and path.suffix == '.mcap':
        return _McapScanSource(path, path, 'a bare .mcap file has no rosbag2 metadata.yaml')
    if path.is_dir() and not (path / 'metadata.yaml').exists() and len(mcaps) == 1:
        return _McapScanSource(path, mcaps[0], 'metadata.yaml is missing')
    try:
        return _AnyReaderSource(path)
    except (AnyReaderError, OSError, ValueError, KeyError) as error:
        why = f'{type(error).__name__}: {error}'
        if len(mcaps) == 1:
            return _McapScanSource(path, mcaps[0], why)
        raise BagError(
            f'cannot open bag {path}: {why}. It is truncated, corrupt or not a bag; for a '
            'rosbag2 recording that did not finish try `ros2 bag reindex`, or re-record') from None


@dataclasses.dataclass(frozen=True)
class BagTopics:
    image: Topic
    image_kind: str  # 'raw' | 'compressed'
    label: Topic | None


def choose_topics(topics: Sequence[Topic], image_topic: str | None = None,
                  label_topic: str | None = None) -> BagTopics:
    """The camera topic (given or found: raw preferred over compressed) and the label topic."""
    listing = ', '.join(f'{t.topic} ({t.msgtype})' for t in topics) or 'none'
    by_name = {t.topic: t for t in topics}

    def is_label(name: str) -> bool:
        low = name.lower()
        tokens = re.split(r'[/_.-]', low)
        return any(w in low for w in LABEL_WORDS) or any(t in tokens for t in LABEL_TOKENS)

    def is_output(name: str) -> bool:
        return name.rstrip('/').rsplit('/', 1)[-1] in NODE_OUTPUTS

    if image_topic is not None:
        image = by_name.get(image_topic)
        if image is None or image.msgtype not in IMAGE_TYPES:
            found = 'is not in the bag' if image is None else f'has type {image.msgtype}'
            raise BagError(f'image topic {image_topic} {found}; expected a sensor_msgs/Image or '
                           f'CompressedImage topic. The bag has: {listing}')
    else:
        candidates = [t for t in topics if t.msgtype in IMAGE_TYPES and not is_label(t.topic)
                      and not is_output(t.topic) and t.topic != label_topic]
        if not candidates:
            raise BagError(f'no camera topic (sensor_msgs/Image or CompressedImage) in the bag; '
                           f'it has: {listing}. Pass --image-topic if one is named like a label '
                           'topic')

        def rank(t: Topic) -> tuple[int, int, str]:
            suffix = next((i for i, s in enumerate(CAMERA_SUFFIXES)
                           if t.topic.rstrip('/').endswith(s)), len(CAMERA_SUFFIXES))
            return (0 if IMAGE_TYPES[t.msgtype] == 'raw' else 1, suffix, t.topic)

        image = min(candidates, key=rank)
    label = None
    if label_topic is not None:
        label = by_name.get(label_topic)
        if label is None or label.msgtype != 'sensor_msgs/msg/Image':
            found = 'is not in the bag' if label is None else f'has type {label.msgtype}'
            raise BagError(f'label topic {label_topic} {found}; expected a mono8 '
                           f'sensor_msgs/Image topic of class ids. The bag has: {listing}')
    else:
        found = [t for t in topics if t.msgtype == 'sensor_msgs/msg/Image'
                 and is_label(t.topic) and t.topic != image.topic]
        if len(found) > 1:
            raise BagError(f'several label-like topics: {[t.topic for t in found]}; choose one '
                           'with --label-topic')
        label = found[0] if found else None
    if label is not None and label.topic == image.topic:
        raise BagError(f'the image and label topics are the same ({image.topic}); pass '
                       '--label-topic with the topic of class-id frames')
    return BagTopics(image=image, image_kind=IMAGE_TYPES[image.msgtype], label=label)


def stamp_ns(msg: Any) -> int:
    """The header stamp of a message in ns (ROS 1 and ROS 2 messages alike)."""
    stamp = msg.header.stamp
    return int(stamp.sec) * 10 ** 9 + int(stamp.nanosec)


# ---------------------------------------------------------------------------------------------
# Sinks: what else the replay writes while it runs.


class ReplaySink(Protocol):
    def on_input(self, topic: Topic, bag_ns: int, raw: bytes, source: BagSource) -> None: ...

    def on_result(self, frame: Frame, result: FrameResult) -> None: ...


class VideoSink:
    """The overlay of every processed frame as an mp4 (OpenCV, fourcc 'mp4v').

    Frames go to a hidden partial file that ``close()`` moves into place. The frame rate is the
    bag-time rate of the processed frames (so a live replay with drops plays in real time too),
    measured between the first two of them, unless ``fps`` is given. A writer failure is
    recorded in ``info()`` and stops the video; it never stops the replay.
    """

    def __init__(self, path: str | Path, fps: float | None = None) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(f'.{self.path.stem}.partial{self.path.suffix}')
        self.fps = fps
        self.frames = 0
        self.error: str | None = None
        self._writer: Any = None
        self._held: tuple[int, np.ndarray] | None = None  # the first frame, until fps is known

    def on_input(self, topic: Topic, bag_ns: int, raw: bytes, source: BagSource) -> None:
        pass

    def on_result(self, frame: Frame, result: FrameResult) -> None:
        if self.error is not None or result.overlay is None:
            return
        bgr = cv2.cvtColor(result.overlay, cv2.COLOR_RGB2BGR)
        if self._writer is None:
            if self._held is None and self.fps is None:
                self._held = (frame.bag_ns, bgr)
                return
            if self.fps is None:
                gap = (frame.bag_ns - self._held[0]) / 1e9
                self.fps = 1.0 / gap if gap > 0 else 10.0
            self._open(bgr.shape[1], bgr.shape[0])
            if self._held is not None:
                self._write(self._held[1])
                self._held = None
        self._write(bgr)

    def _open(self, width: int, height: int) -> None:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.fps = float(min(max(self.fps or 10.0, 0.1), 240.0))
        writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*'mp4v'), self.fps,
                                 (width, height))
        if not writer.isOpened():
            self.error = (f'OpenCV could not open an mp4v video writer for {self.partial}; this '
                          'OpenCV build lacks the codec or the folder is not writable')
            return
        self._writer = writer
        self._size = (height, width)

    def _write(self, bgr: np.ndarray) -> None:
        if self._writer is None:
            return
        if bgr.shape[:2] != self._size:
            self.error = (f'frame of {bgr.shape[1]}x{bgr.shape[0]} in a {self._size[1]}x'
                          f'{self._size[0]} video: the camera resolution changed; the video '
                          'stops there')
            return
        self._writer.write(np.ascontiguousarray(bgr))
        self.frames += 1

    def close(self) -> dict[str, Any]:
        if self._writer is None and self._held is not None and self.error is None:
            self.fps = self.fps or 10.0
            self._open(self._held[1].shape[1], self._held[1].shape[0])
            self._write(self._held[1])
            self._held = None
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self.frames and self.partial.exists():
            self.partial.replace(self.path)
        else:
            self.partial.unlink(missing_ok=True)
        return {'path': str(self.path) if self.frames else None, 'frames': self.frames,
                'fps': self.fps, 'codec': 'mp4v', 'error': self.error}


class BagSink:
    """A rosbag2 with the input's messages and the node's outputs of every processed frame.

    Outputs go to ``{namespace}/{output}`` (sensor_msgs/Image: semantic_mask and anomaly_mask
    mono8, anomaly_score 32FC1, semantic_color and overlay rgb8), with the input image's header
    and bag time. The input topics of a rosbag2 are copied byte for byte; those of a ROS 1 bag
    are not (their messages are not ROS 2 messages). The bag is written beside its final place
    and moved there by ``close()``; a write failure is recorded and stops the bag only.
    """

    def __init__(self, path: str | Path, namespace: str = '/anomaly_seg',
                 storage: str = 'mcap') -> None:
        from rosbags.rosbag2.enums import StoragePlugin

        if storage not in ('mcap', 'sqlite3'):
            raise BagError(f'output bag storage must be mcap or sqlite3, got {storage!r}')
        self.path = Path(path)
        self.partial = self.path.with_name(f'.{self.path.name}.partial')
        self.namespace = '/' + namespace.strip('/') if namespace.strip('/') else ''
        self.plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
        self.storage = storage
        self.error: str | None = None
        self.inputs_copied: bool | None = None
        self.counts: dict[str, int] = {}
        self._writer: Any = None
        self._inputs: dict[int, Any] = {}
        self._outputs: dict[str, Any] = {}
        self._ts: Any = None

    def _open(self) -> None:
        from rosbags.rosbag2 import Writer
        from rosbags.typesys import Stores, get_typestore

        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._ts = get_typestore(Stores.ROS2_HUMBLE)
        self._writer = Writer(self.partial, version=8, storage_plugin=self.plugin)
        self._writer.open()

    def _guard(self, action: Callable[[], None]) -> None:
        if self.error is not None:
            return
        try:
            if self._writer is None:
                self._open()
            action()
        except Exception as error:  # disk full, bad type...: stop this bag, not the replay
            self.error = f'writing the output bag failed: {type(error).__name__}: {error}'

    def on_input(self, topic: Topic, bag_ns: int, raw: bytes, source: BagSource) -> None:
        self.inputs_copied = not source.is_ros1
        if source.is_ros1:
            return

        def copy() -> None:
            conn = self._inputs.get(topic.id)
            if conn is None:
                conn = self._writer.add_connection(topic.topic, topic.msgtype,
                                                   typestore=source.typestore)
                self._inputs[topic.id] = conn
            self._writer.write(conn, bag_ns, raw)
            self.counts[topic.topic] = self.counts.get(topic.topic, 0) + 1

        self._guard(copy)

    def on_result(self, frame: Frame, result: FrameResult) -> None:
        outputs = (('semantic_mask', 'mono8'), ('anomaly_score', '32FC1'),
                   ('anomaly_mask', 'mono8'), ('semantic_color', 'rgb8'), ('overlay', 'rgb8'))

        def write() -> None:
            ts = self._ts
            types = ts.types
            header = types['std_msgs/msg/Header'](
                stamp=types['builtin_interfaces/msg/Time'](sec=frame.stamp_ns // 10 ** 9,
                                                           nanosec=frame.stamp_ns % 10 ** 9),
                frame_id=frame.frame_id)
            image_cls = types['sensor_msgs/msg/Image']
            for name, encoding in outputs:
                array = getattr(result, name)
                if array is None:
                    continue
                msg = to_message(encode_image(array, encoding, header), image_cls)
                topic = f'{self.namespace}/{name}'
                conn = self._outputs.get(topic)
                if conn is None:
                    conn = self._writer.add_connection(topic, image_cls.__msgtype__,
                                                       typestore=ts)
                    self._outputs[topic] = conn
                self._writer.write(conn, frame.bag_ns, ts.serialize_cdr(msg, msg.__msgtype__))
                self.counts[topic] = self.counts.get(topic, 0) + 1

        self._guard(write)

    def close(self) -> dict[str, Any]:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as error:  # the replay's results matter more than this bag
                self.error = self.error or f'closing the output bag failed: {error}'
            self._writer = None
        written = self.partial.exists() and self.error is None and bool(self._outputs)
        if written:
            if self.path.exists():
                shutil.rmtree(self.path)
            self.partial.rename(self.path)
        elif self.partial.exists():
            shutil.rmtree(self.partial, ignore_errors=True)
        return {'path': str(self.path) if written else None, 'storage': self.storage,
                'output_topics': sorted(self._outputs), 'messages': dict(self.counts),
                'inputs_copied': self.inputs_copied, 'error': self.error}


# ---------------------------------------------------------------------------------------------
# The replay.


class Replay:
    """One pass over a bag. ``run()`` raises BagError on a broken bag, missing topics or labels
    of another size; ``report()`` then still holds everything computed so far."""

    def __init__(self, bag: str | Path, pipeline: FramePipeline, *,
                 image_topic: str | None = None, label_topic: str | None = None,
                 labels: LabelSpec | None = None, rate: float | None = None,
                 max_frames: int | None = None, want: Sequence[str] = METRIC_OUTPUTS,
                 sinks: Sequence[ReplaySink] = (),
                 on_frame: Callable[[dict[str, Any]], None] | None = None,
                 on_progress: Callable[[int, int | None], None] | None = None,
                 timer: Callable[[], float] = time.perf_counter,
                 warmup: int = 1, pooled_bits: int = 20) -> None:
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise ConfigError(f'--rate must be a positive number (1.0 = real time), got {rate}')
        if max_frames is not None and max_frames < 1:
            raise ConfigError(f'--max-frames must be at least 1, got {max_frames}')
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
        self._warmups = max(int(warmup), 0)
        self.warmup_ms: float | None = None
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
        return self.report()

    def _run(self) -> None:
        self.memory['start_mb'] = rss_mb()
        self.source = source = open_bag(self.bag)
        self.topics = topics = choose_topics(source.topics, self.image_topic, self.label_topic)
        if topics.label is not None and self.label_spec is not None:
            self.evaluator = FrameEvaluator(self.pipeline.classes, self.label_spec,
                                            self.pipeline.threshold, self.pooled_bits)
            self.matcher = StampMatcher()
        if self.rate is not None:
            self.schedule = LiveSchedule(self._process, self._done, self._drop)
        total = topics.image.count
        if self.max_frames is not None and total is not None:
            total = min(total, self.max_frames)
        ids = None if self.sinks else {topics.image.id} | (
            {topics.label.id} if self.matcher is not None and topics.label else set())
        stream = source.messages(ids)
        seen_ns = None
        while True:
            past_limit = self.max_frames is not None and self.frames_read >= self.max_frames
            if past_limit and (self.matcher is None or self.matcher.waiting == 0 or (
                    seen_ns - self.last_read_ns > self.matcher.window_ns)):
                break  # no label can still arrive for the frames that wait
            try:
                topic, bag_ns, raw = next(stream)
                seen_ns = bag_ns
                msg = None
                wanted = (topic.id == topics.image.id and not past_limit) or (
                    self.matcher is not None and topic.id == topics.label.id)
                if wanted:
                    msg = source.deserialize(raw, topic.msgtype)
                    stamp = stamp_ns(msg)
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
            else:
                ready = self.matcher.add_label(stamp, bag_ns, msg)
            for frame in ready:
                self._arrive(frame)
        self._drain()
        if self.frames_read == 0:
            raise BagError(f'the image topic {topics.image.topic} of bag {self.bag} holds no '
                           'message; record the camera topic or pick another with --image-topic')

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
        if self.schedule is None:
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
        self._stage('decode', decode_s * 1e3)
        for stage, ms in result.timings_ms.items():
            self._stage(stage, ms)
        self._stage('process', process_s * 1e3)
        record.update({'status': 'processed',
                       'process_ms': process_s * 1e3,
                       'timings_ms': {k: round(v, 3) for k, v in result.timings_ms.items()}})
        self.processed += 1
        self._evaluate(frame, rgb.shape[:2], result)
        for sink in self.sinks:
            sink.on_result(frame, result)
        self._sample_memory()
        return int(round(process_s * 1e9))

    def _evaluate(self, frame: Frame, size: tuple[int, int], result: FrameResult) -> None:
        if self.evaluator is None:
            return
        if frame.label is None:
            self.without_label += 1
            return
        try:
            raw = decode_image(frame.label, 'native')
        except ImageDecodeError as error:
            raise BagError(f'label frame at stamp {frame.stamp_ns} on {self.topics.label.topic} '
                           f'cannot be decoded: {error}') from None
        frame.label = None
        if raw.ndim != 2 or raw.dtype != np.uint8:
            raise BagError(
                f'label frame at stamp {frame.stamp_ns} on {self.topics.label.topic} is '
                f'{raw.dtype} with shape {raw.shape}; expected mono8 (8UC1) class ids, one '
                'channel')
        if raw.shape != tuple(size):
            raise BagError(
                f'label frame at stamp {frame.stamp_ns} on {self.topics.label.topic} is '
                f'{raw.shape[0]}x{raw.shape[1]} but its image on {self.topics.image.topic} is '
                f'{size[0]}x{size[1]}; labels must have the camera resolution (record them at '
                'the image size or pass the matching --label-topic)')
        self.with_label += 1
        frame.record.update(self.evaluator.update(result.semantic_mask, result.anomaly_score,
                                                  raw))

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
            report['live'] = self._live_figures(rate_hz)
        memory = dict(self.memory)
        if 'end_mb' in memory and 'after_first_frame_mb' in memory:
            memory['growth_mb'] = memory['end_mb'] - memory['after_first_frame_mb']
        report['memory'] = memory
        if self.evaluator is not None:
            report['metrics'] = self.evaluator.compute()
        elif topics is not None and topics.label is None:
            report['metrics'] = {'skipped': 'the bag has no label topic (pass --label-topic)'}
        else:
            report['metrics'] = {'skipped': 'no label mapping given'}
        report['seconds'] = self.seconds or (self.timer() - self.started)
        return report

    def _live_figures(self, rate_hz: float | None) -> dict[str, Any]:
        process = self.stages.get('process')
        arrived = self.schedule.arrived
        figures: dict[str, Any] = {'arrived': arrived, 'processed': self.schedule.processed,
                                   'dropped': self.dropped}
        figures['drop_ratio'] = self.dropped / arrived if arrived else None
        if process is None or process.count == 0 or arrived < 2:
            return figures
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
