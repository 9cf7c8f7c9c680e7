"""Backends on a tiny exported artifact: onnxruntime and torch vs eager, input checks, auto."""

import importlib.util
from pathlib import Path
import shutil
import sys

import numpy as np
import pytest

# The stand-in segmenter of the export tests (pytest puts this folder on sys.path).
from test_export import tiny_segmenter
import torch

from anomaly_seg_node import backends
from anomaly_seg_node.artifact import read_sidecar
from anomaly_seg_node.check_images import road_like_images
from anomaly_seg_node.errors import ArtifactError, BackendError
from anomaly_seg_node.pipeline import FramePipeline
from training.export import DeployModel, export_artifact

SIZE = (64, 96)
BATCH = 2
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope='module')
def model() -> DeployModel:
    return DeployModel(tiny_segmenter(seed=1), 'DH')


@pytest.fixture(scope='module')
def artifact(tmp_path_factory: pytest.TempPathFactory, model: DeployModel) -> Path:
    folder = tmp_path_factory.mktemp('artifact')
    export_artifact(model, folder / 'tiny', size=SIZE, batch=BATCH, check_images=2,
                    thresholds={'tpr95': -3.0})
    return folder / 'tiny.json'


@pytest.fixture(scope='module')
def frames() -> np.ndarray:
    return road_like_images(BATCH, *SIZE, seed=11)


