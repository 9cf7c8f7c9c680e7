"""The launch files without ROS: launch, launch_ros and lifecycle_msgs are replaced by recorders
with the signatures of launch 3.4 / launch_ros 0.26 (Jazzy), and the actions the files create
are checked. replay.launch.py must not play the bag before the node is active (the first frames
used to get no output): the player starts paused and is resumed only on the node's transition
to active, which the launch drives on a LifecycleNode action."""

import importlib.util
from pathlib import Path
import sys
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TRANSITION_CONFIGURE, TRANSITION_ACTIVATE = 1, 3  # lifecycle_msgs/msg/Transition


class Recorded:
    """An action, substitution or event: what it was made with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration(Recorded):
    def __init__(self, variable_name: str, *, default: Any = None) -> None:
        super().__init__(variable_name)
        self.name = variable_name

    def perform(self, context: Any) -> str:
        return context.launch_configurations[self.name]  # KeyError: not declared


class DeclareLaunchArgument(Recorded):
    def __init__(self, name: str, *, default_value: Any = None, description: str = '',
                 choices: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(name, default_value=default_value, description=description,
                         choices=choices, **kwargs)
        self.name = name


class Node(Recorded):
    def __init__(self, *, executable: str, package: str | None = None, name: str | None = None,
                 namespace: str | None = None, parameters: list[Any] | None = None,
                 remappings: list[tuple[str, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(executable=executable, package=package, name=name,
                         namespace=namespace, parameters=parameters, remappings=remappings,
                         **kwargs)


class LifecycleNode(Node):
    def __init__(self, *, name: str, namespace: str, **kwargs: Any) -> None:
        super().__init__(name=name, namespace=namespace, **kwargs)


class OnStateTransition(Recorded):
    def __init__(self, *, entities: list[Any], target_lifecycle_node: Any = None,
                 transition: str | None = None, start_state: str | None = None,
                 goal_state: str | None = None, matcher: Any = None,
                 handle_once: bool = False) -> None:
        if not isinstance(target_lifecycle_node, (LifecycleNode, type(None))):
            raise RuntimeError("OnStateTransition requires a 'LifecycleNode' action as the target")
        super().__init__(entities=entities, target_lifecycle_node=target_lifecycle_node,
                         transition=transition, start_state=start_state, goal_state=goal_state,
                         matcher=matcher, handle_once=handle_once)


class ChangeState(Recorded):
    def __init__(self, *, lifecycle_node_matcher: Any, transition_id: int) -> None:
        super().__init__(lifecycle_node_matcher=lifecycle_node_matcher,
                         transition_id=transition_id)


def _module(name: str, **attributes: Any) -> ModuleType:
    module = ModuleType(name)
    module.__dict__.update(attributes)
    return module


def _keywords_only(name: str) -> type:
    def init(self: Recorded, **kwargs: Any) -> None:
        Recorded.__init__(self, **kwargs)
    return type(name, (Recorded,), {'__init__': init})


@pytest.fixture
def fake_ros(monkeypatch: pytest.MonkeyPatch) -> None:
    modules = {
        'launch': _module('launch', LaunchDescription=Recorded, LaunchContext=object),
        'launch.actions': _module(
            'launch.actions', DeclareLaunchArgument=DeclareLaunchArgument,
            OpaqueFunction=_keywords_only('OpaqueFunction'), EmitEvent=_keywords_only('EmitEvent'),
            ExecuteProcess=_keywords_only('ExecuteProcess'), LogInfo=_keywords_only('LogInfo'),
            RegisterEventHandler=type('RegisterEventHandler', (Recorded,), {}),
            Shutdown=_keywords_only('Shutdown'), IncludeLaunchDescription=Recorded),
        'launch.events': _module('launch.events',
                                 matches_action=lambda action: ('matches', action)),
        'launch.substitutions': _module('launch.substitutions',
                                        LaunchConfiguration=LaunchConfiguration,
                                        PathJoinSubstitution=Recorded),
        'launch.launch_description_sources': _module('launch.launch_description_sources',
                                                     PythonLaunchDescriptionSource=Recorded),
        'launch_ros': _module('launch_ros'),
        'launch_ros.actions': _module('launch_ros.actions', Node=Node,
                                      LifecycleNode=LifecycleNode),
        'launch_ros.substitutions': _module('launch_ros.substitutions',
                                            FindPackageShare=Recorded),
        'launch_ros.event_handlers': _module('launch_ros.event_handlers',
                                             OnStateTransition=OnStateTransition),
        'launch_ros.events': _module('launch_ros.events'),
        'launch_ros.events.lifecycle': _module('launch_ros.events.lifecycle',
                                               ChangeState=ChangeState),
        'lifecycle_msgs': _module('lifecycle_msgs'),
        'lifecycle_msgs.msg': _module('lifecycle_msgs.msg', Transition=SimpleNamespace(
            TRANSITION_CONFIGURE=TRANSITION_CONFIGURE, TRANSITION_ACTIVATE=TRANSITION_ACTIVATE)),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name.replace('.', '_'),
                                                  REPO / 'launch' / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(description: Recorded, **arguments: str) -> list[Any]:
    """The entities of the description's OpaqueFunction, with the declared defaults."""
    entities = description.args[0]
    values = {e.name: e.kwargs['default_value'] for e in entities
              if isinstance(e, DeclareLaunchArgument) and isinstance(
                  e.kwargs['default_value'], str)}
    values.update({'params_file': '/share/params.yaml'}, **arguments)
    opaque = entities[-1]
    return opaque.kwargs['function'](SimpleNamespace(launch_configurations=values))


