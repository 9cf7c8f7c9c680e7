"""`anomaly-seg export --int8`: a QDQ graph checked against fp32, thresholds of its own scores."""

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import numpy_helper
import pytest
from test_export import tiny_segmenter
from test_export_command import BIN, _write_tree
import torch

from anomaly_seg_node import backends
from anomaly_seg_node.artifact import read_sidecar
from anomaly_seg_node.check_images import road_like_images
from anomaly_seg_node.errors import ArtifactError, BackendError, ConfigError
from anomaly_seg_node.metrics import threshold_at_fpr, threshold_at_tpr
from training import export_command, quantize
from training.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / 'training' / 'configs'
SIZE = (64, 96)
# Data at 96x144 (the artifact's aspect ratio): fitted by a plain resize, as the node would.
DATA_SIZE = (96, 144)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    export_command.add_arguments(parser)
    return parser.parse_args([*argv, '--no-progress'])


def labelled_folder(root: Path) -> tuple[list[np.ndarray], ...]:
    """StreetHazards layout: 12 test frames with a noise-textured anomaly (raw 14) each, and 6
    validation frames (raw 4 = 'other' is ignored). Returns (test images, test labels, val
    images, val labels)."""
    rng = np.random.default_rng(1)
    test_images, test_labels = [], []
    for index in range(12):
        image = road_like_images(1, *DATA_SIZE, seed=10 + index)[0]
        label = np.full(DATA_SIZE, 8, np.uint8)
        label[:12] = 4
        top, left = 36 + 2 * index, 10 + 8 * index
        image[top:top + 24, left:left + 30] = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
        label[top:top + 24, left:left + 30] = 14
        test_images.append(image)
        test_labels.append(label)
    _write_tree(root, 'test/test', 't5', test_images, test_labels)
    val_images = [road_like_images(1, *DATA_SIZE, seed=40 + i)[0] for i in range(6)]
    val_labels = [np.full(DATA_SIZE, 9, np.uint8) for _ in range(6)]
    val_labels[0][:, :20] = 4
    _write_tree(root, 'train/validation', 't4', val_images, val_labels)
    return test_images, test_labels, val_images, val_labels


def tiny_network_loader(seed: int = 0):  # noqa: ANN201
    """export_command._load_network stand-in: the tiny model under the densehybrid config."""
    def load(args: argparse.Namespace):  # noqa: ANN202
        model = tiny_segmenter(seed=seed)
        model.has_outlier_head = True  # SwiftNet's flag, which picks DH as the main score
        with torch.no_grad():  # DH scores spread over several nats, as a trained model's
            model.outlier.weight.mul_(40.0)
            model.outlier.bias += torch.tensor([60.0, 0.0])
        return (load_config(CONFIGS / 'densehybrid.yaml'), model,
                {'source': f'tiny stand-in, seed {seed}', 'untrained': False})
    return load


@pytest.fixture
def tiny_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_command, '_load_network', tiny_network_loader())


def export(tmp_path: Path, *extra: str) -> dict:
    return export_command.run(parse(
        '--random-init', '--out', str(tmp_path / 'tiny'), '--size', '64x96',
        '--score-resolution', 'input', '--formats', 'onnx',
        '--calibration-data', str(tmp_path / 'cal'), *extra))


def at_size(image: np.ndarray, interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    return cv2.resize(image, SIZE[::-1], interpolation=interpolation)


def onnx_scores(path: Path, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    maps = quantize.OnnxScoreMaps(path, 'DH')
    outputs = [maps.run(np.ascontiguousarray(image.transpose(2, 0, 1)[None], np.float32))
               for image in images]
    return (np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs]))


