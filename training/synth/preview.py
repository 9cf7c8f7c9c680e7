"""A contact sheet of a synthetic data set: image | colourised label | anomaly mask per row."""

from pathlib import Path

import cv2
import numpy as np

from anomaly_seg_node.errors import DataError
from anomaly_seg_node.labels import RAW_ANOMALY_ID, RAW_PALETTE

TILE_WIDTH = 320


def _lut() -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    for raw, rgb in RAW_PALETTE.items():
        lut[raw] = rgb
    return lut


def colourise(label: np.ndarray) -> np.ndarray:
    """Raw StreetHazards ids (H, W) -> RGB (H, W, 3) in RAW_PALETTE colours."""
    return _lut()[label]


def anomaly_overlay(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The image darkened, with anomaly pixels in the anomaly colour."""
    out = (image.astype(np.float32) * 0.35).astype(np.uint8)
    out[label == RAW_ANOMALY_ID] = RAW_PALETTE[RAW_ANOMALY_ID]
    return out


def _pairs(root: Path, n: int) -> list[tuple[Path, Path]]:
    """Up to n (image, annotation) pairs: test images first (they hold anomalies), then train."""
    pairs = []
    for split, sub in (('test', 'test'), ('train', 'training'), ('train', 'validation')):
        images = sorted((root / split / 'images' / sub).glob('*/*.png'))
        pairs.append([(p, root / split / 'annotations' / sub / p.parent.name / p.name)
                      for p in images])
    test, train, val = pairs
    chosen = test[:max(n - n // 3, n - len(train) - len(val))]
    chosen += (train + val)[:n - len(chosen)]
    return chosen


def _read(path: Path, flags: int) -> np.ndarray:
    array = cv2.imread(str(path), flags)
    if array is None:
        raise DataError(f'cannot read {path}: missing or not an image; regenerate the data set '
                        'with `anomaly-seg synth dataset`')
    return array


def render_preview(data_root: Path | str, out_png: Path | str, n: int = 6) -> Path:
    """Write a PNG contact sheet of n scenes of a StreetHazards-layout folder; return its path."""
    root = Path(data_root)
    if not (root / 'train').is_dir() and not (root / 'test').is_dir():
        raise DataError(f'{root} is not a StreetHazards-layout folder (no train/ or test/); '
                        'point --data at the output of `anomaly-seg synth dataset`')
    if n < 1:
        raise DataError(f'the preview needs at least 1 row, got n={n}; pass --n 6')
    pairs = _pairs(root, n)
    if not pairs:
        raise DataError(f'no images found under {root}/{{train,test}}/images/; '
                        'regenerate the data set with `anomaly-seg synth dataset`')
    rows = []
    for image_path, label_path in pairs:
        image = cv2.cvtColor(_read(image_path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        label = _read(label_path, cv2.IMREAD_UNCHANGED)
        if label.ndim != 2 or label.shape != image.shape[:2]:
            raise DataError(f'{label_path} must be a single-channel label map of the size of '
                            f'{image_path}; regenerate the data set')
        h = round(image.shape[0] * TILE_WIDTH / image.shape[1])
        tiles = [cv2.resize(image, (TILE_WIDTH, h), interpolation=cv2.INTER_AREA)]
        for array in (colourise(label), anomaly_overlay(image, label)):
            tiles.append(cv2.resize(array, (TILE_WIDTH, h), interpolation=cv2.INTER_NEAREST))
        row = np.concatenate(tiles, 1)
        caption = f'{image_path.parent.name}/{image_path.name}'
        cv2.putText(row, caption, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                    cv2.LINE_AA)
        rows.append(row)
    sheet = np.concatenate([cv2.copyMakeBorder(r, 0, 4, 0, 0, cv2.BORDER_CONSTANT, value=0)
                            for r in rows], 0)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f'.{out.name}.tmp.png')
    if not cv2.imwrite(str(tmp), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR),
                       [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise DataError(f'could not write {tmp}; check that the folder is writable')
    tmp.replace(out)
    return out
