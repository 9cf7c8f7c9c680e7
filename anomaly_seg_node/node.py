"""The anomaly_seg ROS 2 node: rclpy glue over node_logic.NodeCore; the one module using rclpy.

A lifecycle node that configures and activates itself when ``autostart`` is true. rclpy only
manages publishers and swallows exceptions raised in transition callbacks, so every callback
catches, logs and returns FAILURE itself, and the subscription and worker are started and
stopped by hand. SIGINT and SIGTERM only set a flag (node_signals): the main loop spins in short
slices and then takes the lifecycle shutdown transition, so a second signal during the cleanup
cannot crash it. Written against rclpy of Humble and Jazzy, and vision_msgs 4 (Point2D in
Pose2D) for label_info and anomaly_objects.
"""

from collections.abc import Callable
import math
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from anomaly_seg_node.image_codec import ImageFields, to_message
from anomaly_seg_node.node_logic import (
    CAMERA_INFO_INPUT,
    CAMERA_INFO_OUTPUT,
    LABEL_INFO_TOPIC,
    CameraInfoOut,
    DiagnosticReport,
    LabelInfoOut,
    NodeCore,
    ObjectsOut,
    detection_array_message,
)
from anomaly_seg_node.node_params import PARAMS, ParamSpec
from anomaly_seg_node.node_signals import StopRequest, run_until_stopped
from anomaly_seg_node.objects import OBJECTS_TOPIC, message_classes
from anomaly_seg_node.pipeline import OUTPUTS

try:  # vision_msgs is optional: without it there are no label_info and anomaly_objects topics.
    import geometry_msgs.msg
    import vision_msgs.msg
    from vision_msgs.msg import Detection2DArray, LabelInfo, VisionClass

    _DETECTION_CLASSES = message_classes(vision_msgs.msg, geometry_msgs.msg)
except (ImportError, AttributeError):  # AttributeError: vision_msgs 3, without ObjectHypothesis
    Detection2DArray = LabelInfo = VisionClass = None
    _DETECTION_CLASSES = {}

_LEVELS = {0: DiagnosticStatus.OK, 1: DiagnosticStatus.WARN, 2: DiagnosticStatus.ERROR}
_SUCCESS, _FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


def _descriptor(spec: ParamSpec) -> ParameterDescriptor:
    descriptor = ParameterDescriptor(description=spec.description,
                                     additional_constraints=spec.constraints,
                                     read_only=spec.read_only,
                                     dynamic_typing=spec.dynamic_typing)
    if spec.value_range is not None:
        low, high = spec.value_range
        if spec.integer:
            descriptor.integer_range = [IntegerRange(from_value=int(low), to_value=int(high),
                                                     step=1)]
        else:
            descriptor.floating_point_range = [FloatingPointRange(
                from_value=float(low), to_value=float(high), step=0.0)]
    return descriptor


def _share_dir() -> str | None:
    try:
        from ament_index_python.packages import get_package_share_directory

        return get_package_share_directory('anomaly_seg')
    except (ImportError, LookupError):  # PackageNotFoundError is a KeyError
        return None


class _Transport:
    """What NodeCore needs from ROS: subscriber counts, publishing, the clock, the logger."""

    def __init__(self, node: LifecycleNode) -> None:
        self.node = node
        self.publishers: dict[str, Any] = {}

    def subscription_count(self, topic: str) -> int:
        publisher = self.publishers.get(topic)
        return publisher.get_subscription_count() if publisher is not None else 0

    def publish(self, topic: str,
                payload: ImageFields | CameraInfoOut | LabelInfoOut | ObjectsOut) -> None:
        publisher = self.publishers.get(topic)
        if publisher is None:
            return
        if isinstance(payload, ImageFields):
            publisher.publish(to_message(payload, Image))
        elif isinstance(payload, CameraInfoOut):
            source = payload.source
            msg = CameraInfo(height=payload.height, width=payload.width,
                             distortion_model=source.distortion_model, d=source.d, r=source.r,
                             k=payload.k, p=payload.p)
            msg.header = payload.header
            publisher.publish(msg)
        elif isinstance(payload, LabelInfoOut) and LabelInfo is not None:
            threshold = payload.threshold if math.isfinite(payload.threshold) else 0.0
            msg = LabelInfo(threshold=threshold, class_map=[
                VisionClass(class_id=i, class_name=name) for i, name in payload.class_map])
            msg.header.stamp = self.node.get_clock().now().to_msg()
            publisher.publish(msg)
        elif isinstance(payload, ObjectsOut) and Detection2DArray is not None:
            publisher.publish(detection_array_message(payload, _DETECTION_CLASSES))

    def now_ns(self) -> int:
        return self.node.get_clock().now().nanoseconds

    def log(self, level: str, message: str) -> None:
        # One call site per severity: rclpy refuses a severity change at the same call site.
        logger = self.node.get_logger()
        if level == 'error':
            logger.error(message)
        elif level == 'warning':
            logger.warning(message)
        else:
            logger.info(message)


