"""The node's parameters without ROS: the params file, descriptors, checks and what is read
from the artifact (node_params)."""

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from anomaly_seg_node.errors import ArtifactError, ConfigError
from anomaly_seg_node.node_params import (
    PARAMS,
    SPECS,
    drivable_class_ids,
    resolve_artifact,
    validate_params,
)

REPO = Path(__file__).resolve().parents[2]


def test_params_yaml_lists_every_parameter_with_its_default() -> None:
    document = yaml.safe_load((REPO / 'config' / 'params.yaml').read_text())
    values = document['/**']['ros__parameters']
    assert set(values) == set(SPECS)
    for spec in PARAMS:
        assert values[spec.name] == spec.default, spec.name
        assert spec.description
    assert validate_params(values) == validate_params({})


def test_readme_table_lists_every_parameter_with_its_default_and_kind() -> None:
    readme = (REPO / 'README.md').read_text()
    table = readme.split('### Parameters', 1)[1].split('\n\n', 2)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip('|').split('|')]
        rows[cells[0].strip('`')] = cells
    assert list(rows) == [spec.name for spec in PARAMS]
    kinds = {'startup': 'read-only', 'configure': 'unconfigured', 'runtime': '**run time**'}
    for spec in PARAMS:
        default = rows[spec.name][1].strip('`')
        assert yaml.safe_load(default or "''") == spec.default, spec.name
        assert rows[spec.name][2] == kinds[spec.kind], spec.name


def test_descriptors_say_allowed_values_and_when_changes_apply() -> None:
    assert SPECS['backend'].constraints.startswith(
        'one of: auto, tensorrt, torch, onnxruntime; read at configure')
    assert SPECS['overlay_alpha'].constraints == 'from 0 to 1; changeable at run time'
    assert SPECS['autostart'].read_only and not SPECS['artifact'].read_only
    assert SPECS['anomaly_threshold'].dynamic_typing
    assert [s.name for s in PARAMS if s.kind == 'runtime'] == [
        'anomaly_threshold', 'overlay_alpha', 'objects_drivable_classes', 'objects_margin_px',
        'objects_merge_px', 'objects_min_area_px', 'objects_min_area_fraction', 'objects_max']
    # Integers get an IntegerRange in node.py and say their bounds as integers.
    assert SPECS['max_input_pixels'].integer and not SPECS['autostart'].integer
    assert SPECS['max_input_pixels'].constraints == (
        'from 1 to 268435456; read at configure; change it while unconfigured')
    assert SPECS['objects_max'].constraints == 'from 1 to 1000; changeable at run time'


def test_validate_params_converts_and_defaults() -> None:
    config = validate_params({'crop': [1, 2, 3, 4], 'max_input_age': 1, 'anomaly_threshold': 2,
                              'use_sim_time': True})
    assert config.crop == (1, 2, 3, 4)
    assert config.max_input_age == 1.0 and isinstance(config.max_input_age, float)
    assert config.anomaly_threshold == 2.0
    assert config.input_topic == 'image'
    assert validate_params({'input_transport': 'compressed'}).input_topic == 'image/compressed'


@pytest.mark.parametrize('name, value, words', [
    ('backend', 'cuda', 'one of auto, tensorrt, torch, onnxruntime'),
    ('device', 'cuda:0', 'one of auto, cpu, cuda'),
    ('input_reliability', 'RELIABLE', 'best_effort, reliable'),
    ('overlay_alpha', 1.5, 'from 0 to 1'),
    ('overlay_alpha', '0.5', 'must be a number'),
    ('max_input_age', -0.1, 'from 0 to 3600'),
    ('crop', [0, 0, 0], '4 non-negative integers'),
    ('crop', [0, -1, 0, 0], '4 non-negative integers'),
    ('crop', 'top', '4 integers'),
    ('crop', 4, '4 integers'),
    ('ort_threads', -1, 'from 0 to 1024'),
    ('ort_threads', 1.0, 'must be an integer'),
    ('ort_threads', True, 'must be an integer'),
    ('anomaly_threshold', math.nan, 'finite'),
    ('anomaly_threshold', True, 'a number or a threshold name'),
    ('autostart', 'yes', 'true or false'),
    ('resize_mode', 'fill', 'one of letterbox, crop_center, stretch'),
    ('artifact', 3, 'must be a string'),
    ('max_input_pixels', 0, 'from 1 to 268435456'),
    ('max_input_pixels', 2.0, 'must be an integer'),
    ('max_input_pixels', True, 'must be an integer'),
    ('objects_margin_px', -1, 'from 0 to 4096'),
    ('objects_max', 1001, 'from 1 to 1000'),
    ('objects_min_area_fraction', 0.6, 'from 0 to 0.5'),
    ('objects_drivable_classes', 'road', 'a list of class names'),
    ('objects_drivable_classes', ['road', 3], 'a list of class names'),
    ('objects_drivable_classes', ['none', 'road'], 'none stands alone'),
])
def test_validate_params_names_the_problem(name: str, value: Any, words: str) -> None:
    with pytest.raises(ConfigError, match=f'parameter {name}') as info:
        validate_params({name: value})
    assert words in str(info.value)


def test_overlap_stages_is_a_read_only_switch_off_by_default() -> None:
    spec = SPECS['overlap_stages']
    assert spec.default is False and spec.read_only and not spec.integer
    assert spec.constraints == 'read-only (set it at start)'
    assert validate_params({}).overlap_stages is False
    assert validate_params({'overlap_stages': True}).overlap_stages is True
    with pytest.raises(ConfigError, match='true or false'):
        validate_params({'overlap_stages': 3})


def test_resolve_artifact(tmp_path: Path) -> None:
    assert resolve_artifact('/a/b.json') == Path('/a/b.json')
    with pytest.raises(ArtifactError, match='artifact is empty.*artifact:=/path/NAME.json'):
        resolve_artifact('', tmp_path)
    (tmp_path / 'models').mkdir()
    (tmp_path / 'models' / 'demo.json').write_text('{}')
    assert resolve_artifact('', tmp_path) == tmp_path / 'models' / 'demo.json'


def test_drivable_class_ids() -> None:
    assert drivable_class_ids(['auto'], ['road', 'car']) == (0,)
    assert drivable_class_ids(['auto'], ['unlabeled', 'road line', 'road']) == (1, 2)
    assert drivable_class_ids(['auto'], ['r', 'g', 'b']) == ()  # no road: anywhere
    assert drivable_class_ids(['none'], ['road']) == drivable_class_ids([], ['road']) == ()
    assert drivable_class_ids(['car', 'road', 'car'], ['road', 'car']) == (0, 1)
    with pytest.raises(ConfigError, match=r"names \['sky'\].*choose among road, car"):
        drivable_class_ids(['sky'], ['road', 'car'])
    demo = yaml.safe_load((REPO / 'models' / 'demo.json').read_text())
    assert [demo['classes'][i] for i in drivable_class_ids(['auto'], demo['classes'])] == [
        'road']  # CamVid's 11 classes


