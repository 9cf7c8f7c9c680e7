"""Write synthetic road scenes in the exact StreetHazards folder layout (methods.md §6)."""

from collections.abc import Iterator
from contextlib import contextmanager
import json
from pathlib import Path
import shutil
import tempfile
import time
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from anomaly_seg_node.errors import DataError
from anomaly_seg_node.labels import RAW_ANOMALY_ID
from training.synth.scene import ANOMALY_AREA_RANGE, ANOMALY_FAMILIES, render_scene

GENERATOR_VERSION = '1.0'

# split -> (top folder, images sub-folder, towns, rng stream id)
SPLITS: dict[str, tuple[str, str, tuple[str, ...], int]] = {
    'train': ('train', 'training', ('t1', 't2', 't3'), 0),
    'val': ('train', 'validation', ('t4',), 1),
    'test': ('test', 'test', ('t5', 't6'), 2),
}
ANOMALIES_PER_TEST_IMAGE = (1, 1, 2, 2, 3)  # drawn uniformly: 1.8 on average before occlusion


def check_size(size: tuple[int, int], minimum: int = 32) -> tuple[int, int]:
    """(h, w) as ints, or a DataError naming the allowed range."""
    h, w = (int(v) for v in size)
    if h < minimum or w < minimum or h > 4096 or w > 4096:
        raise DataError(f'image size must be between {minimum} and 4096 pixels per side, got '
                        f'{h}x{w}; pass --size HxW such as 360x640')
    return h, w


def check_seed(seed: int) -> int:
    """A non-negative seed (numpy's SeedSequence takes no negative entropy)."""
    if int(seed) < 0:
        raise DataError(f'seed must be a non-negative integer, got {seed}; pass --seed 0 or more')
    return int(seed)


@contextmanager
def staged_output(out: Path | str, overwrite: bool) -> Iterator[Path]:
    """Yield a not-yet-existing path beside `out`; on success it replaces `out` atomically.

    A crash leaves only a hidden `.NAME.tmp-*` folder, never a half-written `out`.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        if out.is_file() or any(out.iterdir()):
            raise DataError(f'output {out} exists and is not empty; pass --overwrite to replace '
                            'it or choose another --out')
    out.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
    try:
        yield holder / out.name
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        (holder / out.name).rename(out)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def write_png(path: Path, array: np.ndarray) -> None:
    """Write an RGB (H, W, 3) or single-channel (H, W) uint8 array as PNG."""
    data = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    if not cv2.imwrite(str(path), data):
        raise DataError(f'could not write {path}; check that the folder is writable and has space')


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The per-image generator: a function of (seed, split, index) only."""
    return np.random.default_rng([seed, SPLITS[split][3], index])


def split_files(split: str, count: int) -> list[tuple[str, str]]:
    """(town, file name) for each image of a split, towns taken in turn."""
    towns = SPLITS[split][2]
    return [(towns[i % len(towns)], f'{i:05d}.png') for i in range(count)]


def write_dataset(out: Path | str, train: int, val: int, test: int,
                  size: tuple[int, int] = (360, 640), seed: int = 0, overwrite: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Write DIR/{train,test}/{images,annotations}/... and DIR/synth.json; return the manifest."""
    counts = {'train': int(train), 'val': int(val), 'test': int(test)}
    if any(c < 0 for c in counts.values()) or sum(counts.values()) == 0:
        raise DataError(f'image counts must be >= 0 and not all zero, got {counts}; '
                        'pass e.g. --train 60 --val 20 --test 20')
    size, seed = check_size(size), check_seed(seed)
    anomaly_pixels = test_pixels = 0
    start = time.perf_counter()
    with staged_output(out, overwrite) as root:
        bar = tqdm(total=sum(counts.values()), desc='synth dataset', unit='img',
                   disable=not progress)
        for split, count in counts.items():
            top, sub, _, _ = SPLITS[split]
            for index, (town, name) in enumerate(split_files(split, count)):
                rng = image_rng(seed, split, index)
                n_anomalies = 0
                if split == 'test':
                    n_anomalies = int(rng.choice(ANOMALIES_PER_TEST_IMAGE))
                image, label = render_scene(rng, size, n_anomalies)
                for kind, array in (('images', image), ('annotations', label)):
                    folder = root / top / kind / sub / town
                    folder.mkdir(parents=True, exist_ok=True)
                    write_png(folder / name, array)
                if split == 'test':
                    anomaly_pixels += int((label == RAW_ANOMALY_ID).sum())
                    test_pixels += label.size
                bar.update(1)
        bar.close()
        manifest = {
            'generator': 'anomaly_seg synth dataset', 'version': GENERATOR_VERSION,
            'layout': 'StreetHazards', 'seed': seed, 'size': list(size), 'counts': counts,
            'towns': {split: list(SPLITS[split][2]) for split in SPLITS},
            'test_anomaly_pixel_share': anomaly_pixels / test_pixels if test_pixels else 0.0,
            'anomaly_families': list(ANOMALY_FAMILIES),
            'anomaly_area_range': list(ANOMALY_AREA_RANGE),
        }
        (root / 'synth.json').write_text(json.dumps(manifest, indent=2) + '\n')
    seconds = time.perf_counter() - start
    total = sum(counts.values())
    return {**manifest, 'out': str(out), 'seconds': round(seconds, 3),
            'images_per_second': round(total / seconds, 2) if seconds > 0 else None}