class AnomalySegNode(LifecycleNode):
    """Camera frames in; semantic and anomaly masks and anomaly objects out (README, ROS 2
    usage)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('anomaly_seg', **kwargs)
        for spec in PARAMS:
            self.declare_parameter(spec.name, spec.default, _descriptor(spec))
        self._transport = _Transport(self)
        # The fully qualified name and the remapped topics tell cameras apart on /diagnostics.
        self._core = NodeCore(self._transport, name=self.get_fully_qualified_name(),
                              share_dir=_share_dir(), resolve_topic=self.resolve_topic_name)
        self._inputs: list[Any] = []
        self._told_no_vision_msgs = False
        # Registered after declaring: rclpy runs these callbacks for declarations too, and
        # the defaults and overrides are checked at configure instead.
        self.add_on_set_parameters_callback(self._on_set_parameters)
        # /diagnostics is a plain publisher: the state of an unconfigured node is news too.
        self._diagnostics = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diagnostics_timer = self.create_timer(1.0, self._publish_diagnostics)

    # Lifecycle ---------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Validate, load the artifact, warm up, create the publishers.

        FAILURE (with the reason logged) transitions back to "unconfigured".
        """
        try:
            values = {spec.name: self.get_parameter(spec.name).value for spec in PARAMS}
            self._core.configure(values)
            self._create_publishers()
        except Exception as error:  # rclpy would swallow it without a word
            self._transport.log('error', f'configure failed: {error}')
            self._destroy_publishers()
            if self._core.state == 'inactive':
                self._core.cleanup()
            return _FAILURE
        return _SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Enable the publishers, start the worker, subscribe; FAILURE stays "inactive"."""
        try:
            result = super().on_activate(state)
            if result != _SUCCESS:
                return result
            self._core.activate()
            self._subscribe()
            info = self._core.label_info()
            if info is not None:
                self._transport.publish(LABEL_INFO_TOPIC, info)
            config = self._core.config
            outputs = [*OUTPUTS, *([OBJECTS_TOPIC] if Detection2DArray is not None else [])]
            self._transport.log('info', f'active: {self.resolve_topic_name(config.input_topic)} '
                                f'({config.input_reliability}) -> {", ".join(outputs)} at '
                                f'{config.output_resolution} resolution, resize_mode '
                                f'{config.resize_mode}')
        except Exception as error:
            self._transport.log('error', f'activate failed: {error}')
            self._unsubscribe()
            if self._core.state == 'active':
                self._core.deactivate()
            super().on_deactivate(state)
            return _FAILURE
        return _SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Unsubscribe, stop the worker, disable the publishers."""
        try:
            self._unsubscribe()
            if self._core.state == 'active':
                self._core.deactivate()
        except Exception as error:
            self._transport.log('error', f'deactivate failed: {error}')
            return _FAILURE
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Free the model and destroy the publishers."""
        try:
            self._destroy_publishers()
            if self._core.state == 'inactive':
                self._core.cleanup()
        except Exception as error:
            self._transport.log('error', f'cleanup failed: {error}')
            return _FAILURE
        return _SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop()
        return _SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Free everything; SUCCESS goes back to "unconfigured"."""
        self._unsubscribe()
        self._core.reset()
        self._destroy_publishers()
        return _SUCCESS

    def autostart(self, proceed: Callable[[], bool] = lambda: True) -> None:
        """Configure, then activate when configure succeeded and ``proceed()`` (no stop was
        asked for meanwhile): the autostart parameter."""
        self.trigger_configure()
        # trigger_* return values differ across rclpy releases: read the core's state instead.
        if self._core.state == 'inactive' and proceed():
            self.trigger_activate()

    def shut_down(self) -> None:
        """The lifecycle shutdown transition (to finalized) from any primary state, then stop."""
        try:
            self.trigger_shutdown()
        except Exception as error:  # finalized already, or rclpy refuses: stop() still runs
            self._transport.log('warning', f'lifecycle shutdown transition failed: {error}')
        self.stop()

    def stop(self) -> None:
        """Unsubscribe, stop the worker, free the model; safe in any state and twice."""
        self._unsubscribe()
        self._core.shutdown()
        self._destroy_publishers()

    # Entities ----------------------------------------------------------------------------

    def _create_publishers(self) -> None:
        config, publishers = self._core.config, self._transport.publishers
        images = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                            reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.VOLATILE)
        for name in OUTPUTS:
            publishers[name] = self.create_lifecycle_publisher(Image, name, images)
        if config.output_resolution == 'network':
            publishers[CAMERA_INFO_OUTPUT] = self.create_lifecycle_publisher(
                CameraInfo, CAMERA_INFO_OUTPUT, images)
        if Detection2DArray is not None:
            # The newest frame's objects, like the images: keep last 1, reliable.
            publishers[OBJECTS_TOPIC] = self.create_lifecycle_publisher(
                Detection2DArray, OBJECTS_TOPIC, images)
        elif not self._told_no_vision_msgs:
            self._told_no_vision_msgs = True
            self._transport.log('warning', 'vision_msgs is not installed: no label_info and no '
                                'anomaly_objects topics (the image outputs work); install '
                                'ros-$ROS_DISTRO-vision-msgs')
        if LabelInfo is not None:
            latched = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                                 reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
            publishers[LABEL_INFO_TOPIC] = self.create_lifecycle_publisher(
                LabelInfo, LABEL_INFO_TOPIC, latched)

    def _destroy_publishers(self) -> None:
        publishers, self._transport.publishers = self._transport.publishers, {}
        for publisher in publishers.values():
            self.destroy_lifecycle_publisher(publisher)

    def _subscribe(self) -> None:
        config = self._core.config
        reliability = (ReliabilityPolicy.RELIABLE if config.input_reliability == 'reliable'
                       else ReliabilityPolicy.BEST_EFFORT)
        qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=reliability,
                         durability=DurabilityPolicy.VOLATILE)
        core = self._core
        if config.input_transport == 'compressed':
            self._inputs.append(self.create_subscription(
                CompressedImage, config.input_topic,
                lambda msg: core.on_message(msg, compressed=True), qos))
        else:
            self._inputs.append(self.create_subscription(
                Image, config.input_topic, core.on_message, qos))
        # camera_info always: network/camera_info needs it, and its stamps give the camera rate
        # against which lost frames are counted. Best effort matches every camera_info publisher.
        info_qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                              reliability=ReliabilityPolicy.BEST_EFFORT,
                              durability=DurabilityPolicy.VOLATILE)
        self._inputs.append(self.create_subscription(
            CameraInfo, CAMERA_INFO_INPUT, core.on_camera_info, info_qos))

    def _unsubscribe(self) -> None:
        subscriptions, self._inputs = self._inputs, []
        for subscription in subscriptions:
            self.destroy_subscription(subscription)

    # Callbacks ---------------------------------------------------------------------------

    def _on_set_parameters(self, parameters: list[Any]) -> SetParametersResult:
        reason = self._core.update_parameters({p.name: p.value for p in parameters})
        return SetParametersResult(successful=reason is None, reason=reason or '')

    def _publish_diagnostics(self) -> None:
        report: DiagnosticReport = self._core.diagnostics()
        status = DiagnosticStatus(level=_LEVELS[report.level], name=report.name,
                                  message=report.message, hardware_id=report.hardware_id,
                                  values=[KeyValue(key=k, value=v) for k, v in report.values])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics.publish(array)


