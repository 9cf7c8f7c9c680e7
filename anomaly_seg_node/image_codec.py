"""sensor_msgs/Image and CompressedImage <-> numpy, without ROS and without cv_bridge.

Messages are read by duck typing on their fields, so rclpy messages (``data`` is an
``array.array('B')``) and ``rosbags`` messages (``data`` is a numpy uint8 array) both work.

What the network gets (``want='rgb8'``): colour encodings become RGB uint8 ``[H, W, 3]``; mono8
and 8UC1 become grey replicated into the three channels; mono16 and 16UC1 keep their high byte
(``value >> 8``) and are replicated the same way. ``8UC3`` is taken as BGR, OpenCV's order.
``want='native'`` returns the message's own layout instead (``[H, W]`` for one channel,
``[H, W, C]`` otherwise, uint8, uint16 or float32 in native byte order).
"""

import array
from collections.abc import Callable
import dataclasses
import sys
from typing import Any

import cv2
import numpy as np

from anomaly_seg_node.errors import ImageDecodeError

MAX_SIDE = 16384  # per side, so at most 2**28 pixels

# encoding -> (channels, bytes per channel, numpy kind of one channel)
_LAYOUTS: dict[str, tuple[int, int, str]] = {
    'rgb8': (3, 1, 'u1'), 'bgr8': (3, 1, 'u1'), 'rgba8': (4, 1, 'u1'), 'bgra8': (4, 1, 'u1'),
    'mono8': (1, 1, 'u1'), '8UC1': (1, 1, 'u1'), '8UC3': (3, 1, 'u1'),
    'mono16': (1, 2, 'u2'), '16UC1': (1, 2, 'u2'), '32FC1': (1, 4, 'f4'),
}
DECODABLE = tuple(_LAYOUTS)
ENCODABLE = ('mono8', '32FC1', 'rgb8')
_UNSUPPORTED_PREFIXES = ('bayer_', 'yuv', 'uyvy', 'yuyv', 'nv12', 'nv21', 'nv24', 'i420')
_WANTS = ('rgb8', 'native')


@dataclasses.dataclass
class ImageFields:
    """The fields of a sensor_msgs/Image; ``data`` is a contiguous 1-D uint8 array."""

    header: Any
    height: int
    width: int
    encoding: str
    step: int
    data: np.ndarray
    is_bigendian: int = 0


