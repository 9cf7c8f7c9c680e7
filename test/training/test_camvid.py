"""CamVid end to end on the project's own data: the loader (training/data/camvid*.py), photometric
jitter, training and calibration on CamVid, and evaluation of CamVid-layout, plain and labelled
folders with the centre-prior reference (training/evaluate.py).

The frames come from the committed demo sample (samples/camvid, 86 CamVid test frames with their
labels), copied into small train/val/test trees; anomalies are pasted by `synth paste`.
"""

from pathlib import Path
import shutil

import cv2
import numpy as np
import pytest
import torch

from anomaly_seg_node.errors import ConfigError, DataError
from anomaly_seg_node.labels import CAMVID_ANOMALY_ID, CAMVID_CLASS_NAMES, IGNORE_ID
from training import calibration
from training.config import load_config
from training.data.camvid import CamVid
from training.data.camvid_layout import index_split, sequence_of
from training.data.registry import detect_layout
from training.data.transforms import JointTransform, color_jitter
from training.evaluate import CENTRE_PRIOR, centre_prior, run_evaluation
from training.synth import write_negatives
from training.synth.paste import write_pasted
from training.train import train

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / 'samples' / 'camvid'
CONFIGS = ROOT / 'training' / 'configs'
K = len(CAMVID_CLASS_NAMES)
SMALL = (60, 80)  # frames shrunk 6x: fast, still CamVid's 4:3
pytestmark = pytest.mark.usefixtures('one_thread')


def _copy_split(frames: list[Path], root: Path, split: str, label_dir: str | None = None,
                size: tuple[int, int] | None = None) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    labels = root / (label_dir or f'{split}annot')
    labels.mkdir(exist_ok=True)
    for frame in frames:
        image = cv2.imread(str(frame))
        label = cv2.imread(str(SAMPLE / 'testannot' / f'{frame.stem}.png'), cv2.IMREAD_UNCHANGED)
        if size is not None:
            image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_AREA)
            label = cv2.resize(label, size[::-1], interpolation=cv2.INTER_NEAREST_EXACT)
        cv2.imwrite(str(root / split / f'{frame.stem}.png'), image)
        cv2.imwrite(str(labels / f'{frame.stem}.png'), label)


