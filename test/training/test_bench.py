"""`anomaly-seg bench` on tiny artifacts: tables, ratios and timing helpers (no speed limits)."""

import argparse
import json
from pathlib import Path
import time

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from anomaly_seg_node import backends
from anomaly_seg_node.artifact import read_sidecar
from anomaly_seg_node.errors import ArtifactError, BackendError, ConfigError
from anomaly_seg_node.pipeline import OUTPUTS
from anomaly_seg_tools import bench
from training.export import DeployModel, export_artifact

SIZE = (64, 96)


class TinySegmenter(nn.Module):
    """Stand-in with SwiftNet's contract: RGB 0..255 -> full-size 'logits' / 'outlier_logits'."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(8, 12, 1)
        self.outlier = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x / 127.5 - 1.0)
        heads = {'logits': self.classifier(features) * 8.0,
                 'outlier_logits': self.outlier(features) * 8.0}
        return {k: F.interpolate(v, x.shape[-2:], mode='bilinear', align_corners=False)
                for k, v in heads.items()}


@pytest.fixture(scope='module')
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.json (DH) with the siblings tiny-segmentation and tiny-JSD; OP and OPxMS missing."""
    folder = tmp_path_factory.mktemp('artifacts')
    segmenter = TinySegmenter().eval()
    for stem, score in (('tiny', 'DH'), ('tiny-segmentation', 'segmentation'),
                        ('tiny-JSD', 'JSD')):
        thresholds = {} if score == 'segmentation' else {'tpr95': -1.0 if score == 'DH' else -0.3}
        export_artifact(DeployModel(segmenter, score), folder / stem, size=SIZE,
                        thresholds=thresholds, check_images=1)
    return folder / 'tiny.json'


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_measures_every_table_on_a_tiny_artifact(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / 'bench'
    report = bench.run(parse('--artifact', str(artifact), '--iterations', '3', '--warmup', '1',
                             '--frame-size', '96x144', '--encoding', 'bgr8', '--threads', '1',
                             '--out', str(out)))
    assert report['chosen']['backend'] == 'onnxruntime' and report['chosen']['device'] == 'cpu'
    assert report['threads'] == 1
    rows = report['graphs']['rows']
    assert list(rows) == ['segmentation', 'DH', 'JSD', 'fcn']
    for row in rows.values():
        assert row['samples'] == 3 and 0 < row['p10_ms'] <= row['median_ms'] <= row['p90_ms']
        assert row['fps'] == pytest.approx(1e3 / row['median_ms'])
    missing = report['graphs']['missing']
    assert [m.split(':')[0] for m in missing] == ['OP', 'OPxMS']
    assert all('--all-scores' in m for m in missing)
    # the reference FCN was built at the artifact size beside the report
    assert list(out.glob('resnet18_fcn_64x96_b1_k12.onnx'))

    keys = [(r['backend'], r['device'], r['precision']) for r in report['backends']]
    assert keys[0] == ('onnxruntime', 'cpu', 'fp32') and ('torch', 'cpu', 'fp32') in keys
    for row in report['backends']:
        assert row['fps'] > 0, row

    stages = report['stages']
    assert stages['frame_size'] == [96, 144] and stages['input_size'] == list(SIZE)
    assert stages['encoding'] == 'bgr8'
    expected = {'decode', 'resize', 'convert', 'infer', 'labels', 'upsample', 'threshold',
                'colour', 'overlay', 'plain_copy'} | {f'encode_{o}' for o in OUTPUTS}
    assert set(stages['median_ms']) == expected
    assert stages['copy_bytes'] == 96 * 144 * 9
    assert stages['outside_inference_ms'] > 0
    objects = stages['objects']
    assert objects['frame_size']['size'] == [96, 144]
    assert objects['artifact_size']['size'] == list(SIZE)
    assert objects['params'] == {'threshold': -1.0, 'merge_distance': 4, 'min_area_px': 50,
                                 'max_objects': 32, 'drivable_ids': [],
                                 'confidence': 'logistic'}
    for row in (objects['frame_size'], objects['artifact_size']):
        assert 0 < row['median_ms'] <= row['p90_ms']
        assert 0 <= row['flagged_share'] <= 1 and 0 <= row['objects'] <= 32

    ratios = report['ratios']
    for name, target in (('dh_vs_segmentation', 1.03), ('dh_vs_fcn', 1.45),
                         ('outside_vs_copy', 5.0)):
        assert ratios[name]['value'] > 0 and ratios[name]['target'] == target
        assert ratios[name]['met'] == (ratios[name]['value'] <= target)
        assert ratios[name]['p10'] <= ratios[name]['value'] <= ratios[name]['p90']

    saved = json.loads((out / 'bench.json').read_text())
    assert saved['ratios'] == json.loads(json.dumps(ratios))
    markdown = (out / 'bench.md').read_text()
    assert markdown == bench.format_markdown(report)
    for text in ('| DH |', 'plain ResNet-18 FCN (reference)', '## DH graph per backend',
                 '| decode * |', 'DH graph / segmentation-only graph', '| <= 1.45 |',
                 '## Anomaly objects per frame', '| frame size | 96x144 |',
                 '| artifact size | 64x96 |'):
        assert text in markdown
    assert markdown in bench.format_human(report)


def test_interleaved_rounds_rotate_and_use_the_clock() -> None:
    now = [0.0]
    order = []

    def runner(name: str, cost: float):
        def call() -> None:
            order.append(name)
            now[0] += cost
        return call

    runners = {'a': runner('a', 0.010), 'b': runner('b', 0.002), 'c': runner('c', 0.001)}
    times = bench.measure_interleaved(runners, warmup=2, iterations=3, clock=lambda: now[0])
    assert order[:6] == ['a', 'a', 'b', 'b', 'c', 'c']  # warm-up, untimed
    assert order[6:] == ['a', 'b', 'c', 'b', 'c', 'a', 'c', 'a', 'b']
    assert times['a'] == pytest.approx([10.0] * 3)
    assert times['b'] == pytest.approx([2.0] * 3) and times['c'] == pytest.approx([1.0] * 3)


def test_summary_and_paired_ratio_known_answers() -> None:
    summary = bench.summarize([10.0, 20.0, 30.0, 40.0, 50.0], batch=2)
    assert summary['median_ms'] == 30.0 and summary['fps'] == pytest.approx(2000 / 30)
    assert summary['p10_ms'] == pytest.approx(14.0) and summary['p90_ms'] == pytest.approx(46.0)
    assert summary['min_ms'] == 10.0 and summary['max_ms'] == 50.0
    assert summary['spread'] == pytest.approx(32.0 / 30.0)
    # paired: a load spike in round 2 slows both, the per-round ratio stays 1.1
    ratio = bench.paired_ratio([11.0, 110.0, 11.0], [10.0, 100.0, 10.0])
    assert ratio['value'] == pytest.approx(1.1) and ratio['p90'] == pytest.approx(1.1)
    with pytest.raises(ConfigError, match='no timing samples'):
        bench.summarize([])


def test_frame_stages_separate_the_graph_from_conversion(artifact: Path) -> None:
    segmenter = backends.load(artifact, 'onnxruntime')
    real = segmenter.session

    class SlowSession:
        def run(self, *args, **kwargs):
            time.sleep(0.03)
            return real.run(*args, **kwargs)

        def get_providers(self):
            return real.get_providers()

    segmenter.session = SlowSession()
    stages = bench.frame_stages(segmenter, SIZE, 'rgb8', warmup=0, iterations=2)
    assert stages['median_ms']['infer'] >= 30.0
    assert stages['median_ms']['convert'] < stages['median_ms']['infer']
    assert stages['median_ms']['resize'] < 5.0  # frame already at the artifact size
    assert stages['outside_stages'][-3:] == [
        'encode_semantic_mask', 'encode_anomaly_score', 'encode_anomaly_mask']
    assert len(stages['_outside_samples']) == len(stages['_copy_samples']) == 2


def test_frame_stages_time_the_objects_of_a_known_score(artifact: Path) -> None:
    """A score of 5 on one 20x30 block of a 96x144 frame (threshold -1 of the sidecar: 0 is
    below it): one object, 600 / 13824 pixels above the threshold; at the 64x96 artifact size
    the block is 2/3 as wide and high."""
    segmenter = backends.load(artifact, 'onnxruntime')
    real = segmenter.session

    class BlockSession:
        def run(self, names, feed, *args, **kwargs):
            outputs = real.run(names, feed, *args, **kwargs)
            score = np.full_like(outputs[1], -5.0)
            score[:, 30:50, 60:90] = 5.0  # network pixels of the 64x96 input
            return [outputs[0], score]

        def get_providers(self):
            return real.get_providers()

    segmenter.session = BlockSession()
    stages = bench.frame_stages(segmenter, (96, 144), 'rgb8', warmup=0, iterations=2)
    objects = stages['objects']
    assert objects['frame_size']['objects'] == objects['artifact_size']['objects'] == 1
    # the block is 30x45 frame pixels (bilinear edges aside) and 20x30 at the artifact size
    assert objects['frame_size']['flagged_share'] == pytest.approx(30 * 45 / (96 * 144),
                                                                   rel=0.1)
    assert objects['artifact_size']['flagged_share'] == pytest.approx(600 / (64 * 96),
                                                                      rel=0.1)


@pytest.mark.parametrize('backend, graph', [('onnxruntime', 'session'), ('torch', 'module')])
def test_frame_stages_leave_the_measured_backend_unchanged(artifact: Path, backend: str,
                                                           graph: str) -> None:
    segmenter = backends.load(artifact, backend)
    before = dict(vars(segmenter))
    probe = np.zeros((1, *SIZE, 3), np.uint8)
    expected = segmenter(probe)
    stages = bench.frame_stages(segmenter, SIZE, 'rgb8', warmup=0, iterations=2)
    assert stages['median_ms']['infer'] > 0  # the graph was timed, through a copy
    assert vars(segmenter).keys() == before.keys()
    assert all(vars(segmenter)[key] is value for key, value in before.items())
    assert type(getattr(segmenter, graph)).__name__ != '_TimedGraph'
    again = segmenter(probe)  # and runs as before
    np.testing.assert_array_equal(again.labels, expected.labels)
    np.testing.assert_array_equal(again.anomaly_score, expected.anomaly_score)


def test_compared_exports_run_in_the_same_rounds(artifact: Path, tmp_path: Path) -> None:
    segmenter = TinySegmenter().eval()
    export_artifact(DeployModel(segmenter, 'DH', label_dtype='uint8'), tmp_path / 'u8',
                    size=SIZE, thresholds={'tpr95': -1.0}, check_images=1, formats=('onnx',))
    report = bench.run(parse('--artifact', str(artifact), '--compare', str(tmp_path / 'u8.json'),
                             '--compare', str(tmp_path / 'u8.json'), '--backends', 'onnxruntime',
                             '--iterations', '4', '--warmup', '0', '--threads', '1'))
    assert list(report['compare']) == ['compare: u8', 'compare: u8 (2)']
    row = report['compare']['compare: u8']
    assert row['labels'] == {'dtype': 'uint8', 'resolution': 'input'}
    assert row['precision'] == 'fp32' and row['score'] == 'DH'
    assert report['labels'] == {'dtype': 'int32', 'resolution': 'input'}
    rows = report['graphs']['rows']
    assert rows['compare: u8']['samples'] == rows['DH']['samples'] == 4
    ratio = row['vs_artifact']
    assert ratio['p10'] <= ratio['value'] <= ratio['p90'] and ratio['value'] > 0
    assert '| u8 | fp32 | input | uint8 at input |' in bench.format_markdown(report)
    export_artifact(DeployModel(segmenter, 'DH'), tmp_path / 'small', size=(32, 48),
                    check_images=1, formats=('onnx',))
    with pytest.raises(ArtifactError, match=r'takes \(32, 48\).*one size'):
        bench.run(parse('--artifact', str(artifact), '--compare', str(tmp_path / 'small.json'),
                        '--iterations', '1'))
    with pytest.raises(ConfigError, match='cannot run on torch'):
        bench.run(parse('--artifact', str(artifact), '--compare', str(tmp_path / 'u8.json'),
                        '--backends', 'torch', '--iterations', '1'))


def test_siblings_must_match_and_bad_options_fail_clearly(artifact: Path,
                                                          tmp_path: Path) -> None:
    sidecar = read_sidecar(artifact)
    graphs, missing = bench.score_artifacts(sidecar)
    assert list(graphs) == ['segmentation', 'DH', 'JSD'] and len(missing) == 2
    # a sibling of another score under the name of JSD
    for stem in ('tiny', 'tiny-segmentation'):
        for suffix in ('.json', '.onnx', '.pt2'):
            name = f'{stem}{suffix}'
            (tmp_path / name).write_bytes(artifact.with_name(name).read_bytes())
    (tmp_path / 'tiny-JSD.json').write_bytes(
        artifact.with_name('tiny-segmentation.json').read_bytes())
    with pytest.raises(ArtifactError, match="expected 'JSD'"):
        bench.score_artifacts(read_sidecar(tmp_path / 'tiny.json'))
    # the right score, computed at another resolution than the main graph's
    document = json.loads(artifact.with_name('tiny-JSD.json').read_text())
    document['score']['resolution'] = 'stride4'
    (tmp_path / 'tiny-JSD.json').write_text(json.dumps(document))
    for suffix in ('.onnx', '.pt2'):
        (tmp_path / f'tiny-JSD{suffix}').write_bytes(
            artifact.with_name(f'tiny-JSD{suffix}').read_bytes())
    with pytest.raises(ArtifactError, match=r'\(stride4 resolution\); expected .*\(input'):
        bench.score_artifacts(read_sidecar(tmp_path / 'tiny.json'))
    with pytest.raises(ConfigError, match='unknown backend'):
        bench.run(parse('--artifact', str(artifact), '--backends', 'onnx'))
    with pytest.raises(ConfigError, match='--iterations'):
        bench.run(parse('--artifact', str(artifact), '--iterations', '0'))
    with pytest.raises(ArtifactError, match='does not exist'):
        bench.run(parse('--artifact', str(artifact), '--reference', str(tmp_path / 'x.onnx'),
                        '--iterations', '1'))
    with pytest.raises(SystemExit):
        parse('--artifact', 'a.json', '--frame-size', '12')


def test_cli_runs_bench_and_reports_errors(artifact: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from anomaly_seg_tools import cli

    monkeypatch.setitem(cli.COMMANDS, 'bench', ('anomaly_seg_tools.bench', 'Table II analogue'))
    assert cli.main(['--json', 'bench', '--artifact', str(artifact), '--iterations', '1',
                     '--warmup', '0', '--backends', 'onnxruntime', '--out', str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row['backend'] for row in report['backends']] == ['onnxruntime']
    assert report['written'] == [str(tmp_path / 'bench.json'), str(tmp_path / 'bench.md')]
    assert cli.main(['bench', '--artifact', str(tmp_path / 'none.json')]) == 2
    assert 'does not exist' in capsys.readouterr().err


def test_reference_fcn_is_a_plain_resnet18_with_a_1x1_classifier() -> None:
    from training.reference_fcn import ResNet18FCN

    model = ResNet18FCN(12).eval()
    # torchvision's ResNet-18 has 11,689,512 parameters, 513,000 of them in fc
    assert sum(p.numel() for p in model.parameters()) == 11_689_512 - 513_000 + 512 * 12 + 12
    image = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        features = model.trunk((image - model.mean) / model.std)
        labels = model(image)
    assert features.shape == (1, 512, 2, 3)  # stride 32
    assert labels.dtype == torch.int32 and labels.shape == (1, 64, 96)
    with pytest.raises(ConfigError, match='num_classes'):
        ResNet18FCN(0)


def test_bench_on_the_torch_backend_times_the_fcn_pair_in_onnxruntime(artifact: Path,
                                                                      tmp_path: Path) -> None:
    report = bench.run(parse('--artifact', str(artifact), '--backends', 'torch,onnxruntime',
                             '--iterations', '2', '--warmup', '1', '--out', str(tmp_path)))
    assert report['chosen'] == {'backend': 'torch', 'device': 'cpu', 'precision': 'fp32',
                                'reason': 'requested'}
    assert list(report['graphs']['rows']) == ['segmentation', 'DH', 'JSD']
    assert set(report['fcn_pair']) == {'DH', 'fcn'}  # the FCN ratio stays in one runtime
    assert report['ratios']['dh_vs_fcn']['runtime'] == 'onnxruntime'
    assert [r['backend'] for r in report['backends']] == ['torch', 'onnxruntime']
    stages = report['stages']
    assert stages['backend'] == 'torch' and stages['median_ms']['infer'] > 0
    assert '(onnxruntime cpu)' in bench.format_markdown(report)


# Artifacts without a .pt2 (anomaly-seg export --formats onnx) -------------------------------

NO_PT2 = 'this artifact ships no .pt2; re-export with anomaly-seg export --formats onnx,pt2'


def _fake_reference(path: Path) -> Path:
    """An ONNX file with the reference's input contract (the FCN itself is not under test)."""
    import onnx
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info('image', TensorProto.FLOAT, [1, 3, *SIZE])
    out = helper.make_tensor_value_info('out', TensorProto.FLOAT, [1, 3, *SIZE])
    graph = helper.make_graph([helper.make_node('Relu', ['image'], ['out'])], 'ref', [image],
                              [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]), str(path))
    return path


@pytest.fixture(scope='module')
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lite.json: DH without a .pt2; full.json: DH with both, its full-segmentation without."""
    folder = tmp_path_factory.mktemp('mixed')
    segmenter = TinySegmenter().eval()
    for stem, score, formats in (('lite', 'DH', ('onnx',)), ('full', 'DH', ('onnx', 'pt2')),
                                 ('full-segmentation', 'segmentation', ('onnx',))):
        export_artifact(DeployModel(segmenter, score), folder / stem, size=SIZE,
                        check_images=1, formats=formats)
    _fake_reference(folder / 'reference.onnx')
    return folder


def test_bench_skips_the_backends_an_onnx_only_artifact_cannot_run(mixed: Path) -> None:
    report = bench.run(parse('--artifact', str(mixed / 'lite.json'), '--backends',
                             'torch,onnxruntime', '--iterations', '1', '--warmup', '0',
                             '--reference', str(mixed / 'reference.onnx')))
    assert report['chosen'] == {'backend': 'onnxruntime', 'device': 'cpu', 'precision': 'fp32',
                                'reason': 'requested (torch skipped: the artifact ships no file '
                                          'they run)'}
    (skipped,) = report['skipped_backends']
    assert (skipped['backend'], skipped['device'], skipped['precision']) == \
        ('torch', 'cpu', 'fp32')
    assert skipped['why'].startswith(f'backend torch runs NAME.pt2, but {NO_PT2}')
    assert [r['backend'] for r in report['backends']] == ['onnxruntime']
    assert report['backends'][0]['fps'] > 0 and 'DH' in report['graphs']['rows']
    markdown = bench.format_markdown(report)
    assert f'- skipped torch (cpu, fp32): backend torch runs NAME.pt2, but {NO_PT2}' in markdown

    with pytest.raises(BackendError, match=r"none of the backends \['torch'\] can run this "
                                           r'artifact: backend torch runs NAME.pt2, but'):
        bench.run(parse('--artifact', str(mixed / 'lite.json'), '--backends', 'torch'))


def test_auto_lists_the_skipped_configurations(mixed: Path) -> None:
    lite = read_sidecar(mixed / 'lite.json')
    configs, reason, skipped = bench.backend_configs(lite, ['auto'], 'cpu', 'fp32')
    assert configs[0] == {'backend': 'onnxruntime', 'device': 'cpu', 'precision': 'fp32'}
    assert all(c['backend'] == 'onnxruntime' for c in configs)
    assert {'backend': 'torch', 'device': 'cpu', 'precision': 'fp32'} in \
        [{k: s[k] for k in ('backend', 'device', 'precision')} for s in skipped]
    assert all(NO_PT2 in s['why'] for s in skipped)
    full = read_sidecar(mixed / 'full.json')
    configs, _, skipped = bench.backend_configs(full, ['auto'], 'cpu', 'fp32')
    assert skipped == [] and {'backend': 'torch', 'device': 'cpu', 'precision': 'fp32'} in configs


def test_a_sibling_without_pt2_is_skipped_on_torch(mixed: Path) -> None:
    report = bench.run(parse('--artifact', str(mixed / 'full.json'), '--backends', 'torch',
                             '--iterations', '1', '--warmup', '0',
                             '--reference', str(mixed / 'reference.onnx')))
    assert report['chosen']['backend'] == 'torch' and report['skipped_backends'] == []
    assert list(report['graphs']['rows']) == ['DH']
    missing = report['graphs']['missing']
    assert any(m.startswith('segmentation: skipped on torch: backend torch runs NAME.pt2')
               and NO_PT2 in m for m in missing)
    assert report['ratios']['dh_vs_segmentation']['value'] is None