def decode_image(msg: Any, want: str = 'rgb8') -> np.ndarray:
    """Decode a sensor_msgs/Image (rclpy or rosbags) to a numpy array.

    Zero-copy (a view on ``msg.data``, possibly with padded rows) for rgb8 with ``want='rgb8'``
    and for every little-endian encoding with ``want='native'``. A copy happens for bgr8, rgba8,
    bgra8, 8UC3 and mono encodings with ``want='rgb8'``, and for big-endian 16/32-bit data with
    ``want='native'``. Every malformed message raises ImageDecodeError naming the field.
    """
    if want not in _WANTS:
        raise ImageDecodeError(f'want must be one of {_WANTS}, got {want!r}')
    encoding = _field(msg, 'encoding')
    if not isinstance(encoding, str):
        raise ImageDecodeError(f'Image.encoding must be a string, got {type(encoding).__name__}')
    if encoding.lower().startswith(_UNSUPPORTED_PREFIXES):
        raise ImageDecodeError(
            f'unsupported: Image.encoding {encoding!r} is a raw Bayer/YUV format; debayer and '
            'convert it with image_proc first (e.g. its debayer or rectify node) and subscribe '
            f'to the rgb8/bgr8 output; decodable encodings: {", ".join(DECODABLE)}')
    if encoding not in _LAYOUTS:
        raise ImageDecodeError(
            f'unsupported Image.encoding {encoding!r}; expected one of {", ".join(DECODABLE)}')
    channels, depth, kind = _LAYOUTS[encoding]
    height = _dimension(msg, 'height')
    width = _dimension(msg, 'width')
    big = _field(msg, 'is_bigendian')
    if isinstance(big, bytes) and len(big) == 1:
        big = big[0]
    if not isinstance(big, (bool, int, np.integer)) or not 0 <= int(big) <= 255:
        raise ImageDecodeError(f'Image.is_bigendian must be 0 or 1, got {big!r}')
    step = _field(msg, 'step')
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise ImageDecodeError(f'Image.step must be an integer, got {step!r}')
    step = int(step)
    row_bytes = width * channels * depth
    if step < row_bytes:
        raise ImageDecodeError(
            f'Image.step {step} is smaller than width x channels x bytes = {width} x {channels} x '
            f'{depth} = {row_bytes} for {encoding!r}; the publisher sets step wrong')
    buf = _byte_buffer(_field(msg, 'data'))
    if buf.size != step * height:
        raise ImageDecodeError(
            f'Image.data holds {buf.size} bytes but step x height = {step} x {height} = '
            f'{step * height}; the message is truncated or its step/height are wrong')
    if want == 'rgb8' and depth == 2:
        # mono16 -> 8 bit: a view on the high byte of each value (first byte when big-endian).
        high = np.ndarray((height, width), dtype=np.uint8, buffer=buf, offset=0 if big else 1,
                          strides=(step, 2))
        return np.repeat(high[:, :, None], 3, axis=2)
    order = '>' if big and depth > 1 else '<'
    dtype = np.dtype(order + kind)
    native = np.ndarray((height, width, channels), dtype=dtype, buffer=buf,
                        strides=(step, channels * depth, depth))
    if want == 'native':
        if not dtype.isnative:
            native = native.astype(dtype.newbyteorder('='))
        return native[:, :, 0] if channels == 1 else native
    return _to_rgb(native, encoding)


