"""Anomalies pasted into real road frames: a development test set on CamVid (`synth paste`).

Real road data sets with pixel anomaly labels are test sets the project must not tune on, so
development uses real CamVid frames with the synthetic generator's *test* anomalies pasted in:
the non-convex shape families (star, ring, crescent, spiky, cross) in the inlier-like materials
of `scene.sample_material`. Never the negatives' family (convex shapes in patterns or
`synth negatives` materials), so a model trained on those negatives is not trained on this test
distribution.

An object stands on the road (or, one time in four, on the pavement) at a pixel the labels mark
as such; its height in pixels follows a flat-ground perspective from the horizon (the topmost
road row) and a size of 0.3-2 m for a camera 1.4 m above the road. It is shaded like the
renderer's sprites (light from above, object-anchored texture, grain), matched to the frame's
brightness, given a contact shadow, anti-aliased edges and the frame's blur. The label map gets
`CAMVID_ANOMALY_ID` where the object covers at least half a pixel.

Each frame's objects are a function of (seed, frame name) only, so a subset of frames (the
demo's sample) gets the same objects as the full split. Torch-free: numpy and OpenCV.
"""

import hashlib
import json
from pathlib import Path
import re
import time
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from anomaly_seg_node.errors import DataError
from anomaly_seg_node.labels import CAMVID_ANOMALY_ID, CAMVID_CLASS_NAMES
from training.data.camvid_layout import check_camvid_ids, index_split, sequence_of
from training.data.image_io import read_pair
from training.synth.dataset import (
    ANOMALIES_PER_TEST_IMAGE,
    GENERATOR_VERSION,
    check_seed,
    staged_output,
    write_png,
)
from training.synth.scene import (
    ANOMALY_FAMILIES,
    ANOMALY_MATERIAL_SOURCES,
    anomaly_shape,
    sample_material,
)

PASTE_STREAM = 7
ROAD = CAMVID_CLASS_NAMES.index('road')
PAVEMENT = CAMVID_CLASS_NAMES.index('pavement')
ON_ROAD_SHARE = 0.75
CAMERA_HEIGHT_M = 1.4
SIZE_RANGE_M = (0.3, 2.0)
MIN_SIDE_PX = 10
MAX_SIDE_SHARE = 0.6  # of the frame height
SUPERSAMPLE = 4  # edge anti-aliasing
CAMVID_FPS = 30.0  # frame numbers in CamVid file names count video frames at 30 Hz
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')


def frame_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one frame's objects: a function of (seed, frame name) only."""
    digest = int.from_bytes(hashlib.sha256(Path(name).stem.encode()).digest()[:8], 'little')
    return np.random.default_rng([seed, PASTE_STREAM, digest])


def frame_number(name: str) -> int | None:
    """The video frame of a CamVid file name ('Seq05VD_f01950.png' -> 1950), None if none."""
    match = re.search(r'_f?(\d+)$', Path(name).stem)
    return int(match[1]) if match else None


