"""The sidecar reader and writer, without torch: round trip, every malformed case, thresholds."""

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest

from anomaly_seg_node.artifact import (
    FileRef,
    InputSpec,
    LabelOutput,
    ScoreSpec,
    Sidecar,
    read_sidecar,
    resolve_threshold,
    write_sidecar,
)
from anomaly_seg_node.errors import ArtifactError

ONNX_BYTES = b'not really onnx, but hashed like it'
PT2_BYTES = b'not really a pt2 archive either'


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sidecar() -> Sidecar:
    return Sidecar(
        method='DenseHybrid',
        score=ScoreSpec(name='DH', units='nats', temperature=None),
        input=InputSpec(height=8, width=12, batch=2),
        classes=('road', 'car', 'sky'),
        palette=((128, 64, 128), (0, 0, 142), (70, 130, 180)),
        files={'onnx': FileRef('m.onnx', _sha(ONNX_BYTES)),
               'pt2': FileRef('m.pt2', _sha(PT2_BYTES))},
        void_id=255,
        thresholds={'tpr95': -2.5, 'fpr1': 1.25, 'fpr0.1': 3.0},
        default_threshold='tpr95',
        parity={'onnxruntime': {'label_agreement': 1.0}},
        training={'lr': 1e-5, 'epochs': 40},
        code_version='abc1234',
        created='2026-11-28T10:00:00+00:00',
    )


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    (tmp_path / 'm.onnx').write_bytes(ONNX_BYTES)
    (tmp_path / 'm.pt2').write_bytes(PT2_BYTES)
    return write_sidecar(_sidecar(), tmp_path / 'm.json')


def _document(path: Path) -> dict:
    return json.loads(path.read_text())


def _rewrite(path: Path, document: object) -> None:
    path.write_text(json.dumps(document))


def test_round_trip(artifact: Path) -> None:
    sidecar = read_sidecar(artifact)
    assert sidecar == _sidecar()
    assert sidecar.source == str(artifact.resolve())
    assert sidecar.input_size == (8, 12)
    assert sidecar.file_path('onnx') == artifact.parent.resolve() / 'm.onnx'
    assert sidecar.outputs['labels'] == {'dtype': 'int32', 'shape': [2, 8, 12],
                                         'resolution': 'input'}
    document = _document(artifact)
    assert document['schema_version'] == 1
    assert document['input'] == {'height': 8, 'width': 12, 'batch': 2, 'name': 'image',
                                 'dtype': 'float32', 'layout': 'NCHW', 'channels': 'RGB',
                                 'range': [0, 255], 'pad_mode': 'constant'}
    assert document['score']['higher_is_more_anomalous'] is True
    assert document['outputs']['anomaly_score'] == {'dtype': 'float32', 'shape': [2, 8, 12]}
    # Writing what was read gives the same bytes.
    again = write_sidecar(sidecar, artifact.parent / 'again.json')
    assert again.read_text() == artifact.read_text()


def test_write_is_atomic_and_leaves_no_temp_files(artifact: Path) -> None:
    write_sidecar(_sidecar(), artifact)
    assert sorted(p.name for p in artifact.parent.iterdir()) == ['m.json', 'm.onnx', 'm.pt2']
    assert os.stat(artifact).st_mode & 0o777 == 0o644


def test_sidecar_without_source_cannot_locate_files() -> None:
    with pytest.raises(ArtifactError, match='read_sidecar'):
        _sidecar().file_path('onnx')


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match='does not exist.*export'):
        read_sidecar(tmp_path / 'nothing.json')


def test_not_json(artifact: Path) -> None:
    artifact.write_text('{"schema_version": 1,')
    with pytest.raises(ArtifactError, match='not valid JSON.*re-export'):
        read_sidecar(artifact)


def test_not_an_object(artifact: Path) -> None:
    _rewrite(artifact, [1, 2])
    with pytest.raises(ArtifactError, match='must be a JSON object'):
        read_sidecar(artifact)


