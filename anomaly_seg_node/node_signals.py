"""Clean shutdown on SIGINT and SIGTERM in every state, without ROS.

rclpy's default handlers (``rclpy.init`` installs them) chain SIGINT to Python's, which raises
KeyboardInterrupt wherever the main thread happens to be, and shut the context down from another
thread. Ctrl-C in a terminal reaches every process of the group and ros2 launch forwards one more
SIGINT, so the second one used to land inside the cleanup of the first (``destroy_subscription``)
and the process died of it. The node therefore calls ``rclpy.init`` with
``SignalHandlerOptions.NO``, installs ``StopRequest`` (a signal only sets a flag, however often it
comes) and spins in short slices with ``run_until_stopped``, which checks the flag between slices
and always runs the cleanup once, with the context still valid.
"""

from collections.abc import Callable, Iterable
import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_S = 0.1  # longest wait between a signal and the start of the cleanup


class StopRequest:
    """Records stop signals instead of raising; the main loop asks ``requested``."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.signals = 0  # how many stop signals came, the first one included
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def install(self, signals: Iterable[int] = STOP_SIGNALS) -> 'StopRequest':
        """Handle ``signals`` from now on (call from the main thread, before rclpy.init)."""
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def restore(self) -> None:
        """Put back the handlers that ``install`` replaced."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def request(self, reason: str) -> None:
        """Ask for a stop (the first reason is kept)."""
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        self.request(signal.Signals(signum).name)


def run_until_stopped(stop: StopRequest, *, start: Callable[[], None],
                      spin_once: Callable[[float], None], ok: Callable[[], bool],
                      finish: Callable[[], None], poll_s: float = POLL_S) -> None:
    """``start()``, then ``spin_once(poll_s)`` until a stop is requested or ``ok()`` turns false;
    ``finish()`` runs exactly once in every case, also when ``start`` or ``spin_once`` raise."""
    try:
        if not stop.requested:
            start()
        while not stop.requested and ok():
            spin_once(poll_s)
    finally:
        finish()
