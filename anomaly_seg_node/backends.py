"""Inference backends behind one interface: `load(sidecar, backend, device, precision)`.

A `Segmenter` takes uint8 RGB frames already resized to the artifact's size (`[H, W, 3]` or
`[N, H, W, 3]`), converts them to the graph's float32 NCHW input on the device that runs the
graph, and returns labels in the artifact's dtype (`Sidecar.labels`: int32, or uint8 when
exported with `--label-dtype uint8`) and float32 anomaly scores `[N, H, W]`.

torch, torch_tensorrt and onnxruntime are imported only inside the backend that needs them, so a
missing optional package is a clear BackendError at load time, not an import crash; every
TensorRT import goes through `import_tensorrt`, so a torch_tensorrt that is installed but does
not load (OSError from libnvinfer) is a reason too, and auto falls back past it. An
ONNX-only artifact (exported with `--formats onnx`) runs in onnxruntime only: torch and tensorrt
refuse it, and auto passes them over, saying so in its reason. An int8 artifact (a QDQ graph with
uint8 activations, made for ONNX Runtime's CPU kernels) runs in onnxruntime on the CPU only;
its segmenter reports precision 'int8' whatever precision was asked for.
"""

import abc
from collections.abc import Mapping
from dataclasses import dataclass
import hashlib
import importlib.util
import json
import os
from pathlib import Path
import re
import sys
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from anomaly_seg_node.artifact import Sidecar, missing_format_fix, read_sidecar
from anomaly_seg_node.errors import ArtifactError, BackendError, ConfigError

BACKENDS = ('auto', 'tensorrt', 'torch', 'onnxruntime')
DEVICES = ('cpu', 'cuda')
PRECISIONS = ('fp32', 'fp16')
ENGINE_CACHE_ENV = 'ANOMALY_SEG_ENGINE_CACHE'
# torch.export.load warns for files not ending in .pt2.
ENGINE_SUFFIX = '.pt2'
ENGINE_ENVIRONMENT_FIELDS = ('gpu', 'compute_capability', 'torch', 'torch_tensorrt', 'tensorrt')
# The model file each backend runs (tensorrt compiles its engine from the .pt2).
BACKEND_FILES = {'onnxruntime': 'onnx', 'torch': 'pt2', 'tensorrt': 'pt2'}


class SegmenterOutput(Protocol):
    # Read-only, so frozen results (SegResult) qualify.
    @property
    def labels(self) -> np.ndarray: ...  # int32 or uint8 [N, H, W]

    @property
    def anomaly_score(self) -> np.ndarray: ...  # float32 [N, H, W]


class SegmenterProtocol(Protocol):
    """What a segmenter offers its users (pipeline.FramePipeline): a model at one static input
    size. `Segmenter`, the base of the backends, implements it; so do the tests' stand-ins."""

    input_size: tuple[int, int]  # (H, W)

    def __call__(self, frames: np.ndarray) -> SegmenterOutput: ...


@dataclass(frozen=True)
class SegResult:
    """Per-pixel outputs of one call: labels `[N, H, W]` in the artifact's dtype (int32 or
    uint8), anomaly_score float32."""

    labels: np.ndarray
    anomaly_score: np.ndarray


