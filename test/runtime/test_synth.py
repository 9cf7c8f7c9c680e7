"""The synthetic generator writes real formats: StreetHazards tree, ADE20k folder, rosbag2."""

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from anomaly_seg_node.errors import BagError, DataError
from anomaly_seg_node.labels import RAW_ANOMALY_ID
from training.synth import command, render_preview, write_bag, write_dataset, write_negatives
from training.synth.bag import FRAME_ID, START_NS, TOPICS
from training.synth.negatives import (
    MATERIAL,
    MATERIAL_IDS,
    NEGATIVE_SHAPES,
    NEGATIVES_STREAM,
    TEXTURE_FAMILIES,
    convex_shape,
    render_negative,
    texture,
)
from training.synth.scene import ANOMALY_FAMILIES, anomaly_shape, sample_camera, sample_world

SIZE = (64, 128)
COUNTS = {'train': 4, 'val': 2, 'test': 6}


def _dataset(root: Path, seed: int = 0) -> dict:
    return write_dataset(root, COUNTS['train'], COUNTS['val'], COUNTS['test'], size=SIZE,
                         seed=seed, progress=False)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp('synth') / 'sh'
    _dataset(root)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*'))
            if p.is_file()}


def _expected_paths() -> set[str]:
    """Every file the StreetHazards layout must hold for COUNTS, towns taken in turn."""
    layout = {'train': ('train', 'training', ('t1', 't2', 't3')),
              'val': ('train', 'validation', ('t4',)),
              'test': ('test', 'test', ('t5', 't6'))}
    paths = {'synth.json'}
    for split, (top, sub, towns) in layout.items():
        for i in range(COUNTS[split]):
            for kind in ('images', 'annotations'):
                paths.add(f'{top}/{kind}/{sub}/{towns[i % len(towns)]}/{i:05d}.png')
    return paths


def test_tree_has_exactly_the_streethazards_paths(dataset: Path) -> None:
    assert set(_files(dataset)) == _expected_paths()


def _labels(root: Path, top: str, sub: str) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = []
    for image_path in sorted((root / top / 'images' / sub).glob('*/*.png')):
        label_path = root / top / 'annotations' / sub / image_path.parent.name / image_path.name
        image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
        label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        pairs.append((image, label))
    return pairs


def test_annotations_are_raw_ids_of_the_image_size(dataset: Path) -> None:
    for top, sub in (('train', 'training'), ('train', 'validation'), ('test', 'test')):
        for image, label in _labels(dataset, top, sub):
            assert image.shape == (*SIZE, 3) and image.dtype == np.uint8
            assert label.shape == SIZE and label.dtype == np.uint8
            assert label.min() >= 1 and label.max() <= 14
            # a road scene: road, sidewalk and the sky (unlabeled) are always in view
            assert {1, 8, 9} <= set(np.unique(label).tolist())


def test_anomalies_only_in_test_and_within_the_promised_share(dataset: Path) -> None:
    for sub in ('training', 'validation'):
        for _, label in _labels(dataset, 'train', sub):
            assert not (label == RAW_ANOMALY_ID).any()
    shares, components = [], []
    for _, label in _labels(dataset, 'test', 'test'):
        mask = (label == RAW_ANOMALY_ID).astype(np.uint8)
        shares.append(mask.mean())
        components.append(cv2.connectedComponents(mask)[0] - 1)
    assert max(shares) <= 0.3  # up to three anomalies of at most 10% each
    assert 0.0005 <= float(np.mean(shares)) <= 0.15
    assert np.mean(components) >= 1.0
    manifest = json.loads((dataset / 'synth.json').read_text())
    assert manifest['counts'] == COUNTS and manifest['size'] == list(SIZE)
    assert manifest['test_anomaly_pixel_share'] == pytest.approx(np.mean(shares))


def test_same_seed_same_bytes_other_seed_differs(dataset: Path, tmp_path: Path) -> None:
    _dataset(tmp_path / 'again', seed=0)
    _dataset(tmp_path / 'other', seed=1)
    first, again, other = _files(dataset), _files(tmp_path / 'again'), _files(tmp_path / 'other')
    assert first == again
    images = [k for k in first if k.endswith('.png')]
    assert all(first[k] != other[k] for k in images)


