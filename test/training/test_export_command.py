"""`anomaly-seg export`: random-init and checkpoint exports, calibration with known answers."""

import argparse
from pathlib import Path
import types

import cv2
import numpy as np
import pytest
import torch

from anomaly_seg_node import backends
from anomaly_seg_node.artifact import read_sidecar
from anomaly_seg_node.check_images import road_like_images
from anomaly_seg_node.errors import ArtifactError, ConfigError, DataError
from anomaly_seg_node.metrics import threshold_at_fpr, threshold_at_tpr
from training import calibration, export_command
from training.checkpoint import FORMAT, VERSION, save_checkpoint
from training.config import load_config
from training.export import DeployModel
from training.networks.swiftnet import SwiftNet

CONFIGS = Path(__file__).resolve().parents[2] / 'training' / 'configs'
# PooledOOD with calibration.POOL_BITS bins: relative bin width 2**-(bits - 9).
BIN = 2.0 ** -(calibration.POOL_BITS - 9)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    export_command.add_arguments(parser)
    return parser.parse_args([*argv, '--no-progress'])


def rescaled_swiftnet(num_classes: int = 12, seed: int = 0) -> SwiftNet:
    """Random SwiftNet whose heads are widened so several classes and a spread of scores appear."""
    torch.manual_seed(seed)
    model = SwiftNet(num_classes, outlier_head=True)
    with torch.no_grad():
        model.class_head.conv.weight.mul_(4.0)
        model.outlier_head.conv.weight.mul_(4.0)
    return model.eval()


def eager_scores(model: torch.nn.Module, images: np.ndarray, score: str = 'DH',
                 resolution: str = 'stride4') -> np.ndarray:
    """The deploy graph's scores; 'stride4' is the export's default score resolution."""
    deploy = DeployModel(model, score, score_resolution=resolution)
    with torch.no_grad():
        _, scores = deploy(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    return scores.numpy()


def test_random_init_export_falls_back_to_named_synthetic_quantiles(tmp_path: Path) -> None:
    args = parse('--random-init', '--config', str(CONFIGS / 'densehybrid.yaml'),
                 '--out', str(tmp_path / 'rn18'), '--size', '64x96')
    report = export_command.run(args)
    sidecar = read_sidecar(tmp_path / 'rn18.json')
    assert report['artifact'] == str(tmp_path / 'rn18.json')
    assert (tmp_path / 'rn18.onnx').is_file() and (tmp_path / 'rn18.pt2').is_file()
    assert sidecar.score.name == 'DH' and sidecar.input_size == (64, 96)
    assert sidecar.method == 'densehybrid' and len(sidecar.classes) == 12
    # no data: quantiles of synthetic road images, never called tpr95/fpr1
    assert set(sidecar.thresholds) == {'synthetic_q95', 'synthetic_q99', 'synthetic_q99.9'}
    assert sidecar.default_threshold == 'synthetic_q99'
    assert sidecar.training['untrained'] is True
    assert 'not calibrated' in sidecar.training['calibration']['warning']
    assert any('synthetic road images' in note for note in report['notes'])
    # known answer: the same untrained network scored on the same synthetic images
    torch.manual_seed(0)
    model = SwiftNet(12, outlier_head=True).eval()
    scores = eager_scores(model, road_like_images(4, 64, 96, seed=1))
    for name, rate in (('synthetic_q95', 0.05), ('synthetic_q99', 0.01),
                       ('synthetic_q99.9', 0.001)):
        exact = threshold_at_fpr(scores, rate)
        assert exact <= sidecar.thresholds[name] <= exact + BIN * abs(exact) + 1e-30
        assert np.mean(scores > sidecar.thresholds[name]) <= rate
    # the artifact in ONNX Runtime is the network that was scored
    frame = road_like_images(1, 64, 96, seed=9)
    result = backends.load(sidecar, 'onnxruntime')(frame)
    np.testing.assert_allclose(result.anomaly_score, eager_scores(model, frame),
                               atol=1e-3 * scores.std())
    for runtime in ('onnxruntime', 'torch_export'):
        assert sidecar.parity[runtime]['label_agreement'] >= 0.999


def _write_tree(root: Path, split_dir: str, town: str, images: list[np.ndarray],
                labels: list[np.ndarray]) -> None:
    top, sub = split_dir.split('/')
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        for kind, array in (('images', cv2.cvtColor(image, cv2.COLOR_RGB2BGR)),
                            ('annotations', label)):
            folder = root / top / kind / sub / town
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f'{index:03d}.png'), array)


class BrightnessScores:
    """ScoreMaps stand-in: score 1 where the pixel is bright (> 128), 0 elsewhere."""

    scores = ['DH']

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        return {'DH': (image.mean(axis=2) > 128).astype(np.float32)}


