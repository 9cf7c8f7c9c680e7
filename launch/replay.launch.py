"""Replay a recorded drive through the node: `ros2 bag play --clock` plus camera.launch.py.

ros2 launch anomaly_seg replay.launch.py bag:=/path/to/bag artifact:=/path/NAME.json

The node runs with use_sim_time, so max_input_age and the latency on /diagnostics are measured
against the bag's /clock; the outputs keep the recorded header stamps.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.substitutions import FindPackageShare


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare('anomaly_seg')
    camera_launch = PathJoinSubstitution([share, 'launch', 'camera.launch.py'])
    return LaunchDescription([
        DeclareLaunchArgument('bag', description='rosbag2 folder (or file) to play'),
        DeclareLaunchArgument('rate', default_value='1.0', description='playback rate'),
        DeclareLaunchArgument('image_topic', default_value='/camera/image_raw',
                              description='image topic recorded in the bag'),
        DeclareLaunchArgument('artifact', default_value='',
                              description='artifact NAME.json; empty keeps the YAML value'),
        DeclareLaunchArgument('params_file',
                              default_value=PathJoinSubstitution([share, 'config', 'params.yaml']),
                              description='node parameters (YAML with root key /**:)'),
        DeclareLaunchArgument('namespace', default_value='',
                              description='namespace of the node and its output topics'),
        ExecuteProcess(
            cmd=['ros2', 'bag', 'play', LaunchConfiguration('bag'), '--clock',
                 '--rate', LaunchConfiguration('rate')],
            output='screen'),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(camera_launch),
            launch_arguments={
                'image_topic': LaunchConfiguration('image_topic'),
                'artifact': LaunchConfiguration('artifact'),
                'params_file': LaunchConfiguration('params_file'),
                'namespace': LaunchConfiguration('namespace'),
                'use_sim_time': 'true',
            }.items()),
    ])
