"""Synthetic negatives in the ADE20k layout: `images/training/*.jpg`, `annotations/training/*.png`.

The objects come from families the test anomalies never use (scene.py), so methods trained with
real negatives do not train on the test distribution:
- shapes: convex only -- axis-aligned and rotated rectangles, ellipses, triangles and regular
  convex polygons (the anomalies are all non-convex: stars, rings, crescents, spiky blobs,
  crosses);
- textures: synthetic patterns -- stripes, checkerboards, polka dots, linear gradients and plaid in
  saturated colours drawn in HSV (the anomalies wear the road scene's own inlier materials:
  a flat colour with smooth and grain noise).
Label maps hold ADE20k-style class ids 0..150 (0 = unlabelled); every image has several classes.
"""

import json
from pathlib import Path
import time
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from anomaly_seg_node.errors import DataError
from training.synth.dataset import (
    GENERATOR_VERSION,
    check_seed,
    check_size,
    staged_output,
)

NEGATIVE_SHAPES = ('rectangle', 'ellipse', 'triangle', 'polygon')
NEGATIVE_TEXTURES = ('stripes', 'checker', 'dots', 'gradient', 'plaid')
N_CLASSES = 150
BACKGROUND_IDS = (1, 4, 6)  # ADE20k wall, floor, ceiling
NEGATIVES_STREAM = 4


def _colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.integers(0, 180), rng.integers(150, 256), rng.integers(120, 256)]]],
                   np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def texture(rng: np.random.Generator, family: str, h: int, w: int) -> np.ndarray:
    """A (h, w, 3) float32 pattern of one texture family in two saturated colours."""
    a, b = _colour(rng), _colour(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, np.pi)
    period = rng.uniform(6, 24)
    t = xx * np.cos(ang) + yy * np.sin(ang)
    if family == 'stripes':
        mix = (np.mod(t, period) < period / 2).astype(np.float32)
    elif family == 'checker':
        mix = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
    elif family == 'dots':
        r = period * rng.uniform(0.2, 0.4)
        mix = (np.hypot(np.mod(xx, period) - period / 2, np.mod(yy, period) - period / 2)
               < r).astype(np.float32)
    elif family == 'gradient':
        mix = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    elif family == 'plaid':
        mix = 0.5 * ((np.mod(xx, period) < period / 3).astype(np.float32)
                     + (np.mod(yy, period * 1.3) < period / 3).astype(np.float32))
    else:
        raise ValueError(f'unknown texture family {family!r}; expected one of {NEGATIVE_TEXTURES}')
    return a * (1 - mix[..., None]) + b * mix[..., None]


def convex_shape(rng: np.random.Generator, family: str, h: int, w: int) -> np.ndarray:
    """Polygon (N, 2) in pixels of one convex shape family inside an h x w image."""
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    r = rng.uniform(0.06, 0.3) * min(h, w)
    rot = rng.uniform(0, 2 * np.pi)
    if family == 'rectangle':
        a, b = r, r * rng.uniform(0.4, 1.0)
        pts = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
    elif family == 'ellipse':
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([r * np.cos(t), r * rng.uniform(0.4, 1.0) * np.sin(t)], 1)
    elif family == 'triangle':
        t = np.sort(rng.uniform(0, 2 * np.pi, 3))
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif family == 'polygon':
        k = int(rng.integers(5, 9))
        t = np.linspace(0, 2 * np.pi, k, endpoint=False)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    else:
        raise ValueError(f'unknown shape family {family!r}; expected one of {NEGATIVE_SHAPES}')
    c, s = np.cos(rot), np.sin(rot)
    return pts @ np.array([[c, s], [-s, c]]) + [cx, cy]


def render_negative(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """One ADE20k-style image (RGB uint8) and its class-id map (uint8, 0..150)."""
    h, w = size
    img = np.zeros((h, w, 3), np.float32)
    lab = np.zeros((h, w), np.uint8)
    # background bands (ceiling / wall / floor) with a thin unlabelled seam between them
    cuts = np.sort(rng.uniform(0.15, 0.85, 2) * h).astype(int)
    bands = ((0, cuts[0]), (cuts[0], cuts[1]), (cuts[1], h))
    band_ids = (BACKGROUND_IDS[2], BACKGROUND_IDS[0], BACKGROUND_IDS[1])
    for (top, bottom), cls in zip(bands, band_ids, strict=True):
        family = NEGATIVE_TEXTURES[rng.integers(len(NEGATIVE_TEXTURES))]
        img[top:bottom] = texture(rng, family, bottom - top, w) * 0.6 + 40
        lab[top:bottom] = cls
    for cut in cuts:
        lab[max(cut - 1, 0):cut + 1] = 0
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(4, 11))):
        shape = int(rng.integers(len(NEGATIVE_SHAPES)))
        tex = int(rng.integers(len(NEGATIVE_TEXTURES)))
        # a class id per (shape, texture) pair plus a random offset: many ids, stable families
        cls = 7 + (shape * len(NEGATIVE_TEXTURES) + tex) * 7 + int(rng.integers(7))
        pts = convex_shape(rng, NEGATIVE_SHAPES[shape], h, w)
        mask[:] = 0
        cv2.fillPoly(mask, [(pts * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
        sel = mask > 0
        img[sel] = texture(rng, NEGATIVE_TEXTURES[tex], h, w)[sel]
        lab[sel] = min(cls, N_CLASSES)
    img += rng.normal(0, rng.uniform(1, 6), img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), lab


def write_negatives(out: Path | str, n: int, size: tuple[int, int] = (384, 512), seed: int = 0,
                    overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write DIR/images/training/*.jpg, DIR/annotations/training/*.png and DIR/synth.json."""
    if int(n) < 1:
        raise DataError(f'the number of negative images must be >= 1, got {n}; pass --n 50')
    size, seed = check_size(size), check_seed(seed)
    start = time.perf_counter()
    classes: set[int] = set()
    with staged_output(out, overwrite) as root:
        images, annotations = root / 'images' / 'training', root / 'annotations' / 'training'
        images.mkdir(parents=True)
        annotations.mkdir(parents=True)
        for index in tqdm(range(int(n)), desc='synth negatives', unit='img', disable=not progress):
            rng = np.random.default_rng([seed, NEGATIVES_STREAM, index])
            image, label = render_negative(rng, size)
            name = f'ADE_train_{index + 1:08d}'
            ok = cv2.imwrite(str(images / f'{name}.jpg'), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                             [cv2.IMWRITE_JPEG_QUALITY, 92])
            ok &= cv2.imwrite(str(annotations / f'{name}.png'), label)
            if not ok:
                raise DataError(f'could not write {name} under {root}; check free space')
            classes.update(int(c) for c in np.unique(label))
        manifest = {
            'generator': 'anomaly_seg synth negatives', 'version': GENERATOR_VERSION,
            'layout': 'ADE20k', 'seed': seed, 'size': list(size), 'count': int(n),
            'classes_used': sorted(classes), 'shape_families': list(NEGATIVE_SHAPES),
            'texture_families': list(NEGATIVE_TEXTURES),
        }
        (root / 'synth.json').write_text(json.dumps(manifest, indent=2) + '\n')
    return {**manifest, 'out': str(out), 'seconds': round(time.perf_counter() - start, 3)}
