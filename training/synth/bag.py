"""A forward drive through one synthetic street, written as a real rosbag2 with `rosbags`.

Topics (ROS 2 Humble message definitions), one message each per frame, all with the same header:
`/camera/image_raw` (sensor_msgs/Image), `/camera/image_raw/compressed` (sensor_msgs/
CompressedImage, jpeg; only with `compressed=True`), `/camera/camera_info` (sensor_msgs/
CameraInfo) and `/camera/labels` (mono8 sensor_msgs/Image of raw StreetHazards ids).
Bag timestamps equal the header stamps.
"""

import json
from pathlib import Path
import time
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from anomaly_seg_node.errors import BagError, DataError
from anomaly_seg_node.labels import RAW_ANOMALY_ID
from training.synth.dataset import GENERATOR_VERSION, check_seed, check_size, staged_output
from training.synth.scene import Camera, render, sample_camera, sample_world

FRAME_ID = 'camera_optical_frame'
TOPICS = {
    'image': '/camera/image_raw',
    'compressed': '/camera/image_raw/compressed',
    'info': '/camera/camera_info',
    'labels': '/camera/labels',
}
ENCODINGS = ('rgb8', 'bgr8', 'mono8')
STORAGES = ('mcap', 'sqlite3')
START_NS = 1_700_000_000 * 10 ** 9  # a fixed epoch keeps bags byte-reproducible
BAG_STREAM = 3


