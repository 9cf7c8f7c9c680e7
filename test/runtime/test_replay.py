"""Bag replay without torch: a fake segmenter on synthetic bags (mcap, sqlite3, ROS 1).

Known answers: metrics equal a direct computation over the same frames, labels match by header
stamp, a cut bag keeps what precedes the cut, the live mode's drops and latencies on a
simulated clock equal hand-worked schedules.
"""

import hashlib
import json
from pathlib import Path
import shutil
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from anomaly_seg_node import backends, replay_command
from anomaly_seg_node.artifact import FileRef, InputSpec, ScoreSpec, Sidecar, write_sidecar
from anomaly_seg_node.bag_reader import Topic, choose_topics, open_bag
from anomaly_seg_node.errors import BagError
from anomaly_seg_node.image_codec import decode_image
from anomaly_seg_node.labels import (
    IGNORE_ID,
    RAW_ANOMALY_ID,
    RAW_CLASS_NAMES,
    class_names,
    palette,
    raw_to_train_lut,
)
from anomaly_seg_node.metrics import (
    BinnedPerImageOOD,
    ConfusionMatrix,
    OpenSetConfusion,
    PooledOOD,
    ood_metrics,
)
from anomaly_seg_node.pipeline import FramePipeline
from anomaly_seg_node.replay import (
    LabelSpec,
    LatencyStats,
    LiveSchedule,
    Replay,
    StampMatcher,
)
from anomaly_seg_tools import cli
from training.synth.bag import write_bag

CLASSES = class_names()
PALETTE = palette()
SIZE = (64, 96)  # camera frames (H, W)
FRAMES = 8
PERIOD_NS = 33_333_333  # write_bag at 30 Hz


