"""`anomaly-seg replay` end to end: a tiny exported SwiftNet artifact on a synthetic bag.

Known answers: the outputs written to the output bag and the metrics equal what the same
backend and pipeline give on the same frames directly; the live mode accounts for every frame.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly_seg_node import backends
from anomaly_seg_node.artifact import read_sidecar, resolve_threshold
from anomaly_seg_node.bag_reader import open_bag
from anomaly_seg_node.image_codec import decode_image
from anomaly_seg_node.labels import IGNORE_ID, RAW_ANOMALY_ID, raw_to_train_lut
from anomaly_seg_node.metrics import BinnedPerImageOOD, ood_metrics
from anomaly_seg_node.pipeline import FramePipeline
from anomaly_seg_tools import cli
from training.export import DeployModel, export_artifact
from training.networks.swiftnet import SwiftNet
from training.synth.bag import write_bag

SIZE = (64, 96)
FRAMES = 5


@pytest.fixture(scope='module')
def artifact(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = DeployModel(SwiftNet(12, outlier_head=True), 'DH')
    sidecar = export_artifact(model, tmp_path_factory.mktemp('art') / 'swiftnet', size=SIZE,
                              check_images=1, thresholds={'tpr95': 0.0})
    return sidecar.source


@pytest.fixture(scope='module')
def bag(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp('bag') / 'drive'
    write_bag(path, FRAMES, size=SIZE, seed=1, rate_hz=30.0, compressed=True, progress=False)
    return path


@pytest.fixture
def replay_cli(monkeypatch):
    # The lead adds 'replay' to cli.COMMANDS; only that subcommand is needed here.
    monkeypatch.setattr(cli, 'COMMANDS', {'replay': ('anomaly_seg_node.replay_command',
                                                     'replay a rosbag')})


def _frames(path: Path) -> list[tuple[int, np.ndarray, np.ndarray]]:
    source = open_bag(path)
    images, labels = {}, {}
    try:
        for topic, _, raw in source.messages():
            if topic.topic in ('/camera/image_raw', '/camera/labels'):
                msg = source.deserialize(raw, topic.msgtype)
                stamp = msg.header.stamp.sec * 10 ** 9 + msg.header.stamp.nanosec
                if topic.topic == '/camera/image_raw':
                    images[stamp] = decode_image(msg, 'rgb8')
                else:
                    labels[stamp] = decode_image(msg, 'native')
    finally:
        source.close()
    return [(stamp, images[stamp], labels[stamp]) for stamp in sorted(images)]


def test_replay_cli_matches_the_direct_computation(artifact, bag, tmp_path, replay_cli,
                                                   capsys):
    out = tmp_path / 'out'
    code = cli.main(['--json', 'replay', '--bag', str(bag), '--artifact', str(artifact),
                     '--backend', 'onnxruntime', '--out', str(out), '--write-bag', '--video',
                     '--no-progress'])
    assert code == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert printed['frames']['processed'] == FRAMES
    report = json.loads((out / 'metrics.json').read_text())
    assert report['complete'] and report['artifact']['backend'] == 'onnxruntime'
    assert report['artifact']['threshold'] == 0.0
    assert report['artifact']['input_size'] == list(SIZE)

    # the same backend and pipeline, frame by frame
    sidecar = read_sidecar(artifact)
    pipeline = FramePipeline(backends.load(sidecar, 'onnxruntime', 'cpu'), sidecar.classes,
                             sidecar.palette, sidecar.void_id,
                             threshold=resolve_threshold(sidecar))
    lut = raw_to_train_lut('densehybrid12')
    expected, per_frame, binned = {}, [], BinnedPerImageOOD()
    for stamp, rgb, raw in _frames(bag):
        result = pipeline.process(rgb)
        expected[stamp] = result
        anomaly = np.where(raw == RAW_ANOMALY_ID, 1, np.where(lut[raw] != IGNORE_ID, 0, 255))
        per_frame.append(ood_metrics(result.anomaly_score, anomaly.astype(np.uint8)))
        binned.update(result.anomaly_score, anomaly.astype(np.uint8))
    # the replay's per-image AP: each frame binned as the pooled metric bins, within the
    # reported bound of the exact one
    per_image = report['metrics']['per_image']
    assert per_image['ap'] == pytest.approx(binned.compute()['ap'], abs=1e-12)
    assert abs(per_image['ap'] - np.mean([m['ap'] for m in per_frame])) <= \
        per_image['ap_bound'] + 1e-12
    records = [json.loads(line) for line in (out / 'frames.jsonl').read_text().splitlines()]
    assert [r['ap'] for r in records] == pytest.approx([m['ap'] for m in per_frame], abs=2e-3)

    source = open_bag(out / 'output_bag')
    seen = 0
    boxes = []
    try:
        for topic, _, raw in source.messages():
            name = topic.topic.rsplit('/', 1)[-1]
            if topic.topic == '/anomaly_seg/anomaly_objects':  # vision_msgs, not an image
                msg = source.deserialize(raw, topic.msgtype)
                boxes.append([(d.bbox.size_x, d.bbox.size_y) for d in msg.detections])
            elif topic.topic.startswith('/anomaly_seg/'):
                msg = source.deserialize(raw, topic.msgtype)
                stamp = msg.header.stamp.sec * 10 ** 9 + msg.header.stamp.nanosec
                np.testing.assert_array_equal(decode_image(msg, 'native'),
                                              getattr(expected[stamp], name))
                seen += 1
    finally:
        source.close()
    assert seen == 5 * FRAMES
    assert boxes == [[(o['width'], o['height']) for o in r['objects']] for r in records]
    assert report['outputs']['video']['frames'] == FRAMES
    assert (out / 'overlay.mp4').stat().st_size > 0


def test_replay_cli_live_mode_accounts_for_every_frame(artifact, bag, tmp_path, replay_cli,
                                                       capsys):
    out = tmp_path / 'live'
    code = cli.main(['replay', '--bag', str(bag), '--artifact', str(artifact), '--backend',
                     'onnxruntime', '--image-topic', '/camera/image_raw/compressed',
                     '--rate', '1.0', '--out', str(out), '--no-progress'])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / 'metrics.json').read_text())
    frames, live = report['frames'], report['live']
    assert report['bag']['image_kind'] == 'compressed'
    assert frames['processed'] + frames['dropped'] == frames['read'] == FRAMES
    assert live['arrived'] == FRAMES and 0.0 <= live['drop_ratio'] < 1.0
    records = [json.loads(line) for line in (out / 'frames.jsonl').read_text().splitlines()]
    assert sorted(r['index'] for r in records) == list(range(FRAMES))
    for record in records:
        if record['status'] == 'processed':
            # end-to-end = waiting in the slot + processing
            assert record['end_to_end_ms'] == pytest.approx(
                record['queue_ms'] + record['process_ms'], abs=1e-3)
    assert report['latency_ms']['end_to_end']['count'] == frames['processed']
    assert 'Live replay' in (out / 'summary.md').read_text()
