"""Every TensorRT import goes through `backends.import_tensorrt`: a torch_tensorrt that is
installed but does not load (the usual vehicle mismatch: OSError from libnvinfer) is a reason,
so `backend: auto` falls back and the others name the fix, instead of a raw OSError at
configure. The broken module is a meta-path finder whose loader raises, so this runs without
torch."""

from collections.abc import Iterator
import importlib.abc
import importlib.machinery
import importlib.util
from pathlib import Path
import sys
import types
from typing import Any

import pytest

from anomaly_seg_node import backends, build_engine
from anomaly_seg_node.artifact import read_sidecar
from anomaly_seg_node.backends import import_tensorrt, tensorrt_fix
from anomaly_seg_node.errors import BackendError
from anomaly_seg_node.node_logic import NodeCore

LIBNVINFER = 'libnvinfer.so.10: cannot open shared object file: No such file or directory'


def _tiny_onnx() -> Any:
    path = Path(__file__).parents[1] / 'ros' / 'tiny_onnx.py'
    spec = importlib.util.spec_from_file_location('anomaly_seg_tiny_onnx', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Raising(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `names` and fails while executing them, as a mismatched wheel does."""

    def __init__(self, error: BaseException, names: tuple[str, ...]) -> None:
        self.error = error
        self.names = names
        self.attempts = 0

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname in self.names:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        self.attempts += 1
        raise self.error


def _install(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> _Raising:
    names = ('torch_tensorrt', 'tensorrt')
    finder = _Raising(error, names)
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, 'meta_path', [finder, *sys.meta_path])
    return finder


@pytest.fixture
def broken(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Raising]:
    yield _install(monkeypatch, OSError(LIBNVINFER))


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    return _tiny_onnx().write_artifact(tmp_path, 6, 8, {'tpr95': 100.0})


@pytest.mark.parametrize(('error', 'reason'), [
    (OSError(LIBNVINFER), f'torch_tensorrt does not import (OSError: {LIBNVINFER})'),
    (ImportError('undefined symbol: _ZN3c10'),
     'torch_tensorrt does not import (ImportError: undefined symbol: _ZN3c10)'),
    (RuntimeError('TensorRT 10.3 found, 10.14 required'),
     'torch_tensorrt does not import (RuntimeError: TensorRT 10.3 found, 10.14 required)'),
    (ModuleNotFoundError("No module named 'tensorrt_libs'", name='tensorrt_libs'),
     "torch_tensorrt does not import (ModuleNotFoundError: No module named 'tensorrt_libs')"),
])
def test_a_failing_import_is_a_reason(monkeypatch: pytest.MonkeyPatch, error: BaseException,
                                      reason: str) -> None:
    finder = _install(monkeypatch, error)
    assert import_tensorrt() == reason
    assert finder.attempts == 1
    assert 'torch_tensorrt' not in sys.modules  # a later call tries again
    assert tensorrt_fix(reason) == (
        f"{reason}; install the torch-tensorrt build that matches torch and this machine's "
        "TensorRT and CUDA libraries: pip install 'torch-tensorrt==2.14.*'")


def test_a_missing_module_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, 'torch_tensorrt', None)  # import raises ModuleNotFound
    assert import_tensorrt() == 'torch_tensorrt is not installed'
    assert tensorrt_fix('torch_tensorrt is not installed') == backends.missing_package(
        'torch_tensorrt', "'torch-tensorrt==2.14.*'")


def test_a_module_that_loads_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType('torch_tensorrt')
    monkeypatch.setitem(sys.modules, 'torch_tensorrt', fake)
    assert import_tensorrt() is fake
    with pytest.raises(ValueError, match='not .onnxruntime'):
        import_tensorrt('onnxruntime')


def test_auto_falls_back_to_torch_and_says_why(broken: _Raising, artifact: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, '_cuda_unavailable', lambda: '')  # as if torch saw a GPU
    choice = backends.choose_backend(read_sidecar(artifact), 'cuda', 'fp16', None)
    assert choice == ('torch', 'cuda', 'fp16',
                      f'torch_tensorrt does not import (OSError: {LIBNVINFER}): torch '
                      'ExportedProgram on CUDA')


def test_tensorrt_asked_names_the_fix(broken: _Raising, artifact: Path) -> None:
    with pytest.raises(BackendError) as error:
        backends.load(artifact, backend='tensorrt', device='cuda')
    assert str(error.value) == (
        f'torch_tensorrt does not import (OSError: {LIBNVINFER}); install the torch-tensorrt '
        "build that matches torch and this machine's TensorRT and CUDA libraries: pip install "
        "'torch-tensorrt==2.14.*'; or use backend torch/onnxruntime")
    with pytest.raises(BackendError, match='torch_tensorrt does not import .OSError'):
        backends.engine_environment()


def test_the_engine_build_names_the_fix(broken: _Raising, artifact: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_engine, '_cuda_unavailable', lambda: '')
    assert not build_engine.engine_wanted('auto', 'cuda', read_sidecar(artifact))
    monkeypatch.setattr(build_engine, 'check_build_requirements', lambda: None)
    with pytest.raises(BackendError, match='^cannot build a TensorRT engine: torch_tensorrt '
                                           'does not import .OSError: libnvinfer'):
        build_engine.ensure_engine(read_sidecar(artifact), 'fp16', tmp_path, allow_build=True,
                                   log=lambda level, message: None)


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


class _NoTorch(backends.TorchSegmenter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise BackendError('stand-in: torch sees no CUDA device')


@pytest.mark.skipif(importlib.util.find_spec('onnxruntime') is None,
                    reason='needs onnxruntime')
def test_node_with_backend_auto_configures_on_a_broken_torch_tensorrt(
        broken: _Raising, artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The vehicle: torch sees the GPU, torch_tensorrt is installed but built for another
    # TensorRT. auto passes over tensorrt; here torch cannot run either, so the CPU takes over.
    monkeypatch.setattr(backends, '_cuda_unavailable', lambda: '')
    monkeypatch.setattr(build_engine, '_cuda_unavailable', lambda: '')
    monkeypatch.setattr(backends, 'TorchSegmenter', _NoTorch)
    transport = _Transport()
    core = NodeCore(transport)
    core.configure({'artifact': str(artifact), 'backend': 'auto', 'device': 'auto',
                    'allow_engine_build': True})
    try:
        assert core.state == 'inactive'
        assert (core.segmenter.backend, core.segmenter.device) == ('onnxruntime', 'cpu')
        assert broken.attempts >= 2  # engine_wanted and auto's choice both asked
    finally:
        core.shutdown()