def test_camera_launch_starts_a_self_activating_node(fake_ros: None) -> None:
    camera = _load('camera.launch.py')
    (node,) = _run(camera.generate_launch_description(), image_topic='/front/image_raw',
                   namespace='front')
    assert type(node) is Node  # not a LifecycleNode: the node drives its own transitions
    assert node.kwargs['namespace'] == 'front' and node.kwargs['name'] == 'anomaly_seg'
    assert node.kwargs['parameters'] == ['/share/params.yaml', {'use_sim_time': False}]
    assert node.kwargs['remappings'] == [('image', '/front/image_raw'),
                                         ('image/compressed', '/front/image_raw/compressed'),
                                         ('camera_info', '/front/camera_info')]
    (node,) = _run(camera.generate_launch_description(), artifact='/a/NAME.json')
    assert node.kwargs['parameters'][1] == {'use_sim_time': False, 'artifact': '/a/NAME.json'}


def test_each_camera_gets_its_own_output_namespace_by_default(fake_ros: None) -> None:
    """Outputs of a node in the root namespace landed on /overlay, /label_info, ...: a second
    camera published on the same topics."""
    camera = _load('camera.launch.py')
    description = camera.generate_launch_description()
    (argument,) = [e for e in description.args[0]
                   if isinstance(e, DeclareLaunchArgument) and e.name == 'namespace']
    assert argument.kwargs['default_value'] == 'auto'
    (node,) = _run(description)  # image_topic /camera/image_raw
    # Relative, so that a PushRosNamespace around the launch still applies; launch_ros makes
    # it /camera/anomaly_seg: outputs /camera/anomaly_seg/overlay, ...
    assert node.kwargs['namespace'] == 'camera/anomaly_seg'
    # Only the outputs move: the inputs are still the camera's topics.
    assert node.kwargs['remappings'] == [('image', '/camera/image_raw'),
                                         ('image/compressed', '/camera/image_raw/compressed'),
                                         ('camera_info', '/camera/camera_info')]
    namespaces = [_run(camera.generate_launch_description(), image_topic=topic)[0]
                  .kwargs['namespace'] for topic in ('/front/camera/image_raw', '/rear/image',
                                                     '/image_raw')]
    assert namespaces == ['front/camera/anomaly_seg', 'rear/anomaly_seg', 'anomaly_seg']
    # A relative camera topic is taken from the root, not from inside the node's namespace.
    (node,) = _run(camera.generate_launch_description(), image_topic='rear/image_raw')
    assert node.kwargs['namespace'] == 'rear/anomaly_seg'
    assert node.kwargs['remappings'][0] == ('image', '/rear/image_raw')
    assert node.kwargs['remappings'][2] == ('camera_info', '/rear/camera_info')
    # An explicit namespace is used as given: '/' keeps the old root namespace.
    (node,) = _run(camera.generate_launch_description(), namespace='/')
    assert node.kwargs['namespace'] == '/'
    assert camera.default_namespace('/a/b/image_raw/') == 'a/b/anomaly_seg'
    replay = _load('replay.launch.py')
    entities = _run(replay.generate_launch_description(), bag='/bags/drive')
    (node,) = [e for e in entities if isinstance(e, Node)]
    assert node.kwargs['namespace'] == 'camera/anomaly_seg'


def test_replay_resumes_the_bag_only_once_the_node_is_active(fake_ros: None) -> None:
    replay = _load('replay.launch.py')
    description = replay.generate_launch_description()
    names = [e.name for e in description.args[0] if isinstance(e, DeclareLaunchArgument)]
    assert names == ['bag', 'rate', 'image_topic', 'namespace', 'params_file', 'artifact']
    entities = _run(description, bag='/bags/drive')

    (node,) = [e for e in entities if isinstance(e, Node)]
    assert isinstance(node, LifecycleNode)
    assert node.kwargs['parameters'][1] == {'use_sim_time': True, 'autostart': False}
    (player,) = [e for e in entities if type(e).__name__ == 'ExecuteProcess']
    cmd = player.kwargs['cmd']
    assert cmd[:3] == ['ros2', 'bag', 'play'] and cmd[3].name == 'bag'
    assert '--clock' in cmd and '--start-paused' in cmd

    handlers = {(h.kwargs['start_state'], h.kwargs['goal_state']): h
                for h in (e.args[0] for e in entities
                          if type(e).__name__ == 'RegisterEventHandler')}
    assert all(h.kwargs['target_lifecycle_node'] is node for h in handlers.values())
    # The launch configures the node after starting it ...
    configure = entities[-1]
    assert entities.index(node) < len(entities) - 1
    assert configure.kwargs['event'].kwargs == {'lifecycle_node_matcher': ('matches', node),
                                                'transition_id': TRANSITION_CONFIGURE}
    # ... activates it once configured ...
    (activate,) = handlers['configuring', 'inactive'].kwargs['entities']
    assert activate.kwargs['event'].kwargs['transition_id'] == TRANSITION_ACTIVATE
    # ... and resumes the paused player once, when the node is active.
    active = handlers['activating', 'active']
    assert active.kwargs['handle_once']
    (resume,) = [e for e in active.kwargs['entities'] if type(e).__name__ == 'ExecuteProcess']
    assert resume.kwargs['cmd'] == ['ros2', 'service', 'call', '/rosbag2_player/resume',
                                    'rosbag2_interfaces/srv/Resume']
    # A node that cannot configure or activate ends the launch.
    for key in (('configuring', 'unconfigured'), ('activating', 'inactive')):
        (shutdown,) = handlers[key].kwargs['entities']
        assert type(shutdown).__name__ == 'Shutdown' and 'anomaly_seg failed' in (
            shutdown.kwargs['reason'])
