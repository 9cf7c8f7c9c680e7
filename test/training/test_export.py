"""Export: NAME.onnx, NAME.pt2 and the sidecar, and a parity check that passes and can fail."""

import copy
import json
from pathlib import Path
import re

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from anomaly_seg_node.artifact import read_sidecar
from anomaly_seg_node.check_images import road_like_images
from anomaly_seg_node.errors import ArtifactError, ConfigError
from anomaly_seg_node.labels import class_names
from training import export
from training.export import DeployModel, export_artifact


class TinySegmenter(nn.Module):
    """Stand-in with SwiftNet's contract: RGB 0..255 -> full-size 'logits' / 'outlier_logits'."""

    def __init__(self, num_classes: int = 12, outlier_head: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(16, num_classes, 1)
        self.outlier = nn.Conv2d(16, 2, 1) if outlier_head else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x / 127.5 - 1.0)  # [N, 16, H/2, W/2]
        heads = {'logits': self.classifier(features)}
        if self.outlier is not None:
            heads['outlier_logits'] = self.outlier(features)
        return {k: F.interpolate(v, x.shape[-2:], mode='bilinear', align_corners=False)
                for k, v in heads.items()}


def tiny_segmenter(outlier_head: bool = True, seed: int = 0) -> TinySegmenter:
    """Heads rescaled so that several classes and a spread of scores appear."""
    torch.manual_seed(seed)
    model = TinySegmenter(outlier_head=outlier_head)
    with torch.no_grad():
        model.classifier.weight.mul_(8.0)
        if model.outlier is not None:
            model.outlier.weight.mul_(8.0)
    return model.eval()


