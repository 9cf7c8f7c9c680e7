"""build-engine without torch: cache key and path, engine records, refusals, verification
figures, compile options, calibration images and the node's allow_engine_build wiring."""

import argparse
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest

from anomaly_seg_node import build_engine
from anomaly_seg_node.artifact import (
    FileRef,
    InputSpec,
    ScoreSpec,
    Sidecar,
    read_sidecar,
    write_sidecar,
)
from anomaly_seg_node.backends import (
    ENGINE_CACHE_ENV,
    ENGINE_ENVIRONMENT_FIELDS,
    ENGINE_SUFFIX,
    engine_cache_key,
    engine_path,
)
from anomaly_seg_node.build_engine import (
    COMPILE_KEYWORDS,
    PRECISIONS,
    CalibrationSource,
    EngineRecord,
    cached_engine,
    check_build_requirements,
    check_compile_api,
    compile_options,
    engine_wanted,
    read_record,
    record_path,
    verification_failures,
    verification_figures,
    verification_threshold,
    write_record,
)
from anomaly_seg_node.errors import ArtifactError, BackendError, ConfigError, DataError
from anomaly_seg_node.node_logic import NodeCore

ENV = {'gpu': 'NVIDIA H200', 'compute_capability': '9.0', 'torch': '2.14.1+cu130',
       'torch_tensorrt': '2.14.0', 'tensorrt': '10.14.1'}
PT2_BYTES = b'pt2 stand-in'
ONNX_BYTES = b'onnx stand-in'
ENGINE_BYTES = b'a serialized engine stand-in'
# Can this machine build for real? Then the refusal of a fake artifact is not what happens.
CAN_BUILD = importlib.util.find_spec('torch_tensorrt') is not None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sidecar(default_threshold: str | None = 'tpr95') -> Sidecar:
    return Sidecar(
        method='DenseHybrid', score=ScoreSpec(name='DH', units='nats'),
        input=InputSpec(height=4, width=6, batch=1),
        classes=('road', 'car', 'sky'), palette=((128, 64, 128), (0, 0, 142), (70, 130, 180)),
        files={'onnx': FileRef('m.onnx', _sha(ONNX_BYTES)),
               'pt2': FileRef('m.pt2', _sha(PT2_BYTES))},
        thresholds={'tpr95': -2.5, 'fpr1': 1.0} if default_threshold else {},
        default_threshold=default_threshold)


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    folder = tmp_path / 'models'
    folder.mkdir()
    (folder / 'm.onnx').write_bytes(ONNX_BYTES)
    (folder / 'm.pt2').write_bytes(PT2_BYTES)
    return write_sidecar(_sidecar(), folder / 'm.json')


# Cache key and path -------------------------------------------------------------------------

def test_cache_key_names_artifact_gpu_versions_and_precision() -> None:
    assert engine_cache_key(_sidecar(), 'fp16', ENV) == {
        'artifact_sha256': _sha(PT2_BYTES), 'gpu': 'NVIDIA H200', 'compute_capability': '9.0',
        'torch': '2.14.1+cu130', 'torch_tensorrt': '2.14.0', 'tensorrt': '10.14.1',
        'precision': 'fp16'}


def test_engine_path_changes_with_every_key_component(tmp_path: Path) -> None:
    sidecar = _sidecar()
    base = engine_path(sidecar, 'fp16', tmp_path, ENV)
    assert base == engine_path(sidecar, 'fp16', tmp_path, dict(ENV))
    assert base.parent == tmp_path
    assert base.name.startswith('m.nvidia-h200.fp16.') and base.suffix == '.pt2' == ENGINE_SUFFIX
    seen = {base}
    for field in ENGINE_ENVIRONMENT_FIELDS:
        path = engine_path(sidecar, 'fp16', tmp_path, {**ENV, field: ENV[field] + 'x'})
        assert path not in seen, field
        seen.add(path)
    fp32 = engine_path(sidecar, 'fp32', tmp_path, ENV)
    assert fp32 not in seen and '.fp32.' in fp32.name
    seen.add(fp32)
    retrained = dataclasses.replace(
        sidecar, files={**sidecar.files, 'pt2': FileRef('m.pt2', _sha(b'other weights'))})
    assert engine_path(retrained, 'fp16', tmp_path, ENV) not in seen
    # Only the graph TensorRT compiles counts: a new .onnx keeps the engine.
    new_onnx = dataclasses.replace(
        sidecar, files={**sidecar.files, 'onnx': FileRef('m.onnx', _sha(b'other onnx'))})
    assert engine_path(new_onnx, 'fp16', tmp_path, ENV) == base


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENGINE_CACHE_ENV, str(tmp_path / 'cache'))
    assert engine_path(_sidecar(), 'fp16', None, ENV).parent == tmp_path / 'cache'
    monkeypatch.delenv(ENGINE_CACHE_ENV)
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert engine_path(_sidecar(), 'fp16', None, ENV).parent == \
        tmp_path / 'home' / '.cache' / 'anomaly_seg' / 'engines'


