"""What the replay writes besides its report: the overlay video, a contact sheet, an output bag.

ROS-free and torch-free sinks of :class:`anomaly_seg_node.replay.Replay`; neither ever stops
the replay (a write failure is recorded and stops that output only). When the replay finds
anomaly objects, the video and the contact sheet draw their boxes (`objects.draw_objects`) and
the bag holds them as vision_msgs/msg/Detection2DArray.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
import shutil
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np

from anomaly_seg_node.artifact import atomic_write_bytes
from anomaly_seg_node.bag_reader import BagSource, Topic
from anomaly_seg_node.errors import BagError
from anomaly_seg_node.image_codec import encode_image, to_message
from anomaly_seg_node.objects import OBJECTS_TOPIC, detection_array, draw_objects
from anomaly_seg_node.pipeline import ENCODINGS, OUTPUTS, FrameResult

if TYPE_CHECKING:
    from anomaly_seg_node.replay import Frame


class ReplaySink(Protocol):
    def on_input(self, topic: Topic, bag_ns: int, raw: bytes, source: BagSource) -> None: ...

    def on_result(self, frame: Frame, result: FrameResult) -> None: ...


class VideoSink:
    """The overlay of every processed frame as an mp4 (OpenCV, fourcc 'mp4v').

    Frames go to a hidden partial file that ``close()`` moves into place. The frame rate is the
    bag-time rate of the processed frames (so a live replay with drops plays in real time too),
    measured between the first two of them, unless ``fps`` is given. The frame's anomaly
    objects, when found, are drawn as boxes with their confidence. A writer failure is recorded
    in ``info()`` and stops the video; it never stops the replay.
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
        overlay = result.overlay
        if frame.objects:  # on a copy: the overlay is also an output (the bag's)
            overlay = draw_objects(overlay.copy(), frame.objects,
                                   source_hw=_map_hw(result, overlay))
        bgr = cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR)
        if self._writer is None:
            if self.fps is None:
                if self._held is None:
                    self._held = (frame.bag_ns, bgr)
                    return
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
        writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter.fourcc(*'mp4v'), self.fps,
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


