"""Export a segmenter as an artifact: NAME.onnx, NAME.pt2 (optional) and the sidecar NAME.json.

`DeployModel` puts the whole deploy graph in one module: float32 RGB 0..255 `[N, 3, H, W]` in,
int32 (or uint8) labels and the float32 anomaly score `[N, H, W]` out (normalisation lives in the
segmenter, the score in `training.scores`), so evaluation and deployment share one
implementation.
`export_artifact` writes the graphs of the requested formats (ONNX always, the torch.export .pt2
unless left out) at one static size and checks each against eager torch on synthetic road-like
images before it writes the sidecar (DESIGN.md, "The artifact contract").
"""

from collections.abc import Mapping, Sequence
import dataclasses
import datetime
import importlib.metadata
import json
import os
from pathlib import Path
import subprocess
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from anomaly_seg_node import imaging
from anomaly_seg_node import labels as label_ids
from anomaly_seg_node.artifact import (
    LABEL_DTYPES,
    MODEL_FILE_KINDS,
    REQUIRED_FILE_KINDS,
    SCORE_RESOLUTIONS,
    FileRef,
    InputSpec,
    LabelOutput,
    ScoreSpec,
    Sidecar,
    sha256_file,
    sidecar_from_dict,
    write_sidecar,
)
from anomaly_seg_node.check_images import road_like_images, run_batched
from anomaly_seg_node.errors import ArtifactError, ConfigError
from anomaly_seg_node.metrics import (
    MAX_DIFF_OVER_STD,
    MIN_LABEL_AGREEMENT,
    MIN_MASK_AGREEMENT,
    AgreementShapeError,
    agreement_figures,
)

SEGMENTATION = 'segmentation'
# The figures of `agreement_figures` recorded in the sidecar's parity block.
PARITY_FIGURES = ('label_agreement', 'mask_agreement', 'max_score_diff', 'score_std',
                  'score_diff_over_std')
# Parity requirements of issue 5 §1: MIN_LABEL_AGREEMENT, MIN_MASK_AGREEMENT and
# MAX_DIFF_OVER_STD of anomaly_seg_node.metrics (the TensorRT engine check derives its own).
# The runtime that checks each format's parity, by format.
FORMAT_RUNTIMES = {'onnx': 'onnxruntime', 'pt2': 'torch_export'}
DEFAULT_FORMATS = MODEL_FILE_KINDS
METADATA_KEYS = ('method', 'classes', 'palette', 'void_id', 'training', 'code_version',
                 'default_threshold', 'pad_rgb', 'pad_mode')


