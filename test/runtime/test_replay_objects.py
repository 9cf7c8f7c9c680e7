"""Anomaly objects in the replay, without torch: frames.jsonl, component and box metrics, the
vision_msgs/msg/Detection2DArray of the output bag, boxes on the contact sheet.

A segmenter at the camera size reads its score from the red channel (score = R / 100) and its
labels from the blue one, so hand-drawn frames give masks and objects with known answers:

- frame 0: labelled anomaly A (6x6 = 36 px) predicted with one extra column on inlier pixels
  (42 px); a 12 px fragment one pixel right of it (merged into A's object with --objects-merge
  2); a 4 px blob (dropped below --objects-min-area 10); anomaly B (20 px) missed; a 12 px blob
  on ignored labels ("other"), predicted as sidewalk.
- frame 1: anomaly C (5x5) predicted exactly.

Mask (score > 0.5, 8-connected): sIoU A 36/42, B 0, C 1; PPV 36/42, 0, 0, 1; TP 2, FN 1, FP 2
at every tau, mean F1 4/7. Objects (A's object has 54 px, 36 on A): sIoU A 36/54, B 0, C 1;
PPV 2/3 and 1; F1 4/5 for tau <= 0.65, 2/5 for 0.70 and 0.75: mean 8/11. Boxes: A's object
(10x6) against A's box (6x6) has IoU 0.6: TP; C TP; B missed: recall 2/3, precision 1.
"""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from anomaly_seg_node import backends, replay_command
from anomaly_seg_node.artifact import FileRef, InputSpec, ScoreSpec, Sidecar, write_sidecar
from anomaly_seg_node.bag_reader import open_bag
from anomaly_seg_node.errors import ConfigError
from anomaly_seg_node.labels import RAW_ANOMALY_ID, RAW_CLASS_NAMES, class_names, palette
from anomaly_seg_node.metrics import BoxMetrics, ComponentMetrics
from anomaly_seg_node.objects import (
    AnomalyObject,
    ObjectParams,
    detection_array,
    find_objects_with_ids,
)
from anomaly_seg_node.pipeline import FramePipeline
from anomaly_seg_node.replay import LabelSpec, Replay
from anomaly_seg_node.replay_outputs import VISION_MSGS, register_vision_msgs
from anomaly_seg_tools import cli

CLASSES = class_names()
ROAD, SIDEWALK = CLASSES.index('road'), CLASSES.index('sidewalk')
SIZE = (40, 60)
STAMPS = [10 ** 9 + i * 100_000_000 for i in range(2)]
RAW_ROAD, RAW_OTHER = 8, 4  # StreetHazards raw ids
THRESHOLD = 0.5
# fpr1 at score 1, fpr0.1 at score 3: a peak score of 2 has FPR 10^-2.5
FPR_TABLE = {1.0: 0.01, 3.0: 0.001}
CONFIDENCE = 1.0 - 10 ** -2.5


class RedSegmenter:
    """Score = R / 100, label sidewalk where B > 100 else road; at the camera size."""

    input_size = SIZE

    def __call__(self, frames):
        pixels = frames.astype(np.int32)
        labels = np.where(pixels[..., 2] > 100, SIDEWALK, ROAD)
        score = (pixels[..., 0] / 100.0).astype(np.float32)
        return SimpleNamespace(labels=labels[None].astype(np.int32), anomaly_score=score[None])


def hand_frames():
    """[(rgb, raw labels)] of the module docstring."""
    frames = []
    rgb = np.zeros((*SIZE, 3), np.uint8)
    raw = np.full(SIZE, RAW_ROAD, np.uint8)
    raw[5:11, 5:11] = RAW_ANOMALY_ID  # A
    rgb[5:11, 5:12, 0] = 200  # A and one column beside it
    rgb[5:11, 13:15, 0] = 200  # fragment, a one-pixel gap to the right
    rgb[30:32, 5:7, 0] = 200  # small blob
    raw[25:29, 40:45] = RAW_ANOMALY_ID  # B, missed
    raw[35:40, 30:40] = RAW_OTHER  # ignored labels
    rgb[36:39, 32:36] = (200, 0, 200)  # predicted there, as sidewalk
    frames.append((rgb, raw))
    rgb = np.zeros((*SIZE, 3), np.uint8)
    raw = np.full(SIZE, RAW_ROAD, np.uint8)
    raw[10:15, 20:25] = RAW_ANOMALY_ID  # C
    rgb[10:15, 20:25, 0] = 200
    frames.append((rgb, raw))
    return frames