# Engine records -----------------------------------------------------------------------------

def _figures(**overrides: float) -> dict[str, float]:
    figures = {'pixels': 24.0, 'label_agreement': 0.9995, 'mask_agreement': 0.998,
               'max_score_diff': 0.02, 'mean_score_diff': 0.001, 'score_std': 2.0,
               'score_diff_over_std': 0.01, 'mean_score_diff_over_std': 0.0005,
               'nonfinite_fraction': 0.0}
    figures.update(overrides)
    return figures


def _record(engine: Path, data: bytes = ENGINE_BYTES, **key: str) -> EngineRecord:
    return EngineRecord(
        key=engine_cache_key(_sidecar(), 'fp16', {**ENV, **key}), engine=engine.name,
        engine_sha256=_sha(data), artifact='/models/m.json', built='2026-11-28T11:00:00+00:00',
        build={'seconds': 93.5, 'options': {'enable_autocast': True}, 'tensorrt_blocks': 1,
               'torch_blocks': 0},
        verification={'images': 8, 'source': '8 synthetic road-like images',
                      'threshold': -2.5, 'threshold_name': 'tpr95', 'figures': _figures(),
                      'requirements': {'label_agreement': '>= 0.99'}, 'passed': True})


@pytest.fixture
def cached(tmp_path: Path) -> tuple[Path, EngineRecord]:
    engine = engine_path(_sidecar(), 'fp16', tmp_path, ENV)
    engine.write_bytes(ENGINE_BYTES)
    record = _record(engine)
    write_record(record, record_path(engine))
    return engine, record


def test_record_round_trip(cached: tuple[Path, EngineRecord]) -> None:
    engine, record = cached
    path = record_path(engine)
    assert path.parent == engine.parent and path.suffix == '.json'
    assert path.stem == engine.stem
    assert read_record(path) == record
    document = json.loads(path.read_text())
    assert document['schema_version'] == 1
    assert document['key']['gpu'] == 'NVIDIA H200'
    assert document['verification']['figures']['label_agreement'] == 0.9995
    assert record.passed


def test_cached_engine_is_reused_only_when_everything_matches(
        cached: tuple[Path, EngineRecord]) -> None:
    engine, record = cached
    key = engine_cache_key(_sidecar(), 'fp16', ENV)
    assert cached_engine(engine, key) == (record, '')

    other_gpu = engine_cache_key(_sidecar(), 'fp16', {**ENV, 'gpu': 'Orin'})
    found, reason = cached_engine(engine, other_gpu)
    assert found is None and 'made for another gpu' in reason

    engine.write_bytes(ENGINE_BYTES + b'!')
    found, reason = cached_engine(engine, key)
    assert found is None and 'differs from the engine its record describes' in reason

    engine.write_bytes(ENGINE_BYTES)
    failed = dataclasses.replace(record, verification={**record.verification, 'passed': False})
    write_record(failed, record_path(engine))
    found, reason = cached_engine(engine, key)
    assert found is None and 'failed its verification' in reason

    record_path(engine).unlink()
    found, reason = cached_engine(engine, key)
    assert found is None and 'has no verification record' in reason

    engine.unlink()
    found, reason = cached_engine(engine, key)
    assert found is None and f'no engine {engine.name}' in reason


