"""Replay a recorded drive through the node: `ros2 bag play --clock` plus the node.

ros2 launch anomaly_seg replay.launch.py bag:=/path/to/bag artifact:=/path/NAME.json

Every frame of the bag reaches an active node. The player starts paused; the node is a
LifecycleNode action with autostart false, which the launch configures and then activates
(launch_ros of Jazzy has no autostart for LifecycleNode actions, and OnStateTransition needs
one as its target). Only when the node reports its transition to active does
`ros2 service call /rosbag2_player/resume` start the playback: a player started at that moment
would publish its first frames before its publishers were discovered. A node that fails to
configure or to activate ends the launch instead of replaying into nothing.

The node runs with use_sim_time, so max_input_age and the latency on /diagnostics are measured
against the bag's /clock; the outputs keep the recorded header stamps.
"""

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from launch import LaunchContext, LaunchDescription
from launch.actions import (
    DeclareLaunchArgument,
    EmitEvent,
    ExecuteProcess,
    LogInfo,
    OpaqueFunction,
    RegisterEventHandler,
    Shutdown,
)
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

# ros2 bag play's node; rosbag2_py starts it without command-line remapping.
PLAYER = '/rosbag2_player'


def _camera_launch() -> ModuleType:
    """camera.launch.py beside this file (launch loads launch files by path, not by import)."""
    path = Path(__file__).with_name('camera.launch.py')
    spec = importlib.util.spec_from_file_location('anomaly_seg_camera_launch', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _on(node: LifecycleNode, start_state: str, goal_state: str, entities: list[Any],
        **kwargs: Any) -> RegisterEventHandler:
    return RegisterEventHandler(OnStateTransition(
        target_lifecycle_node=node, start_state=start_state, goal_state=goal_state,
        entities=entities, **kwargs))


def _change_state(node: LifecycleNode, transition_id: int) -> EmitEvent:
    return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                       transition_id=transition_id))


def _launch(context: LaunchContext) -> list[Any]:
    node = _camera_launch().node_action(
        context, lifecycle=True, overrides={'use_sim_time': True, 'autostart': False})
    player = ExecuteProcess(
        cmd=['ros2', 'bag', 'play', LaunchConfiguration('bag'), '--clock',
             '--rate', LaunchConfiguration('rate'), '--start-paused',
             '--disable-keyboard-controls'],
        output='screen')
    resume = ExecuteProcess(
        cmd=['ros2', 'service', 'call', f'{PLAYER}/resume', 'rosbag2_interfaces/srv/Resume'],
        output='log')
    return [
        player,
        _on(node, 'configuring', 'inactive',
            [_change_state(node, Transition.TRANSITION_ACTIVATE)], handle_once=True),
        _on(node, 'activating', 'active',
            [LogInfo(msg='anomaly_seg is active: resuming the bag'), resume], handle_once=True),
        _on(node, 'configuring', 'unconfigured',
            [Shutdown(reason='anomaly_seg failed to configure (its log says why); nothing to '
                      'replay')]),
        _on(node, 'activating', 'inactive',
            [Shutdown(reason='anomaly_seg failed to activate (its log says why); nothing to '
                      'replay')]),
        node,
        _change_state(node, Transition.TRANSITION_CONFIGURE),
    ]


def generate_launch_description() -> LaunchDescription:
    arguments = [argument for argument in _camera_launch().declare_arguments()
                 if argument.name != 'use_sim_time']  # always true here
    return LaunchDescription([
        DeclareLaunchArgument('bag', description='rosbag2 folder (or file) to play'),
        DeclareLaunchArgument('rate', default_value='1.0', description='playback rate'),
        *arguments,
        OpaqueFunction(function=_launch),
    ])
