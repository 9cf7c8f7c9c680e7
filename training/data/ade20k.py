"""ADE20k negatives for DenseHybrid-style pasting, with the official mask rule (methods.md §2.3).

Each item is a crop x crop ADE20k patch (shorter side resized to `crop`, then a random square
crop) and a boolean mask of the pixels to paste: with p = 0.5 a random rectangle with h, w drawn
independently from {16, 24, ..., crop-8}, otherwise the union of the pixels of 2 class ids drawn
with replacement from the ids present in the crop (id 0 included). With a scale range other than
[1, 1] (this project's extension, not the paper's), the crop and its mask then shrink by a factor
drawn log-uniformly from the range and sit at a random place in an otherwise empty crop: the
negatives then also cover objects of a few pixels, which 384-pixel crops never show.
"""

from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from anomaly_seg_node.errors import ConfigError, DataError
from training.config import check_shrink_scale
from training.data.image_io import pair_labels, read_pair
from training.data.transforms import check_pair

RECT_PROB = 0.5
CLASSES_PER_MASK = 2
MIN_RECT_SIDE = 16
RECT_STEP = 8


def rectangle_sides(crop: int) -> np.ndarray:
    """Allowed rectangle sides: 16, 24, ... below crop (16..376 for crop 384)."""
    return np.arange(MIN_RECT_SIDE, crop, RECT_STEP)


def sample_negative_mask(
    label: np.ndarray, rng: np.random.Generator,
) -> tuple[np.ndarray, str]:
    """Draw the paste mask of one crop; returns (bool HxW mask, 'rectangle' or 'classes')."""
    h, w = label.shape
    mask = np.zeros((h, w), dtype=bool)
    if rng.random() < RECT_PROB:
        sides = rectangle_sides(min(h, w))
        rect_h, rect_w = int(rng.choice(sides)), int(rng.choice(sides))
        top = int(rng.integers(0, h - rect_h + 1))
        left = int(rng.integers(0, w - rect_w + 1))
        mask[top:top + rect_h, left:left + rect_w] = True
        return mask, 'rectangle'
    ids = rng.choice(np.unique(label), size=CLASSES_PER_MASK, replace=True)
    return np.isin(label, ids), 'classes'


def shrink_into_crop(
    image: np.ndarray, mask: np.ndarray, scale: tuple[float, float], rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Shrink a square crop (HxWx3 uint8, HxW bool) by a log-uniform factor from `scale` and place
    it at a random position of an empty crop of the same size (mask False elsewhere).
    """
    lo, hi = scale
    crop = mask.shape[0]
    factor = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    side = max(1, min(crop, round(crop * factor)))
    if side == crop:
        return image, mask
    top = int(rng.integers(0, crop - side + 1))
    left = int(rng.integers(0, crop - side + 1))
    small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
    # A shrunk pixel is pasted where at least half of its area was: the mask keeps its share.
    small_mask = cv2.resize(mask.astype(np.float32), (side, side),
                            interpolation=cv2.INTER_AREA) >= 0.5
    out_image = np.zeros_like(image)
    out_mask = np.zeros_like(mask)
    out_image[top:top + side, left:left + side] = small
    out_mask[top:top + side, left:left + side] = small_mask
    return out_image, out_mask


def resize_shorter_side(
    image: np.ndarray, label: np.ndarray, side: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the shorter side is `side` (image bilinear, label nearest)."""
    h, w = label.shape
    if h <= w:
        new_h, new_w = side, max(side, round(w * side / h))
    else:
        new_h, new_w = max(side, round(h * side / w)), side
    if (new_h, new_w) == (h, w):
        return image, label
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST_EXACT)
    return image, label


class ADE20kNegatives(Dataset):
    """ADE20k-layout negatives: `root/images/training/*.jpg` + `root/annotations/training/*.png`.

    Item i of epoch e: (image uint8 [3,crop,crop] RGB, mask bool [crop,crop]), all random
    choices drawn from default_rng([seed, e, i]); call `set_epoch` before each epoch. `scale`
    (min, max) shrinks each crop by a log-uniform factor (see the module docstring).
    """

    def __init__(self, root: str | Path, crop: int = 384, seed: int = 0,
                 scale: tuple[float, float] = (1.0, 1.0)) -> None:
        if crop <= MIN_RECT_SIDE:
            raise ConfigError(f'crop must exceed {MIN_RECT_SIDE} pixels so a rectangle fits, '
                              f'got {crop}; the official value is 384')
        self.root = Path(root)
        self.crop = int(crop)
        self.seed = int(seed)
        self.scale = check_shrink_scale(scale)
        self.epoch = 0
        self.samples = _index(self.root)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops and masks the next items use."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.samples[index]
        image, label = read_pair(image_path, label_path)
        check_pair(image, label)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, label = resize_shorter_side(image, label, self.crop)
        h, w = label.shape
        top = int(rng.integers(0, h - self.crop + 1))
        left = int(rng.integers(0, w - self.crop + 1))
        image = image[top:top + self.crop, left:left + self.crop]
        label = label[top:top + self.crop, left:left + self.crop]
        mask, _ = sample_negative_mask(label, rng)
        # Drawn only for a real range, so [1, 1] keeps the random stream of earlier runs.
        if self.scale != (1.0, 1.0):
            image, mask = shrink_into_crop(image, mask, self.scale, rng)
        image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return image_t, torch.from_numpy(mask)


def _index(root: Path) -> list[tuple[Path, Path]]:
    image_dir = root / 'images' / 'training'
    ann_dir = root / 'annotations' / 'training'
    for folder in (image_dir, ann_dir):
        if not folder.is_dir():
            raise DataError(
                f'missing folder {folder}; expected the ADE20k layout images/training/*.jpg with '
                'annotations/training/*.png (for a synthetic one: anomaly-seg synth negatives '
                '--out DIR)')
    images = sorted(image_dir.glob('*.jpg'))
    if not images:
        raise DataError(f'no *.jpg images in {image_dir}; check the ADE20k root folder')
    samples = pair_labels(images, lambda image: ann_dir / f'{image.stem}.png', 'ADE20k',
                          'every images/training/NAME.jpg needs annotations/training/NAME.png')
    return samples
