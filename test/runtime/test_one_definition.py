"""One definition per concept: HxW size flags (training.cli_types), header stamps
(image_codec.stamp_ns), the table of the anomaly scores (training.score_info), the output
encodings (pipeline.ENCODINGS), the crop check (pipeline.check_crop), the Detection2DArray
builder (objects.detection_array), the parity bounds (metrics) and the segmenter interface
(backends.SegmenterProtocol). Torch-free: the sources are read as syntax trees."""

import argparse
import ast
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
import typing

import pytest

from anomaly_seg_node import (
    backends,
    build_engine,
    metrics,
    node_logic,
    node_params,
    objects,
    pipeline,
)
from anomaly_seg_node.image_codec import stamp_ns
from anomaly_seg_tools import cli
from training import config, evaluate
from training.cli_types import parse_size, size_arg
from training.score_info import (
    EVAL_SCORES,
    SCORE_INFO,
    SCORES,
    SEGMENTATION,
    TABLE_II_GRAPHS,
    is_tempered,
    needs_outlier_head,
    score_info,
)

# HxW sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(('text', 'size'), [('360x640', (360, 640)), ('720X1280', (720, 1280)),
                                            (' 64 x 96 ', (64, 96)), ('1x1', (1, 1))])
def test_parse_size(text: str, size: tuple[int, int]) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize('text', ['64by128', '360', '360x', 'x640', '-4x5', '3.5x4', '4x5x6',
                                  '', 'big'])
def test_parse_size_refuses_what_is_no_size(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as error:
        parse_size(text)
    assert str(error.value) == f'size must be HxW, e.g. 360x640, got {text!r}'


def test_size_minimum() -> None:
    with pytest.raises(argparse.ArgumentTypeError) as error:
        size_arg(32)('16x640')
    assert str(error.value) == ("size must be HxW with both sides >= 32 pixels, e.g. 360x640, "
                                "got '16x640'")
    assert size_arg(32)('32x32') == (32, 32)
    with pytest.raises(argparse.ArgumentTypeError, match='HxW, e.g.'):
        size_arg()('0x5')


@pytest.mark.parametrize(('argv', 'field', 'minimum'), [
    (['synth', 'dataset', '--out', 'x'], 'size', 1),
    (['synth', 'bag', '--out', 'x'], 'size', 1),
    (['export', '--random-init', '--out', 'x'], 'size', 32),
    (['bench', '--artifact', 'x.json'], 'frame_size', 1),
    (['demo'], 'size', 1),
])
def test_every_size_flag_parses_alike(argv: list[str], field: str, minimum: int,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    flag = '--frame-size' if field == 'frame_size' else '--size'
    parser = cli.build_parser([argv[0]])
    assert getattr(cli.parse_args(parser, [*argv, flag, ' 48 X 64 ']), field) == (48, 64)
    with pytest.raises(SystemExit):
        cli.parse_args(parser, [*argv, flag, '48by64'])
    assert 'size must be HxW' in capsys.readouterr().err
    if minimum > 1:
        with pytest.raises(SystemExit):
            cli.parse_args(parser, [*argv, flag, '16x64'])
        assert f'both sides >= {minimum} pixels' in capsys.readouterr().err


# Header stamps -----------------------------------------------------------------------------

def test_stamp_ns_of_rclpy_and_rosbags_headers() -> None:
    from rosbags.typesys import Stores, get_typestore

    types = get_typestore(Stores.ROS2_HUMBLE).types
    header = types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=1_700_000_000, nanosec=123_456_789),
        frame_id='camera')
    assert stamp_ns(header) == 1_700_000_000_123_456_789
    assert stamp_ns(SimpleNamespace(stamp=SimpleNamespace(sec=2, nanosec=5))) == 2 * 10**9 + 5
    assert stamp_ns(None) == stamp_ns(SimpleNamespace()) == 0
    assert node_logic.stamp_ns is stamp_ns  # the node and the replay share it


# Anomaly scores ----------------------------------------------------------------------------

def test_the_score_table_is_the_one_definition() -> None:
    assert SCORES == ('OP', 'OPxMS', 'DH', 'JSD', 'MSP', 'max_logit', 'energy')
    assert {n for n in SCORES if is_tempered(n)} == {'OP', 'OPxMS', 'JSD'}
    assert {n for n in SCORES if needs_outlier_head(n)} == {'OP', 'OPxMS', 'DH'}
    # tempered scores take T = 2 by default, as the paper evaluates them (methods.md §5)
    assert all(SCORE_INFO[n].default_temperature == 2.0 for n in SCORES if is_tempered(n))
    assert set(EVAL_SCORES) <= set(SCORES) and config.SCORES is EVAL_SCORES
    assert TABLE_II_GRAPHS[0] == SEGMENTATION and set(TABLE_II_GRAPHS[1:]) <= set(SCORES)
    assert not is_tempered(SEGMENTATION) and not needs_outlier_head(SEGMENTATION)
    assert score_info('DH').units == 'nats'


def test_evaluate_derives_temperatures_and_usable_scores_from_the_table() -> None:
    assert [evaluate.score_temperature(n, 3.0) for n in ('OP', 'OPxMS', 'JSD')] == [3.0] * 3
    assert [evaluate.score_temperature(n, 3.0) for n in ('DH', 'MSP', 'energy')] == [None] * 3
    assert evaluate.score_temperature('centre prior', 3.0) is None
    assert evaluate.usable_scores(EVAL_SCORES, False) == ['JSD', 'MSP']
    assert evaluate.usable_scores(EVAL_SCORES, True) == list(EVAL_SCORES)
    assert evaluate.parse_scores('DH,max_logit') == ['DH', 'max_logit']