def test_unknown_schema_version(artifact: Path) -> None:
    document = _document(artifact)
    document['schema_version'] = 2
    _rewrite(artifact, document)
    with pytest.raises(ArtifactError, match=r'unknown sidecar schema_version 2.*\[1\].*Upgrade'):
        read_sidecar(artifact)


REQUIRED = ['schema_version', 'method', 'score', 'input', 'outputs', 'classes', 'palette',
            'void_id', 'thresholds', 'default_threshold', 'parity', 'files', 'training',
            'code_version', 'created', 'score.name', 'score.units', 'score.temperature',
            'score.higher_is_more_anomalous', 'input.height', 'input.width', 'input.batch',
            'input.dtype', 'input.layout', 'input.channels', 'input.range', 'input.name',
            'outputs.labels', 'outputs.anomaly_score', 'outputs.labels.dtype',
            'outputs.anomaly_score.shape', 'files.onnx', 'files.onnx.name',
            'files.pt2.sha256', 'files.pt2.name']


@pytest.mark.parametrize('key', REQUIRED)
def test_missing_field(artifact: Path, key: str) -> None:
    document = _document(artifact)
    *parents, last = key.split('.')
    node = document
    for part in parents:
        node = node[part]
    del node[last]
    _rewrite(artifact, document)
    with pytest.raises(ArtifactError, match=f"required field '{key}' is missing.*re-export"):
        read_sidecar(artifact)


ILL_TYPED = [
    ('schema_version', '1', 'an integer'),
    ('schema_version', True, 'an integer'),
    ('method', 3, 'a string'),
    ('score', 'DH', 'an object'),
    ('score.temperature', 'two', 'a number or null'),
    ('score.higher_is_more_anomalous', False, 'true'),
    ('score.resolution', 'stride8', r"one of \['input', 'stride4'\]"),
    ('score.resolution', 4, 'a string'),
    ('input.height', 0, 'a positive integer'),
    ('input.width', 64.5, 'an integer'),
    ('input.batch', -1, 'a positive integer'),
    ('input.dtype', 'uint8', "'float32'"),
    ('input.layout', 'NHWC', "'NCHW'"),
    ('input.channels', 'BGR', "'RGB'"),
    ('input.range', [0, 1], r'\[0, 255\]'),
    ('input.pad_mode', 'wrap', r"one of \['reflect', 'constant'\]"),
    ('outputs.labels.dtype', 'int64', r"one of \['int32', 'uint8'\]"),
    ('outputs.labels.resolution', 'stride8', r"one of \['input', 'stride4'\]"),
    ('outputs.anomaly_score.dtype', 'float16', "'float32'"),
    ('outputs.anomaly_score.shape', [1, 8, 12], r'\[2, 8, 12\]'),
    ('classes', [], 'non-empty list'),
    ('classes', ['road', 3, 'sky'], 'non-empty list'),
    ('palette', [[0, 0, 0]], r'3 \[r, g, b\] triples'),
    ('palette', [[0, 0, 0], [1, 2, 3], [256, 0, 0]], r'3 \[r, g, b\] triples'),
    ('void_id', 1, 'not a class id'),
    ('void_id', 'void', 'an integer'),
    ('thresholds', [1.0], 'an object'),
    ('thresholds.tpr95', 'high', 'a finite number'),
    ('default_threshold', 'fpr5', 'one of the thresholds'),
    ('files.onnx.name', '../elsewhere/m.onnx', 'a plain file name'),
    ('files.onnx.sha256', 'ABC', '64 lower-case hex digits'),
    ('training', 'lr=1e-5', 'an object'),
    ('created', 20261128, 'a string'),
]


@pytest.mark.parametrize(('key', 'value', 'expected'), ILL_TYPED)
def test_ill_typed_field(artifact: Path, key: str, value: object, expected: str) -> None:
    document = _document(artifact)
    *parents, last = key.split('.')
    node = document
    for part in parents:
        node = node[part]
    node[last] = value
    _rewrite(artifact, document)
    with pytest.raises(ArtifactError, match=f"field '{key}' must be .*{expected}.*re-export"):
        read_sidecar(artifact)


