"""`anomaly-seg bench`: the analogue of the paper's Table II, measured side by side in one run.

- Score graphs: the segmentation-only, OP, OPxMS, DH and JSD graphs (the artifact and its
  siblings NAME-SCORE.json written by `anomaly-seg export --all-scores`) on the chosen backend.
- The DH graph on every available backend (onnxruntime, torch; on a GPU also fp16 and TensorRT).
  Backends the artifact cannot run (torch and tensorrt on an ONNX-only artifact, exported with
  `--formats onnx`) are skipped, and the report says so.
- One full frame as the node runs it: decode a sensor_msgs/Image, resize, convert, infer,
  labels, upsample, threshold, colour, overlay, encode each output (anomaly_seg_node.pipeline and
  image_codec), next to the time of one plain copy of the input and output bytes; and the
  anomaly objects of the frame (objects.find_objects with the replay's default parameters on
  the pipeline's score and labels) at the frame size and at the artifact size (the same maps
  resized), with the share of pixels above the threshold, which their cost grows with.
- Compared exports (`--compare OTHER.json`, repeatable): other exports of the network at the
  same input size (an `export --int8` graph, labels as uint8 or at stride 4, ...) in the same
  interleaved rounds as the score graphs, each as its time over the artifact's.
- The ratios of issue 5 §4: DH vs segmentation-only, the DH artifact vs a plain ResNet-18 FCN in
  the same runtime (built by training.reference_fcn when torch is present, else --reference),
  work outside inference vs the plain copy.

Graphs are timed with their input already on the device (graph only); every call returns host
arrays or synchronises the device, so a time covers the whole computation. After warm-up the
graphs of a table run in interleaved rounds (rotating order), so a load change on a shared
machine hits them alike; ratios are medians of the per-round ratios. Times are reported as the
median and the 10th-90th percentile spread. Nothing heavy is imported at module level.
"""

import argparse
from collections.abc import Callable, Mapping, Sequence
import copy
import importlib.metadata
import importlib.util
import json
import math
import os
from pathlib import Path
import platform
import time
import types
from typing import Any

import numpy as np

from anomaly_seg_node.errors import AnomalySegError, ArtifactError, BackendError, ConfigError

MAIN_OUTPUTS = ('semantic_mask', 'anomaly_score', 'anomaly_mask')
# Issue 5 §4.
TARGETS = {'dh_vs_segmentation': 1.03, 'dh_vs_fcn': 1.45, 'outside_vs_copy': 5.0}
# Pipeline stages that are not inference, for the three main outputs (colour/overlay excluded).
OUTSIDE_STAGES = ('decode', 'resize', 'convert', 'labels', 'upsample', 'threshold')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--artifact', required=True, metavar='NAME.json',
                        help='artifact sidecar; its siblings NAME-SCORE.json (export '
                             '--all-scores) give the other score graphs')
    parser.add_argument('--backends', default='auto',
                        help="comma-separated backends for the DH-per-backend table "
                             "(onnxruntime, torch, tensorrt); the first is the one the score "
                             "graphs and the frame run on. 'auto' (default): every available "
                             "one, with auto's choice first")
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                        help='device of the chosen backend (default cpu)')
    parser.add_argument('--precision', choices=('fp32', 'fp16'), default='fp32',
                        help='precision of the chosen backend (default fp32)')
    parser.add_argument('--iterations', type=int, default=20, metavar='N',
                        help='timed rounds per table (default 20)')
    parser.add_argument('--warmup', type=int, default=3, metavar='W',
                        help='untimed calls per graph first (default 3)')
    parser.add_argument('--frame-size', type=_size, default=None, metavar='HxW',
                        help="camera frame size of the full-frame stages (default: the "
                             "artifact's input size)")
    parser.add_argument('--encoding', choices=('rgb8', 'bgr8'), default='rgb8',
                        help='sensor_msgs/Image encoding of the frame (default rgb8)')
    parser.add_argument('--reference', metavar='FCN.onnx',
                        help='plain ResNet-18 FCN in ONNX at the artifact size (default: built '
                             'with training.reference_fcn when torch is installed)')
    parser.add_argument('--threads', type=int, default=None, metavar='T',
                        help="onnxruntime intra-op threads of the timed graphs and the frame, "
                             "as the node's ort_threads parameter (default: onnxruntime's, as "
                             'the node runs by default; 1 gives steadier ratios on a shared '
                             'machine)')
    parser.add_argument('--compare', action='append', default=[], metavar='OTHER.json',
                        help='another export of the network at the same input size (e.g. '
                             'export --int8, or --label-dtype uint8 --label-resolution '
                             'stride4), timed in the same interleaved rounds as the score '
                             "graphs and reported as its time over the artifact's "
                             '(repeatable)')
    parser.add_argument('--out', metavar='DIR', help='write bench.json and bench.md here')