# Definitions in the source -----------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(REPO / 'anomaly_seg_node').glob('*.py'),
                  *(REPO / 'anomaly_seg_tools').glob('*.py'),
                  *(REPO / 'training').rglob('*.py')])


def _trees() -> Iterator[tuple[str, ast.Module]]:
    for path in SOURCES:
        yield (str(path.relative_to(REPO)),
               ast.parse(path.read_text(encoding='utf-8'), filename=str(path)))


def defined_in(name: str) -> list[str]:
    """The files that bind `name` at module level (assignment, def or class)."""
    found = []
    for filename, tree in _trees():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            else:
                names = []
            if name in names:
                found.append(filename)
    return found


def files_where(predicate: typing.Callable[[ast.AST], bool]) -> set[str]:
    return {filename for filename, tree in _trees() if any(map(predicate, ast.walk(tree)))}


def _constant(node: ast.AST | None) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def test_the_output_encodings_are_defined_once() -> None:
    # training/synth/bag.py's ENCODINGS are the input encodings a synthetic bag may have
    assert [f for f in defined_in('ENCODINGS') if f != 'training/synth/bag.py'] == \
        ['anomaly_seg_node/pipeline.py']
    assert node_logic.ENCODINGS is pipeline.ENCODINGS
    assert set(pipeline.ENCODINGS) == set(pipeline.OUTPUTS)

    def pairs_score_with_32fc1(node: ast.AST) -> bool:
        if isinstance(node, ast.Dict):
            return any(_constant(k) == 'anomaly_score' and _constant(v) == '32FC1'
                       for k, v in zip(node.keys, node.values, strict=True))
        return isinstance(node, ast.Tuple) and [_constant(e) for e in node.elts] == [
            'anomaly_score', '32FC1']

    assert files_where(pairs_score_with_32fc1) == {'anomaly_seg_node/pipeline.py'}


def test_the_crop_is_checked_in_one_place() -> None:
    assert defined_in('check_crop') == ['anomaly_seg_node/pipeline.py']
    assert defined_in('_check_crop') == []

    def says_crop_rule(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and isinstance(node.value, str) and \
            'non-negative integers [top, bottom' in node.value

    assert files_where(says_crop_rule) == {'anomaly_seg_node/pipeline.py'}
    # the node's parameter and the pipeline say the same, each naming what was wrong
    with pytest.raises(Exception) as node_error:
        node_params.check_value('crop', [0, -1, 0, 0])
    with pytest.raises(Exception) as pipeline_error:
        pipeline.FramePipeline(SimpleNamespace(input_size=(4, 6)), ['a'], [(0, 0, 0)],
                               crop=[0, -1, 0, 0])
    assert str(node_error.value) == f'parameter {pipeline_error.value}'


def test_the_detection_array_is_built_in_one_place() -> None:
    def writes_a_box(node: ast.AST) -> bool:
        return (isinstance(node, ast.keyword) and node.arg == 'size_x') or (
            isinstance(node, ast.Attribute) and node.attr == 'size_x'
            and isinstance(node.ctx, ast.Store))

    assert files_where(writes_a_box) == {'anomaly_seg_node/objects.py'}
    for name in ('detection_array', 'OBJECT_CLASS_ID', 'OBJECTS_TOPIC'):
        assert defined_in(name) == ['anomaly_seg_node/objects.py'], name
    assert node_logic.OBJECTS_TOPIC == objects.OBJECTS_TOPIC


def test_the_parity_bounds_are_defined_once_in_the_runtime() -> None:
    bounds = {metrics.MIN_LABEL_AGREEMENT, metrics.MIN_MASK_AGREEMENT, metrics.MAX_DIFF_OVER_STD}
    assert bounds == {0.999, 0.995, 1e-3}
    for name in ('MIN_LABEL_AGREEMENT', 'MIN_MASK_AGREEMENT', 'MAX_DIFF_OVER_STD'):
        # training/quantize.py's MIN_* are int8's own, looser tolerances
        assert [f for f in defined_in(name) if f != 'training/quantize.py'] == \
            ['anomaly_seg_node/metrics.py'], name
    # no copy of a bound as a number in the export or the engine check
    literals = {0.999, 0.995, 1e-3, 1e-2}
    assert {f for f in files_where(lambda n: _constant(n) in literals)
            if f in ('training/export.py', 'anomaly_seg_node/build_engine.py')} == set()
    fp32 = build_engine.REQUIREMENTS['fp32']
    assert fp32['label_agreement'] == ('>=', metrics.MIN_LABEL_AGREEMENT)
    assert fp32['mask_agreement'] == ('>=', metrics.MIN_MASK_AGREEMENT)
    assert fp32['score_diff_over_std'] == ('<=', 10 * metrics.MAX_DIFF_OVER_STD)


def test_the_segmenter_interface_is_one_protocol() -> None:
    def segmenter_protocol(node: ast.AST) -> bool:
        return isinstance(node, ast.ClassDef) and 'Segmenter' in node.name and any(
            isinstance(b, ast.Name) and b.id == 'Protocol' for b in node.bases)

    assert files_where(segmenter_protocol) == {'anomaly_seg_node/backends.py'}
    # the backends' base derives from it explicitly, so mypy checks the two against each other
    assert backends.SegmenterProtocol in backends.Segmenter.__mro__
    assert not hasattr(pipeline, 'Segmenter')
    hints = typing.get_type_hints(pipeline.FramePipeline.__init__)
    assert hints['segmenter'] is backends.SegmenterProtocol
