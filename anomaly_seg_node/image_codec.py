"""sensor_msgs/Image and CompressedImage <-> numpy, without ROS and without cv_bridge (and the
stamp of a message header in nanoseconds, `stamp_ns`).

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
import re
import sys
from typing import Any
import zlib

import cv2
import numpy as np

from anomaly_seg_node.errors import ImageDecodeError

MAX_SIDE = 16384  # per side, so at most 2**28 pixels
# The default pixel budget of a compressed frame, checked on its header before decoding: 4K UHD
# (3840 x 2160) with 10% headroom.
MAX_PIXELS = 3840 * 2160 * 11 // 10

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

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# Colour type -> allowed bit depths (PNG specification, IHDR).
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# The chunks that make the pixels OpenCV returns; the others are dropped before decoding.
_PNG_KEPT = frozenset({b'IHDR', b'PLTE', b'tRNS', b'IDAT', b'IEND'})
# Caps on the header walks, so a message of tiny chunks cannot stall the Python loop.
_MAX_PNG_CHUNKS = 65536
_MAX_JPEG_SEGMENTS = 4096
# Codec names a CompressedImage.format may hold; only jpeg and png are decoded.
_CODEC_WORDS = frozenset({'jpeg', 'png', 'tiff', 'bmp', 'webp', 'gif', 'jp2', 'avif', 'exr',
                          'heic', 'qoi', 'h264', 'h265', 'hevc', 'av1', 'theora', 'zstd'})
_CODEC_ALIASES = {'jpg': 'jpeg', 'tif': 'tiff', 'j2k': 'jp2', 'jpeg2000': 'jp2'}
# Magic numbers of image files that OpenCV would decode but this node does not take.
_OTHER_MAGIC = ((b'BM', 'bmp'), (b'II*\x00', 'tiff'), (b'MM\x00*', 'tiff'), (b'GIF8', 'gif'),
                (b'\x00\x00\x00\x0cjP  ', 'jpeg 2000'), (b'\xffO\xffQ', 'jpeg 2000'),
                (b'v/1\x01', 'exr'), (b'#?RADIANCE', 'radiance hdr'), (b'#?RGBE', 'radiance hdr'),
                (b'\x00\x00\x00\x1cftypavif', 'avif'), (b'\x00\x00\x00\x20ftypavif', 'avif'))


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


def decode_compressed(msg: Any, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (jpeg or png) to RGB uint8 ``[H, W, 3]`` (a copy).

    ``format`` may be plain ('jpeg', 'png') or image_transport's 'rgb8; jpeg compressed bgr8';
    when it names a codec, the data must be of that codec. Grey images are replicated into three
    channels, 16-bit ones keep their high byte.

    Before OpenCV sees the bytes, the container is checked: its size, read from the PNG IHDR or
    the JPEG SOF header, must lie within ``MAX_SIDE`` per side and ``max_pixels`` in all (None:
    no pixel budget), so a small message declaring a huge image costs nothing; the PNG chunks
    (CRCs included) and the JPEG marker segments must be intact, so corrupt or truncated data is
    refused here instead of making libpng/libjpeg write to stderr; PNG ancillary chunks (text,
    ICC profiles, ...) are dropped, since the pixels do not depend on them and libpng warns
    about malformed ones. Corrupt JPEG entropy-coded data (the picture bytes themselves) cannot be
    checked without decoding it: libjpeg still prints one warning for such a frame.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool)
                                   or not isinstance(max_pixels, (int, np.integer))
                                   or max_pixels < 1):
        raise ValueError(f'max_pixels must be a positive integer or None, got {max_pixels!r}')
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
    where = f'CompressedImage.data ({buf.size} bytes, format {fmt!r})'
    codec = _check_codec(buf, fmt, where)
    if codec == 'png':
        payload = _checked_png(buf, max_pixels, where)
    else:
        _check_jpeg(buf, max_pixels, where)
        payload = buf
    try:
        image: np.ndarray | None = cv2.imdecode(payload, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageDecodeError(f'{where} is not a valid {codec}: {exc}') from None
    if image is None or image.size == 0:
        raise ImageDecodeError(
            f'{where} is not a valid {codec}; check the publisher and the transport')
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
    # A plain bool: is_dataclass's TypeGuard would narrow msg_cls to a class of no known fields.
    rosbags = dataclasses.is_dataclass(msg_cls)
    if rosbags:
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
    data.frombytes(np.ascontiguousarray(fields.data, dtype=np.uint8).data)
    msg.data = data
    return msg


def _to_rgb(native: np.ndarray, encoding: str) -> np.ndarray:
    """8-bit [H, W, C] in the message's layout -> RGB uint8 [H, W, 3]."""
    if encoding == '32FC1':
        raise ImageDecodeError(
            "Image.encoding '32FC1' is a float map (a depth image or a score map), not a camera "
            'image; subscribe the node to a camera image topic (rgb8, bgr8, mono8, ...)')
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


