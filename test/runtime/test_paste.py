"""`anomaly-seg synth paste` (training/synth/paste.py): anomalies pasted into real CamVid frames.

Torch-free: runs in the runtime environment too. The frames are the committed demo sample.
"""

from pathlib import Path

import cv2
import numpy as np
import pytest

from anomaly_seg_node.bag_reader import open_bag
from anomaly_seg_node.errors import DataError
from anomaly_seg_node.labels import CAMVID_ANOMALY_ID, CAMVID_CLASS_NAMES
from training.synth import command
from training.synth.bag import START_NS
from training.synth.paste import (
    frame_number,
    frame_rng,
    paste_anomalies,
    write_frames_bag,
    write_pasted,
)

SAMPLE = Path(__file__).resolve().parents[2] / 'samples' / 'camvid'
ROAD, PAVEMENT = CAMVID_CLASS_NAMES.index('road'), CAMVID_CLASS_NAMES.index('pavement')


def _read(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_objects_depend_on_seed_and_name_only(tmp_path: Path) -> None:
    four = write_pasted(SAMPLE, tmp_path / 'a', limit=4, progress=False)
    two = write_pasted(SAMPLE, tmp_path / 'b', limit=2, progress=False)
    write_pasted(SAMPLE, tmp_path / 'c', limit=2, seed=1, progress=False)
    assert four['frames'] == 4 and two['frames'] == 2 and four['anomaly_id'] == 12
    for name in sorted(p.name for p in (tmp_path / 'b' / 'test').iterdir()):
        for kind in ('test', 'testannot'):
            assert np.array_equal(_read(tmp_path / 'a' / kind / name),
                                  _read(tmp_path / 'b' / kind / name))
        assert not np.array_equal(_read(tmp_path / 'b' / 'testannot' / name),
                                  _read(tmp_path / 'c' / 'testannot' / name))
    assert (tmp_path / 'a' / 'paste.json').is_file()
    assert 0 < four['anomaly_pixel_share'] < 0.2 and four['objects'] >= 4


def test_objects_stand_on_the_ground_and_only_change_their_pixels() -> None:
    image = np.full((120, 160, 3), 90, np.uint8)
    label = np.zeros((120, 160), np.uint8)  # sky ...
    label[60:, :] = ROAD  # ... over a road
    out, ids, placed = paste_anomalies(image, label, np.random.default_rng(4), 3)
    assert placed == 3
    anomaly = ids == CAMVID_ANOMALY_ID
    rows = np.nonzero(anomaly.any(axis=1))[0]
    assert anomaly.sum() > 0 and rows.max() >= 60 + 0.08 * 120  # the base is on the road
    assert np.array_equal(ids[~anomaly], label[~anomaly])  # other labels untouched
    # the sky away from the objects keeps its values (shadows fall on the ground only)
    near = cv2.dilate(anomaly.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    sky = (label == 0) & ~near
    assert sky.any() and np.array_equal(out[sky], image[sky])
    assert not np.array_equal(out[label == ROAD], image[label == ROAD])


def test_no_ground_no_object() -> None:
    image = np.zeros((60, 80, 3), np.uint8)
    label = np.full((60, 80), CAMVID_CLASS_NAMES.index('building'), np.uint8)
    out, ids, placed = paste_anomalies(image, label, np.random.default_rng(0), 2)
    assert placed == 0 and np.array_equal(out, image) and np.array_equal(ids, label)


def test_frame_numbers_stamp_the_bag(tmp_path: Path) -> None:
    assert frame_number('Seq05VD_f01950.png') == 1950
    assert frame_number('0001TP_008550') == 8550 and frame_number('frame') is None
    assert frame_rng(0, 'a.png').random() == frame_rng(0, 'a.jpg').random()  # by stem
    rgb = np.zeros((24, 32, 3), np.uint8)
    ids = np.full((24, 32), ROAD, np.uint8)
    manifest = write_frames_bag(tmp_path / 'bag', [('x_f00000.png', rgb, ids),
                                                   ('x_f00060.png', rgb, ids)])
    assert manifest['mean_period_s'] == 2.0  # 60 video frames at 30 Hz
    bag = open_bag(tmp_path / 'bag')
    try:
        stamps = sorted({ns for _, ns, _ in bag.messages()})
    finally:
        bag.close()
    assert stamps == [START_NS, START_NS + 2 * 10 ** 9]
    with pytest.raises(DataError, match='at least one frame'):
        write_frames_bag(tmp_path / 'empty', [])


def test_command_writes_folder_and_bag(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(['paste', '--camvid', str(SAMPLE), '--out', str(tmp_path / 'p'),
                              '--limit', '3', '--bag', str(tmp_path / 'bag')])
    report = command.run(args)
    assert report['bag']['frames'] == 3 and report['bag']['labels'] == 'camvid'
    assert sorted(p.name for p in (tmp_path / 'p').iterdir()) == ['paste.json', 'test',
                                                                   'testannot']
    with pytest.raises(DataError, match='not empty'):
        command.run(args)
    with pytest.raises(DataError, match='is not a folder'):
        write_pasted(tmp_path / 'nothing', tmp_path / 'q', progress=False)
