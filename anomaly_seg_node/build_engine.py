"""`anomaly-seg build-engine`: a TensorRT engine of an artifact for this GPU, verified and cached.

torch-tensorrt compiles NAME.pt2 (the FP32 ExportedProgram, hash-checked through the sidecar) at
the artifact's static input size, FP16 by default, and `torch_tensorrt.save` writes the result as
an ExportedProgram at `backends.engine_path(...)`, a cache keyed by the artifact hash, the GPU and
its compute capability, the torch / torch-tensorrt / TensorRT versions and the precision
(DESIGN.md, "The artifact contract"). Before the engine is moved into the cache, it runs on
calibration images beside the FP32 graph on the CPU: label agreement, anomaly-mask agreement at
the sidecar's default threshold and the score error relative to the score's standard deviation
go into a JSON record beside the engine. An engine that misses the requirements of its precision
is not cached. A cached engine whose key, record and hash match is reused unless forced. An
ONNX-only artifact (exported with `--formats onnx`) has no .pt2 to compile and is refused,
naming the re-export.

The node calls `ensure_engine` at configure when `allow_engine_build` is true. This module
imports torch only inside the functions that build, and torch_tensorrt only through
`backends.import_tensorrt` (a build that does not load is a reason, not a crash). The compile
call is torch-tensorrt 2.14's: strong typing always, fp16 by its rule-based autocast.
"""

import argparse
from collections.abc import Callable, Mapping
import dataclasses
from dataclasses import dataclass
import datetime
import importlib.util
import json
import os
from pathlib import Path
import sys
import tempfile
import time
from typing import Any

import numpy as np

from anomaly_seg_node.artifact import (
    DEFAULT_PAD_MODE,
    Sidecar,
    atomic_write_bytes,
    read_sidecar,
    resolve_threshold,
    sha256_file,
)
from anomaly_seg_node.backends import (
    ENGINE_CACHE_ENV,
    ENGINE_ENVIRONMENT_FIELDS,
    _cuda_unavailable,
    cannot_run,
    engine_cache_key,
    engine_environment,
    engine_path,
    import_tensorrt,
    tensorrt_fix,
)
from anomaly_seg_node.errors import BackendError, ConfigError, DataError
from anomaly_seg_node.metrics import (
    MAX_DIFF_OVER_STD,
    MIN_LABEL_AGREEMENT,
    MIN_MASK_AGREEMENT,
    AgreementShapeError,
    agreement_figures,
)

PRECISIONS = ('fp16', 'fp32')
DEFAULT_PRECISION = 'fp16'
DEFAULT_SYNTHETIC_IMAGES = 8
MAX_CALIBRATION_IMAGES = 64
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.ppm')
RECORD_SCHEMA_VERSION = 1
# Engines are built and verified on the GPU; the tests swap in 'cpu' with a stand-in compiler.
ENGINE_DEVICE = 'cuda'
KEY_FIELDS = ('artifact_sha256', *ENGINE_ENVIRONMENT_FIELDS, 'precision')
RECORDED_FIGURES = ('label_agreement', 'mask_agreement', 'score_diff_over_std',
                    'mean_score_diff_over_std', 'nonfinite_fraction')
INSTALL_TENSORRT = ("pip install 'anomaly_seg[tensorrt]' (torch-tensorrt 2.14 for torch 2.14) "
                    'on the machine with the target GPU')
# The keywords `_build` passes to torch_tensorrt.dynamo.compile (torch-tensorrt 2.14).
COMPILE_KEYWORDS = ('arg_inputs', 'disable_tf32', 'enable_autocast', 'autocast_low_precision_type')
# What an engine must reach against the FP32 graph to be cached: figure -> (comparison, bound).
# fp32: export's agreement bounds and ten times its score tolerance (TensorRT fuses layers and
# picks its own kernels); fp16 is judged by the mean error, since its rounding grows with the
# magnitude of the logits and so peaks at a few pixels.
REQUIREMENTS: dict[str, dict[str, tuple[str, float]]] = {
    'fp32': {'label_agreement': ('>=', MIN_LABEL_AGREEMENT),
             'mask_agreement': ('>=', MIN_MASK_AGREEMENT),
             'score_diff_over_std': ('<=', 10 * MAX_DIFF_OVER_STD),
             'nonfinite_fraction': ('<=', 0.0)},
    'fp16': {'label_agreement': ('>=', 0.99), 'mask_agreement': ('>=', 0.99),
             'mean_score_diff_over_std': ('<=', 0.02), 'nonfinite_fraction': ('<=', 0.0)},
}