@pytest.mark.parametrize(('mutate', 'message'), [
    (lambda d: '{not json', 'is not readable JSON'),
    (lambda d: [d], 'the document must be a JSON object'),
    (lambda d: {**d, 'schema_version': 2}, 'schema_version must be 1'),
    (lambda d: {**d, 'key': {k: v for k, v in d['key'].items() if k != 'tensorrt'}},
     'key must be an object of strings'),
    (lambda d: {**d, 'engine': '../elsewhere.pt2'}, 'engine must be the plain file name'),
    (lambda d: {**d, 'engine_sha256': 'abc'}, 'engine_sha256 must be 64 lower-case hex'),
    (lambda d: {**d, 'built': 5}, 'built must be a string'),
    (lambda d: {**d, 'verification': {**d['verification'], 'passed': 'yes'}},
     'verification must be an object with .passed'),
    (lambda d: {**d, 'verification': {**d['verification'], 'figures': {}}},
     'verification must be an object with .passed'),
    (lambda d: {**d, 'extra': 1}, 'extra must be absent'),
])
def test_malformed_record_is_refused(cached: tuple[Path, EngineRecord], mutate: Any,
                                     message: str) -> None:
    engine, _ = cached
    path = record_path(engine)
    changed = mutate(json.loads(path.read_text()))
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(BackendError, match=message) as error:
        read_record(path)
    assert 'rebuild with anomaly-seg build-engine --force' in str(error.value)
    # A malformed record never lets its engine through.
    found, reason = cached_engine(engine, engine_cache_key(_sidecar(), 'fp16', ENV))
    assert found is None and 'rebuild with anomaly-seg build-engine --force' in reason


def test_missing_record_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match='does not exist; build the engine with anomaly-seg '
                                           'build-engine'):
        read_record(tmp_path / 'none.json')


# Refusals ---------------------------------------------------------------------------------

def _modules(*present: str) -> Any:
    return lambda name: name in present


def test_refused_without_torch_tensorrt() -> None:
    with pytest.raises(BackendError) as error:
        check_build_requirements(_modules('torch'), lambda: '')
    assert str(error.value) == (
        "cannot build a TensorRT engine: torch_tensorrt is not installed: pip install "
        "'anomaly_seg[tensorrt]' (torch-tensorrt 2.14 for torch 2.14) on the machine with the "
        'target GPU')


def test_refused_without_cuda() -> None:
    with pytest.raises(BackendError) as error:
        check_build_requirements(_modules('torch', 'torch_tensorrt'),
                                 lambda: 'torch sees no CUDA device')
    assert str(error.value) == (
        'cannot build a TensorRT engine: torch sees no CUDA device: a TensorRT engine is built '
        'on the GPU that will run it, so run anomaly-seg build-engine on that machine (without '
        'one, use backend torch or onnxruntime)')


def test_refusal_lists_every_missing_piece() -> None:
    with pytest.raises(BackendError) as error:
        check_build_requirements(_modules(), lambda: 'never asked without torch')
    message = str(error.value)
    assert 'torch is not installed: pip install -r requirements.txt' in message
    assert 'torch_tensorrt is not installed' in message
    assert 'never asked' not in message
    with pytest.raises(BackendError, match='torch_tensorrt is not installed.*torch sees no CUDA'):
        check_build_requirements(_modules('torch'), lambda: 'torch sees no CUDA device')


def test_all_present_is_accepted() -> None:
    assert check_build_requirements(_modules('torch', 'torch_tensorrt'), lambda: '') is None


