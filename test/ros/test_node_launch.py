"""launch_testing: camera.launch.py starts the node on a tiny ONNX artifact made here; synthetic
images go in, and the outputs are checked (encodings, sizes, values, the input's header), a
threshold change through the parameter service, /diagnostics, label_info, the anomaly objects
(vision_msgs/Detection2DArray) and clean exit codes.

Run where ROS 2 (Humble or Jazzy) and this package are built: ``colcon test`` or
``python -m pytest -m ros test``; only requirements-runtime.txt is needed beside ROS (the model
is written by tiny_onnx.py, without the onnx package). Without rclpy or launch_testing the module
skips.
"""

import os
from pathlib import Path
import tempfile
import time
import unittest

import numpy as np
import pytest
from tiny_onnx import write_artifact  # beside this file, on sys.path under pytest

# rclpy first: without ROS, `launch` would resolve to this repository's launch/ folder.
rclpy = pytest.importorskip('rclpy')
launch = pytest.importorskip('launch')
launch_actions = pytest.importorskip('launch.actions')
launch_sources = pytest.importorskip('launch.launch_description_sources')
launch_testing = pytest.importorskip('launch_testing')
launch_testing_actions = pytest.importorskip('launch_testing.actions')
launch_testing_asserts = pytest.importorskip('launch_testing.asserts')
ament_packages = pytest.importorskip('ament_index_python.packages')
pytest.importorskip('onnxruntime')
rcl_msg = pytest.importorskip('rcl_interfaces.msg')
rcl_srv = pytest.importorskip('rcl_interfaces.srv')
diagnostic_msg = pytest.importorskip('diagnostic_msgs.msg')
sensor_msg = pytest.importorskip('sensor_msgs.msg')
qos = pytest.importorskip('rclpy.qos')

pytestmark = pytest.mark.ros

# Keep this test's topics away from other ROS 2 graphs on the machine.
os.environ.setdefault('ROS_DOMAIN_ID', str(100 + os.getpid() % 100))

NAMESPACE = 'anomaly_seg_test'
IMAGE_TOPIC = '/anomaly_seg_test_camera/image_raw'
NODE = f'/{NAMESPACE}/anomaly_seg'
STATUS = f'{NODE}: anomaly segmentation'  # named after the fully qualified node
NET_H, NET_W = 8, 12  # the artifact's input size
IMG_H, IMG_W = 24, 30  # the camera's size: frames shrink to the artifact's, outputs grow back
THRESHOLDS = {'tpr95': 50.0, 'fpr1': 150.0}
ENCODINGS = {'semantic_mask': 'mono8', 'anomaly_score': '32FC1', 'anomaly_mask': 'mono8',
             'semantic_color': 'rgb8', 'overlay': 'rgb8'}
# Argmax over RGB = class 1 ('g'), mean of RGB = 100: every output value is known.
COLOUR = (30, 180, 90)
FRAME_ID = 'test_camera_optical_frame'


@pytest.mark.ros
@pytest.mark.launch_test
def generate_test_description() -> 'launch.LaunchDescription':
    folder = Path(tempfile.mkdtemp(prefix='anomaly_seg_launch_test_'))
    artifact = write_artifact(folder, NET_H, NET_W, THRESHOLDS)
    params = folder / 'params.yaml'
    # The artifact comes from the launch argument, the rest from this file (root key /**).
    params.write_text('/**:\n  ros__parameters:\n    backend: onnxruntime\n    device: cpu\n'
                      '    precision: fp32\n    max_input_age: 0.0\n')
    share = ament_packages.get_package_share_directory('anomaly_seg')
    camera_launch = os.path.join(share, 'launch', 'camera.launch.py')
    return launch.LaunchDescription([
        launch_actions.IncludeLaunchDescription(
            launch_sources.PythonLaunchDescriptionSource(camera_launch),
            launch_arguments={'image_topic': IMAGE_TOPIC, 'namespace': NAMESPACE,
                              'params_file': str(params), 'artifact': str(artifact)}.items()),
        launch_testing_actions.ReadyToTest(),
    ])


def _image(stamp_sec: int) -> 'sensor_msg.Image':
    msg = sensor_msg.Image(height=IMG_H, width=IMG_W, encoding='rgb8', is_bigendian=0,
                           step=IMG_W * 3)
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp_sec, 123
    msg.header.frame_id = FRAME_ID
    msg.data = bytes(COLOUR) * (IMG_H * IMG_W)
    return msg