def int8_conv_weights(path: Path) -> dict[str, tuple[list[int], int]]:
    """{Conv: (int8 weight shape, number of scales)} of the Convs whose weight is an int8
    initializer dequantised along axis 0 (per output channel)."""
    graph = onnx.load(str(path)).graph
    initializers = {t.name: t for t in graph.initializer}
    dequantised = {n.output[0]: n for n in graph.node if n.op_type == 'DequantizeLinear'}
    found = {}
    for node in graph.node:
        dq = dequantised.get(node.input[1]) if node.op_type == 'Conv' else None
        if dq is None or dq.input[0] not in initializers:
            continue
        weight = initializers[dq.input[0]]
        axis = next((a.i for a in dq.attribute if a.name == 'axis'), 1)
        scales = numpy_helper.to_array(initializers[dq.input[1]])
        if weight.data_type == onnx.TensorProto.INT8 and axis == 0:
            found[node.name] = (list(weight.dims), int(scales.size))
    return found


def test_int8_export_writes_a_checked_qdq_artifact(tmp_path: Path, tiny_network: None) -> None:
    test_images, test_labels, val_images, val_labels = labelled_folder(tmp_path / 'cal')
    report = export(tmp_path, '--int8', '--int8-frames', '6')
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ['cal', 'tiny-int8.json', 'tiny-int8.onnx', 'tiny.json', 'tiny.onnx']
    fp32 = read_sidecar(tmp_path / 'tiny.json')
    int8 = read_sidecar(tmp_path / 'tiny-int8.json')
    assert fp32.precision == 'fp32' and fp32.quantization == {}
    assert json.loads((tmp_path / 'tiny.json').read_text())['precision'] == 'fp32'
    assert int8.precision == 'int8' and int8.formats == ('onnx',)
    assert report['int8']['artifact'] == str(tmp_path / 'tiny-int8.json')
    assert 'tiny-int8.json' in export_command.format_human(report)

    # A QDQ graph: the two body Convs hold int8 weights with one scale per output channel; the
    # class and outlier heads (the last Convs) and everything after them stay float.
    path = tmp_path / 'tiny-int8.onnx'
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count('QuantizeLinear') >= 2 and ops.count('DequantizeLinear') >= 4
    weights = int8_conv_weights(path)
    assert sorted(shape for shape, _ in weights.values()) == [[16, 3, 3, 3], [16, 16, 3, 3]]
    assert all(scales == 16 for _, scales in weights.values())
    quantization = int8.quantization
    assert quantization['float_nodes']['op_types']['Conv'] == 2
    assert {'ArgMax', 'ReduceSum', 'Log', 'Softplus'} <= set(quantization['float_nodes'][
        'op_types'])
    assert quantization['nodes']['float_Conv'] == 2 and quantization['nodes']['Conv'] == 4
    assert quantization['reference'] == {'sidecar': 'tiny.json', 'onnx': 'tiny.onnx',
                                         'sha256': fp32.files['onnx'].sha256}
    assert quantization['reference_thresholds'] == fp32.thresholds
    # 12 labelled frames kept (6 + 8 asked), a third held out for the parity check
    assert quantization['calibration_frames'] == 8 and int8.parity['images'] == 4

    # Parity figures against the fp32 graph, as recorded and as required.
    figures = int8.parity['onnxruntime']
    assert int8.parity['requirements'] == quantize.PARITY_REQUIREMENTS
    assert figures['label_agreement'] >= 0.95 and figures['mask_agreement'] >= 0.95
    assert figures['mean_score_diff_over_std'] <= 0.1
    assert figures['p99_score_diff_over_std'] <= 0.5
    assert 0 < figures['max_score_diff']  # really quantised, not a copy of the fp32 graph
    assert int8.parity['threshold_name'] == 'fpr1' == int8.default_threshold
    assert int8.parity['threshold'] == int8.thresholds['fpr1']
    assert int8.parity['reference_threshold'] == fp32.thresholds['fpr1']

    # Thresholds of the int8 graph's own scores on the same data: different numbers, same
    # definitions (known answers from exact thresholds on its scores).
    assert set(int8.thresholds) == set(fp32.thresholds) == {'tpr95', 'fpr1', 'fpr0.1'}
    assert all(int8.thresholds[k] != fp32.thresholds[k] for k in fp32.thresholds)
    _, val_scores = onnx_scores(path, [at_size(i) for i in val_images])
    inlier = np.stack([at_size(lab, cv2.INTER_NEAREST_EXACT) for lab in val_labels]) != 4
    for name, rate in (('fpr1', 0.01), ('fpr0.1', 0.001)):
        exact = threshold_at_fpr(val_scores[inlier], rate)
        assert exact <= int8.thresholds[name] <= exact + BIN * abs(exact) + 1e-30
        assert np.mean(val_scores[inlier] > int8.thresholds[name]) <= rate
    _, test_scores = onnx_scores(path, [at_size(i) for i in test_images])
    raw = np.stack([at_size(lab, cv2.INTER_NEAREST_EXACT) for lab in test_labels])
    ood = np.where(raw == 14, 1, np.where(raw == 4, 2, 0))
    exact = threshold_at_tpr(test_scores, ood)
    assert exact - BIN * abs(exact) <= int8.thresholds['tpr95'] <= exact

    # The runtime loads and runs it, as int8 on the CPU, and matches ONNX Runtime directly.
    segmenter = backends.load(tmp_path / 'tiny-int8.json')
    assert (segmenter.backend, segmenter.device, segmenter.precision) == \
        ('onnxruntime', 'cpu', 'int8')
    frame = at_size(test_images[0])
    result = segmenter(frame)
    labels, score = onnx_scores(path, [frame])
    np.testing.assert_array_equal(result.labels, labels)
    np.testing.assert_array_equal(result.anomaly_score, score)
    with pytest.raises(BackendError, match='int8 artifact'):
        backends.load(tmp_path / 'tiny-int8.json', backend='torch')