def run(args: argparse.Namespace) -> dict[str, Any]:
    from anomaly_seg_node.artifact import read_sidecar

    iterations, warmup = int(args.iterations), int(args.warmup)
    if iterations < 1 or warmup < 0:
        raise ConfigError(f'--iterations must be >= 1 and --warmup >= 0, got {iterations} and '
                          f'{warmup}')
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f'--threads must be >= 1 (or left out for the default), got '
                          f'{args.threads}')
    sidecar = read_sidecar(args.artifact)
    out = Path(args.out) if args.out else None
    requested = [b.strip() for b in str(args.backends).split(',') if b.strip()]
    configs, chosen_reason, skipped = backend_configs(sidecar, requested, args.device,
                                                      args.precision)
    chosen = configs[0]
    report: dict[str, Any] = {
        'artifact': str(Path(sidecar.source)),
        'score': sidecar.score.name,
        'score_resolution': sidecar.score.resolution,
        'labels': {'dtype': sidecar.labels.dtype, 'resolution': sidecar.labels.resolution},
        'input_size': list(sidecar.input_size),
        'batch': sidecar.input.batch,
        'iterations': iterations,
        'warmup': warmup,
        'threads': args.threads,
        'machine': machine_info(),
        'chosen': {**chosen, 'reason': chosen_reason},
        'skipped_backends': skipped,
    }
    frame = synthetic_frame(*sidecar.input_size)

    # 1. Score graphs (and the FCN reference when the chosen runtime is onnxruntime).
    graphs, missing = score_artifacts(sidecar)
    runners: dict[str, Callable[[], Any]] = {}
    loaded: dict[str, Any] = {}
    for graph, sc in list(graphs.items()):
        why = _cannot_run(sc, chosen['backend'])
        if why:
            missing.append(f'{graph}: skipped on {chosen["backend"]}: {why}')
            del graphs[graph]
            continue
        loaded[graph] = _load(sc, chosen, args.threads)
        runners[graph] = graph_runner(loaded[graph], frame, args.threads)
    compared = compare_artifacts(getattr(args, 'compare', None) or [], sidecar)
    if compared and sidecar.score.name not in loaded:
        raise ConfigError(f'--compare needs the artifact itself on {chosen["backend"]}, which '
                          f'cannot run it: {_cannot_run(sidecar, chosen["backend"])}')
    for key, sc in compared.items():
        why = _cannot_run(sc, chosen['backend'])
        if why:
            raise ConfigError(f'--compare {sc.source}: cannot run on {chosen["backend"]}: '
                              f'{why}; pick the backend with --backends')
        runners[key] = graph_runner(_load(sc, chosen, args.threads), frame, args.threads)
    dh = graphs.get('DH')
    reference, reference_note = reference_model(args, sidecar, out)
    if reference is not None and chosen['backend'] == 'onnxruntime' and 'DH' in loaded:
        runners['fcn'] = onnx_runner(reference, loaded['DH'].session.get_providers(), frame,
                                     sidecar.input.batch, args.threads)
    times = measure_interleaved(runners, warmup, iterations)
    report['graphs'] = {
        'backend': chosen,
        'rows': {name: summarize(samples, sidecar.input.batch)
                 for name, samples in times.items()},
        'missing': missing,
    }
    if compared:
        report['compare'] = {
            key: {'artifact': str(sc.source), 'precision': sc.precision,
                  'score': sc.score.name, 'score_resolution': sc.score.resolution,
                  'labels': {'dtype': sc.labels.dtype, 'resolution': sc.labels.resolution},
                  'vs_artifact': paired_ratio(times[key], times[sidecar.score.name])}
            for key, sc in compared.items()}
    if 'fcn' not in times and reference is not None and dh is not None:
        # The FCN ratio needs both in one runtime: onnxruntime on the CPU.
        pair = measure_interleaved(
            {'DH': onnx_runner(dh.file_path('onnx'), ['CPUExecutionProvider'], frame,
                               sidecar.input.batch, args.threads),
             'fcn': onnx_runner(reference, ['CPUExecutionProvider'], frame,
                                sidecar.input.batch, args.threads)},
            warmup, iterations)
        report['fcn_pair'] = {name: summarize(s, sidecar.input.batch) for name, s in pair.items()}
    else:
        pair = times

    # 2. The DH graph on every available backend.
    rows = []
    backend_runners: dict[str, Callable[[], Any]] = {}
    if dh is not None:
        for config in configs:
            key = f"{config['backend']}/{config['device']}/{config['precision']}"
            why = _cannot_run(dh, config['backend'])
            if why:
                rows.append({**config, 'key': key, 'skipped': why})
                continue
            try:
                segmenter = (loaded['DH'] if config == chosen
                             else _load(dh, config, args.threads))
                backend_runners[key] = graph_runner(segmenter, frame, args.threads)
                rows.append({**config, 'key': key, 'providers': _providers(segmenter)})
            except AnomalySegError as error:
                rows.append({**config, 'key': key, 'error': str(error)})
        backend_times = measure_interleaved(backend_runners, warmup, iterations)
        for row in rows:
            if row['key'] in backend_times:
                row.update(summarize(backend_times[row['key']], sidecar.input.batch))
    report['backends'] = rows

    # 3. One frame as the node runs it, on the chosen backend with the main artifact.
    frame_size = tuple(args.frame_size) if args.frame_size else sidecar.input_size
    main = loaded.get(sidecar.score.name) or _load(sidecar, chosen, args.threads)
    report['stages'] = frame_stages(main, frame_size, args.encoding, warmup, iterations)

    report['ratios'] = ratios(times, pair, report['stages'], reference_note)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / 'bench.json').write_text(json.dumps(report, indent=2) + '\n')
        (out / 'bench.md').write_text(format_markdown(report))
        report['written'] = [str(out / 'bench.json'), str(out / 'bench.md')]
    return report