def _args(artifact: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    build_engine.add_arguments(parser)
    return parser.parse_args(['--artifact', str(artifact), *extra])


@pytest.mark.skipif(CAN_BUILD, reason='torch_tensorrt is installed here')
def test_command_refuses_on_this_machine(artifact: Path, tmp_path: Path) -> None:
    args = _args(artifact, '--cache-dir', str(tmp_path / 'cache'))
    assert (args.precision, args.synthetic, args.calibration_images, args.force) == \
        ('fp16', None, None, False)
    with pytest.raises(BackendError, match=r"cannot build a TensorRT engine: .*torch_tensorrt "
                                           r"is not installed: pip install 'anomaly_seg\["):
        build_engine.run(args)
    with pytest.raises(BackendError, match='cannot build a TensorRT engine'):
        build_engine.ensure_engine(read_sidecar(artifact), 'fp16', tmp_path, allow_build=False,
                                   log=lambda level, message: None)
    assert not (tmp_path / 'cache').exists()


def test_command_checks_its_inputs_first(artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='--synthetic must be an image count from 1 to 64'):
        build_engine.run(_args(artifact, '--synthetic', '0'))
    with pytest.raises(DataError, match='calibration folder .* does not exist'):
        build_engine.run(_args(artifact, '--calibration-images', str(tmp_path / 'none')))
    (artifact.parent / 'm.pt2').write_bytes(b'tampered')
    with pytest.raises(ArtifactError, match='m.pt2 has sha256'):
        build_engine.run(_args(artifact))
    with pytest.raises(SystemExit):
        _args(artifact, '--synthetic', '4', '--calibration-images', str(tmp_path))


# ONNX-only artifacts (anomaly-seg export --formats onnx) -------------------------------------

NO_PT2 = (r'cannot build a TensorRT engine: backend tensorrt runs NAME.pt2, but this artifact '
          r'ships no \.pt2; re-export with anomaly-seg export --formats onnx,pt2')


@pytest.fixture
def onnx_only(tmp_path: Path) -> Path:
    folder = tmp_path / 'lite'
    folder.mkdir()
    (folder / 'm.onnx').write_bytes(ONNX_BYTES)
    sidecar = _sidecar()
    return write_sidecar(dataclasses.replace(sidecar, files={'onnx': sidecar.files['onnx']}),
                         folder / 'm.json')


def test_command_refuses_an_onnx_only_artifact_with_the_fix(onnx_only: Path,
                                                            tmp_path: Path) -> None:
    # Whatever this machine can build: the artifact itself is what is missing.
    with pytest.raises(BackendError, match=NO_PT2):
        build_engine.run(_args(onnx_only, '--cache-dir', str(tmp_path / 'cache')))
    for allow_build in (True, False):
        with pytest.raises(BackendError, match=NO_PT2):
            build_engine.ensure_engine(read_sidecar(onnx_only), 'fp16', tmp_path / 'cache',
                                       allow_build=allow_build,
                                       log=lambda level, message: None)
    assert not (tmp_path / 'cache').exists()
    with pytest.raises(BackendError, match=r'ships no \.pt2'):
        engine_cache_key(read_sidecar(onnx_only), 'fp16', ENV)


def test_auto_wants_no_engine_for_an_onnx_only_artifact(
        onnx_only: Path, artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_engine, '_tensorrt_loads', lambda: True)
    monkeypatch.setattr(build_engine, '_cuda_unavailable', lambda: '')
    lite, full = read_sidecar(onnx_only), read_sidecar(artifact)
    assert engine_wanted('auto', 'cuda', full) and engine_wanted('auto', 'cuda')
    assert not engine_wanted('auto', 'cuda', lite)
    # Asked for explicitly, the build is attempted and refused with the fix (above).
    assert engine_wanted('tensorrt', 'cuda', lite)


# Verification figures -----------------------------------------------------------------------

def _outputs() -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(20, dtype=np.int32).reshape(1, 4, 5) % 3
    score = np.arange(20, dtype=np.float32).reshape(1, 4, 5)
    return labels, score


def test_identical_outputs_agree_fully() -> None:
    figures = verification_figures(_outputs(), _outputs(), threshold=9.5)
    assert figures['label_agreement'] == 1.0 and figures['mask_agreement'] == 1.0
    assert figures['max_score_diff'] == 0.0 and figures['score_diff_over_std'] == 0.0
    assert figures['nonfinite_fraction'] == 0.0 and figures['pixels'] == 20
    assert verification_failures(figures, 'fp32') == []


def test_figures_known_answer() -> None:
    labels, score = _outputs()
    labels2, score2 = labels.copy(), score.copy()
    labels2[0, 0, :2] += 1  # 2 of 20 pixels change class
    score2[0, 1, 4] += 1.0  # pixel 9: 9 -> 10 crosses the threshold 9.5
    figures = verification_figures((labels, score), (labels2, score2), threshold=9.5)
    std = math.sqrt((20**2 - 1) / 12)  # std of 0..19
    assert figures['label_agreement'] == pytest.approx(0.9)
    assert figures['mask_agreement'] == pytest.approx(0.95)
    assert figures['max_score_diff'] == pytest.approx(1.0)
    assert figures['mean_score_diff'] == pytest.approx(0.05)
    assert figures['score_std'] == pytest.approx(std)
    assert figures['score_diff_over_std'] == pytest.approx(1.0 / std)
    assert figures['mean_score_diff_over_std'] == pytest.approx(0.05 / std)
    problems = verification_failures(figures, 'fp16')
    assert problems == ['label_agreement is 0.9, needs >= 0.99',
                        'mask_agreement is 0.95, needs >= 0.99']


def test_nonfinite_scores_fail() -> None:
    labels, score = _outputs()
    broken = score.copy()
    broken[0, 3, 3] = np.nan
    figures = verification_figures((labels, score), (labels, broken), threshold=9.5)
    assert figures['nonfinite_fraction'] == pytest.approx(0.05)
    assert figures['score_diff_over_std'] == math.inf
    assert 'nonfinite_fraction is 0.05, needs <= 0' in verification_failures(figures, 'fp16')
    assert any(p.startswith('score_diff_over_std is inf') for p in
               verification_failures(figures, 'fp32'))


def test_requirements_differ_by_precision() -> None:
    # A few pixels off by 2% of the std, tiny on average: fine for fp16, not for fp32.
    figures = _figures(score_diff_over_std=0.02, mean_score_diff_over_std=0.001)
    assert verification_failures(figures, 'fp16') == []
    assert verification_failures(figures, 'fp32') == ['score_diff_over_std is 0.02, needs <= 0.01']
    assert verification_failures(_figures(label_agreement=0.995), 'fp16') == []
    assert verification_failures(_figures(label_agreement=0.995), 'fp32') == [
        'label_agreement is 0.995, needs >= 0.999']
    assert verification_failures(_figures(label_agreement=math.nan), 'fp16') == [
        'label_agreement is nan, needs >= 0.99']
    with pytest.raises(ConfigError, match="unknown precision 'int8'"):
        verification_failures(_figures(), 'int8')


def test_constant_reference_score() -> None:
    labels, _ = _outputs()
    zero = np.zeros((1, 4, 5), np.float32)
    assert verification_figures((labels, zero), (labels, zero), 0.0)['score_diff_over_std'] == 0
    off = zero + 0.5
    assert verification_figures((labels, zero), (labels, off), 0.0)['score_diff_over_std'] == \
        math.inf


def test_shape_mismatch_is_refused() -> None:
    labels, score = _outputs()
    with pytest.raises(BackendError, match=r'engine returned labels \[1, 4, 4\].*rebuild it'):
        verification_figures((labels, score), (labels[..., :4], score[..., :4]), 0.0)


def test_threshold_of_the_check() -> None:
    assert verification_threshold(_sidecar(), np.array([5.0, 7.0])) == (-2.5, 'tpr95')
    threshold, name = verification_threshold(_sidecar(None), np.array([1.0, 2.0, 10.0]))
    assert threshold == 2.0 and name.startswith('median of the FP32 scores')


# Compile options ------------------------------------------------------------------------------

def compile_2_14(exported_program: Any, inputs: Any = None, *, arg_inputs: Any = None,
                 kwarg_inputs: Any = None, device: Any = None, disable_tf32: bool = False,
                 min_block_size: int = 5, enable_autocast: bool = False,
                 autocast_low_precision_type: Any = None, autocast_excluded_nodes: Any = (),
                 **kwargs: Any) -> Any:
    """The head of torch-tensorrt 2.14's `torch_tensorrt.dynamo.compile` signature (its
    enabled_precisions and use_explicit_typing are gone; strong typing is always on)."""


def compile_2_9(exported_program: Any, inputs: Any = None, *, arg_inputs: Any = None,
                disable_tf32: bool = False, enabled_precisions: Any = None,
                use_explicit_typing: bool = False, **kwargs: Any) -> Any:
    """An older generation's signature: no autocast."""


def test_options_of_torch_tensorrt_2_14() -> None:
    assert compile_options('fp16', 'f16') == {'enable_autocast': True,
                                              'autocast_low_precision_type': 'f16'}
    assert compile_options('fp32', 'f16') == {'disable_tf32': True}
    # Every keyword the build passes is a named parameter of the pinned release: compile()
    # swallows unknown keywords in **kwargs, so a misspelt or retired one would pass silently.
    accepted = inspect.signature(compile_2_14).parameters
    for precision in PRECISIONS:
        assert set(compile_options(precision, 'f16')) <= set(COMPILE_KEYWORDS)
    assert set(COMPILE_KEYWORDS) <= set(accepted)
    assert check_compile_api(compile_2_14, '2.14.0') is None
    with pytest.raises(ConfigError, match='unknown precision'):
        compile_options('bf16', 'f16')


def test_another_torch_tensorrt_generation_is_refused_by_name() -> None:
    with pytest.raises(BackendError) as error:
        check_compile_api(compile_2_9, '2.9.0')
    assert str(error.value) == (
        'torch_tensorrt 2.9.0 has no enable_autocast, autocast_low_precision_type in '
        'torch_tensorrt.dynamo.compile, which this build passes (torch-tensorrt 2.14); pip '
        "install 'anomaly_seg[tensorrt]' (torch-tensorrt 2.14 for torch 2.14) on the machine "
        'with the target GPU')


# Calibration images -------------------------------------------------------------------------

def _write_png(path: Path, rgb: tuple[int, int, int], height: int, width: int) -> None:
    image = np.empty((height, width, 3), np.uint8)
    image[...] = rgb[::-1]  # cv2 writes BGR
    assert cv2.imwrite(str(path), image)


def test_calibration_folder_is_read_as_rgb_at_the_artifact_size(tmp_path: Path) -> None:
    _write_png(tmp_path / 'b.png', (200, 10, 30), 10, 14)
    _write_png(tmp_path / 'a.PNG', (1, 2, 250), 3, 4)
    (tmp_path / 'notes.txt').write_text('not an image')
    images, source = CalibrationSource(folder=tmp_path).load(6, 8)
    assert images.shape == (2, 6, 8, 3) and images.dtype == np.uint8
    assert (images[0] == (1, 2, 250)).all()  # a.PNG first, by name; enlarged
    assert (images[1] == (200, 10, 30)).all()  # shrunk
    assert source == f'2 images of {tmp_path}'


def test_calibration_folder_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ('a.png', 'b.png', 'c.png'):
        _write_png(tmp_path / name, (9, 9, 9), 4, 4)
    monkeypatch.setattr(build_engine, 'MAX_CALIBRATION_IMAGES', 2)
    images, source = CalibrationSource(folder=tmp_path).load(4, 4)
    assert images.shape[0] == 2 and source.endswith('(the first 2 of 3 by name)')


def test_bad_calibration_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match='holds no images .*use --synthetic N'):
        CalibrationSource(folder=tmp_path).files()
    (tmp_path / 'x.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(DataError, match='x.jpg cannot be decoded; remove or convert it'):
        CalibrationSource(folder=tmp_path).load(4, 4)
    for count in (0, -1, 65, True):
        with pytest.raises(ConfigError, match='--synthetic must be an image count'):
            CalibrationSource(synthetic=count).files()
    assert CalibrationSource(synthetic=64).files() == []


# The node: allow_engine_build ------------------------------------------------------------

def test_engine_wanted(monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine_wanted('tensorrt', 'cuda')
    for backend in ('tensorrt', 'auto', 'torch', 'onnxruntime'):
        assert not engine_wanted(backend, 'cpu')
    assert not engine_wanted('torch', 'cuda') and not engine_wanted('onnxruntime', 'cuda')
    monkeypatch.setattr(build_engine, '_tensorrt_loads', lambda: True)
    monkeypatch.setattr(build_engine, '_cuda_unavailable', lambda: '')
    assert engine_wanted('auto', 'cuda')
    monkeypatch.setattr(build_engine, '_cuda_unavailable', lambda: 'torch sees no CUDA device')
    assert not engine_wanted('auto', 'cuda')
    monkeypatch.setattr(build_engine, '_cuda_unavailable', lambda: '')
    monkeypatch.setattr(build_engine, '_tensorrt_loads', lambda: False)
    assert not engine_wanted('auto', 'cuda')


class _Transport:
    def __init__(self) -> None:
        self.logs: list[tuple[str, str]] = []

    def subscription_count(self, topic: str) -> int:
        return 0

    def publish(self, topic: str, payload: Any) -> None:
        raise AssertionError('nothing is published at configure')

    def now_ns(self) -> int:
        return 0

    def log(self, level: str, message: str) -> None:
        self.logs.append((level, message))


class _Segmenter:
    def __init__(self, sidecar: Sidecar, backend: str, device: str, precision: str) -> None:
        self.input_size = sidecar.input_size
        self.backend, self.device, self.precision = backend, device, precision
        self.reason = 'requested'

    def __call__(self, frame: np.ndarray) -> SimpleNamespace:
        height, width = self.input_size
        return SimpleNamespace(labels=np.zeros((1, height, width), np.int32),
                               anomaly_score=np.zeros((1, height, width), np.float32))


@pytest.mark.parametrize(('params', 'builds'), [
    ({'backend': 'tensorrt', 'allow_engine_build': True}, True),
    ({'backend': 'tensorrt', 'allow_engine_build': False}, False),
    ({'backend': 'torch', 'allow_engine_build': True}, False),
    ({'backend': 'tensorrt', 'allow_engine_build': True, 'device': 'cpu'}, False),
])
def test_node_builds_at_configure_only_when_allowed(
        artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        params: dict[str, Any], builds: bool) -> None:
    order: list[Any] = []

    def ensure(sidecar: Sidecar, precision: str, cache_dir: str | None, allow_build: bool,
               log: Any) -> Path:
        order.append(('ensure', sidecar.source, precision, cache_dir, allow_build))
        log('info', 'engine ready')
        return tmp_path / 'engine.pt2'

    def loader(sidecar: Sidecar, backend: str, device: str, precision: str,
               cache_dir: str | None, ort_threads: int) -> _Segmenter:
        order.append('load')
        return _Segmenter(sidecar, backend, device, precision)

    monkeypatch.setattr(build_engine, 'ensure_engine', ensure)
    transport = _Transport()
    core = NodeCore(transport, loader=loader)
    values = {'artifact': str(artifact), 'device': 'cuda', 'precision': 'fp16',
              'engine_cache_dir': str(tmp_path / 'engines'), **params}
    core.configure(values)
    try:
        assert core.state == 'inactive'
        if builds:
            assert order == [('ensure', str(artifact.resolve()), 'fp16',
                              str(tmp_path / 'engines'), True), 'load']
            assert ('info', 'engine ready') in transport.logs
        else:
            assert order == ['load']
    finally:
        core.shutdown()


def test_node_configure_fails_when_the_build_is_refused(
        artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Path:
        raise BackendError('cannot build a TensorRT engine: torch sees no CUDA device')

    loads: list[str] = []
    monkeypatch.setattr(build_engine, 'ensure_engine', refuse)
    core = NodeCore(_Transport(), loader=lambda *args: loads.append('load'))
    with pytest.raises(BackendError, match='torch sees no CUDA device'):
        core.configure({'artifact': str(artifact), 'backend': 'tensorrt', 'device': 'cuda',
                        'allow_engine_build': True})
    assert core.state == 'unconfigured' and loads == []
    assert 'torch sees no CUDA device' in core.last_error


def test_calibration_images_are_letterboxed_with_the_pad_colour(tmp_path: Path) -> None:
    _write_png(tmp_path / 'square.png', (200, 10, 30), 48, 48)  # 1:1 into 16:9
    images, _ = CalibrationSource(folder=tmp_path).load(36, 64, (1, 2, 3))
    assert images.shape == (1, 36, 64, 3)
    # x0.75 to 36 x 36 in the middle, 14 columns of pad colour on each side (not stretched).
    assert (images[0, :, 14:50] == (200, 10, 30)).all()
    assert (images[0, :, :14] == (1, 2, 3)).all() and (images[0, :, 50:] == (1, 2, 3)).all()