def _eager(model: DeployModel, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        labels, score = model(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    return labels.numpy(), score.numpy()


def test_stand_in_predictions_vary_across_the_image() -> None:
    model = DeployModel(tiny_segmenter(), 'DH')
    labels, score = _eager(model, road_like_images(4, 64, 96))
    assert labels.dtype == np.int32 and score.dtype == np.float32
    assert labels.shape == score.shape == (4, 64, 96)
    assert len(np.unique(labels)) > 3
    assert score.std() > 0.05


def test_road_like_images_are_deterministic_and_varied() -> None:
    images = road_like_images(3, 40, 60, seed=5)
    assert images.dtype == np.uint8 and images.shape == (3, 40, 60, 3)
    np.testing.assert_array_equal(images, road_like_images(3, 40, 60, seed=5))
    assert not np.array_equal(images[0], images[1])
    assert images.std() > 20


@pytest.mark.parametrize(('size', 'batch'), [((64, 96), 1), ((72, 88), 2)])
def test_export_writes_a_checked_artifact(tmp_path: Path, size: tuple[int, int],
                                          batch: int) -> None:
    model = DeployModel(tiny_segmenter(), 'DH')
    thresholds = {'tpr95': -3.0, 'fpr1': -2.0, 'fpr0.1': -1.5}
    sidecar = export_artifact(model, tmp_path / 'tiny', size=size, batch=batch,
                              thresholds=thresholds, metadata={'method': 'DenseHybrid',
                                                               'training': {'lr': 1e-5},
                                                               'pad_mode': 'reflect'})
    assert sorted(p.name for p in tmp_path.iterdir()) == ['tiny.json', 'tiny.onnx', 'tiny.pt2']
    assert read_sidecar(tmp_path / 'tiny.json') == sidecar
    assert sidecar.source == str((tmp_path / 'tiny.json').resolve())
    assert sidecar.input_size == size and sidecar.input.batch == batch
    assert sidecar.method == 'DenseHybrid' and sidecar.training == {'lr': 1e-5}
    assert sidecar.pad_mode == 'reflect'
    assert (sidecar.score.name, sidecar.score.units, sidecar.score.temperature) == \
        ('DH', 'nats', None)
    assert list(sidecar.classes) == class_names('densehybrid12')
    assert sidecar.default_threshold == 'tpr95' and sidecar.thresholds == thresholds
    parity = sidecar.parity
    assert parity['threshold'] == -3.0 and parity['size'] == list(size)
    for runtime in ('onnxruntime', 'torch_export'):
        figures = parity[runtime]
        assert figures['label_agreement'] >= 0.999
        assert figures['mask_agreement'] >= 0.995
        assert figures['score_diff_over_std'] <= 1e-3
        assert figures['score_std'] > 0.05

    import onnx
    graph = onnx.load(str(tmp_path / 'tiny.onnx')).graph
    assert [i.name for i in graph.input] == ['image']
    assert [o.name for o in graph.output] == ['labels', 'anomaly_score']
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == [batch, 3, *size]  # static shape
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.INT32


def test_export_at_the_issue_size(tmp_path: Path) -> None:
    sidecar = export_artifact(DeployModel(tiny_segmenter(), 'DH'), tmp_path / 'wide',
                              size=(368, 496), check_images=2)
    assert sidecar.parity['onnxruntime']['label_agreement'] >= 0.999
    assert sidecar.parity['threshold_name'] == 'median of the eager scores'
    assert sidecar.default_threshold is None


def _assert_nothing_written(folder: Path) -> None:
    assert list(folder.iterdir()) == []


def test_perturbed_onnx_fails_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_export = export._export_onnx

    def export_perturbed(model: DeployModel, example: torch.Tensor, path: Path) -> None:
        perturbed = copy.deepcopy(model)
        with torch.no_grad():
            perturbed.segmenter.outlier.bias += torch.tensor([0.0, 0.05])
        real_export(perturbed, example, path)

    monkeypatch.setattr(export, '_export_onnx', export_perturbed)
    with pytest.raises(ArtifactError, match=(
            r'parity check.*onnxruntime: max score difference .* x the score std.*'
            r'need <= 0.001.*Figures')) as error:
        export_artifact(DeployModel(tiny_segmenter(), 'DH'), tmp_path / 'bad', size=(64, 96))
    assert 'torch_export:' not in str(error.value)
    _assert_nothing_written(tmp_path)


def test_label_and_mask_disagreement_fails(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real_runner = export._onnx_runner

    def flipping_runner(path: Path):  # noqa: ANN202
        run = real_runner(path)

        def flipped(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            labels, score = run(image)
            labels, score = labels.copy(), score.copy()
            labels[:, :2] = (labels[:, :2] + 1) % 12  # 2 of 64 rows: 3% of the pixels
            score[:, :2] += 100.0
            return labels, score
        return flipped

    monkeypatch.setattr(export, '_onnx_runner', flipping_runner)
    with pytest.raises(ArtifactError) as error:
        export_artifact(DeployModel(tiny_segmenter(), 'DH'), tmp_path / 'bad', size=(64, 96))
    message = str(error.value)
    assert re.search(r'labels agree on 96\.8\d*% of pixels, need >= 99\.9%', message)
    assert re.search(r'anomaly masks agree on 9\d\.\d+% of pixels, need >= 99\.5%', message)
    _assert_nothing_written(tmp_path)


def _zero_runner(path: Path):  # noqa: ANN202
    """A broken exported graph: all-zero labels and scores."""
    return lambda image: (np.zeros(image.shape[:1] + image.shape[2:], np.int32),
                          np.zeros(image.shape[:1] + image.shape[2:], np.float32))


def test_failed_export_keeps_the_previous_artifact(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = DeployModel(tiny_segmenter(), 'MSP')
    first = export_artifact(model, tmp_path / 'm', size=(64, 96), check_images=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    monkeypatch.setattr(export, '_pt2_runner', _zero_runner)
    with pytest.raises(ArtifactError, match='torch_export: labels agree'):
        export_artifact(model, tmp_path / 'm', size=(64, 96), check_images=1)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert read_sidecar(tmp_path / 'm.json') == first


def test_segmentation_only_graph(tmp_path: Path) -> None:
    model = DeployModel(tiny_segmenter(outlier_head=False), 'segmentation')
    sidecar = export_artifact(model, tmp_path / 'seg', size=(64, 96), check_images=2)
    assert sidecar.score.name == 'segmentation' and sidecar.score.units == 'none'
    assert sidecar.parity['onnxruntime']['max_score_diff'] == 0.0
    import onnxruntime
    session = onnxruntime.InferenceSession(str(tmp_path / 'seg.onnx'),
                                           providers=['CPUExecutionProvider'])
    image = road_like_images(1, 64, 96).transpose(0, 3, 1, 2).astype(np.float32)
    labels, score = session.run(['labels', 'anomaly_score'], {'image': image})
    assert not score.any() and len(np.unique(labels)) > 3


def test_temperature_scores_record_their_temperature(tmp_path: Path) -> None:
    assert DeployModel(tiny_segmenter(), 'OP').effective_temperature == 2.0
    assert DeployModel(tiny_segmenter(), 'OPxMS', temperature=3).effective_temperature == 3.0
    sidecar = export_artifact(DeployModel(tiny_segmenter(), 'JSD'), tmp_path / 'jsd',
                              size=(64, 96), check_images=1)
    assert sidecar.score.temperature == 2.0 and sidecar.score.units == 'nats'
    assert json.loads((tmp_path / 'jsd.json').read_text())['score']['temperature'] == 2.0


def test_bad_requests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='unknown score .PX'):
        DeployModel(tiny_segmenter(), 'PX')
    with pytest.raises(ConfigError, match='takes no temperature'):
        DeployModel(tiny_segmenter(), 'DH', temperature=2.0)
    with pytest.raises(ConfigError, match='needs the outlier head'):
        export_artifact(DeployModel(tiny_segmenter(outlier_head=False), 'DH'),
                        tmp_path / 'x', size=(64, 96))
    model = DeployModel(tiny_segmenter(), 'DH')
    with pytest.raises(ConfigError, match='calibration images must be uint8'):
        export_artifact(model, tmp_path / 'x', size=(64, 96),
                        calibration_images=np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ConfigError, match='default_threshold .fpr1. is not one of'):
        export_artifact(model, tmp_path / 'x', size=(64, 96), thresholds={'tpr95': 0.0},
                        metadata={'default_threshold': 'fpr1'})
    with pytest.raises(ConfigError, match='unknown export metadata keys'):
        export_artifact(model, tmp_path / 'x', size=(64, 96), metadata={'colour': 1})
    with pytest.raises(ConfigError, match='pad_mode must be one of reflect, constant'):
        export_artifact(model, tmp_path / 'x', size=(64, 96), metadata={'pad_mode': 'edge'})
    with pytest.raises(ConfigError, match='plain JSON values'):
        export_artifact(model, tmp_path / 'x', size=(64, 96),
                        metadata={'training': {'lr': {1, 2}}})
    with pytest.raises(ConfigError, match='training must be a dict'):
        export_artifact(model, tmp_path / 'x', size=(64, 96), metadata={'training': [1]})
    with pytest.raises(ConfigError, match="field 'void_id' must be .*not a class id.*metadata"):
        export_artifact(model, tmp_path / 'x', size=(64, 96), metadata={'void_id': 3})
    with pytest.raises(ConfigError, match='12 classes but metadata gives 2 class names'):
        export_artifact(model, tmp_path / 'x', size=(64, 96),
                        metadata={'classes': ['a', 'b'], 'palette': [[0, 0, 0]] * 2})
    with pytest.raises(ConfigError, match='batch must be a positive integer'):
        export_artifact(model, tmp_path / 'x', size=(64, 96), batch=0)
    _assert_nothing_written(tmp_path)


def test_swiftnet_exports_with_parity(tmp_path: Path) -> None:
    from training.networks.swiftnet import SwiftNet

    torch.manual_seed(0)
    model = DeployModel(SwiftNet(12, outlier_head=True), 'DH')
    images = road_like_images(1, 64, 96, seed=3)
    sidecar = export_artifact(model, tmp_path / 'swiftnet', size=(64, 96), check_images=1,
                              calibration_images=images,
                              metadata={'training': {'network': model.segmenter.config()}})
    assert sidecar.parity['images'] == 2
    for runtime in ('onnxruntime', 'torch_export'):
        assert sidecar.parity[runtime]['label_agreement'] >= 0.999
        assert sidecar.parity[runtime]['score_diff_over_std'] <= 1e-3
    assert sidecar.training['network']['num_classes'] == 12


def _rescaled_swiftnet(seed: int = 0) -> nn.Module:
    from training.networks.swiftnet import SwiftNet

    torch.manual_seed(seed)
    net = SwiftNet(12, outlier_head=True).eval()
    with torch.no_grad():  # several classes and a spread of scores, as a trained model has
        net.class_head.conv.weight.mul_(20.0)
        net.outlier_head.conv.weight.mul_(20.0)
    return net


@pytest.mark.parametrize('score', ['DH', 'OPxMS'])
def test_stride4_scores_are_upsampled_low_resolution_scores(score: str) -> None:
    from training.scores import anomaly_score

    net = _rescaled_swiftnet()
    x = torch.from_numpy(road_like_images(1, 64, 96, seed=2)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        logits, maps = export.segmenter_scores(net, x, [score], {}, 'stride4')
        low = net.forward_heads(net.forward_features(x))
        expected = F.interpolate(
            anomaly_score(score, low['logits'], low['outlier_logits'])[:, None], size=(64, 96),
            mode='bilinear', align_corners=False)[:, 0]
        full = net(x)
        paper = anomaly_score(score, full['logits'], full['outlier_logits'])
    assert low['logits'].shape[-2:] == (16, 24)
    torch.testing.assert_close(maps[score], expected)
    # The labels are the same full-resolution argmax as with scores at the input size.
    torch.testing.assert_close(logits, full['logits'])
    # An approximation of the paper's score, not the same map (DH is smooth in the logits; the
    # MSP factor of OPxMS peaks on class boundaries, which the low resolution smears).
    assert not torch.allclose(maps[score], paper)
    if score == 'DH':
        assert torch.corrcoef(torch.stack([maps[score].flatten(), paper.flatten()]))[0, 1] > 0.9
    _, at_input = export.segmenter_scores(net, x, [score], {}, 'input')
    torch.testing.assert_close(at_input[score], paper)


def test_stride4_export_records_its_resolution(tmp_path: Path) -> None:
    model = DeployModel(_rescaled_swiftnet(), 'DH', score_resolution='stride4')
    sidecar = export_artifact(model, tmp_path / 'low', size=(64, 96), check_images=2,
                              formats=('onnx',))
    assert sidecar.score.resolution == 'stride4'
    assert read_sidecar(tmp_path / 'low.json').score.resolution == 'stride4'
    assert sidecar.parity['onnxruntime']['score_diff_over_std'] <= 1e-3
    assert sidecar.parity['onnxruntime']['label_agreement'] >= 0.999
    with pytest.raises(ConfigError, match='forward_features'):
        DeployModel(tiny_segmenter(), 'DH', score_resolution='stride4')
    with pytest.raises(ConfigError, match='unknown score resolution'):
        DeployModel(tiny_segmenter(), 'DH', score_resolution='stride8')


def test_stride4_labels_are_the_stride4_argmax_repeated_over_4x4_cells() -> None:
    net = _rescaled_swiftnet()
    x = torch.from_numpy(road_like_images(2, 64, 96, seed=4)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        low = net.forward_heads(net.forward_features(x))['logits'].argmax(1)  # [2, 16, 24]
        labels, score = DeployModel(net, 'DH', score_resolution='stride4',
                                    label_dtype='uint8', label_resolution='stride4')(x)
        full_labels, full_score = DeployModel(net, 'DH', score_resolution='stride4')(x)
    expected = low.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    assert labels.dtype == torch.uint8 and full_labels.dtype == torch.int32
    assert torch.equal(labels.long(), expected)
    torch.testing.assert_close(score, full_score)  # the score does not change
    # Interior pixels of each cell agree with the bilinear argmax; borders may not.
    assert 0.7 < float((labels.long() == full_labels.long()).float().mean()) < 1.0


def test_uint8_stride4_labels_export_with_parity(tmp_path: Path) -> None:
    model = DeployModel(_rescaled_swiftnet(), 'DH', score_resolution='stride4',
                        label_dtype='uint8', label_resolution='stride4')
    sidecar = export_artifact(model, tmp_path / 'u8', size=(64, 96), check_images=2)
    for runtime in ('onnxruntime', 'torch_export'):
        assert sidecar.parity[runtime]['label_agreement'] == 1.0
        assert sidecar.parity[runtime]['score_diff_over_std'] <= 1e-3
    read = read_sidecar(tmp_path / 'u8.json')
    assert read.labels.dtype == 'uint8' and read.labels.resolution == 'stride4'
    assert read.outputs['labels'] == {'dtype': 'uint8', 'shape': [1, 64, 96],
                                      'resolution': 'stride4'}
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / 'u8.onnx'), providers=['CPUExecutionProvider'])
    assert {o.name: o.type for o in session.get_outputs()} == {
        'labels': 'tensor(uint8)', 'anomaly_score': 'tensor(float)'}
    image = road_like_images(1, 64, 96, seed=9)
    labels, _ = session.run(None, {'image': image.transpose(0, 3, 1, 2).astype(np.float32)})
    eager_labels, _ = _eager(model, image)
    np.testing.assert_array_equal(labels, eager_labels)


def test_label_output_requests_are_checked() -> None:
    with pytest.raises(ConfigError, match='unknown label dtype'):
        DeployModel(_rescaled_swiftnet(), 'DH', label_dtype='int64')
    with pytest.raises(ConfigError, match='--score-resolution stride4'):
        DeployModel(_rescaled_swiftnet(), 'DH', label_resolution='stride4')
    with pytest.raises(ConfigError, match='forward_features'):
        DeployModel(tiny_segmenter(), 'segmentation', label_resolution='stride4')
    # The segmentation-only graph (bench) takes stride-4 labels without a score resolution.
    seg = DeployModel(_rescaled_swiftnet(), 'segmentation', label_resolution='stride4')
    with torch.no_grad():
        labels, score = seg(torch.zeros(1, 3, 64, 96))
    assert labels.shape == score.shape == (1, 64, 96) and not score.any()


def _refuse(*args: object) -> None:
    raise AssertionError('an ONNX-only export must not touch the .pt2 path')


def test_onnx_only_export_replaces_a_full_artifact(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = DeployModel(tiny_segmenter(), 'DH')
    full = export_artifact(model, tmp_path / 'm', size=(64, 96), check_images=1)
    assert full.formats == ('onnx', 'pt2')
    assert full.parity['formats_checked'] == ['onnx', 'pt2']
    monkeypatch.setattr(export, '_export_pt2', _refuse)
    monkeypatch.setattr(export, '_pt2_runner', _refuse)
    sidecar = export_artifact(model, tmp_path / 'm', size=(64, 96), check_images=1,
                              thresholds={'tpr95': -3.0}, formats=('onnx',))
    # The .pt2 of the first export no longer belongs to m.onnx: it is gone, not left unlisted.
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m.json', 'm.onnx']
    assert read_sidecar(tmp_path / 'm.json') == sidecar
    assert sidecar.formats == ('onnx',) and not sidecar.has('pt2')
    document = json.loads((tmp_path / 'm.json').read_text())
    assert document['schema_version'] == 1 and list(document['files']) == ['onnx']
    parity = sidecar.parity
    assert parity['formats_checked'] == ['onnx'] and 'torch_export' not in parity
    assert parity['onnxruntime']['label_agreement'] >= 0.999
    assert parity['onnxruntime']['score_diff_over_std'] <= 1e-3
    assert parity['threshold'] == -3.0
    # The graph is the model: ONNX Runtime on a fresh image agrees with eager torch.
    import onnxruntime
    session = onnxruntime.InferenceSession(str(tmp_path / 'm.onnx'),
                                           providers=['CPUExecutionProvider'])
    image = road_like_images(1, 64, 96, seed=7)
    labels, score = session.run(['labels', 'anomaly_score'],
                                {'image': image.transpose(0, 3, 1, 2).astype(np.float32)})
    ref_labels, ref_score = _eager(model, image)
    assert np.mean(labels == ref_labels) >= 0.999
    np.testing.assert_allclose(score, ref_score, atol=1e-4)


def test_failed_onnx_only_export_keeps_the_full_artifact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = DeployModel(tiny_segmenter(), 'MSP')
    first = export_artifact(model, tmp_path / 'm', size=(64, 96), check_images=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    monkeypatch.setattr(export, '_onnx_runner', _zero_runner)
    monkeypatch.setattr(export, '_export_pt2', _refuse)
    with pytest.raises(ArtifactError, match='onnxruntime: labels agree') as error:
        export_artifact(model, tmp_path / 'm', size=(64, 96), check_images=1,
                        formats=('onnx',))
    assert 'torch_export' not in str(error.value)
    # Neither half an artifact nor a lost .pt2: every file as before.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert read_sidecar(tmp_path / 'm.json') == first


@pytest.mark.parametrize(('formats', 'message'), [
    ((), r'lack \['),
    (('pt2',), r"lack \['onnx'\].*--formats onnx"),
    (('onnx', 'tflite'), r"unknown export format\(s\) \['tflite'\]"),
])
def test_bad_formats_are_refused(tmp_path: Path, formats: tuple[str, ...],
                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        export_artifact(DeployModel(tiny_segmenter(), 'DH'), tmp_path / 'x', size=(64, 96),
                        formats=formats)
    _assert_nothing_written(tmp_path)


def test_formats_are_normalised() -> None:
    assert export.check_formats(('pt2', 'onnx', 'pt2')) == ('onnx', 'pt2')
    assert export.check_formats('onnx') == ('onnx',)
    assert export.check_formats(' onnx , pt2 ') == ('onnx', 'pt2')