class ContactSheetSink:
    """A PNG of evenly spaced processed frames, one row each: the camera image | the overlay
    (semantic colours, predicted anomalies in the anomaly colour, the anomaly objects' boxes when
    the replay finds them) | the anomaly score as a heat map with the labelled anomalies outlined
    in white (when the bag has labels).

    Memory stays bounded on any bag length: every ``stride``-th frame is kept and, when
    2 x ``rows`` are held, every other one is dropped and the stride doubled. The heat maps of
    one sheet share one colour scale (the 1st to 99.5th percentile of the kept scores).
    """

    def __init__(self, path: str | Path, rows: int = 6, tile_width: int = 320) -> None:
        if rows < 1 or tile_width < 16:
            raise ValueError(f'rows must be >= 1 and tile_width >= 16, got {rows}, {tile_width}')
        self.path = Path(path)
        self.rows, self.tile_width = rows, tile_width
        self.error: str | None = None
        self._kept: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._seen = 0
        self._stride = 1

    def on_input(self, topic: Topic, bag_ns: int, raw: bytes, source: BagSource) -> None:
        pass

    def on_result(self, frame: Frame, result: FrameResult) -> None:
        image, score = frame.image, result.anomaly_score
        if image is None or score is None or result.overlay is None:
            return
        seen, self._seen = self._seen, self._seen + 1
        if seen % self._stride:
            return
        size = (self.tile_width, max(1, round(image.shape[0] * self.tile_width / image.shape[1])))
        target = frame.anomaly_target
        outline = None
        if target is not None:
            outline = cv2.resize((target == 1).astype(np.uint8), size,
                                 interpolation=cv2.INTER_NEAREST)
        overlay = cv2.resize(result.overlay, size, interpolation=cv2.INTER_AREA)
        if frame.objects:  # drawn at the tile size: lines stay visible
            draw_objects(overlay, frame.objects, thickness=1,
                         source_hw=_map_hw(result, result.overlay))
        self._kept.append((frame.index, cv2.resize(image, size, interpolation=cv2.INTER_AREA),
                           overlay, cv2.resize(score, size, interpolation=cv2.INTER_AREA),
                           outline))
        if len(self._kept) >= 2 * self.rows:
            self._kept = self._kept[::2]
            self._stride *= 2

    def close(self) -> dict[str, Any]:
        if not self._kept:
            return {'path': None, 'frames': [], 'error': self.error}
        pick = np.unique(np.linspace(0, len(self._kept) - 1, self.rows).round().astype(int))
        rows = [self._kept[i] for i in pick]
        scores = np.concatenate([row[3][np.isfinite(row[3])] for row in rows])
        low, high = (np.percentile(scores, [1.0, 99.5]) if scores.size else (0.0, 1.0))
        sheet = np.concatenate([self._row(row, low, high) for row in rows])
        header = self._header(sheet.shape[1])
        ok, png = cv2.imencode('.png', cv2.cvtColor(np.concatenate([header, sheet]),
                                                    cv2.COLOR_RGB2BGR))
        if not ok:
            self.error = 'OpenCV could not encode the contact sheet as PNG'
            return {'path': None, 'frames': [], 'error': self.error}
        try:
            atomic_write_bytes(self.path, png.tobytes())
        except OSError as error:
            self.error = f'cannot write {self.path}: {error}'
            return {'path': None, 'frames': [], 'error': self.error}
        return {'path': str(self.path), 'frames': [int(row[0]) for row in rows],
                'score_range': [float(low), float(high)], 'error': None}

    def _row(self, row: tuple, low: float, high: float) -> np.ndarray:
        index, image, overlay, score, outline = row
        scaled = np.clip((np.nan_to_num(score, nan=low) - low) / max(high - low, 1e-12), 0, 1)
        heat = cv2.cvtColor(cv2.applyColorMap((scaled * 255).astype(np.uint8),
                                              cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
        if outline is not None:
            contours, _ = cv2.findContours(outline, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(heat, contours, -1, (255, 255, 255), 1)
        image = image.copy()
        cv2.putText(image, f'frame {index}', (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (255, 255, 255), 1, cv2.LINE_AA)
        gap = np.zeros((image.shape[0], 4, 3), np.uint8)
        strip = np.concatenate([image, gap, overlay, gap, heat], axis=1)
        return np.concatenate([strip, np.zeros((4, strip.shape[1], 3), np.uint8)])

    def _header(self, width: int) -> np.ndarray:
        header = np.zeros((24, width, 3), np.uint8)
        titles = ('camera', 'semantic colours, anomaly mask, objects',
                  'anomaly score (white: labelled anomaly)')
        for i, title in enumerate(titles):
            cv2.putText(header, title, (6 + i * (self.tile_width + 4), 16),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
        return header


# vision_msgs 4.1 (ROS 2 Humble and Jazzy; ros-perception/vision_msgs, tag 4.1.1,
# vision_msgs/msg/*.msg, comments dropped): rosbags' typestores lack the package.
VISION_MSGS = {
    'vision_msgs/msg/Point2D': 'float64 x\nfloat64 y\n',
    'vision_msgs/msg/Pose2D': 'vision_msgs/Point2D position\nfloat64 theta\n',
    'vision_msgs/msg/BoundingBox2D': 'vision_msgs/Pose2D center\nfloat64 size_x\nfloat64 size_y\n',
    'vision_msgs/msg/ObjectHypothesis': 'string class_id\nfloat64 score\n',
    'vision_msgs/msg/ObjectHypothesisWithPose': 'ObjectHypothesis hypothesis\n'
                                                'geometry_msgs/PoseWithCovariance pose\n',
    'vision_msgs/msg/Detection2D': 'std_msgs/Header header\nObjectHypothesisWithPose[] results\n'
                                   'BoundingBox2D bbox\nstring id\n',
    'vision_msgs/msg/Detection2DArray': 'std_msgs/Header header\nDetection2D[] detections\n',
}
DETECTIONS_TYPE = 'vision_msgs/msg/Detection2DArray'


def register_vision_msgs(typestore: Any) -> None:
    """Add the vision_msgs types of `VISION_MSGS` to a rosbags typestore lacking them."""
    from rosbags.typesys import get_types_from_msg

    if DETECTIONS_TYPE in typestore.types:
        return
    types: dict[str, Any] = {}
    for name, text in VISION_MSGS.items():
        types.update(get_types_from_msg(text, name))
    typestore.register(types)


class BagSink:
    """A rosbag2 with the input's messages and the node's outputs of every processed frame.

    Outputs go to ``{namespace}/{output}`` (sensor_msgs/Image: semantic_mask and anomaly_mask
    mono8, anomaly_score 32FC1, semantic_color and overlay rgb8), with the input image's header
    and bag time; when the replay finds anomaly objects, each processed frame also gets a
    vision_msgs/msg/Detection2DArray on ``{namespace}/anomaly_objects``
    (`objects.detection_array`, boxes in input pixels; empty when the frame has none). The input
    topics of a rosbag2 are copied byte for byte; those of a ROS 1 bag are not (their messages
    are not ROS 2 messages). The bag is written beside its final place and moved there by
    ``close()``; a write failure is recorded and stops the bag only.
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
        register_vision_msgs(self._ts)
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
        def write() -> None:
            ts = self._ts
            types = ts.types
            header = types['std_msgs/msg/Header'](
                stamp=types['builtin_interfaces/msg/Time'](sec=frame.stamp_ns // 10 ** 9,
                                                           nanosec=frame.stamp_ns % 10 ** 9),
                frame_id=frame.frame_id)
            image_cls = types['sensor_msgs/msg/Image']
            for name in OUTPUTS:
                array = getattr(result, name)
                if array is None:
                    continue
                self._put(f'{self.namespace}/{name}', frame.bag_ns,
                          to_message(encode_image(array, ENCODINGS[name], header), image_cls))
            if frame.objects is not None:
                scale = (1.0, 1.0)
                if frame.image is not None:
                    map_h, map_w = _map_hw(result, frame.image)
                    scale = (frame.image.shape[1] / map_w, frame.image.shape[0] / map_h)
                self._put(f'{self.namespace}/{OBJECTS_TOPIC}', frame.bag_ns,
                          detection_array(types, header, [obj.box for obj in frame.objects],
                                          [obj.confidence for obj in frame.objects], scale))

        self._guard(write)

    def _put(self, topic: str, bag_ns: int, msg: Any) -> None:
        conn = self._outputs.get(topic)
        if conn is None:
            conn = self._writer.add_connection(topic, msg.__msgtype__, typestore=self._ts)
            self._outputs[topic] = conn
        self._writer.write(conn, bag_ns, self._ts.serialize_cdr(msg, msg.__msgtype__))
        self.counts[topic] = self.counts.get(topic, 0) + 1

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


def _map_hw(result: FrameResult, fallback: np.ndarray) -> tuple[int, int]:
    """(height, width) of the maps the objects were found on: the outputs' size."""
    shape = result.anomaly_score.shape if result.anomaly_score is not None else fallback.shape
    return int(shape[0]), int(shape[1])
