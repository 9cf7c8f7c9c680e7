"""int8 artifacts for the CPU: NAME-int8.onnx, a statically quantised QDQ graph of NAME.onnx.

`export_int8` quantises a checked fp32 artifact with ONNX Runtime (`quantize_static`, QDQ
format) and writes the sibling artifact NAME-int8.json beside it:

- Weights int8, symmetric, per output channel (Conv, with the batch norms that follow a Conv
  folded in by the exporter or ONNX Runtime's pre-processing); activations uint8, asymmetric,
  per tensor, MinMax ranges over real calibration frames, fitted to the artifact size exactly as
  the node fits camera frames (letterbox, the sidecar's pad colour). uint8 activations with int8
  weights is the pair ONNX Runtime's x86 CPU kernels are fast for (VNNI); symmetric int8
  activations measured 2x slower there.
- Quantised: the op types of `QUANTIZED_OP_TYPES` (the convolutions and what lies between them:
  ReLU, residual and lateral Add, max/average pooling, the decoder's Resize, Concat).
  ONNX Runtime's default list would also quantise ArgMax, Softmax, Mul, Gather, Where and friends.
- Float: the score head (`float_tail`): the last convolutions (the class and outlier logits)
  and everything after them (the logits' Resize to the input size, log-sum-exp, softplus,
  clamp, the score's Resize, ArgMax). The DenseHybrid score is a difference of two
  log-densities of similar size; on an 8-bit grid of the logits (a step of ~0.2 nats for a
  +-30 range) it would lose most of its resolution, and the labels' ArgMax would see ties.
  Batch normalisations that cannot be folded (pre-activation BN -> ReLU -> Conv) stay float too:
  ONNX Runtime has no int8 kernel for them, so a Q/DQ pair around one only costs time.

The int8 graph is checked against the fp32 graph in ONNX Runtime on held-out calibration frames
(not used for the activation ranges): label agreement, anomaly-mask agreement at each graph's own
default threshold, and the score error in units of the fp32 score's standard deviation (mean
and 99th percentile; the maximum is recorded, not required: single pixels on class boundaries
move). A failure raises ArtifactError and writes nothing. The named thresholds are then
calibrated again on the int8 graph's own scores over the same calibration data
(`recalibrate`), so the default threshold flags the same share of normal pixels as the fp32
artifact's does.
"""

import collections
from collections.abc import Callable, Mapping
import dataclasses
import os
from pathlib import Path
import tempfile
from typing import Any

import numpy as np

from anomaly_seg_node.artifact import FileRef, Sidecar, read_sidecar, sha256_file, write_sidecar
from anomaly_seg_node.check_images import run_batched
from anomaly_seg_node.errors import ArtifactError, ConfigError
from anomaly_seg_node.metrics import AgreementShapeError, agreement_figures
from training.export import check_document, check_onnx, utc_now

INT8_SUFFIX = '-int8'
QUANTIZED_OP_TYPES = ('Conv', 'Relu', 'Clip', 'Add', 'MaxPool', 'AveragePool',
                      'GlobalAveragePool', 'Resize', 'Concat')
DEFAULT_FRAMES = 32
# Held-out frames of the parity check, taken from among the calibration frames.
CHECK_FRAMES = 8
# Parity requirements against the fp32 graph. Measured with the committed models/demo.onnx
# (360x640) on CamVid val frames with pasted anomalies: labels 97.3-97.9%, masks 97.3-97.6% at
# tpr95 and 99.9% at fpr1, mean score error 0.05 std, 99th percentile 0.27-0.28 std.
MIN_LABEL_AGREEMENT = 0.95
MIN_MASK_AGREEMENT = 0.95
MAX_MEAN_DIFF_OVER_STD = 0.1
MAX_P99_DIFF_OVER_STD = 0.5
PARITY_REQUIREMENTS = {'label_agreement': MIN_LABEL_AGREEMENT,
                       'mask_agreement': MIN_MASK_AGREEMENT,
                       'mean_score_diff_over_std': MAX_MEAN_DIFF_OVER_STD,
                       'p99_score_diff_over_std': MAX_P99_DIFF_OVER_STD}


def int8_stem(stem: str | os.PathLike) -> Path:
    """models/NAME -> models/NAME-int8: where the int8 sibling of an artifact goes."""
    stem = Path(stem)
    return stem.with_name(f'{stem.name}{INT8_SUFFIX}')