def paste_anomalies(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                    count: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Paste `count` objects into an RGB uint8 frame and its CamVid id map.

    Returns (image, label, objects placed); an object that finds no ground to stand on is
    skipped.
    """
    image = image.astype(np.float32)
    label = label.copy()
    brightness = float(np.median(image @ np.array([0.299, 0.587, 0.114], np.float32)))
    placed = 0
    for _ in range(count):
        spot = _base_point(label, rng)
        if spot is None:
            continue
        placed += _paste_one(image, label, rng, spot, brightness)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), label, placed


def _base_point(label: np.ndarray, rng: np.random.Generator
                ) -> tuple[int, int, int] | None:
    """(row, column, horizon row) of a ground pixel where an object stands, or None."""
    h = label.shape[0]
    road = label == ROAD
    horizon = int(np.argmax(road.any(axis=1))) if road.any() else int(0.45 * h)
    wanted = ROAD if rng.random() < ON_ROAD_SHARE else PAVEMENT
    ground = label == wanted
    if not ground.any():
        ground = road if road.any() else None
    if ground is None:
        return None
    rows, cols = np.nonzero(ground)
    # Far below the horizon only: an object at the horizon row would have no size.
    near = rows > horizon + 0.08 * h
    if not near.any():
        return None
    pick = int(rng.integers(int(near.sum())))
    return int(rows[near][pick]), int(cols[near][pick]), horizon


def _paste_one(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
               spot: tuple[int, int, int], brightness: float) -> int:
    h, w = label.shape
    row, col, horizon = spot
    family = ANOMALY_FAMILIES[rng.integers(len(ANOMALY_FAMILIES))]
    parts = anomaly_shape(rng, family)
    size_m = float(np.exp(rng.uniform(*np.log(SIZE_RANGE_M))))
    side = (row - horizon) * size_m / CAMERA_HEIGHT_M
    side = float(np.clip(side, MIN_SIDE_PX, MAX_SIDE_SHARE * h))
    kinds = list(ANOMALY_MATERIAL_SOURCES)
    weights = np.array(list(ANOMALY_MATERIAL_SOURCES.values()))
    material = sample_material(rng, kinds[rng.choice(len(kinds), p=weights / weights.sum())])

    # The object's box in the frame (shape units: width 1 centred on u=0, base v=0, height ~1).
    pts = [(np.stack([col + p[:, 0] * side, row - p[:, 1] * side], 1), erase)
           for p, erase in parts]
    allp = np.concatenate([p for p, _ in pts])
    c0 = max(int(np.floor(allp[:, 0].min())) - 1, 0)
    c1 = min(int(np.ceil(allp[:, 0].max())) + 2, w)
    r0 = max(int(np.floor(allp[:, 1].min())) - 1, 0)
    r1 = min(int(np.ceil(allp[:, 1].max())) + 2, h)
    if c1 - c0 < 2 or r1 - r0 < 2:
        return 0
    bh, bw = r1 - r0, c1 - c0
    alpha = _coverage(pts, (r0, c0), (bh, bw))
    if not (alpha >= 0.5).any():
        return 0

    # Shading as the renderer's sprites: object-anchored low-frequency cells, grain, light
    # from above; then matched to the frame's exposure (CamVid frames are dark).
    cells = rng.standard_normal((6, 6)).astype(np.float32)
    low = cv2.resize(cells, (bw, bh), interpolation=cv2.INTER_CUBIC)
    fine = rng.standard_normal((bh, bw)).astype(np.float32)
    lum = material.amp * low + material.grain * fine
    colour = material.colour.astype(np.float32)[None, None] + lum[..., None]
    colour *= np.linspace(1.08, 0.9, bh, dtype=np.float32)[:, None, None]
    colour *= float(np.clip(brightness / 115.0, 0.35, 1.25))
    colour = cv2.GaussianBlur(colour, (3, 3), 0.7)

    _contact_shadow(image, label, rng, row, col, side, alpha.shape[1] / side)
    region = image[r0:r1, c0:c1]
    region += alpha[..., None] * (colour - region)
    label[r0:r1, c0:c1][alpha >= 0.5] = CAMVID_ANOMALY_ID
    return 1


def _coverage(pts: list[tuple[np.ndarray, bool]], origin: tuple[int, int],
              size: tuple[int, int]) -> np.ndarray:
    """Share of each pixel of the box the shape covers, float32 [bh, bw] in [0, 1]."""
    bh, bw = size
    mask = np.zeros((bh * SUPERSAMPLE, bw * SUPERSAMPLE), np.uint8)
    for p, erase in pts:
        q = (p - [origin[1], origin[0]]) * SUPERSAMPLE
        cv2.fillPoly(mask, [(q * 16).round().astype(np.int32)], 0 if erase else 1,
                     cv2.LINE_8, 4)
    return cv2.resize(mask.astype(np.float32), (bw, bh), interpolation=cv2.INTER_AREA)


def _contact_shadow(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                    row: int, col: int, side: float, width_factor: float) -> None:
    """Darken an ellipse of ground under the object's base (not the sky or buildings)."""
    h, w = label.shape
    shade = np.zeros((h, w), np.float32)
    axes = (max(2, int(0.45 * side * width_factor)), max(1, int(0.08 * side)))
    cv2.ellipse(shade, (col, row), axes, 0, 0, 360, 1.0, -1)
    shade = cv2.GaussianBlur(shade, (0, 0), max(1.0, 0.04 * side))
    shade *= np.isin(label, (ROAD, PAVEMENT))
    image *= 1.0 - float(rng.uniform(0.25, 0.5)) * shade[..., None]


def list_frames(folder: Path) -> list[Path]:
    """Image files of a folder (png, jpg), sorted by name."""
    if not folder.is_dir():
        raise DataError(f'missing image folder {folder}')
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not frames:
        raise DataError(f'no images (*.png, *.jpg) in {folder}')
    return frames


def write_pasted(camvid: Path | str, out: Path | str, split: str = 'test', seed: int = 0,
                 limit: int | None = None, bag: Path | str | None = None,
                 storage: str = 'mcap', overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Paste anomalies into the `split` frames of the CamVid folder `camvid`.

    Writes `out/<split>/NAME.png`, `out/<split>annot/NAME.png` (CamVid ids plus
    CAMVID_ANOMALY_ID) and `out/paste.json`; with `bag`, also a rosbag2 drive of the same frames
    in name order, stamped by their video frame numbers (`synth bag`'s topics; labels are CamVid
    ids: replay them with `--labels camvid`). Returns the manifest.
    """
    seed = check_seed(seed)
    if limit is not None and limit < 1:
        raise DataError(f'--limit must be positive, got {limit}')
    samples = index_split(Path(camvid), split)[:limit]
    start = time.perf_counter()
    anomaly = total = objects = 0
    written: list[tuple[str, np.ndarray, np.ndarray]] = []
    with staged_output(out, overwrite) as root:
        (root / split).mkdir(parents=True)
        (root / f'{split}annot').mkdir()
        for image_path, label_path in tqdm(samples, desc='synth paste', unit='img',
                                           disable=not progress):
            item = _read(image_path, label_path)
            count = int(frame_rng(seed, image_path.name).choice(ANOMALIES_PER_TEST_IMAGE))
            rgb, ids, placed = paste_anomalies(
                *item, frame_rng(seed, image_path.name + '/objects'), count)
            name = image_path.stem + '.png'
            write_png(root / split / name, rgb)
            write_png(root / f'{split}annot' / name, ids)
            anomaly += int((ids == CAMVID_ANOMALY_ID).sum())
            total += ids.size
            objects += placed
            if bag is not None:
                written.append((name, rgb, ids))
        manifest = {
            'generator': 'anomaly_seg synth paste', 'version': GENERATOR_VERSION,
            'layout': 'CamVid', 'source': str(camvid), 'split': split, 'seed': seed,
            'frames': len(samples), 'objects': objects,
            'sequences': sorted({sequence_of(p) for p, _ in samples}),
            'anomaly_id': CAMVID_ANOMALY_ID, 'anomaly_pixel_share': anomaly / max(total, 1),
            'anomaly_families': list(ANOMALY_FAMILIES),
        }
        (root / 'paste.json').write_text(json.dumps(manifest, indent=2) + '\n')
    if bag is not None:
        manifest['bag'] = write_frames_bag(bag, written, storage=storage, overwrite=overwrite,
                                           custom=manifest)
    return {**manifest, 'out': str(out), 'seconds': round(time.perf_counter() - start, 2)}


def write_frames_bag(out: Path | str, frames: list[tuple[str, np.ndarray, np.ndarray]],
                     storage: str = 'mcap', overwrite: bool = False,
                     custom: dict[str, Any] | None = None) -> dict[str, Any]:
    """A rosbag2 of (name, RGB frame, CamVid id map) in the given order, `synth bag`'s topics.

    Stamps come from the video frame numbers in the names (30 Hz video) where every name has
    one and they increase; otherwise frames are 1 s apart.
    """
    from rosbags.rosbag2 import Writer

    from training.synth.bag import START_NS, FrameBagWriter, check_bag_options

    plugin = check_bag_options(storage, 'rgb8')
    if not frames:
        raise DataError('a bag needs at least one frame')
    numbers = [frame_number(name) for name, _, _ in frames]
    if None not in numbers and all(b > a for a, b in zip(numbers, numbers[1:], strict=False)):
        stamps = [START_NS + round((n - numbers[0]) * 1e9 / CAMVID_FPS) for n in numbers]
    else:
        stamps = [START_NS + i * 10 ** 9 for i in range(len(frames))]
    with staged_output(out, overwrite) as path:
        with Writer(path, version=8, storage_plugin=plugin) as writer:
            frame_writer = FrameBagWriter(writer, 'rgb8', compressed=True)
            for stamp, (_, rgb, ids) in zip(stamps, frames, strict=True):
                frame_writer.write(stamp, rgb, ids, _nominal_info(ids.shape))
            writer.set_custom_data('anomaly_seg.synth', json.dumps(custom or {}, sort_keys=True))
    period = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1) / 1e9
    return {'out': str(out), 'frames': len(frames), 'storage': storage,
            'mean_period_s': round(period, 4), 'labels': 'camvid'}


def _nominal_info(size: tuple[int, int]) -> Any:
    """CamVid publishes no calibration: a pinhole with a 60 degree horizontal view."""
    from training.synth.bag import pinhole_info

    h, w = size
    f = 0.5 * w / np.tan(np.radians(30.0))
    k = np.array([[f, 0.0, w / 2], [0.0, f, h / 2], [0.0, 0.0, 1.0]])
    return lambda msgs, header: pinhole_info(msgs, header, k, h, w)


def _read(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    image, label = read_pair(image_path, label_path)
    check_camvid_ids(label, label_path)
    return image, label