@pytest.mark.parametrize('kind', ['onnx', 'pt2'])
def test_listed_model_file_missing(artifact: Path, kind: str) -> None:
    (artifact.parent / f'm.{kind}').unlink()
    with pytest.raises(ArtifactError, match=f'its {kind} file .*m.{kind} is missing.*re-export'):
        read_sidecar(artifact)
    # Even without hash checks a missing file is refused.
    with pytest.raises(ArtifactError, match='is missing'):
        read_sidecar(artifact, verify_hashes=False)


@pytest.mark.parametrize('kind', ['onnx', 'pt2'])
def test_hash_mismatch(artifact: Path, kind: str) -> None:
    (artifact.parent / f'm.{kind}').write_bytes(b'another model')
    with pytest.raises(ArtifactError, match=(
            f'm.{kind} has sha256 {_sha(b"another model")}.*re-export with anomaly-seg export '
            'or fetch the matching files')):
        read_sidecar(artifact)
    assert read_sidecar(artifact, verify_hashes=False).files[kind].name == f'm.{kind}'


def _drop_pt2(artifact: Path) -> None:
    """Make `artifact` ONNX-only, as anomaly-seg export --formats onnx writes it."""
    document = _document(artifact)
    del document['files']['pt2']
    _rewrite(artifact, document)
    (artifact.parent / 'm.pt2').unlink()


def test_onnx_only_artifact_reads_and_round_trips(artifact: Path) -> None:
    _drop_pt2(artifact)
    sidecar = read_sidecar(artifact)
    assert sidecar.schema_version == 1
    assert sidecar.has('onnx') and not sidecar.has('pt2')
    assert sidecar.formats == ('onnx',)
    assert sidecar.file_path('onnx') == artifact.parent.resolve() / 'm.onnx'
    assert sidecar == dataclasses.replace(_sidecar(), files={'onnx': _sidecar().files['onnx']})
    with pytest.raises(ArtifactError, match=(
            r"lists no 'pt2' file \(it has \['onnx'\]\): this artifact ships no \.pt2; "
            're-export with anomaly-seg export --formats onnx,pt2')):
        sidecar.file_path('pt2')
    again = write_sidecar(sidecar, artifact.parent / 'again.json')
    assert _document(again) == _document(artifact)
    assert list(_document(again)['files']) == ['onnx']


def test_both_formats_are_listed_in_order(artifact: Path) -> None:
    sidecar = read_sidecar(artifact)
    assert sidecar.formats == ('onnx', 'pt2') and sidecar.has('pt2')


def test_onnx_stays_required(artifact: Path) -> None:
    document = _document(artifact)
    del document['files']['onnx']
    _rewrite(artifact, document)
    with pytest.raises(ArtifactError, match="required field 'files.onnx' is missing"):
        read_sidecar(artifact)


def test_listed_but_absent_pt2_is_still_refused_when_onnx_only_is_allowed(
        artifact: Path) -> None:
    # Listing a file is a promise: a listed .pt2 that is gone or differs is refused as before,
    # not quietly read as an ONNX-only artifact.
    (artifact.parent / 'm.pt2').unlink()
    with pytest.raises(ArtifactError, match='its pt2 file .*m.pt2 is missing'):
        read_sidecar(artifact)
    (artifact.parent / 'm.pt2').write_bytes(b'other weights')
    with pytest.raises(ArtifactError, match='m.pt2 has sha256'):
        read_sidecar(artifact)