def test_broken_int8_parity_fails_the_export(tmp_path: Path, tiny_network: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    labelled_folder(tmp_path / 'cal')
    real_split = quantize.split_frames

    def dark_calibration(frames: np.ndarray, checks: int) -> tuple[np.ndarray, np.ndarray]:
        # Activation ranges from near-black frames: real frames then saturate the int8 grid.
        calibrate, check = real_split(frames, checks)
        return calibrate // 16, check

    monkeypatch.setattr(quantize, 'split_frames', dark_calibration)
    with pytest.raises(ArtifactError, match=(
            r'int8 export of tiny-int8 failed its parity check \(labels and scores\) against '
            r'the fp32 graph tiny.onnx: labels agree with fp32 on \d+\.\d+% of pixels, need '
            r'>= 95%.*Nothing was written \(the fp32 artifact tiny.json stands\)')):
        export(tmp_path, '--int8', '--int8-frames', '6')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['cal', 'tiny.json', 'tiny.onnx']


def test_mask_disagreement_fails_after_recalibration(tmp_path: Path, tiny_network: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    labelled_folder(tmp_path / 'cal')
    real_export = quantize.export_int8

    def low_thresholds(reference, frames, recalibrate, **kwargs):  # noqa: ANN001, ANN202
        def shifted(score_maps):  # noqa: ANN001, ANN202
            calibration = recalibrate(score_maps)
            # A default threshold below every score: the int8 mask flags every pixel.
            calibration.thresholds['DH']['fpr1'] = -1e6
            return calibration
        return real_export(reference, frames, shifted, **kwargs)

    monkeypatch.setattr(quantize, 'export_int8', low_thresholds)
    with pytest.raises(ArtifactError, match=r'\(anomaly masks\).*anomaly masks agree with fp32 '
                                            r'on \d+\.\d+% of pixels, need >= 95%'):
        export(tmp_path, '--int8', '--int8-frames', '6')
    assert not (tmp_path / 'tiny-int8.json').exists()
    assert not list(tmp_path.glob('.tiny-int8*'))


def test_float_tail_of_the_tiny_graph(tmp_path: Path, tiny_network: None) -> None:
    labelled_folder(tmp_path / 'cal')
    export(tmp_path)
    graph = onnx.load(str(tmp_path / 'tiny.onnx')).graph
    tail = set(quantize.float_tail(graph))
    by_name = {node.name: node for node in graph.node}
    convs = [node.name for node in graph.node if node.op_type == 'Conv']
    # the body's two Convs are quantised; the heads' Convs (the logits) stay float
    heads = {name for name in convs if by_name[name].input[1].startswith('segmenter.')
             and by_name[name].input[1].split('.')[1] in ('classifier', 'outlier')}
    assert len(convs) == 4 and len(heads) == 2 and tail & set(convs) == heads
    assert {'ArgMax', 'Exp', 'Log', 'Resize'} <= {by_name[name].op_type for name in tail}
    outputs = {name for node in graph.node if node.name in tail for name in node.output}
    assert {'labels', 'anomaly_score'} <= outputs
    # nothing in the tail feeds a quantised node
    for node in graph.node:
        if node.name not in tail:
            assert not set(node.input) & outputs, node.name
    # no new stale-sibling note without an int8 artifact
    assert not (tmp_path / 'tiny-int8.json').exists()


def test_int8_keeps_uint8_labels(tmp_path: Path, tiny_network: None) -> None:
    labelled_folder(tmp_path / 'cal')
    export(tmp_path, '--int8', '--int8-frames', '6', '--label-dtype', 'uint8')
    fp32, int8 = (read_sidecar(tmp_path / name) for name in ('tiny.json', 'tiny-int8.json'))
    assert fp32.labels.dtype == int8.labels.dtype == 'uint8'
    frames = road_like_images(1, *SIZE, seed=1)
    wide = backends.load(fp32, 'onnxruntime', 'cpu')(frames)
    narrow = backends.load(int8, 'onnxruntime', 'cpu')(frames)
    assert wide.labels.dtype == narrow.labels.dtype == np.uint8
    assert np.mean(wide.labels == narrow.labels) > 0.9


def test_split_frames_holds_out_evenly_spread_frames() -> None:
    frames = np.arange(12, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    calibrate, check = quantize.split_frames(frames, 8)
    assert check[:, 0, 0, 0].tolist() == [2, 4, 7, 9]  # at most a third of them
    assert calibrate[:, 0, 0, 0].tolist() == [0, 1, 3, 5, 6, 8, 10, 11]
    calibrate, check = quantize.split_frames(frames[:2], 8)
    assert calibrate[:, 0, 0, 0].tolist() == [1] and check[:, 0, 0, 0].tolist() == [0]
    with pytest.raises(ConfigError, match='at least 2 calibration frames'):
        quantize.split_frames(frames[:1], 8)
    assert quantize.int8_stem('models/demo') == Path('models/demo-int8')


def test_int8_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='--int8-frames only applies with --int8'):
        export_command.run(parse('--random-init', '--out', str(tmp_path / 'x'),
                                 '--int8-frames', '4'))
    with pytest.raises(ConfigError, match='--int8-frames must be >= 1'):
        export_command.run(parse('--random-init', '--out', str(tmp_path / 'x'), '--int8',
                                 '--int8-frames', '0'))
    assert not list(tmp_path.iterdir())


def test_stale_int8_sibling_is_reported(tmp_path: Path, tiny_network: None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    labelled_folder(tmp_path / 'cal')
    export(tmp_path, '--int8', '--int8-frames', '6')
    fp32 = read_sidecar(tmp_path / 'tiny.json')
    assert quantize.stale_int8(fp32) == ''
    with pytest.raises(ConfigError, match='already a int8 artifact'):
        quantize.export_int8(read_sidecar(tmp_path / 'tiny-int8.json'),
                             np.zeros((4, *SIZE, 3), np.uint8))
    with pytest.raises(ConfigError, match=r'uint8 \[M, 64, 96, 3\]'):
        quantize.export_int8(fp32, np.zeros((4, 32, 32, 3), np.uint8))
    # a re-export of another model without --int8 leaves a sibling that is not its own
    monkeypatch.setattr(export_command, '_load_network', tiny_network_loader(seed=1))
    report = export(tmp_path)
    assert any('tiny-int8.json was quantised from an earlier tiny.onnx' in note
               for note in report['notes'])
