"""The onnxruntime backend without torch: what it refuses at load and how it says so.

The graphs are hand-built stand-ins (labels = argmax over RGB, score = mean of RGB), so these
tests also run in the torch-free NumPy 1 environment.
"""

import dataclasses
import hashlib
import importlib.util
from pathlib import Path
import sys

import numpy as np
import pytest

from anomaly_seg_node import backends
from anomaly_seg_node.artifact import (
    FileRef,
    InputSpec,
    ScoreSpec,
    Sidecar,
    read_sidecar,
    write_sidecar,
)
from anomaly_seg_node.errors import ArtifactError, BackendError, ConfigError

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')
from onnx import TensorProto, helper  # noqa: E402

H, W = 6, 10


def stand_in_graph(height: int = H, width: int = W, labels_type: int = TensorProto.INT32,
                   score_name: str = 'anomaly_score') -> bytes:
    image = helper.make_tensor_value_info('image', TensorProto.FLOAT, [1, 3, height, width])
    labels = helper.make_tensor_value_info('labels', labels_type, [1, height, width])
    score = helper.make_tensor_value_info(score_name, TensorProto.FLOAT, [1, height, width])
    nodes = [helper.make_node('ArgMax', ['image'], ['argmax'], axis=1, keepdims=0),
             helper.make_node('Cast', ['argmax'], ['labels'], to=labels_type),
             helper.make_node('ReduceMean', ['image'], [score_name], axes=[1], keepdims=0)]
    graph = helper.make_graph(nodes, 'stand_in', [image], [labels, score])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])
    model.ir_version = 8
    return model.SerializeToString()


def artifact(folder: Path, onnx_bytes: bytes) -> Path:
    """m.onnx with `onnx_bytes` and m.json for a [1, 3, H, W] graph, its hash matching."""
    (folder / 'm.onnx').write_bytes(onnx_bytes)
    sidecar = Sidecar(
        method='stand-in', score=ScoreSpec(name='mean', units='0..255'),
        input=InputSpec(height=H, width=W), classes=('r', 'g', 'b'),
        palette=((255, 0, 0), (0, 255, 0), (0, 0, 255)),
        files={'onnx': FileRef('m.onnx', hashlib.sha256(onnx_bytes).hexdigest())},
        thresholds={'tpr95': 50.0}, default_threshold='tpr95')
    return write_sidecar(sidecar, folder / 'm.json')


def test_matching_graph_loads_and_runs(tmp_path: Path) -> None:
    segmenter = backends.load(artifact(tmp_path, stand_in_graph()), backend='onnxruntime')
    frame = np.zeros((H, W, 3), np.uint8)
    frame[:] = (30, 180, 90)
    result = segmenter(frame)
    assert np.all(result.labels == 1)
    np.testing.assert_allclose(result.anomaly_score, 100)


def test_graph_with_another_input_size_is_refused_at_load(tmp_path: Path) -> None:
    path = artifact(tmp_path, stand_in_graph(height=H + 2))
    with pytest.raises(ArtifactError) as error:
        backends.load(path, backend='onnxruntime')
    assert str(error.value) == (
        f"{tmp_path / 'm.onnx'} does not match its sidecar {tmp_path / 'm.json'}: 'image' is "
        "float32 [1, 3, 8, 10] in the graph, float32 [1, 3, 6, 10] in the sidecar; 'labels' is "
        "int32 [1, 8, 10] in the graph, int32 [1, 6, 10] in the sidecar; 'anomaly_score' is "
        'float32 [1, 8, 10] in the graph, float32 [1, 6, 10] in the sidecar. The two files come '
        'from different exports: re-export the artifact with anomaly-seg export (or put back '
        'the .onnx that belongs to this sidecar)')


def test_graph_with_other_outputs_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"'labels' is int64 \[1, 6, 10\] in the "
                                            r'graph, int32 \[1, 6, 10\] in the sidecar'):
        backends.load(artifact(tmp_path, stand_in_graph(labels_type=TensorProto.INT64)),
                      backend='onnxruntime')
    with pytest.raises(ArtifactError, match=r"the graph has inputs \['image'\] and outputs "
                                            r"\['labels', 'score'\], the sidecar expects input "
                                            r"\['image'\] and outputs \['labels', "
                                            r"'anomaly_score'\]\. The two files .*re-export"):
        backends.load(artifact(tmp_path, stand_in_graph(score_name='score')),
                      backend='onnxruntime')


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty'])
def test_corrupt_graph_with_a_matching_hash_is_an_artifact_error(tmp_path: Path,
                                                                 damage: str) -> None:
    good = stand_in_graph()
    onnx_bytes = {'truncated': good[:len(good) // 2], 'garbage': b'not a protobuf' * 9,
                  'empty': b''}[damage]
    path = artifact(tmp_path, onnx_bytes)  # the sidecar vouches for the broken bytes
    with pytest.raises(ArtifactError) as error:
        backends.load(path, backend='onnxruntime')
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'm.onnx'} is not a valid ONNX graph (")
    assert message.endswith('a sha256 that matches the sidecar only proves the sidecar was '
                            'written for these bytes: re-export the artifact with anomaly-seg '
                            'export')


def test_missing_onnxruntime_names_the_interpreter_and_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A colcon-built script with another interpreter's shebang once said only 'onnxruntime
    is not installed' although it was, in the virtual environment next to it."""
    path = artifact(tmp_path, stand_in_graph())
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *args: None if name == 'onnxruntime'
                        else real_find_spec(name, *args))
    monkeypatch.setattr(sys, 'executable', '/usr/bin/python3')
    with pytest.raises(BackendError) as error:
        backends.load(path, backend='onnxruntime')
    assert str(error.value) == (
        'onnxruntime is not installed for /usr/bin/python3, the Python this runs under; start '
        'from the environment that has it (activate that virtual environment before ros2 run / '
        'ros2 launch: the installed anomaly_seg_node runs the first python3 on PATH), or '
        "install it for this Python (/usr/bin/python3 -m pip install 'onnxruntime>=1.20')")