def write_hand_bag(path: Path, storage: str = 'mcap') -> None:
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    types = ts.types
    image_cls = types['sensor_msgs/msg/Image']

    def image(stamp, array, encoding):
        channels = 1 if array.ndim == 2 else array.shape[2]
        header = types['std_msgs/msg/Header'](
            stamp=types['builtin_interfaces/msg/Time'](sec=stamp // 10 ** 9,
                                                       nanosec=stamp % 10 ** 9),
            frame_id='cam')
        return image_cls(header=header, height=array.shape[0], width=array.shape[1],
                         encoding=encoding, is_bigendian=0, step=array.shape[1] * channels,
                         data=np.ascontiguousarray(array).reshape(-1))

    plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
    with Writer(path, version=8, storage_plugin=plugin) as writer:
        conns = {topic: writer.add_connection(topic, image_cls.__msgtype__, typestore=ts)
                 for topic in ('/cam/image_raw', '/cam/labels')}
        for stamp, (rgb, raw) in zip(STAMPS, hand_frames(), strict=True):
            for topic, msg in (('/cam/image_raw', image(stamp, rgb, 'rgb8')),
                               ('/cam/labels', image(stamp, raw, 'mono8'))):
                writer.write(conns[topic], stamp, ts.serialize_cdr(msg, msg.__msgtype__))


def street_labels() -> LabelSpec:
    return LabelSpec.from_names(RAW_CLASS_NAMES, [RAW_ANOMALY_ID], CLASSES, 'StreetHazards')


def pipeline() -> FramePipeline:
    return FramePipeline(RedSegmenter(), CLASSES, palette(), threshold=THRESHOLD)


@pytest.fixture(scope='module')
def hand_bag(tmp_path_factory):
    path = tmp_path_factory.mktemp('objects') / 'hand'
    write_hand_bag(path)
    return path


PARAMS = ObjectParams(threshold=THRESHOLD, merge_distance=2, min_area_px=10)


def test_objects_and_component_metrics_on_hand_made_frames(hand_bag):
    records = []
    report = Replay(hand_bag, pipeline(), labels=street_labels(), on_frame=records.append,
                    objects=PARAMS, fpr_table=FPR_TABLE).run()
    # frames.jsonl: the objects of each frame, largest first, in camera pixels
    boxes = [[(o['x'], o['y'], o['width'], o['height'], o['area']) for o in r['objects']]
             for r in records]
    assert boxes == [[(5, 5, 10, 6, 54), (32, 36, 4, 3, 12)], [(20, 10, 5, 5, 25)]]
    for record in records:
        for obj in record['objects']:
            assert obj['max_score'] == pytest.approx(2.0)
            assert obj['confidence'] == pytest.approx(CONFIDENCE)
    assert records[0]['components'] == {'n_gt': 2, 'n_mask': 3}  # the ignored blob is dropped
    assert records[0]['boxes'] == {'tp': 1, 'fp': 0, 'fn': 1}
    assert report['objects']['total'] == 3 and report['objects']['per_frame'] == 1.5
    assert report['objects']['params']['merge_distance'] == 2
    assert report['latency_ms']['objects']['count'] == 2

    components = report['metrics']['components']
    assert components['threshold'] == THRESHOLD and 'no size filters' in components['protocol']
    mask, objects, box = components['mask'], components['objects'], components['boxes']
    assert (mask['n_gt'], mask['n_pred']) == (3, 4)
    assert mask['siou'] == pytest.approx((36 / 42 + 0 + 1) / 3)
    assert mask['ppv'] == pytest.approx((36 / 42 + 0 + 0 + 1) / 4)
    assert mask['f1_mean'] == pytest.approx(4 / 7)
    assert (objects['n_gt'], objects['n_pred']) == (3, 2)
    assert objects['siou'] == pytest.approx((36 / 54 + 0 + 1) / 3)
    assert objects['ppv'] == pytest.approx((2 / 3 + 1) / 2)
    assert objects['f1_mean'] == pytest.approx(8 / 11)
    assert (box['tp'], box['fp'], box['fn'], box['n_pred_ignored']) == (2, 0, 1, 1)
    assert box['recall'] == pytest.approx(2 / 3) and box['precision'] == 1.0
    assert box['objects_per_frame'] == 1.5

    # the same figures computed here, straight from the pipeline's outputs
    direct = {'mask': ComponentMetrics(), 'objects': ComponentMetrics(), 'boxes': BoxMetrics()}
    check = pipeline()
    for (rgb, raw), record in zip(hand_frames(), records, strict=True):
        result = check.process(rgb)
        target = street_labels().targets(raw, len(CLASSES))[1]
        found, ids = find_objects_with_ids(result.anomaly_score, result.semantic_mask, PARAMS,
                                           FPR_TABLE)
        assert record['objects'] == [o.to_dict() for o in found]
        direct['mask'].update(result.anomaly_score > THRESHOLD, target)
        direct['objects'].update_instances(ids, target)
        direct['boxes'].update(found, target)
    for key, metric in direct.items():
        assert components[key] == metric.compute(), key


