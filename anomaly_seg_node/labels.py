"""StreetHazards label ids and the two class mappings (methods.md §6).

Raw annotation PNGs hold ids 1..14. DenseHybrid (and the paper) train 12 classes: "other" is
ignored, "unlabeled" is a trained class, and the anomaly id 14 never appears in training.
The creators' setup trains 13 classes with "other" kept.
"""

import numpy as np

IGNORE_ID = 255
RAW_ANOMALY_ID = 14
RAW_OTHER_ID = 4

# raw id -> name, in the order of the StreetHazards annotation files.
RAW_CLASS_NAMES: dict[int, str] = {
    1: 'unlabeled', 2: 'building', 3: 'fence', 4: 'other', 5: 'pedestrian', 6: 'pole',
    7: 'road line', 8: 'road', 9: 'sidewalk', 10: 'vegetation', 11: 'car', 12: 'wall',
    13: 'traffic sign', 14: 'anomaly',
}

# CARLA's semantic palette (RGB) for the raw ids; the anomaly colour (cyan) is used by no class.
RAW_PALETTE: dict[int, tuple[int, int, int]] = {
    1: (0, 0, 0), 2: (70, 70, 70), 3: (190, 153, 153), 4: (250, 170, 160), 5: (220, 20, 60),
    6: (153, 153, 153), 7: (157, 234, 50), 8: (128, 64, 128), 9: (244, 35, 232),
    10: (107, 142, 35), 11: (0, 0, 142), 12: (102, 102, 156), 13: (220, 220, 0),
    14: (0, 255, 255),
}

MAPPINGS = ('densehybrid12', 'creators13')


def inlier_raw_ids(mapping: str = 'densehybrid12') -> list[int]:
    """Raw ids of the trained classes, in train-id order."""
    _check_mapping(mapping)
    dropped = {RAW_ANOMALY_ID, RAW_OTHER_ID} if mapping == 'densehybrid12' else {RAW_ANOMALY_ID}
    return [raw for raw in RAW_CLASS_NAMES if raw not in dropped]


def class_names(mapping: str = 'densehybrid12') -> list[str]:
    return [RAW_CLASS_NAMES[raw] for raw in inlier_raw_ids(mapping)]


def palette(mapping: str = 'densehybrid12') -> list[tuple[int, int, int]]:
    return [RAW_PALETTE[raw] for raw in inlier_raw_ids(mapping)]


def raw_to_train_lut(mapping: str = 'densehybrid12') -> np.ndarray:
    """A 256-entry uint8 lookup table: raw id -> train id, IGNORE_ID for ignored and unknown ids.

    The anomaly id maps to IGNORE_ID as well; the anomaly mask is derived from the raw ids.
    """
    lut = np.full(256, IGNORE_ID, dtype=np.uint8)
    for train_id, raw in enumerate(inlier_raw_ids(mapping)):
        lut[raw] = train_id
    return lut


def _check_mapping(mapping: str) -> None:
    if mapping not in MAPPINGS:
        raise ValueError(f'unknown label mapping {mapping!r}; expected one of {MAPPINGS}')
