"""sensor_msgs/Image and CompressedImage conversion on rosbags and rclpy-like messages."""

import array
from collections.abc import Sequence
from types import SimpleNamespace
import zlib

import cv2
from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from anomaly_seg_node.errors import ImageDecodeError
from anomaly_seg_node.image_codec import (
    DECODABLE,
    MAX_PIXELS,
    MAX_SIDE,
    decode_compressed,
    decode_image,
    encode_image,
    to_message,
)

TYPESTORE = get_typestore(Stores.ROS2_HUMBLE)
RosbagsImage = TYPESTORE.types['sensor_msgs/msg/Image']
RosbagsCompressed = TYPESTORE.types['sensor_msgs/msg/CompressedImage']
Header = TYPESTORE.types['std_msgs/msg/Header']
Time = TYPESTORE.types['builtin_interfaces/msg/Time']

# encoding -> (channels, numpy kind)
LAYOUT = {
    'rgb8': (3, 'u1'), 'bgr8': (3, 'u1'), 'rgba8': (4, 'u1'), 'bgra8': (4, 'u1'),
    'mono8': (1, 'u1'), '8UC1': (1, 'u1'), '8UC3': (3, 'u1'), 'mono16': (1, 'u2'),
    '16UC1': (1, 'u2'), '32FC1': (1, 'f4'),
}


class RclpyLikeImage:
    """Behaves like rclpy's generated sensor_msgs.msg.Image for the fields used here.

    Its data setter follows rosidl_generator_py's _msg.py.em: an array.array('B') is stored as
    is; any other sequence is checked element by element and copied into an array.array('B');
    a numpy array (not a collections.abc.Sequence) is refused.
    """

    def __init__(self, **kwargs):
        self.header = kwargs.get('header', SimpleNamespace(frame_id='', stamp=None))
        self.height = kwargs.get('height', 0)
        self.width = kwargs.get('width', 0)
        self.encoding = kwargs.get('encoding', '')
        self.is_bigendian = kwargs.get('is_bigendian', 0)
        self.step = kwargs.get('step', 0)
        self.data = array.array('B', kwargs.get('data', []))

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        if isinstance(value, array.array):
            assert value.typecode == 'B'
            self._data = value
            return
        assert isinstance(value, Sequence) and not isinstance(value, str)
        assert all(isinstance(v, int) and 0 <= v < 256 for v in value)
        self._data = array.array('B', value)


def header(frame_id: str = 'cam_optical_frame', sec: int = 7) -> object:
    return Header(stamp=Time(sec=sec, nanosec=5), frame_id=frame_id)


def build(kind: str, native: np.ndarray, encoding: str, pad: int = 0, big: bool = False):
    """A message of ``kind`` ('rosbags' or 'rclpy') holding ``native`` with ``pad`` bytes/row."""
    height, width = native.shape[:2]
    dtype = native.dtype.newbyteorder('>' if big else '<')
    rows = np.ascontiguousarray(native, dtype=dtype).view(np.uint8).reshape(height, -1)
    step = rows.shape[1] + pad
    raw = np.full((height, step), 0xAB, dtype=np.uint8)  # padding bytes must be ignored
    raw[:, :rows.shape[1]] = rows
    fields = dict(height=height, width=width, encoding=encoding, is_bigendian=int(big), step=step)
    if kind == 'rosbags':
        return RosbagsImage(header=header(), data=raw.reshape(-1), **fields)
    return RclpyLikeImage(header=header(), data=array.array('B', raw.tobytes()), **fields)


def random_native(encoding: str, rng: np.random.Generator, height: int = 5, width: int = 7):
    channels, kind = LAYOUT[encoding]
    shape = (height, width) if channels == 1 else (height, width, channels)
    if kind == 'f4':
        return rng.standard_normal(shape).astype(np.float32)
    return rng.integers(0, np.iinfo(kind).max + 1, size=shape).astype(kind)


def expected_rgb(native: np.ndarray, encoding: str) -> np.ndarray:
    """The documented network view, written independently of the codec."""
    if encoding in ('mono16', '16UC1'):
        native = (native >> 8).astype(np.uint8)
    if native.ndim == 2:
        return np.stack([native] * 3, axis=-1)
    if encoding in ('bgr8', 'bgra8', '8UC3'):
        return native[:, :, 2::-1]
    return native[:, :, :3]