def _pixels(msg: 'sensor_msg.Image') -> np.ndarray:
    dtype = np.dtype('<f4') if msg.encoding == '32FC1' else np.uint8
    channels = 3 if msg.encoding == 'rgb8' else 1
    array = np.frombuffer(bytes(msg.data), dtype=dtype)
    return array.reshape(msg.height, msg.width, channels)


class TestAnomalySegNode(unittest.TestCase):

    @classmethod
    def setUpClass(cls) -> None:
        rclpy.init()
        cls.node = rclpy.create_node('anomaly_seg_launch_test')
        cls.publisher = cls.node.create_publisher(sensor_msg.Image, IMAGE_TOPIC, 10)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.node.destroy_node()
        rclpy.shutdown()

    def _exchange(self, stamp_sec: int, timeout: float = 60.0) -> dict:
        """Publish the synthetic frame until every output carried its stamp back."""
        got: dict = {}
        subscriptions = []
        for topic in ENCODINGS:
            def keep(msg: 'sensor_msg.Image', topic: str = topic) -> None:
                if msg.header.stamp.sec == stamp_sec:
                    got.setdefault(topic, msg)
            subscriptions.append(self.node.create_subscription(
                sensor_msg.Image, f'/{NAMESPACE}/{topic}', keep, 10))
        frame = _image(stamp_sec)
        end = time.monotonic() + timeout
        try:
            while len(got) < len(ENCODINGS) and time.monotonic() < end:
                self.publisher.publish(frame)
                rclpy.spin_once(self.node, timeout_sec=0.2)
        finally:
            for subscription in subscriptions:
                self.node.destroy_subscription(subscription)
        self.assertEqual(set(got), set(ENCODINGS), f'outputs after {timeout} s: {sorted(got)}')
        return got

    def _set(self, name: str, value: 'rcl_msg.ParameterValue') -> 'rcl_msg.SetParametersResult':
        client = self.node.create_client(rcl_srv.SetParameters, f'{NODE}/set_parameters')
        try:
            self.assertTrue(client.wait_for_service(timeout_sec=30.0))
            request = rcl_srv.SetParameters.Request(
                parameters=[rcl_msg.Parameter(name=name, value=value)])
            future = client.call_async(request)
            rclpy.spin_until_future_complete(self.node, future, timeout_sec=10.0)
            self.assertTrue(future.done())
            return future.result().results[0]
        finally:
            self.node.destroy_client(client)

    def test_1_outputs_carry_the_input_header_and_known_values(self) -> None:
        got = self._exchange(stamp_sec=1001)
        for topic, msg in got.items():
            self.assertEqual(msg.encoding, ENCODINGS[topic], topic)
            self.assertEqual((msg.height, msg.width), (IMG_H, IMG_W), topic)
            self.assertEqual((msg.header.stamp.sec, msg.header.stamp.nanosec), (1001, 123))
            self.assertEqual(msg.header.frame_id, FRAME_ID)
            self.assertEqual(msg.is_bigendian, 0)
        self.assertTrue(np.all(_pixels(got['semantic_mask']) == 1))
        np.testing.assert_allclose(_pixels(got['anomaly_score']), 100.0, rtol=1e-5)
        self.assertTrue(np.all(_pixels(got['anomaly_mask']) == 255))  # 100 > tpr95 = 50
        self.assertTrue(np.all(_pixels(got['semantic_color']) == (0, 255, 0)))

    def test_2_threshold_changes_take_effect(self) -> None:
        double = rcl_msg.ParameterValue(type=rcl_msg.ParameterType.PARAMETER_DOUBLE,
                                        double_value=150.0)
        self.assertTrue(self._set('anomaly_threshold', double).successful)
        self.assertTrue(np.all(_pixels(self._exchange(2001)['anomaly_mask']) == 0))
        name = rcl_msg.ParameterValue(type=rcl_msg.ParameterType.PARAMETER_STRING,
                                      string_value='tpr95')
        self.assertTrue(self._set('anomaly_threshold', name).successful)
        self.assertTrue(np.all(_pixels(self._exchange(2002)['anomaly_mask']) == 255))
        unknown = rcl_msg.ParameterValue(type=rcl_msg.ParameterType.PARAMETER_STRING,
                                         string_value='tpr99')
        result = self._set('anomaly_threshold', unknown)
        self.assertFalse(result.successful)
        self.assertIn('unknown threshold name', result.reason)
        backend = rcl_msg.ParameterValue(type=rcl_msg.ParameterType.PARAMETER_STRING,
                                         string_value='torch')
        result = self._set('backend', backend)
        self.assertFalse(result.successful)
        self.assertIn('read at configure', result.reason)

    def test_3_diagnostics(self) -> None:
        statuses: list = []
        subscription = self.node.create_subscription(
            diagnostic_msg.DiagnosticArray, '/diagnostics',
            lambda msg: statuses.extend(s for s in msg.status if s.name == STATUS), 10)
        end = time.monotonic() + 10.0
        while not statuses and time.monotonic() < end:
            rclpy.spin_once(self.node, timeout_sec=0.2)
        self.node.destroy_subscription(subscription)
        self.assertTrue(statuses)
        values = {kv.key: kv.value for kv in statuses[-1].values}
        self.assertEqual(values['state'], 'active')
        # The resolved topics, not the unremapped 'image': several cameras stay apart.
        self.assertEqual(values['input_topic'], IMAGE_TOPIC)
        self.assertEqual(statuses[-1].hardware_id, IMAGE_TOPIC)
        self.assertEqual(values['camera_info_topic'], '/anomaly_seg_test_camera/camera_info')
        self.assertEqual(values['backend'], 'onnxruntime')
        self.assertEqual(values['precision'], 'fp32')
        self.assertEqual(len(values['artifact_sha256']), 64)
        self.assertIn(statuses[-1].level, (diagnostic_msg.DiagnosticStatus.OK,
                                           diagnostic_msg.DiagnosticStatus.WARN))

    def test_4_label_info_is_latched(self) -> None:
        try:
            import vision_msgs.msg as vision
        except ImportError:
            self.skipTest('vision_msgs is not installed: the node publishes no label_info')
        latched = qos.QoSProfile(depth=1, durability=qos.DurabilityPolicy.TRANSIENT_LOCAL,
                                 reliability=qos.ReliabilityPolicy.RELIABLE)
        got: list = []
        subscription = self.node.create_subscription(
            vision.LabelInfo, f'/{NAMESPACE}/label_info', got.append, latched)
        end = time.monotonic() + 10.0
        while not got and time.monotonic() < end:
            rclpy.spin_once(self.node, timeout_sec=0.2)
        self.node.destroy_subscription(subscription)
        self.assertTrue(got)
        self.assertEqual([(c.class_id, c.class_name) for c in got[-1].class_map],
                         [(0, 'r'), (1, 'g'), (2, 'b'), (255, 'void')])


    def test_5_anomaly_objects(self) -> None:
        try:
            import vision_msgs.msg as vision
        except ImportError:
            self.skipTest('vision_msgs is not installed: the node publishes no anomaly_objects')
        got: list = []

        def keep(msg: 'vision.Detection2DArray') -> None:
            if msg.header.stamp.sec == 5001:
                got.append(msg)

        subscription = self.node.create_subscription(
            vision.Detection2DArray, f'/{NAMESPACE}/anomaly_objects', keep, 10)
        frame = _image(5001)
        end = time.monotonic() + 60.0
        try:
            while not got and time.monotonic() < end:
                self.publisher.publish(frame)
                rclpy.spin_once(self.node, timeout_sec=0.2)
        finally:
            self.node.destroy_subscription(subscription)
        self.assertTrue(got, "no anomaly_objects message with the frame's stamp in 60 s")
        msg = got[0]
        self.assertEqual((msg.header.stamp.sec, msg.header.stamp.nanosec), (5001, 123))
        self.assertEqual(msg.header.frame_id, FRAME_ID)
        # Score 100 everywhere, above tpr95 = 50 (test_2 set it back); classes r, g, b hold no
        # road, so objects_drivable_classes [auto] restricts nothing: one object, the frame.
        (detection,) = msg.detections
        self.assertEqual(detection.id, '0')
        self.assertEqual((detection.header.stamp.sec, detection.header.frame_id),
                         (5001, FRAME_ID))
        (result,) = detection.results
        self.assertEqual(result.hypothesis.class_id, 'anomaly')
        # Two thresholds, one of them fprN: the logistic confidence, 50 score units above.
        self.assertAlmostEqual(result.hypothesis.score, 1.0, places=6)
        box = detection.bbox
        self.assertEqual((box.center.position.x, box.center.position.y, box.center.theta),
                         (IMG_W / 2, IMG_H / 2, 0.0))
        self.assertEqual((box.size_x, box.size_y), (float(IMG_W), float(IMG_H)))


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):

    def test_exit_codes(self, proc_info: object) -> None:
        launch_testing_asserts.assertExitCodes(proc_info)
