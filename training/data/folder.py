"""A folder of images with label maps in one of the public conventions, for `evaluate`.

Layouts: `ROOT/images/NAME.{png,jpg}` with `ROOT/labels/NAME.png`, or Road Anomaly's
`ROOT/frames/NAME.jpg` with `ROOT/frames/NAME.labels/labels_semantic.png`. What the label ids
mean comes from `anomaly_seg_node.labels.label_spec` (`--labels binary`, `road-anomaly`,
`camvid`, `streethazards`, `train-ids`), so evaluate and replay read labels alike.
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomaly_seg_node.errors import DataError
from anomaly_seg_node.labels import LabelSpec
from training.data.image_io import pair_labels, read_pair
from training.data.streethazards import OOD_IGNORE

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
ROAD_ANOMALY_LABEL = 'labels_semantic.png'


def folder_pairs(root: Path) -> list[tuple[Path, Path]] | None:
    """The (image, label) pairs of a folder layout, None when `root` has neither layout."""
    if (root / 'images').is_dir() and (root / 'labels').is_dir():
        images = sorted(p for p in (root / 'images').iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES)

        def label_of(image: Path) -> Path:
            return root / 'labels' / f'{image.stem}.png'
    elif (root / 'frames').is_dir():
        images = sorted(p for p in (root / 'frames').iterdir()
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

        def label_of(image: Path) -> Path:
            return root / 'frames' / f'{image.stem}.labels' / ROAD_ANOMALY_LABEL
    else:
        return None
    if not images:
        raise DataError(f'no images (*.png, *.jpg) in {root}; check the folder')
    return pair_labels(images, label_of, str(root), 'every image needs its label PNG')


class LabelledFolder:
    """Items as the test splits give them: 'image' uint8 [3, H, W], 'label' int64 [H, W] (the
    model's train ids, 255 ignored; all 255 for conventions without classes), 'ood' uint8
    [H, W] (1 anomaly, 0 normal, 2 ignored) and 'path'."""

    def __init__(self, root: str | Path, spec: LabelSpec, num_classes: int) -> None:
        self.root = Path(root)
        pairs = folder_pairs(self.root)
        if pairs is None:
            raise DataError(f"{self.root} has neither images/ with labels/ nor Road Anomaly's "
                            'frames/NAME.jpg with frames/NAME.labels/labels_semantic.png')
        self.samples = pairs
        self.spec = spec
        self.num_classes = int(num_classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.samples[index]
        image, raw = read_pair(image_path, label_path)
        closed, anomaly, _ = self.spec.targets(raw, self.num_classes)
        ood = np.where(anomaly == self.spec.ignore, np.uint8(OOD_IGNORE), anomaly)
        return {'image': torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                'label': torch.from_numpy(closed.astype(np.int64)),
                'ood': torch.from_numpy(ood.astype(np.uint8)), 'path': str(image_path)}
