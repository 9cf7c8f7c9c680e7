"""Replay of labels in other conventions and of old bags, without torch.

Known answers: a bag of binary labels replayed as StreetHazards ids warns on stderr and names
`--labels binary`; replayed as binary it reports anomaly metrics and no class metrics. A bag as
ROS 2 Dashing wrote it (type names without /msg/, the first sqlite3 schema, version-1 metadata)
replays to the same figures as the bag it was made from.
"""

import hashlib
import json
from pathlib import Path
import sqlite3
from types import SimpleNamespace

import numpy as np
import pytest

from anomaly_seg_node import backends
from anomaly_seg_node.artifact import FileRef, InputSpec, ScoreSpec, Sidecar, write_sidecar
from anomaly_seg_node.bag_reader import choose_topics, open_bag, ros2_type_name
from anomaly_seg_node.labels import class_names, label_spec, palette
from anomaly_seg_node.pipeline import FramePipeline
from anomaly_seg_node.replay import Replay
from anomaly_seg_tools import cli
from training.synth.bag import write_bag

CLASSES = class_names()
FRAMES = 4


class FakeSegmenter:
    """Labels and scores are fixed functions of the pixels."""

    input_size = (32, 48)

    def __call__(self, frames):
        pixels = frames.astype(np.int32)
        labels = (pixels[..., 0] // 22 + pixels[..., 2] // 64) % len(CLASSES)
        score = pixels.mean(axis=-1).astype(np.float32) / 255.0 - 0.001 * pixels[..., 1]
        return SimpleNamespace(labels=labels[None].astype(np.int32), anomaly_score=score[None])


@pytest.fixture
def artifact(tmp_path, monkeypatch):
    onnx = b'fake onnx'
    (tmp_path / 'm.onnx').write_bytes(onnx)
    sidecar = Sidecar(method='fake', score=ScoreSpec(name='DH', units='nats'),
                      input=InputSpec(height=32, width=48), classes=tuple(CLASSES),
                      palette=tuple(palette()),
                      files={'onnx': FileRef('m.onnx', hashlib.sha256(onnx).hexdigest())},
                      thresholds={'tpr95': 0.4}, default_threshold='tpr95')
    monkeypatch.setattr(backends, 'load', lambda sidecar, *args: FakeSegmenter())
    monkeypatch.setattr(cli, 'COMMANDS', {'replay': ('anomaly_seg_node.replay_command',
                                                     'replay a rosbag')})
    return write_sidecar(sidecar, tmp_path / 'm.json')


def replay_args(bag: Path, artifact: Path, out: Path, *extra: str) -> list[str]:
    return ['replay', '--bag', str(bag), '--artifact', str(artifact), '--out', str(out),
            '--no-progress', *extra]


# --- labels of another convention --------------------------------------------------------------


def write_binary_bag(path: Path, frames: int = 3, size=(8, 12)) -> None:
    """rgb8 frames of grey 40 * i with one bright pixel; mono8 labels 0 normal, 1 on the bright
    pixel and 255 on the last row."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    image_cls, header_cls = ts.types['sensor_msgs/msg/Image'], ts.types['std_msgs/msg/Header']
    time_cls = ts.types['builtin_interfaces/msg/Time']

    def image(stamp, array, encoding):
        channels = 1 if array.ndim == 2 else array.shape[2]
        return image_cls(header=header_cls(stamp=time_cls(sec=1, nanosec=stamp), frame_id='c'),
                         height=array.shape[0], width=array.shape[1], encoding=encoding,
                         is_bigendian=0, step=array.shape[1] * channels,
                         data=np.ascontiguousarray(array).reshape(-1))

    with Writer(path, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        conns = {topic: writer.add_connection(topic, image_cls.__msgtype__, typestore=ts)
                 for topic in ('/cam/image_raw', '/cam/labels')}
        for i in range(frames):
            stamp = 10 ** 9 + i * 10 ** 8
            rgb = np.full((*size, 3), 40 * i, dtype=np.uint8)
            rgb[1, 2] = 250
            label = np.zeros(size, dtype=np.uint8)
            label[1, 2] = 1
            label[-1] = 255
            for topic, msg in (('/cam/image_raw', image(stamp, rgb, 'rgb8')),
                               ('/cam/labels', image(stamp, label, 'mono8'))):
                writer.write(conns[topic], stamp, ts.serialize_cdr(msg, msg.__msgtype__))


def test_binary_labels_read_as_streethazards_warn_on_stderr(artifact, tmp_path, capsys):
    write_binary_bag(tmp_path / 'bag')
    out = tmp_path / 'out'
    assert cli.main(replay_args(tmp_path / 'bag', artifact, out)) == 0  # --labels streethazards
    err = capsys.readouterr().err
    assert ('warning: no anomaly pixel in the 3 labelled frames with --labels streethazards '
            '(anomaly id 14); label ids seen (id: pixels): 0: 249, 1: 3, 255: 36. --labels '
            'binary would fit these ids') in err
    report = json.loads((out / 'metrics.json').read_text())
    assert report['metrics']['unknown_label_ids'] == {'0': 249}
    assert any(w.startswith('no anomaly pixel') for w in report['warnings'])
    assert 'Warning: no anomaly pixel in the 3 labelled frames' in (out / 'summary.md').read_text()


def test_binary_labels_give_anomaly_metrics_and_no_class_metrics(artifact, tmp_path, capsys):
    write_binary_bag(tmp_path / 'bag')
    out = tmp_path / 'out'
    code = cli.main(['--json', *replay_args(tmp_path / 'bag', artifact, out, '--labels',
                                             'binary')])
    assert code == 0
    captured = capsys.readouterr()
    assert 'warning' not in captured.err
    printed = json.loads(captured.out)
    assert not {'closed.miou', 'open_set.open_miou'} & set(printed['metrics'])
    metrics = json.loads((out / 'metrics.json').read_text())['metrics']
    reason = 'labels carry no class ids (binary convention)'
    assert metrics['closed'] == {'error': reason} and metrics['open_set'] == {'error': reason}
    # the bright pixel (score 250/255 - 0.25) outranks every grey one (at most 80/255)
    assert metrics['per_image']['ap'] == metrics['pooled']['ap'] == 1.0
    assert metrics['anomaly_pixel_share'] == pytest.approx(3 / 252)  # 84 labelled a frame
    summary_md = (out / 'summary.md').read_text()
    assert f'- closed mIoU: {reason}' in summary_md and f'- open-mIoU: {reason}' in summary_md


# --- a bag as ROS 2 Dashing wrote it -------------------------------------------------------------

# rosbag2's first sqlite3 schema (Dashing): no offered_qos_profiles, schema or definitions table.
DASHING_SCHEMA = """
CREATE TABLE topics(id INTEGER PRIMARY KEY, name TEXT NOT NULL, type TEXT NOT NULL,
                    serialization_format TEXT NOT NULL);
CREATE TABLE messages(id INTEGER PRIMARY KEY, topic_id INTEGER NOT NULL,
                      timestamp INTEGER NOT NULL, data BLOB NOT NULL);
CREATE INDEX timestamp_idx ON messages (timestamp ASC);
"""


def dashing_name(msgtype: str) -> str:
    package, _, name = msgtype.split('/')
    return f'{package}/{name}'


def dashing_copy(src: Path, dst: Path) -> Path:
    """The sqlite3 rosbag2 `src` rewritten as Dashing stored bags: type names without /msg/ in
    the topics table and in version-1 metadata.yaml, no message definitions."""
    dst.mkdir()
    new = sqlite3.connect(next(src.glob('*.db3')))
    old = sqlite3.connect(dst / 'dashing_0.db3')
    old.executescript(DASHING_SCHEMA)
    topics = [(i, name, dashing_name(msgtype), fmt) for i, name, msgtype, fmt in new.execute(
        'SELECT id, name, type, serialization_format FROM topics ORDER BY id')]
    old.executemany('INSERT INTO topics VALUES (?, ?, ?, ?)', topics)
    old.executemany('INSERT INTO messages VALUES (?, ?, ?, ?)',
                    new.execute('SELECT id, topic_id, timestamp, data FROM messages'))
    counts = dict(new.execute('SELECT topic_id, COUNT(*) FROM messages GROUP BY topic_id'))
    first, last, total = new.execute(
        'SELECT MIN(timestamp), MAX(timestamp), COUNT(*) FROM messages').fetchone()
    old.commit()
    old.close()
    new.close()
    lines = ['rosbag2_bagfile_information:', '  version: 1', '  storage_identifier: sqlite3',
             '  relative_file_paths:', '    - dashing_0.db3', '  duration:',
             f'    nanoseconds: {last - first}', '  starting_time:',
             f'    nanoseconds_since_epoch: {first}', f'  message_count: {total}',
             '  topics_with_message_count:']
    for i, name, msgtype, fmt in topics:
        lines += ['    - topic_metadata:', f'        name: {name}', f'        type: {msgtype}',
                  f'        serialization_format: {fmt}', f'      message_count: {counts[i]}']
    (dst / 'metadata.yaml').write_text('\n'.join(lines) + '\n')
    return dst


@pytest.fixture(scope='module')
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp('dashing')
    write_bag(root / 'humble', FRAMES, size=(64, 96), storage='sqlite3', compressed=True, seed=3,
              rate_hz=30.0, progress=False)
    return {'humble': root / 'humble', 'dashing': dashing_copy(root / 'humble', root / 'old')}


def test_ros2_type_name():
    assert ros2_type_name('sensor_msgs/Image') == 'sensor_msgs/msg/Image'
    for name in ('sensor_msgs/msg/Image', 'example/action/Fib', 'Image', '', 'a/b/c/d'):
        assert ros2_type_name(name) == name


def test_rosbags_keeps_the_dashing_type_names(bags):
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    humble = get_typestore(Stores.ROS2_HUMBLE)
    with AnyReader([bags['dashing']], default_typestore=humble) as reader:
        assert sorted({c.msgtype for c in reader.connections}) == [
            'sensor_msgs/CameraInfo', 'sensor_msgs/CompressedImage', 'sensor_msgs/Image']
        assert all(not c.msgdef.data for c in reader.connections)  # no embedded definitions


def test_a_dashing_bag_lists_its_topics_by_their_msg_names(bags):
    source = open_bag(bags['dashing'])
    try:
        assert source.kind == 'rosbag2 (sqlite3)'
        assert {t.topic: t.msgtype for t in source.topics} == {
            '/camera/image_raw': 'sensor_msgs/msg/Image',
            '/camera/camera_info': 'sensor_msgs/msg/CameraInfo',
            '/camera/labels': 'sensor_msgs/msg/Image',
            '/camera/image_raw/compressed': 'sensor_msgs/msg/CompressedImage'}
        assert 'Dashing' in source.note and 'sensor_msgs/Image -> sensor_msgs/msg/Image' in (
            source.note)
        topics = choose_topics(source.topics)
        assert (topics.image.topic, topics.label.topic) == ('/camera/image_raw', '/camera/labels')
        topic, _, raw = next(source.messages({topics.label.id}))
        assert source.deserialize(raw, 'sensor_msgs/Image').encoding == 'mono8'
    finally:
        source.close()


@pytest.mark.parametrize('image_topic', [None, '/camera/image_raw/compressed'])
def test_a_dashing_bag_replays_like_the_bag_it_was_made_from(bags, image_topic):
    reports = {}
    for name in ('humble', 'dashing'):
        pipeline = FramePipeline(FakeSegmenter(), CLASSES, palette(), threshold=0.4)
        reports[name] = Replay(bags[name], pipeline, image_topic=image_topic,
                               labels=label_spec('streethazards', CLASSES)).run()
    old, new = reports['dashing'], reports['humble']
    assert old['complete'] and old['frames']['with_labels'] == FRAMES
    assert old['frames'] == new['frames']
    assert old['bag']['topics'] == new['bag']['topics']
    for key in ('per_image', 'pooled', 'closed', 'open_set', 'anomaly_pixel_share'):
        assert old['metrics'][key] == new['metrics'][key]
    assert 'Dashing' in old['bag']['note'] and not new['bag']['note']


def test_a_dashing_bag_replays_into_an_output_bag(bags, artifact, tmp_path):
    out = tmp_path / 'out'
    assert cli.main(replay_args(bags['dashing'], artifact, out, '--write-bag')) == 0
    assert 'Dashing' in (out / 'summary.md').read_text()
    source = open_bag(out / 'output_bag')
    try:
        types = {t.topic: t.msgtype for t in source.topics}
        assert types['/camera/image_raw'] == types['/anomaly_seg/anomaly_score'] == (
            'sensor_msgs/msg/Image')
        assert {t.topic: t.count for t in source.topics}['/camera/labels'] == FRAMES
    finally:
        source.close()