@pytest.mark.parametrize('kind', ['rosbags', 'rclpy'])
@pytest.mark.parametrize('pad', [0, 5])
@pytest.mark.parametrize('encoding', sorted(LAYOUT))
def test_decode_every_encoding(encoding, pad, kind):
    rng = np.random.default_rng(len(encoding) + pad)
    native = random_native(encoding, rng)
    for big in ([False, True] if native.dtype.itemsize > 1 else [False]):
        msg = build(kind, native, encoding, pad=pad, big=big)
        got = decode_image(msg, want='native')
        assert got.dtype == native.dtype.newbyteorder('=') and got.dtype.isnative
        np.testing.assert_array_equal(got, native)
        if encoding == '32FC1':
            with pytest.raises(ImageDecodeError) as error:
                decode_image(msg)
            assert str(error.value) == (
                "Image.encoding '32FC1' is a float map (a depth image or a score map), not a "
                'camera image; subscribe the node to a camera image topic (rgb8, bgr8, mono8, '
                '...)')
            continue
        rgb = decode_image(msg)
        assert rgb.shape == (5, 7, 3) and rgb.dtype == np.uint8
        np.testing.assert_array_equal(rgb, expected_rgb(native, encoding))


@pytest.mark.parametrize('kind', ['rosbags', 'rclpy'])
def test_rgb8_and_native_are_zero_copy(kind):
    native = random_native('rgb8', np.random.default_rng(0))
    msg = build(kind, native, 'rgb8', pad=3)
    backing = np.frombuffer(msg.data, dtype=np.uint8)
    assert np.shares_memory(decode_image(msg), backing)
    mono = build(kind, random_native('mono16', np.random.default_rng(1)), 'mono16')
    assert np.shares_memory(decode_image(mono, want='native'), np.frombuffer(mono.data, np.uint8))


def test_big_endian_mono16_known_values():
    values = np.array([[0x0102, 0xFF00, 0x8001]], dtype=np.uint16)
    data = np.array([0x01, 0x02, 0xFF, 0x00, 0x80, 0x01], dtype=np.uint8)
    msg = RosbagsImage(header=header(), height=1, width=3, encoding='mono16', is_bigendian=1,
                       step=6, data=data)
    np.testing.assert_array_equal(decode_image(msg, want='native'), values)
    np.testing.assert_array_equal(decode_image(msg)[0, :, 0], [0x01, 0xFF, 0x80])
    little = RosbagsImage(header=header(), height=1, width=3, encoding='16UC1', is_bigendian=0,
                          step=6, data=data)
    np.testing.assert_array_equal(decode_image(little, want='native'), [[0x0201, 0x00FF, 0x0180]])


@pytest.mark.parametrize('encoding', ['mono8', '32FC1', 'rgb8'])
@pytest.mark.parametrize('kind', ['rosbags', 'rclpy'])
def test_encode_to_message_round_trip(encoding, kind):
    rng = np.random.default_rng(3)
    image = random_native(encoding, rng, height=4, width=6)
    fields = encode_image(image, encoding, header=header('front', 42))
    channels, kind_ = LAYOUT[encoding]
    assert fields.step == 6 * channels * np.dtype(kind_).itemsize
    assert fields.is_bigendian == 0 and fields.data.dtype == np.uint8
    assert fields.data.size == fields.step * 4 and fields.data.flags.c_contiguous
    msg_cls = RosbagsImage if kind == 'rosbags' else RclpyLikeImage
    msg = to_message(fields, msg_cls)
    assert isinstance(msg, msg_cls)
    if kind == 'rclpy':
        assert isinstance(msg.data, array.array) and msg.data.typecode == 'B'
    assert msg.header.frame_id == 'front' and msg.header.stamp.sec == 42
    np.testing.assert_array_equal(decode_image(msg, want='native'), image)