def test_anomaly_shapes_are_never_convex() -> None:
    rng = np.random.default_rng(0)
    for family in ANOMALY_FAMILIES:
        for _ in range(5):
            parts = anomaly_shape(rng, family)
            canvas = np.zeros((200, 200), np.uint8)
            for pts, erase in parts:
                q = ((pts + [0.5, 0.0]) * 180 + 10) * 16
                cv2.fillPoly(canvas, [q.astype(np.int32)], 0 if erase else 1, cv2.LINE_8, 4)
            contours, _ = cv2.findContours(canvas, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            hull = cv2.contourArea(cv2.convexHull(np.concatenate(contours)))
            assert canvas.sum() < 0.93 * hull, family  # clearly short of its convex hull


def test_inlier_and_negative_shapes_are_convex() -> None:
    # the families stay disjoint: training scenes and negatives draw convex pieces only
    rng = np.random.default_rng(1)
    for _ in range(3):
        world = sample_world(rng, sample_camera(rng, SIZE), n_anomalies=2)
        prims = [p for s in world.sprites for p in s.prims]
        inliers = [p for p in prims if p.label not in (0, RAW_ANOMALY_ID)]
        assert len(inliers) > 20 and len(prims) > len(inliers)
        for p in inliers:
            assert cv2.isContourConvex((p.pts * 1000).astype(np.int32).reshape(-1, 1, 2))
    for family in NEGATIVE_SHAPES:
        for _ in range(5):
            pts = convex_shape(rng, family, 200, 300)
            assert cv2.isContourConvex((pts * 100).astype(np.int32).reshape(-1, 1, 2)), family


def test_refuses_to_overwrite_and_leaves_no_temp(dataset: Path, tmp_path: Path) -> None:
    target = tmp_path / 'busy'
    target.mkdir()
    (target / 'keep.txt').write_text('mine')
    with pytest.raises(DataError, match='--overwrite'):
        _dataset(target)
    assert (target / 'keep.txt').read_text() == 'mine'
    write_dataset(target, 1, 0, 1, size=SIZE, seed=0, overwrite=True, progress=False)
    assert not (target / 'keep.txt').exists() and (target / 'synth.json').exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['busy']


def test_bad_arguments_are_domain_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match='size'):
        write_dataset(tmp_path / 'a', 1, 1, 1, size=(8, 8), seed=0, progress=False)
    with pytest.raises(DataError, match='counts'):
        write_dataset(tmp_path / 'b', 0, 0, 0, size=SIZE, seed=0, progress=False)
    with pytest.raises(DataError, match='seed'):
        write_dataset(tmp_path / 'c', 1, 0, 0, size=SIZE, seed=-1, progress=False)
    with pytest.raises(BagError, match='storage'):
        write_bag(tmp_path / 'd', 2, SIZE, storage='rosbag1', progress=False)
    with pytest.raises(DataError, match='encoding'):
        write_bag(tmp_path / 'e', 2, SIZE, encoding='rgba16', progress=False)
    assert not any(tmp_path.iterdir())


