"""The node's frame hand-off without ROS: the newest-frame slot and the worker thread
(node_worker)."""

from collections.abc import Iterator
import functools
import threading
import time
from typing import Any

import pytest

from anomaly_seg_node.node_worker import FrameWorker, NewestFrameSlot


def _wait(predicate: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, 'timed out'
        time.sleep(0.005)


# Newest-frame slot and worker ---------------------------------------------------------------

def test_slot_keeps_the_newest_and_counts_drops() -> None:
    slot = NewestFrameSlot()
    assert slot.take(timeout=0.01) is None
    assert slot.put('a') is False
    assert slot.put('b') is True
    assert slot.put('c') is True
    assert (slot.received, slot.dropped) == (3, 2)
    assert slot.take() == 'c'
    assert slot.take(timeout=0.01) is None


def test_slot_close_wakes_a_waiting_taker() -> None:
    slot = NewestFrameSlot()
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(slot.take()))
    thread.start()
    time.sleep(0.05)
    slot.close()
    thread.join(2)
    assert not thread.is_alive() and got == [None]


def test_slot_wait_empty_and_close() -> None:
    slot = NewestFrameSlot()
    assert slot.wait_empty(timeout=0.01)
    slot.put('a')
    assert not slot.wait_empty(timeout=0.01)
    taker = threading.Timer(0.05, slot.take)
    taker.start()
    assert slot.wait_empty(timeout=5)  # woken by the take
    taker.join()
    slot.put('b')
    slot.close()
    assert not slot.wait_empty(timeout=0.01)  # closed: nothing will be handed on
    slot.put('c')  # a stage finishing after the close
    assert slot.take(timeout=0.01) is None


def test_worker_survives_errors_and_stops() -> None:
    slot = NewestFrameSlot()
    handled: list[int] = []
    errors: list[BaseException] = []

    def handle(item: int) -> None:
        if item == 1:
            raise ValueError('bad frame')
        handled.append(item)

    worker = FrameWorker(slot, [handle], errors.append)
    worker.start()
    assert [thread.name for thread in worker.threads] == ['anomaly_seg_worker']
    slot.put(1)
    _wait(lambda: errors)
    slot.put(2)
    _wait(lambda: handled)
    assert handled == [2] and str(errors[0]) == 'bad frame'
    assert worker.stop(timeout=2) and not worker.alive


def test_a_worker_needs_a_stage() -> None:
    with pytest.raises(ValueError, match='at least one stage'):
        FrameWorker(NewestFrameSlot(), [], print)


# Stages on their own threads ---------------------------------------------------------------

STAGES = ('prepare', 'infer', 'publish')


class FakeStages:
    """Three stages that pass the frame number on and record it. ``hold(stage, frame)`` keeps
    that frame in that stage until the returned event is set; ``entered`` and ``left`` say
    when a frame came into and out of a stage; ``fail`` = (stage, frame) raises there."""

    def __init__(self, fail: tuple[str, int] | None = None) -> None:
        self.fail = fail
        self.published: list[int] = []
        self._lock = threading.Lock()
        self._gates: dict[tuple[str, int], threading.Event] = {}
        self._entered: dict[tuple[str, int], threading.Event] = {}
        self._left: dict[tuple[str, int], threading.Event] = {}
        self._running: set[tuple[str, int]] = set()

    def _event(self, table: dict[tuple[str, int], threading.Event], key: tuple[str, int]
               ) -> threading.Event:
        with self._lock:
            return table.setdefault(key, threading.Event())

    def hold(self, stage: str, frame: int) -> threading.Event:
        return self._event(self._gates, (stage, frame))

    def entered(self, stage: str, frame: int) -> threading.Event:
        return self._event(self._entered, (stage, frame))

    def left(self, stage: str, frame: int) -> threading.Event:
        return self._event(self._left, (stage, frame))

    def running(self) -> set[tuple[str, int]]:
        with self._lock:
            return set(self._running)

    def _run(self, stage: str, frame: int) -> int | None:
        key = (stage, frame)
        with self._lock:
            self._running.add(key)
            gate = self._gates.get(key)
        self.entered(stage, frame).set()
        if gate is not None:
            assert gate.wait(10)
        with self._lock:
            self._running.discard(key)
        self.left(stage, frame).set()
        if self.fail == key:
            raise ValueError(f'bad frame {frame} in {stage}')
        if stage == 'publish':
            self.published.append(frame)
        return None if stage == 'prepare' and frame % 5 == 4 else frame  # 4, 9: rejected

    def stages(self) -> list[Any]:
        return [functools.partial(self._run, stage) for stage in STAGES]


