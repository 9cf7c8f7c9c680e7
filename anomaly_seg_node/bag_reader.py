"""rosbag reading for the replay: ROS 1 and rosbag2 (mcap, sqlite3) bags and topic choice.

ROS-free and torch-free. ``open_bag`` reads a bag with ``rosbags.highlevel.AnyReader``; an mcap
file that lost its index (a recording that was killed) is read record by record up to where it
breaks. ``choose_topics`` finds the camera topic (raw or compressed) and a label topic.

Bags of ROS 2 Dashing and Eloquent name message types without ``/msg/`` (``sensor_msgs/Image``);
their topics are listed and deserialised under the ``/msg/`` name (:func:`ros2_type_name`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import mmap
from pathlib import Path
import re
import struct
from typing import Any, Protocol

from anomaly_seg_node.errors import BagError

IMAGE_TYPES = {'sensor_msgs/msg/Image': 'raw', 'sensor_msgs/msg/CompressedImage': 'compressed'}
LABEL_WORDS = ('label', 'ground_truth', 'groundtruth')
LABEL_TOKENS = ('gt',)
# The node's own output topics (a bag written with --write-bag holds them): never the camera.
NODE_OUTPUTS = ('semantic_mask', 'anomaly_score', 'anomaly_mask', 'semantic_color', 'overlay')
# Preferred camera topic names when a bag holds several image topics.
CAMERA_SUFFIXES = ('image_raw', 'image_rect_color', 'image_color', 'image_rect', 'image')
_MCAP_MAGIC = b'\x89MCAP0\r\n'


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


def ros2_type_name(name: str) -> str:
    """``pkg/Type`` (ROS 2 Dashing / Eloquent bags) as ``pkg/msg/Type``; other names as given."""
    package, sep, rest = name.partition('/')
    if sep and package and rest and '/' not in rest:
        return f'{package}/msg/{rest}'
    return name


def _old_names_note(names: Sequence[str]) -> str:
    old = sorted({name for name in names if ros2_type_name(name) != name})
    if not old:
        return ''
    return (f'message types named without /msg/ (a ROS 2 Dashing or Eloquent bag) are read as '
            f'their /msg/ types: {", ".join(f"{n} -> {ros2_type_name(n)}" for n in old)}')


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
        self.topics = [Topic(conn.id, conn.topic, ros2_type_name(conn.msgtype), conn.msgcount)
                       for conn in self.reader.connections]
        if self.is_ros1:
            self.kind = 'ROS 1 bag'
        else:
            storage = {'.mcap': 'mcap', '.db3': 'sqlite3'}
            files = sorted({storage.get(p.suffix, p.suffix) for p in path.iterdir()
                            if p.suffix in storage}) if path.is_dir() else []
            self.kind = f'rosbag2 ({", ".join(files) or "unknown storage"})'
        self.note = _old_names_note([conn.msgtype for conn in self.reader.connections])

    def messages(self, ids: set[int] | None = None) -> Iterator[tuple[Topic, int, bytes]]:
        topics = {t.id: t for t in self.topics}
        conns = [c for i, c in self._conns.items() if ids is None or i in ids]
        for conn, bag_ns, raw in self.reader.messages(connections=conns):
            yield topics[conn.id], bag_ns, raw

    def deserialize(self, raw: bytes, msgtype: str) -> Any:
        # rosbags registers types under their /msg/ names, also those a bag names without
        return self.reader.deserialize(raw, ros2_type_name(msgtype))

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
            self.topics.append(Topic(channel, topic, ros2_type_name(name),
                                     counts.get(channel, 0)))
        if old := _old_names_note([name for name, _, _ in self._schemas.values()]):
            self.note += f'; {old}'

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
        return self.typestore.deserialize_cdr(raw, ros2_type_name(msgtype))

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
        label_like = [t for t in topics if t.msgtype == 'sensor_msgs/msg/Image'
                      and is_label(t.topic) and t.topic != image.topic]
        if len(label_like) > 1:
            raise BagError(f'several label-like topics: {[t.topic for t in label_like]}; choose '
                           'one with --label-topic')
        label = label_like[0] if label_like else None
    if label is not None and label.topic == image.topic:
        raise BagError(f'the image and label topics are the same ({image.topic}); pass '
                       '--label-topic with the topic of class-id frames')
    return BagTopics(image=image, image_kind=IMAGE_TYPES[image.msgtype], label=label)
