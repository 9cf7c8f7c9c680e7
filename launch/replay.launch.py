"""Replay a recorded drive through the node: `ros2 bag play --clock` plus camera.launch.py.

ros2 launch anomaly_seg replay.launch.py bag:=/path/to/bag artifact:=/path/NAME.json
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.substitutions import FindPackageShare


def generate_launch_description() -> LaunchDescription:
    camera_launch = PathJoinSubstitution(
        [FindPackageShare('anomaly_seg'), 'launch', 'camera.launch.py'])
    return LaunchDescription([
        DeclareLaunchArgument('bag', description='rosbag2 folder to play'),
        DeclareLaunchArgument('rate', default_value='1.0', description='playback rate'),
        DeclareLaunchArgument('image_topic', default_value='/camera/image_raw',
                              description='image topic recorded in the bag'),
        DeclareLaunchArgument('artifact', default_value='',
                              description='artifact NAME.json; empty keeps the YAML value'),
        DeclareLaunchArgument('namespace', default_value=''),
        ExecuteProcess(
            cmd=['ros2', 'bag', 'play', LaunchConfiguration('bag'), '--clock',
                 '--rate', LaunchConfiguration('rate')],
            output='screen'),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(camera_launch),
            launch_arguments={
                'image_topic': LaunchConfiguration('image_topic'),
                'artifact': LaunchConfiguration('artifact'),
                'namespace': LaunchConfiguration('namespace'),
                'use_sim_time': 'true',
            }.items()),
    ])
