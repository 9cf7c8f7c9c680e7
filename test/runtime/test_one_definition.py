"""One definition per concept: HxW size flags (training.cli_types), header stamps
(image_codec.stamp_ns) and the table of the anomaly scores (training.score_info). Torch-free."""

import argparse
from types import SimpleNamespace

import pytest

from anomaly_seg_node import node_logic
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
