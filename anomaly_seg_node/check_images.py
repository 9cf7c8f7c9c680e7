"""Check images and batched running for parity checks of exported graphs and engines.

Shared by export (training side) and build-engine (vehicle side); numpy only.
"""

from typing import Any

import numpy as np


def run_batched(runner: Any, images: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Run uint8 `[M, H, W, 3]` images through `runner` (float32 NCHW batches of `batch`)."""
    labels, scores = [], []
    for start in range(0, images.shape[0], batch):
        chunk = images[start:start + batch]
        count = chunk.shape[0]
        if count < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - count, axis=0)])
        image = np.ascontiguousarray(chunk.transpose(0, 3, 1, 2), dtype=np.float32)
        chunk_labels, chunk_scores = runner(image)
        labels.append(chunk_labels[:count])
        scores.append(chunk_scores[:count])
    return np.concatenate(labels), np.concatenate(scores)


def road_like_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Synthetic road scenes, uint8 RGB `[count, H, W, 3]`: sky, buildings, road, lanes, cars.

    Varied enough that a trained segmenter predicts several classes; deterministic per seed.
    """
    rng = np.random.default_rng(seed)
    rows = np.linspace(0.0, 1.0, height)[:, None]  # [H, 1]
    cols = np.linspace(0.0, 1.0, width)[None, :]  # [1, W]
    images = np.empty((count, height, width, 3), dtype=np.float64)
    for index in range(count):
        horizon = rng.uniform(0.35, 0.55)
        vanish = rng.uniform(0.35, 0.65)
        image = images[index]
        # Sky: a vertical gradient from blue to pale.
        image[...] = (np.array([90, 140, 210]) + rows[..., None] * np.array([120, 90, 40]))
        # Buildings: random boxes rising from the horizon.
        for _ in range(rng.integers(3, 7)):
            left, right = np.sort(rng.uniform(0, 1, 2))
            top = rng.uniform(0.05, horizon)
            box = (cols >= left) & (cols < right) & (rows >= top) & (rows < horizon)
            image[box] = rng.uniform(40, 160, 3)
        # Ground below the horizon: sidewalk, then the road as a trapezoid to the vanishing point.
        below = rows >= horizon
        depth = np.clip((rows - horizon) / (1 - horizon), 0, 1)
        half = 0.05 + 0.6 * depth
        image[below & np.ones_like(cols, dtype=bool)] = (200, 170, 190)
        road = below & (np.abs(cols - vanish) < half)
        image[road] = (110, 110, 115)
        lane = road & (np.abs(cols - vanish) < 0.01 + 0.02 * depth) & \
            ((depth * 12) % 1 < 0.5)
        image[lane] = (240, 240, 230)
        # Vegetation strip and a few cars on the road.
        green = below & (np.abs(cols - vanish) > half + 0.1) & (rows < horizon + 0.1)
        image[green] = (60, 120, 40)
        for _ in range(rng.integers(1, 4)):
            y = rng.uniform(horizon + 0.05, 0.9)
            d = (y - horizon) / (1 - horizon)
            x = vanish + rng.uniform(-0.8, 0.8) * (0.05 + 0.6 * d)
            w, h = 0.12 * d + 0.02, 0.08 * d + 0.015
            car = (np.abs(cols - x) < w / 2) & (np.abs(rows - y) < h / 2)
            image[car] = rng.uniform(0, 255, 3)
        image += rng.normal(0, 6, image.shape)
    return np.clip(images, 0, 255).astype(np.uint8)
