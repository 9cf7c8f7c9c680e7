"""Joint image/label transforms of the paper (methods.md §1): flip, scale jitter, padded crop.

Pure functions over numpy arrays: `image` is HWC uint8 RGB, `label` is HW uint8 ids. Every random
choice comes from an explicit `np.random.Generator`, so a data set can make an item's transform
a function of (seed, epoch, index). Labels are only ever resized with nearest neighbour.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from anomaly_seg_node import imaging
from anomaly_seg_node.errors import ConfigError, DataError
from anomaly_seg_node.labels import IGNORE_ID
from training.config import check_letterbox

# DenseHybrid fills StreetHazards jitter padding with this mean RGB (0-255).
STREETHAZARDS_MEAN_RGB = (84, 88, 95)

# Nearest-exact samples pixel centres like the linear image resize, so labels stay aligned.
_LABEL_INTERPOLATION = cv2.INTER_NEAREST_EXACT
_IMAGE_INTERPOLATIONS = {
    'linear': cv2.INTER_LINEAR,
    'cubic': cv2.INTER_CUBIC,
    'area': cv2.INTER_AREA,
}


def check_pair(image: np.ndarray, label: np.ndarray) -> None:
    """Raise DataError unless image is HxWx3 uint8 and label is HxW uint8 of the same size."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(
            f'expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}; '
            'decode images to 8-bit RGB before the joint transform')
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DataError(
            f'expected an HxW uint8 label map, got shape {label.shape} dtype {label.dtype}; '
            'labels must be single-channel 8-bit ids')
    if image.shape[:2] != label.shape:
        raise DataError(
            f'image size {image.shape[:2]} differs from label size {label.shape}; '
            'an image and its label must have the same height and width')