def _check_codec(buf: np.ndarray, fmt: str, where: str) -> str:
    """'jpeg' or 'png': what the data holds, which must be what ``fmt`` names (if anything)."""
    named = _named_codec(fmt)
    if named is not None and named not in ('jpeg', 'png'):
        raise ImageDecodeError(
            f'unsupported CompressedImage.format {fmt!r}: it names {named}; this node decodes '
            'jpeg and png (image_transport compressed); have the publisher send one of them')
    found = _sniff(buf[:16].tobytes())
    if found not in ('jpeg', 'png'):
        what = (f'holds a {found} image' if found else
                f'is neither jpeg nor png (it starts with {buf[:8].tobytes().hex(" ")})')
        raise ImageDecodeError(
            f'{where} {what}; this node decodes jpeg and png only: have the publisher send '
            'one of them, or check the transport if the data is corrupt')
    if named is not None and named != found:
        raise ImageDecodeError(
            f'{where} holds a {found} image, but its format names {named}; fix the '
            "publisher's format field or its encoder")
    return found


def _named_codec(fmt: str) -> str | None:
    """The codec a CompressedImage.format names ('jpeg', 'png', another), or None."""
    for word in re.findall(r'[a-z0-9]+', fmt.lower()):
        word = _CODEC_ALIASES.get(word, word)
        if word in _CODEC_WORDS:
            return word
    return None


def _sniff(head: bytes) -> str:
    """The container of ``head`` from its magic number: 'png', 'jpeg', another name, or ''."""
    if head.startswith(_PNG_SIGNATURE):
        return 'png'
    if head.startswith(b'\xff\xd8\xff'):
        return 'jpeg'
    if head[:4] == b'RIFF' and head[8:12] == b'WEBP':
        return 'webp'
    for magic, name in _OTHER_MAGIC:
        if head.startswith(magic):
            return name
    return ''


def _check_size(height: int, width: int, max_pixels: int | None, where: str) -> None:
    """Refuse a declared size off the per-side limit or above the pixel budget."""
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
        raise ImageDecodeError(
            f'{where} declares a {height} x {width} image; expected 1..{MAX_SIDE} per side '
            '(a corrupt or hostile message)')
    if max_pixels is not None and height * width > max_pixels:
        raise ImageDecodeError(
            f'{where} declares a {height} x {width} image, {height * width} pixels, above the '
            f'budget of {max_pixels} pixels (max_input_pixels; 4K UHD by default): a corrupt or '
            'hostile message, or a camera above the budget, for which raise max_input_pixels')


def _checked_png(buf: np.ndarray, max_pixels: int | None, where: str) -> np.ndarray:
    """The PNG with only the chunks that make its pixels, after checking every chunk's layout
    and CRC, the IHDR fields and the size budget (before anything is decompressed)."""
    data = buf.data
    size = len(data)
    parts: list[memoryview] = [data[:8]]
    dropped = False
    pos = 8
    colour_type = -1
    has_palette = in_idat = after_idat = False
    for index in range(_MAX_PNG_CHUNKS):
        if pos + 12 > size:
            raise ImageDecodeError(f'{where} is a truncated png (no IEND chunk)')
        length = int.from_bytes(data[pos:pos + 4], 'big')
        kind = bytes(data[pos + 4:pos + 8])
        end = pos + 12 + length
        if length > 0x7FFFFFFF or not kind.isalpha():
            raise ImageDecodeError(f'{where} is a corrupt png: no valid chunk at byte {pos}')
        if end > size:
            raise ImageDecodeError(f'{where} is a truncated png (its {kind.decode()} chunk at '
                                   f'byte {pos} ends past the data)')
        if zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], 'big'):
            raise ImageDecodeError(
                f'{where} is a corrupt png: the CRC of its {kind.decode()} chunk at byte {pos} '
                'does not match; check the transport')
        if index == 0:
            if kind != b'IHDR' or length != 13:
                raise ImageDecodeError(f'{where} is a corrupt png: it does not start with IHDR')
            width = int.from_bytes(data[16:20], 'big')
            height = int.from_bytes(data[20:24], 'big')
            _check_size(height, width, max_pixels, where)
            depth, colour_type, compression, filtering, interlace = data[24:29]
            if (depth not in _PNG_DEPTHS.get(colour_type, ()) or compression or filtering
                    or interlace > 1):
                raise ImageDecodeError(
                    f'{where} is a corrupt png: IHDR holds bit depth {depth}, colour type '
                    f'{colour_type}, compression {compression}, filter {filtering}, interlace '
                    f'{interlace}')
        elif kind == b'IHDR' or (kind[0] < 0x61 and kind not in _PNG_KEPT):
            raise ImageDecodeError(
                f'{where} is a corrupt png: unexpected critical chunk {kind.decode()} at byte '
                f'{pos}')
        if kind == b'PLTE':
            has_palette = True
        if kind == b'IDAT':
            if after_idat:
                raise ImageDecodeError(f'{where} is a corrupt png: its IDAT chunks are split')
            if colour_type == 3 and not has_palette:
                raise ImageDecodeError(f'{where} is a corrupt png: no PLTE before IDAT')
            in_idat = True
        elif in_idat:
            after_idat = True
        if kind == b'IEND':
            if not in_idat:
                raise ImageDecodeError(f'{where} is a corrupt png: it holds no IDAT chunk')
            parts.append(data[pos:end])
            break
        if kind in _PNG_KEPT:
            parts.append(data[pos:end])
        else:
            dropped = True
        pos = end
    else:
        raise ImageDecodeError(f'{where} is not a png a camera sends: more than '
                               f'{_MAX_PNG_CHUNKS} chunks')
    if not dropped:
        return buf
    return np.frombuffer(b''.join(parts), dtype=np.uint8)