def encode_frame(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> the pixel layout of a sensor_msgs/Image encoding."""
    if encoding == 'rgb8':
        return rgb
    if encoding == 'bgr8':
        return np.ascontiguousarray(rgb[..., ::-1])
    if encoding == 'mono8':
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    raise DataError(f'image encoding must be one of {ENCODINGS}, got {encoding!r}')


def drive(frames: int, size: tuple[int, int], seed: int, rate_hz: float
          ) -> tuple[Camera, list[float], Any]:
    """The camera, the camera travel per frame (metres) and the world of a drive."""
    rng = np.random.default_rng([seed, BAG_STREAM])
    cam = sample_camera(rng, size)
    cam.vx = size[1] * (0.5 + rng.uniform(-0.04, 0.04))  # looking down the road
    speed = rng.uniform(7.0, 12.0)  # m/s
    travel = [i * speed / rate_hz for i in range(frames)]
    ahead = travel[-1] + 40.0
    n_anomalies = 1 + frames // 10
    world = sample_world(rng, cam, length=ahead + 170.0, n_anomalies=n_anomalies,
                         anomaly_z=(12.0, max(ahead, 30.0)))
    return cam, travel, world


def _messages(ts: Any) -> dict[str, Any]:
    types = ts.types
    return {k: types[f'{pkg}/msg/{name}'] for k, pkg, name in (
        ('Image', 'sensor_msgs', 'Image'), ('CompressedImage', 'sensor_msgs', 'CompressedImage'),
        ('CameraInfo', 'sensor_msgs', 'CameraInfo'), ('ROI', 'sensor_msgs', 'RegionOfInterest'),
        ('Header', 'std_msgs', 'Header'), ('Time', 'builtin_interfaces', 'Time'))}


def camera_info(msgs: dict[str, Any], header: Any, cam: Camera) -> Any:
    """sensor_msgs/CameraInfo of the renderer's distortion-free pinhole camera."""
    return pinhole_info(msgs, header, cam.intrinsics(), cam.height, cam.width)


def pinhole_info(msgs: dict[str, Any], header: Any, k: np.ndarray, height: int,
                 width: int) -> Any:
    """sensor_msgs/CameraInfo of a distortion-free pinhole camera with 3x3 intrinsics `k`."""
    p = np.concatenate([k, np.zeros((3, 1))], 1)
    return msgs['CameraInfo'](
        header=header, height=height, width=width, distortion_model='plumb_bob',
        d=np.zeros(5), k=k.reshape(-1), r=np.eye(3).reshape(-1), p=p.reshape(-1),
        binning_x=0, binning_y=0,
        roi=msgs['ROI'](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))


def image_msg(msgs: dict[str, Any], header: Any, array: np.ndarray, encoding: str) -> Any:
    """sensor_msgs/Image of a packed (H, W) or (H, W, C) uint8 array."""
    h, w = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    return msgs['Image'](header=header, height=h, width=w, encoding=encoding, is_bigendian=0,
                         step=w * channels, data=np.ascontiguousarray(array).reshape(-1))


class FrameBagWriter:
    """Writes camera frames (image, optional jpeg, camera_info, labels) into an open rosbag2.

    `writer` is a `rosbags.rosbag2.Writer` that is open; every frame's messages share one header.
    """

    def __init__(self, writer: Any, encoding: str, compressed: bool) -> None:
        from rosbags.typesys import Stores, get_typestore

        self.ts = get_typestore(Stores.ROS2_HUMBLE)
        self.msgs = _messages(self.ts)
        self.writer = writer
        self.encoding = encoding
        self.compressed = compressed
        image_type = self.msgs['Image'].__msgtype__
        self.conn = {
            'image': writer.add_connection(TOPICS['image'], image_type, typestore=self.ts),
            'info': writer.add_connection(TOPICS['info'], self.msgs['CameraInfo'].__msgtype__,
                                          typestore=self.ts),
            'labels': writer.add_connection(TOPICS['labels'], image_type, typestore=self.ts)}
        if compressed:
            self.conn['compressed'] = writer.add_connection(
                TOPICS['compressed'], self.msgs['CompressedImage'].__msgtype__,
                typestore=self.ts)

    def write(self, stamp: int, rgb: np.ndarray, label: np.ndarray, info: Any) -> None:
        """One frame at `stamp` (ns); `info(msgs, header)` makes its sensor_msgs/CameraInfo."""
        msgs = self.msgs
        header = msgs['Header'](stamp=msgs['Time'](sec=stamp // 10 ** 9, nanosec=stamp % 10 ** 9),
                                frame_id=FRAME_ID)
        pixels = encode_frame(rgb, self.encoding)
        out_msgs = [('image', image_msg(msgs, header, pixels, self.encoding)),
                    ('info', info(msgs, header)),
                    ('labels', image_msg(msgs, header, label, 'mono8'))]
        if self.compressed:
            bgr_or_grey = pixels if self.encoding == 'mono8' else encode_frame(rgb, 'bgr8')
            ok, jpeg = cv2.imencode('.jpg', bgr_or_grey, [cv2.IMWRITE_JPEG_QUALITY, 90])
            if not ok:
                raise DataError(f'OpenCV could not JPEG-encode the frame at {stamp} ns')
            out_msgs.append(('compressed', msgs['CompressedImage'](
                header=header, format='jpeg', data=jpeg.reshape(-1))))
        for key, msg in out_msgs:
            self.writer.write(self.conn[key], stamp, self.ts.serialize_cdr(msg, msg.__msgtype__))


def check_bag_options(storage: str, encoding: str) -> Any:
    """The rosbags storage plugin of `storage`, or BagError / DataError naming the choices."""
    from rosbags.rosbag2.enums import StoragePlugin

    if storage not in STORAGES:
        raise BagError(f'bag storage must be one of {STORAGES}, got {storage!r}; '
                       'pass --storage mcap or --storage sqlite3')
    if encoding not in ENCODINGS:
        raise DataError(f'image encoding must be one of {ENCODINGS}, got {encoding!r}; '
                        'pass --encoding rgb8, bgr8 or mono8')
    return StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3


def write_bag(out: Path | str, frames: int, size: tuple[int, int] = (360, 640),
              storage: str = 'mcap', encoding: str = 'rgb8', compressed: bool = False,
              seed: int = 0, rate_hz: float = 10.0, overwrite: bool = False,
              progress: bool = True) -> dict[str, Any]:
    """Write a drive of `frames` frames to the rosbag2 folder `out`; return its manifest."""
    from rosbags.rosbag2 import Writer

    plugin = check_bag_options(storage, encoding)
    if int(frames) < 1:
        raise DataError(f'a bag needs at least 1 frame, got {frames}; pass --frames 50')
    if not rate_hz > 0 or not np.isfinite(rate_hz):
        raise DataError(f'the frame rate must be a positive number of Hz, got {rate_hz}; '
                        'pass --rate 10')
    size, seed = check_size(size), check_seed(seed)
    start = time.perf_counter()
    cam, travel, world = drive(int(frames), size, seed, float(rate_hz))
    period_ns = int(round(1e9 / rate_hz))
    anomaly_frames = 0
    manifest = {
        'generator': 'anomaly_seg synth bag', 'version': GENERATOR_VERSION, 'seed': seed,
        'size': list(size), 'frames': int(frames), 'rate_hz': float(rate_hz),
        'storage': storage, 'encoding': encoding, 'compressed': bool(compressed),
        'frame_id': FRAME_ID, 'topics': {k: v for k, v in TOPICS.items()
                                         if compressed or k != 'compressed'},
        'start_ns': START_NS, 'speed_m_per_frame': travel[1] - travel[0] if frames > 1 else 0.0,
    }
    with staged_output(out, overwrite) as path:
        with Writer(path, version=8, storage_plugin=plugin) as writer:
            frame_writer = FrameBagWriter(writer, encoding, compressed)
            for i in tqdm(range(int(frames)), desc='synth bag', unit='frame',
                          disable=not progress):
                cam.z = travel[i]
                rgb, label = render(world, cam, np.random.default_rng([seed, BAG_STREAM, i]))
                anomaly_frames += bool((label == RAW_ANOMALY_ID).any())
                frame_writer.write(START_NS + i * period_ns, rgb, label,
                                   lambda msgs, header: camera_info(msgs, header, cam))
            manifest['frames_with_anomaly'] = anomaly_frames
            writer.set_custom_data('anomaly_seg.synth', json.dumps(manifest, sort_keys=True))
    return {**manifest, 'out': str(out), 'seconds': round(time.perf_counter() - start, 3)}