def format_human(report: Mapping[str, Any]) -> str:
    text = format_markdown(report)
    if report.get('written'):
        text += '\nwritten: ' + ', '.join(report['written']) + '\n'
    return text


# ---- what to run ----------------------------------------------------------------------------


def score_artifacts(sidecar: Any) -> tuple[dict[str, Any], list[str]]:
    """{graph: sidecar} of the score graphs found beside the artifact, and the missing ones.

    The artifact NAME.json (score S) is the graph of S; NAME-X.json is the graph of score X.
    """
    from anomaly_seg_node.artifact import read_sidecar
    from training.score_info import TABLE_II_GRAPHS

    path = Path(sidecar.source)
    graphs, missing = {}, []
    for graph in TABLE_II_GRAPHS:
        if graph == sidecar.score.name:
            graphs[graph] = sidecar
            continue
        sibling = path.with_name(f'{path.stem}-{graph}.json')
        if not sibling.is_file():
            missing.append(f'{graph}: {sibling.name} not found (export with --all-scores)')
            continue
        found = read_sidecar(sibling)
        if (found.score.name != graph or found.input != sidecar.input
                or found.score.resolution != sidecar.score.resolution):
            raise ArtifactError(
                f'{sibling} holds score {found.score.name!r} at {found.input_size} batch '
                f'{found.input.batch} ({found.score.resolution} resolution); expected '
                f'{graph!r} at {sidecar.input_size} batch {sidecar.input.batch} '
                f'({sidecar.score.resolution} resolution): re-export the artifact with '
                '--all-scores')
        graphs[graph] = found
    return graphs, missing


def compare_artifacts(paths: Sequence[str], sidecar: Any) -> dict[str, Any]:
    """{'compare: STEM': sidecar} of the --compare exports; each must take the artifact's input
    (size and batch), else an ArtifactError."""
    from anomaly_seg_node.artifact import read_sidecar

    found: dict[str, Any] = {}
    for path in paths:
        other = read_sidecar(path)
        if other.input != sidecar.input:
            raise ArtifactError(
                f'--compare {path} takes {other.input_size} batch {other.input.batch}, the '
                f'artifact {sidecar.input_size} batch {sidecar.input.batch}: compare exports '
                'of one size (export --size)')
        key, index = f'compare: {Path(path).stem}', 2
        while key in found:
            key, index = f'compare: {Path(path).stem} ({index})', index + 1
        found[key] = other
    return found


def backend_configs(sidecar: Any, requested: Sequence[str], device: str, precision: str
                    ) -> tuple[list[dict[str, str]], str, list[dict[str, str]]]:
    """The (backend, device, precision) rows to time (the first is the chosen one), the reason
    of the choice, and the rows skipped because the artifact cannot run them (with 'why')."""
    from anomaly_seg_node import backends

    if not requested:
        raise ConfigError('--backends is empty; give e.g. onnxruntime,torch or auto')
    unknown = [b for b in requested if b not in backends.BACKENDS]
    if unknown:
        raise ConfigError(f'unknown backend(s) {unknown}; expected some of '
                          f'{list(backends.BACKENDS)}')
    skipped: list[dict[str, str]] = []
    runnable = []
    for name in requested:
        why = _cannot_run(sidecar, name)
        if why:
            skipped.append({'backend': name, 'device': device, 'precision': precision,
                            'why': why})
        else:
            runnable.append(name)
    if not runnable:
        raise BackendError(f'none of the backends {list(requested)} can run this artifact: '
                           + '; '.join(item['why'] for item in skipped))
    if runnable[0] == 'auto':
        backend, dev, prec, reason = backends.choose_backend(sidecar, device, precision)
    else:
        backend, dev, prec, reason = runnable[0], device, precision, 'requested'
        if skipped and requested[0] != runnable[0]:
            reason = (f'requested ({", ".join(item["backend"] for item in skipped)} skipped: '
                      'the artifact ships no file they run)')
    first = {'backend': backend, 'device': dev, 'precision': prec}
    if 'auto' in runnable:
        candidates = available_configs()
    else:
        candidates = [{'backend': b, 'device': dev, 'precision': prec} for b in runnable]
    configs = [first]
    for config in candidates:
        why = _cannot_run(sidecar, config['backend'])
        if why:
            if {**config, 'why': why} not in skipped:
                skipped.append({**config, 'why': why})
        elif config != first:
            configs.append(config)
    return configs, reason, skipped