def decode_compressed(msg: Any) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (jpeg or png) to RGB uint8 ``[H, W, 3]`` (a copy).

    ``format`` may be plain ('jpeg', 'png') or image_transport's 'rgb8; jpeg compressed bgr8'.
    Grey images are replicated into three channels, 16-bit ones keep their high byte.
    """
    fmt = _field(msg, 'format')
    if not isinstance(fmt, str):
        raise ImageDecodeError(f'CompressedImage.format must be a string, got {fmt!r}')
    low = fmt.lower()
    if 'compresseddepth' in low:
        raise ImageDecodeError(
            f'unsupported CompressedImage.format {fmt!r}: compressedDepth is a depth transport, '
            'not a camera image; subscribe to the colour image topic')
    buf = _byte_buffer(_field(msg, 'data'), name='CompressedImage.data')
    if buf.size == 0:
        raise ImageDecodeError('CompressedImage.data is empty; the publisher sent no image')
    declared = _declared_size(buf)
    if declared is not None and not (0 < declared[0] <= MAX_SIDE and 0 < declared[1] <= MAX_SIDE):
        raise ImageDecodeError(
            f'CompressedImage.data declares a {declared[0]} x {declared[1]} image; expected '
            f'1..{MAX_SIDE} per side (a corrupt or hostile message)')
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageDecodeError(
            f'CompressedImage.data ({buf.size} bytes, format {fmt!r}) is not a valid jpeg or '
            f'png: {exc}') from None
    if image is None or image.size == 0:
        raise ImageDecodeError(
            f'CompressedImage.data ({buf.size} bytes, format {fmt!r}) is not a valid jpeg or '
            'png; check the publisher and the transport')
    height, width = image.shape[:2]
    if height > MAX_SIDE or width > MAX_SIDE:
        raise ImageDecodeError(
            f'CompressedImage decodes to {height} x {width}, above {MAX_SIDE} per side')
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageDecodeError(
            f'CompressedImage decodes to {image.dtype} pixels; expected 8- or 16-bit')
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    # image_transport compresses colour as bgr8 unless the format says 'compressed rgb8'.
    already_rgb = 'compressed rgb' in low
    if image.shape[2] == 3:
        return np.ascontiguousarray(image) if already_rgb else cv2.cvtColor(
            image, cv2.COLOR_BGR2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2RGB if already_rgb else cv2.COLOR_BGRA2RGB)
    raise ImageDecodeError(f'CompressedImage decodes to {image.shape[2]} channels; expected 1-4')


def encode_image(array_: np.ndarray, encoding: str, header: Any = None) -> ImageFields:
    """The Image fields of ``array_`` as mono8 (uint8 ``[H, W]``), 32FC1 (float ``[H, W]``,
    written little-endian float32) or rgb8 (uint8 ``[H, W, 3]``), with ``step`` = one packed row.

    ``data`` is a view on ``array_`` when it is already contiguous in the target type (no copy).
    """
    if encoding not in ENCODABLE:
        raise ValueError(f'cannot encode {encoding!r}; expected one of {ENCODABLE}')
    arr = np.asarray(array_)
    if encoding == 'rgb8':
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f'rgb8 needs an [H, W, 3] array, got shape {arr.shape}')
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    elif arr.ndim != 2:
        raise ValueError(f'{encoding} needs an [H, W] array, got shape {arr.shape}')
    if encoding == '32FC1':
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f'32FC1 needs a floating-point array, got {arr.dtype}')
        arr = np.ascontiguousarray(arr, dtype='<f4')
        channels, depth = 1, 4
    else:
        if arr.dtype != np.uint8:
            raise ValueError(f'{encoding} needs a uint8 array, got {arr.dtype}')
        arr = np.ascontiguousarray(arr)
        channels, depth = (3, 1) if encoding == 'rgb8' else (1, 1)
    height, width = arr.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f'cannot encode an empty image of shape {arr.shape}')
    data = arr.reshape(-1).view(np.uint8)
    return ImageFields(header=header, height=height, width=width, encoding=encoding,
                       step=width * channels * depth, data=data)


def to_message(fields: ImageFields, msg_cls: type) -> Any:
    """Build a sensor_msgs/Image of ``msg_cls`` (an rclpy or a rosbags message class).

    rosbags classes are dataclasses that need every field and a numpy uint8 ``data``. rclpy's
    generated setter (rosidl_generator_py ``_msg.py.em``) stores an ``array.array('B')`` as is
    but checks any other sequence element by element and copies it, so ``data`` is handed over
    as an ``array.array('B')`` filled with one memcpy.
    """
    if dataclasses.is_dataclass(msg_cls):
        header = fields.header
        if header is None:
            header = _default_dataclass(_field_class(msg_cls, 'header'))
        return msg_cls(header=header, height=fields.height, width=fields.width,
                       encoding=fields.encoding, is_bigendian=fields.is_bigendian,
                       step=fields.step, data=np.ascontiguousarray(fields.data, dtype=np.uint8))
    msg = msg_cls(height=fields.height, width=fields.width, encoding=fields.encoding,
                  is_bigendian=fields.is_bigendian, step=fields.step)
    if fields.header is not None:
        msg.header = fields.header
    data = array.array('B')
    data.frombytes(np.ascontiguousarray(fields.data, dtype=np.uint8))
    msg.data = data
    return msg


def _to_rgb(native: np.ndarray, encoding: str) -> np.ndarray:
    """8-bit [H, W, C] in the message's layout -> RGB uint8 [H, W, 3]."""
    if encoding == '32FC1':
        raise ImageDecodeError(
            "Image.encoding '32FC1' is a float map, not a camera image; decode it with "
            "want='native'")
    convert: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        'rgb8': lambda a: a,
        'bgr8': lambda a: cv2.cvtColor(a, cv2.COLOR_BGR2RGB),
        '8UC3': lambda a: cv2.cvtColor(a, cv2.COLOR_BGR2RGB),
        'rgba8': lambda a: cv2.cvtColor(a, cv2.COLOR_RGBA2RGB),
        'bgra8': lambda a: cv2.cvtColor(a, cv2.COLOR_BGRA2RGB),
        'mono8': lambda a: cv2.cvtColor(a[:, :, 0], cv2.COLOR_GRAY2RGB),
        '8UC1': lambda a: cv2.cvtColor(a[:, :, 0], cv2.COLOR_GRAY2RGB),
    }
    return convert[encoding](native)