def int8_artifact(folder: Path) -> Path:
    """m-int8.json: the stand-in graph under an int8 sidecar (the backend reads the sidecar's
    precision; the graph's own Q/DQ nodes are tested in test/training/test_export_int8.py)."""
    fp32 = artifact(folder, stand_in_graph())
    sidecar = dataclasses.replace(
        read_sidecar(fp32), precision='int8', source=None,
        quantization={'format': 'QDQ', 'reference': {'sidecar': 'm.json'}})
    return write_sidecar(sidecar, folder / 'm-int8.json')


@pytest.mark.parametrize(('backend', 'device', 'precision'), [
    ('auto', 'cpu', 'fp32'), ('auto', 'cuda', 'fp16'), ('onnxruntime', 'cpu', 'fp32'),
    ('onnxruntime', 'cpu', 'fp16')])
def test_int8_artifact_runs_in_onnxruntime_on_the_cpu(tmp_path: Path, backend: str,
                                                      device: str, precision: str) -> None:
    segmenter = backends.load(int8_artifact(tmp_path), backend, device, precision)
    assert (segmenter.backend, segmenter.device, segmenter.precision) == \
        ('onnxruntime', 'cpu', 'int8')
    if backend == 'auto':
        assert segmenter.reason.startswith('int8 artifact: onnxruntime on the CPU')
    frame = np.zeros((H, W, 3), np.uint8)
    frame[:] = (30, 180, 90)
    np.testing.assert_allclose(segmenter(frame).anomaly_score, 100)


def test_int8_artifact_elsewhere_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = int8_artifact(tmp_path)
    sidecar = read_sidecar(path)
    with pytest.raises(BackendError, match=(
            'device cuda asked, but its .onnx is a statically quantised QDQ graph .* for '
            'onnxruntime on the CPU; use backend onnxruntime with device cpu, or the fp32 '
            'artifact m.json for the GPU, torch and tensorrt')):
        backends.OnnxRuntimeSegmenter(sidecar, 'cuda', 'fp32', 'requested')
    for backend in ('torch', 'tensorrt'):
        with pytest.raises(BackendError, match=(
                f'backend {backend} runs NAME.pt2, but .*m-int8.json is an int8 artifact: its '
                '.onnx is a statically quantised QDQ graph')):
            backends.load(path, backend, 'cuda', 'fp16')
    # the graph fixes the precision: int8 is no runtime setting
    with pytest.raises(BackendError, match=r"unknown precision 'int8'"):
        backends.load(path, 'onnxruntime', 'cpu', 'int8')
    assert backends.choose_backend(sidecar, 'cuda', 'fp16')[:3] == ('onnxruntime', 'cpu', 'fp32')


@pytest.mark.parametrize('threads', [0, 1, 2])
def test_ort_threads_reach_the_session(tmp_path: Path, threads: int) -> None:
    path = artifact(tmp_path, stand_in_graph())
    segmenter = backends.load(path, backend='onnxruntime', ort_threads=threads)
    assert segmenter.threads == threads
    # 0 leaves onnxruntime's default, which its SessionOptions report as 0
    assert segmenter.session.get_session_options().intra_op_num_threads == threads
    # auto on the CPU picks onnxruntime and passes the threads on too
    auto = backends.load(path, backend='auto', device='cpu', ort_threads=threads)
    assert auto.session.get_session_options().intra_op_num_threads == threads


@pytest.mark.parametrize('threads', [-1, 1.5, True, '2', None])
def test_ort_threads_must_be_a_non_negative_integer(tmp_path: Path, threads: object) -> None:
    with pytest.raises(ConfigError, match=r'ort_threads must be an integer >= 0'):
        backends.load(artifact(tmp_path, stand_in_graph()), backend='onnxruntime',
                      ort_threads=threads)  # type: ignore[arg-type]
    import onnxruntime

    with pytest.raises(ConfigError, match=r'ort_threads must be an integer >= 0'):
        backends.session_options(onnxruntime, threads)  # type: ignore[arg-type]