def test_resolve_threshold(artifact: Path) -> None:
    sidecar = read_sidecar(artifact)
    assert resolve_threshold(sidecar, 'fpr1') == 1.25
    assert resolve_threshold(sidecar, 'fpr0.1') == 3.0
    assert resolve_threshold(sidecar) == -2.5  # the default, tpr95
    assert resolve_threshold(sidecar, 0.75) == 0.75
    assert resolve_threshold(sidecar, -1) == -1.0
    assert resolve_threshold(sidecar, '0.5') == 0.5  # ROS string parameters
    with pytest.raises(ArtifactError, match='unknown threshold name .fpr5.*fpr0.1, fpr1, tpr95'):
        resolve_threshold(sidecar, 'fpr5')
    with pytest.raises(ArtifactError, match='finite'):
        resolve_threshold(sidecar, float('nan'))
    with pytest.raises(ArtifactError, match='number or a name'):
        resolve_threshold(sidecar, True)


def test_resolve_threshold_without_default(artifact: Path) -> None:
    document = _document(artifact)
    document['thresholds'] = {}
    document['default_threshold'] = None
    _rewrite(artifact, document)
    sidecar = read_sidecar(artifact)
    assert sidecar.default_threshold is None
    assert resolve_threshold(sidecar, 2) == 2.0
    with pytest.raises(ArtifactError, match='no default threshold'):
        resolve_threshold(sidecar)
    with pytest.raises(ArtifactError, match='knows: none'):
        resolve_threshold(sidecar, 'tpr95')


def test_temperature_is_kept(artifact: Path) -> None:
    document = _document(artifact)
    document['score'] = {'name': 'OP', 'units': 'probability', 'temperature': 2,
                         'higher_is_more_anomalous': True}
    _rewrite(artifact, document)
    # A sidecar without score.resolution (written before the field existed) reads as 'input'.
    assert read_sidecar(artifact).score == ScoreSpec('OP', 'probability', 2.0)
    assert read_sidecar(artifact).score.resolution == 'input'


def test_score_resolution_round_trips(artifact: Path) -> None:
    low = dataclasses.replace(_sidecar(), score=ScoreSpec('DH', 'nats', None,
                                                          resolution='stride4'))
    path = write_sidecar(low, artifact)
    assert _document(path)['score']['resolution'] == 'stride4'
    assert read_sidecar(path).score.resolution == 'stride4'


def test_label_output_round_trips_and_defaults_to_int32_at_input(artifact: Path) -> None:
    document = _document(artifact)
    assert document['outputs']['labels'] == {'dtype': 'int32', 'shape': [2, 8, 12],
                                             'resolution': 'input'}
    del document['outputs']['labels']['resolution']  # sidecars written before the field
    _rewrite(artifact, document)
    assert read_sidecar(artifact).labels == LabelOutput('int32', 'input')
    small = dataclasses.replace(_sidecar(), labels=LabelOutput('uint8', 'stride4'))
    path = write_sidecar(small, artifact)
    assert _document(path)['outputs']['labels'] == {'dtype': 'uint8', 'shape': [2, 8, 12],
                                                    'resolution': 'stride4'}
    assert read_sidecar(path).labels == LabelOutput('uint8', 'stride4')


def test_pad_mode_round_trips_and_defaults_to_constant(artifact: Path) -> None:
    document = _document(artifact)
    assert document['input']['pad_mode'] == 'constant'
    del document['input']['pad_mode']  # sidecars written before the field: a flat fill
    _rewrite(artifact, document)
    assert read_sidecar(artifact).pad_mode == 'constant'
    mirrored = dataclasses.replace(_sidecar(), input=dataclasses.replace(
        _sidecar().input, pad_mode='reflect'))
    path = write_sidecar(mirrored, artifact)
    assert _document(path)['input']['pad_mode'] == 'reflect'
    assert read_sidecar(path).pad_mode == 'reflect'


def test_document_is_not_mutated_by_reading(artifact: Path) -> None:
    before = copy.deepcopy(_document(artifact))
    read_sidecar(artifact)
    assert _document(artifact) == before