class DeployModel(nn.Module):
    """The deploy graph: segmenter -> (argmax labels int32 or uint8, anomaly score float32).

    `segmenter(x)` takes float RGB 0..255 `[N, 3, H, W]` and returns a dict with 'logits'
    `[N, K, H, W]` and, when it has an outlier head, 'outlier_logits' `[N, 2, H, W]`.
    `score_name` is a name of `training.scores.SCORES` or 'segmentation' (labels plus a zero
    score, to benchmark the segmenter alone); `score_resolution` is where the score is computed
    (`segmenter_scores`). `label_dtype` is the labels' dtype (LABEL_DTYPES) and
    `label_resolution` where the argmax is taken ('input': on the logits upsampled bilinearly;
    'stride4': on the decoder's stride-4 logits, the labels then upsampled by nearest neighbour,
    which needs the score at stride 4 too: `artifact.LabelOutput`).
    """

    def __init__(self, segmenter: nn.Module, score_name: str,
                 temperature: float | None = None, score_resolution: str = 'input',
                 label_dtype: str = 'int32', label_resolution: str = 'input') -> None:
        super().__init__()
        _check_resolution(segmenter, score_resolution)
        _check_label_output(segmenter, score_name, score_resolution, label_dtype,
                            label_resolution)
        self.segmenter = segmenter
        self.score_name = score_name
        self.temperature = temperature
        self.score_resolution = score_resolution
        self.label_dtype = label_dtype
        self.label_resolution = label_resolution
        if score_name == SEGMENTATION:
            self.units = 'none'
            self.effective_temperature = None
            return
        from training import scores

        if score_name not in scores.SCORES:
            raise ConfigError(
                f'unknown score {score_name!r}; expected one of '
                f'{[*scores.SCORES, SEGMENTATION]}')
        self.units, self.effective_temperature = _score_metadata(scores, score_name,
                                                                 temperature)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stride4 = self.label_resolution == 'stride4'
        if self.score_name == SEGMENTATION:
            if stride4:
                logits = stride4_heads(self.segmenter, image)['logits']
            else:
                logits = self.segmenter(image)['logits']  # [N, K, H, W]
            score = torch.zeros_like(image[:, 0], dtype=torch.float32)
        else:
            # [N, K, H, W], or [N, K, H/4, W/4] for labels at stride 4
            logits, scores = segmenter_scores(
                self.segmenter, image, [self.score_name], {self.score_name: self.temperature},
                self.score_resolution, upsample_logits=not stride4)
            score = scores[self.score_name]
        labels = logits.argmax(dim=1, keepdim=True)  # [N, 1, h, w]
        if stride4:
            # Nearest on float ids (exact below 2**24): each stride-4 cell fills the 4x4 input
            # pixels whose bilinear weights it dominates.
            labels = F.interpolate(labels.to(torch.float32), size=tuple(image.shape[-2:]),
                                   mode='nearest')
        return labels[:, 0].to(_TORCH_LABEL_DTYPES[self.label_dtype]), score.to(torch.float32)


