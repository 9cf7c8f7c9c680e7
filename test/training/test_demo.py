"""`anomaly-seg demo` end to end on a tiny exported model: outputs, table, model card; the real
drive (the committed CamVid sample with pasted anomalies) and the synthetic street."""

import argparse
import json
from pathlib import Path

import cv2
import pytest
from test_export import tiny_segmenter

from anomaly_seg_node.errors import ConfigError
from anomaly_seg_tools import cli, demo
from training.export import DeployModel, export_artifact

FRAMES = 6  # of the committed sample, each with pasted anomalies
DRIVE = ['--frames', str(FRAMES), '--no-progress']
SYNTHETIC_FRAMES = 10  # seed 0: every frame has anomaly pixels (a 6-frame drive has none)
SYNTHETIC = ['--synthetic', '--frames', str(SYNTHETIC_FRAMES), '--size', '72x128']
PRIOR = 'centre prior (ignores the image)'


@pytest.fixture(scope='module')
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp('models')
    out = {}
    for score in ('DH', 'MSP'):
        sidecar = export_artifact(DeployModel(tiny_segmenter(), score), folder / f'tiny-{score}',
                                  size=(48, 64), check_images=1, formats=('onnx',))
        out[score] = Path(sidecar.source)
    return out


def _demo(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert cli.main(['--json', 'demo', *DRIVE, *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_demo_writes_every_output_and_the_table(artifacts: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / 'demo'
    report = _demo(capsys, '--artifact', str(artifacts['DH']), '--out', str(out))
    for name in ('metrics.json', 'summary.md', 'frames.jsonl', 'overlay.mp4',
                 'contact_sheet.png', 'pr_curves.png', 'roc_curves.png', 'drive/paste.json'):
        assert (out / name).is_file(), name
    assert report['bag']['kind'].startswith('real') and report['bag']['size'] == [360, 480]
    assert len(list((out / 'drive' / 'test').iterdir())) == FRAMES
    assert cv2.imread(str(out / 'contact_sheet.png')).shape[1] == 3 * 320 + 8
    video = cv2.VideoCapture(str(out / 'overlay.mp4'))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
    metrics = json.loads((out / 'metrics.json').read_text())
    table = report['table']
    assert metrics['demo'] == table
    share = metrics['metrics']['anomaly_pixel_share']
    assert table['anomaly_pixel_share'] == share and 0 < share < 0.5
    assert list(table['rows']) == ['DH (this model)', PRIOR]
    row, prior = table['rows'].values()
    assert row['ap'] == metrics['metrics']['per_image']['ap']
    assert metrics['metrics']['labels'] == 'CamVid ids'
    assert 0 < prior['ap'] < 1 and prior['miou'] is None
    checks = {c['what']: c['met'] for c in table['checks']}
    assert checks == {'per-image AP >= 10 x anomaly pixel share': row['ap'] >= 10 * share,
                      f'per-image AP above {PRIOR}': row['ap'] > prior['ap'],
                      f'FPR95 below {PRIOR}': row['fpr95'] < prior['fpr95']}
    assert 'no model card' in table['note']
    summary = (out / 'summary.md').read_text()
    assert summary.startswith('# anomaly-seg demo')
    assert '| chance (anomaly pixel share) |' in summary and '# anomaly-seg replay' in summary
    human = demo.format_human(report)
    assert '| DH (this model) |' in human and 'contact_sheet' in human
    # the component figures of the replay, printed under the table
    components = metrics['metrics']['components']
    figures = table['components']
    assert figures['siou'] == components['mask']['siou']
    assert figures['f1_mean'] == components['mask']['f1_mean']
    assert figures['recall'] == components['boxes']['recall']
    assert figures['objects_per_frame'] == components['boxes']['objects_per_frame']
    assert figures['threshold'] == metrics['artifact']['threshold']
    line = demo.component_line(figures)
    assert line in human and line in summary
    assert human.index('| chance (anomaly pixel share) |') < human.index(line)
    name = metrics['artifact']['threshold_name']
    where = (f'the default threshold ({name} = ' if name else 'the threshold ') + \
        f'{figures["threshold"]:.4g}'
    assert line.startswith(f'Components at {where}'), line
    assert f'mean F1 {100 * figures["f1_mean"]:.2f}; objects: recall ' in line
    assert f'at box IoU ≥ 0.5, {figures["objects_per_frame"]:.2f} per frame.' in line


def test_baseline_card_is_written_then_printed(artifacts: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    card = tmp_path / 'tiny-DH.card.json'
    built = _demo(capsys, '--artifact', str(artifacts['DH']), '--out', str(tmp_path / 'a'),
                  '--baseline', str(artifacts['MSP']), '--card', str(card))
    assert list(built['table']['rows']) == ['DH (this model)', PRIOR, 'MSP (same checkpoint)']
    assert [c['what'] for c in built['table']['checks']][3] == \
        'per-image AP above MSP (same checkpoint)'
    document = json.loads(card.read_text())
    assert document['drive'] == {'sample': 'camvid', 'frames': FRAMES, 'seed': 0}

    later = _demo(capsys, '--artifact', str(artifacts['DH']), '--out', str(tmp_path / 'b'),
                  '--card', str(card), '--baseline', str(artifacts['MSP']))
    assert later['table']['rows'] == built['table']['rows']  # deterministic replay
    # Without --baseline the card beside the artifact is read.
    beside = artifacts['DH'].with_name('tiny-DH.card.json')
    beside.write_text(card.read_text())
    try:
        shown = _demo(capsys, '--artifact', str(artifacts['DH']), '--out', str(tmp_path / 'c'))
        rows = shown['table']['rows']
        assert rows['MSP (same checkpoint), measured at build'] == \
            built['table']['rows']['MSP (same checkpoint)']
        assert 'measured when the model was built' in shown['table']['note']
        other = _demo(capsys, '--artifact', str(artifacts['DH']), '--out', str(tmp_path / 'd'),
                      '--seed', '1')
        assert list(other['table']['rows']) == ['DH (this model)', PRIOR]
        assert 'another artifact or drive' in other['table']['note']
        beside.write_text('{not json')
        broken = _demo(capsys, '--artifact', str(artifacts['DH']), '--out', str(tmp_path / 'e'))
        assert 'unreadable' in broken['table']['note']
    finally:
        beside.unlink()


def test_component_line_known_answers() -> None:
    figures = {'threshold': -6.453124523162842, 'threshold_name': 'fpr1', 'siou': 0.25,
               'ppv': 0.5, 'f1_mean': 0.125, 'iou_threshold': 0.5, 'recall': 0.75,
               'precision': 0.6, 'objects_per_frame': 2.5}
    assert demo.component_line(figures) == (
        'Components at the default threshold (fpr1 = -6.453): sIoU 25.00, PPV 50.00, mean F1 '
        '12.50; objects: recall 75.00, precision 60.00 at box IoU ≥ 0.5, 2.50 per frame.')
    # a drive without anomalies has no sIoU or recall; a threshold without a name
    none = {**figures, 'threshold_name': None, 'siou': None, 'recall': None, 'f1_mean': None}
    assert demo.component_line(none) == (
        'Components at the threshold -6.453: sIoU n/a, PPV 50.00, mean F1 n/a; objects: recall '
        'n/a, precision 60.00 at box IoU ≥ 0.5, 2.50 per frame.')
    assert demo.component_figures({'metrics': {'skipped': 'no labels'}}) is None


def test_card_needs_a_baseline_and_a_missing_artifact_is_skipped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(['--out', str(tmp_path / 'x'), '--card', str(tmp_path / 'c.json')])
    with pytest.raises(ConfigError, match='--card needs --baseline'):
        demo.run(args)
    report = _demo(capsys, '--artifact', str(tmp_path / 'none.json'), '--out',
                   str(tmp_path / 'y'))
    assert report['replay'].startswith('skipped: no artifact')
    assert (tmp_path / 'y' / 'drive_bag').is_dir()


def test_synthetic_drive_replays_the_procedural_street(
        artifacts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _demo(capsys, *SYNTHETIC, '--artifact', str(artifacts['DH']), '--out',
                   str(tmp_path))
    assert report['bag']['kind'] == 'synthetic' and report['bag']['size'] == [72, 128]
    assert (tmp_path / 'preview.png').is_file() and report['files']['preview']
    assert list(report['table']['rows']) == ['DH (this model)']  # no centre prior row
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert metrics['metrics']['labels'] == 'StreetHazards raw ids'
    video = cv2.VideoCapture(str(tmp_path / 'overlay.mp4'))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == SYNTHETIC_FRAMES


def test_drive_without_anomalies_reports_no_bar(artifacts: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(['--json', 'demo', '--synthetic', '--frames', '6', '--size', '72x128',
                     '--no-progress', '--artifact', str(artifacts['DH']), '--out',
                     str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['table']['checks'] == [] and report['files']['plots'] == []
    assert report['table']['rows']['DH (this model)']['ap'] is None
