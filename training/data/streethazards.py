"""StreetHazards as a torch Dataset (layout and label ids: methods.md §6).

Raw annotation PNGs hold ids 1..14. The joint transform runs on the raw ids (padding with
IGNORE_ID), then the raw ids become train ids through a lookup table of `labels.py`; on the test
split the anomaly mask is derived from the same raw ids, so the two always agree.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anomaly_seg_node.errors import ConfigError, DataError
from anomaly_seg_node.labels import (
    IGNORE_ID,
    MAPPINGS,
    RAW_ANOMALY_ID,
    RAW_CLASS_NAMES,
    RAW_OTHER_ID,
    class_names,
    raw_to_train_lut,
)
from training.data.image_io import (
    check_label_ids,
    pair_labels,
    read_label_png,
    read_pair,
    read_rgb,
)
from training.data.raw_ids import RawIdDataset, Transform

__all__ = ['StreetHazards', 'Transform', 'check_raw_ids', 'read_label_png', 'read_pair',
           'read_rgb']


# split -> (top folder, sub folder under images/ and annotations/, towns)
SPLITS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    'train': ('train', 'training', ('t1', 't2', 't3')),
    'val': ('train', 'validation', ('t4',)),
    'test': ('test', 'test', ('t5', 't6')),
}

# Values of the test split's 'ood' mask.
OOD_INLIER = 0
OOD_ANOMALY = 1
OOD_IGNORE = 2

_VALID_RAW = np.zeros(256, dtype=bool)
_VALID_RAW[list(RAW_CLASS_NAMES)] = True

# raw id (or IGNORE_ID from padding) -> ood mask value
_OOD_LUT = np.full(256, OOD_IGNORE, dtype=np.uint8)
_OOD_LUT[list(RAW_CLASS_NAMES)] = OOD_INLIER
_OOD_LUT[RAW_ANOMALY_ID] = OOD_ANOMALY
_OOD_LUT[RAW_OTHER_ID] = OOD_IGNORE
_OOD_LUT[IGNORE_ID] = OOD_IGNORE  # padding of the joint transform


def check_raw_ids(label: np.ndarray, path: Path) -> None:
    """Raise DataError naming the file and the ids if any pixel is outside 1..14."""
    check_label_ids(label, path, _VALID_RAW, 'the StreetHazards range 1..14',
                    'the annotations must be raw ids, not train ids or a colour palette: '
                    'regenerate or fix this file')


class StreetHazards(RawIdDataset):
    """StreetHazards split ('train' t1-t3, 'val' t4, 'test' t5-t6) under `root`.

    Items: 'image' uint8 [3,H,W] RGB, 'label' int64 [H,W] train ids (IGNORE_ID = ignored),
    'path' str, and on the test split 'ood' uint8 [H,W] (1 anomaly, 0 inlier, 2 ignored).
    Random transforms and epochs as `RawIdDataset`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        mapping: str = 'densehybrid12',
        transform: Transform | None = None,
        towns: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f'unknown StreetHazards split {split!r}; expected one of '
                              f'{sorted(SPLITS)}')
        if mapping not in MAPPINGS:
            raise ConfigError(f'unknown label mapping {mapping!r}; expected one of {MAPPINGS}')
        self.check_transform(transform, 'StreetHazards')
        self.root = Path(root)
        self.split = split
        self.mapping = mapping
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.lut = raw_to_train_lut(mapping)
        self.class_names = class_names(mapping)
        self.num_classes = len(self.class_names)
        self.towns, self.samples = _index(self.root, split, towns)
        self.ood_lut = _OOD_LUT if split == 'test' else None

    def check_ids(self, raw: np.ndarray, path: Path) -> None:
        check_raw_ids(raw, path)


def _index(
    root: Path, split: str, towns: Sequence[str] | None,
) -> tuple[tuple[str, ...], list[tuple[Path, Path]]]:
    """List (image, annotation) pairs of a split, checking the layout on the way."""
    top, sub, split_towns = SPLITS[split]
    if not root.is_dir():
        raise DataError(
            f'StreetHazards root {root} is not a folder; pass the folder that holds train/ and '
            'test/ (for a synthetic one: anomaly-seg synth dataset --out DIR)')
    image_dir = root / top / 'images' / sub
    ann_dir = root / top / 'annotations' / sub
    for folder in (image_dir, ann_dir):
        if not folder.is_dir():
            raise DataError(
                f'missing folder {folder} for split {split!r}; expected the StreetHazards layout '
                f'{top}/images/{sub}/<town>/*.png with {top}/annotations/{sub}/<town>/*.png')
    if towns is None:
        # A small data set may leave a town empty; only the split's own towns are read.
        chosen = tuple(t for t in split_towns if (image_dir / t).is_dir())
        if not chosen:
            raise DataError(
                f'no town folder of split {split!r} in {image_dir}; expected one or more of '
                f'{list(split_towns)}')
    else:
        chosen = tuple(towns)
        if not chosen:
            raise ConfigError('towns must name at least one town folder, or be None for all')
        for town in chosen:
            if not (image_dir / town).is_dir():
                raise DataError(
                    f'missing town folder {image_dir / town}; split {split!r} has towns '
                    f'{list(split_towns)} (found: '
                    f'{sorted(p.name for p in image_dir.iterdir() if p.is_dir())})')
    samples: list[tuple[Path, Path]] = []
    for town in chosen:
        samples += pair_labels(sorted((image_dir / town).glob('*.png')),
                               lambda image, town=town: ann_dir / town / image.name,
                               f'split {split!r}',
                               'every images/.../NAME.png needs annotations/.../NAME.png')
    if not samples:
        raise DataError(
            f'no *.png images in {image_dir} for towns {list(chosen)}; '
            'check the root folder and that the data set was written completely')
    return chosen, samples
