"""The node's logic without ROS: parameter updates, transitions, publish decisions, max_input_age,
max_input_pixels, anomaly objects (found, drawn, boxes in input pixels, their Detection2DArray),
diagnostics (conditions, causes, ageing figures, lost frames, node and topic names, device auto),
throttled warnings (fake transport, fake segmenter, fake clocks).
"""

import hashlib
from pathlib import Path
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest

from anomaly_seg_node.artifact import FileRef, InputSpec, ScoreSpec, Sidecar, write_sidecar
from anomaly_seg_node.errors import ArtifactError, BackendError, ConfigError
from anomaly_seg_node.image_codec import (
    MAX_PIXELS,
    MAX_SIDE,
    ImageFields,
    decode_image,
    encode_image,
    stamp_ns,
)
from anomaly_seg_node.imaging import plan_fit
from anomaly_seg_node.node_health import ERROR, OK, WARN, estimate_loss, nominal_period_ns
from anomaly_seg_node.node_logic import (
    CAMERA_INFO_OUTPUT,
    LABEL_INFO_TOPIC,
    CameraInfoOut,
    NodeCore,
    ObjectsOut,
    Throttle,
    detection_array_message,
    expand_topic,
    network_box_to_input,
    wanted_outputs,
    wants_camera_info,
    wants_objects,
)
from anomaly_seg_node.node_params import SPECS, validate_params
from anomaly_seg_node.node_worker import Frame
from anomaly_seg_node.objects import DEFAULT_BOX_COLOR, OBJECTS_TOPIC, AnomalyObject
from anomaly_seg_node.pipeline import ENCODINGS, OUTPUTS

REPO = Path(__file__).resolve().parents[2]
NET_H, NET_W = 4, 6
THRESHOLDS = {'tpr95': 100.0, 'fpr1': 200.0}


# Fakes ------------------------------------------------------------------------------------

class FakeSegmenter:
    """labels = red % 3, anomaly_score = green: outputs are known from the input colour."""

    def __init__(self, sidecar: Sidecar, backend: str, device: str, precision: str) -> None:
        self.sidecar = sidecar
        self.input_size = sidecar.input_size
        self.backend = 'onnxruntime' if backend == 'auto' else backend
        self.device = device
        self.precision = precision
        self.reason = 'requested'
        self.calls = 0
        self.gate: threading.Event | None = None  # when set, each call waits for it
        self.entered = threading.Event()
        self.fail_next = False

    def __call__(self, frame: np.ndarray) -> SimpleNamespace:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError('simulated backend failure')
        assert frame.shape == (*self.input_size, 3) and frame.dtype == np.uint8
        labels = (frame[None, :, :, 0] % 3).astype(np.int32)
        score = frame[None, :, :, 1].astype(np.float32)
        return SimpleNamespace(labels=labels, anomaly_score=score)


class FakeLoader:
    def __init__(self, run_device: str | None = None, reason: str = 'requested',
                 no_gpu: str = '') -> None:
        self.run_device = run_device  # None: the device asked for
        self.reason = reason
        self.no_gpu = no_gpu  # raise BackendError(no_gpu) for device cuda, as backends.load
        self.calls: list[tuple] = []
        self.threads: list[int] = []  # ort_threads of each call
        self.segmenter: FakeSegmenter | None = None

    def __call__(self, sidecar: Sidecar, backend: str, device: str, precision: str,
                 engine_cache_dir: str | None, ort_threads: int) -> FakeSegmenter:
        self.calls.append((sidecar, backend, device, precision, engine_cache_dir))
        self.threads.append(ort_threads)
        if self.no_gpu and device == 'cuda':
            raise BackendError(self.no_gpu)
        self.segmenter = FakeSegmenter(sidecar, backend, self.run_device or device, precision)
        self.segmenter.reason = self.reason
        return self.segmenter


class FakeTransport:
    def __init__(self) -> None:
        self.subscribers = dict.fromkeys([*OUTPUTS, CAMERA_INFO_OUTPUT], 1)
        self.published: list[tuple[str, Any]] = []
        self.logs: list[tuple[str, str]] = []
        self.clock_ns = 1_000 * 10**9
        self.lock = threading.Lock()
        self.fail_next = False  # the next publish raises

    def subscription_count(self, topic: str) -> int:
        return self.subscribers.get(topic, 0)

    def publish(self, topic: str, payload: Any) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError('simulated publish failure')
        with self.lock:
            self.published.append((topic, payload))

    def now_ns(self) -> int:
        return self.clock_ns

    def log(self, level: str, message: str) -> None:
        self.logs.append((level, message))

    def topics(self) -> list[str]:
        return [topic for topic, _ in self.published]

    def last(self, topic: str) -> Any:
        return [payload for name, payload in self.published if name == topic][-1]

    def warnings(self) -> list[str]:
        return [message for level, message in self.logs if level == 'warning']


class FakeClock:
    def __init__(self) -> None:
        self.ns = 5 * 10**9

    def __call__(self) -> int:
        return self.ns


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_artifact(folder: Path, thresholds: dict[str, float] = THRESHOLDS,
                    classes: tuple[str, ...] = ('road', 'car', 'sky')) -> Path:
    # The schema lists both model files; FakeLoader reads neither, only their hashes are checked.
    onnx, pt2 = b'onnx stand-in', b'pt2 stand-in'
    (folder / 'm.onnx').write_bytes(onnx)
    (folder / 'm.pt2').write_bytes(pt2)
    palette = ((128, 64, 128), (0, 0, 142), (70, 130, 180))
    sidecar = Sidecar(
        method='DenseHybrid', score=ScoreSpec(name='DH', units='nats'),
        input=InputSpec(height=NET_H, width=NET_W, batch=1),
        classes=classes, palette=palette[:len(classes)],
        files={'onnx': FileRef('m.onnx', _sha(onnx)), 'pt2': FileRef('m.pt2', _sha(pt2))},
        void_id=255, thresholds=dict(thresholds), default_threshold='tpr95')
    return write_sidecar(sidecar, folder / 'm.json')


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    return _write_artifact(tmp_path)


def _params(path: Path, **overrides: Any) -> dict[str, Any]:
    values = {'artifact': str(path), 'backend': 'onnxruntime', 'device': 'cpu',
              'precision': 'fp32', 'max_input_age': 0.0}
    values.update(overrides)
    return values


@pytest.fixture
def transport() -> FakeTransport:
    return FakeTransport()


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def core(transport: FakeTransport, loader: FakeLoader, clock: FakeClock):
    node = NodeCore(transport, loader=loader, monotonic_ns=clock)
    yield node
    node.shutdown()


