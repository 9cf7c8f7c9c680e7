"""StreetHazards / ADE20k loading and the joint transforms, on tiny trees written in tmp_path."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from anomaly_seg_node.errors import ConfigError, DataError
from anomaly_seg_node.labels import IGNORE_ID
from training.config import check_shrink_scale
from training.data.ade20k import (
    ADE20kNegatives,
    rectangle_sides,
    resize_shorter_side,
    sample_negative_mask,
    shrink_into_crop,
)
from training.data.streethazards import SPLITS, StreetHazards
from training.data.transforms import (
    STREETHAZARDS_MEAN_RGB,
    EvalTransform,
    JointTransform,
    hflip,
    letterbox_mirrored,
    scale_crop,
)

# Known answers, written out by hand from methods.md §6 (not derived from labels.py).
DENSEHYBRID12 = {1: 0, 2: 1, 3: 2, 4: IGNORE_ID, 5: 3, 6: 4, 7: 5, 8: 6, 9: 7, 10: 8, 11: 9,
                 12: 10, 13: 11, 14: IGNORE_ID}
CREATORS13 = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 6, 8: 7, 9: 8, 10: 9, 11: 10, 12: 11,
              13: 12, 14: IGNORE_ID}
ALL_RAW = np.arange(1, 15, dtype=np.uint8)


def write_pair(root: Path, split: str, town: str, name: str, image_rgb: np.ndarray,
               raw: np.ndarray) -> tuple[Path, Path]:
    top, sub, _ = SPLITS[split]
    image_path = root / top / 'images' / sub / town / f'{name}.png'
    label_path = root / top / 'annotations' / sub / town / f'{name}.png'
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(image_path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    assert cv2.imwrite(str(label_path), raw)
    return image_path, label_path


def raw_strip(h: int = 4) -> np.ndarray:
    """A 14-column label with column j holding raw id j+1: every raw id appears."""
    return np.tile(ALL_RAW, (h, 1))


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """train t1..t3, val t4, test t5/t6: one or two 4x14 images per town."""
    rng = np.random.default_rng(0)
    for split, (_, _, towns) in SPLITS.items():
        for town in towns:
            for k in range(2 if town in ('t1', 't5') else 1):
                write_pair(tmp_path, split, town, f'{town}_{k:03d}', random_image(rng, 4, 14),
                           raw_strip())
    return tmp_path


# ---------------------------------------------------------------- StreetHazards


@pytest.mark.parametrize('mapping,expected', [('densehybrid12', DENSEHYBRID12),
                                              ('creators13', CREATORS13)])
def test_every_raw_id_maps_to_its_train_id(tree: Path, mapping: str, expected: dict) -> None:
    ds = StreetHazards(tree, 'train', mapping=mapping)
    assert ds.num_classes == (12 if mapping == 'densehybrid12' else 13)
    label = ds[0]['label']
    assert label.dtype == torch.int64 and label.shape == (4, 14)
    for raw, train_id in expected.items():
        assert (label[:, raw - 1] == train_id).all(), (mapping, raw)


def test_densehybrid_names_keep_unlabeled_and_drop_other(tree: Path) -> None:
    ds = StreetHazards(tree, 'val')
    assert ds.class_names[0] == 'unlabeled' and 'other' not in ds.class_names
    assert 'other' in StreetHazards(tree, 'val', mapping='creators13').class_names


def test_splits_towns_and_order(tree: Path) -> None:
    assert len(StreetHazards(tree, 'train')) == 4
    assert len(StreetHazards(tree, 'val')) == 1
    test = StreetHazards(tree, 'test')
    assert len(test) == 3 and test.towns == ('t5', 't6')
    only_t5 = StreetHazards(tree, 'test', towns=('t5',))
    assert len(only_t5) == 2
    assert all('/t5/' in only_t5[i]['path'] for i in range(2))
    assert [Path(test[i]['path']).name for i in range(3)] == \
        ['t5_000.png', 't5_001.png', 't6_000.png']


def test_image_is_rgb_chw_uint8(tmp_path: Path) -> None:
    image = np.zeros((4, 14, 3), np.uint8)
    image[..., 0] = 200  # red
    image[..., 2] = 10
    write_pair(tmp_path, 'val', 't4', 'a', image, raw_strip())
    item = StreetHazards(tmp_path, 'val')[0]
    assert item['image'].dtype == torch.uint8 and item['image'].shape == (3, 4, 14)
    assert (item['image'][0] == 200).all() and (item['image'][2] == 10).all()
    assert 'ood' not in item


def test_ood_mask_values(tree: Path) -> None:
    item = StreetHazards(tree, 'test')[0]
    ood = item['ood']
    assert ood.dtype == torch.uint8 and ood.shape == (4, 14)
    expected = np.zeros(14, np.uint8)
    expected[14 - 1] = 1  # anomaly
    expected[4 - 1] = 2  # other
    assert (ood.numpy() == expected[None, :]).all()


def test_ood_mask_marks_padding_ignored(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    write_pair(tmp_path, 'test', 't5', 'a', random_image(rng, 4, 14), raw_strip())
    transform = JointTransform(crop_size=(8, 20), scale_range=(1.0, 1.0), flip=False)
    item = StreetHazards(tmp_path, 'test', transform=transform)[0]
    ood, label = item['ood'].numpy(), item['label'].numpy()
    assert ood.shape == (8, 20)
    assert (ood[4:, :] == 2).all() and (ood[:, 14:] == 2).all()  # padded bottom/right
    assert (label[4:, :] == IGNORE_ID).all() and (label[:, 14:] == IGNORE_ID).all()
    assert (ood[:4, 13] == 1).all() and (ood[:4, 3] == 2).all() and (ood[:4, 0] == 0).all()


def test_loader_collates_items(tree: Path) -> None:
    ds = StreetHazards(tree, 'test', transform=JointTransform(crop_size=(8, 16)))
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch['image'].shape == (3, 3, 8, 16) and batch['ood'].shape == (3, 8, 16)
    assert len(batch['path']) == 3


def test_transform_deterministic_per_seed_epoch_index(tree: Path) -> None:
    transform = JointTransform(crop_size=(6, 10), scale_range=(0.5, 2.0))

    def items(ds: StreetHazards) -> np.ndarray:
        # [N, 3*6*10 + 6*10]: every item's image and label, flattened
        return np.stack([np.concatenate([ds[i]['image'].numpy().ravel(),
                                         ds[i]['label'].numpy().ravel()])
                         for i in range(len(ds))])

    ds = StreetHazards(tree, 'train', transform=transform, seed=3)
    first = items(ds)
    assert np.array_equal(first, items(ds))
    assert np.array_equal(first, items(StreetHazards(tree, 'train', transform=transform, seed=3)))
    ds.set_epoch(1)
    assert not np.array_equal(first, items(ds))
    ds.set_epoch(0)
    assert np.array_equal(first, items(ds))
    other_seed = StreetHazards(tree, 'train', transform=transform, seed=4)
    assert not np.array_equal(first, items(other_seed))
    # Item i depends on (seed, epoch, i) alone, not on what was read before it.
    assert np.array_equal(first[2], np.concatenate([ds[2]['image'].numpy().ravel(),
                                                    ds[2]['label'].numpy().ravel()]))


def test_transform_must_pad_with_ignore_id(tree: Path) -> None:
    with pytest.raises(ConfigError, match='IGNORE_ID'):
        StreetHazards(tree, 'train', transform=JointTransform(crop_size=8, ignore_id=12))


def test_bad_arguments(tree: Path) -> None:
    with pytest.raises(ConfigError, match='split'):
        StreetHazards(tree, 'training')
    with pytest.raises(ConfigError, match='mapping'):
        StreetHazards(tree, 'train', mapping='cityscapes19')


def test_missing_root_and_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match='nowhere'):
        StreetHazards(tmp_path / 'nowhere', 'train')
    with pytest.raises(DataError, match=r'train/images/training'):
        StreetHazards(tmp_path, 'train')
    (tmp_path / 'train' / 'images' / 'training').mkdir(parents=True)
    with pytest.raises(DataError, match=r'train/annotations/training'):
        StreetHazards(tmp_path, 'train')
    (tmp_path / 'train' / 'annotations' / 'training').mkdir(parents=True)
    with pytest.raises(DataError, match='no town folder'):
        StreetHazards(tmp_path, 'train')
    (tmp_path / 'train' / 'images' / 'training' / 't1').mkdir()
    with pytest.raises(DataError, match='no \\*.png images'):
        StreetHazards(tmp_path, 'train')
    with pytest.raises(DataError, match='t9'):
        StreetHazards(tmp_path, 'train', towns=('t9',))


def test_image_without_annotation(tree: Path) -> None:
    orphan = tree / 'train' / 'images' / 'training' / 't2' / 'orphan.png'
    cv2.imwrite(str(orphan), np.zeros((4, 14, 3), np.uint8))
    with pytest.raises(DataError, match=r'annotations/training/t2/orphan\.png'):
        StreetHazards(tree, 'train')


@pytest.mark.parametrize('which', ['image', 'label'])
@pytest.mark.parametrize('damage', ['garbage', 'truncated', 'empty'])
def test_corrupt_png_names_the_file(tmp_path: Path, which: str, damage: str) -> None:
    paths = write_pair(tmp_path, 'val', 't4', 'bad', random_image(np.random.default_rng(2), 4,
                                                                   14), raw_strip())
    path = paths[0] if which == 'image' else paths[1]
    data = path.read_bytes()
    path.write_bytes({'garbage': b'not a png at all', 'truncated': data[:len(data) // 2],
                      'empty': b''}[damage])
    ds = StreetHazards(tmp_path, 'val')
    with pytest.raises(DataError, match=str(path)):
        ds[0]


def test_label_size_mismatch(tmp_path: Path) -> None:
    _, label_path = write_pair(tmp_path, 'val', 't4', 'a', np.zeros((4, 14, 3), np.uint8),
                               raw_strip())
    cv2.imwrite(str(label_path), np.ones((5, 14), np.uint8))
    with pytest.raises(DataError, match=r'a\.png.*14x5.*14x4'):
        StreetHazards(tmp_path, 'val')[0]


@pytest.mark.parametrize('bad_ids', [[0], [15, 200], [0, 255]])
def test_raw_id_outside_range(tmp_path: Path, bad_ids: list[int]) -> None:
    raw = raw_strip()
    raw[0, :len(bad_ids)] = bad_ids
    _, label_path = write_pair(tmp_path, 'test', 't6', 'ids', np.zeros((4, 14, 3), np.uint8),
                               raw)
    with pytest.raises(DataError) as err:
        StreetHazards(tmp_path, 'test')[0]
    assert str(label_path) in str(err.value) and str(sorted(bad_ids)) in str(err.value)


def test_colour_label_is_refused(tmp_path: Path) -> None:
    _, label_path = write_pair(tmp_path, 'val', 't4', 'rgb', np.zeros((4, 14, 3), np.uint8),
                               raw_strip())
    cv2.imwrite(str(label_path), np.ones((4, 14, 3), np.uint8))
    with pytest.raises(DataError, match=r'rgb\.png.*3 channel'):
        StreetHazards(tmp_path, 'val')[0]


# ---------------------------------------------------------------- transforms


def test_output_sizes_square_and_rectangular() -> None:
    rng = np.random.default_rng(0)
    image, label = random_image(rng, 30, 50), rng.integers(0, 12, (30, 50), dtype=np.uint8)
    for crop, hw in [(16, (16, 16)), ((12, 24), (12, 24)), ((24, 12), (24, 12))]:
        for k in range(10):
            out_image, out_label = JointTransform(crop_size=crop)(
                image, label, np.random.default_rng(k))
            assert out_image.shape == (*hw, 3) and out_label.shape == hw
            assert out_image.dtype == np.uint8 and out_label.dtype == np.uint8


def test_labels_keep_their_values_nearest_only() -> None:
    rng = np.random.default_rng(1)
    label = rng.choice(np.array([0, 3, 7, 11], np.uint8), size=(40, 60))
    image = random_image(rng, 40, 60)
    seen = set()
    for k in range(30):
        _, out = JointTransform(crop_size=(24, 36))(image, label, np.random.default_rng(k))
        seen |= set(np.unique(out).tolist())
    assert seen <= {0, 3, 7, 11, IGNORE_ID}
    assert {0, 3, 7, 11} <= seen


def test_image_and_label_stay_aligned() -> None:
    # Blocks of 8x8 pixels; the image is the label times 20 in every channel.
    rng = np.random.default_rng(2)
    label = np.kron(rng.integers(0, 12, (6, 8)), np.ones((8, 8), int)).astype(np.uint8)
    image = np.repeat((label * 20)[..., None], 3, axis=2).astype(np.uint8)
    for k in range(20):
        # Scale 1: a pure crop, so every pixel must agree exactly.
        out_image, out_label = JointTransform(crop_size=(24, 40), scale_range=(1.0, 1.0))(
            image, label, np.random.default_rng(k))
        assert (out_image[..., 0] == out_label.astype(np.int64) * 20).all(), k
        # Resampled: only block borders (blended by the linear image resize) may disagree;
        # a misaligned label would agree on about 1 pixel in 12.
        out_image, out_label = JointTransform(crop_size=(32, 48), scale_range=(0.5, 1.5))(
            image, label, np.random.default_rng(k))
        valid = out_label != IGNORE_ID
        agree = out_image[..., 0][valid] == out_label[valid].astype(np.int64) * 20
        assert agree.mean() > 0.65, k


def test_padding_uses_mean_and_ignore() -> None:
    image = np.full((10, 12, 3), 7, np.uint8)
    label = np.full((10, 12), 3, np.uint8)
    out_image, out_label = JointTransform(crop_size=(16, 20), scale_range=(1.0, 1.0),
                                          flip=False)(image, label, np.random.default_rng(0))
    # Scale 1 and a box larger than the image: the image sits at the top-left, unresampled.
    assert (out_label[:10, :12] == 3).all() and (out_image[:10, :12] == 7).all()
    pad = np.ones((16, 20), bool)
    pad[:10, :12] = False
    assert (out_label[pad] == IGNORE_ID).all()
    assert (out_image[pad] == np.array(STREETHAZARDS_MEAN_RGB, np.uint8)).all()
    custom = JointTransform(crop_size=16, scale_range=(1.0, 1.0), mean_fill=(1, 2, 3))
    out_image, _ = custom(image, label, np.random.default_rng(0))
    assert (out_image[15, 15] == [1, 2, 3]).all()


def test_scale_range_controls_the_box() -> None:
    # A label whose value is its column: a box of s*crop columns resampled to crop columns.
    label = np.tile(np.arange(200, dtype=np.uint8), (200, 1))
    image = np.zeros((200, 200, 3), np.uint8)
    for s in (0.5, 2.0):
        _, out = scale_crop(image, label, np.random.default_rng(0), (40, 40), (s, s))
        assert out[0, -1] - out[0, 0] == pytest.approx(s * 40, abs=2)


def test_flip_flips_image_and_label_together() -> None:
    rng = np.random.default_rng(3)
    image = random_image(rng, 8, 12)
    label = rng.integers(0, 12, (8, 12), dtype=np.uint8)
    flipped_image, flipped_label = hflip(image, label)
    assert (flipped_image == image[:, ::-1]).all() and (flipped_label == label[:, ::-1]).all()
    transform = JointTransform(crop_size=(8, 12), scale_range=(1.0, 1.0))
    outcomes = []
    for k in range(40):
        out_image, out_label = transform(image, label, np.random.default_rng(k))
        image_flipped = (out_image == flipped_image).all()
        label_flipped = (out_label == flipped_label).all()
        assert image_flipped == label_flipped
        assert image_flipped or ((out_image == image).all() and (out_label == label).all())
        outcomes.append(bool(image_flipped))
    assert 5 < sum(outcomes) < 35
    no_flip = JointTransform(crop_size=(8, 12), scale_range=(1.0, 1.0), flip=False)
    assert all((no_flip(image, label, np.random.default_rng(k))[1] == label).all()
               for k in range(10))


def test_transform_is_a_function_of_the_generator() -> None:
    rng = np.random.default_rng(4)
    image, label = random_image(rng, 20, 30), rng.integers(0, 12, (20, 30), dtype=np.uint8)
    transform = JointTransform(crop_size=(10, 14))
    a = transform(image, label, np.random.default_rng([1, 2, 3]))
    b = transform(image, label, np.random.default_rng([1, 2, 3]))
    c = transform(image, label, np.random.default_rng([1, 3, 3]))
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert (a[0] != c[0]).any() or (a[1] != c[1]).any()


def test_eval_transform() -> None:
    rng = np.random.default_rng(5)
    image = random_image(rng, 10, 20)
    label = rng.choice(np.array([1, 5, 9], np.uint8), size=(10, 20))
    same_image, same_label = EvalTransform()(image, label)
    assert same_image is image and same_label is label
    out_image, out_label = EvalTransform(size=(5, 10))(image, label)
    assert out_image.shape == (5, 10, 3) and out_label.shape == (5, 10)
    assert set(np.unique(out_label).tolist()) <= {1, 5, 9}
    big = np.kron(label, np.ones((2, 2), np.uint8))
    assert (EvalTransform(size=(20, 40))(np.repeat(big[..., None], 3, 2), big)[1]
            == big).all()
    assert (EvalTransform(size=(10, 20))(np.repeat(big[..., None], 3, 2), big)[1]
            == label).all()


def test_letterbox_mirrored_pads_at_the_pairs_own_scale() -> None:
    rng = np.random.default_rng(11)
    image, label = random_image(rng, 12, 16), rng.integers(0, 11, (12, 16), dtype=np.uint8)
    # 4:3 into 16:9 at height 12: width 21 (round(12 * 16 / 9)), bars of 2 and 3 columns.
    out_image, out_label = letterbox_mirrored(image, label, (360, 640), ignore_id=255)
    expected = np.pad(image, ((0, 0), (2, 3), (0, 0)), mode='reflect')
    assert out_image.shape == (12, 21, 3) and (out_image == expected).all()
    assert (out_label[:, 2:18] == label).all()
    assert (out_label[:, :2] == 255).all() and (out_label[:, 18:] == 255).all()
    # A wide pair gets bars above and below; a pair within 5 % of the aspect stays as it is.
    wide_image, wide_label = letterbox_mirrored(random_image(rng, 9, 32),
                                                np.zeros((9, 32), np.uint8), (360, 640))
    assert wide_image.shape == (18, 32, 3) and (wide_label[:4] == IGNORE_ID).all()
    assert (wide_label[4:13] == 0).all() and (wide_label[13:] == IGNORE_ID).all()
    near_image, near_label = letterbox_mirrored(image, label, (12, 16))
    assert near_image is image and near_label is label


def test_joint_transform_letterboxes_with_its_probability() -> None:
    rng = np.random.default_rng(12)
    image, label = random_image(rng, 24, 32), np.zeros((24, 32), np.uint8)
    # A crop of exactly the letterboxed frame (24 x 43) at scale 1: the output is the frame with
    # mirrored bars (columns 5 and 6 of bars), or the picture padded right with mean_fill.
    mirrored = np.pad(image, ((0, 0), (5, 6), (0, 0)), mode='reflect')
    padded = np.concatenate([image, np.full((24, 11, 3), (1, 2, 3), np.uint8)], axis=1)

    def transform(prob: float, seed: int) -> np.ndarray:
        return JointTransform(crop_size=(24, 43), scale_range=(1.0, 1.0), flip=False,
                              mean_fill=(1, 2, 3), letterbox_hw=(360, 640),
                              letterbox_prob=prob)(image, label, np.random.default_rng(seed))[0]

    assert all((transform(1.0, k) == mirrored).all() for k in range(3))
    assert all((transform(0.0, k) == padded).all() for k in range(3))
    drawn = [(transform(0.5, k) == mirrored).all() for k in range(200)]
    assert 0.4 < np.mean(drawn) < 0.6
    # Without letterbox_hw nothing extra is drawn: the random stream of earlier runs.
    a = JointTransform(crop_size=(10, 14))(image, label, np.random.default_rng(5))
    b = JointTransform(crop_size=(10, 14), letterbox_prob=1.0)(image, label,
                                                                np.random.default_rng(5))
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()


def test_transform_config_and_input_errors() -> None:
    with pytest.raises(ConfigError):
        JointTransform(scale_range=(2.0, 0.5))
    with pytest.raises(ConfigError):
        JointTransform(crop_size=0)
    with pytest.raises(ConfigError):
        JointTransform(mean_fill=(300, 0, 0))
    with pytest.raises(ConfigError):
        JointTransform(interpolation='lanczos9')
    with pytest.raises(ConfigError, match='letterbox_hw'):
        JointTransform(letterbox_hw=(0, 640))
    with pytest.raises(ConfigError, match='letterbox_prob'):
        JointTransform(letterbox_hw=(360, 640), letterbox_prob=1.5)
    with pytest.raises(DataError, match='label size'):
        JointTransform(crop_size=8)(np.zeros((4, 5, 3), np.uint8), np.zeros((4, 6), np.uint8),
                                    np.random.default_rng(0))
    with pytest.raises(DataError, match='uint8 label'):
        EvalTransform()(np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5), np.int32))


# ---------------------------------------------------------------- ADE20k negatives


def write_ade(root: Path, name: str, image_rgb: np.ndarray, label: np.ndarray) -> Path:
    (root / 'images' / 'training').mkdir(parents=True, exist_ok=True)
    (root / 'annotations' / 'training').mkdir(parents=True, exist_ok=True)
    image_path = root / 'images' / 'training' / f'{name}.jpg'
    assert cv2.imwrite(str(image_path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    assert cv2.imwrite(str(root / 'annotations' / 'training' / f'{name}.png'), label)
    return image_path


def blob_label(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Irregular blobs of ids 0..5 (never a rectangle as a whole)."""
    small = rng.integers(0, 6, (max(2, h // 6), max(2, w // 6)), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def test_rectangle_sides() -> None:
    assert rectangle_sides(384).tolist() == list(range(16, 377, 8))
    assert rectangle_sides(40).tolist() == [16, 24, 32]


def test_mask_rule_statistics() -> None:
    crop = 64
    rng = np.random.default_rng(6)
    label = blob_label(rng, crop, crop)
    present = set(np.unique(label).tolist())
    branches, sides, drawn_zero = [], set(), False
    for k in range(400):
        mask, branch = sample_negative_mask(label, np.random.default_rng([0, 0, k]))
        assert mask.dtype == bool and mask.shape == (crop, crop)
        branches.append(branch)
        if branch == 'rectangle':
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
            assert mask.sum() == h * w  # a filled axis-aligned rectangle inside the crop
            assert h % 8 == 0 and w % 8 == 0 and 16 <= h <= crop - 8 and 16 <= w <= crop - 8
            sides |= {int(h), int(w)}
        else:
            ids = set(np.unique(label[mask]).tolist())
            assert 1 <= len(ids) <= 2 and ids <= present
            assert (mask == np.isin(label, list(ids))).all()  # whole classes only
            drawn_zero |= 0 in ids
    share = branches.count('rectangle') / len(branches)
    assert 0.4 < share < 0.6
    assert sides == set(range(16, crop - 7, 8))  # every allowed side occurs, none other
    assert drawn_zero


def test_resize_shorter_side() -> None:
    image, label = np.zeros((40, 100, 3), np.uint8), np.zeros((40, 100), np.uint8)
    out_image, out_label = resize_shorter_side(image, label, 20)
    assert out_image.shape == (20, 50, 3) and out_label.shape == (20, 50)
    out_image, _ = resize_shorter_side(np.zeros((90, 30, 3), np.uint8),
                                       np.zeros((90, 30), np.uint8), 60)
    assert out_image.shape == (180, 60, 3)


def test_ade_items_and_determinism(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    for k, (h, w) in enumerate([(30, 50), (60, 40), (24, 24)]):
        write_ade(tmp_path, f'ADE_train_{k:08d}', random_image(rng, h, w), blob_label(rng, h, w))
    ds = ADE20kNegatives(tmp_path, crop=24, seed=1)
    assert len(ds) == 3
    first = [ds[i] for i in range(3)]
    for image, mask in first:
        assert image.dtype == torch.uint8 and image.shape == (3, 24, 24)
        assert mask.dtype == torch.bool and mask.shape == (24, 24) and mask.any()
    again = [ds[i] for i in range(3)]
    for a, b in zip(first, again, strict=True):
        assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    changed = []
    for epoch in range(1, 4):
        ds.set_epoch(epoch)
        changed += [(ds[i][1] != first[i][1]).any().item() for i in range(3)]
    assert any(changed)


def test_shrink_into_crop_known_answer() -> None:
    crop = 40
    image = np.full((crop, crop, 3), 200, np.uint8)
    mask = np.zeros((crop, crop), bool)
    mask[:20, :] = True  # the top half
    # Factor exactly 0.5 (lo == hi): a 20x20 copy with its top 10 rows masked, somewhere inside.
    out_image, out_mask = shrink_into_crop(image, mask, (0.5, 0.5), np.random.default_rng(3))
    rows, cols = np.flatnonzero(out_image.any((1, 2))), np.flatnonzero(out_image.any((0, 2)))
    assert rows[-1] - rows[0] + 1 == 20 and cols[-1] - cols[0] + 1 == 20
    top, left = rows[0], cols[0]
    assert (out_image[top:top + 20, left:left + 20] == 200).all()
    assert out_image.sum() == 200 * 3 * 20 * 20  # zero outside the copy
    expected = np.zeros((crop, crop), bool)
    expected[top:top + 10, left:left + 20] = True
    assert (out_mask == expected).all()
    # The full-size factor returns the crop unchanged.
    same_image, same_mask = shrink_into_crop(image, mask, (1.0, 1.0), np.random.default_rng(3))
    assert same_image is image and same_mask is mask


def test_shrink_factors_are_log_uniform_in_the_range() -> None:
    crop = 100
    image = np.full((crop, crop, 3), 9, np.uint8)
    mask = np.ones((crop, crop), bool)
    sides = np.array([np.sqrt(shrink_into_crop(image, mask, (0.25, 1.0),
                                               np.random.default_rng(k))[1].sum())
                      for k in range(600)])
    assert sides.min() >= 25 and sides.max() <= 100
    # log-uniform: half of the factors fall below the geometric mean 0.5 of 0.25 and 1
    assert 0.42 < float(np.mean(sides < 50)) < 0.58


def test_ade_scale_range_shrinks_items_and_keeps_the_default_stream(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    for k in range(4):
        write_ade(tmp_path, f'n{k}', random_image(rng, 64, 64), np.zeros((64, 64), np.uint8))
    full = ADE20kNegatives(tmp_path, crop=64, seed=2)
    same = ADE20kNegatives(tmp_path, crop=64, seed=2, scale=(1.0, 1.0))
    small = ADE20kNegatives(tmp_path, crop=64, seed=2, scale=(0.25, 0.5))
    for i in range(4):
        assert (full[i][0] == same[i][0]).all() and (full[i][1] == same[i][1]).all()
        mask = small[i][1]
        # One id everywhere: 'classes' masks the whole crop, a rectangle at most 56x56.
        assert 0 < int(mask.sum()) <= 32 * 32
        assert not (small[i][0][:, ~mask] == full[i][0][:, ~mask]).all()


@pytest.mark.parametrize('scale', [(0.0, 1.0), (0.5, 0.4), (0.5, 1.5)])
def test_ade_scale_range_errors(scale: tuple[float, float]) -> None:
    with pytest.raises(ConfigError, match=r'^scale must be \[min, max\] with 0 < min'):
        check_shrink_scale(scale)
    with pytest.raises(ConfigError, match=r'^scale must be'):
        ADE20kNegatives('unused', scale=scale)


def test_ade_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match='images/training'):
        ADE20kNegatives(tmp_path)
    (tmp_path / 'images' / 'training').mkdir(parents=True)
    with pytest.raises(DataError, match='annotations/training'):
        ADE20kNegatives(tmp_path)
    (tmp_path / 'annotations' / 'training').mkdir(parents=True)
    with pytest.raises(DataError, match='no \\*.jpg'):
        ADE20kNegatives(tmp_path)
    rng = np.random.default_rng(8)
    image_path = write_ade(tmp_path, 'a', random_image(rng, 30, 30), blob_label(rng, 30, 30))
    cv2.imwrite(str(tmp_path / 'images' / 'training' / 'b.jpg'), random_image(rng, 30, 30))
    with pytest.raises(DataError, match=r'annotations/training/b\.png'):
        ADE20kNegatives(tmp_path)
    (tmp_path / 'images' / 'training' / 'b.jpg').unlink()
    image_path.write_bytes(b'\xff\xd8 broken jpeg')
    with pytest.raises(DataError, match=r'a\.jpg'):
        ADE20kNegatives(tmp_path, crop=24)[0]
    write_ade(tmp_path, 'a', random_image(rng, 30, 30), blob_label(rng, 30, 31))
    with pytest.raises(DataError, match=r'a\.png.*31x30.*30x30'):
        ADE20kNegatives(tmp_path, crop=24)[0]
    with pytest.raises(ConfigError):
        ADE20kNegatives(tmp_path, crop=16)