def segmenter_scores(segmenter: nn.Module, image: torch.Tensor, names: Sequence[str],
                     temperatures: Mapping[str, float | None], resolution: str = 'input',
                     upsample_logits: bool = True
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """image `[N, 3, H, W]` -> (logits `[N, K, H, W]`, {score: float32 `[N, H, W]`}).

    With `upsample_logits` False and resolution 'stride4' the logits stay at stride 4
    `[N, K, H/4, W/4]` (labels at stride 4 skip the K-channel upsample).

    resolution 'input': every score on the logits upsampled to H x W (the paper). 'stride4':
    the scores on the decoder's stride-4 logits (a SwiftNet's `forward_heads`), each score map
    then upsampled bilinearly: the per-pixel score work shrinks 16x and one channel is
    upsampled instead of K + 2 (issue 5's DH-over-segmentation budget of 3%).
    """
    from training import scores as score_module

    _check_resolution(segmenter, resolution)
    size = image.shape[-2:]
    if resolution == 'input':
        heads = segmenter(image)
        logits = heads['logits']
    else:
        heads = stride4_heads(segmenter, image)
        logits = heads['logits']
        if upsample_logits:
            logits = F.interpolate(logits, size=tuple(size), mode='bilinear',
                                   align_corners=False)
    outlier = heads.get('outlier_logits')
    scores = {}
    for name in names:
        # The score in float32 also when the network runs in float16 (torch fp16 backend): its
        # constants (clamp bounds) are traced in float32.
        score = score_module.anomaly_score(
            name, heads['logits'].float(), None if outlier is None else outlier.float(),
            temperatures.get(name))
        if resolution != 'input':
            score = F.interpolate(score[:, None], size=tuple(size), mode='bilinear',
                                  align_corners=False)[:, 0]
        scores[name] = score
    return logits, scores


_TORCH_LABEL_DTYPES = {'int32': torch.int32, 'uint8': torch.uint8}


def stride4_heads(segmenter: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """A SwiftNet's heads on the decoder's stride-4 features, not upsampled:
    'logits' `[N, K, H/4, W/4]` (and 'outlier_logits' with an outlier head)."""
    return segmenter.forward_heads(segmenter.forward_features(image))


def _check_label_output(segmenter: nn.Module, score_name: str, score_resolution: str,
                        dtype: str, resolution: str) -> None:
    if dtype not in LABEL_DTYPES:
        raise ConfigError(f'unknown label dtype {dtype!r}; expected one of {list(LABEL_DTYPES)}')
    _check_resolution(segmenter, resolution)
    check_label_resolution(score_name, score_resolution, resolution)


def check_label_resolution(score_name: str, score_resolution: str, resolution: str) -> None:
    """ConfigError when labels at `resolution` would not save anything with this score."""
    if resolution == 'stride4' and score_name != SEGMENTATION and score_resolution != 'stride4':
        raise ConfigError(
            'labels at stride4 save the upsample of the class logits only when the score is '
            'computed at stride 4 as well; use --score-resolution stride4 with '
            '--label-resolution stride4')


def _check_resolution(segmenter: nn.Module, resolution: str) -> None:
    if resolution not in SCORE_RESOLUTIONS:
        raise ConfigError(f'unknown score resolution {resolution!r}; expected one of '
                          f'{list(SCORE_RESOLUTIONS)}')
    if resolution != 'input' and not (hasattr(segmenter, 'forward_features')
                                      and hasattr(segmenter, 'forward_heads')):
        raise ConfigError(
            f'score resolution {resolution!r} needs a segmenter with forward_features and '
            f"forward_heads (SwiftNet); {type(segmenter).__name__} has not: use 'input'")


def export_artifact(model: DeployModel, out_stem: str | os.PathLike,
                    size: tuple[int, int] = (360, 640), batch: int = 1,
                    calibration_images: np.ndarray | None = None,
                    thresholds: Mapping[str, float] | None = None,
                    metadata: Mapping[str, Any] | None = None,
                    check_images: int = 4, seed: int = 0,
                    formats: Sequence[str] = DEFAULT_FORMATS) -> Sidecar:
    """Write OUT_STEM.onnx, OUT_STEM.pt2 and OUT_STEM.json, checked against eager torch.

    `formats` names the model files: 'onnx' (required) and 'pt2' (the torch and tensorrt
    backends need it; leave it out for an ONNX Runtime-only artifact, half the size). The check
    runs `check_images` synthetic road-like images (plus `calibration_images`, uint8
    `[M, H, W, 3]` at `size`, when given) through eager torch and the runtime of each format
    (ONNX Runtime, the reloaded ExportedProgram); the sidecar's parity block records the
    figures and `formats_checked`. On failure it raises ArtifactError with the figures and
    writes nothing; on success the model files are renamed into place, the sidecar is written
    last, and an OUT_STEM.pt2 of an earlier export is removed when 'pt2' is left out (it would
    not match the new OUT_STEM.onnx). `model` must live on the CPU; it is put in eval mode.
    """
    formats = check_formats(formats)
    height, width = _check_size(size)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f'batch must be a positive integer, found {batch!r}')
    metadata = dict(metadata or {})
    unknown = sorted(set(metadata) - set(METADATA_KEYS))
    if unknown:
        raise ConfigError(f'unknown export metadata keys {unknown}; expected some of '
                          f'{list(METADATA_KEYS)}')
    if not isinstance(metadata.get('training', {}), Mapping):
        raise ConfigError('export metadata training must be a dict (the training config), '
                          f'found {type(metadata["training"]).__name__}')
    thresholds = {str(k): float(v) for k, v in (thresholds or {}).items()}
    default_threshold = metadata.get('default_threshold')
    if default_threshold is None and thresholds:
        default_threshold = 'tpr95' if 'tpr95' in thresholds else sorted(thresholds)[0]
    if default_threshold is not None and default_threshold not in thresholds:
        raise ConfigError(f'default_threshold {default_threshold!r} is not one of the '
                          f'thresholds {sorted(thresholds)}')

    if any(t.device.type != 'cpu' for t in [*model.parameters(), *model.buffers()]):
        raise ConfigError('export runs on the CPU; move the model there first (model.cpu())')
    model = model.eval()
    example = torch.zeros(batch, 3, height, width)
    with torch.no_grad():
        num_classes = model.segmenter(example[:1])['logits'].shape[1]
        model(example[:1])  # a score that needs a missing outlier head fails here, clearly
    classes, palette = _classes_and_palette(metadata, num_classes)

    images = road_like_images(check_images, height, width, seed=seed)
    if calibration_images is not None:
        calibration_images = np.asarray(calibration_images)
        if calibration_images.dtype != np.uint8 or calibration_images.ndim != 4 \
                or calibration_images.shape[1:] != (height, width, 3):
            raise ConfigError(
                f'calibration images must be uint8 [M, {height}, {width}, 3] at the artifact '
                f'size, found {calibration_images.dtype} {list(calibration_images.shape)}; '
                'resize them first')
        images = np.concatenate([images, calibration_images])

    out_stem = Path(out_stem)
    folder, name = out_stem.parent, out_stem.name
    # The sidecar less hashes and figures: bad metadata fails here, before the slow part.
    draft = Sidecar(
        method=metadata.get('method', type(model.segmenter).__name__),
        score=ScoreSpec(name=model.score_name, units=model.units,
                        temperature=model.effective_temperature,
                        resolution=model.score_resolution),
        labels=LabelOutput(dtype=model.label_dtype, resolution=model.label_resolution),
        input=InputSpec(height=height, width=width, batch=batch,
                        pad_rgb=_pad_rgb(metadata.get('pad_rgb')),
                        pad_mode=imaging.check_pad_mode(
                            metadata.get('pad_mode', imaging.DEFAULT_PAD_MODE))),
        classes=tuple(classes),
        palette=tuple(tuple(rgb) for rgb in palette),
        files={kind: FileRef(f'{name}.{kind}', '0' * 64) for kind in formats},
        void_id=metadata.get('void_id', label_ids.IGNORE_ID),
        thresholds=thresholds,
        default_threshold=default_threshold,
        training=dict(metadata.get('training', {})),
        code_version=metadata.get('code_version') or code_version(),
        created=utc_now(),
    )
    check_document(draft)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = {kind: _temp_path(folder, name, f'.{kind}') for kind in formats}
    writers = {'onnx': ('torch.onnx.export', _export_onnx), 'pt2': ('torch.export', _export_pt2)}
    try:
        for kind in formats:
            what, write = writers[kind]
            try:
                write(model, example, tmp[kind])
            except Exception as error:
                raise ArtifactError(
                    f'export of {name} failed in {what}: {error}. The model uses an operation '
                    'the exporter cannot trace; nothing was written') from error
        check_onnx(tmp['onnx'])
        eager = run_batched(_eager_runner(model), images, batch)
        threshold = (thresholds[default_threshold] if default_threshold is not None
                     else float(np.median(eager[1])))
        parity = {
            'images': int(images.shape[0]),
            'synthetic_images': int(check_images),
            'size': [height, width],
            'threshold': threshold,
            'threshold_name': default_threshold or 'median of the eager scores',
            'formats_checked': list(formats),
            'requirements': {'label_agreement': MIN_LABEL_AGREEMENT,
                             'mask_agreement': MIN_MASK_AGREEMENT,
                             'score_diff_over_std': MAX_DIFF_OVER_STD},
        }
        failures = []
        runners = {'onnx': _onnx_runner, 'pt2': _pt2_runner}
        for kind in formats:
            runtime = FORMAT_RUNTIMES[kind]
            outputs = run_batched(runners[kind](tmp[kind]), images, batch)
            figures = parity_figures(eager, outputs, threshold)
            parity[runtime] = figures
            failures += [f'{runtime}: {problem}' for problem in parity_failures(figures)]
        if failures:
            raise ArtifactError(
                f'export of {name} failed its parity check against eager torch: '
                f'{"; ".join(failures)}. Figures: {parity}. Nothing was written; check the '
                'model for export-unsafe operations (data-dependent shapes, in-place ops on '
                'inputs, non-deterministic kernels)')

        files = {kind: FileRef(f'{name}.{kind}', sha256_file(tmp[kind])) for kind in formats}
        sidecar = dataclasses.replace(draft, files=files, parity=parity, created=utc_now())
        check_document(sidecar)
        for kind in formats:
            os.replace(tmp[kind], folder / files[kind].name)
        path = write_sidecar(sidecar, folder / f'{name}.json')
        for kind in MODEL_FILE_KINDS:
            if kind not in formats:
                # Left by an earlier export: it belongs to the replaced NAME.onnx, and a
                # committed models/ folder must not carry it along unlisted.
                (folder / f'{name}.{kind}').unlink(missing_ok=True)
    finally:
        for leftover in tmp.values():
            leftover.unlink(missing_ok=True)
    return _with_source(sidecar, path)


def check_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
    """The requested model formats in MODEL_FILE_KINDS order; ConfigError when unusable."""
    if isinstance(formats, str):
        formats = [part.strip() for part in formats.split(',') if part.strip()]
    requested = list(formats)
    unknown = [kind for kind in requested if kind not in MODEL_FILE_KINDS]
    if unknown:
        raise ConfigError(f'unknown export format(s) {unknown}; expected some of '
                          f'{list(MODEL_FILE_KINDS)}, e.g. --formats onnx,pt2')
    missing = [kind for kind in REQUIRED_FILE_KINDS if kind not in requested]
    if missing:
        raise ConfigError(f'export formats {requested} lack {missing}: every artifact ships '
                          'NAME.onnx (ONNX Runtime, the CPU path); use --formats onnx or '
                          'onnx,pt2')
    return tuple(kind for kind in MODEL_FILE_KINDS if kind in requested)


def parity_figures(reference: tuple[np.ndarray, np.ndarray],
                   candidate: tuple[np.ndarray, np.ndarray], threshold: float
                   ) -> dict[str, float]:
    """Agreement of (labels, score) with the eager reference, as plain floats."""
    ref_labels, ref_score = reference
    labels, score = candidate
    try:
        figures = agreement_figures(reference, candidate, threshold)
    except AgreementShapeError:
        raise ArtifactError(f'exported graph returned shapes {labels.shape}, {score.shape}; '
                            f'eager torch returned {ref_labels.shape}, {ref_score.shape}'
                            ) from None
    if labels.dtype != ref_labels.dtype or score.dtype != np.float32:
        raise ArtifactError(f'exported graph returned {labels.dtype} labels and {score.dtype} '
                            f'scores; the contract is {ref_labels.dtype} labels (as the eager '
                            'graph) and float32 scores')
    return {key: figures[key] for key in PARITY_FIGURES}


def parity_failures(figures: Mapping[str, float]) -> list[str]:
    """The requirements `figures` misses, in words (empty when it passes)."""
    problems = []
    if not figures['label_agreement'] >= MIN_LABEL_AGREEMENT:
        problems.append(f'labels agree on {figures["label_agreement"]:.4%} of pixels, '
                        f'need >= {MIN_LABEL_AGREEMENT:.1%}')
    if not figures['mask_agreement'] >= MIN_MASK_AGREEMENT:
        problems.append(f'anomaly masks agree on {figures["mask_agreement"]:.4%} of pixels, '
                        f'need >= {MIN_MASK_AGREEMENT:.1%}')
    if not figures['score_diff_over_std'] <= MAX_DIFF_OVER_STD:
        problems.append(f'max score difference {figures["max_score_diff"]:.3g} is '
                        f'{figures["score_diff_over_std"]:.3g} x the score std '
                        f'{figures["score_std"]:.3g}, need <= {MAX_DIFF_OVER_STD:g}')
    return problems


def code_version() -> str:
    """The git commit of this checkout (with '-dirty' when modified), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root,
                                capture_output=True, text=True, check=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                               cwd=root, capture_output=True, text=True, check=True,
                               timeout=10).stdout.strip()
        return f'{commit}-dirty' if dirty else commit
    except (OSError, subprocess.SubprocessError):
        try:
            return 'anomaly_seg ' + importlib.metadata.version('anomaly_seg')
        except importlib.metadata.PackageNotFoundError:
            return 'unknown'


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    # Weights inside the one file, so its sha256 covers them.
    torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False,
                      input_names=['image'], output_names=['labels', 'anomaly_score'],
                      verbose=False)


def _export_pt2(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    program = torch.export.export(model, (example,))
    torch.export.save(program, str(path))


def check_onnx(path: Path) -> None:
    """ArtifactError unless `path` passes onnx.checker with the contract's inputs/outputs."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ArtifactError(f'the exported ONNX graph fails onnx.checker: {error}') from None
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = [node.name for node in graph.input]
    outputs = [node.name for node in graph.output]
    if inputs != ['image'] or outputs != ['labels', 'anomaly_score']:
        raise ArtifactError(f'the exported ONNX graph has inputs {inputs} and outputs '
                            f"{outputs}; expected ['image'] -> ['labels', 'anomaly_score']")


def _eager_runner(model: nn.Module) -> Any:
    def run(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            labels, score = model(torch.from_numpy(image))
        return labels.numpy(), score.numpy()
    return run


def _onnx_runner(path: Path) -> Any:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])

    def run(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels, score = session.run(['labels', 'anomaly_score'], {'image': image})
        return labels, score
    return run


def _pt2_runner(path: Path) -> Any:
    module = torch.export.load(str(path)).module()

    def run(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            labels, score = module(torch.from_numpy(image))
        return labels.numpy(), score.numpy()
    return run


def _score_metadata(scores: Any, name: str, temperature: float | None
                    ) -> tuple[str, float | None]:
    """(units, temperature in effect) of a score; validates the temperature on a tiny input."""
    info = scores.score_info(name)
    probe = torch.zeros(1, 2, 1, 1)
    scores.anomaly_score(name, probe, probe if info.needs_outlier_head else None, temperature)
    if temperature is None:
        return info.units, info.default_temperature
    return info.units, float(temperature)


def _pad_rgb(value: Any) -> tuple[int, int, int] | None:
    if value is None:
        return None
    rgb = tuple(int(v) for v in value)
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ConfigError(f'pad_rgb must be three values in 0..255, found {value!r}')
    return (rgb[0], rgb[1], rgb[2])


def _classes_and_palette(metadata: Mapping[str, Any], num_classes: int
                         ) -> tuple[list[str], list[tuple[int, int, int]]]:
    if 'classes' in metadata:
        classes = list(metadata['classes'])
        palette = list(metadata.get('palette', []))
    else:
        mappings = {len(label_ids.class_names(m)): m for m in label_ids.MAPPINGS}
        if num_classes not in mappings:
            raise ConfigError(
                f'the segmenter predicts {num_classes} classes, which matches no StreetHazards '
                f'mapping ({sorted(mappings)} classes); pass metadata classes and palette')
        classes = label_ids.class_names(mappings[num_classes])
        palette = metadata.get('palette', label_ids.palette(mappings[num_classes]))
    if len(classes) != num_classes or len(palette) != num_classes:
        raise ConfigError(f'the segmenter predicts {num_classes} classes but metadata gives '
                          f'{len(classes)} class names and {len(palette)} palette colours')
    return classes, palette


def _check_size(size: Any) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ConfigError(f'size must be (H, W), found {size!r}') from None
    if height < 8 or width < 8:
        raise ConfigError(f'size must be at least 8x8, found {height}x{width}')
    return height, width


def _temp_path(folder: Path, name: str, suffix: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix=f'.tmp{suffix}', dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are shared read-only files
    return Path(tmp)


def check_document(sidecar: Sidecar) -> None:
    """Refuse a sidecar that would not serialise or read back, before any file is renamed."""
    try:
        document = json.loads(json.dumps(sidecar.to_dict(), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ConfigError(f'export metadata must be plain JSON values (finite numbers, '
                          f'strings, lists, dicts): {error}') from None
    try:
        sidecar_from_dict(document, where='the sidecar to be written')
    except ArtifactError as error:
        problem = str(error).split('; re-export')[0]
        raise ConfigError(f'{problem}; fix the export metadata') from None


def utc_now() -> str:
    """Now in UTC, ISO 8601 to the second (the sidecar's `created`)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _with_source(sidecar: Sidecar, path: Path) -> Sidecar:
    return dataclasses.replace(sidecar, source=str(path.resolve()))