class Segmenter(SegmenterProtocol, abc.ABC):
    """Base of the backends: input checks, padding to the artifact's batch, result assembly.

    Derived from `SegmenterProtocol` explicitly, so the type check holds the two together."""

    backend = 'none'

    def __init__(self, sidecar: Sidecar, device: str, precision: str, reason: str) -> None:
        self.sidecar = sidecar
        self.input_size = sidecar.input_size
        self.batch = sidecar.input.batch
        self.label_dtype = np.dtype(sidecar.labels.dtype)
        self.device = device
        self.precision = precision
        # Why this backend runs (auto's choice, or 'requested').
        self.reason = reason

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(backend={self.backend!r}, device={self.device!r}, '
                f'precision={self.precision!r}, input_size={self.input_size}, '
                f'batch={self.batch})')

    def __call__(self, frames: np.ndarray) -> SegResult:
        frames = self.check_frames(frames)
        count = frames.shape[0]
        if count < self.batch:
            # The graph has a static batch: pad with black frames, drop their outputs below.
            pad = np.zeros((self.batch - count, *frames.shape[1:]), dtype=np.uint8)
            frames = np.concatenate([frames, pad])
        labels, score = self._infer(np.ascontiguousarray(frames))
        return SegResult(labels=np.ascontiguousarray(labels[:count], dtype=self.label_dtype),
                         anomaly_score=np.ascontiguousarray(score[:count], dtype=np.float32))

    def check_frames(self, frames: Any) -> np.ndarray:
        """`frames` as uint8 `[N, H, W, 3]`, or a BackendError that names the problem."""
        height, width = self.input_size
        expected = (f'uint8 RGB frames of shape [{height}, {width}, 3] or '
                    f'[N<={self.batch}, {height}, {width}, 3]')
        if not isinstance(frames, np.ndarray):
            raise BackendError(f'expected {expected} as a numpy array, found '
                               f'{type(frames).__name__}; pass numpy arrays')
        if frames.dtype != np.uint8:
            raise BackendError(
                f'expected {expected}, found dtype {frames.dtype}; convert the decoded image '
                'to uint8 0..255 (the float conversion happens inside the backend)')
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4:
            raise BackendError(f'expected {expected}, found shape {list(frames.shape)}')
        if frames.shape[3] != 3:
            raise BackendError(
                f'expected {expected}, found {frames.shape[3]} channels; decode to RGB first '
                '(drop alpha, expand mono)')
        if frames.shape[1:3] != (height, width):
            raise BackendError(
                f'expected {expected}, found frames of {frames.shape[1]}x{frames.shape[2]}; '
                f'resize to the artifact size {height}x{width} (H x W) first')
        if not 1 <= frames.shape[0] <= self.batch:
            raise BackendError(
                f'expected {expected}, found a batch of {frames.shape[0]}; this artifact takes '
                f'at most {self.batch} frames per call (re-export with --batch to change it)')
        return frames

    @abc.abstractmethod
    def _infer(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the graph on exactly `batch` uint8 frames `[B, H, W, 3]`."""


def cannot_run(sidecar: Sidecar, backend: str) -> str:
    """'' when the artifact ships the file `backend` runs, else why not and the fix."""
    kind = BACKEND_FILES.get(backend)
    if kind is None or sidecar.has(kind):
        return ''
    if sidecar.precision == 'int8':
        return (f'backend {backend} runs NAME.{kind}, but {sidecar.source or "this artifact"} '
                f'is an int8 artifact: {int8_note(sidecar)}')
    return (f'backend {backend} runs NAME.{kind}, but {missing_format_fix(kind)} '
            f'(artifact {sidecar.source or "not read from a file"}; or use backend onnxruntime)')


def require_file(sidecar: Sidecar, backend: str) -> None:
    """BackendError naming the fix when the artifact lacks the file `backend` runs."""
    why = cannot_run(sidecar, backend)
    if why:
        raise BackendError(why)


def int8_note(sidecar: Sidecar) -> str:
    """Where an int8 artifact runs, and what to use elsewhere."""
    reference = sidecar.quantization.get('reference', {})
    fp32 = reference.get('sidecar') if isinstance(reference, Mapping) else None
    return ('its .onnx is a statically quantised QDQ graph (uint8 activations) made for '
            'onnxruntime on the CPU; use backend onnxruntime with device cpu, or the fp32 '
            f'artifact {fp32 or "it was made from"} for the GPU, torch and tensorrt')


class OnnxRuntimeSegmenter(Segmenter):
    """NAME.onnx in ONNX Runtime: CPU, or the TensorRT / CUDA execution providers on 'cuda'."""

    backend = 'onnxruntime'

    def __init__(self, sidecar: Sidecar, device: str, precision: str, reason: str,
                 engine_cache_dir: str | os.PathLike | None = None, threads: int = 0) -> None:
        ort = _import('onnxruntime', 'onnxruntime', "'onnxruntime>=1.20'")
        options = session_options(ort, threads)
        available = ort.get_available_providers()
        if sidecar.precision == 'int8':
            # The graph fixes the precision; the CUDA provider would dequantise every layer and
            # TensorRT takes symmetric int8 activations only.
            if device != 'cpu':
                raise BackendError(f'device {device} asked, but {int8_note(sidecar)}')
            precision = 'fp32'
        if device == 'cpu':
            if precision != 'fp32':
                raise BackendError(
                    'onnxruntime on the CPU runs the float32 graph only; use precision fp32, '
                    'or device cuda with the torch or tensorrt backend for fp16')
            providers: list[Any] = ['CPUExecutionProvider']
        else:
            gpu = [name for name in ('TensorrtExecutionProvider', 'CUDAExecutionProvider')
                   if name in available]
            if not gpu:
                raise BackendError(
                    f'device cuda asked, but this onnxruntime offers only {available}; '
                    'install onnxruntime-gpu (CUDA build) or use device cpu')
            if precision == 'fp16' and 'TensorrtExecutionProvider' not in gpu:
                raise BackendError(
                    'fp16 in onnxruntime needs its TensorRT execution provider, which this '
                    'onnxruntime lacks; use precision fp32 or the torch/tensorrt backend')
            providers = []
            for name in gpu:
                if name == 'TensorrtExecutionProvider':
                    # ORT builds its own engine at session start; cache it between runs.
                    cache = default_engine_cache_dir(engine_cache_dir) / 'onnxruntime'
                    cache.mkdir(parents=True, exist_ok=True)
                    providers.append((name, {'trt_fp16_enable': precision == 'fp16',
                                             'trt_engine_cache_enable': True,
                                             'trt_engine_cache_path': str(cache)}))
                else:
                    providers.append(name)
            providers.append('CPUExecutionProvider')
        super().__init__(sidecar, device, precision, reason)
        path = sidecar.file_path('onnx')
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # ORT's own classes: InvalidProtobuf, InvalidGraph, Fail, ...
            raise _session_error(error, path, providers) from None
        self.providers = self.session.get_providers()
        self.threads = threads
        # A listed GPU provider can still fail to start (missing CUDA/TensorRT libraries);
        # ORT then falls back silently, which must not pass for what was asked.
        if device == 'cuda' and self.providers == ['CPUExecutionProvider']:
            raise BackendError(
                f'onnxruntime could not start {gpu} (see its log: CUDA/cuDNN libraries '
                'missing?); fix the CUDA installation or use device cpu')
        if precision == 'fp16' and 'TensorrtExecutionProvider' not in self.providers:
            raise BackendError(
                'onnxruntime could not start its TensorRT execution provider, so fp16 is not '
                'available; install TensorRT for onnxruntime, or use precision fp32')
        check_onnx_signature(self.session, sidecar, path)
        if sidecar.precision == 'int8':
            self.precision = 'int8'

    def _infer(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # ONNX Runtime feeds from host memory, so the host is the right place to convert.
        # One pass into a contiguous NCHW buffer; a strided view would make ORT copy it again.
        image = np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32)
        labels, score = self.session.run(['labels', 'anomaly_score'], {'image': image})
        return labels, score


def check_threads(threads: Any, name: str = 'ort_threads') -> int:
    """ONNX Runtime intra-op threads as an int >= 0 (0: ONNX Runtime's default, one per
    physical core), or a ConfigError naming ``name``."""
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
        raise ConfigError(f'{name} must be an integer >= 0 (0: the onnxruntime default), '
                          f'got {threads!r}')
    return int(threads)


def session_options(ort: Any, threads: int = 0) -> Any:
    """onnxruntime.SessionOptions with ``threads`` intra-op threads (0: ONNX Runtime's
    default); the one place the backend and the bench set them."""
    threads = check_threads(threads)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return options


# ONNX element types (as ONNX Runtime names them) of the sidecar's dtypes.
_ORT_TYPES = {'float32': 'tensor(float)', 'int32': 'tensor(int32)', 'uint8': 'tensor(uint8)'}
# ONNX Runtime errors that mean the file itself is no usable graph.
_ORT_FILE_ERRORS = ('InvalidProtobuf', 'InvalidGraph', 'NoModel', 'NoSuchFile')


def check_onnx_signature(session: Any, sidecar: Sidecar, path: Path) -> None:
    """ArtifactError unless the graph's inputs and outputs (names, element types, static
    shapes) are what the sidecar declares: a .onnx from another export fails here, at load,
    instead of in ONNX Runtime at the first frame."""
    batch, height, width = sidecar.input.batch, sidecar.input.height, sidecar.input.width
    expected = {'image': ('float32', [batch, 3, height, width])}
    expected.update({name: (spec['dtype'], spec['shape'])
                     for name, spec in sidecar.outputs.items()})
    found = {arg.name: (arg.type, arg.shape)
             for arg in [*session.get_inputs(), *session.get_outputs()]}
    inputs = [arg.name for arg in session.get_inputs()]
    outputs = [arg.name for arg in session.get_outputs()]
    problems = []
    if inputs != ['image'] or sorted(outputs) != sorted(sidecar.outputs):
        problems.append(f'the graph has inputs {inputs} and outputs {outputs}, the sidecar '
                        f"expects input ['image'] and outputs {list(sidecar.outputs)}")
    else:
        for name, (dtype, shape) in expected.items():
            kind, dims = found[name]
            if kind != _ORT_TYPES[dtype] or list(dims) != shape:
                problems.append(f'{name!r} is {_words(kind)} {list(dims)} in the graph, '
                                f'{dtype} {shape} in the sidecar')
    if problems:
        raise ArtifactError(
            f'{path} does not match its sidecar {sidecar.source}: {"; ".join(problems)}. The '
            'two files come from different exports: re-export the artifact with anomaly-seg '
            'export (or put back the .onnx that belongs to this sidecar)')


def _words(ort_type: str) -> str:
    """ONNX Runtime's 'tensor(float)' in the sidecar's spelling, 'float32'."""
    name = ort_type.removeprefix('tensor(').removesuffix(')')
    return {'float': 'float32', 'double': 'float64'}.get(name, name)


def _session_error(error: Exception, path: Path, providers: list[Any]) -> Exception:
    """The project's error for an ONNX Runtime session that does not start."""
    if type(error).__name__ in _ORT_FILE_ERRORS or 'Load model from' in str(error):
        return ArtifactError(
            f'{path} is not a valid ONNX graph ({type(error).__name__}: {error}); a sha256 '
            'that matches the sidecar only proves the sidecar was written for these bytes: '
            're-export the artifact with anomaly-seg export')
    names = [p if isinstance(p, str) else p[0] for p in providers]
    return BackendError(
        f'onnxruntime could not start a session for {path} with {names} '
        f'({type(error).__name__}: {error}); check the onnxruntime installation and its '
        'execution providers, or use device cpu')


