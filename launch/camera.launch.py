"""Start the anomaly_seg node on one camera.

ros2 launch anomaly_seg camera.launch.py image_topic:=/camera/image_raw artifact:=/path/NAME.json

A plain Node action (not LifecycleNode): the node configures and activates itself
(`autostart: true`), so launch_ros must not drive the transitions a second time.
"""

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def _camera_info_topic(image_topic: str) -> str:
    # image_transport convention: /ns/image_raw <-> /ns/camera_info.
    parent = image_topic.rstrip('/').rsplit('/', 1)[0]
    return f'{parent}/camera_info' if parent else 'camera_info'


def _launch_node(context: LaunchContext) -> list[Node]:
    image_topic = LaunchConfiguration('image_topic').perform(context)
    overrides = {
        'use_sim_time': LaunchConfiguration('use_sim_time').perform(context).lower() == 'true',
    }
    artifact = LaunchConfiguration('artifact').perform(context)
    # Only a non-empty artifact overrides the YAML: an empty default would wipe its value.
    if artifact:
        overrides['artifact'] = artifact
    return [Node(
        package='anomaly_seg',
        executable='anomaly_seg_node',
        name='anomaly_seg',
        namespace=LaunchConfiguration('namespace').perform(context),
        parameters=[LaunchConfiguration('params_file').perform(context), overrides],
        remappings=[
            ('image', image_topic),
            ('image/compressed', f'{image_topic}/compressed'),
            ('camera_info', _camera_info_topic(image_topic)),
        ],
        output='screen',
        emulate_tty=True,
    )]


def generate_launch_description() -> LaunchDescription:
    default_params = PathJoinSubstitution(
        [FindPackageShare('anomaly_seg'), 'config', 'params.yaml'])
    return LaunchDescription([
        DeclareLaunchArgument('image_topic', default_value='/camera/image_raw',
                              description='sensor_msgs/Image topic of the camera'),
        DeclareLaunchArgument('namespace', default_value='',
                              description='namespace of the node and its output topics'),
        DeclareLaunchArgument('params_file', default_value=default_params,
                              description='node parameters (YAML with root key /**:)'),
        DeclareLaunchArgument('artifact', default_value='',
                              description='artifact NAME.json; empty keeps the YAML value'),
        DeclareLaunchArgument('use_sim_time', default_value='false', choices=['true', 'false'],
                              description='use /clock (true when replaying a bag)'),
        OpaqueFunction(function=_launch_node),
    ])
