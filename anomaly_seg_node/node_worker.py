"""The node's frame hand-off, without ROS: latency never grows with a queue.

``NewestFrameSlot`` keeps only the newest frame (a put replaces the pending one and counts it as
dropped). ``FrameWorker`` takes frames from it and runs each through its stages until stopped:
one stage is one thread that handles a frame from start to end; several are one thread each,
joined by one-frame slots, so that the stages of consecutive frames overlap (the node's
``overlap_stages``: decode and pre-processing of the next frame and post-processing and
publishing of the last one run while the current one is inferred). An exception from a stage is
reported and the frame dropped; the next frame is handled.
"""

from collections.abc import Callable, Sequence
import dataclasses
import threading
import time
from typing import Any

_POLL_S = 0.5  # how often an idle stage thread looks at the stop flag

# A stage takes what the one before returned (the first: a frame of the slot) and returns what
# the next one takes; None ends the frame there (rejected, or nothing to do).
Stage = Callable[[Any], Any]


@dataclasses.dataclass
class Frame:
    """An input message as it arrived: when (monotonic ns) and whether it is compressed."""

    msg: Any
    compressed: bool
    arrival_ns: int


class NewestFrameSlot:
    """A one-frame mailbox: a put replaces the pending frame (counted as dropped)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._closed = False
        self.received = 0
        self.dropped = 0

    def put(self, item: Any) -> bool:
        """Store ``item``; True when it replaced a frame nobody had taken (a drop)."""
        with self._cond:
            replaced = self._item is not None
            self.dropped += replaced
            self.received += 1
            self._item = item
            self._cond.notify_all()
        return replaced

    def take(self, timeout: float | None = None) -> Any:
        """The pending frame, waiting up to ``timeout`` s; None on timeout or once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout)
            if self._closed:
                return None
            item, self._item = self._item, None
            self._cond.notify_all()  # wakes wait_empty
            return item

    def wait_empty(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` s for the pending frame to be taken; True when the slot is
        empty and open."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is None or self._closed, timeout)
            return self._item is None and not self._closed

    def close(self) -> None:
        """Wake every taker; the pending frame is discarded."""
        with self._cond:
            self._closed = True
            self._item = None
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False
            self._item = None

    @property
    def closed(self) -> bool:
        return self._closed


class FrameWorker:
    """The threads that take frames from the slot and run them through ``stages`` until stopped.

    Stage ``i`` runs on its own thread and hands its result to stage ``i + 1`` through a
    one-frame slot. A stage thread takes its next frame only once the slot after it is empty, so
    that at most one frame waits between two stages and the first stage takes the newest frame
    of ``slot`` when the stage after it can use it. Frames leave in the order they were taken.
    An exception from a stage goes to ``on_error`` and drops that frame; the threads go on, so
    bad input or a failing frame never kills the worker.
    """

    def __init__(self, slot: NewestFrameSlot, stages: Sequence[Stage],
                 on_error: Callable[[BaseException], None],
                 name: str = 'anomaly_seg_worker') -> None:
        if not stages:
            raise ValueError('FrameWorker needs at least one stage')
        self.slot = slot
        self.stages = tuple(stages)
        self.on_error = on_error
        self._slots = [slot, *(NewestFrameSlot() for _ in self.stages[1:])]
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(index,), daemon=True,
                             name=name if len(self.stages) == 1 else f'{name}_{index}')
            for index in range(len(self.stages))]

    def start(self) -> None:
        self.slot.reopen()
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Close the slots and join; False when a thread is still busy after ``timeout``.

        A frame between two stages is discarded; one inside a stage finishes that stage."""
        self._stopping.set()
        for slot in self._slots:
            slot.close()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(max(deadline - time.monotonic(), 0.0))
        return not any(thread.is_alive() for thread in self._threads)

    @property
    def alive(self) -> bool:
        """Every stage thread runs (False once stopped, or when one died)."""
        return all(thread.is_alive() for thread in self._threads)

    @property
    def threads(self) -> tuple[threading.Thread, ...]:
        return tuple(self._threads)

    def _run(self, index: int) -> None:
        stage, source = self.stages[index], self._slots[index]
        target = self._slots[index + 1] if index + 1 < len(self._slots) else None
        while not self._stopping.is_set():
            if target is not None and not target.wait_empty(timeout=_POLL_S):
                continue
            item = source.take(timeout=_POLL_S)
            if item is None:
                continue
            try:
                result = stage(item)
            except Exception as error:  # logged and counted by on_error
                self.on_error(error)
                continue
            if target is not None and result is not None:
                target.put(result)
