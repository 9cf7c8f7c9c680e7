"""Which data set a config trains on: `data.dataset` -> the loader of a split and its classes."""

from pathlib import Path

from torch.utils.data import Dataset

from anomaly_seg_node.errors import ConfigError
from anomaly_seg_node.labels import CAMVID_CLASS_NAMES, CAMVID_PALETTE, class_names, palette
from training.data.streethazards import Transform

DATASETS = ('streethazards', 'camvid')


def detect_layout(root: str | Path) -> str:
    """'camvid' when `root` holds test/ with testannot/ (or test_labels/), else 'streethazards'
    (whose loader then says what is missing)."""
    from training.data.camvid_layout import label_folder
    root = Path(root)
    if (root / 'test').is_dir() and label_folder(root, 'test') is not None:
        return 'camvid'
    return 'streethazards'


def open_split(dataset: str, root: str | Path, split: str, mapping: str = 'densehybrid12',
               transform: Transform | None = None, seed: int = 0) -> Dataset:
    """The `split` ('train', 'val', 'test') of `dataset` under `root`."""
    if dataset == 'camvid':
        from training.data.camvid import CamVid
        return CamVid(root, split, transform, seed=seed)
    if dataset == 'streethazards':
        from training.data.streethazards import StreetHazards
        return StreetHazards(root, split, mapping, transform, seed=seed)
    raise ConfigError(f'unknown data set {dataset!r}; expected one of {list(DATASETS)}')


def classes_of(dataset: str, mapping: str = 'densehybrid12'
               ) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Class names and RGB palette, in train-id order."""
    if dataset == 'camvid':
        return list(CAMVID_CLASS_NAMES), list(CAMVID_PALETTE)
    if dataset == 'streethazards':
        return class_names(mapping), palette(mapping)
    raise ConfigError(f'unknown data set {dataset!r}; expected one of {list(DATASETS)}')