Log = Callable[[str, str], None]


# Verification figures (numpy only) ---------------------------------------------------------

def verification_figures(reference: tuple[np.ndarray, np.ndarray],
                         candidate: tuple[np.ndarray, np.ndarray],
                         threshold: float) -> dict[str, float]:
    """Agreement of the engine's (labels, score) `[N, H, W]` with the FP32 graph's.

    The figures of `metrics.agreement_figures`; `nonfinite_fraction` counts NaN/inf scores of
    the engine.
    """
    ref_labels, ref_score = (np.asarray(a) for a in reference)
    labels, score = (np.asarray(a) for a in candidate)
    if labels.size == 0 and labels.shape == ref_labels.shape == score.shape == ref_score.shape:
        raise BackendError('no pixels to compare: give at least one calibration image')
    try:
        return agreement_figures((ref_labels, ref_score), (labels, score), threshold)
    except AgreementShapeError:
        raise BackendError(
            f'the engine returned labels {list(labels.shape)} and scores {list(score.shape)}, '
            f'the FP32 graph {list(ref_labels.shape)} and {list(ref_score.shape)}; the engine '
            'does not match the artifact: rebuild it with --force') from None


def verification_failures(figures: Mapping[str, float], precision: str) -> list[str]:
    """The requirements of `precision` that `figures` misses, in words (empty: it passes)."""
    problems = []
    for name, (comparison, bound) in REQUIREMENTS[_check_precision(precision)].items():
        value = figures[name]
        # Written so that NaN fails both ways.
        ok = value >= bound if comparison == '>=' else value <= bound
        if not ok:
            problems.append(f'{name} is {value:.6g}, needs {comparison} {bound:g}')
    return problems


def verification_threshold(sidecar: Sidecar, reference_score: np.ndarray) -> tuple[float, str]:
    """The anomaly-mask threshold of the check: the sidecar's default, else the FP32 median."""
    if sidecar.default_threshold is not None:
        return resolve_threshold(sidecar), sidecar.default_threshold
    return float(np.median(reference_score)), 'median of the FP32 scores (no default threshold)'


# Engine records ----------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineRecord:
    """The JSON beside an engine: its cache key, hash, source, build and verification figures."""

    key: dict[str, str]
    engine: str
    engine_sha256: str
    artifact: str
    built: str
    build: dict[str, Any]
    verification: dict[str, Any]
    schema_version: int = RECORD_SCHEMA_VERSION

    @property
    def passed(self) -> bool:
        return self.verification.get('passed') is True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def record_path(engine: Path) -> Path:
    """The record of `engine` (NAME.gpu.precision.digest.pt2 -> NAME.gpu.precision.digest.json)."""
    return engine.with_suffix('.json')


def write_record(record: EngineRecord, path: Path) -> Path:
    """Write the record atomically (readers see the old one or the new one)."""
    try:
        text = json.dumps(record.to_dict(), indent=2, allow_nan=False) + '\n'
    except (TypeError, ValueError) as error:
        raise BackendError(f'the engine record is not plain finite JSON ({error})') from None
    atomic_write_bytes(path, text.encode('utf-8'))
    return path