def test_pasted_negative_calibration_has_known_thresholds(tmp_path: Path) -> None:
    # Validation: dark road images (raw id 8) with an "other" strip (raw 4, ignored);
    # negatives: bright ADE20k-layout crops. Pasted pixels score 1, inliers 0.
    label = np.full((64, 128), 8, np.uint8)
    label[:, :8] = 4
    _write_tree(tmp_path / 'sh', 'train/validation', 't4',
                [np.full((64, 128, 3), 40, np.uint8)] * 3, [label] * 3)
    ade = tmp_path / 'ade'
    (ade / 'images' / 'training').mkdir(parents=True)
    (ade / 'annotations' / 'training').mkdir(parents=True)
    for index in range(2):
        cv2.imwrite(str(ade / 'images' / 'training' / f'{index}.jpg'),
                    np.full((80, 80, 3), 230, np.uint8))
        ade_label = np.zeros((80, 80), np.uint8)
        ade_label[20:60, 10:50] = 7
        cv2.imwrite(str(ade / 'annotations' / 'training' / f'{index}.png'), ade_label)
    result = calibration.calibrate_on_data(
        BrightnessScores(), (64, 128), val_root=tmp_path / 'sh', mapping='densehybrid12',
        ade_root=ade, ade_crop=384, progress=False)
    thresholds = result.thresholds['DH']
    assert result.default_threshold == 'fpr1'
    assert thresholds['tpr95'] == 1.0  # the lower edge of the bin of 1.0 is 1.0 itself
    assert 0.0 < thresholds['fpr1'] < 1e-30 and 0.0 < thresholds['fpr0.1'] < 1e-30
    pixels = result.info['pixels']
    assert pixels['inlier_fpr'] == 3 * 64 * 120  # the ignored strip is not counted
    assert 0 < pixels['anomaly'] <= 3 * 32 * 32  # crops of half the shorter side (32)
    assert 'pasted into the validation split' in result.info['tpr95']
    assert result.parity_images.shape == (2, 64, 128, 3)


def test_pasted_negative_calibration_without_negatives_names_the_fix(tmp_path: Path) -> None:
    label = np.full((64, 128), 8, np.uint8)
    _write_tree(tmp_path / 'sh', 'train/validation', 't4', [np.zeros((64, 128, 3), np.uint8)],
                [label])
    with pytest.raises(DataError, match='--calibration-data'):
        calibration.calibrate_on_data(BrightnessScores(), (64, 128), val_root=tmp_path / 'sh',
                                      mapping='densehybrid12', ade_root=tmp_path / 'none',
                                      progress=False)


def _checkpoint(path: Path, model: SwiftNet, data_root: Path) -> Path:
    cfg = load_config(CONFIGS / 'densehybrid.yaml', [f'data.root={data_root}',
                                                     f'negatives.ade_root={data_root}/ade'])
    return save_checkpoint({
        'format': FORMAT, 'version': VERSION, 'code_version': 'test', 'method': cfg.method,
        'config': cfg.to_dict(), 'step': 7, 'epoch': 1, 'finished': True,
        'segmenter': {'config': model.config(), 'state': model.state_dict()}, 'flow': None,
    }, path)


def recording_export(calls: list) -> object:
    """export_artifact stand-in that records its arguments (the real one: test_export.py)."""

    def export(model, stem, **kwargs):
        calls.append({'stem': Path(stem), 'score': model.score_name,
                      'resolution': model.score_resolution,
                      'temperature': model.temperature, **kwargs})
        parity = {'label_agreement': 1.0, 'mask_agreement': 1.0, 'score_diff_over_std': 0.0}
        return types.SimpleNamespace(thresholds=kwargs['thresholds'],
                                     parity={'onnxruntime': parity, 'torch_export': parity})
    return export