def _image(red: int, green: int, height: int = 8, width: int = 12, stamp: int = 999 * 10**9,
           frame_id: str = 'camera_optical_frame') -> ImageFields:
    """An rgb8 Image message (image_codec's ImageFields has the message's fields)."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = red, green, 7
    header = SimpleNamespace(stamp=SimpleNamespace(sec=stamp // 10**9, nanosec=stamp % 10**9),
                             frame_id=frame_id)
    return encode_image(rgb, 'rgb8', header)


def _frame(msg: Any, clock: FakeClock, compressed: bool = False) -> Frame:
    return Frame(msg, compressed, clock())


def _wait(predicate: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, 'timed out'
        time.sleep(0.005)


# Parameters -------------------------------------------------------------------------------

def test_runtime_parameter_updates(core: NodeCore, transport: FakeTransport,
                                   artifact: Path) -> None:
    # Unconfigured: any parameter but autostart may change; names are checked at configure.
    assert core.update_parameters({'backend': 'torch', 'anomaly_threshold': 'fpr1'}) is None
    assert core.config.backend == 'torch'
    assert 'read-only' in core.update_parameters({'autostart': False})
    assert core.update_parameters({'use_sim_time': True}) is None  # not ours: accepted
    core.configure(_params(artifact))
    core.activate()
    assert core.threshold == 100.0 and core.pipeline.threshold == 100.0
    # Active: threshold by name or number, alpha; never a configure-time parameter.
    assert core.update_parameters({'anomaly_threshold': 'fpr1'}) is None
    assert core.pipeline.threshold == 200.0
    assert transport.last(LABEL_INFO_TOPIC).threshold == 200.0
    assert core.update_parameters({'anomaly_threshold': 12.5}) is None
    assert core.pipeline.threshold == 12.5
    assert core.update_parameters({'anomaly_threshold': ''}) is None  # the sidecar default
    assert core.pipeline.threshold == 100.0
    reason = core.update_parameters({'anomaly_threshold': 'tpr99'})
    assert 'unknown threshold name' in reason and 'fpr1, tpr95' in reason
    assert core.pipeline.threshold == 100.0
    reason = core.update_parameters({'overlay_alpha': 0.25, 'backend': 'torch'})
    assert 'backend is read at configure' in reason and 'cleanup' in reason
    assert core.pipeline.overlay_alpha == 0.5  # nothing of a refused batch is applied
    assert core.update_parameters({'overlay_alpha': 0.25}) is None
    assert core.pipeline.overlay_alpha == 0.25
    assert 'from 0 to 1' in core.update_parameters({'overlay_alpha': 2.0})


def test_ort_threads_is_a_read_only_integer_passed_to_the_backend(
        core: NodeCore, loader: FakeLoader, artifact: Path) -> None:
    spec = SPECS['ort_threads']
    assert spec.default == 0 and spec.integer and spec.read_only
    assert spec.constraints == 'from 0 to 1024; read-only (set it at start)'
    assert validate_params({}).ort_threads == 0
    assert validate_params({'ort_threads': np.int64(2)}).ort_threads == 2
    core.configure(_params(artifact, ort_threads=3))
    assert loader.threads == [3] and core.config.ort_threads == 3
    assert 'read-only' in core.update_parameters({'ort_threads': 1})
    assert core.config.ort_threads == 3
    core.cleanup()
    # device auto: the GPU try and the CPU fallback get the same threads
    auto = NodeCore(FakeTransport(), loader=FakeLoader(no_gpu='no CUDA'))
    try:
        auto.configure(_params(artifact, device='auto', ort_threads=1))
        assert auto.loader.threads == [1, 1]  # type: ignore[attr-defined]
    finally:
        auto.shutdown()


# Throttled warnings -----------------------------------------------------------------------

def test_throttle_holds_repeats_back_and_counts_them() -> None:
    now = [0.0]
    throttle = Throttle(period_s=5.0, clock=lambda: now[0])
    assert throttle.allow('x') == (True, 0)
    assert throttle.allow('x') == (False, 0)
    assert throttle.allow('y') == (True, 0)
    now[0] = 4.9
    assert throttle.allow('x') == (False, 0)
    now[0] = 5.0
    assert throttle.allow('x') == (True, 2)


# Transitions ------------------------------------------------------------------------------

def test_transitions_load_start_stop_and_free(core: NodeCore, loader: FakeLoader,
                                              artifact: Path) -> None:
    with pytest.raises(ConfigError, match='cannot activate from state unconfigured'):
        core.activate()
    core.configure(_params(artifact, engine_cache_dir='/cache'))
    assert core.state == 'inactive'
    sidecar, backend, device, precision, cache = loader.calls[0]
    assert (backend, device, precision, cache) == ('onnxruntime', 'cpu', 'fp32', '/cache')
    assert sidecar.classes == ('road', 'car', 'sky')
    assert loader.segmenter.calls == 1  # the warm-up frame
    core.activate()
    assert core.state == 'active' and core.worker.alive
    worker = core.worker
    core.deactivate()
    assert core.state == 'inactive' and not worker.alive and core.segmenter is not None
    core.cleanup()
    assert core.state == 'unconfigured'
    assert core.segmenter is None and core.pipeline is None and core.sidecar is None
    core.configure(_params(artifact))  # configure again after cleanup
    core.activate()
    worker = core.worker
    core.shutdown()
    assert core.state == 'finalized' and not worker.alive and core.segmenter is None


@pytest.mark.parametrize('overrides, error, words', [
    ({'artifact': 'missing.json'}, ArtifactError, 'does not exist'),
    ({'artifact': ''}, ArtifactError, 'artifact is empty'),
    ({'anomaly_threshold': 'tpr99'}, ArtifactError, 'unknown threshold name'),
    ({'backend': 'cuda'}, ConfigError, 'parameter backend'),
])
def test_configure_failure_leaves_nothing_loaded(core: NodeCore, loader: FakeLoader,
                                                 artifact: Path, overrides: dict, error: type,
                                                 words: str) -> None:
    with pytest.raises(error, match=words):
        core.configure(_params(artifact, **overrides))
    assert core.state == 'unconfigured' and core.segmenter is None and not loader.calls
    report = core.diagnostics()
    assert report.level == ERROR and report.message.startswith('configure failed:')
    assert words in report.message
    core.configure(_params(artifact))  # fixed parameters: the error clears
    assert core.diagnostics().level == OK


def test_the_crop_is_cut_before_inference_and_undone_after(
        core: NodeCore, transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    core.configure(_params(artifact, crop=[0, 4, 0, 0]))  # cut the bottom 4 rows (a bonnet)
    msg = _image(red=4, green=150)
    rgb = decode_image(msg).copy()
    rgb[4:, :, 0] = 5  # the bonnet would be class 2
    core.process(_frame(encode_image(rgb, 'rgb8', msg.header), clock))
    labels = decode_image(transport.last('semantic_mask'), 'native')
    assert labels.shape == (8, 12)
    assert np.all(labels[:4] == 1) and np.all(labels[4:] == 255)  # unseen rows are void
    scores = decode_image(transport.last('anomaly_score'), 'native')
    assert np.all(scores[:4] == 150.0) and np.all(np.isnan(scores[4:]))
    mask = decode_image(transport.last('anomaly_mask'), 'native')
    assert np.all(mask[:4] == 255) and np.all(mask[4:] == 0)


# Frames and publish decisions -------------------------------------------------------------

def test_publish_decisions() -> None:
    assert wanted_outputs({'overlay': 2, 'semantic_mask': 0, 'other': 5}) == {'overlay'}
    assert wants_camera_info('network', 1) and not wants_camera_info('input', 1)
    assert not wants_camera_info('network', 0)
    assert stamp_ns(SimpleNamespace(stamp=SimpleNamespace(sec=2, nanosec=5))) == 2 * 10**9 + 5
    assert stamp_ns(None) == 0


@pytest.mark.parametrize('overlap', [False, True])
def test_frame_outputs_encodings_sizes_headers_and_values(core: NodeCore,
                                                          transport: FakeTransport,
                                                          artifact: Path, overlap: bool) -> None:
    core.configure(_params(artifact, overlap_stages=overlap))
    core.activate()
    msg = _image(red=4, green=150)
    core.on_message(msg)
    _wait(lambda: core.stats.counts['processed'] == 1)
    assert transport.topics() == list(OUTPUTS)
    for topic in OUTPUTS:
        out = transport.last(topic)
        assert out.encoding == ENCODINGS[topic]
        assert (out.height, out.width) == (8, 12)
        assert out.header is msg.header  # stamp and frame_id of the input
    assert np.all(decode_image(transport.last('semantic_mask'), 'native') == 1)  # 4 % 3
    assert np.all(decode_image(transport.last('anomaly_score'), 'native') == 150.0)
    assert np.all(decode_image(transport.last('anomaly_mask'), 'native') == 255)  # 150 > 100
    colour = decode_image(transport.last('semantic_color'), 'native')
    assert np.all(colour == (0, 0, 142))
    overlay = decode_image(transport.last('overlay'), 'native')
    # Anomalous everywhere: the anomaly colour. No object box: every pixel is a car, none is
    # drivable (objects_drivable_classes [auto] = road, margin 16 px).
    assert np.all(overlay == (0, 255, 255))

    # A threshold change takes effect on the next frame.
    assert core.update_parameters({'anomaly_threshold': 'fpr1'}) is None
    core.on_message(_image(red=4, green=150))
    _wait(lambda: core.stats.counts['processed'] == 2)
    assert np.all(decode_image(transport.last('anomaly_mask'), 'native') == 0)  # 150 < 200


def test_only_subscribed_outputs_are_computed(core: NodeCore, transport: FakeTransport,
                                              loader: FakeLoader, artifact: Path,
                                              clock: FakeClock) -> None:
    core.configure(_params(artifact))
    frame_calls = loader.segmenter.calls
    transport.subscribers = {'anomaly_mask': 1}
    core.process(_frame(_image(4, 150), clock))
    assert transport.topics() == ['anomaly_mask']
    transport.subscribers = {}
    core.process(_frame(_image(4, 150), clock))
    assert transport.topics() == ['anomaly_mask']
    assert loader.segmenter.calls == frame_calls + 1  # no inference for nobody
    assert core.stats.counts['skipped_unsubscribed'] == 1


def test_compressed_input(core: NodeCore, transport: FakeTransport, artifact: Path,
                          clock: FakeClock) -> None:
    core.configure(_params(artifact, input_transport='compressed'))
    rgb = np.zeros((8, 12, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = 5, 30
    ok, png = cv2.imencode('.png', np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    header = SimpleNamespace(stamp=SimpleNamespace(sec=1, nanosec=0), frame_id='cam')
    msg = SimpleNamespace(header=header, format='png', data=png.reshape(-1))
    core.process(_frame(msg, clock, compressed=True))
    assert np.all(decode_image(transport.last('semantic_mask'), 'native') == 2)  # 5 % 3
    assert np.all(decode_image(transport.last('anomaly_mask'), 'native') == 0)  # 30 < 100
    assert transport.last('overlay').header is header


def test_undecodable_frames_are_dropped_counted_and_warned_once(
        core: NodeCore, transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    core.configure(_params(artifact))
    bayer = _image(1, 1)
    bayer.encoding = 'bayer_rggb8'
    truncated = _image(1, 1)
    truncated.data = truncated.data[:-5]
    for msg in (bayer, truncated, bayer):
        core.process(_frame(msg, clock))
    assert core.stats.counts['rejected_decode'] == 3
    assert not transport.published
    assert len(transport.warnings()) == 1  # throttled
    assert 'debayer' in transport.warnings()[0]
    core.process(_frame(_image(1, 1), clock))  # the node goes on
    assert core.stats.counts['processed'] == 1


def test_max_input_age(core: NodeCore, transport: FakeTransport, artifact: Path,
                       clock: FakeClock) -> None:
    core.configure(_params(artifact, max_input_age=0.5))
    now = transport.clock_ns
    core.process(_frame(_image(1, 1, stamp=now - 600_000_000), clock))  # 0.6 s old
    assert core.stats.counts['rejected_stale'] == 1 and not transport.published
    assert 'max_input_age 0.5 s' in transport.warnings()[0]
    core.process(_frame(_image(1, 1, stamp=now - 400_000_000), clock))  # 0.4 s old
    core.process(_frame(_image(1, 1, stamp=0), clock))  # no stamp: never too old
    assert core.stats.counts['processed'] == 2
    assert core.update_parameters({'max_input_age': 0.0}) is not None  # configure-time


@pytest.mark.parametrize('overlap', [False, True])
def test_a_failing_frame_is_counted_and_the_worker_goes_on(
        core: NodeCore, transport: FakeTransport, loader: FakeLoader, artifact: Path,
        overlap: bool) -> None:
    core.configure(_params(artifact, overlap_stages=overlap))
    core.activate()
    loader.segmenter.fail_next = True
    core.on_message(_image(1, 1))
    _wait(lambda: core.stats.counts['failed'] == 1)
    assert 'simulated backend failure' in transport.warnings()[0]
    core.on_message(_image(1, 1))
    _wait(lambda: core.stats.counts['processed'] == 1)
    assert core.worker.alive


def test_frames_arriving_while_busy_replace_the_pending_one(
        core: NodeCore, transport: FakeTransport, loader: FakeLoader, artifact: Path) -> None:
    core.configure(_params(artifact))
    core.activate()
    segmenter = loader.segmenter
    segmenter.gate = threading.Event()
    segmenter.entered.clear()
    core.on_message(_image(0, 10))
    assert segmenter.entered.wait(5)  # the worker is busy with frame 10
    for green in (11, 12, 13, 14):
        core.on_message(_image(0, green))
    segmenter.gate.set()
    _wait(lambda: core.stats.counts['processed'] == 2)
    time.sleep(0.05)
    assert core.stats.counts['processed'] == 2
    assert (core.slot.received, core.slot.dropped) == (5, 3)
    scores = [decode_image(p, 'native')[0, 0] for t, p in transport.published
              if t == 'anomaly_score']
    assert scores == [10.0, 14.0]  # the first and the newest; 11-13 dropped
    report = dict(core.diagnostics().values)
    assert report['frames_dropped'] == '3' and report['frames_processed'] == '2'


# Overlapped stages (overlap_stages) --------------------------------------------------------

def _scores(transport: FakeTransport) -> list[float]:
    return [float(decode_image(payload, 'native')[0, 0]) for topic, payload in
            transport.published if topic == 'anomaly_score']


def test_overlap_stages_run_three_threads_in_frame_order_and_stop(
        core: NodeCore, transport: FakeTransport, artifact: Path) -> None:
    core.configure(_params(artifact))
    core.activate()
    assert len(core.worker.threads) == 1
    core.deactivate()
    core.cleanup()
    core.configure(_params(artifact, overlap_stages=True))
    core.activate()
    worker = core.worker
    assert [thread.name for thread in worker.threads] == [
        'anomaly_seg_worker_0', 'anomaly_seg_worker_1', 'anomaly_seg_worker_2']
    for green in range(10, 30):
        core.on_message(_image(1, green))
        assert core.slot.wait_empty(timeout=5)  # taken, none dropped
    _wait(lambda: core.stats.counts['processed'] == 20)
    assert _scores(transport) == [float(green) for green in range(10, 30)]
    assert transport.topics() == list(OUTPUTS) * 20  # and every frame's outputs together
    assert core.slot.dropped == 0 and core.stats.counts['failed'] == 0
    core.deactivate()
    assert core.state == 'inactive' and core.worker is None
    assert not any(thread.is_alive() for thread in worker.threads)


def test_overlap_stages_prepare_the_next_frame_during_inference(
        core: NodeCore, transport: FakeTransport, loader: FakeLoader, artifact: Path) -> None:
    core.configure(_params(artifact, overlap_stages=True))
    core.activate()
    segmenter = loader.segmenter
    segmenter.gate = threading.Event()
    segmenter.entered.clear()
    core.on_message(_image(0, 10))
    assert segmenter.entered.wait(5)  # frame 10 is inferred
    core.on_message(_image(0, 11))
    assert core.slot.wait_empty(timeout=5)  # 11 taken and prepared meanwhile
    for green in (12, 13, 14):  # 11 waits for inference, so these wait in the slot
        core.on_message(_image(0, green))
    segmenter.gate.set()
    _wait(lambda: core.stats.counts['processed'] == 3)
    assert _scores(transport) == [10.0, 11.0, 14.0]
    assert (core.slot.received, core.slot.dropped) == (5, 2)
    assert dict(core.diagnostics().values)['frames_dropped'] == '2'


@pytest.mark.parametrize('stage', ['prepare', 'infer', 'publish'])
def test_overlap_stages_drop_a_frame_failing_in_any_stage(
        core: NodeCore, transport: FakeTransport, loader: FakeLoader, artifact: Path,
        stage: str) -> None:
    core.configure(_params(artifact, overlap_stages=True, crop=[0, 2, 0, 0]))
    core.activate()
    bad = _image(1, 1, height=2) if stage == 'prepare' else _image(1, 1)  # 2 rows: crop 2
    loader.segmenter.fail_next = stage == 'infer'
    transport.fail_next = stage == 'publish'
    core.on_message(bad)
    _wait(lambda: core.stats.counts['failed'] == 1)
    assert any('the node goes on with the next frame' in w for w in transport.warnings())
    core.on_message(_image(1, 42))
    _wait(lambda: core.stats.counts['processed'] == 1)
    assert _scores(transport)[-1] == 42.0 and core.worker.alive


def test_overlap_stages_deactivate_while_every_stage_is_busy(
        core: NodeCore, transport: FakeTransport, loader: FakeLoader, artifact: Path) -> None:
    core.configure(_params(artifact, overlap_stages=True))
    core.activate()
    worker, segmenter = core.worker, loader.segmenter
    segmenter.gate = threading.Event()
    segmenter.entered.clear()
    core.on_message(_image(0, 10))
    assert segmenter.entered.wait(5)
    core.on_message(_image(0, 11))
    assert core.slot.wait_empty(timeout=5)
    core.on_message(_image(0, 12))
    stopper = threading.Thread(target=core.deactivate)
    stopper.start()
    _wait(lambda: not worker.alive)  # the idle threads are gone, inference still runs
    segmenter.gate.set()
    stopper.join(5)
    assert not stopper.is_alive() and core.state == 'inactive'
    assert not any(thread.is_alive() for thread in worker.threads)
    assert core.stats.counts['failed'] == 0 and not transport.warnings()
    # 10 finished inference after the stop and, like 11 and 12 between stages, was discarded
    assert _scores(transport) == []


def test_frames_are_ignored_unless_active(core: NodeCore, artifact: Path) -> None:
    core.on_message(_image(1, 1))
    core.configure(_params(artifact))
    core.on_message(_image(1, 1))
    assert core.slot.received == 0


def test_network_resolution_publishes_scaled_camera_info(
        core: NodeCore, transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    core.configure(_params(artifact, output_resolution='network', crop=[0, 2, 0, 0]))
    msg = _image(4, 150, height=10, width=12)
    core.process(_frame(msg, clock))
    assert CAMERA_INFO_OUTPUT not in transport.topics()
    assert 'no CameraInfo' in transport.warnings()[0]
    k = [20.0, 0, 6.0, 0, 40.0, 5.0, 0, 0, 1]
    p = [20.0, 0, 6.0, 0.0, 0, 40.0, 5.0, 0, 0, 0, 1, 0]
    core.on_camera_info(SimpleNamespace(height=10, width=12, k=k, p=p))
    core.process(_frame(msg, clock))
    assert (transport.last('semantic_mask').height, transport.last('semantic_mask').width) == (
        NET_H, NET_W)
    info = transport.last(CAMERA_INFO_OUTPUT)
    assert isinstance(info, CameraInfoOut) and info.header is msg.header
    assert (info.height, info.width) == (NET_H, NET_W)
    # 8 x 12 after the crop -> 4 x 6: both axes halve.
    np.testing.assert_allclose(info.k, [10, 0, 3, 0, 20, 2.5, 0, 0, 1])
    np.testing.assert_allclose(info.p[[0, 2, 5, 6]], [10, 3, 20, 2.5])
    transport.subscribers[CAMERA_INFO_OUTPUT] = 0
    count = transport.topics().count(CAMERA_INFO_OUTPUT)
    core.process(_frame(msg, clock))
    assert transport.topics().count(CAMERA_INFO_OUTPUT) == count


def test_camera_info_is_not_published_at_input_resolution(
        core: NodeCore, transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    core.configure(_params(artifact))
    core.on_camera_info(SimpleNamespace(height=8, width=12, k=[1.0] * 9, p=[1.0] * 12))
    core.process(_frame(_image(1, 1), clock))
    assert CAMERA_INFO_OUTPUT not in transport.topics()


def test_square_frames_are_letterboxed_warned_once_and_camera_info_follows(
        core: NodeCore, transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    assert SPECS['resize_mode'].default == 'letterbox'
    assert SPECS['resize_mode'].constraints == ('one of: letterbox, crop_center, stretch; read '
                                                'at configure; change it while unconfigured')
    core.configure(_params(artifact, output_resolution='network'))
    assert core.pipeline.resize_mode == 'letterbox'
    assert transport.warnings() == []  # the warm-up frame has the artifact's size
    k = [30.0, 0, 6.0, 0, 30.0, 6.0, 0, 0, 1]
    core.on_camera_info(SimpleNamespace(height=12, width=12, k=k, p=k[:3] + [0.0] + k[3:6]
                                        + [0.0] + k[6:] + [0.0]))
    msg = _image(4, 150, height=12, width=12)
    for _ in range(3):
        core.process(_frame(msg, clock))
    # 12 x 12 into 4 x 6: x1/3 to 4 x 4, one column of bar on each side.
    labels = decode_image(transport.last('semantic_mask'), 'native')
    assert labels.shape == (NET_H, NET_W)
    assert (labels[:, [0, 5]] == 255).all() and (labels[:, 1:5] == 1).all()
    scores = decode_image(transport.last('anomaly_score'), 'native')
    assert np.isnan(scores[:, [0, 5]]).all() and (scores[:, 1:5] == 150.0).all()
    info = transport.last(CAMERA_INFO_OUTPUT)
    np.testing.assert_allclose(info.k, [10, 0, 3, 0, 10, 2, 0, 0, 1])
    np.testing.assert_allclose(info.p[[0, 2, 5, 6]], [10, 3, 10, 2])
    warnings = transport.warnings()
    assert len(warnings) == 1  # once, not per frame
    for words in ('12x12', '4x6', '1.000', '1.500', 'letterboxed', 'resize_mode'):
        assert words in warnings[0], words


def test_resize_mode_crop_center_at_input_resolution(
        core: NodeCore, transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    core.configure(_params(artifact, resize_mode='crop_center'))
    assert core.update_parameters({'resize_mode': 'stretch'}).startswith(
        'resize_mode is read at configure')
    core.process(_frame(_image(4, 150, height=12, width=12), clock))
    # 12 x 12 -> its centre 8 x 12 (rows 2..9) -> 4 x 6: rows 0, 1, 10, 11 are never seen.
    labels = decode_image(transport.last('semantic_mask'), 'native')
    assert labels.shape == (12, 12)
    assert (labels[[0, 1, 10, 11]] == 255).all() and (labels[2:10] == 1).all()
    assert 'cut to their centre 8x12' in transport.warnings()[0]


def test_label_info(core: NodeCore, artifact: Path) -> None:
    assert core.label_info() is None
    core.configure(_params(artifact, anomaly_threshold=42))
    info = core.label_info()
    assert info.class_map == ((0, 'road'), (1, 'car'), (2, 'sky'), (255, 'void'))
    assert info.threshold == 42.0


# Diagnostics ------------------------------------------------------------------------------

def test_diagnostics_when_running(core: NodeCore, transport: FakeTransport, artifact: Path,
                                  clock: FakeClock) -> None:
    assert core.diagnostics().level == OK and core.diagnostics().message == 'unconfigured'
    core.configure(_params(artifact))
    core.activate()
    core.slot.put = lambda item: None  # frames go straight to process() below
    for _ in range(10):
        core.on_message(_image(1, 1))
        core.process(_frame(_image(1, 1), clock))
        clock.ns += 100_000_000  # 10 Hz
    report = core.diagnostics()
    values = dict(report.values)
    assert report.level == OK and report.message.startswith('active: 10.0 Hz out of 10.0 Hz in')
    assert report.name == '/anomaly_seg: anomaly segmentation'
    assert values['backend'] == 'onnxruntime' and values['precision'] == 'fp32'
    assert values['artifact_sha256'] == hashlib.sha256(b'onnx stand-in').hexdigest()
    assert values['frames_processed'] == '10' and values['anomaly_threshold'] == '100'
    assert float(values['latency_ms_mean']) == pytest.approx(1000 * 1000 - 999 * 1000)


def test_diagnostics_error_on_cpu_fallback(transport: FakeTransport, artifact: Path,
                                           clock: FakeClock) -> None:
    core = NodeCore(transport, loader=FakeLoader(run_device='cpu'), monotonic_ns=clock)
    core.configure(_params(artifact, device='cuda', backend='auto'))
    assert any(level == 'error' and 'runs on the CPU' in message
               for level, message in transport.logs)
    report = core.diagnostics()
    assert report.level == ERROR and 'although device cuda was asked' in report.message
    core.shutdown()


def test_diagnostics_watchdog_warns_when_input_stops(core: NodeCore, artifact: Path,
                                                     clock: FakeClock) -> None:
    core.configure(_params(artifact, input_timeout=2.0))
    core.activate()
    clock.ns += 1_500_000_000
    assert core.diagnostics().level == OK
    clock.ns += 1_000_000_000  # 2.5 s since activation, nothing arrived
    report = core.diagnostics()
    assert report.level == WARN and 'no input on /image for 2.5 s' in report.message
    core.on_message(_image(1, 1))
    assert core.diagnostics().level == OK
    clock.ns += 3_000_000_000
    assert core.diagnostics().level == WARN
    core.deactivate()
    assert core.diagnostics().level == OK  # inactive: no input expected


def _feed(core: NodeCore, clock: FakeClock, make: Any, seconds: float, hz: float = 10.0,
          camera_info: bool = False) -> None:
    """``seconds`` of a camera at ``hz``: frame k is ``make(k)`` (None: lost before the node)
    through the subscription callback and straight into process(), on the fake clocks."""
    core.slot.put = lambda item: None  # the frames go to process() here, not to the worker
    period = int(1e9 / hz)
    for k in range(round(seconds * hz)):
        msg = make(k)
        if camera_info:  # small messages: every one arrives
            sec, nanosec = divmod(_START + k * period, 10**9)
            header = SimpleNamespace(stamp=SimpleNamespace(sec=sec, nanosec=nanosec))
            core.on_camera_info(SimpleNamespace(header=header, height=8, width=12))
        if msg is not None:
            core.on_message(msg)
            core.process(_frame(msg, clock))
        clock.ns += period


_START = 999 * 10**9  # the camera's first stamp


def _yuv(k: int) -> ImageFields:
    msg = _image(1, 1)
    msg.encoding = 'yuv422'
    return msg


def test_diagnostics_warn_then_error_when_every_frame_is_rejected(
        core: NodeCore, transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    """A yuv422 camera: frames arrive, none can be decoded; this used to be OK, "0.0 Hz out of
    9.6 Hz in"."""
    core.configure(_params(artifact))  # output_timeout: 10 s by default
    core.activate()
    _feed(core, clock, _yuv, seconds=4.0)
    assert core.diagnostics().level == OK  # not yet a whole window
    _feed(core, clock, _yuv, seconds=2.0)
    report = core.diagnostics()
    assert report.level == WARN
    assert report.message.startswith(
        'nothing published for 6.0 s while frames arrive on /image (10.0 Hz): 50 frames could '
        "not be decoded (unsupported: Image.encoding 'yuv422' is a raw Bayer/YUV format;")
    _feed(core, clock, _yuv, seconds=5.0)
    report = core.diagnostics()
    assert report.level == ERROR and report.message.startswith('nothing published for 11.0 s')
    assert dict(report.values)['frames_rejected_decode'] == '110'
    _feed(core, clock, lambda k: _image(1, 1, stamp=transport.clock_ns), seconds=0.5)
    report = core.diagnostics()
    assert report.level == OK and report.message.startswith('active: ')