def read_record(path: Path) -> EngineRecord:
    """Read and check an engine record; BackendError naming the fix when it is malformed."""
    fix = 'delete it, or rebuild with anomaly-seg build-engine --force'
    try:
        document = json.loads(Path(path).read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise BackendError(f'engine record {path} does not exist; build the engine with '
                           'anomaly-seg build-engine') from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BackendError(f'engine record {path} is not readable JSON ({error}); {fix}') from None

    def fail(field: str, expected: str) -> None:
        found = document.get(field) if isinstance(document, dict) else document
        raise BackendError(f'engine record {path}: {field or "the document"} must be '
                           f'{expected}, found {found!r:.80}; {fix}')

    if not isinstance(document, dict):
        fail('', 'a JSON object')
    if document.get('schema_version') != RECORD_SCHEMA_VERSION:
        fail('schema_version', f'{RECORD_SCHEMA_VERSION} (this anomaly_seg writes that version)')
    key = document.get('key')
    if not isinstance(key, dict) or sorted(key) != sorted(KEY_FIELDS) \
            or not all(isinstance(v, str) for v in key.values()):
        fail('key', f'an object of strings with the fields {list(KEY_FIELDS)}')
    engine = document.get('engine')
    if not isinstance(engine, str) or not engine or Path(engine).name != engine:
        fail('engine', 'the plain file name of the engine beside the record')
    digest = document.get('engine_sha256')
    if not isinstance(digest, str) or len(digest) != 64 \
            or any(c not in '0123456789abcdef' for c in digest):
        fail('engine_sha256', '64 lower-case hex digits')
    for field in ('artifact', 'built'):
        if not isinstance(document.get(field), str):
            fail(field, 'a string')
    for field in ('build', 'verification'):
        if not isinstance(document.get(field), dict):
            fail(field, 'an object')
    verification = document['verification']
    figures = verification.get('figures')
    if not isinstance(verification.get('passed'), bool) \
            or not isinstance(verification.get('source'), str) \
            or not isinstance(verification.get('threshold_name'), str) \
            or not _is_number(verification.get('threshold')) \
            or not isinstance(figures, dict) \
            or not all(_is_number(figures.get(name)) for name in RECORDED_FIGURES):
        fail('verification', "an object with 'passed' (true or false), 'source', 'threshold', "
                             f"'threshold_name' and 'figures' holding {list(RECORDED_FIGURES)}")
    unknown = sorted(set(document) - {f.name for f in dataclasses.fields(EngineRecord)})
    if unknown:
        fail(unknown[0], 'absent (unknown field)')
    return EngineRecord(**document)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def cached_engine(path: Path, key: Mapping[str, str]) -> tuple[EngineRecord | None, str]:
    """(record, '') when `path` holds a verified engine of `key`, else (None, why not)."""
    if not path.is_file():
        return None, f'no engine {path.name} in {path.parent}'
    record_file = record_path(path)
    if not record_file.is_file():
        return None, f'{path.name} has no verification record ({record_file.name})'
    try:
        record = read_record(record_file)
    except BackendError as error:
        return None, str(error)
    if record.key != dict(key):
        changed = sorted(name for name in KEY_FIELDS if record.key.get(name) != key.get(name))
        return None, f'the record of {path.name} was made for another {", ".join(changed)}'
    if record.engine != path.name:
        return None, f'the record {record_file.name} describes {record.engine}, not {path.name}'
    if not record.passed:
        return None, f'{path.name} failed its verification'
    if sha256_file(path) != record.engine_sha256:
        return None, f'{path.name} differs from the engine its record describes (sha256)'
    return record, ''


# Requirements and compile options ----------------------------------------------------------

def check_build_requirements(has_module: Callable[[str], bool] | None = None,
                             cuda_problem: Callable[[], str] | None = None) -> None:
    """Refuse, naming every fix, unless torch, torch_tensorrt and a CUDA device are there.

    `has_module(name)` and `cuda_problem()` ('' when torch sees a GPU) default to probing this
    machine.
    """
    has_module = has_module or _has_module
    cuda_problem = cuda_problem or _cuda_unavailable
    problems = []
    if not has_module('torch'):
        problems.append('torch is not installed: pip install -r requirements.txt (torch 2.14)')
    if not has_module('torch_tensorrt'):
        problems.append(f'torch_tensorrt is not installed: {INSTALL_TENSORRT}')
    if has_module('torch'):
        why = cuda_problem()
        if why:
            problems.append(
                f'{why}: a TensorRT engine is built on the GPU that will run it, so run '
                'anomaly-seg build-engine on that machine (without one, use backend torch or '
                'onnxruntime)')
    if problems:
        raise BackendError('cannot build a TensorRT engine: ' + '; '.join(problems))


def compile_options(precision: str, float16: Any) -> dict[str, Any]:
    """Keyword arguments of `torch_tensorrt.dynamo.compile` (torch-tensorrt 2.14) for `precision`.

    torch-tensorrt 2.14 always types the network strictly (the graph's dtypes are kept) and
    reaches fp16 by its rule-based autocast (`enable_autocast`, `autocast_low_precision_type`),
    which keeps numerically sensitive layers in fp32; fp32 turns TF32 off. `float16` is
    `torch.float16`. The engine's input and outputs keep the graph's dtypes either way (float32
    image and score, int32 or uint8 labels).
    """
    if _check_precision(precision) == 'fp32':
        # TF32 rounds inputs to 10-bit mantissas: not what fp32 promises.
        return {'disable_tf32': True}
    return {'enable_autocast': True, 'autocast_low_precision_type': float16}


def check_compile_api(compile_fn: Callable[..., Any], version: str) -> None:
    """BackendError unless `compile_fn` takes the keywords this build passes.

    torch-tensorrt's compile accepts unknown keywords silently (**kwargs), so an older or newer
    release that renamed one would build a different engine without a word.
    """
    import inspect

    accepted = inspect.signature(compile_fn).parameters
    missing = [name for name in COMPILE_KEYWORDS if name not in accepted]
    if missing:
        raise BackendError(
            f'torch_tensorrt {version} has no {", ".join(missing)} in '
            'torch_tensorrt.dynamo.compile, which this build passes (torch-tensorrt 2.14); '
            f'{INSTALL_TENSORRT}')


def engine_wanted(backend: str, device: str, sidecar: Sidecar | None = None) -> bool:
    """Whether the node's backend/device resolve to the tensorrt backend once an engine exists.

    tensorrt on cuda always (an ONNX-only artifact is then refused by `ensure_engine`, naming
    the fix); auto on cuda where torch_tensorrt imports, torch sees a GPU and `sidecar`
    (when given) ships the .pt2 (auto takes a cached engine first).
    """
    if device != 'cuda':
        return False
    if backend == 'tensorrt':
        return True
    if sidecar is not None and cannot_run(sidecar, 'tensorrt'):
        return False  # auto runs an ONNX-only artifact in onnxruntime
    return backend == 'auto' and _tensorrt_loads() and not _cuda_unavailable()


def check_artifact(sidecar: Sidecar) -> None:
    """Refuse an artifact without the .pt2 that TensorRT compiles, naming the re-export."""
    why = cannot_run(sidecar, 'tensorrt')
    if why:
        raise BackendError(f'cannot build a TensorRT engine: {why}')


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _tensorrt_loads() -> bool:
    return not isinstance(import_tensorrt(), str)


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f'unknown precision {precision!r}; expected one of {list(PRECISIONS)}')
    return precision


