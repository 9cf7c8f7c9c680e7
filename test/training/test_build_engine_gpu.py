"""build-engine on a tiny exported SwiftNet: build, verify, cache, reuse, load (GPU), and the
verification path on the CPU (the FP32 graph against itself and against a perturbed copy)."""

import argparse
import importlib.util
from pathlib import Path
import sys
import types
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from anomaly_seg_node import backends, build_engine
from anomaly_seg_node.artifact import read_sidecar
from anomaly_seg_node.build_engine import (
    CalibrationSource,
    read_record,
    record_path,
    run_module,
    verification_failures,
    verification_figures,
)
from anomaly_seg_node.check_images import road_like_images
from anomaly_seg_node.errors import BackendError
from training.export import DeployModel, export_artifact
from training.networks.swiftnet import SwiftNet

SIZE = (64, 96)
BATCH = 2


def _swiftnet() -> DeployModel:
    """SwiftNet-RN18, random init, heads redrawn so that several classes and scores appear."""
    torch.manual_seed(0)
    net = SwiftNet(12, outlier_head=True)
    with torch.no_grad():
        for head in (net.class_head, net.outlier_head):
            head.conv.weight.normal_(0.0, head.conv.weight.shape[1] ** -0.5)
    return DeployModel(net, 'DH').eval()


@pytest.fixture(scope='module')
def model() -> DeployModel:
    return _swiftnet()


@pytest.fixture(scope='module')
def artifact(tmp_path_factory: pytest.TempPathFactory, model: DeployModel) -> Path:
    folder = tmp_path_factory.mktemp('artifact')
    export_artifact(model, folder / 'swift', size=SIZE, batch=BATCH, check_images=2,
                    thresholds={'tpr95': -6.0})
    return folder / 'swift.json'


@pytest.fixture(scope='module')
def frames() -> np.ndarray:
    return road_like_images(5, *SIZE, seed=21)


