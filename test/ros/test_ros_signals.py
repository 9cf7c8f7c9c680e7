"""The node exits cleanly (code 0, no traceback) on SIGINT and SIGTERM in every state, also
when several signals come at once: Ctrl-C reaches the whole process group and ros2 launch
forwards one more SIGINT, which used to crash the cleanup (KeyboardInterrupt inside
destroy_subscription, exit -2).

Run where ROS 2 and this package are built: ``colcon test`` or ``python -m pytest -m ros test``.
"""

import os
from pathlib import Path
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from tiny_onnx import write_artifact  # beside this file, on sys.path under pytest

rclpy = pytest.importorskip('rclpy')
diagnostic_msg = pytest.importorskip('diagnostic_msgs.msg')
sensor_msg = pytest.importorskip('sensor_msgs.msg')
pytest.importorskip('onnxruntime')

pytestmark = pytest.mark.ros

os.environ.setdefault('ROS_DOMAIN_ID', str(100 + os.getpid() % 100))

IMAGE_TOPIC = '/anomaly_seg_signal_test_camera/image_raw'
NET_H, NET_W = 8, 12


@pytest.fixture(scope='module')
def ros_node() -> Any:
    rclpy.init()
    node = rclpy.create_node('anomaly_seg_signal_test')
    yield node
    node.destroy_node()
    rclpy.try_shutdown()


def _frame() -> 'sensor_msg.Image':
    msg = sensor_msg.Image(height=24, width=30, encoding='rgb8', is_bigendian=0, step=90)
    msg.header.frame_id = 'test_camera_optical_frame'
    msg.data = bytes((30, 180, 90)) * (24 * 30)
    return msg


def _start_node(folder: Path, namespace: str, autostart: bool) -> subprocess.Popen:
    artifact = write_artifact(folder, NET_H, NET_W, {'tpr95': 50.0})
    params = {'artifact': artifact, 'backend': 'onnxruntime', 'device': 'cpu',
              'precision': 'fp32', 'max_input_age': 0.0, 'autostart': str(autostart).lower()}
    cmd = [sys.executable, '-m', 'anomaly_seg_node.node', '--ros-args',
           '-r', f'__ns:=/{namespace}', '-r', f'image:={IMAGE_TOPIC}']
    for name, value in params.items():
        cmd += ['-p', f'{name}:={value}']
    # Its own process group, like a launch: signals go to it and not to this test.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.parametrize('autostart, state, signals', [
    (False, 'unconfigured', (signal.SIGINT, signal.SIGINT)),
    (True, 'active', (signal.SIGINT, signal.SIGINT, signal.SIGINT)),
    (True, 'active', (signal.SIGTERM,)),
    (True, 'active', (signal.SIGINT, signal.SIGTERM)),
])
def test_node_exits_cleanly_on_signals(ros_node: Any, tmp_path: Path, autostart: bool,
                                       state: str, signals: tuple[int, ...]) -> None:
    namespace = f'signal_test_{os.getpid()}_{len(signals)}_{int(autostart)}_{int(signals[-1])}'
    status_name = f'/{namespace}/anomaly_seg: anomaly segmentation'
    publisher = ros_node.create_publisher(sensor_msg.Image, IMAGE_TOPIC, 10)
    # A subscriber makes the node compute and publish, so the worker is busy at the signal.
    outputs = ros_node.create_subscription(sensor_msg.Image, f'/{namespace}/semantic_mask',
                                           lambda msg: None, 10)
    seen: dict[str, str] = {}

    def keep(msg: 'diagnostic_msg.DiagnosticArray') -> None:
        for status in msg.status:
            if status.name == status_name:
                seen.update((kv.key, kv.value) for kv in status.values)

    diagnostics = ros_node.create_subscription(diagnostic_msg.DiagnosticArray, '/diagnostics',
                                               keep, 10)
    process = _start_node(tmp_path, namespace, autostart)
    try:
        end = time.monotonic() + 60.0
        while seen.get('state') != state:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < end, f'the node never reported state {state}: {seen}'
            publisher.publish(_frame())
            rclpy.spin_once(ros_node, timeout_sec=0.05)
        for signum in signals:
            os.killpg(process.pid, signum)
            time.sleep(0.01)
        end = time.monotonic() + 30.0
        while process.poll() is None:
            assert time.monotonic() < end, 'the node did not exit within 30 s'
            publisher.publish(_frame())
            rclpy.spin_once(ros_node, timeout_sec=0.05)
        output = process.stdout.read()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for entity in (publisher, outputs, diagnostics):
            if hasattr(entity, 'publish'):
                ros_node.destroy_publisher(entity)
            else:
                ros_node.destroy_subscription(entity)
    assert process.returncode == 0, output
    assert 'Traceback' not in output and 'KeyboardInterrupt' not in output, output
    assert f'shutting down ({signal.Signals(signals[0]).name})' in output, output