@pytest.fixture(scope='module')
def camvid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CamVid tree (train 4, val 2, test 4 frames) at SMALL, from the committed sample."""
    root = tmp_path_factory.mktemp('camvid')
    frames = sorted((SAMPLE / 'test').glob('*.jpg'))
    _copy_split(frames[0:4], root, 'train', size=SMALL)
    _copy_split(frames[10:12], root, 'val', size=SMALL)
    _copy_split(frames[20:24], root, 'test', size=SMALL)
    return root


def test_the_committed_sample_is_a_camvid_test_split() -> None:
    samples = index_split(SAMPLE, 'test')
    assert len(samples) == 86 and {sequence_of(p) for p, _ in samples} == {'Seq05VD'}
    size = sum(p.stat().st_size for p in SAMPLE.rglob('*') if p.is_file())
    assert size < 5 * 2 ** 20  # the budget for committed data
    assert (SAMPLE / 'README.md').is_file()


def test_items_map_ids_void_and_anomalies(camvid: Path, tmp_path: Path) -> None:
    ds = CamVid(camvid, 'train')
    assert len(ds) == 4 and ds.num_classes == K and ds.sequences == ['Seq05VD']
    item = ds[0]
    assert item['image'].shape == (3, *SMALL) and item['image'].dtype == torch.uint8
    raw = cv2.imread(str(camvid / 'trainannot' / Path(item['path']).name), cv2.IMREAD_UNCHANGED)
    label = item['label'].numpy()
    assert np.array_equal(label[raw < K], raw[raw < K])  # class ids are train ids
    assert (label[raw == 11] == IGNORE_ID).all()  # void
    assert set(np.unique(item['ood'].numpy())) <= {0, 2}  # no anomaly in plain CamVid

    pasted = write_pasted(camvid, tmp_path / 'pasted', split='test', progress=False)
    test = CamVid(pasted['out'], 'test')
    anomaly = [test[i] for i in range(len(test))]
    raw = cv2.imread(str(tmp_path / 'pasted' / 'testannot' / Path(anomaly[0]['path']).name),
                     cv2.IMREAD_UNCHANGED)
    assert (anomaly[0]['ood'].numpy() == (raw == CAMVID_ANOMALY_ID)).sum() > 0
    assert (anomaly[0]['label'].numpy()[raw == CAMVID_ANOMALY_ID] == IGNORE_ID).all()
    assert sum(int((a['ood'] == 1).sum()) for a in anomaly) > 0


def test_other_layout_sequences_and_errors(camvid: Path, tmp_path: Path) -> None:
    frames = sorted((SAMPLE / 'test').glob('*.jpg'))[:2]
    _copy_split(frames, tmp_path / 'alt', 'train', label_dir='train_labels', size=SMALL)
    assert len(CamVid(tmp_path / 'alt', 'train')) == 2
    assert detect_layout(camvid) == 'camvid' and detect_layout(tmp_path) == 'streethazards'
    with pytest.raises(DataError, match='has no frames of'):
        CamVid(camvid, 'train', sequences=['0001TP'])
    with pytest.raises(ConfigError, match='unknown CamVid split'):
        CamVid(camvid, 'training')
    with pytest.raises(DataError, match='is not a folder'):
        CamVid(tmp_path / 'nowhere', 'train')
    broken = tmp_path / 'broken'
    shutil.copytree(camvid, broken)
    name = sorted((broken / 'trainannot').iterdir())[0]
    colour = cv2.cvtColor(cv2.imread(str(name), cv2.IMREAD_UNCHANGED), cv2.COLOR_GRAY2BGR)
    cv2.imwrite(str(name), colour)
    with pytest.raises(DataError, match='single-channel 8-bit'):
        CamVid(broken, 'train')[0]
    cv2.imwrite(str(name), np.full(SMALL, 40, np.uint8))
    with pytest.raises(DataError, match=r'holds ids \[40\] outside CamVid'):
        CamVid(broken, 'train')[0]
    name.unlink()
    with pytest.raises(DataError, match='have no label'):
        CamVid(broken, 'train')


def test_color_jitter_keeps_labels_and_the_old_stream() -> None:
    rng_image = np.random.default_rng(0)
    image = rng_image.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    label = rng_image.integers(0, 11, (40, 60), dtype=np.uint8)
    plain = JointTransform((32, 48), (0.5, 2.0))
    jittered = JointTransform((32, 48), (0.5, 2.0), color_jitter=0.3)
    a_image, a_label = plain(image, label, np.random.default_rng(5))
    b_image, b_label = jittered(image, label, np.random.default_rng(5))
    assert np.array_equal(a_label, b_label)  # geometry draws first, then the colours
    assert not np.array_equal(a_image, b_image)
    # strength 0 draws nothing: the stream of a config without jitter is unchanged
    rng = np.random.default_rng(1)
    assert color_jitter(image, rng, 0.0) is image
    assert rng.random() == np.random.default_rng(1).random()
    # brightness alone (contrast and saturation factors 1): a known scale of a grey image
    grey = np.full((4, 4, 3), 100, np.uint8)
    out = color_jitter(grey, np.random.default_rng(3), 0.3)
    factors = np.random.default_rng(3).uniform(0.7, 1.3, 3)
    assert abs(int(out[0, 0, 0]) - round(100 * factors[0])) <= 1


def test_trains_exports_thresholds_and_evaluates_on_camvid(camvid: Path,
                                                           tmp_path: Path) -> None:
    write_negatives(tmp_path / 'neg', n=4, size=(32, 48), seed=0, progress=False)
    tiny = [f'data.root={camvid}', 'data.crop_size=[32,48]', 'data.num_workers=0',
            'train.batch_size=2', 'train.log_every=1', 'train.device=cpu', 'train.max_steps=2']
    closed = train(load_config(CONFIGS / 'camvid_closed_set.yaml', tiny), tmp_path / 'stage1',
                   progress=False)
    assert closed['steps'] == 2 and closed['steps_per_epoch'] == 2
    ood = train(load_config(CONFIGS / 'camvid_oodhead.yaml', [
        *tiny, f'negatives.ade_root={tmp_path / "neg"}', 'negatives.ade_crop=24',
        f'model.init_checkpoint={closed["final_checkpoint"]}']), tmp_path / 'ood',
        progress=False)
    assert ood['losses']['d'] > 0

    # thresholds on CamVid val with pasted anomalies: default fpr1, the data named
    write_pasted(camvid, tmp_path / 'val_pasted', split='val', progress=False)
    from training.checkpoint import build_segmenter, load_checkpoint
    segmenter = build_segmenter(load_checkpoint(ood['final_checkpoint']))
    maps = calibration.ScoreMaps(segmenter, ['DH'], {'DH': None}, 'stride4')
    result = calibration.calibrate_on_data(
        maps, (48, 96), val_root=None, mapping='densehybrid12', dataset='camvid',
        labelled_root=tmp_path / 'val_pasted', pad_rgb=(105, 108, 110), progress=False)
    assert result.default_threshold == 'fpr1'
    assert 'synth paste --seed 0' in result.info['data'] and result.info['images']['fpr'] == 2
    assert result.parity_images.shape == (2, 48, 96, 3)
    # letterbox: 4:3 frames fill the middle 64 of 96 columns; the bars are the pad colour
    assert (result.parity_images[:, :, :16] == (105, 108, 110)).all()
    thresholds = result.thresholds['DH']
    assert thresholds['tpr95'] <= thresholds['fpr1'] <= thresholds['fpr0.1']
    # pad_mode 'reflect' (export's default): the bars mirror the picture, the info says so
    mirrored = calibration.calibrate_on_data(
        maps, (48, 96), val_root=None, mapping='densehybrid12', dataset='camvid',
        labelled_root=tmp_path / 'val_pasted', pad_mode='reflect', progress=False)
    assert mirrored.info['pad_mode'] == 'reflect' and result.info['pad_mode'] == 'constant'
    np.testing.assert_array_equal(mirrored.parity_images[:, :, 16:32],
                                  result.parity_images[:, :, 16:32])
    np.testing.assert_array_equal(mirrored.parity_images[:, :, :16],
                                  mirrored.parity_images[:, :, 32:16:-1])


def _oracle(root: Path, split: str, bump: float = 0.0):
    """Perfect labels and a perfect score (1 on anomalies) of the frames of a CamVid tree."""
    table = {}
    ds = CamVid(root, split)
    for i in range(len(ds)):
        item = ds[i]
        key = item['image'].numpy().tobytes()
        table[key] = (item['label'].numpy(), item['ood'].numpy())

    def predict(image: np.ndarray):
        label, ood = table[np.ascontiguousarray(image.transpose(2, 0, 1)).tobytes()]
        score = (ood == 1).astype(np.float32) + bump
        return np.where(label == IGNORE_ID, 0, label).astype(np.int64), {'DH': score}
    return predict


FACTS = {'source': 'oracle', 'method': 'oodhead', 'num_classes': K,
         'classes': list(CAMVID_CLASS_NAMES), 'temperature': None}


def test_evaluates_pasted_camvid_per_recording_with_the_centre_prior(camvid: Path,
                                                                     tmp_path: Path) -> None:
    pasted = Path(write_pasted(camvid, tmp_path / 'pasted', split='test', progress=False)['out'])
    m = run_evaluation(_oracle(pasted, 'test'), FACTS, pasted, ['DH'], tmp_path / 'ev',
                       progress=False)
    assert m['layout'] == 'camvid' and m['towns'] == {'Seq05VD': 4}
    assert m['scores']['DH']['per_image']['ap'] == pytest.approx(1.0)
    assert m['closed_miou'] == pytest.approx(1.0)
    assert set(m['closed_iou']) == set(CAMVID_CLASS_NAMES)
    components = m['scores']['DH']['components']  # the one recording's tau, set on itself
    assert components['siou'] == components['ppv'] == components['f1_mean'] == 1.0
    assert list(components['threshold']['per_town']) == ['Seq05VD']
    prior = m['reference'][CENTRE_PRIOR]['per_image']
    assert 0 < prior['ap'] < 1 and prior['n_images'] == m['scores']['DH']['per_image']['n_images']
    table = (tmp_path / 'ev' / 'table.md').read_text()
    assert '| reference | | centre prior |' in table and '| road |' in table


def test_centre_prior_is_a_centred_gaussian() -> None:
    prior = centre_prior(40, 80)
    assert prior.shape == (40, 80) and prior.dtype == np.float32
    assert prior.max() == prior[19, 39] == prior[20, 40]  # the four centre pixels
    # a pixel centre 2 sigma (= half the side) from the centre on both axes: exp(-4)
    assert centre_prior(4, 4)[0, 0] == pytest.approx(np.exp(-0.5 * (1.5 ** 2) * 2), rel=1e-6)
    assert prior[0, 0] == pytest.approx(np.exp(-0.5 * ((19.5 / 10) ** 2 + (39.5 / 20) ** 2)))


def test_plain_frames_give_flag_rates_and_folders_take_conventions(camvid: Path,
                                                                   tmp_path: Path) -> None:
    facts = {**FACTS, 'thresholds': {'low': -1.0, 'high': 0.5}}
    m = run_evaluation(_oracle(camvid, 'test', bump=0.25), facts, camvid, ['DH'],
                       tmp_path / 'plain', progress=False)
    assert 'no anomaly pixel' in m['note'] and 'reference' not in m
    assert 'components' not in m['scores']['DH']  # no anomaly: no component to find
    flagged = m['scores']['DH']['thresholds']
    assert flagged['low']['inlier_flagged'] == 1.0 and flagged['high']['inlier_flagged'] == 0.0
    assert m['closed_miou'] == pytest.approx(1.0)

    # Road Anomaly's layout with its 0/2 ids: anomaly metrics only
    pasted = Path(write_pasted(camvid, tmp_path / 'pasted', split='test', progress=False)['out'])
    folder = tmp_path / 'road_anomaly' / 'frames'
    folder.mkdir(parents=True)
    for image_path, label_path in index_split(pasted, 'test'):
        shutil.copy(image_path, folder / image_path.name)
        (folder / f'{image_path.stem}.labels').mkdir()
        raw = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(folder / f'{image_path.stem}.labels' / 'labels_semantic.png'),
                    np.where(raw == CAMVID_ANOMALY_ID, 2, 0).astype(np.uint8))
    m = run_evaluation(_oracle(pasted, 'test'), FACTS, folder.parent, ['DH'],
                       tmp_path / 'ra', progress=False, labels='road-anomaly')
    assert m['layout'] == 'folder' and m['closed_miou'] is None
    assert m['scores']['DH']['per_image']['ap'] == pytest.approx(1.0)
    assert 'no class ids' in m['class_metrics_note']
    with pytest.raises(ConfigError, match='say what its ids mean with --labels'):
        run_evaluation(_oracle(pasted, 'test'), FACTS, folder.parent, ['DH'], tmp_path / 'x',
                       progress=False)
    with pytest.raises(ConfigError, match='drop --labels'):
        run_evaluation(_oracle(pasted, 'test'), FACTS, pasted, ['DH'], tmp_path / 'y',
                       progress=False, labels='binary')