def _cannot_run(sidecar: Any, backend: str) -> str:
    """'' when `sidecar` ships the model file `backend` runs, else why not (with the fix)."""
    from anomaly_seg_node import backends

    return backends.cannot_run(sidecar, backend)


def available_configs() -> list[dict[str, str]]:
    """Every backend configuration this machine can run (as far as packages tell)."""
    configs = []
    has_ort = importlib.util.find_spec('onnxruntime') is not None
    has_torch = importlib.util.find_spec('torch') is not None
    if has_ort:
        configs.append({'backend': 'onnxruntime', 'device': 'cpu', 'precision': 'fp32'})
    if has_torch:
        configs.append({'backend': 'torch', 'device': 'cpu', 'precision': 'fp32'})
        import torch

        if torch.cuda.is_available():
            configs += [{'backend': 'torch', 'device': 'cuda', 'precision': p}
                        for p in ('fp32', 'fp16')]
            from anomaly_seg_node.backends import import_tensorrt

            if not isinstance(import_tensorrt(), str):  # installed and loads
                configs += [{'backend': 'tensorrt', 'device': 'cuda', 'precision': p}
                            for p in ('fp16', 'fp32')]
    if has_ort:
        import onnxruntime

        if 'CUDAExecutionProvider' in onnxruntime.get_available_providers():
            configs.append({'backend': 'onnxruntime', 'device': 'cuda', 'precision': 'fp32'})
    return configs


def _load(sidecar: Any, config: Mapping[str, str], threads: int | None = None) -> Any:
    """The backend of `config`; an onnxruntime one with `threads` intra-op threads (None:
    onnxruntime's default), as the node's ort_threads parameter sets them."""
    from anomaly_seg_node import backends

    return backends.load(sidecar, config['backend'], config['device'], config['precision'],
                         ort_threads=threads or 0)


def _providers(segmenter: Any) -> list[str] | None:
    session = getattr(segmenter, 'session', None)
    return list(session.get_providers()) if session is not None else None


def reference_model(args: argparse.Namespace, sidecar: Any, out: Path | None
                    ) -> tuple[Path | None, str]:
    """The plain ResNet-18 FCN ONNX file at the artifact's size, or (None, why not)."""
    height, width = sidecar.input_size
    batch = sidecar.input.batch
    if args.reference:
        path = Path(args.reference)
        _check_reference(path, batch, height, width)
        return path, f'--reference {path}'
    if importlib.util.find_spec('torch') is None:
        return None, ('torch is not installed, so the reference FCN cannot be built here; '
                      'pass --reference FCN.onnx (training.reference_fcn.export_reference_fcn)')
    from training.reference_fcn import export_reference_fcn

    folder = out if out is not None else Path(sidecar.source).parent
    path = folder / f'resnet18_fcn_{height}x{width}_b{batch}_k{len(sidecar.classes)}.onnx'
    if not path.is_file():
        export_reference_fcn(path, (height, width), batch, num_classes=len(sidecar.classes))
    _check_reference(path, batch, height, width)
    return path, f'built by training.reference_fcn: {path}'


def _check_reference(path: Path, batch: int, height: int, width: int) -> None:
    import onnxruntime

    if not path.is_file():
        raise ArtifactError(f'reference model {path} does not exist; pass the ONNX file of '
                            'the plain ResNet-18 FCN at the artifact size')
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    shape = list(session.get_inputs()[0].shape)
    if session.get_inputs()[0].name != 'image' or shape != [batch, 3, height, width]:
        raise ArtifactError(
            f'reference model {path} takes {session.get_inputs()[0].name!r} {shape}; the '
            f"artifact takes 'image' [{batch}, 3, {height}, {width}]: export the reference at "
            'the same size and batch')


# ---- timing ---------------------------------------------------------------------------------


def synthetic_frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic road-like uint8 RGB frame [H, W, 3]: sky, buildings, road, noise."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    cols = np.linspace(0.0, 1.0, width)[None, :, None]
    image = np.where(rows < 0.45, np.array([90, 140, 210]) + 80 * rows,
                     np.array([110, 110, 115]) + 40 * np.abs(cols - 0.5))
    blocks = (rows < 0.45) & (rows > 0.2) & ((cols * 9) % 1 < 0.6)
    image = np.where(blocks, np.array([70, 70, 80]), image)
    image = image + rng.normal(0, 8, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def graph_runner(segmenter: Any, frame: np.ndarray, threads: int | None = None
                 ) -> Callable[[], Any]:
    """A call that runs only the graph of a loaded backend, input already converted.

    `threads` (onnxruntime only): the backend's own session when it runs that many intra-op
    threads (`_load` with the same `threads`), else a session of the same file and providers
    with that many.
    """
    batch = segmenter.batch
    frames = np.ascontiguousarray(np.repeat(frame[None], batch, axis=0))
    session = getattr(segmenter, 'session', None)
    if session is not None:
        if threads is not None and getattr(segmenter, 'threads', 0) != threads:
            return onnx_runner(segmenter.sidecar.file_path('onnx'), session.get_providers(),
                               frame, batch, threads)
        image = np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32)
        return lambda: session.run(None, {'image': image})
    module = getattr(segmenter, 'module', None)
    if module is None:
        raise BackendError(f'cannot time {segmenter!r}: it exposes neither an ONNX Runtime '
                           'session nor a torch module')
    torch = segmenter.torch
    image = torch.from_numpy(frames).to(segmenter.device).permute(0, 3, 1, 2)
    image = image.to(segmenter.dtype).contiguous()
    cuda = segmenter.device == 'cuda'

    def call() -> Any:
        with torch.inference_mode():
            result = module(image)
        if cuda:
            torch.cuda.synchronize()
        return result
    return call