# Calibration images ------------------------------------------------------------------------

@dataclass(frozen=True)
class CalibrationSource:
    """Where the verification images come from: a folder of frames, or synthetic road scenes."""

    folder: Path | None = None
    synthetic: int = DEFAULT_SYNTHETIC_IMAGES

    def files(self) -> list[Path]:
        """The folder's image files (sorted, at most MAX_CALIBRATION_IMAGES are used), or []."""
        if self.folder is None:
            if isinstance(self.synthetic, bool) or not isinstance(self.synthetic, int) \
                    or not 1 <= self.synthetic <= MAX_CALIBRATION_IMAGES:
                raise ConfigError(f'--synthetic must be an image count from 1 to '
                                  f'{MAX_CALIBRATION_IMAGES}, found {self.synthetic!r}')
            return []
        folder = Path(self.folder)
        if not folder.is_dir():
            raise DataError(f'calibration folder {folder} does not exist or is not a folder; '
                            'give a folder of camera frames, or use --synthetic N')
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(
                f'calibration folder {folder} holds no images ({", ".join(IMAGE_SUFFIXES)}); '
                'put camera frames there, or use --synthetic N')
        return files

    def load(self, height: int, width: int, pad_rgb: tuple[int, int, int] = (0, 0, 0),
             pad_mode: str = DEFAULT_PAD_MODE) -> tuple[np.ndarray, str]:
        """uint8 RGB `[M, height, width, 3]` and a description of where they came from.

        Folder images are fitted as the node fits camera frames by default (letterbox, the bars
        filled by `pad_mode` and `pad_rgb`, the sidecar's).
        """
        files = self.files()
        if self.folder is None:
            from anomaly_seg_node.check_images import road_like_images

            return (road_like_images(self.synthetic, height, width, seed=0),
                    f'{self.synthetic} synthetic road-like images')
        import cv2

        used = files[:MAX_CALIBRATION_IMAGES]
        images = np.stack([_read_rgb(cv2, path, height, width, pad_rgb, pad_mode)
                           for path in used])
        note = '' if len(used) == len(files) else \
            f' (the first {len(used)} of {len(files)} by name)'
        return images, f'{len(used)} images of {self.folder}{note}'