@pytest.mark.parametrize('resolution', ['stride4', 'input'])
def test_checkpoint_export_calibrates_on_a_labelled_split(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          resolution: str) -> None:
    calls: list = []
    monkeypatch.setattr('training.export.export_artifact', recording_export(calls))
    rng = np.random.default_rng(0)
    model = rescaled_swiftnet()
    size = (64, 96)
    # Labelled split (test, raw 14 = anomaly, 4 = ignored) and a validation split, both at a
    # larger size than the artifact, so calibration must resize them.
    test_images = [rng.integers(0, 256, (96, 144, 3), dtype=np.uint8) for _ in range(2)]
    test_labels = []
    for _ in range(2):
        label = np.full((96, 144), 8, np.uint8)
        label[30:60, 40:90] = 14
        label[:10] = 4
        test_labels.append(label)
    _write_tree(tmp_path / 'cal', 'test/test', 't5', test_images, test_labels)
    val_images = [road_like_images(1, 96, 144, seed=s)[0] for s in (3, 4)]
    val_labels = [np.full((96, 144), 9, np.uint8)] * 2
    val_labels[0] = val_labels[0].copy()
    val_labels[0][:, :20] = 4
    _write_tree(tmp_path / 'cal', 'train/validation', 't4', val_images, val_labels)
    ckpt = _checkpoint(tmp_path / 'final.pt', model, tmp_path / 'no_data_here')

    report = export_command.run(parse('--checkpoint', str(ckpt), '--out',
                                      str(tmp_path / 'trained'), '--size', '64x96',
                                      '--calibration-data', str(tmp_path / 'cal'),
                                      '--score-resolution', resolution))
    (call,) = calls
    thresholds, metadata = call['thresholds'], call['metadata']
    assert call['stem'] == tmp_path / 'trained' and call['score'] == 'DH'
    assert call['resolution'] == resolution == report['score_resolution']
    assert call['size'] == (64, 96) and call['batch'] == 1
    assert report['calibration'] == 'labelled split' and 'notes' not in report
    assert set(thresholds) == {'tpr95', 'fpr1', 'fpr0.1'}
    assert metadata['default_threshold'] == 'fpr1' and metadata['method'] == 'densehybrid'
    assert metadata['pad_mode'] == 'reflect'  # the default; same aspect here, so no bars
    training = metadata['training']
    assert training['step'] == 7 and training['untrained'] is False
    assert training['config']['data']['root'] == str(tmp_path / 'no_data_here')
    assert training['calibration']['images'] == {'tpr95': 2, 'fpr': 2}
    assert training['calibration']['pad_mode'] == 'reflect'

    def at_size(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (cv2.resize(image, size[::-1], interpolation=cv2.INTER_AREA),
                cv2.resize(label, size[::-1], interpolation=cv2.INTER_NEAREST_EXACT))

    test = [at_size(i, lab) for i, lab in zip(test_images, test_labels, strict=True)]
    scores = eager_scores(model, np.stack([i for i, _ in test]), resolution=resolution)
    raw = np.stack([lab for _, lab in test])
    ood = np.where(raw == 14, 1, np.where(raw == 4, 2, 0))
    exact_tpr = threshold_at_tpr(scores, ood)
    assert exact_tpr - BIN * abs(exact_tpr) <= thresholds['tpr95'] <= exact_tpr
    val = [at_size(i, lab) for i, lab in zip(val_images, val_labels, strict=True)]
    val_scores = eager_scores(model, np.stack([i for i, _ in val]), resolution=resolution)
    inlier = np.stack([lab for _, lab in val]) != 4
    for name, rate in (('fpr1', 0.01), ('fpr0.1', 0.001)):
        exact = threshold_at_fpr(val_scores[inlier], rate)
        assert exact <= thresholds[name] <= exact + BIN * abs(exact) + 1e-30
    # the parity check also runs on calibration images of this model, at the artifact size
    np.testing.assert_array_equal(call['calibration_images'], np.stack([i for i, _ in test]))


def test_checkpoint_without_reachable_data_names_the_fixes(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / 'final.pt', rescaled_swiftnet(), tmp_path / 'missing')
    with pytest.raises(DataError, match='--calibration-data DIR') as error:
        export_command.run(parse('--checkpoint', str(ckpt), '--out', str(tmp_path / 'x'),
                                 '--size', '64x96'))
    assert '--synthetic-thresholds' in str(error.value)
    assert not (tmp_path / 'x.json').exists()


def test_all_scores_writes_the_siblings_the_network_supports(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    calls: list = []
    monkeypatch.setattr('training.export.export_artifact', recording_export(calls))
    report = export_command.run(parse('--random-init', '--config',
                                      str(CONFIGS / 'densehybrid.yaml'), '--out',
                                      str(tmp_path / 'm'), '--size', '32x64', '--all-scores',
                                      '--batch', '2'))
    assert [c['stem'].name for c in calls] == ['m', 'm-segmentation', 'm-OP', 'm-OPxMS', 'm-JSD']
    assert [c['score'] for c in calls] == ['DH', 'segmentation', 'OP', 'OPxMS', 'JSD']
    # eval.temperature 2 for OP, OPxMS and JSD; none for DH
    assert [c['temperature'] for c in calls] == [None, None, 2.0, 2.0, 2.0]
    defaults = [c['metadata']['default_threshold'] for c in calls]
    assert defaults == ['synthetic_q99', None] + ['synthetic_q99'] * 3
    assert calls[1]['thresholds'] == {}  # no thresholds for the zero score
    assert all(c['size'] == (32, 64) and c['batch'] == 2 for c in calls)
    assert report['artifacts']['OP'] == str(tmp_path / 'm-OP.json')

    calls.clear()
    report = export_command.run(parse('--random-init', '--config',
                                      str(CONFIGS / 'closed_set.yaml'), '--out',
                                      str(tmp_path / 'c'), '--size', '32x64', '--all-scores'))
    assert [c['score'] for c in calls] == ['MSP', 'segmentation', 'JSD']
    assert len(report['skipped']) == 3 and all('outlier head' in s for s in report['skipped'])


def test_bad_arguments_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='--config'):
        export_command.run(parse('--random-init', '--out', str(tmp_path / 'x')))
    with pytest.raises(ConfigError, match='outlier head'):
        export_command.run(parse('--random-init', '--config', str(CONFIGS / 'closed_set.yaml'),
                                 '--out', str(tmp_path / 'x'), '--score', 'DH'))
    with pytest.raises(ConfigError, match='unknown anomaly score'):
        export_command.run(parse('--random-init', '--config', str(CONFIGS / 'densehybrid.yaml'),
                                 '--out', str(tmp_path / 'x'), '--score', 'nope'))
    with pytest.raises(ArtifactError, match='does not exist'):
        export_command.run(parse('--checkpoint', str(tmp_path / 'none.pt'), '--out',
                                 str(tmp_path / 'x')))
    with pytest.raises(SystemExit):
        parse('--random-init', '--checkpoint', 'a.pt', '--out', 'x')
    with pytest.raises(SystemExit):  # sizes below 32 pixels: training.cli_types
        parse('--random-init', '--out', 'x', '--size', '16x64')
    assert parse('--random-init', '--out', 'x', '--size', '360x640').size == (360, 640)
    assert not list(tmp_path.iterdir())


def test_cli_runs_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    from anomaly_seg_tools import cli

    monkeypatch.setattr('training.export.export_artifact', recording_export([]))
    monkeypatch.setitem(cli.COMMANDS, 'export', ('training.export_command', 'export'))
    assert cli.main(['export', '--random-init', '--config', str(CONFIGS / 'nflowjs.yaml'),
                     '--out', str(tmp_path / 'j'), '--size', '32x64', '--no-progress']) == 0
    out = capsys.readouterr().out
    assert (f'exported {tmp_path / "j.json"} (score JSD at stride4 resolution, 32x64, batch 1)'
            in out)
    assert 'NOTE: no calibration data' in out
    assert cli.main(['export', '--random-init', '--out', str(tmp_path / 'j')]) == 2
    assert '--config' in capsys.readouterr().err


def test_formats_onnx_exports_every_graph_without_pt2(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    monkeypatch.setattr('training.export.export_artifact', recording_export(calls))
    default = export_command.run(parse('--random-init', '--config',
                                       str(CONFIGS / 'densehybrid.yaml'), '--out',
                                       str(tmp_path / 'm'), '--size', '32x64'))
    assert calls[0]['formats'] == ('onnx', 'pt2') and default['formats'] == ['onnx', 'pt2']
    assert set(default['parity']['DH']) == {'onnxruntime', 'torch_export'}
    calls.clear()
    report = export_command.run(parse('--random-init', '--config',
                                      str(CONFIGS / 'densehybrid.yaml'), '--out',
                                      str(tmp_path / 'm'), '--size', '32x64', '--all-scores',
                                      '--formats', 'onnx'))
    assert len(calls) == 5 and all(c['formats'] == ('onnx',) for c in calls)
    assert report['formats'] == ['onnx']
    # Only what was checked is reported (the stand-in returns both blocks).
    assert all(set(p) == {'onnxruntime'} for p in report['parity'].values())
    assert any('--formats onnx: no NAME.pt2' in note for note in report['notes'])
    human = export_command.format_human(report)
    assert 'formats: onnx\n' in human and 'torch_export' not in human
    assert 'NOTE: --formats onnx: no NAME.pt2' in human


def test_formats_option_is_checked() -> None:
    assert parse('--random-init', '--out', 'x').formats == ('onnx', 'pt2')
    assert parse('--random-init', '--out', 'x', '--formats', 'pt2,onnx').formats == \
        ('onnx', 'pt2')
    assert parse('--random-init', '--out', 'x', '--formats', 'onnx').formats == ('onnx',)
    for bad in ('pt2', 'onnx,tflite', ''):
        with pytest.raises(argparse.ArgumentTypeError, match='formats must be onnx or onnx,pt2'):
            export_command.parse_formats(bad)
        with pytest.raises(SystemExit):
            parse('--random-init', '--out', 'x', '--formats', bad)
    args = parse('--random-init', '--out', 'x')
    args.formats = ('pt2',)
    with pytest.raises(ConfigError, match='every artifact ships NAME.onnx'):
        export_command.run(args)