class OnnxScoreMaps:
    """An ONNX graph of the artifact contract as calibration's score maps: uint8 RGB
    `[H, W, 3]` -> {score: float32 [H, W]} (training.calibration.ScoreMaps's interface)."""

    def __init__(self, path: str | os.PathLike, score: str, batch: int = 1) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path),
                                                    providers=['CPUExecutionProvider'])
        self.scores = [score]
        self.batch = batch

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        _, score = run_batched(self.run, image[None], self.batch)
        return {self.scores[0]: score[0]}

    def run(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels, score = self.session.run(['labels', 'anomaly_score'], {'image': image})
        return labels, score


def float_tail(graph: Any) -> list[str]:
    """Names of the nodes that stay float: the last convolutions (no Conv after them) and every
    node after which no Conv follows (the score and label computation on the logits)."""
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    conv_after: dict[int, bool] = {}
    # Nodes are topologically sorted in a valid ONNX graph: visit them backwards.
    for node in reversed(graph.node):
        conv_after[id(node)] = any(
            user.op_type == 'Conv' or conv_after.get(id(user), False)
            for output in node.output for user in consumers[output])
    return [node.name for node in graph.node if not conv_after[id(node)]]


class _FrameReader:
    """onnxruntime's CalibrationDataReader over uint8 frames [M, H, W, 3] in static batches."""

    def __init__(self, frames: np.ndarray, batch: int) -> None:
        self.frames = frames
        self.batch = batch
        self.start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= self.frames.shape[0]:
            return None
        chunk = self.frames[self.start:self.start + self.batch]
        self.start += self.batch
        if chunk.shape[0] < self.batch:  # the graph's batch is static: repeat the last frame
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - chunk.shape[0],
                                                     axis=0)])
        return {'image': np.ascontiguousarray(chunk.transpose(0, 3, 1, 2), dtype=np.float32)}