def _read_rgb(cv2: Any, path: Path, height: int, width: int,
              pad_rgb: tuple[int, int, int], pad_mode: str) -> np.ndarray:
    from anomaly_seg_node import imaging

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataError(f'calibration image {path} cannot be decoded; remove or convert it')
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    fit = imaging.plan_fit(rgb.shape[:2], (height, width), imaging.DEFAULT_RESIZE_MODE)
    return imaging.fit_image(rgb, fit, pad_rgb, pad_mode)


# Build -----------------------------------------------------------------------------------

def build_engine(sidecar: Sidecar, precision: str = DEFAULT_PRECISION,
                 cache_dir: str | os.PathLike | None = None,
                 calibration: CalibrationSource | None = None, force: bool = False,
                 log: Log | None = None) -> dict[str, Any]:
    """Build, verify and cache the engine of `sidecar` (or reuse a verified cached one).

    Returns a summary: engine and record paths, whether it was reused, and the figures.
    """
    log = log or _stderr_log
    _check_precision(precision)
    calibration = calibration or CalibrationSource()
    calibration.files()  # a bad folder or count fails before anything slow
    check_artifact(sidecar)
    check_build_requirements()
    path, key = _locate(sidecar, precision, cache_dir)
    if not force:
        record, reason = cached_engine(path, key)
        if record is not None:
            log('info', f'reusing the verified engine {path} (same artifact, GPU, versions '
                        'and precision; --force rebuilds it)')
            return _summary(path, record, reused=True)
        log('info', f'building: {reason}')
    record = _build(sidecar, precision, path, key, calibration, log)
    return _summary(path, record, reused=False)


def ensure_engine(sidecar: Sidecar, precision: str, cache_dir: str | os.PathLike | None,
                  allow_build: bool, log: Log) -> Path:
    """The path of a verified engine of `sidecar` for this GPU; builds it when allowed.

    Without `allow_build`, a missing engine is a BackendError naming the command to run.
    """
    _check_precision(precision)
    check_artifact(sidecar)
    check_build_requirements()
    path, key = _locate(sidecar, precision, cache_dir)
    record, reason = cached_engine(path, key)
    if record is not None:
        log('info', f'TensorRT engine {path.name}: verified, label agreement '
                    f'{record.verification["figures"]["label_agreement"]:.4%}')
        return path
    if not allow_build:
        raise BackendError(
            f'no verified TensorRT engine for this artifact and GPU ({reason}); build it with: '
            f'anomaly-seg build-engine --artifact {sidecar.source} --precision {precision}'
            + (f' --cache-dir {cache_dir}' if cache_dir is not None else '')
            + ' (or let the node build it at start with allow_engine_build: true)')
    log('info', f'building: {reason}')
    _build(sidecar, precision, path, key, CalibrationSource(), log)
    return path


def _locate(sidecar: Sidecar, precision: str, cache_dir: str | os.PathLike | None
            ) -> tuple[Path, dict[str, str]]:
    try:
        environment = engine_environment()
    except BackendError as error:  # torch_tensorrt does not import
        raise BackendError(f'cannot build a TensorRT engine: {error}') from None
    except Exception as error:  # the CUDA queries of a mismatched driver
        raise BackendError(f'torch_tensorrt is installed but does not work here ({error}); '
                           f'{INSTALL_TENSORRT}') from None
    key = engine_cache_key(sidecar, precision, environment)
    return engine_path(sidecar, precision, cache_dir, environment), key