def test_diagnostics_name_stale_frames_and_use_sim_time(
        core: NodeCore, transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    """A bag played without use_sim_time: every frame is older than max_input_age."""
    core.configure(_params(artifact, max_input_age=0.5, output_timeout=0.0))
    core.activate()
    recorded = transport.clock_ns - 12_300_000_000
    _feed(core, clock, lambda k: _image(1, 1, stamp=recorded), seconds=30.0)
    report = core.diagnostics()
    assert report.level == WARN  # output_timeout 0: never ERROR
    assert ('50 frames were older than max_input_age 0.5 s (the last 12.3 s old): '
            'use_sim_time? A bag played with --clock needs use_sim_time:=true') in report.message
    assert 'could not be decoded' not in report.message


def test_diagnostics_figures_age_out(core: NodeCore, transport: FakeTransport, artifact: Path,
                                     clock: FakeClock) -> None:
    core.configure(_params(artifact))
    core.activate()
    _feed(core, clock, lambda k: _image(1, 1, stamp=transport.clock_ns - 20_000_000),
          seconds=1.0)
    values = dict(core.diagnostics().values)
    assert values['latency_ms_mean'] == '20.000' and values['output_rate_hz'] == '10.000'
    clock.ns += 6 * 10**9  # the camera stops
    report = core.diagnostics()
    values = dict(report.values)
    assert 'latency_ms_mean' not in values and 'processing_ms_mean' not in values
    assert values['output_rate_hz'] == values['input_rate_hz'] == '0.000'
    assert values['frames_processed'] == '10'  # totals since activation stay
    assert report.level == WARN and report.message.startswith('no input on /image for 6.1 s')


def test_diagnostics_tell_cameras_apart(transport: FakeTransport, artifact: Path,
                                        clock: FakeClock) -> None:
    """Two namespaced nodes: names and topics as resolved by the node (remaps included)."""
    remaps = {'image': '/front/camera/image_raw', 'camera_info': '/front/camera/camera_info'}
    front = NodeCore(transport, name='/front/anomaly_seg', loader=FakeLoader(),
                     monotonic_ns=clock, resolve_topic=lambda topic: remaps[topic])
    rear = NodeCore(FakeTransport(), name='/rear/anomaly_seg', loader=FakeLoader(),
                    monotonic_ns=clock)
    try:
        for core in (front, rear):
            core.configure(_params(artifact))
        reports = [core.diagnostics() for core in (front, rear)]
    finally:
        front.shutdown()
        rear.shutdown()
    assert [r.name for r in reports] == ['/front/anomaly_seg: anomaly segmentation',
                                         '/rear/anomaly_seg: anomaly segmentation']
    assert [r.hardware_id for r in reports] == ['/front/camera/image_raw', '/rear/image']
    assert [dict(r.values)['camera_info_topic'] for r in reports] == [
        '/front/camera/camera_info', '/rear/camera_info']
    assert expand_topic('/anomaly_seg', 'image') == '/image'
    assert expand_topic('/a/b/anomaly_seg', 'image/compressed') == '/a/b/image/compressed'
    assert expand_topic('/a/anomaly_seg', '/camera/image_raw') == '/camera/image_raw'


def test_device_auto_is_the_default_and_only_warns_on_the_cpu(
        transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    """The shipped defaults on a machine without a GPU used to be a permanent ERROR."""
    why = ('device cuda asked but torch is not installed and onnxruntime has no GPU provider: '
           'fell back to onnxruntime on the CPU')
    loader = FakeLoader(run_device='cpu', reason=why)  # what backends.load('auto') does
    core = NodeCore(transport, loader=loader, monotonic_ns=clock)
    try:
        core.configure({'artifact': str(artifact)})  # every other parameter at its default
        assert loader.calls[0][1:4] == ('auto', 'cuda', 'fp16')
        report = core.diagnostics()
        assert report.level == WARN
        assert report.message == f'no GPU: running on the CPU ({why}); expect a low frame rate'
        assert dict(report.values)['device_asked'] == 'auto'
        assert not [m for level, m in transport.logs if level == 'error']
        assert any('no GPU: inference runs on the CPU' in m for m in transport.warnings())
    finally:
        core.shutdown()


def test_device_auto_with_a_named_backend_falls_back_to_the_cpu(
        transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    no_gpu = "device cuda asked, but this onnxruntime offers only ['CPUExecutionProvider']"
    loader = FakeLoader(no_gpu=no_gpu)
    core = NodeCore(transport, loader=loader, monotonic_ns=clock)
    try:
        core.configure(_params(artifact, device='auto', precision='fp16'))
        assert [call[2:4] for call in loader.calls] == [('cuda', 'fp16'), ('cpu', 'fp32')]
        report = core.diagnostics()
        assert report.level == WARN and report.message.startswith(
            f'no GPU: running on the CPU (device auto, onnxruntime has no GPU here: {no_gpu})')
    finally:
        core.shutdown()
    tensorrt = NodeCore(transport, loader=FakeLoader(no_gpu='torch sees no CUDA device'),
                        monotonic_ns=clock)
    with pytest.raises(BackendError, match='torch sees no CUDA device'):
        tensorrt.configure(_params(artifact, device='auto', backend='tensorrt'))
    assert tensorrt.diagnostics().level == ERROR


def test_diagnostics_show_every_condition_worst_first(
        transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    """A CPU fallback of an explicit cuda used to hide that no input arrives."""
    core = NodeCore(transport, loader=FakeLoader(run_device='cpu'), monotonic_ns=clock)
    try:
        core.configure(_params(artifact, device='cuda', backend='auto'))
        core.activate()
        clock.ns += 2_500_000_000
        report = core.diagnostics()
    finally:
        core.shutdown()
    assert report.level == ERROR
    assert report.message == (
        'running on the CPU although device cuda was asked for: requested; fix the CUDA '
        'install or set device auto; no input on /image for 2.5 s; check the remap and QoS '
        '(input_reliability)')


def test_lost_frames_are_estimated_from_stamp_gaps() -> None:
    ms = 1_000_000
    # 100 ms camera: gaps of 1, 2, 1 and 4 periods hide 0 + 1 + 0 + 3 frames.
    assert estimate_loss([0, 100 * ms, 300 * ms, 400 * ms, 800 * ms], 100 * ms) == 4
    # Backwards (a looping bag) and longer than 10 periods (a restart): discontinuities.
    assert estimate_loss([0, 200 * ms, 100 * ms, 3000 * ms, 3200 * ms], 100 * ms) == 2
    assert estimate_loss([0, 110 * ms, 190 * ms, 310 * ms], 100 * ms) == 0  # jitter
    assert nominal_period_ns(12.5, [], []) == (80 * ms, 'camera_rate')
    info = [k * 100 * ms for k in (0, 1, 2, 4, 5, 6)]  # camera_info: one lost, median 100 ms
    assert nominal_period_ns(0.0, info, []) == (100 * ms, 'camera_info')
    images = [k * 100 * ms for k in (0, 1, 3, 4, 7, 9, 10, 13, 14, 17, 20)]
    assert nominal_period_ns(0.0, info[:3], images) == (100 * ms, 'image stamps')
    assert nominal_period_ns(0.0, [], images[:3]) is None


def test_diagnostics_warn_when_frames_are_lost_before_the_node(
        core: NodeCore, transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    """720p best effort: a 10 Hz camera of which a third arrives (every third frame)."""
    core.configure(_params(artifact))
    core.activate()

    def third(k: int) -> ImageFields | None:
        return _image(1, 1, stamp=_START + k * 100_000_000) if k % 3 == 0 else None

    _feed(core, clock, third, seconds=6.0, camera_info=True)
    report = core.diagnostics()
    values = dict(report.values)
    # The window (5 s) holds frames 12, 15, ..., 57: 16 arrived, 15 gaps of 3 periods.
    assert (values['frames_lost_estimate'], values['frame_loss_ratio']) == ('30', '0.652')
    assert (values['camera_rate_hz'], values['camera_rate_source']) == ('10.00', 'camera_info')
    assert report.level == WARN and report.message == (
        'about 30 of 46 frames (65 %) never reached the node (header stamp gaps against 10.0 Hz '
        'from camera_info); for large images raise the DDS receive buffer (README, QoS and '
        'threading) or set input_reliability reliable')


def test_lost_frames_against_camera_rate_and_none_lost(
        transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    core = NodeCore(transport, loader=FakeLoader(), monotonic_ns=clock)
    try:
        core.configure(_params(artifact, camera_rate=10.0, input_reliability='reliable'))
        core.activate()
        _feed(core, clock, lambda k: _image(1, 1, stamp=_START + k * 100_000_000)
              if k % 2 else None, seconds=6.0)
        report = core.diagnostics()
        assert dict(report.values)['camera_rate_source'] == 'camera_rate'
        assert report.message.endswith('raise the DDS receive buffer (README, QoS and threading)')
        _feed(core, clock, lambda k: _image(1, 1, stamp=_START + k * 100_000_000), seconds=6.0)
        report = core.diagnostics()
        assert dict(report.values)['frames_lost_estimate'] == '0' and report.level == OK
    finally:
        core.shutdown()
    assert SPECS['input_reliability'].choices == ('best_effort', 'reliable')
    assert SPECS['input_reliability'].default == 'best_effort'


def test_onnxruntime_end_to_end(tmp_path: Path) -> None:
    """A real ONNX graph (labels = argmax over RGB, score = mean of RGB) through the core."""
    pytest.importorskip('onnx')
    pytest.importorskip('onnxruntime')
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info('image', TensorProto.FLOAT, [1, 3, NET_H, NET_W])
    labels = helper.make_tensor_value_info('labels', TensorProto.INT32, [1, NET_H, NET_W])
    score = helper.make_tensor_value_info('anomaly_score', TensorProto.FLOAT, [1, NET_H, NET_W])
    nodes = [helper.make_node('ArgMax', ['image'], ['argmax'], axis=1, keepdims=0),
             helper.make_node('Cast', ['argmax'], ['labels'], to=TensorProto.INT32),
             helper.make_node('ReduceMean', ['image'], ['anomaly_score'], axes=[1],
                              keepdims=0)]
    graph = helper.make_graph(nodes, 'stand_in', [image], [labels, score])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])
    model.ir_version = 8
    onnx_bytes, pt2_bytes = model.SerializeToString(), b'unused by onnxruntime'
    (tmp_path / 'm.onnx').write_bytes(onnx_bytes)
    (tmp_path / 'm.pt2').write_bytes(pt2_bytes)
    sidecar = Sidecar(
        method='stand-in', score=ScoreSpec(name='mean', units='0..255'),
        input=InputSpec(height=NET_H, width=NET_W), classes=('r', 'g', 'b'),
        palette=((255, 0, 0), (0, 255, 0), (0, 0, 255)),
        files={'onnx': FileRef('m.onnx', _sha(onnx_bytes)), 'pt2': FileRef('m.pt2',
                                                                           _sha(pt2_bytes))},
        thresholds={'tpr95': 50.0}, default_threshold='tpr95')
    path = write_sidecar(sidecar, tmp_path / 'm.json')
    transport = FakeTransport()
    core = NodeCore(transport)
    try:
        core.configure({'artifact': str(path), 'backend': 'onnxruntime', 'device': 'cpu',
                        'precision': 'fp32', 'max_input_age': 0.0})
        rgb = np.zeros((8, 12, 3), np.uint8)
        rgb[:] = (30, 180, 90)  # argmax: g (1); mean: 100
        core.process(Frame(encode_image(rgb, 'rgb8', None), False, 0))
        assert np.all(decode_image(transport.last('semantic_mask'), 'native') == 1)
        np.testing.assert_allclose(decode_image(transport.last('anomaly_score'), 'native'), 100)
        assert np.all(decode_image(transport.last('anomaly_mask'), 'native') == 255)
        assert dict(core.diagnostics().values)['artifact_sha256'] == _sha(onnx_bytes)
    finally:
        core.shutdown()


def test_node_logic_imports_neither_rclpy_nor_torch() -> None:
    code = ('import sys, anomaly_seg_node.node_logic; '
            'print(sorted(m for m in ("rclpy", "torch", "onnxruntime") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == '[]'


# Pixel budget ------------------------------------------------------------------------------

def _png(rgb: np.ndarray, header: Any) -> SimpleNamespace:
    ok, png = cv2.imencode('.png', np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    return SimpleNamespace(header=header, format='png', data=png.reshape(-1))


def test_max_input_pixels_drops_larger_raw_and_compressed_frames(
        core: NodeCore, transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    assert SPECS['max_input_pixels'].default == MAX_PIXELS == 9_123_840
    assert validate_params({'max_input_pixels': MAX_SIDE ** 2}).max_input_pixels == 2 ** 28
    raw = _image(4, 150)  # 8 x 12 = 96 pixels
    compressed = _png(decode_image(raw), raw.header)
    core.configure(_params(artifact, max_input_pixels=95))
    core.process(_frame(raw, clock))
    assert core.stats.counts['rejected_decode'] == 1 and not transport.published
    assert transport.warnings()[0].endswith(
        'Image is 8 x 12, 96 pixels, above the budget of 95 pixels (max_input_pixels); raise '
        'max_input_pixels for this camera, or check the publisher')
    core.process(_frame(compressed, clock, compressed=True))
    assert core.stats.counts['rejected_decode'] == 2 and not transport.published
    reason = core.stats.snapshot(clock()).last_reasons['rejected_decode']
    assert 'declares a 8 x 12 image, 96 pixels, above the budget of 95 pixels' in reason
    assert 'read at configure' in core.update_parameters({'max_input_pixels': 96})
    core.cleanup()
    assert core.update_parameters({'max_input_pixels': 96}) is None
    core.configure(_params(artifact, max_input_pixels=96))  # exactly the budget: taken
    core.process(_frame(raw, clock))
    core.process(_frame(compressed, clock, compressed=True))
    assert core.stats.counts['processed'] == 2


# Anomaly objects ---------------------------------------------------------------------------

def _object_frame(road_rows: slice = slice(0, 8)) -> ImageFields:
    """8 x 12: score 200 in rows 2..5, columns 4..7 (2 x 2 network pixels), 0 elsewhere;
    labels road (red 0) in ``road_rows``, car (red 1) elsewhere."""
    rgb = np.zeros((8, 12, 3), np.uint8)
    rgb[..., 0] = 1
    rgb[road_rows, :, 0] = 0
    rgb[2:6, 4:8, 1] = 200
    header = SimpleNamespace(stamp=SimpleNamespace(sec=999, nanosec=0), frame_id='cam')
    return encode_image(rgb, 'rgb8', header)


def test_object_defaults_are_the_replays() -> None:
    from anomaly_seg_node.replay_command import OBJECT_DEFAULTS

    assert [SPECS[f'objects_{name}'].default for name in ('margin_px', 'merge_px',
                                                           'min_area_px', 'max')] == [
        OBJECT_DEFAULTS[name] for name in ('margin', 'merge', 'min_area', 'max')]
    assert SPECS['objects_drivable_classes'].default == ['auto']


@pytest.mark.parametrize('resolution, found_box', [('input', (4, 2, 4, 4)),
                                                   ('network', (2, 1, 2, 2))])
def test_objects_are_found_and_their_boxes_are_in_input_pixels(
        core: NodeCore, transport: FakeTransport, artifact: Path, clock: FakeClock,
        resolution: str, found_box: tuple[int, int, int, int]) -> None:
    core.configure(_params(artifact, output_resolution=resolution, objects_min_area_px=1))
    transport.subscribers = {OBJECTS_TOPIC: 1}
    msg = _object_frame()
    core.process(_frame(msg, clock))
    assert transport.topics() == [OBJECTS_TOPIC]  # no image output is published for nobody
    out = transport.last(OBJECTS_TOPIC)
    assert isinstance(out, ObjectsOut) and out.header is msg.header
    (obj,) = out.objects
    # 2 x 2 network pixels of score 200; at input resolution the bilinear upsampling puts rows
    # 2..5 and columns 4..7 above the threshold 100 (the edge rows interpolate to 150 > 100).
    assert obj.box == found_box and obj.max_score == 200.0
    assert out.boxes == ((4, 2, 4, 4),)  # input pixels either way
    assert obj.confidence == pytest.approx(1.0)  # logistic: 100 score units above
    values = dict(core.diagnostics().values)
    assert values['objects_per_frame_mean'] == '1.000' and values['objects_confidence'] == (
        'logistic')
    clock.ns += 6 * 10**9  # the window ages out
    assert 'objects_per_frame_mean' not in dict(core.diagnostics().values)


def test_objects_are_computed_for_their_subscribers_and_the_overlay_only(
        core: NodeCore, transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    assert wants_objects(True, set()) and wants_objects(False, {'overlay'})
    assert not wants_objects(False, {'semantic_mask', 'anomaly_mask'})
    core.configure(_params(artifact, objects_min_area_px=1))
    transport.subscribers = {'semantic_mask': 1}
    core.process(_frame(_object_frame(), clock))
    assert transport.topics() == ['semantic_mask']
    assert 'objects_per_frame_mean' not in dict(core.diagnostics().values)  # not computed
    transport.subscribers = {'overlay': 1}  # the overlay draws the boxes
    core.process(_frame(_object_frame(), clock))
    assert transport.topics() == ['semantic_mask', 'overlay']
    overlay = decode_image(transport.last('overlay'), 'native')
    assert tuple(overlay[2, 4]) == DEFAULT_BOX_COLOR  # the box's top-left corner
    assert tuple(overlay[0, 0]) != DEFAULT_BOX_COLOR
    assert dict(core.diagnostics().values)['objects_per_frame_mean'] == '1.000'
    transport.subscribers = {}
    core.process(_frame(_object_frame(), clock))
    assert core.stats.counts['skipped_unsubscribed'] == 1


def test_objects_drivable_restriction_and_run_time_changes(
        core: NodeCore, transport: FakeTransport, artifact: Path, clock: FakeClock) -> None:
    core.configure(_params(artifact, objects_min_area_px=1))  # drivable: [auto] = road
    transport.subscribers = {OBJECTS_TOPIC: 1}
    assert core.object_params.drivable_ids == (0,)
    assert any('anomaly objects: on road (margin 16 px)' in m for _, m in transport.logs)

    def boxes() -> tuple:
        core.process(_frame(_object_frame(road_rows=slice(6, 8)), clock))
        return transport.last(OBJECTS_TOPIC).boxes

    # The object's pixels are car, the road begins at row 6: within the 16 px margin.
    assert boxes() == ((4, 2, 4, 4),)
    assert core.update_parameters({'objects_margin_px': 0}) is None
    assert boxes() == ()
    assert core.update_parameters({'objects_margin_px': 1}) is None
    assert boxes() == ((4, 5, 4, 1),)  # the one row next to the road
    assert core.update_parameters({'objects_drivable_classes': ['none']}) is None
    assert boxes() == ((4, 2, 4, 4),)
    reason = core.update_parameters({'objects_drivable_classes': ['bike'],
                                     'overlay_alpha': 0.1})
    assert reason == ("parameter objects_drivable_classes names ['bike'], which are not classes "
                      'of the artifact; choose among road, car, sky, or [auto] or [none]')
    assert core.config.overlay_alpha == 0.5  # nothing of a refused batch is applied
    assert core.update_parameters({'objects_min_area_px': 17}) is None
    assert boxes() == ()  # 16 pixels
    assert core.update_parameters({'objects_min_area_px': 16}) is None
    assert boxes() == ((4, 2, 4, 4),)
    assert core.update_parameters({'anomaly_threshold': 'fpr1'}) is None  # 200: score > 200?
    assert core.object_params.threshold == 200.0
    assert boxes() == ()


def test_unknown_drivable_classes_fail_configure(core: NodeCore, loader: FakeLoader,
                                                 artifact: Path) -> None:
    with pytest.raises(ConfigError, match='choose among road, car, sky'):
        core.configure(_params(artifact, objects_drivable_classes=['Road']))
    assert core.state == 'unconfigured' and not loader.calls


def test_object_confidence_from_the_sidecar_fpr_thresholds(
        tmp_path: Path, transport: FakeTransport, clock: FakeClock) -> None:
    path = _write_artifact(tmp_path, {'tpr95': 100.0, 'fpr1': 150.0, 'fpr0.1': 250.0})
    core = NodeCore(transport, loader=FakeLoader(), monotonic_ns=clock)
    try:
        core.configure(_params(path, objects_min_area_px=1))
        assert core.fpr_table == {150.0: 0.01, 250.0: 0.001}
        assert any(m.endswith('confidence 1 - false-alarm rate of the max score (sidecar '
                              'fpr0.1, fpr1)') for _, m in transport.logs)
        transport.subscribers = {OBJECTS_TOPIC: 1}
        core.process(_frame(_object_frame(), clock))
        (obj,) = transport.last(OBJECTS_TOPIC).objects
        # max score 200, halfway (in score) from fpr 1 % to 0.1 %: 10 ** -2.5 in log space
        assert obj.confidence == pytest.approx(1 - 10 ** -2.5)
        assert dict(core.diagnostics().values)['objects_confidence'] == 'fpr table'
    finally:
        core.shutdown()


def test_network_box_to_input() -> None:
    letterbox = plan_fit((12, 12), (NET_H, NET_W), 'letterbox')  # picture in columns 1..4
    assert letterbox.net_box == (0, 1, 4, 4)
    assert network_box_to_input((1, 0, 4, 4), letterbox) == (0, 0, 12, 12)
    assert network_box_to_input((2, 1, 1, 2), letterbox) == (3, 3, 3, 6)
    assert network_box_to_input((2, 1, 1, 2), letterbox, (1, 2)) == (5, 4, 3, 6)  # the crop
    assert network_box_to_input((0, 0, 6, 4), letterbox) == (0, 0, 12, 12)  # bars clipped
    centre = plan_fit((12, 12), (NET_H, NET_W), 'crop_center')  # rows 2..9 seen
    assert network_box_to_input((0, 0, 6, 4), centre) == (0, 2, 12, 8)
    stretch = plan_fit((12, 18), (NET_H, NET_W), 'stretch')  # x 1/3 exactly: no extra pixel
    assert network_box_to_input((1, 1, 1, 1), stretch) == (3, 3, 3, 3)


def _object(x: int, y: int, width: int, height: int, confidence: float) -> AnomalyObject:
    return AnomalyObject(x=x, y=y, width=width, height=height, area=width * height,
                         mean_score=3.0, max_score=4.0, confidence=confidence,
                         centroid_x=x + width / 2, centroid_y=y + height / 2)


def _detection_types() -> tuple[Any, dict[str, Any]]:
    """A rosbags typestore with vision_msgs 4 and its classes: every field as rosidl has it."""
    from rosbags.typesys import Stores, get_typestore

    from anomaly_seg_node.replay_outputs import register_vision_msgs

    store = get_typestore(Stores.ROS2_HUMBLE)
    register_vision_msgs(store)
    return store, store.types


def test_detection_array_message_fields() -> None:
    store, types = _detection_types()
    header = types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=5, nanosec=7), frame_id='cam')
    # Found on network maps (boxes there), published with their boxes in input pixels.
    payload = ObjectsOut(header=header, objects=(_object(2, 1, 2, 2, 0.75),
                                                 _object(0, 0, 1, 1, 0.5)),
                         boxes=((4, 2, 4, 4), (0, 0, 3, 1)))
    msg = detection_array_message(payload, types)
    assert msg.__msgtype__ == 'vision_msgs/msg/Detection2DArray' and msg.header is header
    first, second = msg.detections
    assert first.header is header and (first.id, second.id) == ('0', '1')
    ((hypothesis,),) = [first.results]
    assert (hypothesis.hypothesis.class_id, hypothesis.hypothesis.score) == ('anomaly', 0.75)
    assert hypothesis.pose.pose.orientation.w == 1.0 and not hypothesis.pose.covariance.any()
    box = first.bbox
    assert (box.center.position.x, box.center.position.y, box.center.theta) == (6.0, 4.0, 0.0)
    assert (box.size_x, box.size_y) == (4.0, 4.0)
    assert (second.bbox.center.position.x, second.bbox.center.position.y) == (1.5, 0.5)
    assert second.results[0].hypothesis.score == 0.5
    # rosidl's float64 setters refuse ints
    assert all(type(v) is float for v in (box.center.position.x, box.size_x,
                                           hypothesis.hypothesis.score))
    back = store.deserialize_cdr(store.serialize_cdr(msg, msg.__msgtype__), msg.__msgtype__)
    assert back.detections[1].bbox.size_x == 3.0
    empty = detection_array_message(ObjectsOut(header, (), ()), types)
    assert empty.detections == [] and empty.header is header


def test_node_and_replay_write_the_same_detection_array() -> None:
    """One builder (objects.detection_array): the node's message of boxes in input pixels and
    the replay's of boxes on half-size maps scaled by 2 serialise to the same bytes."""
    from anomaly_seg_node.objects import detection_array

    store, types = _detection_types()
    header = types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=1, nanosec=2), frame_id='cam')
    on_maps = (_object(2, 1, 3, 2, 0.75), _object(0, 5, 1, 1, 0.5))
    node = detection_array_message(
        ObjectsOut(header, on_maps, tuple((2 * o.x, 2 * o.y, 2 * o.width, 2 * o.height)
                                          for o in on_maps)), types)
    replay = detection_array(types, header, [o.box for o in on_maps],
                             [o.confidence for o in on_maps], scale_xy=(2.0, 2.0))
    kind = 'vision_msgs/msg/Detection2DArray'
    assert store.serialize_cdr(node, kind) == store.serialize_cdr(replay, kind)
