"""Runtime of anomaly_seg: sidecar reader, backends, image conversion, pipeline, metrics, node.

Kept empty of imports so the ROS-free modules load without rclpy or torch.
"""