class FakeSegmenter:
    """Labels and scores are fixed functions of the pixels; each call costs `cost` s on `clock`."""

    input_size = (32, 48)

    def __init__(self, clock=None, cost: float = 0.0) -> None:
        self.clock, self.cost, self.calls = clock, cost, 0

    def __call__(self, frames):
        self.calls += 1
        if self.clock is not None:
            self.clock.now += self.cost
        pixels = frames.astype(np.int32)
        labels = (pixels[..., 0] // 22 + pixels[..., 2] // 64) % len(CLASSES)
        score = pixels.mean(axis=-1).astype(np.float32) / 255.0 - 0.001 * pixels[..., 1]
        return SimpleNamespace(labels=labels[None].astype(np.int32), anomaly_score=score[None])


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_pipeline(segmenter=None) -> FramePipeline:
    return FramePipeline(segmenter or FakeSegmenter(), CLASSES, PALETTE, threshold=0.4)


def street_labels() -> LabelSpec:
    return LabelSpec.from_names(RAW_CLASS_NAMES, [RAW_ANOMALY_ID], CLASSES, 'StreetHazards')


@pytest.fixture(scope='module')
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp('bags')
    out = {}
    for storage in ('mcap', 'sqlite3'):
        out[storage] = root / storage
        manifest = write_bag(out[storage], FRAMES, size=SIZE, storage=storage, compressed=True,
                             seed=1, rate_hz=30.0, progress=False)
        assert manifest['frames_with_anomaly'] == FRAMES  # every frame has anomaly pixels
    return out


def test_label_lut_by_name_equals_the_training_mapping():
    spec = street_labels()
    np.testing.assert_array_equal(spec.lut, raw_to_train_lut('densehybrid12'))
    assert spec.anomaly_ids == (RAW_ANOMALY_ID,)
    raw = np.array([[14, 4, 8, 0]], dtype=np.uint8)  # anomaly, "other", road, unknown
    closed, anomaly, open_set = spec.targets(raw, len(CLASSES))
    assert closed.tolist() == [[IGNORE_ID, IGNORE_ID, CLASSES.index('road'), IGNORE_ID]]
    assert anomaly.tolist() == [[1, IGNORE_ID, 0, IGNORE_ID]]
    assert open_set.tolist() == [[len(CLASSES), IGNORE_ID, CLASSES.index('road'), IGNORE_ID]]


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
@pytest.mark.parametrize('topic, kind', [(None, 'raw'),
                                         ('/camera/image_raw/compressed', 'compressed')])
def test_both_storages_raw_and_compressed(bags, storage, topic, kind):
    records = []
    report = Replay(bags[storage], make_pipeline(), image_topic=topic, labels=street_labels(),
                    on_frame=records.append).run()
    assert report['complete'] and report['error'] is None
    assert report['bag']['image_topic'] == (topic or '/camera/image_raw')
    assert report['bag']['image_kind'] == kind
    assert report['bag']['label_topic'] == '/camera/labels'
    assert report['bag']['kind'] == f'rosbag2 ({storage})'
    frames = report['frames']
    assert (frames['read'], frames['processed'], frames['with_labels']) == (FRAMES,) * 3
    assert frames['dropped'] == frames['rejected'] == frames['unmatched_labels'] == 0
    assert [r['index'] for r in records] == list(range(FRAMES))
    assert report['bag']['image_rate_hz'] == pytest.approx(30.0, rel=1e-6)
    for stage in ('decode', 'resize', 'infer', 'process'):
        assert report['latency_ms'][stage]['count'] == FRAMES
    assert report['metrics']['pooled']['n_images'] == FRAMES


def _direct(bag: Path, pipeline: FramePipeline):
    """Frames, outputs and targets computed here, without the replay."""
    from rosbags.highlevel import AnyReader

    lut = raw_to_train_lut('densehybrid12')
    images, labels = {}, {}
    with AnyReader([bag]) as reader:
        for conn, _, raw in reader.messages():
            if conn.topic in ('/camera/image_raw', '/camera/labels'):
                msg = reader.deserialize(raw, conn.msgtype)
                stamp = msg.header.stamp.sec * 10 ** 9 + msg.header.stamp.nanosec
                target = images if conn.topic == '/camera/image_raw' else labels
                target[stamp] = decode_image(msg, 'rgb8' if target is images else 'native')
    out = []
    for stamp in sorted(images):
        result = pipeline.process(images[stamp])
        raw = labels[stamp]
        anomaly = np.where(raw == RAW_ANOMALY_ID, 1, np.where(lut[raw] != IGNORE_ID, 0, 255))
        out.append((result, lut[raw], anomaly.astype(np.uint8), raw))
    return out


def test_metrics_equal_a_direct_computation(bags):
    pipeline = make_pipeline()
    records = []
    report = Replay(bags['mcap'], pipeline, labels=street_labels(),
                    on_frame=records.append).run()
    direct = _direct(bags['mcap'], pipeline)
    k = len(CLASSES)
    per_frame = [ood_metrics(res.anomaly_score, anomaly) for res, _, anomaly, _ in direct]
    # the replay's per-image figures: each frame's curve in the pooled binning, within the
    # bound of the exact ones
    binned = BinnedPerImageOOD()
    for record, expected, (res, _, anomaly, _) in zip(records, per_frame, direct, strict=True):
        frame = binned.update(res.anomaly_score, anomaly)
        for key in ('ap', 'auroc', 'fpr95'):
            assert record[key] == frame[key]
            assert abs(record[key] - expected[key]) <= frame[f'{key}_bound'] + 1e-12
        assert record['n_anomaly_pixels'] == expected['n_anomaly']
    metrics = report['metrics']
    assert metrics['per_image'] == binned.compute()
    for key in ('ap', 'auroc', 'fpr95'):
        assert abs(metrics['per_image'][key] - np.mean([m[key] for m in per_frame])) <= \
            metrics['per_image'][f'{key}_bound'] + 1e-12
    # pooled: the replay's streaming histogram against the exact curve over all pixels
    exact = ood_metrics(np.stack([r.anomaly_score for r, _, _, _ in direct]),
                        np.stack([a for _, _, a, _ in direct]))
    binned = PooledOOD()
    closed, open_set = ConfusionMatrix(k), OpenSetConfusion(k, 0.4)
    for res, train, anomaly, _ in direct:
        binned.update(res.anomaly_score, anomaly)
        closed.update(res.semantic_mask, train)
        open_set.update(res.semantic_mask, res.anomaly_score,
                        np.where(anomaly == 1, k, train).astype(np.uint8))
    assert metrics['pooled']['ap'] == pytest.approx(binned.compute()['ap'], abs=1e-12)
    for key in ('ap', 'auroc', 'fpr95'):
        assert abs(metrics['pooled'][key] - exact[key]) <= metrics['pooled'][f'{key}_bound']
    assert metrics['pooled']['n_anomaly'] == exact['n_anomaly']
    assert metrics['closed']['miou'] == pytest.approx(closed.compute()['miou'], abs=1e-12)
    assert metrics['open_set']['open_miou'] == pytest.approx(
        open_set.compute()['open_miou'], abs=1e-12)
    assert metrics['threshold'] == 0.4
    anomaly = np.stack([a for _, _, a, _ in direct])
    assert metrics['anomaly_pixel_share'] == pytest.approx(
        np.count_nonzero(anomaly == 1) / np.count_nonzero(anomaly <= 1), abs=1e-12)
    curve = metrics['pooled']['curve']
    expected = binned.curve_points(400)
    for key in ('tpr', 'fpr', 'precision'):
        np.testing.assert_allclose(curve[key], expected[key], atol=1e-6)
    assert curve['tpr'][-1] == curve['fpr'][-1] == 1.0


def _write_custom_bag(path: Path, stamps_images, labels, storage='mcap', size=(8, 10),
                      extra_topics=()):
    """A rosbag2 with rgb8 images of value 10 * i and mono8 labels given as (bag_ns, stamp,
    array); stamps in ns."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    types = ts.types
    image_cls = types['sensor_msgs/msg/Image']

    def header(stamp):
        return types['std_msgs/msg/Header'](
            stamp=types['builtin_interfaces/msg/Time'](sec=stamp // 10 ** 9,
                                                       nanosec=stamp % 10 ** 9),
            frame_id='cam')

    def image(stamp, array, encoding):
        channels = 1 if array.ndim == 2 else array.shape[2]
        return image_cls(header=header(stamp), height=array.shape[0], width=array.shape[1],
                         encoding=encoding, is_bigendian=0, step=array.shape[1] * channels,
                         data=np.ascontiguousarray(array).reshape(-1))

    plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
    messages = []
    for i, stamp in enumerate(stamps_images):
        rgb = np.full((*size, 3), 10 * i, dtype=np.uint8)
        rgb[0, 0] = (200, 10, 10)
        messages.append((stamp, '/cam/image_raw', image(stamp, rgb, 'rgb8')))
    for bag_ns, stamp, array in labels:
        messages.append((bag_ns, '/cam/labels', image(stamp, array, 'mono8')))
    with Writer(path, version=8, storage_plugin=plugin) as writer:
        conns = {topic: writer.add_connection(topic, image_cls.__msgtype__, typestore=ts)
                 for topic in ('/cam/image_raw', '/cam/labels', *extra_topics)}
        for bag_ns, topic, msg in sorted(messages, key=lambda m: m[0]):
            writer.write(conns[topic], bag_ns, ts.serialize_cdr(msg, msg.__msgtype__))


def _label(i, size=(8, 10)):
    """Road everywhere and exactly i + 1 anomaly pixels: the frame index is in the label."""
    array = np.full(size, 8, dtype=np.uint8)
    array.reshape(-1)[:i + 1] = RAW_ANOMALY_ID
    return array


def test_labels_match_images_by_header_stamp(tmp_path):
    stamps = [10 ** 9 + i * 50_000_000 for i in range(6)]
    # (bag time, header stamp, label): frames 0, 1, 2 and 4 get theirs two frames late,
    # frame 5 long before its image, frame 3 none; one label matches no image at all.
    labels = [(stamps[min(i + 2, 5)] + 1, stamps[i], _label(i)) for i in (0, 1, 2, 4)]
    labels += [(stamps[0] - 5, stamps[5], _label(5)), (stamps[5] + 2, 123, _label(0))]
    _write_custom_bag(tmp_path / 'b', stamps, labels)
    records = []
    report = Replay(tmp_path / 'b', make_pipeline(), labels=street_labels(),
                    on_frame=records.append).run()
    assert [r['index'] for r in records] == list(range(6))
    assert [r.get('n_anomaly_pixels') for r in records] == [1, 2, 3, None, 5, 6]
    frames = report['frames']
    assert (frames['with_labels'], frames['without_labels']) == (5, 1)
    assert frames['unmatched_labels'] == 1


def test_stamp_matcher_releases_images_without_labels():
    matcher = StampMatcher(max_waiting=2, window_ns=100)
    frames = [SimpleNamespace(stamp_ns=i, bag_ns=i, label=None) for i in range(4)]
    assert matcher.add_image(frames[0]) == []
    assert matcher.add_image(frames[1]) == []
    assert matcher.add_image(frames[2]) == [frames[0]]  # a third waiting image pushes one out
    assert matcher.add_label(1, 3, 'label 1') == [frames[1]]
    assert frames[1].label == 'label 1'
    assert matcher.add_label(99, 500, 'late') == [frames[2]]  # the bag moved past the window
    assert matcher.flush() == [] and matcher.unmatched_labels == 1


def test_labels_of_another_size_stop_with_partial_results(tmp_path):
    stamps = [10 ** 9 + i * 50_000_000 for i in range(4)]
    labels = [(s, s, _label(i) if i != 2 else _label(i, (8, 9))) for i, s in enumerate(stamps)]
    _write_custom_bag(tmp_path / 'b', stamps, labels)
    replay = Replay(tmp_path / 'b', make_pipeline(), labels=street_labels())
    with pytest.raises(BagError, match=r'is 8x9 but its image on /cam/image_raw is 8x10'):
        replay.run()
    report = replay.report()
    assert not report['complete'] and 'resolution' in report['error']
    assert report['frames']['with_labels'] == 2
    assert report['metrics']['frames'] == 2


def test_missing_topics_are_listed(bags, tmp_path):
    with pytest.raises(BagError, match=r'/camera/nope is not in the bag.*/camera/camera_info '
                                       r'\(sensor_msgs/msg/CameraInfo\)'):
        Replay(bags['mcap'], make_pipeline(), image_topic='/camera/nope').run()
    with pytest.raises(BagError, match='label topic /camera/camera_info has type'):
        Replay(bags['mcap'], make_pipeline(), label_topic='/camera/camera_info').run()
    _write_custom_bag(tmp_path / 'labels_only', [], [(5, 5, _label(0))])
    with pytest.raises(BagError, match='image topic /cam/image_raw .* holds no message'):
        Replay(tmp_path / 'labels_only', make_pipeline()).run()
    with pytest.raises(BagError, match=r'no camera topic .* it has: /cam/labels \(sensor_msgs/'
                                       r'msg/Image\), /cam/camera_info \(sensor_msgs/msg/Camera'):
        choose_topics([Topic(1, '/cam/labels', 'sensor_msgs/msg/Image', 1),
                       Topic(2, '/cam/camera_info', 'sensor_msgs/msg/CameraInfo', 1)])
    with pytest.raises(BagError, match='does not exist'):
        Replay(tmp_path / 'absent', make_pipeline()).run()


def test_topic_choice_prefers_raw_camera_and_skips_node_outputs():
    topics = [Topic(1, '/anomaly_seg/overlay', 'sensor_msgs/msg/Image', 3),
              Topic(2, '/cam/image_raw/compressed', 'sensor_msgs/msg/CompressedImage', 3),
              Topic(3, '/cam/image_raw', 'sensor_msgs/msg/Image', 3),
              Topic(4, '/cam/gt_labels', 'sensor_msgs/msg/Image', 3)]
    chosen = choose_topics(topics)
    assert (chosen.image.topic, chosen.image_kind, chosen.label.topic) == (
        '/cam/image_raw', 'raw', '/cam/gt_labels')
    assert choose_topics(topics[:2]).image.topic == '/cam/image_raw/compressed'


def test_ros1_bag(tmp_path):
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS1_NOETIC)
    types = ts.types
    path = tmp_path / 'drive.bag'
    with Writer(path) as writer:
        conns = {t: writer.add_connection(t, 'sensor_msgs/msg/Image', typestore=ts)
                 for t in ('/cam/image_raw', '/cam/labels')}
        for i in range(3):
            stamp = 10 ** 9 + i * 10 ** 8
            header = types['std_msgs/msg/Header'](
                seq=i, stamp=types['builtin_interfaces/msg/Time'](sec=stamp // 10 ** 9,
                                                                  nanosec=stamp % 10 ** 9),
                frame_id='cam')
            for topic, array, enc in (('/cam/image_raw', np.full((8, 10, 3), 40 * i, np.uint8),
                                       'rgb8'), ('/cam/labels', _label(i), 'mono8')):
                channels = 1 if array.ndim == 2 else 3
                msg = types['sensor_msgs/msg/Image'](
                    header=header, height=8, width=10, encoding=enc, is_bigendian=0,
                    step=10 * channels, data=array.reshape(-1))
                writer.write(conns[topic], stamp, ts.serialize_ros1(msg, msg.__msgtype__))
    records = []
    report = Replay(path, make_pipeline(), labels=street_labels(),
                    on_frame=records.append).run()
    assert report['bag']['kind'] == 'ROS 1 bag'
    assert report['frames']['with_labels'] == 3
    assert [r['n_anomaly_pixels'] for r in records] == [1, 2, 3]


def _cut(bag: Path, dst: Path, fraction: float) -> Path:
    shutil.copytree(bag, dst)
    (data,) = [p for p in dst.iterdir() if p.suffix in ('.mcap', '.db3')]
    blob = data.read_bytes()
    data.write_bytes(blob[:int(len(blob) * fraction)])
    return dst


def test_cut_mcap_keeps_the_frames_before_the_cut(tmp_path):
    # frames big enough for several 1 MiB chunks, so the cut leaves whole chunks before it
    bag = tmp_path / 'big'
    write_bag(bag, 12, size=(160, 240), seed=1, rate_hz=30.0, progress=False)
    cut = _cut(bag, tmp_path / 'cut', 0.6)
    records = []
    replay = Replay(cut, make_pipeline(), labels=street_labels(), on_frame=records.append)
    with pytest.raises(BagError, match=r'truncated or corrupt.*read \d+ messages and \d+ image'):
        replay.run()
    report = replay.report()
    assert not report['complete'] and 'mcap without index' in report['bag']['kind']
    processed = report['frames']['processed']
    assert 4 <= processed < 12 and len(records) == processed
    assert report['metrics']['frames'] == report['frames']['with_labels'] >= processed - 1
    # what was kept equals the same frames of the intact bag
    full = []
    Replay(bag, make_pipeline(), labels=street_labels(), max_frames=processed,
           on_frame=full.append).run()
    compared = [(got['ap'], ref['ap']) for got, ref in zip(records, full, strict=True)
                if 'ap' in got]
    assert len(compared) >= processed - 1 and all(a == b for a, b in compared)


def test_live_schedule_on_a_hand_worked_example():
    done, dropped = [], []
    schedule = LiveSchedule(run=lambda item: 100_000_000,
                            on_done=lambda item, a, s, f: done.append((item, a, s, f)),
                            on_drop=dropped.append)
    period = 33_333_334  # frame 3 arrives just after frame 0 is done (100.000002 ms)
    for i in range(10):
        schedule.arrive(i * period, i)
    schedule.finish()
    # 0 runs at once; 1 waits, 2 replaces it and starts when 0 ends at 100 ms; 3 waits, 4 and
    # 5 replace it, 5 starts at 200 ms; ...; 9 is still waiting at the end and runs last
    assert [d[0] for d in done] == [0, 2, 5, 8, 9]
    assert dropped == [1, 3, 4, 6, 7]
    assert [d[2] for d in done] == [0, 100_000_000, 200_000_000, 300_000_000, 400_000_000]
    latency = [f - a for _, a, _, f in done]
    assert latency == [100_000_000, 133_333_332, 133_333_330, 133_333_328, 199_999_994]
    assert (schedule.arrived, schedule.processed, schedule.dropped) == (10, 5, 5)


def test_live_schedule_frame_arriving_as_the_worker_frees_waits_its_turn():
    done = []
    schedule = LiveSchedule(lambda item: 100, lambda *args: done.append(args), lambda i: None)
    for t, item in ((0, 'a'), (50, 'b'), (100, 'c')):
        schedule.arrive(t, item)
    schedule.finish()
    # at t=100 the worker frees and takes b (waiting since 50) before c arrives into the slot
    assert [(item, s, f) for item, _, s, f in done] == [('a', 0, 100), ('b', 100, 200),
                                                        ('c', 200, 300)]


def test_live_schedule_without_pressure_drops_nothing():
    done = []
    schedule = LiveSchedule(lambda item: 10, lambda *args: done.append(args), lambda i: None)
    for i in range(5):
        schedule.arrive(100 * i, i)
    schedule.finish()
    assert [(a, s, f) for _, a, s, f in done] == [(100 * i, 100 * i, 100 * i + 10)
                                                  for i in range(5)]
    with pytest.raises(ValueError, match='back in time'):
        schedule.arrive(0, 'late')


@pytest.mark.parametrize('rate, expected', [
    # 30 Hz bag (frame i at i * 33.333333 ms), 100 ms per frame (the segmenter's cost; decoding
    # is free on the fake clock). 0 runs at once; 3 (at 99.999999 ms) is the newest when 0
    # ends, 6 (at 199.999998 ms) when 3 ends; 7 waits in the slot and runs after 6.
    (1.0, {'processed': [0, 3, 6, 7],
           'e2e_ms': [100.0, 100.000001, 100.000002, 166.666669]}),
    # at 2x frame i arrives at i * 16.67 ms: 6 (at 99.999999 ms) is the newest when 0 ends
    (2.0, {'processed': [0, 6, 7], 'e2e_ms': [100.0, 100.000001, 183.333334]}),
])
def test_rate_mode_on_a_simulated_clock(bags, rate, expected):
    clock = FakeClock()
    records = []
    replay = Replay(bags['mcap'], make_pipeline(FakeSegmenter(clock, cost=0.1)),
                    labels=street_labels(), rate=rate, on_frame=records.append, timer=clock)
    report = replay.run()
    processed = [r['index'] for r in records if r['status'] == 'processed']
    assert processed == expected['processed']
    assert [r['index'] for r in records if r['status'] == 'dropped'] == [
        i for i in range(FRAMES) if i not in processed]
    e2e = [r['end_to_end_ms'] for r in records if r['status'] == 'processed']
    assert e2e == pytest.approx(expected['e2e_ms'], abs=1e-6)
    live = report['live']
    assert live['dropped'] == report['frames']['dropped'] == FRAMES - len(processed)
    assert live['drop_ratio'] == pytest.approx((FRAMES - len(processed)) / FRAMES)
    # one frame per 100 ms out of 30 * rate frames per second
    assert live['predicted_drop_ratio'] == pytest.approx(1 - 1 / (3.0 * rate), rel=1e-6)
    assert report['latency_ms']['process']['mean'] == pytest.approx(100.0)
    assert report['latency_ms']['end_to_end']['max'] == pytest.approx(max(expected['e2e_ms']))
    assert report['metrics']['frames'] == len(processed)


def test_latency_stats_percentiles_within_the_bin_width():
    stats = LatencyStats()
    for ms in range(1, 101):
        stats.add(float(ms))
    summary = stats.summary()
    assert (summary['count'], summary['mean'], summary['min'], summary['max']) == (
        100, 50.5, 1.0, 100.0)
    for q, exact in ((50, 50.0), (90, 90.0), (99, 99.0)):
        assert exact <= summary[f'p{q}'] <= exact * 1.0117
    with pytest.raises(ValueError):
        stats.add(float('nan'))


# --- the command, with the fake segmenter behind backends.load ---------------------------------

ONNX, PT2 = b'fake onnx', b'fake pt2'


@pytest.fixture
def command_env(tmp_path, monkeypatch):
    (tmp_path / 'm.onnx').write_bytes(ONNX)
    (tmp_path / 'm.pt2').write_bytes(PT2)
    sidecar = Sidecar(
        method='fake', score=ScoreSpec(name='DH', units='nats'),
        input=InputSpec(height=32, width=48), classes=tuple(CLASSES),
        palette=tuple(PALETTE), files={
            'onnx': FileRef('m.onnx', hashlib.sha256(ONNX).hexdigest()),
            'pt2': FileRef('m.pt2', hashlib.sha256(PT2).hexdigest())},
        thresholds={'tpr95': 0.4}, default_threshold='tpr95')
    path = write_sidecar(sidecar, tmp_path / 'm.json')

    def fake_load(sidecar, backend='auto', device='cpu', precision='fp32', *args):
        segmenter = FakeSegmenter()
        segmenter.backend, segmenter.device, segmenter.precision = 'fake', device, precision
        return segmenter

    monkeypatch.setattr(backends, 'load', fake_load)
    # cli.COMMANDS gets the replay entry from the lead; only this subcommand is needed here
    monkeypatch.setattr(cli, 'COMMANDS', {'replay': ('anomaly_seg_node.replay_command',
                                                     'replay a rosbag')})
    return path


def test_command_writes_metrics_video_and_bag(bags, command_env, tmp_path, capsys):
    out = tmp_path / 'out'
    code = cli.main(['--json', 'replay', '--bag', str(bags['sqlite3']), '--artifact',
                     str(command_env), '--out', str(out), '--video', '--write-bag',
                     '--contact-sheet', '--no-progress'])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed['frames']['processed'] == FRAMES
    assert 0 < printed['metrics']['anomaly_pixel_share'] < 1
    sheet = cv2.imread(str(out / 'contact_sheet.png'))
    picked = json.loads((out / 'metrics.json').read_text())['outputs']['contact_sheet']['frames']
    assert picked == [0, 1, 3, 4, 6, 7]  # 6 rows of 8 frames, evenly spaced
    tile_h = round(SIZE[0] * 320 / SIZE[1])
    assert sheet.shape == (24 + 6 * (tile_h + 4), 3 * 320 + 2 * 4, 3)
    report = json.loads((out / 'metrics.json').read_text())
    assert report['complete'] and report['artifact']['threshold'] == 0.4
    assert report['metrics']['per_image']['n_images'] == FRAMES
    assert '| per_image |' in (out / 'summary.md').read_text()
    assert len((out / 'frames.jsonl').read_text().splitlines()) == FRAMES
    video = cv2.VideoCapture(str(out / 'overlay.mp4'))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
    ok, first = video.read()
    assert ok and first.shape == (*SIZE, 3)
    assert report['outputs']['video']['fps'] == pytest.approx(30.0, rel=1e-6)
    # the output bag: inputs copied, outputs with the input's header, one per frame
    source = open_bag(out / 'output_bag')
    try:
        counts = {t.topic: t.count for t in source.topics}
        assert counts['/camera/image_raw'] == counts['/camera/labels'] == FRAMES
        for name in ('semantic_mask', 'anomaly_score', 'anomaly_mask', 'semantic_color',
                     'overlay'):
            assert counts[f'/anomaly_seg/{name}'] == FRAMES
        stamps = {'in': [], 'out': []}
        encodings = set()
        for topic, _, raw in source.messages():
            if topic.topic in ('/camera/image_raw', '/anomaly_seg/anomaly_score'):
                msg = source.deserialize(raw, topic.msgtype)
                key = 'in' if topic.topic == '/camera/image_raw' else 'out'
                stamps[key].append((msg.header.stamp.sec, msg.header.stamp.nanosec,
                                    msg.header.frame_id))
                encodings.add(msg.encoding)
                if key == 'out':
                    assert (msg.height, msg.width) == SIZE
    finally:
        source.close()
    assert stamps['in'] == stamps['out'] and encodings == {'rgb8', '32FC1'}


@pytest.mark.parametrize('storage, message', [
    ('mcap', 'breaks at byte'),  # read record by record up to the cut
    ('sqlite3', 'cannot open bag'),  # SQLite refuses a cut database outright
])
def test_command_on_a_cut_bag_writes_partial_results_then_fails(bags, command_env, tmp_path,
                                                                capsys, storage, message):
    cut = _cut(bags[storage], tmp_path / 'cut', 0.6)
    out = tmp_path / 'out'
    code = cli.main(['replay', '--bag', str(cut), '--artifact', str(command_env),
                     '--out', str(out), '--no-progress'])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and 'partial results written' in err
    report = json.loads((out / 'metrics.json').read_text())
    assert report['complete'] is False and message in report['error']
    assert 'Stopped early' in (out / 'summary.md').read_text()
    processed = report['frames']['processed']
    lines = (out / 'frames.jsonl').read_text().splitlines()
    assert len(lines) == processed
    if storage == 'mcap':
        assert 0 < processed < FRAMES
        assert report['metrics']['per_image']['n_images'] == report['frames']['with_labels']
    else:
        assert processed == 0


def test_command_threshold_and_label_options(bags, command_env, tmp_path):
    args = cli.build_parser().parse_args([
        'replay', '--bag', str(bags['mcap']), '--artifact', str(command_env), '--out',
        str(tmp_path / 'o'), '--threshold', '0.25', '--labels', 'train-ids', '--max-frames',
        '3', '--no-progress'])
    result = replay_command.run(args)
    report = json.loads((tmp_path / 'o' / 'metrics.json').read_text())
    assert result['frames']['processed'] == 3
    assert report['artifact']['threshold'] == 0.25
    assert report['metrics']['labels'] == 'train ids'


def test_contact_sheet_keeps_evenly_spaced_frames_in_bounded_memory(tmp_path):
    from anomaly_seg_node.pipeline import FrameResult
    from anomaly_seg_node.replay import Frame
    from anomaly_seg_node.replay_outputs import ContactSheetSink

    sink = ContactSheetSink(tmp_path / 'sheet.png', rows=4, tile_width=40)
    held = 0
    for i in range(1000):
        image = np.full((20, 40, 3), i % 256, np.uint8)
        target = np.zeros((20, 40), np.uint8)
        target[5:10, 5:10] = 1
        frame = Frame(index=i, bag_ns=i, stamp_ns=i, msg=None, image=image,
                      anomaly_target=target)
        score = np.linspace(0, 1, 800, dtype=np.float32).reshape(20, 40)
        sink.on_result(frame, FrameResult(anomaly_score=score, overlay=image))
        held = max(held, len(sink._kept))
    assert held < 2 * 4  # never more than 2 x rows frames held
    info = sink.close()
    frames = info['frames']
    assert len(frames) == 4 and frames[0] == 0
    steps = np.diff(frames)
    assert steps.min() >= 0.6 * steps.max() and frames[-1] >= 700  # spread over the drive
    sheet = cv2.imread(info['path'])
    assert sheet.shape == (24 + 4 * 24, 3 * 40 + 8, 3)
    # the labelled anomaly is outlined in white in the heat map column
    heat = cv2.cvtColor(sheet[24:44, 88:128], cv2.COLOR_BGR2RGB)
    assert (heat[5, 5:10] == 255).all()
    assert ContactSheetSink(tmp_path / 'none.png').close()['path'] is None
    assert not (tmp_path / 'none.png').exists()


# --- a 4:3 camera into a 16:9 artifact: letterboxed, outputs at the camera size ---------------

CAMERA_4_3 = (480, 640)


class WideSegmenter(FakeSegmenter):
    input_size = (36, 64)  # 16:9


class CaptureSink:
    """Keeps the shape of every output of every processed frame."""

    def __init__(self) -> None:
        self.shapes: list[dict[str, tuple[int, ...]]] = []

    def on_input(self, topic, bag_ns, raw, source) -> None:
        pass

    def on_result(self, frame, result) -> None:
        self.shapes.append({name: getattr(result, name).shape for name in
                            ('semantic_mask', 'anomaly_score', 'anomaly_mask')})


@pytest.fixture(scope='module')
def bag_4_3(tmp_path_factory):
    path = tmp_path_factory.mktemp('bag43') / 'drive'
    write_bag(path, 3, size=CAMERA_4_3, storage='mcap', seed=2, rate_hz=30.0, progress=False)
    return path


def test_replay_of_a_4_3_bag_keeps_the_camera_size_and_warns_once(bag_4_3):
    told = []
    segmenter = WideSegmenter()
    pipeline = FramePipeline(segmenter, CLASSES, PALETTE, threshold=0.4, on_warning=told.append)
    sink = CaptureSink()
    replay = Replay(bag_4_3, pipeline, labels=street_labels(), sinks=[sink])
    report = replay.run()
    assert report['frames']['processed'] == 3 and segmenter.calls == 4  # + one warm-up
    assert sink.shapes == [dict.fromkeys(('semantic_mask', 'anomaly_score', 'anomaly_mask'),
                                         CAMERA_4_3)] * 3
    # Labels at the camera size were scored against outputs at the camera size.
    assert report['metrics']['per_image']['n_images'] == 3
    assert len(report['warnings']) == 1 and told == report['warnings']
    assert '480x640' in told[0] and '36x64' in told[0] and 'letterboxed' in told[0]


def test_command_resize_mode_and_its_warning(bag_4_3, command_env, tmp_path, monkeypatch,
                                             capsys):
    monkeypatch.setattr(backends, 'load', lambda sidecar, *args: WideSegmenter())
    out = tmp_path / 'out'
    code = cli.main(['replay', '--bag', str(bag_4_3), '--artifact', str(command_env),
                     '--out', str(out), '--no-progress', '--resize-mode', 'crop_center'])
    assert code == 0
    err = capsys.readouterr().err
    assert err.count('warning: ') == 1 and 'cut to their centre' in err
    report = json.loads((out / 'metrics.json').read_text())
    assert report['artifact']['resize_mode'] == 'crop_center'
    assert len(report['warnings']) == 1 and 'crop_center' in report['warnings'][0]
    summary_md = (out / 'summary.md').read_text()
    assert summary_md.count('Warning: ') == 1 and '- resize mode: crop_center' in summary_md
    # The 2 x 60 rows cut from each of the 3 frames were never seen: left out of the metrics.
    assert report['metrics']['unseen_pixels'] == 3 * 120 * 640
    assert '230400 pixels the model never saw' in summary_md
    assert report['metrics']['per_image']['n_images'] == 3