def hflip(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror image and label left-right together."""
    return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label[:, ::-1])


def resize_pair(
    image: np.ndarray, label: np.ndarray, size_hw: tuple[int, int], interpolation: str = 'linear',
) -> tuple[np.ndarray, np.ndarray]:
    """Resize image (interpolated) and label (nearest neighbour) to size_hw = (H, W)."""
    h, w = size_hw
    if image.shape[:2] == (h, w):
        return image, label
    image = cv2.resize(image, (w, h), interpolation=_image_interpolation(interpolation))
    label = cv2.resize(label, (w, h), interpolation=_LABEL_INTERPOLATION)
    return image, label


def scale_crop(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    crop_hw: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    mean_fill: Sequence[int] = STREETHAZARDS_MEAN_RGB,
    ignore_id: int = IGNORE_ID,
    interpolation: str = 'linear',
) -> tuple[np.ndarray, np.ndarray]:
    """SwiftNet's RandomSquareCropAndScale, generalised to a (h, w) crop.

    A box of int(s*h) x int(s*w) input pixels, s ~ U[scale_range], is placed uniformly inside the
    image padded on the bottom/right (image with mean_fill, label with ignore_id) to at least the
    box size, cut out and resized to crop_hw. s > 1 zooms out, s < 1 zooms in.
    """
    crop_h, crop_w = crop_hw
    height, width = label.shape
    s = rng.uniform(scale_range[0], scale_range[1])
    box_h, box_w = max(1, int(s * crop_h)), max(1, int(s * crop_w))
    canvas_h, canvas_w = max(box_h, height), max(box_w, width)
    top = int(rng.integers(0, canvas_h - box_h + 1))
    left = int(rng.integers(0, canvas_w - box_w + 1))

    box_image = np.empty((box_h, box_w, 3), dtype=np.uint8)
    box_image[:] = np.asarray(mean_fill, dtype=np.uint8)
    box_label = np.full((box_h, box_w), ignore_id, dtype=np.uint8)
    # The part of the box that overlaps the image (the rest is padding).
    bottom, right = min(top + box_h, height), min(left + box_w, width)
    if bottom > top and right > left:
        box_image[:bottom - top, :right - left] = image[top:bottom, left:right]
        box_label[:bottom - top, :right - left] = label[top:bottom, left:right]
    return resize_pair(box_image, box_label, (crop_h, crop_w), interpolation)


def letterbox_mirrored(
    image: np.ndarray, label: np.ndarray, aspect_hw: tuple[int, int], ignore_id: int = IGNORE_ID,
) -> tuple[np.ndarray, np.ndarray]:
    """Pad a pair to the aspect of `aspect_hw` at its own scale, as the node letterboxes a camera
    into an artifact of that shape: bars mirror the picture (imaging's 'reflect'), labels there
    are ignore_id. A pair within the node's aspect tolerance is returned as it is.
    """
    h, w = label.shape
    ah, aw = aspect_hw
    if w * ah < h * aw:  # narrower than the artifact: bars left and right
        net_hw = (h, max(w, round(h * aw / ah)))
    else:
        net_hw = (max(h, round(w * ah / aw)), w)
    fit = imaging.plan_fit((h, w), net_hw, 'letterbox')
    if fit.mode != 'letterbox':
        return image, label
    return imaging.fit_image(image, fit, pad_mode='reflect'), imaging.fit_labels(label, fit,
                                                                                 ignore_id)


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Photometric jitter of an RGB uint8 image: brightness, contrast and saturation factors
    each drawn from U[1 - strength, 1 + strength], applied in a random order.

    Cameras differ in exposure and colour far more than one training set shows; the labels are
    unchanged. strength 0 returns the image untouched and draws nothing from `rng`.
    """
    if strength <= 0:
        return image
    x = image.astype(np.float32)
    factors = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    for op in rng.permutation(3):
        f = float(factors[op])
        if op == 0:  # brightness
            x *= f
        elif op == 1:  # contrast: towards the mean grey level
            grey = float((x @ _LUMA).mean())
            x = grey + f * (x - grey)
        else:  # saturation: towards each pixel's grey
            grey_map = (x @ _LUMA)[..., None]
            x = grey_map + f * (x - grey_map)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class JointTransform:
    """Training transform: random horizontal flip, then scale jitter with a padded crop.

    crop_size is a square side (768 in the paper) or (h, w), e.g. (192, 384) for small budgets.
    mean_fill is the RGB that pads the image; ignore_id pads the label. color_jitter > 0 adds
    `color_jitter` after the crop (0, the default, leaves the random stream as it was).
    letterbox_hw (an artifact shape such as (360, 640)) letterboxes each pair to that aspect with
    mirrored bars (`letterbox_mirrored`) with probability letterbox_prob before the crop, so the
    network also trains on the context a camera of another aspect gives it at run time (None,
    the default, draws nothing).
    """

    crop_size: int | tuple[int, int] = 768
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    mean_fill: tuple[int, int, int] = STREETHAZARDS_MEAN_RGB
    ignore_id: int = IGNORE_ID
    interpolation: str = 'linear'
    color_jitter: float = 0.0
    letterbox_hw: tuple[int, int] | None = None
    letterbox_prob: float = 0.5

    def __post_init__(self) -> None:
        check_letterbox(self.letterbox_hw, self.letterbox_prob)
        if not 0 <= self.color_jitter < 1:
            raise ConfigError(f'color_jitter must lie in [0, 1), got {self.color_jitter!r}')
        h, w = self.crop_hw
        if h < 1 or w < 1:
            raise ConfigError(f'crop_size must be positive, got {self.crop_size!r}')
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(
                f'scale_range must satisfy 0 < min <= max, got {self.scale_range!r}; '
                'the paper uses (0.5, 2.0)')
        if len(self.mean_fill) != 3 or not all(0 <= v <= 255 for v in self.mean_fill):
            raise ConfigError(
                f'mean_fill must be three RGB values in 0..255, got {self.mean_fill!r}')
        if not 0 <= self.ignore_id <= 255:
            raise ConfigError(f'ignore_id must fit in uint8, got {self.ignore_id}')
        _image_interpolation(self.interpolation)

    @property
    def crop_hw(self) -> tuple[int, int]:
        if isinstance(self.crop_size, int):
            return self.crop_size, self.crop_size
        if len(self.crop_size) != 2:
            raise ConfigError(f'crop_size must be an int or (h, w), got {self.crop_size!r}')
        return int(self.crop_size[0]), int(self.crop_size[1])

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        check_pair(image, label)
        # Flip first, then crop, as SwiftNet's pipeline does.
        if self.flip and rng.random() < 0.5:
            image, label = hflip(image, label)
        if self.letterbox_hw is not None and rng.random() < self.letterbox_prob:
            image, label = letterbox_mirrored(image, label, self.letterbox_hw, self.ignore_id)
        image, label = scale_crop(
            image, label, rng, self.crop_hw, self.scale_range, self.mean_fill, self.ignore_id,
            self.interpolation)
        return color_jitter(image, rng, self.color_jitter), label


@dataclass(frozen=True)
class EvalTransform:
    """Evaluation transform: identity, or a resize to size = (h, w) with nearest labels."""

    size: tuple[int, int] | None = None
    interpolation: str = 'linear'

    def __post_init__(self) -> None:
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ConfigError(f'size must be None or positive (h, w), got {self.size!r}')
        _image_interpolation(self.interpolation)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        check_pair(image, label)
        if self.size is None:
            return image, label
        return resize_pair(image, label, (int(self.size[0]), int(self.size[1])),
                           self.interpolation)


def _image_interpolation(name: str) -> int:
    if name not in _IMAGE_INTERPOLATIONS:
        raise ConfigError(
            f'unknown image interpolation {name!r}; expected one of '
            f'{sorted(_IMAGE_INTERPOLATIONS)} (labels always use nearest neighbour)')
    return _IMAGE_INTERPOLATIONS[name]
