"""Domain exceptions raised at the project's boundaries.

Each message says what was expected, what was found and how to fix it; the command line prints
the message without a traceback.
"""


class AnomalySegError(Exception):
    """Base class of every error the `anomaly-seg` command reports as a plain message."""


class DataError(AnomalySegError, ValueError):
    """A data set, label file or image on disk is missing or malformed."""


class ConfigError(AnomalySegError, ValueError):
    """A configuration file or override is malformed."""


class ArtifactError(AnomalySegError, ValueError):
    """A sidecar or its model files are missing, malformed or do not match."""


class ImageDecodeError(AnomalySegError, ValueError):
    """A sensor_msgs/Image or CompressedImage cannot be decoded."""


class BagError(AnomalySegError, ValueError):
    """A rosbag is missing, truncated, corrupt or lacks the needed topics."""


class BackendError(AnomalySegError, RuntimeError):
    """An inference backend is unavailable or was given input it cannot take."""