def test_object_threshold_and_drivable_ids_are_checked(hand_bag):
    with pytest.raises(ConfigError, match="differs from the pipeline's"):
        Replay(hand_bag, pipeline(), objects=ObjectParams(threshold=0.7))
    with pytest.raises(ConfigError, match='not all class ids'):
        Replay(hand_bag, pipeline(), objects=ObjectParams(threshold=THRESHOLD,
                                                          drivable_ids=(len(CLASSES),)))


def test_detection_array_boxes_in_input_pixels():
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_JAZZY)
    register_vision_msgs(ts)
    register_vision_msgs(ts)  # once is enough; twice is harmless
    types = ts.types
    header = types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=3, nanosec=4), frame_id='cam')
    obj = AnomalyObject(x=4, y=2, width=6, height=3, area=10, mean_score=1.0, max_score=2.0,
                        confidence=0.75, centroid_x=6.0, centroid_y=3.0)
    # outputs at half size
    msg = detection_array(types, header, [obj.box], [obj.confidence], scale_xy=(2.0, 4.0))
    raw = ts.serialize_cdr(msg, 'vision_msgs/msg/Detection2DArray')
    back = ts.deserialize_cdr(raw, 'vision_msgs/msg/Detection2DArray')
    (det,) = back.detections
    assert back.header.stamp.sec == 3 and det.header.frame_id == 'cam'
    # the box covers columns 4..9 and rows 2..4 of the map: [8, 20) x [8, 20) input pixels
    assert (det.bbox.center.position.x, det.bbox.center.position.y) == (14.0, 14.0)
    assert (det.bbox.size_x, det.bbox.size_y, det.bbox.center.theta) == (12.0, 12.0, 0.0)
    (hypothesis,) = det.results
    assert hypothesis.hypothesis.class_id == 'anomaly' and hypothesis.hypothesis.score == 0.75
    assert hypothesis.pose.pose.orientation.w == 1.0 and det.id == '0'
    assert set(VISION_MSGS) == {f'vision_msgs/msg/{name}' for name in (
        'Point2D', 'Pose2D', 'BoundingBox2D', 'ObjectHypothesis', 'ObjectHypothesisWithPose',
        'Detection2D', 'Detection2DArray')}


# --- the command, with the red segmenter behind backends.load ----------------------------------