def test_rosbags_message_survives_cdr_serialisation():
    image = random_native('32FC1', np.random.default_rng(4), height=3, width=5)
    msg = to_message(encode_image(image, '32FC1'), RosbagsImage)
    assert msg.header.frame_id == '' and msg.header.stamp.sec == 0  # default header built
    raw = TYPESTORE.serialize_cdr(msg, 'sensor_msgs/msg/Image')
    back = TYPESTORE.deserialize_cdr(raw, 'sensor_msgs/msg/Image')
    np.testing.assert_array_equal(decode_image(back, want='native'), image)
    scores = np.frombuffer(bytes(back.data), dtype='<f4').reshape(3, 5)  # little-endian on wire
    np.testing.assert_array_equal(scores, image)


def test_encode_refuses_wrong_arrays():
    with pytest.raises(ValueError, match='uint8'):
        encode_image(np.zeros((2, 2), np.int32), 'mono8')
    with pytest.raises(ValueError, match=r'\[H, W, 3\]'):
        encode_image(np.zeros((2, 2), np.uint8), 'rgb8')
    with pytest.raises(ValueError, match='cannot encode'):
        encode_image(np.zeros((2, 2), np.uint8), 'bgr8')


def compressed(data: bytes, fmt: str):
    return RosbagsCompressed(header=header(), format=fmt,
                             data=np.frombuffer(data, dtype=np.uint8).copy())