def _eager(model: DeployModel, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        labels, score = model(torch.from_numpy(frames).permute(0, 3, 1, 2).float())
    return labels.numpy(), score.numpy()


# CPU: the verification path ----------------------------------------------------------------

def test_model_predicts_several_classes(model: DeployModel, frames: np.ndarray) -> None:
    labels, score = _eager(model, frames)
    counts = np.bincount(labels.ravel(), minlength=12) / labels.size
    assert (counts > 0.02).sum() >= 3
    assert np.mean(score > -6.0) > 0.05 and np.mean(score <= -6.0) > 0.05


def test_fp32_graph_verifies_against_itself_and_a_perturbed_copy_fails(
        artifact: Path, model: DeployModel, frames: np.ndarray) -> None:
    program = torch.export.load(str(read_sidecar(artifact).file_path('pt2'))).module()
    reference = run_module(program, frames, BATCH, 'cpu')
    assert reference[0].dtype == np.int32 and reference[1].dtype == np.float32
    assert reference[0].shape == (5, *SIZE)
    eager = _eager(model, frames)
    assert np.mean(reference[0] == eager[0]) >= 0.999
    figures = verification_figures(reference, run_module(program, frames, BATCH, 'cpu'), -6.0)
    assert figures['label_agreement'] == 1.0 and figures['score_diff_over_std'] == 0.0
    assert verification_failures(figures, 'fp32') == []

    def perturbed(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels, score = program(image)
        # What a broken engine could do: a shifted score and a class swapped on a band.
        labels = labels.clone()
        labels[:, :4] = (labels[:, :4] + 1) % 12
        return labels, score + 0.1 * score.std()

    figures = verification_figures(reference, run_module(perturbed, frames, BATCH, 'cpu'), -6.0)
    assert figures['label_agreement'] == pytest.approx(1 - 4 / SIZE[0])
    problems = verification_failures(figures, 'fp16')
    assert problems[0].startswith('label_agreement is 0.9375, needs >= 0.99')
    assert any(p.startswith('mean_score_diff_over_std') for p in problems)


def test_synthetic_calibration_images() -> None:
    images, source = CalibrationSource(synthetic=3).load(*SIZE)
    assert images.shape == (3, *SIZE, 3) and images.dtype == np.uint8
    assert source == '3 synthetic road-like images'
    np.testing.assert_array_equal(images, road_like_images(3, *SIZE, seed=0))


# CPU: the build path with a stand-in for torch_tensorrt ------------------------------------

ENV = {'gpu': 'Stand-in GPU', 'compute_capability': '0.0', 'torch': torch.__version__,
       'torch_tensorrt': '0.0', 'tensorrt': '0.0'}


class StandInCompiler:
    """torch_tensorrt 2.14's compile/save contract on the CPU: the 'engine' is the graph
    itself, re-exported (optionally with its score shifted, as a broken engine would be).

    The signatures are the head of torch-tensorrt 2.14's `torch_tensorrt.dynamo.compile` and
    `torch_tensorrt.save`, including their **kwargs, which swallow unknown keywords (such as
    the retired enabled_precisions / use_explicit_typing): what lands there is recorded, and
    the tests require it to be empty.
    """

    def __init__(self, shift: float = 0.0, fail: bool = False, fail_save: bool = False) -> None:
        self.shift = shift
        self.fail = fail
        self.fail_save = fail_save
        self.calls: list[dict[str, Any]] = []
        self.saves: list[dict[str, Any]] = []

    def compile(self, exported_program: Any, inputs: Any = None, *, arg_inputs: Any = None,
                kwarg_inputs: Any = None, device: Any = None, disable_tf32: bool = False,
                min_block_size: int = 5, enable_autocast: bool = False,
                autocast_low_precision_type: Any = None, **kwargs: Any) -> Any:
        self.calls.append({'inputs': inputs, 'arg_inputs': arg_inputs,
                           'disable_tf32': disable_tf32, 'enable_autocast': enable_autocast,
                           'autocast_low_precision_type': autocast_low_precision_type,
                           'ignored': kwargs})
        if self.fail:
            raise RuntimeError('unsupported operator aten::stand_in')
        return _Shifted(exported_program.module(), self.shift)

    def save(self, module: Any, file_path: str = '', *, extra_files: Any = None,
             output_format: str = 'exported_program', inputs: Any = None,
             arg_inputs: Any = None, kwarg_inputs: Any = None, retrace: bool = True,
             **kwargs: Any) -> None:
        self.saves.append({'output_format': output_format, 'inputs': inputs,
                           'arg_inputs': arg_inputs, 'ignored': kwargs})
        if self.fail_save:
            Path(file_path).write_bytes(b'half an engine')
            raise OSError('disk full')
        torch.export.save(torch.export.export(module, tuple(arg_inputs)), file_path)


class _Shifted(torch.nn.Module):
    def __init__(self, inner: Any, shift: float) -> None:
        super().__init__()
        self.inner = inner
        self.shift = shift

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels, score = self.inner(image)
        return labels, score + self.shift


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(compiler: StandInCompiler) -> StandInCompiler:
        module = types.ModuleType('torch_tensorrt')
        module.__version__ = '0.0'
        module.dynamo = types.SimpleNamespace(compile=compiler.compile)
        module.save = compiler.save
        monkeypatch.setitem(sys.modules, 'torch_tensorrt', module)
        monkeypatch.setattr(build_engine, 'ENGINE_DEVICE', 'cpu')
        monkeypatch.setattr(build_engine, 'engine_environment', lambda: dict(ENV))
        monkeypatch.setattr(build_engine, 'check_build_requirements', lambda: None)
        return compiler
    return install


def test_build_verify_cache_and_reuse_with_a_stand_in(stand_in: Any, artifact: Path,
                                                      tmp_path: Path) -> None:
    compiler = stand_in(StandInCompiler())
    sidecar = read_sidecar(artifact)
    logs, log = _logs()
    report = build_engine.build_engine(sidecar, 'fp32', tmp_path,
                                       CalibrationSource(synthetic=3), log=log)
    engine = backends.engine_path(sidecar, 'fp32', tmp_path, ENV)
    assert report['engine'] == str(engine) and not report['reused']
    assert report['label_agreement'] == 1.0 and report['score_diff_over_std'] == 0.0
    assert report['calibration'] == '3 synthetic road-like images'
    assert [level for level, message in logs if 'BUILDING A TENSORRT ENGINE (fp32)' in message] \
        == ['warning']
    call, = compiler.calls
    assert call['disable_tf32'] is True and call['enable_autocast'] is False
    assert call['inputs'] is None and call['arg_inputs'][0].shape == (BATCH, 3, *SIZE)
    assert call['ignored'] == {}
    save, = compiler.saves
    assert save['output_format'] == 'exported_program' and save['ignored'] == {}
    assert save['inputs'] is None and save['arg_inputs'][0].shape == (BATCH, 3, *SIZE)
    record = read_record(record_path(engine))
    assert record.key == backends.engine_cache_key(sidecar, 'fp32', ENV)
    assert record.engine == engine.name and record.passed
    assert record.verification['images'] == 3
    assert record.build['options'] == {'disable_tf32': True}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([engine.name,
                                                                 record_path(engine).name])
    # The saved engine is what the runtime loads.
    labels, score = run_module(torch.export.load(str(engine)).module(),
                               road_like_images(2, *SIZE, seed=4), BATCH, 'cpu')
    assert labels.shape == (2, *SIZE) and np.isfinite(score).all()

    again = build_engine.build_engine(sidecar, 'fp32', tmp_path, log=log)
    assert again['reused'] and len(compiler.calls) == 1
    assert build_engine.ensure_engine(sidecar, 'fp32', tmp_path, False, log) == engine
    forced = build_engine.build_engine(sidecar, 'fp32', tmp_path,
                                       CalibrationSource(synthetic=1), force=True, log=log)
    assert not forced['reused'] and len(compiler.calls) == 2
    assert read_record(record_path(engine)).verification['images'] == 1


def test_engine_that_disagrees_is_not_cached(stand_in: Any, artifact: Path,
                                             tmp_path: Path) -> None:
    compiler = stand_in(StandInCompiler(shift=0.5))
    with pytest.raises(BackendError, match='the fp16 engine of swift.pt2 disagrees with the '
                                           'FP32 graph .*It was not cached.*--precision fp32'):
        build_engine.build_engine(read_sidecar(artifact), 'fp16', tmp_path,
                                  CalibrationSource(synthetic=2), log=_logs()[1])
    assert list(tmp_path.iterdir()) == []
    call, = compiler.calls  # fp16 through 2.14's rule-based autocast, strong typing kept
    assert call['enable_autocast'] is True
    assert call['autocast_low_precision_type'] is torch.float16
    assert call['disable_tf32'] is False and call['ignored'] == {}


class OlderCompiler(StandInCompiler):
    """A torch-tensorrt before autocast (enabled_precisions picked fp16 kernels)."""

    def compile(self, exported_program: Any, inputs: Any = None, *, arg_inputs: Any = None,
                disable_tf32: bool = False, enabled_precisions: Any = None,
                **kwargs: Any) -> Any:
        raise AssertionError('not called: the build refuses this API first')


def test_another_torch_tensorrt_generation_is_refused(stand_in: Any, artifact: Path,
                                                      tmp_path: Path) -> None:
    stand_in(OlderCompiler())
    with pytest.raises(BackendError, match='torch_tensorrt 0.0 has no enable_autocast, '
                                           'autocast_low_precision_type in torch_tensorrt'):
        build_engine.build_engine(read_sidecar(artifact), 'fp16', tmp_path,
                                  CalibrationSource(synthetic=1), log=_logs()[1])
    assert list(tmp_path.iterdir()) == []


def test_compile_failure_names_the_fixes(stand_in: Any, artifact: Path,
                                         tmp_path: Path) -> None:
    stand_in(StandInCompiler(fail=True))
    logs, log = _logs()
    with pytest.raises(BackendError, match='could not compile swift.pt2 .RuntimeError: '
                                           'unsupported operator.*try --precision fp32'):
        build_engine.build_engine(read_sidecar(artifact), 'fp16', tmp_path,
                                  CalibrationSource(synthetic=1), log=log)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BackendError, match='no verified TensorRT engine.*build-engine'):
        build_engine.ensure_engine(read_sidecar(artifact), 'fp16', tmp_path, False, log)


def test_save_failure_leaves_no_partial_engine(stand_in: Any, artifact: Path,
                                               tmp_path: Path) -> None:
    stand_in(StandInCompiler(fail_save=True))
    with pytest.raises(BackendError, match='compiled but does not save and load back '
                                           '.OSError: disk full'):
        build_engine.build_engine(read_sidecar(artifact), 'fp32', tmp_path,
                                  CalibrationSource(synthetic=1), log=_logs()[1])
    assert list(tmp_path.iterdir()) == []


# GPU: build, cache, reuse, load ------------------------------------------------------------

def _logs() -> tuple[list[tuple[str, str]], Any]:
    logs: list[tuple[str, str]] = []
    return logs, lambda level, message: logs.append((level, message))


@pytest.fixture(scope='module')
def fp16_engine(tmp_path_factory: pytest.TempPathFactory, artifact: Path,
                frames: np.ndarray) -> tuple[dict[str, Any], Path]:
    """The fp16 engine, built through the command with a folder of calibration frames."""
    if importlib.util.find_spec('torch_tensorrt') is None:
        pytest.skip('torch_tensorrt is not installed')
    cache = tmp_path_factory.mktemp('engines')
    folder = tmp_path_factory.mktemp('frames')
    for index, frame in enumerate(frames):
        assert cv2.imwrite(str(folder / f'{index:03d}.png'), frame[..., ::-1])
    parser = argparse.ArgumentParser()
    build_engine.add_arguments(parser)
    args = parser.parse_args(['--artifact', str(artifact), '--cache-dir', str(cache),
                              '--calibration-images', str(folder)])
    return build_engine.run(args), cache


@pytest.mark.gpu
def test_fp16_engine_is_built_verified_and_recorded(
        fp16_engine: tuple[dict[str, Any], Path], artifact: Path) -> None:
    report, cache = fp16_engine
    sidecar = read_sidecar(artifact)
    engine = Path(report['engine'])
    assert engine == backends.engine_path(sidecar, 'fp16', cache) and engine.is_file()
    assert not report['reused'] and report['precision'] == 'fp16'
    assert report['gpu'] == torch.cuda.get_device_name()
    assert report['calibration'].startswith('5 images of ')
    assert report['label_agreement'] >= 0.99
    assert report['mask_agreement'] >= 0.99
    record = read_record(record_path(engine))
    assert record.passed and record.key == backends.engine_cache_key(sidecar, 'fp16')
    assert record.verification['images'] == 5
    assert record.verification['threshold'] == -6.0
    assert record.verification['threshold_name'] == 'tpr95'
    assert record.build['tensorrt_blocks'] >= 1


@pytest.mark.gpu
def test_cached_engine_is_reused(fp16_engine: tuple[dict[str, Any], Path],
                                 artifact: Path) -> None:
    report, cache = fp16_engine
    engine = Path(report['engine'])
    stamp = engine.stat().st_mtime_ns
    logs, log = _logs()
    again = build_engine.build_engine(read_sidecar(artifact), 'fp16', cache, log=log)
    assert again['reused'] and again['engine'] == report['engine']
    assert again['label_agreement'] == report['label_agreement']
    assert engine.stat().st_mtime_ns == stamp
    assert not any('BUILDING' in message for _, message in logs)
    assert build_engine.ensure_engine(read_sidecar(artifact), 'fp16', cache,
                                      allow_build=False, log=log) == engine


@pytest.mark.gpu
def test_tensorrt_backend_loads_the_engine(fp16_engine: tuple[dict[str, Any], Path],
                                           artifact: Path, model: DeployModel,
                                           frames: np.ndarray) -> None:
    _, cache = fp16_engine
    segmenter = backends.load(artifact, backend='tensorrt', device='cuda', precision='fp16',
                              engine_cache_dir=cache)
    assert (segmenter.backend, segmenter.precision) == ('tensorrt', 'fp16')
    result = segmenter(frames[:BATCH])
    labels, score = _eager(model, frames[:BATCH])
    assert np.mean(result.labels == labels) >= 0.99
    assert np.mean(np.abs(result.anomaly_score - score)) <= 0.02 * score.std()
    auto = backends.load(artifact, backend='auto', device='cuda', precision='fp16',
                         engine_cache_dir=cache)
    assert auto.backend == 'tensorrt' and 'cached TensorRT engine' in auto.reason


@pytest.mark.gpu
def test_fp32_engine_through_ensure_engine(artifact: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec('torch_tensorrt') is None:
        pytest.skip('torch_tensorrt is not installed')
    sidecar = read_sidecar(artifact)
    logs, log = _logs()
    with pytest.raises(BackendError, match='no verified TensorRT engine .*anomaly-seg '
                                           'build-engine --artifact'):
        build_engine.ensure_engine(sidecar, 'fp32', tmp_path, allow_build=False, log=log)
    engine = build_engine.ensure_engine(sidecar, 'fp32', tmp_path, allow_build=True, log=log)
    assert engine == backends.engine_path(sidecar, 'fp32', tmp_path)
    assert any(level == 'warning' and 'BUILDING A TENSORRT ENGINE (fp32)' in message
               for level, message in logs)
    figures = read_record(record_path(engine)).verification['figures']
    assert figures['label_agreement'] >= 0.999
    assert figures['score_diff_over_std'] <= 1e-2