def quantize_graph(source: str | os.PathLike, target: str | os.PathLike, frames: np.ndarray,
                   batch: int = 1) -> dict[str, Any]:
    """Write the int8 QDQ graph of the fp32 graph `source` to `target`, activation ranges from
    `frames` (uint8 [M, H, W, 3] at the graph's size); returns what was done, for the sidecar."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix='anomaly_seg_int8.') as scratch:
        # Shape inference and ONNX Runtime's basic optimisations (Conv+BN folding, constant
        # folding): per-channel weights then include the batch norms.
        prepared = Path(scratch) / 'prepared.onnx'
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared), load_external_data=False).graph
        tail = float_tail(graph)
        quantize_static(
            str(prepared), str(target), _FrameReader(frames, batch),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=tail,
            # MinMax reduces every tensor to its range inside the calibration graph, so memory
            # stays small without CalibMaxIntermediateOutputs (which, in onnxruntime 1.32,
            # drops the outputs it collected instead of merging them).
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={'ActivationSymmetric': False, 'WeightSymmetric': True})
    by_name = {node.name: node.op_type for node in graph.node}
    counts = collections.Counter(node.op_type
                                 for node in onnx.load(str(target)).graph.node)
    float_convs = sum(by_name[name] == 'Conv' for name in tail)
    return {
        'format': 'QDQ',
        'tool': f'onnxruntime.quantization.quantize_static (onnxruntime '
                f'{onnxruntime.__version__}), after quant_pre_process',
        'weights': 'int8, symmetric, per output channel',
        'activations': 'uint8, asymmetric, per tensor; MinMax ranges over the calibration '
                       'frames',
        'op_types_quantized': list(QUANTIZED_OP_TYPES),
        'float_nodes': {
            'op_types': dict(sorted(collections.Counter(by_name[n] for n in tail).items())),
            'names': tail,
            'why': 'the score head stays float: the last convolutions (the logits) and all '
                   'after them (logits upsampling, log-sum-exp, softplus, clamp, score '
                   'upsampling, argmax); on an 8-bit grid the score would lose its resolution',
        },
        'nodes': {'QuantizeLinear': counts['QuantizeLinear'],
                  'DequantizeLinear': counts['DequantizeLinear'],
                  'Conv': counts['Conv'], 'float_Conv': float_convs},
    }


def split_frames(frames: np.ndarray, checks: int = CHECK_FRAMES
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(calibration frames, held-out check frames): `checks` frames evenly spread among
    `frames` (at most a third of them, at least one) are kept out of the calibration."""
    count = frames.shape[0]
    if count < 2:
        raise ConfigError(
            f'int8 export needs at least 2 calibration frames (one to calibrate, one to check '
            f'against fp32), found {count}; give more calibration images '
            '(--calibration-images, --int8-frames)')
    checks = max(1, min(checks, count // 3))
    held = {int(i) for i in np.linspace(0, count - 1, checks + 2)[1:-1].round()}
    calibrate = [i for i in range(count) if i not in held]
    return frames[calibrate], frames[sorted(held)]


def export_int8(reference: Sidecar, frames: np.ndarray,
                recalibrate: Callable[[OnnxScoreMaps], Any] | None = None,
                out_stem: str | os.PathLike | None = None, checks: int = CHECK_FRAMES,
                frames_source: str = '') -> Sidecar:
    """Quantise the fp32 artifact `reference` (read from its NAME.json) into NAME-int8.

    `frames`: uint8 [M, H, W, 3] calibration frames at the artifact size, fitted as the node
    fits frames; `checks` of them are held out for the parity check. `recalibrate(score_maps)`
    returns a training.calibration.Calibration of the int8 graph's scores (the thresholds);
    None keeps no thresholds (a graph without a score). `out_stem` defaults to NAME-int8 beside
    the reference. Raises ArtifactError and writes nothing when the int8 graph misses
    PARITY_REQUIREMENTS; on success writes OUT_STEM.onnx, then OUT_STEM.json.
    """
    if reference.source is None:
        raise ConfigError('export_int8 needs the fp32 sidecar read from its file '
                          '(read_sidecar(NAME.json)), to find NAME.onnx')
    if reference.precision != 'fp32':
        raise ConfigError(f'{reference.source} is already a {reference.precision} artifact; '
                          'quantise the fp32 artifact NAME.json instead')
    height, width = reference.input_size
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (height, width, 3):
        raise ConfigError(
            f'int8 calibration frames must be uint8 [M, {height}, {width}, 3] at the artifact '
            f'size, found {frames.dtype} {list(frames.shape)}; fit them with '
            'anomaly_seg_node.imaging.plan_fit/fit_image first')
    calibrate, check = split_frames(frames, checks)
    out_stem = int8_stem(Path(reference.source).with_suffix('')) if out_stem is None \
        else Path(out_stem)
    folder, name = out_stem.parent, out_stem.name
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp.onnx', dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are shared read-only files
    batch = reference.input.batch
    fp32_path = reference.file_path('onnx')
    try:
        try:
            quantization = quantize_graph(fp32_path, tmp, calibrate, batch)
        except Exception as error:
            raise ArtifactError(
                f'int8 quantisation of {fp32_path.name} failed in onnxruntime.quantization: '
                f'{error}; NAME-int8 was not written (the fp32 artifact stands)') from error
        check_onnx(tmp)
        expected = run_batched(_session_runner(fp32_path), check, batch)
        found = run_batched(_session_runner(tmp), check, batch)
        figures = _figures(expected, found)
        _fail_if(figures, name, reference, 'labels and scores')

        thresholds: dict[str, float] = {}
        default = reference.default_threshold
        calibration_info: dict[str, Any] = {}
        if recalibrate is not None:
            calibration = recalibrate(OnnxScoreMaps(tmp, reference.score.name, batch))
            thresholds = {k: float(v) for k, v in
                          calibration.thresholds.get(reference.score.name, {}).items()}
            calibration_info = dict(calibration.info)
        if default is not None and default not in thresholds:
            raise ArtifactError(
                f'the int8 recalibration of {name} gave thresholds {sorted(thresholds)}, which '
                f'lack the fp32 default {default!r}; calibrate both on the same data')
        if default is not None:
            reference_threshold = reference.thresholds[default]
            threshold = thresholds[default]
            threshold_name = default
        else:
            reference_threshold = threshold = float(np.median(expected[1]))
            threshold_name = 'median of the fp32 scores'
        figures.update(_mask_figures(expected[1], found[1], reference_threshold, threshold))
        parity = {
            'reference': f'the fp32 graph {fp32_path.name} in onnxruntime (CPU)',
            'images': int(check.shape[0]),
            'frames': 'held-out calibration frames (not used for the activation ranges)',
            'size': [height, width],
            'threshold_name': threshold_name,
            'threshold': threshold,
            'reference_threshold': reference_threshold,
            'formats_checked': ['onnx'],
            'requirements': dict(PARITY_REQUIREMENTS),
            'onnxruntime': figures,
        }
        _fail_if(figures, name, reference, 'anomaly masks', parity)

        quantization.update({
            'calibration_frames': int(calibrate.shape[0]),
            'frames_source': frames_source or 'calibration frames given to export_int8',
            'resize_mode': 'letterbox',
            'pad_rgb': list(reference.pad_rgb),
            'pad_mode': reference.pad_mode,
            'reference': {'sidecar': Path(reference.source).name, 'onnx': fp32_path.name,
                          'sha256': reference.files['onnx'].sha256},
            'reference_thresholds': dict(reference.thresholds),
        })
        training = dict(reference.training)
        if calibration_info:
            training['calibration'] = {**calibration_info,
                                       'scores': f'the int8 graph {name}.onnx in onnxruntime'}
        sidecar = dataclasses.replace(
            reference, files={'onnx': FileRef(f'{name}.onnx', sha256_file(tmp))},
            thresholds=thresholds, default_threshold=default, parity=parity,
            training=training, precision='int8', quantization=quantization,
            created=utc_now(), source=None)
        check_document(sidecar)
        os.replace(tmp, folder / f'{name}.onnx')
        path = write_sidecar(sidecar, folder / f'{name}.json')
    finally:
        tmp.unlink(missing_ok=True)
    return read_sidecar(path)


def stale_int8(reference: Sidecar) -> str:
    """Why the NAME-int8.json beside the fp32 artifact `reference` no longer belongs to it
    ('' when there is none or it was made from this NAME.onnx)."""
    path = int8_stem(Path(str(reference.source)).with_suffix('')).with_suffix('.json')
    if not path.is_file():
        return ''
    try:
        made_from = read_sidecar(path, verify_hashes=False).quantization.get('reference', {})
    except ArtifactError as error:
        return f'{path} is not a readable int8 sidecar ({error})'
    if isinstance(made_from, Mapping) and made_from.get('sha256') == \
            reference.files['onnx'].sha256:
        return ''
    return (f'{path} was quantised from an earlier {reference.files["onnx"].name}, not this one; '
            'its labels and thresholds belong to that model: re-export with --int8 or delete '
            f'{path.name} and {path.with_suffix(".onnx").name}')


def parity_failures(figures: Mapping[str, float]) -> list[str]:
    """The int8 requirements `figures` misses, in words (empty when it passes)."""
    problems = []
    if not figures['label_agreement'] >= MIN_LABEL_AGREEMENT:
        problems.append(f'labels agree with fp32 on {figures["label_agreement"]:.3%} of pixels, '
                        f'need >= {MIN_LABEL_AGREEMENT:.0%}')
    if 'mask_agreement' in figures and not figures['mask_agreement'] >= MIN_MASK_AGREEMENT:
        problems.append(f'anomaly masks agree with fp32 on {figures["mask_agreement"]:.3%} of '
                        f'pixels, need >= {MIN_MASK_AGREEMENT:.0%}')
    for key, limit, what in (('mean_score_diff_over_std', MAX_MEAN_DIFF_OVER_STD, 'mean'),
                             ('p99_score_diff_over_std', MAX_P99_DIFF_OVER_STD,
                              '99th percentile')):
        if not figures[key] <= limit:
            problems.append(f'the {what} score error is {figures[key]:.3g} x the fp32 score std '
                            f'{figures["score_std"]:.3g}, need <= {limit:g}')
    return problems


def _figures(expected: tuple[np.ndarray, np.ndarray], found: tuple[np.ndarray, np.ndarray]
             ) -> dict[str, float]:
    try:
        figures = agreement_figures(expected, found, 0.0)
    except AgreementShapeError as error:
        raise ArtifactError(f'the int8 graph returned other shapes than the fp32 graph: '
                            f'{error}') from None
    diff = np.abs(found[1].astype(np.float64) - expected[1].astype(np.float64))
    std = figures['score_std']
    p99 = float(np.quantile(np.where(np.isfinite(diff), diff, np.inf), 0.99))
    return {
        'label_agreement': figures['label_agreement'],
        'score_std': std,
        'max_score_diff': figures['max_score_diff'],
        'mean_score_diff': figures['mean_score_diff'],
        'score_diff_over_std': figures['score_diff_over_std'],
        'mean_score_diff_over_std': figures['mean_score_diff_over_std'],
        'p99_score_diff_over_std': p99 / std if std > 0 else (0.0 if p99 == 0 else np.inf),
        'nonfinite_fraction': figures['nonfinite_fraction'],
    }


def _mask_figures(expected: np.ndarray, found: np.ndarray, reference_threshold: float,
                  threshold: float) -> dict[str, float]:
    """Mask agreement as deployed (each graph at its own threshold) and at the fp32 one."""
    reference_mask = expected > reference_threshold
    return {
        'mask_agreement': float(np.mean((found > threshold) == reference_mask)),
        'mask_agreement_at_reference_threshold':
            float(np.mean((found > reference_threshold) == reference_mask)),
        'flagged_share': float(np.mean(found > threshold)),
        'reference_flagged_share': float(np.mean(reference_mask)),
    }


def _fail_if(figures: Mapping[str, float], name: str, reference: Sidecar, what: str,
             parity: Mapping[str, Any] | None = None) -> None:
    problems = parity_failures(figures)
    if problems:
        raise ArtifactError(
            f'int8 export of {name} failed its parity check ({what}) against the fp32 graph '
            f'{reference.files["onnx"].name}: {"; ".join(problems)}. Figures: '
            f'{dict(parity or {"onnxruntime": dict(figures)})}. Nothing was written (the fp32 '
            f'artifact {Path(str(reference.source)).name} stands). Calibrate on more frames '
            'like the deployment (--int8-frames, --calibration-data); if it still fails, this '
            'model does not quantise well enough: deploy the fp32 artifact')


def _session_runner(path: Path) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    return OnnxScoreMaps(path, 'score').run
