"""test/ros/tiny_onnx.py, the ROS tests' hand-serialised ONNX model (they run without the onnx
package), is the graph onnx.helper builds, and it runs in onnxruntime."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from anomaly_seg_node.artifact import read_sidecar


def _tiny_onnx():
    path = Path(__file__).parents[1] / 'ros' / 'tiny_onnx.py'
    spec = importlib.util.spec_from_file_location('anomaly_seg_tiny_onnx', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_onnx = _tiny_onnx()


def test_varint_matches_protobuf() -> None:
    assert tiny_onnx._varint(1) == b'\x01'
    assert tiny_onnx._varint(300) == b'\xac\x02'
    assert tiny_onnx._varint(-1) == b'\xff' * 9 + b'\x01'


def test_model_is_the_onnx_helper_graph() -> None:
    onnx = pytest.importorskip('onnx')
    from onnx import TensorProto, helper

    model = onnx.load_from_string(tiny_onnx.model_bytes(8, 12))
    onnx.checker.check_model(model, full_check=True)
    image = helper.make_tensor_value_info('image', TensorProto.FLOAT, [1, 3, 8, 12])
    labels = helper.make_tensor_value_info('labels', TensorProto.INT32, [1, 8, 12])
    score = helper.make_tensor_value_info('anomaly_score', TensorProto.FLOAT, [1, 8, 12])
    nodes = [helper.make_node('ArgMax', ['image'], ['argmax'], axis=1, keepdims=0),
             helper.make_node('Cast', ['argmax'], ['labels'], to=TensorProto.INT32),
             helper.make_node('ReduceMean', ['image'], ['anomaly_score'], axes=[1],
                              keepdims=0)]
    graph = helper.make_graph(nodes, 'tiny', [image], [labels, score])
    expected = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])
    expected.ir_version = 8
    assert model.graph == expected.graph
    assert list(model.opset_import) == list(expected.opset_import)
    assert model.ir_version == 8


def test_artifact_runs_in_onnxruntime(tmp_path: Path) -> None:
    ort = pytest.importorskip('onnxruntime')
    path = tiny_onnx.write_artifact(tmp_path, 8, 12, {'tpr95': 50.0})
    sidecar = read_sidecar(path)
    assert sidecar.input_size == (8, 12) and sidecar.classes == ('r', 'g', 'b')
    session = ort.InferenceSession(str(tmp_path / 'tiny.onnx'),
                                   providers=['CPUExecutionProvider'])
    image = np.zeros((1, 3, 8, 12), np.float32)
    image[0, :, :, :] = np.array([30.0, 180.0, 90.0])[:, None, None]
    labels, score = session.run(['labels', 'anomaly_score'], {'image': image})
    assert labels.dtype == np.int32 and (labels == 1).all()
    np.testing.assert_allclose(score, 100.0)