def main(args: list[str] | None = None) -> None:
    """`ros2 run anomaly_seg anomaly_seg_node`: spin until SIGINT or SIGTERM, then shut down
    cleanly (exit code 0) whatever the state and however many signals come."""
    # Before rclpy.init, so that a signal during the start is a stop request too.
    stop = StopRequest().install()
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    executor = SingleThreadedExecutor()
    nodes: list[AnomalySegNode] = []

    def start() -> None:
        node = AnomalySegNode()
        nodes.append(node)
        executor.add_node(node)
        if node.get_parameter('autostart').value:
            node.autostart(proceed=lambda: not stop.requested)

    def spin_once(timeout_s: float) -> None:
        try:
            executor.spin_once(timeout_sec=timeout_s)
        except ExternalShutdownException:
            stop.request('the ROS context was shut down')

    def finish() -> None:
        try:
            for node in nodes:
                node.get_logger().info(
                    f'shutting down ({stop.reason})' if stop.reason else 'shutting down')
                node.shut_down()
                executor.remove_node(node)
                node.destroy_node()
        finally:
            executor.shutdown()
            rclpy.try_shutdown()

    run_until_stopped(stop, start=start, spin_once=spin_once, ok=rclpy.ok, finish=finish)


if __name__ == '__main__':
    main()