def _declared_size(buf: np.ndarray) -> tuple[int, int] | None:
    """(height, width) from a PNG IHDR or a JPEG SOF header, read before allocating anything."""
    head = buf[:24].tobytes()
    if head.startswith(b'\x89PNG\r\n\x1a\n') and len(head) == 24:
        return int.from_bytes(head[20:24], 'big'), int.from_bytes(head[16:20], 'big')
    if not head.startswith(b'\xff\xd8'):
        return None
    data = memoryview(buf)
    pos = 2
    while pos + 9 <= len(data):  # walk the marker segments; each step moves forward
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return (int.from_bytes(data[pos + 5:pos + 7], 'big'),
                    int.from_bytes(data[pos + 7:pos + 9], 'big'))
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], 'big')
    return None


def _field(msg: Any, name: str) -> Any:
    try:
        return getattr(msg, name)
    except AttributeError:
        kind = type(msg).__name__
        raise ImageDecodeError(
            f'message of type {kind} has no field {name!r}; expected a sensor_msgs/Image or '
            'CompressedImage') from None


def _dimension(msg: Any, name: str) -> int:
    value = _field(msg, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ImageDecodeError(f'Image.{name} must be an integer, got {value!r}')
    if not 0 < int(value) <= MAX_SIDE:
        raise ImageDecodeError(
            f'Image.{name} is {int(value)}; expected 1..{MAX_SIDE} (an empty or corrupt message)')
    return int(value)


def _byte_buffer(data: Any, name: str = 'Image.data') -> np.ndarray:
    """A 1-D uint8 view on ``data`` (numpy array, array.array, bytes, bytearray, memoryview)."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ImageDecodeError(f'{name} must hold uint8 values, got a {data.dtype} array')
        return np.ascontiguousarray(data.reshape(-1))
    try:
        view = memoryview(data)
    except TypeError:
        raise ImageDecodeError(
            f'{name} must be bytes, array.array or a uint8 numpy array, got '
            f'{type(data).__name__}') from None
    if not view.c_contiguous:
        raise ImageDecodeError(f'{name} must be a contiguous buffer')
    return np.frombuffer(view.cast('B') if view.format != 'B' else view, dtype=np.uint8)


def _field_class(msg_cls: type, name: str) -> type:
    """The class of a rosbags dataclass field (annotations are strings naming module globals)."""
    for field in dataclasses.fields(msg_cls):
        if field.name == name:
            kind = field.type if isinstance(field.type, str) else field.type.__name__
            found = getattr(sys.modules[msg_cls.__module__], kind, None)
            if found is None:
                raise ValueError(f'cannot resolve the type {kind!r} of {msg_cls.__name__}.{name}')
            return found
    raise ValueError(f'{msg_cls.__name__} has no field {name!r}')


def _default_dataclass(cls: type) -> Any:
    """A zero-valued instance of a rosbags message dataclass (for a missing header)."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name.startswith('__'):  # rosbags lists __msgtype__ (a ClassVar) as a field
            continue
        kind = field.type if isinstance(field.type, str) else field.type.__name__
        if kind in ('int', 'float', 'str', 'bool'):
            values[field.name] = {'int': 0, 'float': 0.0, 'str': '', 'bool': False}[kind]
        else:
            values[field.name] = _default_dataclass(_field_class(cls, field.name))
    return cls(**values)