def _check_jpeg(buf: np.ndarray, max_pixels: int | None, where: str) -> None:
    """Walk the JPEG's marker segments: a frame header (SOF) within the size budget, every
    segment inside the data, no stray bytes between segments, scans, and an end marker."""
    size = buf.size
    # Where a marker starts: 0xFF followed by neither stuffing (00), a fill byte (FF) nor a
    # restart marker (D0..D7, part of the entropy-coded data).
    candidates = np.flatnonzero(buf[:-1] == 0xFF)
    follow = buf[candidates + 1]
    markers = candidates[(follow != 0x00) & (follow != 0xFF) & ((follow < 0xD0) | (follow > 0xD7))]
    pos = 2
    has_frame = has_scan = in_scan = False
    for _ in range(_MAX_JPEG_SEGMENTS):
        index = int(np.searchsorted(markers, pos))
        if index == markers.size:
            raise ImageDecodeError(f'{where} is a truncated jpeg (no end-of-image marker)')
        at = int(markers[index])
        if not in_scan and at > pos and not np.all(buf[pos:at] == 0xFF):
            raise ImageDecodeError(
                f'{where} is a corrupt jpeg: {at - pos} stray bytes before the marker at byte '
                f'{at}')
        code = int(buf[at + 1])
        if code == 0xD9:  # end of image
            if not has_scan:
                raise ImageDecodeError(f'{where} is a corrupt jpeg: it holds no scan')
            return
        if code in (0xD8, 0x01):
            raise ImageDecodeError(
                f'{where} is a corrupt jpeg: unexpected marker 0x{code:02X} at byte {at}')
        if at + 4 > size:
            raise ImageDecodeError(f'{where} is a truncated jpeg (a segment header is cut)')
        length = int(buf[at + 2]) << 8 | int(buf[at + 3])
        end = at + 2 + length
        if length < 2 or end > size:
            raise ImageDecodeError(
                f'{where} is a corrupt or truncated jpeg: the segment 0x{code:02X} at byte {at} '
                f'is {length} bytes long, past the data')
        if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC) and not has_frame:
            if length < 8:
                raise ImageDecodeError(f'{where} is a corrupt jpeg: a short frame header')
            height = int(buf[at + 5]) << 8 | int(buf[at + 6])
            width = int(buf[at + 7]) << 8 | int(buf[at + 8])
            _check_size(height, width, max_pixels, where)
            has_frame = True
        if code == 0xDA and not has_frame:
            raise ImageDecodeError(f'{where} is a corrupt jpeg: a scan before the frame header')
        # The entropy-coded data of a scan runs from the end of its header to the next marker.
        in_scan = code == 0xDA
        has_scan = has_scan or in_scan
        pos = end
    raise ImageDecodeError(f'{where} is not a jpeg a camera sends: more than '
                           f'{_MAX_JPEG_SEGMENTS} marker segments')


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


def stamp_ns(header: Any) -> int:
    """A std_msgs/Header's stamp in nanoseconds (0 when there is none); rclpy and rosbags
    messages alike (ROS 1 bags come out of rosbags with ROS 2 field names)."""
    stamp = getattr(header, 'stamp', None)
    if stamp is None:
        return 0
    return int(getattr(stamp, 'sec', 0)) * 1_000_000_000 + int(getattr(stamp, 'nanosec', 0))