def test_compressed_png_exact_and_transport_formats():
    rgb = random_native('rgb8', np.random.default_rng(5), height=6, width=9)
    ok, png = cv2.imencode('.png', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    for fmt in ('png', 'rgb8; png compressed bgr8', 'bgr8; png compressed bgr8'):
        np.testing.assert_array_equal(decode_compressed(compressed(png.tobytes(), fmt)), rgb)
    # rclpy-style data (array.array) works too
    msg = SimpleNamespace(format='png', data=array.array('B', png.tobytes()))
    np.testing.assert_array_equal(decode_compressed(msg), rgb)
    grey = rgb[:, :, 0].copy()
    ok, png = cv2.imencode('.png', grey)
    out = decode_compressed(compressed(png.tobytes(), 'mono8; png compressed mono8'))
    np.testing.assert_array_equal(out, np.stack([grey] * 3, axis=-1))
    deep = (grey.astype(np.uint16) << 8) | 0x7F
    ok, png = cv2.imencode('.png', deep)
    out = decode_compressed(compressed(png.tobytes(), 'mono16; png compressed mono16'))
    np.testing.assert_array_equal(out, np.stack([grey] * 3, axis=-1))


def test_compressed_jpeg_colour_order():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (250, 10, 10)  # red left half
    rgb[:, 8:] = (10, 10, 250)  # blue right half
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, jpg = cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    for fmt in ('jpeg', 'rgb8; jpeg compressed bgr8'):
        out = decode_compressed(compressed(jpg.tobytes(), fmt))
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
        away_from_edge = np.r_[0:5, 11:16]  # chroma subsampling blurs the colour boundary
        error = np.abs(out.astype(int) - rgb)[:, away_from_edge]
        assert error.max() < 20
        assert out[8, 2, 0] > 200 and out[8, 13, 2] > 200


@pytest.mark.parametrize('payload', [
    b'', b'not an image at all', b'\x89PNG\r\n\x1a\n' + b'\0' * 40, b'\xff\xd8\xff' + b'\x13' * 50,
])
def test_compressed_garbage_is_a_decode_error(payload):
    with pytest.raises(ImageDecodeError, match='CompressedImage'):
        decode_compressed(compressed(payload, 'jpeg'))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC (what a careful forger writes)."""
    return len(body).to_bytes(4, 'big') + kind + body + zlib.crc32(kind + body).to_bytes(4, 'big')


def png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk of a well-formed PNG."""
    chunks, pos = [], 8
    while pos < len(png):
        length = int.from_bytes(png[pos:pos + 4], 'big')
        chunks.append((png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def forge_png(png: bytes, height: int, width: int) -> bytes:
    """``png`` with its IHDR declaring height x width, CRC recomputed."""
    chunks = png_chunks(png)
    kind, body = chunks[0]
    assert kind == b'IHDR'
    body = width.to_bytes(4, 'big') + height.to_bytes(4, 'big') + body[8:]
    return png[:8] + b''.join(png_chunk(k, b) for k, b in [(kind, body), *chunks[1:]])


def sof_offset(jpg: bytes) -> int:
    return next(i for i in range(2, len(jpg) - 1) if jpg[i] == 0xFF and jpg[i + 1] == 0xC0)


def test_compressed_header_declaring_a_huge_image_is_refused_before_decoding():
    rgb = random_native('rgb8', np.random.default_rng(7), height=4, width=5)
    ok, png = cv2.imencode('.png', rgb)
    ok, jpg = cv2.imencode('.jpg', rgb)
    png, jpg = png.tobytes(), bytearray(jpg.tobytes())
    sof = sof_offset(jpg)
    assert int.from_bytes(jpg[sof + 5:sof + 7], 'big') == 4  # the SOF0 height we will forge
    jpg[sof + 5:sof + 7] = (60000).to_bytes(2, 'big')
    for payload, fmt in ((forge_png(png, 4, 100000), 'png'), (bytes(jpg), 'jpeg')):
        with pytest.raises(ImageDecodeError, match='declares a .* image; expected 1..16384'):
            decode_compressed(compressed(payload, fmt))


def test_pixel_budget_is_enforced_from_the_header():
    """A 16384 x 16384 png of a few hundred bytes passes the side limit but not the budget: it
    is refused from its IHDR (before, it cost 49 s and 5.7 GB to decode)."""
    ok, png = cv2.imencode('.png', np.zeros((8, 8), np.uint8))
    bomb = forge_png(png.tobytes(), MAX_SIDE, MAX_SIDE)
    with pytest.raises(ImageDecodeError) as error:
        decode_compressed(compressed(bomb, 'png'))
    assert str(error.value) == (
        f"CompressedImage.data ({len(bomb)} bytes, format 'png') declares a 16384 x 16384 "
        'image, 268435456 pixels, above the budget of 9123840 pixels (max_input_pixels; 4K UHD '
        'by default): a corrupt or hostile message, or a camera above the budget, for which '
        'raise max_input_pixels')
    assert MAX_PIXELS == 9123840 >= 3840 * 2160
    rgb = random_native('rgb8', np.random.default_rng(8), height=6, width=9)
    ok, jpg = cv2.imencode('.jpg', rgb)
    ok, png = cv2.imencode('.png', rgb)
    for payload, fmt in ((jpg.tobytes(), 'jpeg'), (png.tobytes(), 'png')):
        msg = compressed(payload, fmt)
        assert decode_compressed(msg, max_pixels=54).shape == (6, 9, 3)  # exactly the budget
        assert decode_compressed(msg, max_pixels=None).shape == (6, 9, 3)
        with pytest.raises(ImageDecodeError, match='6 x 9 image, 54 pixels, above the budget '
                                                   'of 53 pixels'):
            decode_compressed(msg, max_pixels=53)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match='max_pixels must be a positive integer or None'):
            decode_compressed(compressed(png.tobytes(), 'png'), max_pixels=bad)


def test_a_4k_frame_fits_the_default_budget():
    ok, png = cv2.imencode('.png', np.full((2160, 3840), 77, np.uint8))
    out = decode_compressed(compressed(png.tobytes(), 'png'))
    assert out.shape == (2160, 3840, 3) and np.all(out == 77)


@pytest.mark.parametrize(('ext', 'name'), [('.bmp', 'bmp'), ('.tiff', 'tiff'), ('.webp', 'webp')])
def test_other_image_formats_labelled_jpeg_are_refused(ext, name):
    rgb = random_native('rgb8', np.random.default_rng(9), height=6, width=9)
    ok, data = cv2.imencode(ext, rgb)
    assert ok and cv2.imdecode(data, cv2.IMREAD_UNCHANGED) is not None  # OpenCV would take it
    for fmt in ('jpeg', 'rgb8; jpeg compressed bgr8', ''):
        with pytest.raises(ImageDecodeError) as error:
            decode_compressed(compressed(data.tobytes(), fmt))
        assert str(error.value) == (
            f'CompressedImage.data ({data.size} bytes, format {fmt!r}) holds a {name} image; '
            'this node decodes jpeg and png only: have the publisher send one of them, or '
            'check the transport if the data is corrupt')


def test_format_names_the_codec_the_data_must_have():
    rgb = random_native('rgb8', np.random.default_rng(10), height=6, width=9)
    ok, png = cv2.imencode('.png', rgb)
    ok, jpg = cv2.imencode('.jpg', rgb)
    with pytest.raises(ImageDecodeError, match=r"holds a png image, but its format names jpeg; "
                                               r"fix the publisher's format field"):
        decode_compressed(compressed(png.tobytes(), 'bgr8; jpeg compressed bgr8'))
    with pytest.raises(ImageDecodeError, match='holds a jpeg image, but its format names png'):
        decode_compressed(compressed(jpg.tobytes(), 'PNG'))
    with pytest.raises(ImageDecodeError, match="unsupported CompressedImage.format 'tiff': it "
                                               'names tiff; this node decodes jpeg and png'):
        decode_compressed(compressed(png.tobytes(), 'tiff'))
    # A format that names no codec: the data says which.
    for fmt in ('', 'bgr8', 'jpg'):
        payload = jpg if fmt == 'jpg' else png
        assert decode_compressed(compressed(payload.tobytes(), fmt)).shape == (6, 9, 3)


def corrupt_frames() -> dict[str, tuple[bytes, str]]:
    """Corrupt or foreign payloads; handed to OpenCV as they are, most make OpenCV's logger,
    libpng or libjpeg write to stderr (OpenCV 4.11 and 5.1), and some decode to a picture."""
    rgb = random_native('rgb8', np.random.default_rng(11), height=32, width=40)
    png = cv2.imencode('.png', rgb)[1].tobytes()
    jpg = cv2.imencode('.jpg', rgb)[1].tobytes()
    idat = next(i for i in range(len(png)) if png[i:i + 4] == b'IDAT')
    flipped = bytearray(png)
    flipped[idat + 40] ^= 0x5A  # inside the compressed pixels
    sof = sof_offset(jpg)
    return {
        'png bit flip in IDAT': (bytes(flipped), 'png'),
        'png chunk type broken': (png[:37] + b'\x00' + png[38:], 'png'),
        'png IHDR CRC wrong': (png[:29] + b'\0\0\0\0' + png[33:], 'png'),
        'png without IHDR': (png[:8] + b'\0' * 40, 'png'),
        'png truncated': (png[:len(png) // 2], 'png'),
        'jpeg garbage between segments': (jpg[:sof] + b'garbage' + jpg[sof:], 'jpeg'),
        'jpeg truncated': (jpg[:len(jpg) // 2], 'jpeg'),
        'jpeg without end marker': (jpg[:-2], 'jpeg'),
        'jpeg segment length past the end': (jpg[:sof + 2] + b'\xff\xff' + jpg[sof + 4:],
                                             'jpeg'),
        'bmp truncated': (cv2.imencode('.bmp', rgb)[1].tobytes()[:100], 'jpeg'),
        'tiff truncated': (cv2.imencode('.tiff', rgb)[1].tobytes()[:100], 'jpeg'),
    }


@pytest.mark.parametrize('case', sorted(corrupt_frames()))
def test_corrupt_frames_are_refused_without_writing_to_stderr(case, capfd):
    """OpenCV's logger, libpng and libjpeg write to file descriptor 2 from C (1,337 lines for
    2,600 corrupt frames through the node); these frames are refused before OpenCV sees them."""
    payload, fmt = corrupt_frames()[case]
    capfd.readouterr()
    with pytest.raises(ImageDecodeError, match='CompressedImage.data'):
        decode_compressed(compressed(payload, fmt))
    assert capfd.readouterr().err == ''


def test_png_ancillary_chunks_are_dropped_not_decoded(capfd):
    rgb = random_native('rgb8', np.random.default_rng(12), height=5, width=6)
    png = cv2.imencode('.png', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    chunks = png_chunks(png)
    noisy = png[:8] + b''.join(png_chunk(k, b) for k, b in [
        chunks[0], (b'iCCP', b'sRGB\x00\x00' + b'garbage, not zlib'), *chunks[1:]])
    capfd.readouterr()
    np.testing.assert_array_equal(decode_compressed(compressed(noisy, 'png')), rgb)
    assert capfd.readouterr().err == ''


def test_valid_variants_of_jpeg_and_png_decode():
    rgb = cv2.GaussianBlur(random_native('rgb8', np.random.default_rng(13), height=48,
                                         width=64), (5, 5), 2)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    jpegs = {
        'baseline': cv2.imencode('.jpg', bgr)[1],
        'progressive': cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1],
        'restart markers': cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_RST_INTERVAL, 1])[1],
        'grey': cv2.imencode('.jpg', bgr[:, :, 1])[1],
    }
    for name, data in jpegs.items():
        out = decode_compressed(compressed(data.tobytes(), 'jpeg'))
        assert out.shape == (48, 64, 3), name
        expected = np.repeat(rgb[:, :, 1:2], 3, axis=2) if name == 'grey' else rgb
        assert np.abs(out.astype(int) - expected).mean() < 4, name
    # Fill bytes before a marker and bytes after the end marker are legal.
    base = jpegs['baseline'].tobytes()
    sof = sof_offset(base)
    padded = base[:sof] + b'\xff\xff' + base[sof:] + b'\x00' * 7
    np.testing.assert_array_equal(decode_compressed(compressed(padded, 'jpeg')),
                                  decode_compressed(compressed(base, 'jpeg')))
    # Palette png (OpenCV cannot write one) and an interlaced one, built by hand.
    palette = bytes([255, 0, 0, 0, 0, 255])
    rows = b''.join(b'\x00' + bytes([x % 2 for x in range(4)]) for _ in range(3))
    ihdr = (4).to_bytes(4, 'big') + (3).to_bytes(4, 'big') + bytes([8, 3, 0, 0, 0])
    indexed = b'\x89PNG\r\n\x1a\n' + b''.join(png_chunk(k, b) for k, b in [
        (b'IHDR', ihdr), (b'PLTE', palette), (b'IDAT', zlib.compress(rows)), (b'IEND', b'')])
    out = decode_compressed(compressed(indexed, 'png'))
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 0, 255]] * 2)
    no_palette = b'\x89PNG\r\n\x1a\n' + b''.join(png_chunk(k, b) for k, b in [
        (b'IHDR', ihdr), (b'IDAT', zlib.compress(rows)), (b'IEND', b'')])
    with pytest.raises(ImageDecodeError, match='no PLTE before IDAT'):
        decode_compressed(compressed(no_palette, 'png'))


def test_compressed_depth_and_bad_fields_refused():
    with pytest.raises(ImageDecodeError, match='compressedDepth'):
        decode_compressed(compressed(b'1234', '16UC1; compressedDepth png'))
    with pytest.raises(ImageDecodeError, match='format'):
        decode_compressed(SimpleNamespace(format=None, data=b'12'))
    with pytest.raises(ImageDecodeError, match="no field 'format'"):
        decode_compressed(SimpleNamespace(data=b'12'))


@pytest.mark.parametrize('encoding', ['bayer_rggb8', 'bayer_grbg16', 'yuv422', 'yuv422_yuy2',
                                      'uyvy', 'nv21'])
def test_bayer_and_yuv_need_image_proc(encoding):
    msg = RosbagsImage(header=header(), height=2, width=2, encoding=encoding, is_bigendian=0,
                       step=4, data=np.zeros(8, np.uint8))
    with pytest.raises(ImageDecodeError, match='unsupported: .*debayer.*image_proc'):
        decode_image(msg)


@pytest.mark.parametrize('change, field', [
    (dict(step=20), 'step'),  # step < width * 3
    (dict(step=24), 'data'),  # data too short for the declared step
    (dict(data=np.zeros(5 * 21 - 1, np.uint8)), 'data'),
    (dict(data=np.zeros(5 * 21 + 1, np.uint8)), 'data'),
    (dict(height=0), 'height'),
    (dict(width=-1), 'width'),
    (dict(height=16385), 'height'),
    (dict(height=16384, width=16384), 'step'),  # legal size, but data far too short
    (dict(encoding='rgb16'), 'encoding'),
    (dict(encoding='RGB8'), 'encoding'),
    (dict(encoding=None), 'encoding'),
    (dict(step=21.0), 'step'),
    (dict(is_bigendian=300), 'is_bigendian'),
    (dict(data=np.zeros(5 * 21, np.int16)), 'data'),
    (dict(data=[0] * 105), 'data'),
    (dict(data=None), 'data'),
])
def test_malformed_messages_name_the_field(change, field):
    fields = dict(header=header(), height=5, width=7, encoding='rgb8', is_bigendian=0, step=21,
                  data=np.zeros(5 * 21, np.uint8))
    fields.update(change)
    with pytest.raises(ImageDecodeError, match=field):
        decode_image(SimpleNamespace(**fields))


def reference_decode(height, width, encoding, big, step, data: bytes) -> np.ndarray:
    """A slow row-by-row decoder: the ground truth for valid fuzzed messages."""
    channels, kind = LAYOUT[encoding]
    dtype = np.dtype(('>' if big else '<') + kind)
    row_bytes = width * channels * dtype.itemsize
    rows = [np.frombuffer(data[r * step:r * step + row_bytes], dtype=dtype)
            for r in range(height)]
    image = np.stack(rows).reshape(height, width, channels)
    return image.astype(dtype.newbyteorder('='))


VALID_SIDE = st.integers(1, 9)
SIDES = st.one_of(VALID_SIDE, VALID_SIDE, VALID_SIDE, st.integers(-2, 0),
                  st.sampled_from([16385, 2**31, 10**12]))


@st.composite
def fuzzed_messages(draw):
    valid_encoding = st.sampled_from(DECODABLE)
    encoding = draw(st.one_of(valid_encoding, valid_encoding, valid_encoding,
                              st.sampled_from(['', 'bayer_bggr8', 'jpeg', 'rgb 8', '8UC4']),
                              st.text(max_size=6)))
    height, width = draw(SIDES), draw(SIDES)
    channels, kind = LAYOUT.get(encoding, (3, 'u1'))
    row = max(width, 0) * channels * np.dtype(kind).itemsize
    step = draw(st.one_of(st.just(row), st.integers(row, row + 6), st.integers(row - 3, row + 6),
                          st.integers(-5, 10**13)))
    size = max(step, 0) * max(height, 0)
    length = draw(st.one_of(st.just(size), st.just(size), st.integers(max(size - 4, 0), size + 4),
                            st.integers(0, 300)))
    length = min(length, 10**6)
    big = draw(st.sampled_from([0, 1, 1, 2, -1, True]))
    payload = draw(st.binary(min_size=min(length, 64), max_size=min(length, 64)))
    data = (payload * (length // max(len(payload), 1) + 1))[:length] if payload else bytes(length)
    container = draw(st.sampled_from(['bytes', 'numpy', 'array', 'bytearray']))
    wrapped = {'bytes': data, 'bytearray': bytearray(data),
               'numpy': np.frombuffer(data, np.uint8).copy(),
               'array': array.array('B', data)}[container]
    return SimpleNamespace(header=None, height=height, width=width, encoding=encoding,
                           is_bigendian=big, step=step, data=wrapped), data


@settings(max_examples=400, deadline=None)
@given(fuzzed_messages(), st.sampled_from(['rgb8', 'native']))
def test_fuzzed_messages_decode_correctly_or_raise_image_decode_error(case, want):
    msg, data = case
    try:
        got = decode_image(msg, want=want)
    except ImageDecodeError:
        return
    # Decoding succeeded: the message must have been valid and the image right.
    assert msg.encoding in LAYOUT and 0 < msg.height <= 16384 and 0 < msg.width <= 16384
    channels, kind = LAYOUT[msg.encoding]
    assert msg.step >= msg.width * channels * np.dtype(kind).itemsize
    assert len(data) == msg.step * msg.height
    native = reference_decode(msg.height, msg.width, msg.encoding, bool(msg.is_bigendian),
                              msg.step, data)
    if want == 'native':
        np.testing.assert_array_equal(got, native[:, :, 0] if channels == 1 else native)
    else:
        np.testing.assert_array_equal(
            got, expected_rgb(native[:, :, 0] if channels == 1 else native, msg.encoding))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(['jpeg', 'png', 'rgb8; jpeg compressed bgr8']))
def test_fuzzed_compressed_bytes_raise_image_decode_error(payload, fmt):
    try:
        out = decode_compressed(SimpleNamespace(format=fmt, data=payload))
    except ImageDecodeError:
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3  # a real tiny image


def test_truncated_png_is_refused():
    rgb = random_native('rgb8', np.random.default_rng(6), height=8, width=8)
    ok, png = cv2.imencode('.png', rgb)
    for cut in (8, 30, len(png) // 2, len(png) - 13):
        with pytest.raises(ImageDecodeError):
            decode_compressed(compressed(png.tobytes()[:cut], 'png'))