class TorchSegmenter(Segmenter):
    """NAME.pt2 (torch.export ExportedProgram) on CPU or CUDA; float16 on CUDA."""

    backend = 'torch'

    def __init__(self, sidecar: Sidecar, device: str, precision: str, reason: str,
                 module: Any = None) -> None:
        if module is None:
            require_file(sidecar, 'torch')
        torch = _import('torch', 'torch', "'torch==2.14.*'")
        _check_torch_device(torch, device, precision)
        super().__init__(sidecar, device, precision, reason)
        self.torch = torch
        self.dtype = torch.float16 if precision == 'fp16' else torch.float32
        if module is None:
            program = torch.export.load(str(sidecar.file_path('pt2')))
            if device == 'cuda':
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, 'cuda')
            module = program.module()
            if precision == 'fp16':
                module = _drop_dtype_asserts(torch, module).to(torch.float16)
        self.module = module

    def _infer(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            # Upload uint8 (4x fewer bytes), then convert HWC -> NCHW float on the device.
            image = torch.from_numpy(frames).to(self.device, non_blocking=True)
            image = image.permute(0, 3, 1, 2).to(self.dtype).contiguous()
            labels, score = self.module(image)
            # In the graph's dtype: a uint8 artifact copies a quarter of int32's bytes.
            labels = labels.cpu().numpy()
            score = score.float().cpu().numpy()
        return labels, score


class TensorRTSegmenter(TorchSegmenter):
    """A cached torch-tensorrt engine built from NAME.pt2 by `anomaly-seg build-engine`.

    The engine file is what `torch_tensorrt.save(..., output_format='exported_program')` writes,
    at `engine_path(sidecar, precision, cache_dir)`; its input stays float32 NCHW.
    """

    backend = 'tensorrt'

    def __init__(self, sidecar: Sidecar, device: str, precision: str, reason: str,
                 engine_cache_dir: str | os.PathLike | None = None) -> None:
        require_file(sidecar, 'tensorrt')
        trt = import_tensorrt()
        if isinstance(trt, str):
            raise BackendError(f'{tensorrt_fix(trt)}; or use backend torch/onnxruntime')
        if device != 'cuda':
            raise BackendError('the tensorrt backend runs on a GPU only; use device cuda, '
                               'or backend onnxruntime/torch on the CPU')
        torch = _import('torch', 'torch', "'torch==2.14.*'")
        _check_torch_device(torch, device, precision)
        path = engine_path(sidecar, precision, engine_cache_dir)
        if not path.is_file():
            raise BackendError(
                f'no engine for this artifact/GPU ({path.name} not in {path.parent}); build it '
                f'with: anomaly-seg build-engine --artifact {sidecar.source} '
                f'--precision {precision}')
        self.engine_path = path
        try:
            module = torch.export.load(str(path)).module()
        except Exception as error:
            raise BackendError(
                f'the cached engine {path} does not load ({error}); delete it and rebuild with: '
                f'anomaly-seg build-engine --artifact {sidecar.source} --precision {precision}'
            ) from None
        # The engine keeps a float32 input; fp16 lives inside the engine.
        super().__init__(sidecar, device, 'fp32', reason, module=module)
        self.precision = precision
        self.dtype = torch.float32


def load(sidecar: str | os.PathLike | Sidecar, backend: str = 'auto', device: str = 'cpu',
         precision: str = 'fp32', engine_cache_dir: str | os.PathLike | None = None,
         ort_threads: int = 0) -> Segmenter:
    """Load the artifact into a backend; `auto` records its choice and reason on the result.

    An int8 artifact runs as int8 whatever `precision` asks (the graph fixes it); the result's
    `precision` says 'int8'. `ort_threads`: intra-op threads of an onnxruntime session (0:
    onnxruntime's default); the torch and tensorrt backends do not use it.
    """
    ort_threads = check_threads(ort_threads)
    for name, value, allowed in (('backend', backend, BACKENDS), ('device', device, DEVICES),
                                 ('precision', precision, PRECISIONS)):
        if value not in allowed:
            raise BackendError(f'unknown {name} {value!r}; expected one of {list(allowed)}')
    if not isinstance(sidecar, Sidecar):
        sidecar = read_sidecar(sidecar)
    require_file(sidecar, backend)
    if backend == 'auto':
        backend, device, precision, reason = choose_backend(
            sidecar, device, precision, engine_cache_dir)
    else:
        reason = 'requested'
    if backend == 'onnxruntime':
        return OnnxRuntimeSegmenter(sidecar, device, precision, reason, engine_cache_dir,
                                    ort_threads)
    if backend == 'torch':
        return TorchSegmenter(sidecar, device, precision, reason)
    return TensorRTSegmenter(sidecar, device, precision, reason, engine_cache_dir)


def choose_backend(sidecar: Sidecar, device: str, precision: str,
                   engine_cache_dir: str | os.PathLike | None = None
                   ) -> tuple[str, str, str, str]:
    """auto: tensorrt (engine cached), then torch on CUDA, then onnxruntime.

    Returns (backend, device, precision, reason); onnxruntime runs on its GPU providers when
    torch cannot reach CUDA but onnxruntime can (a vehicle without torch), or when the artifact
    ships no .pt2 (torch and tensorrt need it), else on the CPU.
    """
    if sidecar.precision == 'int8':
        # 'fp32': the runtime setting that runs the graph as it is; the segmenter says int8.
        return ('onnxruntime', 'cpu', 'fp32',
                f'int8 artifact: onnxruntime on the CPU, where its QDQ graph runs (device '
                f'{device} asked)')
    if device == 'cpu':
        note = '' if precision == 'fp32' else ' (fp16 needs cuda: running fp32)'
        return 'onnxruntime', 'cpu', 'fp32', f'device cpu asked: onnxruntime on the CPU{note}'
    if not sidecar.has('pt2'):
        cuda_note = ('the artifact ships no .pt2 (exported with --formats onnx), so tensorrt '
                     'and torch cannot run it')
    else:
        cuda_note = _cuda_unavailable()
    if not cuda_note:
        trt = import_tensorrt()
        if isinstance(trt, str):
            why = trt
        else:
            path = engine_path(sidecar, precision, engine_cache_dir)
            if path.is_file():
                return 'tensorrt', 'cuda', precision, f'cached TensorRT engine {path.name}'
            why = f'no TensorRT engine cached ({path.name} not in {path.parent})'
        return 'torch', 'cuda', precision, f'{why}: torch ExportedProgram on CUDA'
    gpu = _onnxruntime_gpu_providers()
    if gpu:
        fp = precision if 'TensorrtExecutionProvider' in gpu else 'fp32'
        return ('onnxruntime', 'cuda', fp,
                f'device cuda asked but {cuda_note}: onnxruntime with {", ".join(gpu)}')
    return ('onnxruntime', 'cpu', 'fp32',
            f'device cuda asked but {cuda_note} and onnxruntime has no GPU provider: '
            'fell back to onnxruntime on the CPU')


def _onnxruntime_gpu_providers() -> list[str]:
    if importlib.util.find_spec('onnxruntime') is None:
        return []
    import onnxruntime

    return [name for name in ('TensorrtExecutionProvider', 'CUDAExecutionProvider')
            if name in onnxruntime.get_available_providers()]


def _cuda_unavailable() -> str:
    """'' when torch sees a CUDA device, else why not."""
    if importlib.util.find_spec('torch') is None:
        return 'torch is not installed'
    import torch

    if not torch.cuda.is_available():
        return 'torch sees no CUDA device'
    return ''


def engine_environment() -> dict[str, str]:
    """This machine's part of the engine cache key: GPU, compute capability and versions.

    BackendError when torch_tensorrt does not import (not installed, or a build that does not
    match this machine's TensorRT/CUDA libraries).
    """
    torch_tensorrt = import_tensorrt()
    if isinstance(torch_tensorrt, str):
        raise BackendError(tensorrt_fix(torch_tensorrt))
    import torch

    tensorrt = import_tensorrt('tensorrt')
    return {
        'gpu': torch.cuda.get_device_name(),
        'compute_capability': '.'.join(map(str, torch.cuda.get_device_capability())),
        'torch': torch.__version__,
        'torch_tensorrt': torch_tensorrt.__version__,
        'tensorrt': 'unknown' if isinstance(tensorrt, str) else tensorrt.__version__,
    }


TENSORRT_REQUIREMENT = "'torch-tensorrt==2.14.*'"
TENSORRT_MODULES = ('torch_tensorrt', 'tensorrt')


def import_tensorrt(name: str = 'torch_tensorrt') -> ModuleType | str:
    """The TensorRT module `name` (torch_tensorrt or tensorrt), or why it cannot be used.

    Every TensorRT import of the runtime goes through here. A vehicle's usual mismatch, a
    torch_tensorrt wheel built for another TensorRT or CUDA, fails inside the import with an
    OSError from libnvinfer (or an ImportError of a missing symbol, a RuntimeError of a version
    check); the caller gets a short reason instead ('torch_tensorrt is not installed',
    'torch_tensorrt does not import (OSError: ...)'), so `backend: auto` can fall back and
    the others can name the fix (`tensorrt_fix`).
    """
    if name not in TENSORRT_MODULES:
        raise ValueError(f'import_tensorrt imports {TENSORRT_MODULES}, not {name!r}')
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name in (None, name):
            return f'{name} is not installed'
        return f'{name} does not import ({type(error).__name__}: {error})'
    except Exception as error:  # OSError from libnvinfer, ImportError, RuntimeError, ...
        return f'{name} does not import ({type(error).__name__}: {error})'


def tensorrt_fix(reason: str) -> str:
    """A reason from `import_tensorrt`, followed by how to fix it."""
    name = reason.split(' ', 1)[0]
    if reason.endswith(' is not installed'):
        return missing_package(name, TENSORRT_REQUIREMENT)
    return (f"{reason}; install the torch-tensorrt build that matches torch and this machine's "
            f'TensorRT and CUDA libraries: pip install {TENSORRT_REQUIREMENT}')


def engine_cache_key(sidecar: Sidecar, precision: str,
                     environment: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a TensorRT engine depends on: artifact, GPU, versions and precision.

    `environment` is `engine_environment()`, probed here when not given.
    """
    require_file(sidecar, 'tensorrt')
    if environment is None:
        environment = engine_environment()
    return {
        'artifact_sha256': sidecar.files['pt2'].sha256,
        **{name: str(environment[name]) for name in ENGINE_ENVIRONMENT_FIELDS},
        'precision': precision,
    }


def engine_path(sidecar: Sidecar, precision: str,
                cache_dir: str | os.PathLike | None = None,
                environment: Mapping[str, str] | None = None) -> Path:
    """Where `anomaly-seg build-engine` caches the engine of this artifact on this machine."""
    key = engine_cache_key(sidecar, precision, environment)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    gpu = re.sub(r'[^A-Za-z0-9]+', '-', key['gpu']).strip('-').lower()
    stem = Path(sidecar.files['pt2'].name).stem
    name = f'{stem}.{gpu}.{precision}.{digest}{ENGINE_SUFFIX}'
    return default_engine_cache_dir(cache_dir) / name


def default_engine_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $ANOMALY_SEG_ENGINE_CACHE, else ~/.cache/anomaly_seg/engines."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(ENGINE_CACHE_ENV):
        return Path(os.environ[ENGINE_CACHE_ENV])
    return Path.home() / '.cache' / 'anomaly_seg' / 'engines'


def _check_torch_device(torch: Any, device: str, precision: str) -> None:
    if device == 'cuda' and not torch.cuda.is_available():
        raise BackendError('device cuda asked, but torch sees no CUDA device; use device cpu '
                           '(or backend auto, which falls back to the CPU)')
    if device == 'cpu' and precision == 'fp16':
        raise BackendError('fp16 runs on cuda only; use precision fp32 on the CPU')


def _drop_dtype_asserts(torch: Any, module: Any) -> Any:
    """Remove the float32 metadata asserts torch.export traced, so the graph runs in fp16."""
    target = torch.ops.aten._assert_tensor_metadata.default
    for graph_module in module.modules():
        if not isinstance(graph_module, torch.fx.GraphModule):
            continue
        for node in list(graph_module.graph.nodes):
            if node.op == 'call_function' and node.target is target and not node.users:
                graph_module.graph.erase_node(node)
        graph_module.recompile()
    return module


def missing_package(package: str, requirement: str) -> str:
    """Why `package` cannot be imported and how to fix it, naming the running interpreter: a
    console script built outside the virtual environment runs another Python than the one
    the packages went into."""
    python = sys.executable or 'python3'
    return (f'{package} is not installed for {python}, the Python this runs under; start from '
            'the environment that has it (activate that virtual environment before ros2 run / '
            'ros2 launch: the installed anomaly_seg_node runs the first python3 on PATH), or '
            f'install it for this Python ({python} -m pip install {requirement})')


def _import(module: str, package: str, requirement: str) -> Any:
    if importlib.util.find_spec(module) is None:
        raise BackendError(missing_package(package, requirement))
    return importlib.import_module(module)
