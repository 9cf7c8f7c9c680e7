"""Reading images and label maps from disk, with errors that name the file and the fix.

Torch-free (OpenCV and numpy), shared by the data sets and the synthetic generators.
"""

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from anomaly_seg_node.errors import DataError


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB; DataError if it cannot be read or decoded."""
    return cv2.cvtColor(_decode(path, cv2.IMREAD_COLOR, 'image'), cv2.COLOR_BGR2RGB)


def read_label_png(path: Path) -> np.ndarray:
    """Decode a single-channel 8-bit label PNG to an HxW uint8 array, or raise DataError."""
    label = _decode(path, cv2.IMREAD_UNCHANGED, 'label PNG')
    if label.ndim != 2 or label.dtype != np.uint8:
        channels = 1 if label.ndim == 2 else label.shape[2]
        raise DataError(
            f'label {path} must be a single-channel 8-bit PNG of class ids, found {channels} '
            f'channel(s) of {label.dtype}; save the id map as 8-bit grayscale')
    return label


def read_pair(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and its label PNG of the same size (`read_rgb`, `read_label_png`)."""
    image = read_rgb(image_path)
    label = read_label_png(label_path)
    if label.shape != image.shape[:2]:
        raise DataError(
            f'label {label_path} is {label.shape[1]}x{label.shape[0]} but image {image_path} '
            f'is {image.shape[1]}x{image.shape[0]} (WxH); an annotation must match its image')
    return image, label


def _decode(path: Path, flags: int, what: str) -> np.ndarray:
    decoded = cv2.imdecode(_read_bytes(path), flags)
    if decoded is None:
        raise DataError(
            f'cannot decode {what} {path}: the file is corrupt, truncated or not an image; '
            're-export or remove it')
    return decoded


def _read_bytes(path: Path) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f'cannot read {path}: {err.strerror or err}; check the file exists '
                        'and is readable') from err
    if not data:
        raise DataError(f'file {path} is empty; re-export or remove it')
    return np.frombuffer(data, dtype=np.uint8)


def check_label_ids(label: np.ndarray, path: Path, valid: np.ndarray, expected: str,
                    fix: str) -> None:
    """Raise DataError naming the file, the ids outside `valid` (bool [256]) and their pixel
    count, with `expected` (what the ids should be) and `fix`."""
    counts = np.bincount(label.ravel(), minlength=256)
    bad = np.flatnonzero((counts > 0) & ~valid)
    if bad.size:
        raise DataError(f'label {path} holds ids {bad.tolist()} outside {expected} '
                        f'({int(counts[bad].sum())} pixels); {fix}')


def pair_labels(images: list[Path], label_of: Callable[[Path], Path], what: str,
                layout: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs; DataError listing images without a label file. `what` names the
    split for the message, `layout` says which label file each image needs."""
    samples = [(image, label_of(image)) for image in images]
    missing = [label for _, label in samples if not label.is_file()]
    if missing:
        shown = ', '.join(str(p) for p in missing[:3])
        raise DataError(f'{len(missing)} image(s) of {what} have no label, e.g. {shown}; '
                        f'{layout}: add the labels or remove those images')
    return samples