@pytest.fixture
def staged() -> Iterator[tuple[NewestFrameSlot, FakeStages, FrameWorker, list[BaseException]]]:
    slot, fake, errors = NewestFrameSlot(), FakeStages(), []
    worker = FrameWorker(slot, fake.stages(), errors.append, name='w')
    yield slot, fake, worker, errors
    worker.stop(timeout=5)
    assert not any(thread.is_alive() for thread in worker.threads)


def test_stages_overlap_and_the_first_takes_the_newest_frame(staged: Any) -> None:
    slot, fake, worker, errors = staged
    publish_0, infer_1 = fake.hold('publish', 0), fake.hold('infer', 1)
    worker.start()
    assert [thread.name for thread in worker.threads] == ['w_0', 'w_1', 'w_2']
    slot.put(0)
    assert fake.entered('publish', 0).wait(5)
    slot.put(1)
    assert fake.entered('infer', 1).wait(5)
    slot.put(2)
    assert fake.left('prepare', 2).wait(5)
    # Three frames in three stages at once: 2 prepared while 1 is inferred and 0 published.
    assert fake.running() == {('publish', 0), ('infer', 1)}
    # 2 waits for inference, so the first stage takes nothing: 3 waits in the slot and 5
    # replaces it (4 would be rejected by the fake, so it is not used here).
    slot.put(3)
    slot.put(5)
    assert (slot.received, slot.dropped) == (5, 1)
    infer_1.set()
    publish_0.set()
    _wait(lambda: len(fake.published) == 4)
    assert fake.published == [0, 1, 2, 5]
    assert not fake.entered('prepare', 3).is_set()
    assert errors == [] and worker.alive


def test_stages_keep_the_order_of_the_frames(staged: Any) -> None:
    slot, fake, worker, errors = staged
    worker.start()
    for frame in range(20):
        slot.put(frame)
        assert slot.wait_empty(timeout=5)  # taken: no frame is dropped in the slot
    _wait(lambda: len(fake.published) == 16)
    # every frame but those the first stage ends (None), in order
    assert fake.published == [f for f in range(20) if f % 5 != 4]
    assert slot.dropped == 0 and errors == []


@pytest.mark.parametrize('stage', STAGES)
def test_an_error_in_a_stage_drops_that_frame_only(stage: str) -> None:
    slot, fake, errors = NewestFrameSlot(), FakeStages(fail=(stage, 1)), []
    worker = FrameWorker(slot, fake.stages(), errors.append)
    worker.start()
    try:
        slot.put(0)
        _wait(lambda: fake.published == [0])
        slot.put(1)
        _wait(lambda: errors)
        slot.put(2)
        _wait(lambda: len(fake.published) == 2)
        assert fake.published == [0, 2]
        assert [str(error) for error in errors] == [f'bad frame 1 in {stage}']
        assert worker.alive
    finally:
        assert worker.stop(timeout=5)


def test_stop_while_stages_are_busy(staged: Any) -> None:
    slot, fake, worker, errors = staged
    publish_0, infer_1 = fake.hold('publish', 0), fake.hold('infer', 1)
    worker.start()
    slot.put(0)
    assert fake.entered('publish', 0).wait(5)
    slot.put(1)
    assert fake.entered('infer', 1).wait(5)
    slot.put(2)
    assert fake.left('prepare', 2).wait(5)  # 2 waits between prepare and infer
    slot.put(3)  # and 3 in the slot
    assert not worker.stop(timeout=0.05)  # two stages are still busy with their frame
    assert not worker.alive
    infer_1.set()
    publish_0.set()
    assert worker.stop(timeout=5)
    assert not any(thread.is_alive() for thread in worker.threads)
    # the frames inside a stage finished it; those between stages were discarded
    assert fake.published == [0] and fake.left('infer', 1).is_set()
    assert not fake.entered('infer', 2).is_set() and not fake.entered('prepare', 3).is_set()
    assert errors == []