def _build(sidecar: Sidecar, precision: str, path: Path, key: dict[str, str],
           calibration: CalibrationSource, log: Log) -> EngineRecord:
    """Compile, save to a temporary file, verify the saved engine, then move it into place."""
    import torch
    from torch.export.passes import move_to_device_pass

    torch_tensorrt = import_tensorrt()
    if isinstance(torch_tensorrt, str):
        raise BackendError(f'cannot build a TensorRT engine: {tensorrt_fix(torch_tensorrt)}')
    check_compile_api(torch_tensorrt.dynamo.compile, key['torch_tensorrt'])
    pt2 = sidecar.file_path('pt2')
    height, width = sidecar.input_size
    batch = sidecar.input.batch
    log('warning', f'BUILDING A TENSORRT ENGINE ({precision}) of {pt2.name} at {height}x{width} '
                   f'for {key["gpu"]}: this may take several minutes; do not interrupt it. '
                   f'It is cached in {path.parent} and reused afterwards.')
    images, source = calibration.load(height, width, sidecar.pad_rgb, sidecar.pad_mode)
    program = torch.export.load(str(pt2))
    reference = run_module(program.module(), images, batch, 'cpu')
    options = compile_options(precision, torch.float16)
    example = torch.zeros(batch, 3, height, width, dtype=torch.float32, device=ENGINE_DEVICE)
    start = time.perf_counter()
    try:
        compiled = torch_tensorrt.dynamo.compile(
            move_to_device_pass(program, ENGINE_DEVICE), arg_inputs=[example], **options)
    except Exception as error:  # torch_tensorrt raises many kinds; all mean the same here
        raise BackendError(
            f'torch_tensorrt could not compile {pt2.name} ({type(error).__name__}: {error}); '
            + ('try --precision fp32, ' if precision == 'fp16' else '')
            + f'check that torch_tensorrt {key["torch_tensorrt"]} matches torch '
            f'{key["torch"]}, or use backend torch') from error
    blocks = _count_blocks(compiled)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{path.name}.', suffix=f'.tmp{path.suffix}',
                                   dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            torch_tensorrt.save(compiled, str(tmp), output_format='exported_program',
                                arg_inputs=[example])
            seconds = time.perf_counter() - start
            del compiled
            # Verify what the runtime will load: the saved file, not the module in memory.
            engine = torch.export.load(str(tmp)).module()
        except Exception as error:
            raise BackendError(
                f'the engine of {pt2.name} compiled but does not save and load back '
                f'({type(error).__name__}: {error}); check that torch_tensorrt '
                f'{key["torch_tensorrt"]} matches torch {key["torch"]}, or use backend torch'
            ) from error
        candidate = run_module(engine, images, batch, ENGINE_DEVICE)
        del engine
        threshold, threshold_name = verification_threshold(sidecar, reference[1])
        figures = verification_figures(reference, candidate, threshold)
        failures = verification_failures(figures, precision)
        verification = {
            'images': int(images.shape[0]), 'source': source, 'reference': 'FP32 '
            f'{pt2.name} on the CPU', 'threshold': threshold, 'threshold_name': threshold_name,
            'figures': figures,
            'requirements': {name: f'{op} {bound:g}'
                             for name, (op, bound) in REQUIREMENTS[precision].items()},
            'passed': not failures,
        }
        if failures:
            raise BackendError(
                f'the {precision} engine of {pt2.name} disagrees with the FP32 graph on '
                f'{source}: {"; ".join(failures)}. It was not cached. Figures: {figures}. '
                + ('Build with --precision fp32 instead, or use backend torch'
                   if precision == 'fp16' else 'Use backend torch (TensorRT changes this graph)'))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; engines are shared read-only files
        engine_sha256 = sha256_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        torch.cuda.empty_cache()
    if blocks['torch_blocks']:
        log('warning', f'{blocks["torch_blocks"]} part(s) of the graph run in torch, not '
                       'TensorRT (unsupported operators); the engine is correct but slower')
    record = EngineRecord(
        key=dict(key), engine=path.name, engine_sha256=engine_sha256,
        artifact=str(sidecar.source), built=_now(),
        build={'seconds': round(seconds, 3),
               'options': {name: _describe(value) for name, value in sorted(options.items())},
               **blocks},
        verification=verification)
    write_record(record, record_path(path))
    log('info', f'engine {path} built in {seconds:.0f} s and verified on {source}: labels agree '
                f'on {figures["label_agreement"]:.4%}, anomaly masks on '
                f'{figures["mask_agreement"]:.4%}')
    return record