def _eager(model: DeployModel, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        labels, score = model(torch.from_numpy(frames).permute(0, 3, 1, 2).float())
    return labels.numpy(), score.numpy()


def _assert_agrees(result: backends.SegResult, reference: tuple[np.ndarray, np.ndarray],
                   atol: float = 1e-4) -> None:
    labels, score = reference
    assert result.labels.dtype == np.int32 and result.anomaly_score.dtype == np.float32
    assert result.labels.shape == labels.shape and result.anomaly_score.shape == score.shape
    assert np.mean(result.labels == labels) >= 0.999
    np.testing.assert_allclose(result.anomaly_score, score, atol=atol)


@pytest.mark.parametrize('backend', ['onnxruntime', 'torch'])
def test_backend_agrees_with_eager(artifact: Path, model: DeployModel, frames: np.ndarray,
                                   backend: str) -> None:
    segmenter = backends.load(artifact, backend=backend, device='cpu')
    assert (segmenter.backend, segmenter.device, segmenter.precision) == (backend, 'cpu', 'fp32')
    assert segmenter.input_size == SIZE and segmenter.reason == 'requested'
    assert segmenter.sidecar == read_sidecar(artifact)
    reference = _eager(model, frames)
    assert len(np.unique(reference[0])) > 3
    _assert_agrees(segmenter(frames), reference)
    # One frame [H, W, 3]: the static batch is padded and the padding dropped.
    single = segmenter(frames[1])
    assert single.labels.shape == (1, *SIZE)
    _assert_agrees(single, (reference[0][1:], reference[1][1:]))


@pytest.mark.parametrize('backend', ['onnxruntime', 'torch'])
def test_uint8_labels_come_out_as_uint8_and_render_the_same(
        artifact: Path, model: DeployModel, frames: np.ndarray, tmp_path: Path,
        backend: str) -> None:
    small = DeployModel(model.segmenter, 'DH', label_dtype='uint8')
    export_artifact(small, tmp_path / 'u8', size=SIZE, batch=BATCH, check_images=2,
                    thresholds={'tpr95': -3.0})
    wide = backends.load(artifact, backend=backend, device='cpu')
    narrow = backends.load(tmp_path / 'u8.json', backend=backend, device='cpu')
    wide_out, narrow_out = wide(frames), narrow(frames)
    assert narrow_out.labels.dtype == np.uint8 and wide_out.labels.dtype == np.int32
    np.testing.assert_array_equal(narrow_out.labels, wide_out.labels)
    sidecar = read_sidecar(artifact)
    outputs = []
    for segmenter in (wide, narrow):
        pipeline = FramePipeline(segmenter, sidecar.classes, sidecar.palette, threshold=-3.0)
        outputs.append(pipeline.process(frames[0][:48, :80]))  # resized both ways
    for name in ('semantic_mask', 'semantic_color', 'overlay', 'anomaly_mask'):
        np.testing.assert_array_equal(getattr(outputs[0], name), getattr(outputs[1], name))


def test_auto_picks_onnxruntime_on_cpu_and_says_why(artifact: Path) -> None:
    segmenter = backends.load(artifact, backend='auto', device='cpu')
    assert segmenter.backend == 'onnxruntime' and segmenter.device == 'cpu'
    assert 'device cpu asked' in segmenter.reason
    assert segmenter.providers == ['CPUExecutionProvider']


@pytest.mark.skipif(HAS_CUDA, reason='checks the fallback of a machine without CUDA')
def test_auto_falls_back_to_onnxruntime_without_cuda(artifact: Path) -> None:
    segmenter = backends.load(artifact, backend='auto', device='cuda', precision='fp16')
    assert (segmenter.backend, segmenter.device, segmenter.precision) == \
        ('onnxruntime', 'cpu', 'fp32')
    assert 'torch sees no CUDA device' in segmenter.reason
    assert 'fell back to onnxruntime' in segmenter.reason


@pytest.mark.skipif(HAS_CUDA, reason='checks the error of a machine without CUDA')
@pytest.mark.parametrize('backend', ['torch', 'onnxruntime'])
def test_cuda_without_a_gpu_is_refused(artifact: Path, backend: str) -> None:
    with pytest.raises(BackendError, match='device cuda asked.*use device cpu'):
        backends.load(artifact, backend=backend, device='cuda')


@pytest.mark.skipif(importlib.util.find_spec('torch_tensorrt') is not None,
                    reason='torch_tensorrt is installed here')
def test_tensorrt_missing_names_the_install(artifact: Path) -> None:
    with pytest.raises(BackendError) as error:
        backends.load(artifact, backend='tensorrt', device='cuda')
    assert str(error.value) == (
        f'torch_tensorrt is not installed for {sys.executable}, the Python this runs under; '
        'start from the environment that has it (activate that virtual environment before ros2 '
        'run / ros2 launch: the installed anomaly_seg_node runs the first python3 on PATH), or '
        f"install it for this Python ({sys.executable} -m pip install 'torch-tensorrt==2.14.*')"
        '; or use backend torch/onnxruntime')


@pytest.mark.parametrize('backend', ['torch', 'onnxruntime'])
def test_fp16_on_cpu_is_refused(artifact: Path, backend: str) -> None:
    with pytest.raises(BackendError, match='fp32'):
        backends.load(artifact, backend=backend, device='cpu', precision='fp16')


@pytest.mark.parametrize(('name', 'value'), [('backend', 'openvino'), ('device', 'gpu'),
                                             ('precision', 'int8')])
def test_unknown_options_are_refused(artifact: Path, name: str, value: str) -> None:
    with pytest.raises(BackendError, match=f'unknown {name} .{value}.; expected one of'):
        backends.load(artifact, **{name: value})


@pytest.mark.parametrize(('frames', 'message'), [
    (np.zeros((64, 96, 3), np.float32), 'found dtype float32; convert .* to uint8'),
    (np.zeros((64, 96, 4), np.uint8), 'found 4 channels'),
    (np.zeros((64, 96), np.uint8), r'found shape \[64, 96\]'),
    (np.zeros((48, 96, 3), np.uint8), 'found frames of 48x96; resize to the artifact size 64x96'),
    (np.zeros((3, 64, 96, 3), np.uint8), 'found a batch of 3.*at most 2 frames'),
    (np.zeros((0, 64, 96, 3), np.uint8), 'found a batch of 0'),
    (np.zeros((1, 3, 64, 96), np.uint8), 'found 96 channels'),
    ([[0, 0, 0]], 'as a numpy array, found list'),
])
def test_bad_frames_are_refused(artifact: Path, frames: object, message: str) -> None:
    segmenter = backends.load(artifact, backend='onnxruntime')
    with pytest.raises(BackendError, match=r'expected uint8 RGB frames of shape \[64, 96, 3\]'):
        segmenter(frames)
    with pytest.raises(BackendError, match=message):
        segmenter(frames)


def test_tampered_artifact_is_refused_before_loading(artifact: Path, tmp_path: Path) -> None:
    for path in artifact.parent.iterdir():
        shutil.copy(path, tmp_path / path.name)
    with open(tmp_path / 'tiny.onnx', 'ab') as stream:
        stream.write(b'\0')
    with pytest.raises(ArtifactError, match='tiny.onnx has sha256 .*re-export'):
        backends.load(tmp_path / 'tiny.json', backend='onnxruntime')


def test_sidecar_object_is_accepted(artifact: Path, frames: np.ndarray) -> None:
    sidecar = read_sidecar(artifact)
    result = backends.load(sidecar, backend='onnxruntime')(frames)
    assert result.labels.shape == (BATCH, *SIZE)


def test_engine_path_is_in_the_cache_dir(artifact: Path, tmp_path: Path) -> None:
    environment = {'gpu': 'NVIDIA H200', 'compute_capability': '9.0', 'torch': '2.14.1',
                   'torch_tensorrt': '2.14.0', 'tensorrt': '10.13'}
    path = backends.engine_path(read_sidecar(artifact), 'fp16', tmp_path, environment)
    assert path.parent == tmp_path and path.name.startswith('tiny.nvidia-h200.fp16.')
    assert path.suffix == '.pt2'


@pytest.mark.gpu
@pytest.mark.parametrize('precision', ['fp32', 'fp16'])
def test_torch_backend_on_cuda(artifact: Path, model: DeployModel, frames: np.ndarray,
                               precision: str) -> None:
    segmenter = backends.load(artifact, backend='torch', device='cuda', precision=precision)
    assert (segmenter.device, segmenter.precision) == ('cuda', precision)
    result = segmenter(frames)
    labels, score = _eager(model, frames)
    if precision == 'fp32':
        _assert_agrees(result, (labels, score), atol=1e-3)
    else:
        assert np.mean(result.labels == labels) >= 0.98
        assert np.abs(result.anomaly_score - score).max() <= 0.05 * score.std()


@pytest.mark.gpu
def test_auto_on_cuda_without_engine_picks_torch(artifact: Path, tmp_path: Path) -> None:
    segmenter = backends.load(artifact, backend='auto', device='cuda',
                              engine_cache_dir=tmp_path)
    assert (segmenter.backend, segmenter.device) == ('torch', 'cuda')
    assert 'torch ExportedProgram on CUDA' in segmenter.reason


@pytest.mark.gpu
def test_tensorrt_without_engine_names_the_build_command(artifact: Path,
                                                          tmp_path: Path) -> None:
    if importlib.util.find_spec('torch_tensorrt') is None:
        pytest.skip('torch_tensorrt is not installed')
    with pytest.raises(BackendError, match='no engine for this artifact/GPU.*anomaly-seg '
                                           'build-engine --artifact'):
        backends.load(artifact, backend='tensorrt', device='cuda', engine_cache_dir=tmp_path)


@pytest.mark.gpu
def test_onnxruntime_on_cuda(artifact: Path, model: DeployModel, frames: np.ndarray) -> None:
    import onnxruntime

    if 'CUDAExecutionProvider' not in onnxruntime.get_available_providers():
        pytest.skip('this onnxruntime has no CUDA execution provider')
    segmenter = backends.load(artifact, backend='onnxruntime', device='cuda')
    _assert_agrees(segmenter(frames), _eager(model, frames), atol=1e-3)


def test_fp16_graph_runs_without_float32_asserts(artifact: Path, model: DeployModel,
                                                 frames: np.ndarray) -> None:
    """What the torch backend does for fp16 on CUDA, checked here on the CPU's half kernels."""
    program = torch.export.load(str(read_sidecar(artifact).file_path('pt2')))
    module = backends._drop_dtype_asserts(torch, program.module()).to(torch.float16)
    with torch.inference_mode():
        labels, score = module(torch.from_numpy(frames).permute(0, 3, 1, 2).half())
    assert labels.dtype == torch.int32 and score.dtype == torch.float32
    ref_labels, ref_score = _eager(model, frames)
    assert np.mean(labels.numpy() == ref_labels) >= 0.98
    assert np.abs(score.numpy() - ref_score).max() <= 0.05 * ref_score.std()


# ONNX-only artifacts (anomaly-seg export --formats onnx) ------------------------------------

NO_PT2 = r'this artifact ships no \.pt2; re-export with anomaly-seg export --formats onnx,pt2'


@pytest.fixture(scope='module')
def onnx_only(tmp_path_factory: pytest.TempPathFactory, model: DeployModel) -> Path:
    folder = tmp_path_factory.mktemp('onnx_only')
    export_artifact(model, folder / 'lite', size=SIZE, batch=BATCH, check_images=1,
                    thresholds={'tpr95': -3.0}, formats=('onnx',))
    assert sorted(p.name for p in folder.iterdir()) == ['lite.json', 'lite.onnx']
    return folder / 'lite.json'


@pytest.mark.parametrize(('backend', 'device'), [('torch', 'cpu'), ('torch', 'cuda'),
                                                 ('tensorrt', 'cuda')])
def test_pt2_backends_refuse_an_onnx_only_artifact(onnx_only: Path, backend: str,
                                                   device: str) -> None:
    with pytest.raises(BackendError, match=f'backend {backend} runs NAME.pt2, but {NO_PT2}'):
        backends.load(onnx_only, backend=backend, device=device)
    sidecar = read_sidecar(onnx_only)
    with pytest.raises(BackendError, match=NO_PT2):
        backends.TorchSegmenter(sidecar, 'cpu', 'fp32', 'requested')


def test_onnx_only_artifact_runs_in_onnxruntime(onnx_only: Path, model: DeployModel,
                                                frames: np.ndarray) -> None:
    for backend in ('auto', 'onnxruntime'):
        segmenter = backends.load(onnx_only, backend=backend, device='cpu')
        assert segmenter.backend == 'onnxruntime'
        _assert_agrees(segmenter(frames), _eager(model, frames))


def test_auto_on_cuda_skips_torch_and_tensorrt_for_an_onnx_only_artifact(
        onnx_only: Path, artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a GPU machine: torch sees CUDA.
    monkeypatch.setattr(backends, '_cuda_unavailable', lambda: '')
    monkeypatch.setattr(backends, '_onnxruntime_gpu_providers', lambda: [])
    lite, full = read_sidecar(onnx_only), read_sidecar(artifact)
    assert backends.choose_backend(full, 'cuda', 'fp16')[0] in ('torch', 'tensorrt')
    backend, device, precision, reason = backends.choose_backend(lite, 'cuda', 'fp16')
    assert (backend, device, precision) == ('onnxruntime', 'cpu', 'fp32')
    assert 'the artifact ships no .pt2 (exported with --formats onnx), so tensorrt and torch ' \
        'cannot run it' in reason
    assert 'fell back to onnxruntime on the CPU' in reason
    monkeypatch.setattr(backends, '_onnxruntime_gpu_providers',
                        lambda: ['CUDAExecutionProvider'])
    backend, device, precision, reason = backends.choose_backend(lite, 'cuda', 'fp16')
    assert (backend, device, precision) == ('onnxruntime', 'cuda', 'fp32')
    assert 'ships no .pt2' in reason and reason.endswith('onnxruntime with CUDAExecutionProvider')


def test_engine_key_of_an_onnx_only_artifact_names_the_fix(onnx_only: Path,
                                                            tmp_path: Path) -> None:
    sidecar = read_sidecar(onnx_only)
    environment = dict.fromkeys(backends.ENGINE_ENVIRONMENT_FIELDS, 'x')
    with pytest.raises(BackendError, match=NO_PT2):
        backends.engine_path(sidecar, 'fp16', tmp_path, environment)
    assert backends.cannot_run(sidecar, 'onnxruntime') == ''
    assert backends.cannot_run(sidecar, 'auto') == ''