def onnx_runner(path: str | os.PathLike, providers: Sequence[Any], frame: np.ndarray,
                batch: int, threads: int | None = None) -> Callable[[], Any]:
    """Graph-only call of an ONNX file in onnxruntime (intra-op `threads`, None = default)."""
    import onnxruntime

    from anomaly_seg_node.backends import session_options

    options = session_options(onnxruntime, threads or 0)
    session = onnxruntime.InferenceSession(str(path), options, providers=list(providers))
    frames = np.repeat(frame[None], batch, axis=0)
    image = np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32)
    return lambda: session.run(None, {'image': image})


def measure_interleaved(runners: Mapping[str, Callable[[], Any]], warmup: int, iterations: int,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Milliseconds per call of each runner: `warmup` untimed calls each, then `iterations`
    rounds that call every runner once, in an order rotated every round."""
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(iterations):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            start = clock()
            runners[name]()
            times[name].append((clock() - start) * 1e3)
    return times


def summarize(samples_ms: Sequence[float], batch: int = 1) -> dict[str, float]:
    """Median, spread (10th-90th percentile), extremes and frames per second of one timing."""
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        raise ConfigError('no timing samples to summarize')
    median = float(np.median(values))
    return {
        'median_ms': median,
        'p10_ms': float(np.percentile(values, 10)),
        'p90_ms': float(np.percentile(values, 90)),
        'min_ms': float(values.min()),
        'max_ms': float(values.max()),
        'spread': float((np.percentile(values, 90) - np.percentile(values, 10)) / median)
        if median > 0 else 0.0,
        'fps': float(batch * 1e3 / median) if median > 0 else math.inf,
        'samples': int(values.size),
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """Median and 10th-90th percentile of the per-round ratios of two interleaved timings."""
    ratio = np.asarray(numerator, np.float64) / np.asarray(denominator, np.float64)
    return {'value': float(np.median(ratio)), 'p10': float(np.percentile(ratio, 10)),
            'p90': float(np.percentile(ratio, 90)),
            'of_medians': float(np.median(numerator) / np.median(denominator))}


# ---- one frame as the node runs it ------------------------------------------------------------


class _TimedGraph:
    """Wraps a backend's session or module so the graph's own time is known per call."""

    def __init__(self, inner: Any, sync: Callable[[], None] | None = None) -> None:
        self.inner = inner
        self.sync = sync
        self.last_ms = math.nan

    def _timed(self, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = call()
        if self.sync is not None:
            self.sync()
        self.last_ms = (time.perf_counter() - start) * 1e3
        return result

    def run(self, output_names: Any, feed: Mapping[str, Any], *args: Any, **kwargs: Any
            ) -> Any:  # onnxruntime.InferenceSession.run
        # onnxruntime copies a non-contiguous input inside run: that copy is conversion work,
        # so it happens here, outside the graph's time.
        feed = {name: np.ascontiguousarray(value) for name, value in feed.items()}
        return self._timed(lambda: self.inner.run(output_names, feed, *args, **kwargs))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # torch module
        return self._timed(lambda: self.inner(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def frame_stages(segmenter: Any, frame_size: tuple[int, int], encoding: str, warmup: int,
                 iterations: int) -> dict[str, Any]:
    """Per-stage milliseconds of one full frame through decode -> pipeline -> encode.

    'convert' is the backend call minus the graph's own time (HWC uint8 -> NCHW float32 in a
    contiguous buffer, input checks, output copies); 'infer' is the graph. The plain copy
    moves the same input and main-output bytes once with np.copyto. 'objects' (apart from the
    stages) times `objects.find_objects` on the pipeline's score and labels at the frame size
    and on the same maps resized to the artifact size, with the replay's default parameters.
    The graph is timed through a copy of `segmenter` (`_timed_view`): the backend measured is
    left unchanged.
    """
    import cv2

    from anomaly_seg_node.artifact import resolve_threshold
    from anomaly_seg_node.image_codec import decode_image, encode_image, to_message
    from anomaly_seg_node.objects import (
        ObjectParams,
        find_objects,
        fpr_table_from_thresholds,
    )
    from anomaly_seg_node.pipeline import ENCODINGS, OUTPUTS, FramePipeline
    from anomaly_seg_node.replay_command import OBJECT_DEFAULTS

    sidecar = segmenter.sidecar
    timed_segmenter, timed = _timed_view(segmenter)
    try:
        threshold = resolve_threshold(sidecar)
    except ArtifactError:
        threshold = 0.0
    # the replay's defaults, without a drivable restriction
    params = ObjectParams(threshold=threshold, drivable_margin=OBJECT_DEFAULTS['margin'],
                          merge_distance=OBJECT_DEFAULTS['merge'],
                          min_area_px=OBJECT_DEFAULTS['min_area'],
                          max_objects=OBJECT_DEFAULTS['max'])
    try:
        fpr_table = fpr_table_from_thresholds(sidecar.thresholds)
    except ArtifactError:  # inconsistent fpr thresholds: time the logistic confidence
        fpr_table = None
    net_h, net_w = (int(v) for v in segmenter.input_size)
    object_samples: dict[str, dict[str, list[float]]] = {
        'frame_size': {'ms': [], 'flagged': [], 'objects': []},
        'artifact_size': {'ms': [], 'flagged': [], 'objects': []}}
    pipeline = FramePipeline(timed_segmenter, sidecar.classes, sidecar.palette,
                             sidecar.void_id, output_resolution='input', threshold=threshold,
                             pad_rgb=sidecar.pad_rgb, pad_mode=sidecar.pad_mode)
    height, width = frame_size
    rgb = synthetic_frame(height, width, seed=1)
    message = encode_image(rgb if encoding == 'rgb8' else np.ascontiguousarray(rgb[..., ::-1]),
                           'rgb8')
    message.encoding = encoding
    # What rclpy delivers: data as an array.array('B').
    message = to_message(message, types.SimpleNamespace)
    main_bytes = height * width * (3 + 1 + 4 + 1)  # rgb8 in; mono8, 32FC1, mono8 out
    source = np.empty(main_bytes, np.uint8)
    target = np.empty(main_bytes, np.uint8)
    samples: dict[str, list[float]] = {}
    for index in range(warmup + iterations):
        stage: dict[str, float] = {}
        start = time.perf_counter()
        decoded = decode_image(message)
        stage['decode'] = (time.perf_counter() - start) * 1e3
        result = pipeline.process(decoded, OUTPUTS)
        for name in ('resize', 'labels', 'upsample', 'threshold', 'colour', 'overlay'):
            stage[name] = result.timings_ms[name]
        graph_ms = timed.last_ms
        stage['infer'] = graph_ms
        stage['convert'] = result.timings_ms['infer'] - graph_ms
        for output in OUTPUTS:
            start = time.perf_counter()
            fields = encode_image(getattr(result, output), ENCODINGS[output])
            to_message(fields, types.SimpleNamespace)  # rclpy's path: one memcpy into array
            stage[f'encode_{output}'] = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        np.copyto(target, source)
        stage['plain_copy'] = (time.perf_counter() - start) * 1e3
        score, labels = result.anomaly_score, result.semantic_mask
        maps = {'frame_size': (score, labels)}
        maps['artifact_size'] = maps['frame_size'] if score.shape == (net_h, net_w) else (
            cv2.resize(score, (net_w, net_h), interpolation=cv2.INTER_LINEAR),
            cv2.resize(labels, (net_w, net_h), interpolation=cv2.INTER_NEAREST))
        measured: dict[str, tuple[float, float, int]] = {}
        for where, (score_map, label_map) in maps.items():
            if where == 'artifact_size' and maps[where] is maps['frame_size']:
                # the same maps: a second call would only time a warm cache
                measured[where] = measured['frame_size']
                continue
            start = time.perf_counter()
            found = find_objects(score_map, label_map, params, fpr_table)
            measured[where] = ((time.perf_counter() - start) * 1e3,
                               float(np.mean(score_map > threshold)), len(found))
        if index >= warmup:
            for where, (elapsed, flagged, count) in measured.items():
                object_samples[where]['ms'].append(elapsed)
                object_samples[where]['flagged'].append(flagged)
                object_samples[where]['objects'].append(count)
        if index >= warmup:
            for name, value in stage.items():
                samples.setdefault(name, []).append(value)
    outside = [sum(samples[name][i] for name in OUTSIDE_STAGES)
               + sum(samples[f'encode_{o}'][i] for o in MAIN_OUTPUTS)
               for i in range(iterations)]
    return {
        'frame_size': [height, width],
        'input_size': list(segmenter.input_size),
        'encoding': encoding,
        'backend': segmenter.backend,
        'median_ms': {name: float(np.median(values)) for name, values in samples.items()},
        'p90_ms': {name: float(np.percentile(values, 90)) for name, values in samples.items()},
        'outside_inference_ms': float(np.median(outside)),
        'outside_stages': [*OUTSIDE_STAGES, *(f'encode_{o}' for o in MAIN_OUTPUTS)],
        'copy_bytes': main_bytes,
        'objects': {
            'params': {'threshold': threshold, 'merge_distance': params.merge_distance,
                       'min_area_px': params.min_area_px, 'max_objects': params.max_objects,
                       'drivable_ids': [], 'confidence': 'fpr table' if fpr_table else
                       'logistic'},
            **{where: {'size': list(size), 'median_ms': float(np.median(sample['ms'])),
                       'p90_ms': float(np.percentile(sample['ms'], 90)),
                       'flagged_share': float(np.median(sample['flagged'])),
                       'objects': float(np.median(sample['objects']))}
               for (where, sample), size in zip(object_samples.items(),
                                                [(height, width), (net_h, net_w)], strict=True)}},
        '_outside_samples': outside,
        '_copy_samples': samples['plain_copy'],
    }


def _timed_view(segmenter: Any) -> tuple[Any, _TimedGraph]:
    """A shallow copy of the backend whose session or module is a timing wrapper of the
    backend's own, and that wrapper. The backend itself is left as it is: whoever holds it
    (the graph runners, a caller, another thread) keeps running the untimed graph."""
    for attribute in ('session', 'module'):
        inner = getattr(segmenter, attribute, None)
        if inner is None:
            continue
        sync = None
        if attribute == 'module' and segmenter.device == 'cuda':
            sync = segmenter.torch.cuda.synchronize
        timed = _TimedGraph(inner, sync)
        view = copy.copy(segmenter)
        setattr(view, attribute, timed)
        return view, timed
    raise BackendError(f'cannot time the graph of {segmenter!r}')


# ---- ratios and tables ------------------------------------------------------------------------


def ratios(times: Mapping[str, Sequence[float]], pair: Mapping[str, Sequence[float]],
           stages: dict[str, Any], reference_note: str) -> dict[str, Any]:
    """The three ratios of issue 5 §4 with their targets."""
    result: dict[str, Any] = {}
    if 'DH' in times and 'segmentation' in times:
        result['dh_vs_segmentation'] = paired_ratio(times['DH'], times['segmentation'])
    else:
        result['dh_vs_segmentation'] = {'value': None, 'why': 'needs the DH and segmentation '
                                                               'graphs (export --all-scores)'}
    if 'DH' in pair and 'fcn' in pair:
        result['dh_vs_fcn'] = {**paired_ratio(pair['DH'], pair['fcn']), 'reference':
                               reference_note, 'runtime': 'onnxruntime'}
    else:
        result['dh_vs_fcn'] = {'value': None, 'why': reference_note if 'fcn' not in pair
                               else 'needs the DH graph'}
    outside = stages.pop('_outside_samples')
    copies = stages.pop('_copy_samples')
    result['outside_vs_copy'] = paired_ratio(outside, copies)
    for name, target in TARGETS.items():
        value = result[name].get('value')
        result[name]['target'] = target
        result[name]['met'] = None if value is None else bool(value <= target)
    return result


def format_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown tables."""
    height, width = report['input_size']
    chosen = report['chosen']
    machine = report['machine']
    lines = [f"# anomaly-seg bench: {Path(report['artifact']).name} ({height}x{width}, batch "
             f"{report['batch']}, scores at {report.get('score_resolution', 'input')} "
             'resolution)', '',
             f"{machine['cpu']} ({machine['cpu_count']} CPUs, load average "
             f"{machine['load_average']}); onnxruntime {machine['versions'].get('onnxruntime')}, "
             f"torch {machine['versions'].get('torch')}; {report['iterations']} interleaved "
             f"rounds after {report['warmup']} warm-up calls; onnxruntime threads "
             f"{report.get('threads') or 'default'}; graph time only (input on the device, "
             'outputs synchronised).', '',
             f"## Score graphs on {chosen['backend']} ({chosen['device']}, "
             f"{chosen['precision']}; {chosen['reason']})", '',
             '| graph | median ms | p10-p90 ms | FPS | vs segmentation |',
             '|---|---:|---:|---:|---:|']
    rows = report['graphs']['rows']
    base = rows.get('segmentation', {}).get('median_ms')
    names = {'fcn': 'plain ResNet-18 FCN (reference)'}
    for name, row in rows.items():
        rel = f"{row['median_ms'] / base:.3f}" if base else '-'
        lines.append(f"| {names.get(name, name)} | {row['median_ms']:.1f} | "
                     f"{row['p10_ms']:.1f}-{row['p90_ms']:.1f} | {row['fps']:.2f} | {rel} |")
    for item in report['graphs']['missing']:
        lines.append(f'| {item} | - | - | - | - |')
    if 'fcn_pair' in report:
        for name, row in report['fcn_pair'].items():
            lines.append(f"| {names.get(name, name)} (onnxruntime cpu) | {row['median_ms']:.1f} "
                         f"| {row['p10_ms']:.1f}-{row['p90_ms']:.1f} | {row['fps']:.2f} | - |")
    if report.get('compare'):
        lines += ['', f"## Compared exports (over {Path(report['artifact']).name}: labels "
                  f"{report['labels']['dtype']} at {report['labels']['resolution']})", '',
                  '| export | precision | score at | labels | time / artifact | p10-p90 |',
                  '|---|---|---|---|---:|---:|']
        for name, row in report['compare'].items():
            ratio = row['vs_artifact']
            lines.append(f"| {name.removeprefix('compare: ')} | {row['precision']} | "
                         f"{row['score_resolution']} | {row['labels']['dtype']} at "
                         f"{row['labels']['resolution']} | {ratio['value']:.3f} | "
                         f"{ratio['p10']:.3f}-{ratio['p90']:.3f} |")
    lines += ['', '## DH graph per backend', '',
              '| backend | device | precision | median ms | p10-p90 ms | FPS | note |',
              '|---|---|---|---:|---:|---:|---|']
    for row in report['backends']:
        if 'skipped' in row:
            lines.append(f"| {row['backend']} | {row['device']} | {row['precision']} | - | - | "
                         f"- | skipped: {row['skipped']} |")
        elif 'error' in row:
            lines.append(f"| {row['backend']} | {row['device']} | {row['precision']} | - | - | "
                         f"- | unavailable: {row['error']} |")
        else:
            note = ', '.join(row['providers']) if row.get('providers') else ''
            lines.append(f"| {row['backend']} | {row['device']} | {row['precision']} | "
                         f"{row['median_ms']:.1f} | {row['p10_ms']:.1f}-{row['p90_ms']:.1f} | "
                         f"{row['fps']:.2f} | {note} |")
    if report.get('skipped_backends'):
        lines.append('')
    for item in report.get('skipped_backends', []):
        lines.append(f"- skipped {item['backend']} ({item['device']}, {item['precision']}): "
                     f"{item['why']}")
    stages = report['stages']
    fh, fw = stages['frame_size']
    lines += ['', f"## One frame as the node runs it ({stages['encoding']} {fh}x{fw} -> "
              f"{height}x{width}, {stages['backend']}, outputs at input resolution)", '',
              '| stage | median ms | p90 ms |', '|---|---:|---:|']
    for name, value in stages['median_ms'].items():
        mark = ' *' if name in stages['outside_stages'] else ''
        lines.append(f"| {name}{mark} | {value:.2f} | {stages['p90_ms'][name]:.2f} |")
    lines.append(f"| work outside inference (* stages) | {stages['outside_inference_ms']:.2f} "
                 '| |')
    if 'objects' in stages:
        objects = stages['objects']
        params = objects['params']
        lines += ['', '## Anomaly objects per frame (find_objects on the outputs)', '',
                  f"Threshold {params['threshold']:.4g}, fragments within "
                  f"{params['merge_distance']} px merged, at least {params['min_area_px']} px, "
                  f"at most {params['max_objects']}, no drivable restriction; the cost grows "
                  'with the pixels above the threshold.', '',
                  '| maps at | size | median ms | p90 ms | pixels above threshold | objects |',
                  '|---|---|---:|---:|---:|---:|']
        for where, label in (('frame_size', 'frame size'), ('artifact_size', 'artifact size')):
            row = objects[where]
            lines.append(f"| {label} | {row['size'][0]}x{row['size'][1]} | "
                         f"{row['median_ms']:.2f} | {row['p90_ms']:.2f} | "
                         f"{100 * row['flagged_share']:.2f} % | {row['objects']:g} |")
    lines += ['', '## Targets (issue 5 §4)', '',
              '| ratio | measured (median of per-round ratios) | p10-p90 | target | met |',
              '|---|---:|---:|---:|---|']
    labels = {'dh_vs_segmentation': 'DH graph / segmentation-only graph',
              'dh_vs_fcn': 'DH artifact / plain ResNet-18 FCN (onnxruntime)',
              'outside_vs_copy': 'work outside inference / one plain copy of the bytes'}
    for name, label in labels.items():
        item = report['ratios'][name]
        if item.get('value') is None:
            lines.append(f"| {label} | n/a ({item.get('why')}) | | <= {item['target']} | - |")
        else:
            met = 'yes' if item['met'] else 'NO'
            lines.append(f"| {label} | {item['value']:.3f} | {item['p10']:.3f}-"
                         f"{item['p90']:.3f} | <= {item['target']} | {met} |")
    return '\n'.join(lines) + '\n'


def machine_info() -> dict[str, Any]:
    """CPU, load and package versions: what a reader needs to judge the numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    import cv2

    versions = {'numpy': np.__version__, 'cv2': cv2.__version__}
    for name in ('onnxruntime', 'torch'):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = []
    return {'cpu': cpu, 'cpu_count': os.cpu_count(), 'load_average': load,
            'python': platform.python_version(), 'versions': versions}


def _size(text: str) -> tuple[int, int]:
    from training.cli_types import parse_size

    return parse_size(text)