def run_module(module: Any, images: np.ndarray, batch: int,
               device: str) -> tuple[np.ndarray, np.ndarray]:
    """(int32 labels, float32 scores) of a deploy graph on uint8 `[M, H, W, 3]` images; labels
    are widened to int32 whatever the graph's dtype, for the parity comparison."""
    import torch

    from anomaly_seg_node.check_images import run_batched

    def run(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            labels, score = module(torch.from_numpy(image).to(device))
        return labels.to(torch.int32).cpu().numpy(), score.float().cpu().numpy()

    return run_batched(run, images, batch)


def _count_blocks(module: Any) -> dict[str, int]:
    # torch_tensorrt names the partitions _run_on_acc_N (TensorRT) and _run_on_gpu_N or
    # _run_on_cpu_N (torch).
    names = [name for name, _ in module.named_children() if name.startswith('_run_on_')]
    tensorrt = sum(name.startswith('_run_on_acc') for name in names)
    return {'tensorrt_blocks': tensorrt, 'torch_blocks': len(names) - tensorrt}


def _describe(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (set, frozenset)):
        return sorted(str(v) for v in value)
    return str(value)


def _summary(path: Path, record: EngineRecord, reused: bool) -> dict[str, Any]:
    figures = record.verification['figures']
    return {
        'engine': str(path),
        'record': str(record_path(path)),
        'reused': reused,
        'precision': record.key['precision'],
        'gpu': record.key['gpu'],
        'build_seconds': record.build.get('seconds'),
        'calibration': record.verification['source'],
        'threshold': f'{record.verification["threshold"]:g} '
                     f'({record.verification["threshold_name"]})',
        'label_agreement': figures['label_agreement'],
        'mask_agreement': figures['mask_agreement'],
        'score_diff_over_std': figures['score_diff_over_std'],
        'mean_score_diff_over_std': figures['mean_score_diff_over_std'],
        'use': f'backend tensorrt, precision {record.key["precision"]}',
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _stderr_log(level: str, message: str) -> None:
    if level == 'warning':
        rule = '=' * 78
        message = f'\n{rule}\n{message}\n{rule}'
    print(f'anomaly-seg build-engine: {level}: {message}', file=sys.stderr, flush=True)


# Command line ----------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `anomaly-seg build-engine`."""
    parser.add_argument('--artifact', required=True, type=Path, metavar='NAME.json',
                        help='the artifact sidecar (NAME.pt2 beside it is compiled; an '
                             'artifact exported with --formats onnx has none and is refused)')
    parser.add_argument('--precision', choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help=f'engine precision (default {DEFAULT_PRECISION})')
    parser.add_argument('--cache-dir', type=Path, default=None, metavar='DIR',
                        help=f'engine cache (default ${ENGINE_CACHE_ENV}, else '
                             '~/.cache/anomaly_seg/engines)')
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--calibration-images', type=Path, default=None, metavar='DIR',
                        help='verify on the camera frames in DIR (png/jpg, at most '
                             f'{MAX_CALIBRATION_IMAGES}, letterboxed to the artifact size as '
                             'the node does by default)')
    source.add_argument('--synthetic', type=int, default=None, metavar='N',
                        help='verify on N synthetic road-like images (default '
                             f'{DEFAULT_SYNTHETIC_IMAGES})')
    parser.add_argument('--force', action='store_true',
                        help='rebuild even when a verified engine with the same key is cached')


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build (or reuse) the engine; the summary the command prints."""
    calibration = CalibrationSource(
        folder=args.calibration_images,
        synthetic=DEFAULT_SYNTHETIC_IMAGES if args.synthetic is None else args.synthetic)
    calibration.files()
    sidecar = read_sidecar(args.artifact)
    return build_engine(sidecar, args.precision, args.cache_dir, calibration, args.force)