def _cli(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


def test_command_writes_dataset_and_preview(tmp_path: Path) -> None:
    report = _cli(['dataset', '--out', str(tmp_path / 'd'), '--train', '2', '--val', '1',
                   '--test', '2', '--size', '64x96', '--seed', '3'])
    assert report['counts'] == {'train': 2, 'val': 1, 'test': 2} and report['size'] == [64, 96]
    report = _cli(['preview', '--data', str(tmp_path / 'd'), '--out', str(tmp_path / 'p.png'),
                   '--n', '3'])
    sheet = cv2.imread(report['preview'], cv2.IMREAD_COLOR)
    assert sheet.shape[1] == 3 * 320 and sheet.shape[0] >= 3 * 200
    with pytest.raises(SystemExit):
        _cli(['dataset', '--out', str(tmp_path / 'x'), '--size', 'big'])


def test_preview_shows_the_anomaly_colour(dataset: Path, tmp_path: Path) -> None:
    out = render_preview(dataset, tmp_path / 'sheet.png', n=4)
    sheet = cv2.cvtColor(cv2.imread(str(out), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert sheet.shape == (4 * (160 + 4), 960, 3)
    cyan = np.all(sheet == (0, 255, 255), axis=2)
    assert cyan[:, 640:].any()  # the anomaly column of the test rows
    with pytest.raises(DataError, match='StreetHazards'):
        render_preview(tmp_path, tmp_path / 'x.png')


def test_negatives_layout_and_classes(tmp_path: Path) -> None:
    manifest = write_negatives(tmp_path / 'ade', 3, size=(96, 128), seed=0, progress=False)
    images = sorted((tmp_path / 'ade' / 'images' / 'training').glob('*.jpg'))
    labels = sorted((tmp_path / 'ade' / 'annotations' / 'training').glob('*.png'))
    assert [p.stem for p in images] == [p.stem for p in labels] == [
        'ADE_train_00000001', 'ADE_train_00000002', 'ADE_train_00000003']
    for image_path, label_path in zip(images, labels, strict=True):
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        assert image.shape == (96, 128, 3) and label.shape == (96, 128)
        assert label.dtype == np.uint8 and label.max() <= 150
        assert len(np.unique(label)) >= 4
    assert manifest['count'] == 3 and set(manifest['shape_families']).isdisjoint(ANOMALY_FAMILIES)
    assert manifest['material_share'] == 0.5 and MATERIAL in manifest['texture_families']


def _median_saturation(rgb: np.ndarray) -> float:
    hsv = cv2.cvtColor(np.clip(rgb, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
    return float(np.median(hsv[..., 1]))


def test_negative_materials_are_muted_and_patterns_saturated() -> None:
    rng = np.random.default_rng(3)
    for _ in range(10):
        assert _median_saturation(texture(rng, MATERIAL, 64, 96)) <= 150
        assert _median_saturation(texture(rng, 'stripes', 64, 96)) >= 140
    surface = texture(rng, MATERIAL, 64, 96)
    assert surface.shape == (64, 96, 3) and surface.std() > 2  # shading and grain, not flat
    with pytest.raises(ValueError, match='material'):
        texture(rng, 'marble', 8, 8)


@pytest.mark.parametrize('family', TEXTURE_FAMILIES)
def test_every_texture_fills_an_empty_band(family: str) -> None:
    # both band cuts on one row leave a middle band of height 0 (seed 2, image 155 of 384x512)
    surface = texture(np.random.default_rng(0), family, 0, 64)
    assert surface.shape == (0, 64, 3)


def test_negative_with_an_empty_band_renders() -> None:
    image, label = render_negative(np.random.default_rng([2, NEGATIVES_STREAM, 155]), (384, 512))
    assert image.shape == (384, 512, 3) and label.shape == (384, 512)


@pytest.mark.parametrize('share', [0.0, 1.0])
def test_material_share_decides_object_textures(share: float) -> None:
    # pattern objects get ids 7..146, plain-material objects 147..150 (see render_negative)
    for index in range(4):
        _, label = render_negative(np.random.default_rng([7, index]), (96, 128), share)
        objects = {int(c) for c in np.unique(label) if c >= 7}
        assert objects
        assert objects <= set(MATERIAL_IDS) if share == 1.0 else max(objects) <= 146


def test_negatives_reject_a_share_outside_0_1(tmp_path: Path) -> None:
    with pytest.raises(DataError, match='--material-share'):
        write_negatives(tmp_path / 'ade', 1, size=(32, 32), material_share=1.5, progress=False)
    assert not (tmp_path / 'ade').exists()


def _read_bag(path: Path) -> dict[str, list[tuple[int, object]]]:
    typestore = get_typestore(Stores.ROS2_HUMBLE)
    out: dict[str, list[tuple[int, object]]] = {}
    with AnyReader([path], default_typestore=typestore) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        for conn, stamp, raw in reader.messages():
            out.setdefault(conn.topic, []).append((stamp, reader.deserialize(raw, conn.msgtype)))
    out['_types'] = types  # type: ignore[assignment]
    return out


def _decode(msg: object) -> np.ndarray:
    channels = msg.step // msg.width
    return np.asarray(msg.data).reshape(msg.height, msg.width, channels).squeeze(-1) \
        if channels == 1 else np.asarray(msg.data).reshape(msg.height, msg.width, channels)


BAG_SIZE = (72, 128)
FRAMES = 6


@pytest.fixture(scope='module')
def bags(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp('bags')
    paths = {}
    for storage in ('mcap', 'sqlite3'):
        for encoding in ('rgb8', 'bgr8', 'mono8'):
            path = root / f'{storage}_{encoding}'
            write_bag(path, FRAMES, BAG_SIZE, storage=storage, encoding=encoding,
                      compressed=encoding == 'rgb8', seed=5, progress=False)
            paths[storage, encoding] = path
    return paths


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_bag_reads_back_with_topics_stamps_and_frames(bags: dict, storage: str) -> None:
    data = _read_bag(bags[storage, 'rgb8'])
    assert data['_types'] == {
        TOPICS['image']: 'sensor_msgs/msg/Image',
        TOPICS['compressed']: 'sensor_msgs/msg/CompressedImage',
        TOPICS['info']: 'sensor_msgs/msg/CameraInfo',
        TOPICS['labels']: 'sensor_msgs/msg/Image'}
    for topic in (TOPICS['image'], TOPICS['compressed'], TOPICS['info'], TOPICS['labels']):
        stamps = [stamp for stamp, _ in data[topic]]
        assert len(stamps) == FRAMES
        assert stamps == [START_NS + i * 100_000_000 for i in range(FRAMES)]
        for stamp, msg in data[topic]:
            assert msg.header.frame_id == FRAME_ID
            assert msg.header.stamp.sec * 10 ** 9 + msg.header.stamp.nanosec == stamp
    info = data[TOPICS['info']][0][1]
    assert (info.height, info.width) == BAG_SIZE
    k = np.asarray(info.k).reshape(3, 3)
    assert k[0, 0] > 0 and k[0, 0] == k[1, 1] and 0 < k[0, 2] < BAG_SIZE[1]
    assert np.asarray(info.p).reshape(3, 4)[:, :3] == pytest.approx(k)
    labels = np.stack([_decode(m) for _, m in data[TOPICS['labels']]])
    assert labels.shape == (FRAMES, *BAG_SIZE)
    assert labels.min() >= 1 and labels.max() <= 14
    assert (labels == RAW_ANOMALY_ID).any()  # the anomalies lie on the road ahead
    for _, msg in data[TOPICS['labels']]:
        assert msg.encoding == 'mono8'
    frames = [_decode(m) for _, m in data[TOPICS['image']]]
    for (_, msg), raw in zip(data[TOPICS['compressed']], frames, strict=True):
        assert msg.format == 'jpeg'
        jpeg = cv2.imdecode(np.asarray(msg.data, np.uint8), cv2.IMREAD_COLOR)
        assert np.abs(jpeg[..., ::-1].astype(int) - raw).mean() < 8


def test_bag_drive_moves_forward(bags: dict) -> None:
    labels = [_decode(m) for _, m in _read_bag(bags['mcap', 'rgb8'])[TOPICS['labels']]]
    # an approaching anomaly grows from frame to frame
    areas = [int((lab == RAW_ANOMALY_ID).sum()) for lab in labels]
    assert areas[-1] > areas[0] > 0, areas


def test_bag_encodings_decode_to_the_same_frame(bags: dict) -> None:
    for storage in ('mcap', 'sqlite3'):
        rgb = [(m.encoding, _decode(m)) for _, m in _read_bag(bags[storage, 'rgb8'])[
            TOPICS['image']]]
        bgr = [(m.encoding, _decode(m)) for _, m in _read_bag(bags[storage, 'bgr8'])[
            TOPICS['image']]]
        mono = [(m.encoding, _decode(m)) for _, m in _read_bag(bags[storage, 'mono8'])[
            TOPICS['image']]]
        for (e1, a), (e2, b), (e3, c) in zip(rgb, bgr, mono, strict=True):
            assert (e1, e2, e3) == ('rgb8', 'bgr8', 'mono8')
            assert a.shape == (*BAG_SIZE, 3) and c.shape == BAG_SIZE
            np.testing.assert_array_equal(b[..., ::-1], a)
            np.testing.assert_array_equal(c, cv2.cvtColor(a, cv2.COLOR_RGB2GRAY))
        assert TOPICS['compressed'] not in _read_bag(bags[storage, 'bgr8'])


def test_bag_is_reproducible_and_refuses_overwrite(bags: dict, tmp_path: Path) -> None:
    path = tmp_path / 'again'
    write_bag(path, FRAMES, BAG_SIZE, storage='mcap', encoding='bgr8', seed=5, progress=False)
    a = [_decode(m) for _, m in _read_bag(path)[TOPICS['image']]]
    b = [_decode(m) for _, m in _read_bag(bags['mcap', 'bgr8'])[TOPICS['image']]]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(DataError, match='--overwrite'):
        write_bag(path, 2, BAG_SIZE, progress=False)
    write_bag(path, 3, BAG_SIZE, storage='sqlite3', overwrite=True, rate_hz=20.0, progress=False)
    stamps = [stamp for stamp, _ in _read_bag(path)[TOPICS['image']]]
    assert stamps == [START_NS, START_NS + 50_000_000, START_NS + 100_000_000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['again']