@pytest.fixture
def artifact(tmp_path, monkeypatch):
    onnx = b'fake onnx'
    (tmp_path / 'm.onnx').write_bytes(onnx)
    sidecar = Sidecar(method='fake', score=ScoreSpec(name='DH', units='nats'),
                      input=InputSpec(height=SIZE[0], width=SIZE[1]), classes=tuple(CLASSES),
                      palette=tuple(palette()),
                      files={'onnx': FileRef('m.onnx', hashlib.sha256(onnx).hexdigest())},
                      thresholds={'tpr95': THRESHOLD, 'fpr1': 1.0, 'fpr0.1': 3.0},
                      default_threshold='tpr95')
    monkeypatch.setattr(backends, 'load', lambda sidecar, *args: RedSegmenter())
    monkeypatch.setattr(cli, 'COMMANDS', {'replay': ('anomaly_seg_node.replay_command',
                                                     'replay a rosbag')})
    return write_sidecar(sidecar, tmp_path / 'm.json')


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_command_reports_objects_and_writes_detections(artifact, tmp_path, capsys, storage):
    bag = tmp_path / 'bag'
    write_hand_bag(bag, storage)
    out = tmp_path / 'out'
    # drivable: road only, so the sidewalk blob on the ignored labels is no object
    code = cli.main(['--json', 'replay', '--bag', str(bag), '--artifact', str(artifact),
                     '--out', str(out), '--no-progress', '--write-bag', '--contact-sheet',
                     '--video', '--objects-drivable', 'road', '--objects-margin', '0',
                     '--objects-merge', '2', '--objects-min-area', '10'])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    headline = printed['metrics']
    assert headline['components.threshold'] == THRESHOLD
    assert headline['components.mask.f1_mean'] == pytest.approx(4 / 7)
    assert headline['components.objects.f1_mean'] == pytest.approx(8 / 11)
    assert headline['components.boxes.recall'] == pytest.approx(2 / 3)
    assert headline['components.boxes.precision'] == 1.0
    assert headline['components.boxes.objects_per_frame'] == 1.0
    assert printed['objects'] == {'per_frame': 1.0, 'max': 1, 'frames_with_objects': 2}

    report = json.loads((out / 'metrics.json').read_text())
    params = report['metrics']['components']['params']
    assert params['drivable_classes'] == ['road'] and params['drivable_ids'] == [ROAD]
    assert (params['drivable_margin'], params['min_area_px'], params['max_objects']) == \
        (0, 10, 32)
    assert params['fpr_table'] == [[1.0, 0.01], [3.0, 0.001]]
    assert report['artifact']['threshold_name'] == 'tpr95'
    lines = [json.loads(line) for line in (out / 'frames.jsonl').read_text().splitlines()]
    assert [[(o['x'], o['y'], o['width'], o['height']) for o in r['objects']] for r in lines] \
        == [[(5, 5, 10, 6)], [(20, 10, 5, 5)]]
    summary = (out / 'summary.md').read_text()
    assert '### Components at the threshold 0.5' in summary
    assert '| mask: score > threshold (SegmentMeIfYouCan) | 0.619 | 0.4643 | 0.5714 |' in summary
    assert 'recall 0.6667, precision 1 (2 matched, 0 false, 1 missed of 3 labelled)' in summary
    assert '- 2 objects in 2 frames: 1 per frame, at most 1; 2 frames with objects' in summary
    assert 'drivable classes: road (margin 0 px)' in summary

    # the output bag: one Detection2DArray per frame with the input image's header
    source = open_bag(out / 'output_bag')
    try:
        topics = {t.topic: t for t in source.topics}
        assert topics['/anomaly_seg/anomaly_objects'].msgtype == \
            'vision_msgs/msg/Detection2DArray'
        assert topics['/anomaly_seg/anomaly_objects'].count == 2
        detections = []
        for topic, _, raw in source.messages({topics['/anomaly_seg/anomaly_objects'].id}):
            detections.append(source.deserialize(raw, topic.msgtype))
    finally:
        source.close()
    for msg, stamp, (x, y, w, h) in zip(detections, STAMPS,
                                        [(5, 5, 10, 6), (20, 10, 5, 5)], strict=True):
        assert (msg.header.stamp.sec * 10 ** 9 + msg.header.stamp.nanosec,
                msg.header.frame_id) == (stamp, 'cam')
        (det,) = msg.detections
        assert det.header.stamp == msg.header.stamp
        assert (det.bbox.center.position.x, det.bbox.center.position.y) == (x + w / 2,
                                                                            y + h / 2)
        assert (det.bbox.size_x, det.bbox.size_y) == (w, h)
        (hypothesis,) = det.results
        assert hypothesis.hypothesis.class_id == 'anomaly'
        assert hypothesis.hypothesis.score == pytest.approx(CONFIDENCE)
    assert '/anomaly_seg/anomaly_objects' in report['outputs']['bag']['output_topics']

    # the contact sheet's overlay column shows the boxes in magenta, the overlay topic does not
    sheet = cv2.cvtColor(cv2.imread(str(out / 'contact_sheet.png')), cv2.COLOR_BGR2RGB)
    overlay_column = sheet[24:, 324:644]
    assert (overlay_column == (255, 0, 255)).all(axis=-1).any()
    assert not (sheet[24:, :320] == (255, 0, 255)).all(axis=-1).any()


def test_command_object_options_are_checked(artifact, tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(['replay', '--bag', str(tmp_path), '--artifact', str(artifact),
                              '--objects-drivable', 'road,runway'])
    with pytest.raises(ConfigError, match=r"names \['runway'\], which are not classes"):
        replay_command.run(args)
    args = parser.parse_args(['replay', '--bag', str(tmp_path), '--artifact', str(artifact),
                              '--objects-min-area', '0'])
    with pytest.raises(ConfigError, match='--objects-min-area must be >= 1'):
        replay_command.run(args)
    defaults = replay_command.object_params(parser.parse_args(
        ['replay', '--bag', 'b', '--artifact', 'a']), CLASSES, 0.5)
    assert (defaults.drivable_ids, defaults.drivable_margin, defaults.merge_distance,
            defaults.min_area_px, defaults.max_objects) == ((), 16, 4, 50, 32)
