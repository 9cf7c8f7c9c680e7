"""A tiny artifact for the ROS tests, written without the onnx package.

The ROS tests must run where only requirements-runtime.txt is installed (onnxruntime, no onnx),
so the model is serialised here with a few lines of protobuf encoding. The graph has the
artifact contract with known answers: labels = argmax over RGB, anomaly_score = mean of RGB.
test_tiny_onnx.py checks these bytes against onnx.helper and runs them in onnxruntime.
"""

import hashlib
from pathlib import Path

from anomaly_seg_node.artifact import FileRef, InputSpec, ScoreSpec, Sidecar, write_sidecar

FLOAT, INT32 = 1, 6  # onnx TensorProto.DataType
_ATTR_INT, _ATTR_INTS = 2, 7  # onnx AttributeProto.AttributeType
IR_VERSION, OPSET = 8, 13


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 as two's complement, like protobuf
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _tensor_info(name: str, elem_type: int, shape: tuple[int, ...]) -> bytes:
    dims = b''.join(_bytes(1, _int(1, size)) for size in shape)  # Dimension.dim_value
    tensor = _int(1, elem_type) + _bytes(2, dims)  # TypeProto.Tensor
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor))  # ValueInfoProto


def _attribute(name: str, value: int | list[int]) -> bytes:
    if isinstance(value, list):
        return _bytes(1, name) + b''.join(_int(8, v) for v in value) + _int(20, _ATTR_INTS)
    return _bytes(1, name) + _int(3, value) + _int(20, _ATTR_INT)


def _node(op_type: str, inputs: list[str], outputs: list[str], **attributes: int | list[int]
          ) -> bytes:
    return (b''.join(_bytes(1, name) for name in inputs)
            + b''.join(_bytes(2, name) for name in outputs) + _bytes(4, op_type)
            + b''.join(_bytes(5, _attribute(k, v)) for k, v in attributes.items()))


def model_bytes(height: int, width: int) -> bytes:
    """ModelProto: image float [1,3,H,W] -> labels int32 [1,H,W], anomaly_score float [1,H,W]."""
    nodes = [_node('ArgMax', ['image'], ['argmax'], axis=1, keepdims=0),
             _node('Cast', ['argmax'], ['labels'], to=INT32),
             _node('ReduceMean', ['image'], ['anomaly_score'], axes=[1], keepdims=0)]
    graph = (b''.join(_bytes(1, node) for node in nodes) + _bytes(2, 'tiny')
             + _bytes(11, _tensor_info('image', FLOAT, (1, 3, height, width)))
             + _bytes(12, _tensor_info('labels', INT32, (1, height, width)))
             + _bytes(12, _tensor_info('anomaly_score', FLOAT, (1, height, width))))
    opset = _bytes(1, '') + _int(2, OPSET)
    return _int(1, IR_VERSION) + _bytes(7, graph) + _bytes(8, opset)


def write_artifact(folder: Path, height: int, width: int,
                   thresholds: dict[str, float]) -> Path:
    """tiny.onnx and its sidecar tiny.json in ``folder`` (classes r, g, b; default 'tpr95')."""
    onnx_bytes = model_bytes(height, width)
    # The schema lists a .pt2 too; the onnxruntime backend never reads it.
    pt2_bytes = b'not read by the onnxruntime backend'
    (folder / 'tiny.onnx').write_bytes(onnx_bytes)
    (folder / 'tiny.pt2').write_bytes(pt2_bytes)
    sidecar = Sidecar(
        method='ros-test', score=ScoreSpec(name='mean_rgb', units='0..255'),
        input=InputSpec(height=height, width=width), classes=('r', 'g', 'b'),
        palette=((255, 0, 0), (0, 255, 0), (0, 0, 255)),
        files={'onnx': FileRef('tiny.onnx', hashlib.sha256(onnx_bytes).hexdigest()),
               'pt2': FileRef('tiny.pt2', hashlib.sha256(pt2_bytes).hexdigest())},
        thresholds=dict(thresholds), default_threshold='tpr95')
    return write_sidecar(sidecar, folder / 'tiny.json')
