"""Start the anomaly_seg node on one camera.

ros2 launch anomaly_seg camera.launch.py image_topic:=/camera/image_raw artifact:=/path/NAME.json

A plain Node action (not LifecycleNode): the node configures and activates itself
(`autostart: true`), so launch_ros must not drive the transitions a second time.

The node's inputs (image, image/compressed, camera_info) are remapped to the camera's topics;
its outputs stay in its namespace. `namespace:=auto` (the default) puts it in
`<the camera's namespace>/anomaly_seg`: /camera/image_raw gives /camera/anomaly_seg/overlay, ...
and the node /camera/anomaly_seg/anomaly_seg, so that a second camera (/rear/image_raw) never
publishes on the same topics; /diagnostics names each status after the fully qualified node and
its remapped input topic. The derived namespace is relative, so a PushRosNamespace around this
launch still applies. replay.launch.py builds its node with `node_action` below, as a
LifecycleNode whose transitions the launch drives.
"""

from typing import Any

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode, Node
from launch_ros.substitutions import FindPackageShare

NODE_NAME = 'anomaly_seg'
NAMESPACE_AUTO = 'auto'


def camera_info_topic(image_topic: str) -> str:
    """The image_transport convention: /ns/image_raw <-> /ns/camera_info."""
    parent = image_topic.rstrip('/').rsplit('/', 1)[0]
    return f'{parent}/camera_info' if parent else 'camera_info'


def default_namespace(image_topic: str) -> str:
    """The namespace of ``namespace:=auto``: the image topic's namespace + /anomaly_seg, relative
    (/front/camera/image_raw -> front/camera/anomaly_seg; /image_raw -> anomaly_seg)."""
    parent = image_topic.strip('/').rpartition('/')[0]
    return f'{parent}/{NODE_NAME}' if parent else NODE_NAME


def node_action(context: LaunchContext, lifecycle: bool = False,
                overrides: dict[str, Any] | None = None) -> Node:
    """The node from the launch arguments image_topic, namespace, params_file, artifact and
    use_sim_time; ``lifecycle``: a LifecycleNode action (its transitions can be driven and
    watched); ``overrides``: parameters that win over the YAML and those arguments."""
    image_topic = LaunchConfiguration('image_topic').perform(context)
    namespace = LaunchConfiguration('namespace').perform(context)
    if namespace == NAMESPACE_AUTO:
        # The camera's topic is taken from the root: relative, it would resolve inside the
        # node's own namespace (camera/anomaly_seg/camera/image_raw).
        image_topic = '/' + image_topic.lstrip('/')
        namespace = default_namespace(image_topic)
    parameters: dict[str, Any] = dict(overrides or {})
    if 'use_sim_time' not in parameters:
        parameters['use_sim_time'] = (
            LaunchConfiguration('use_sim_time').perform(context).lower() == 'true')
    artifact = LaunchConfiguration('artifact').perform(context)
    # Only a non-empty artifact overrides the YAML: an empty default would wipe its value.
    if artifact:
        parameters.setdefault('artifact', artifact)
    action = LifecycleNode if lifecycle else Node
    return action(
        package='anomaly_seg',
        executable='anomaly_seg_node',
        name=NODE_NAME,
        namespace=namespace,
        parameters=[LaunchConfiguration('params_file').perform(context), parameters],
        remappings=[
            ('image', image_topic),
            ('image/compressed', f'{image_topic}/compressed'),
            ('camera_info', camera_info_topic(image_topic)),
        ],
        output='screen',
        emulate_tty=True,
    )


def declare_arguments() -> list[DeclareLaunchArgument]:
    """The launch arguments that ``node_action`` reads."""
    default_params = PathJoinSubstitution(
        [FindPackageShare('anomaly_seg'), 'config', 'params.yaml'])
    return [
        DeclareLaunchArgument('image_topic', default_value='/camera/image_raw',
                              description='sensor_msgs/Image topic of the camera'),
        DeclareLaunchArgument('namespace', default_value=NAMESPACE_AUTO,
                              description='namespace of the node and its output topics; auto: '
                              "the image topic's namespace + /anomaly_seg (/camera/image_raw: "
                              '/camera/anomaly_seg), one per camera; / for the root namespace'),
        DeclareLaunchArgument('params_file', default_value=default_params,
                              description='node parameters (YAML with root key /**:)'),
        DeclareLaunchArgument('artifact', default_value='',
                              description='artifact NAME.json; empty keeps the YAML value'),
        DeclareLaunchArgument('use_sim_time', default_value='false', choices=['true', 'false'],
                              description='use /clock (true when replaying a bag)'),
    ]


def _launch_node(context: LaunchContext) -> list[Node]:
    return [node_action(context)]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([*declare_arguments(), OpaqueFunction(function=_launch_node)])