def test_runtime_modules_import_no_torch() -> None:
    """The sidecar reader and the backends module load without torch or onnxruntime."""
    code = ('import sys; import anomaly_seg_node.artifact, anomaly_seg_node.backends; '
            "heavy = {'torch', 'onnxruntime', 'torch_tensorrt', 'training'} & set(sys.modules); "
            'assert not heavy, heavy')
    # From the repo root, so the check also works where the package is not installed.
    subprocess.run([sys.executable, '-c', code], check=True, cwd=Path(__file__).parents[2])


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a JSON document."""
    if isinstance(node, dict):
        return [p for key, value in node.items()
                for p in [prefix + (key,), *_paths(value, prefix + (key,))]]
    if isinstance(node, list):
        return [p for i, value in enumerate(node)
                for p in [prefix + (i,), *_paths(value, prefix + (i,))]]
    return []


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutation_is_accepted_or_refused_cleanly(artifact: Path, data: st.DataObject) -> None:
    """Replace one value anywhere with any JSON value: a valid Sidecar or an ArtifactError."""
    document = _document(artifact)
    path = data.draw(st.sampled_from(_paths(document)))
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = data.draw(JSON_VALUES)
    target = artifact.parent / 'mutated.json'
    _rewrite(target, document)
    try:
        sidecar = read_sidecar(target)
    except ArtifactError as error:
        assert str(target) in str(error)  # every refusal names the file
    else:
        assert sidecar.input.height > 0 and len(sidecar.palette) == len(sidecar.classes)


QUANTIZATION = {'format': 'QDQ', 'weights': 'int8, symmetric, per output channel',
                'reference': {'sidecar': 'm.json', 'onnx': 'm-fp32.onnx', 'sha256': '0' * 64}}


def _int8(artifact: Path) -> Path:
    """An int8 sibling of `artifact`: the same model file, precision int8, ONNX only."""
    sidecar = dataclasses.replace(_sidecar(), files={'onnx': _sidecar().files['onnx']},
                                  precision='int8', quantization=QUANTIZATION)
    return write_sidecar(sidecar, artifact.parent / 'm-int8.json')


def test_precision_round_trips_and_defaults_to_fp32(artifact: Path) -> None:
    assert read_sidecar(artifact).precision == 'fp32'
    assert read_sidecar(artifact).quantization == {}
    document = _document(artifact)
    assert document['precision'] == 'fp32' and 'quantization' not in document
    # a sidecar written before int8 artifacts existed is a float32 graph
    del document['precision']
    _rewrite(artifact, document)
    assert read_sidecar(artifact) == _sidecar()
    int8 = _int8(artifact)
    sidecar = read_sidecar(int8)
    assert sidecar.precision == 'int8' and sidecar.quantization == QUANTIZATION
    assert sidecar.formats == ('onnx',)
    assert _document(int8)['precision'] == 'int8'
    assert _document(int8)['quantization'] == QUANTIZATION
    again = write_sidecar(sidecar, artifact.parent / 'again.json')
    assert _document(again) == _document(int8)


@pytest.mark.parametrize(('change', 'message'), [
    ({'precision': 'int4'}, r"field 'precision' must be one of \['fp32', 'int8'\]"),
    ({'precision': 8}, "field 'precision' must be a string"),
    ({'quantization': {}}, "field 'quantization' must be a non-empty object"),
    ({'quantization': 'QDQ'}, "field 'quantization' must be an object"),
    ({'files': {'onnx': {'name': 'm.onnx', 'sha256': _sha(ONNX_BYTES)},
                'pt2': {'name': 'm.pt2', 'sha256': _sha(PT2_BYTES)}}},
     "field 'files.pt2' must be absent for precision int8"),
    ({'precision': 'fp32'}, "field 'quantization' must be absent for precision fp32"),
])
def test_bad_int8_sidecars_are_refused(artifact: Path, change: dict, message: str) -> None:
    int8 = _int8(artifact)
    _rewrite(int8, {**_document(int8), **change})
    with pytest.raises(ArtifactError, match=message) as error:
        read_sidecar(int8)
    assert str(int8) in str(error.value)
