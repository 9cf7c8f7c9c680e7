"""Synthetic negatives in the ADE20k layout: `images/training/*.jpg`, `annotations/training/*.png`.

The objects come from families the test anomalies never use (scene.py), so methods trained with
real negatives do not train on the test distribution:
- shapes: convex only -- axis-aligned and rotated rectangles, ellipses, triangles and regular
  convex polygons (the anomalies are all non-convex: stars, rings, crescents, spiky blobs,
  crosses);
- textures: synthetic patterns -- stripes, checkerboards, polka dots, linear gradients and plaid in
  saturated colours drawn in HSV -- and, for a share of the surfaces (`material_share`), plain
  everyday materials: a muted colour with smooth shading and grain, as paint, wood, fabric or
  concrete look in real ADE20k images. The anomalies wear the road scene's own inlier materials,
  drawn by scene.py; this generator has its own colour and noise model.
Patterns alone teach the outlier head a shortcut (saturated pattern = outlier) that does not carry
over to anomalies in ordinary materials; training/README.md has the measurement.
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
MATERIAL = 'material'  # texture family of plain materials, drawn with probability material_share
TEXTURE_FAMILIES = (*NEGATIVE_TEXTURES, MATERIAL)
DEFAULT_MATERIAL_SHARE = 0.5
MATERIAL_IDS = (147, 148, 149, 150)  # one ADE20k-style class id per shape family
BACKGROUND_IDS = (1, 4, 6)  # ADE20k wall, floor, ceiling
NEGATIVES_STREAM = 4


def _colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.integers(0, 180), rng.integers(150, 256), rng.integers(120, 256)]]],
                   np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Unit-variance (h, w) float32 noise with about `cells` blobs along the longer side."""
    if h == 0 or w == 0:  # an empty background band (both cuts on one row): cv2 refuses size 0
        return np.zeros((h, w), np.float32)
    gh = max(2, int(np.ceil(cells * h / max(h, w))) + 1)
    gw = max(2, int(np.ceil(cells * w / max(h, w))) + 1)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    field = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def material(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A (h, w, 3) float32 plain material: a muted colour, smooth shading and grain."""
    hsv = np.array([[[rng.integers(0, 180), rng.integers(0, 140), rng.integers(40, 235)]]],
                   np.uint8)
    colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
    shading = rng.uniform(4, 24) * _smooth_noise(rng, h, w, rng.uniform(2, 8))
    grain = rng.uniform(2, 12) * rng.standard_normal((h, w)).astype(np.float32)
    return colour + (shading + grain)[..., None]


def texture(rng: np.random.Generator, family: str, h: int, w: int) -> np.ndarray:
    """A (h, w, 3) float32 surface of one texture family: a pattern in two saturated colours,
    or a plain material for family MATERIAL."""
    if family == MATERIAL:
        return material(rng, h, w)
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
        mix = (t - t.min(initial=np.inf)) / max(float(np.ptp(t)) if t.size else 0.0, 1.0)
    elif family == 'plaid':
        mix = 0.5 * ((np.mod(xx, period) < period / 3).astype(np.float32)
                     + (np.mod(yy, period * 1.3) < period / 3).astype(np.float32))
    else:
        raise ValueError(f'unknown texture family {family!r}; expected one of '
                         f'{TEXTURE_FAMILIES}')
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


def _texture_index(rng: np.random.Generator, material_share: float) -> int:
    """Index into NEGATIVE_TEXTURES, or len(NEGATIVE_TEXTURES) for a plain material."""
    # share 0 draws nothing extra: pattern-only folders stay identical to generator 1.0's
    if material_share > 0 and rng.random() < material_share:
        return len(NEGATIVE_TEXTURES)
    return int(rng.integers(len(NEGATIVE_TEXTURES)))


def render_negative(rng: np.random.Generator, size: tuple[int, int],
                    material_share: float = DEFAULT_MATERIAL_SHARE) -> tuple[np.ndarray,
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
        family = TEXTURE_FAMILIES[_texture_index(rng, material_share)]
        img[top:bottom] = texture(rng, family, bottom - top, w) * 0.6 + 40
        lab[top:bottom] = cls
    for cut in cuts:
        lab[max(cut - 1, 0):cut + 1] = 0
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(4, 11))):
        shape = int(rng.integers(len(NEGATIVE_SHAPES)))
        tex = _texture_index(rng, material_share)
        # a class id per (shape, pattern) pair plus a random offset (7..146): many ids, stable
        # families; plain materials get one id per shape (147..150)
        if tex < len(NEGATIVE_TEXTURES):
            cls = 7 + (shape * len(NEGATIVE_TEXTURES) + tex) * 7 + int(rng.integers(7))
        else:
            cls = MATERIAL_IDS[0] + shape
        pts = convex_shape(rng, NEGATIVE_SHAPES[shape], h, w)
        mask[:] = 0
        cv2.fillPoly(mask, [(pts * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
        sel = mask > 0
        img[sel] = texture(rng, TEXTURE_FAMILIES[tex], h, w)[sel]
        lab[sel] = cls
    img += rng.normal(0, rng.uniform(1, 6), img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), lab


def write_negatives(out: Path | str, n: int, size: tuple[int, int] = (384, 512), seed: int = 0,
                    overwrite: bool = False, progress: bool = True,
                    material_share: float = DEFAULT_MATERIAL_SHARE) -> dict[str, Any]:
    """Write DIR/images/training/*.jpg, DIR/annotations/training/*.png and DIR/synth.json."""
    if int(n) < 1:
        raise DataError(f'the number of negative images must be >= 1, got {n}; pass --n 50')
    if not 0.0 <= float(material_share) <= 1.0:
        raise DataError(f'the share of plain materials must lie in [0, 1], got {material_share}; '
                        'pass --material-share 0.5')
    size, seed = check_size(size), check_seed(seed)
    start = time.perf_counter()
    classes: set[int] = set()
    with staged_output(out, overwrite) as root:
        images, annotations = root / 'images' / 'training', root / 'annotations' / 'training'
        images.mkdir(parents=True)
        annotations.mkdir(parents=True)
        for index in tqdm(range(int(n)), desc='synth negatives', unit='img', disable=not progress):
            rng = np.random.default_rng([seed, NEGATIVES_STREAM, index])
            image, label = render_negative(rng, size, float(material_share))
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
            'texture_families': list(TEXTURE_FAMILIES),
            'material_share': float(material_share),
        }
        (root / 'synth.json').write_text(json.dumps(manifest, indent=2) + '\n')
    return {**manifest, 'out': str(out), 'seconds': round(time.perf_counter() - start, 3)}
