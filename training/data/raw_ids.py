"""The shared item logic of the labelled data sets (StreetHazards, CamVid).

Label files hold a data set's raw ids. The joint transform runs on the raw ids (padding with
IGNORE_ID), then lookup tables give the train ids and, where the split marks anomalies, the
'ood' mask; both are derived from the same raw ids, so they always agree.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from anomaly_seg_node.errors import ConfigError
from anomaly_seg_node.labels import IGNORE_ID
from training.data.image_io import read_pair

# A joint transform: (HWC uint8 RGB image, HW uint8 label, generator) -> (image, label).
Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


class RawIdDataset(Dataset):
    """Items: 'image' uint8 [3,H,W] RGB, 'label' int64 [H,W] train ids (IGNORE_ID = ignored),
    'path' str, and with an `ood_lut` 'ood' uint8 [H,W] (1 anomaly, 0 inlier, 2 ignored).

    Subclasses set `samples` [(image, label) paths], `lut` (raw -> train id), `ood_lut` (raw ->
    ood value, or None) and implement `check_ids`. The random transform of item i in epoch e is
    drawn from default_rng([seed, e, i]); call `set_epoch` before each epoch (DataLoader workers
    copy the data set when they start, so use non-persistent workers or re-create the loader for
    the epoch to reach them).
    """

    samples: list[tuple[Path, Path]]
    lut: np.ndarray
    ood_lut: np.ndarray | None = None
    transform: Transform | None = None
    seed: int = 0
    epoch: int = 0

    def check_ids(self, raw: np.ndarray, path: Path) -> None:
        raise NotImplementedError

    @staticmethod
    def check_transform(transform: Transform | None, name: str) -> None:
        """The transform pads raw ids; any pad id but IGNORE_ID would read as a real class."""
        pad_id = getattr(transform, 'ignore_id', IGNORE_ID)
        if pad_id != IGNORE_ID:
            raise ConfigError(
                f'the transform pads labels with {pad_id}, but {name} transforms run on raw ids '
                f'and must pad with IGNORE_ID={IGNORE_ID}; leave ignore_id at its default')

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random transforms the next items use."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        image_path, label_path = self.samples[index]
        image, raw = read_pair(image_path, label_path)
        self.check_ids(raw, label_path)
        if self.transform is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, raw = self.transform(image, raw, rng)
        item: dict[str, torch.Tensor | str] = {
            'image': torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            'label': torch.from_numpy(self.lut[raw].astype(np.int64)),
            'path': str(image_path),
        }
        if self.ood_lut is not None:
            item['ood'] = torch.from_numpy(self.ood_lut[raw])
        return item
