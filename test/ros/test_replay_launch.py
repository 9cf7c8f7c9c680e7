"""launch_testing: replay.launch.py plays a synthetic bag into the node, and every frame of the
bag reaches the node while it is active (the bag used to start before the node was active, and
the first frames got no output). Checked on the node's own count on /diagnostics, which does
not depend on when this test's subscriptions are discovered.

Run where ROS 2 (with rosbag2) and this package are built: ``colcon test`` or
``python -m pytest -m ros test``.
"""

import os
from pathlib import Path
import tempfile
import time
import unittest

import pytest
from tiny_onnx import write_artifact  # beside this file, on sys.path under pytest

rclpy = pytest.importorskip('rclpy')
launch = pytest.importorskip('launch')
launch_actions = pytest.importorskip('launch.actions')
launch_sources = pytest.importorskip('launch.launch_description_sources')
launch_testing = pytest.importorskip('launch_testing')
launch_testing_actions = pytest.importorskip('launch_testing.actions')
launch_testing_asserts = pytest.importorskip('launch_testing.asserts')
ament_packages = pytest.importorskip('ament_index_python.packages')
diagnostic_msg = pytest.importorskip('diagnostic_msgs.msg')
pytest.importorskip('onnxruntime')
pytest.importorskip('rosbags')

from training.synth.bag import TOPICS, write_bag  # noqa: E402  (torch-free; after the skips)

pytestmark = pytest.mark.ros

os.environ.setdefault('ROS_DOMAIN_ID', str(100 + os.getpid() % 100))

NAMESPACE = 'anomaly_seg_replay_test'
STATUS = f'/{NAMESPACE}/anomaly_seg: anomaly segmentation'
FRAMES = 30


@pytest.mark.ros
@pytest.mark.launch_test
def generate_test_description() -> 'launch.LaunchDescription':
    folder = Path(tempfile.mkdtemp(prefix='anomaly_seg_replay_test_'))
    artifact = write_artifact(folder, 8, 12, {'tpr95': 50.0})
    bag = folder / 'drive'
    write_bag(bag, FRAMES, size=(48, 64), storage='sqlite3', progress=False)
    params = folder / 'params.yaml'
    params.write_text('/**:\n  ros__parameters:\n    backend: onnxruntime\n    device: cpu\n'
                      '    precision: fp32\n')
    share = ament_packages.get_package_share_directory('anomaly_seg')
    return launch.LaunchDescription([
        launch_actions.IncludeLaunchDescription(
            launch_sources.PythonLaunchDescriptionSource(
                os.path.join(share, 'launch', 'replay.launch.py')),
            launch_arguments={'bag': str(bag), 'image_topic': TOPICS['image'],
                              'namespace': NAMESPACE, 'params_file': str(params),
                              'artifact': str(artifact)}.items()),
        launch_testing_actions.ReadyToTest(),
    ])


class TestReplay(unittest.TestCase):

    def test_every_frame_reaches_the_active_node(self) -> None:
        rclpy.init()
        node = rclpy.create_node('anomaly_seg_replay_test')
        seen: dict[str, str] = {}

        def keep(msg: 'diagnostic_msg.DiagnosticArray') -> None:
            for status in msg.status:
                if status.name == STATUS:
                    seen.update((kv.key, kv.value) for kv in status.values)

        node.create_subscription(diagnostic_msg.DiagnosticArray, '/diagnostics', keep, 10)
        try:
            end = time.monotonic() + 120.0
            while seen.get('frames_received') != str(FRAMES) and time.monotonic() < end:
                rclpy.spin_once(node, timeout_sec=0.2)
        finally:
            node.destroy_node()
            rclpy.try_shutdown()
        self.assertEqual(seen.get('frames_received'), str(FRAMES), seen)
        self.assertEqual(seen.get('state'), 'active')


@launch_testing.post_shutdown_test()
class TestReplayShutdown(unittest.TestCase):

    def test_node_exits_cleanly(self, proc_info: object) -> None:
        # The node only: the player ends on its own or on the launch's SIGINT, as rosbag2 likes.
        launch_testing_asserts.assertExitCodes(proc_info, process='anomaly_seg_node')
