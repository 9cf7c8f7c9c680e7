"""How the running node is doing, without ROS: the figures and conditions behind /diagnostics.

- ``FrameStats`` counts what became of the frames (since activation, and over the last
  ``WINDOW_S`` seconds) and keeps recent timings; every figure on /diagnostics except the
  totals comes from that window, so nothing stale is reported once frames stop coming.
- ``estimate_loss`` counts the frames that never reached the node from the gaps between the
  header stamps of those that did, against the camera's nominal period (``camera_rate``, the
  stamps of camera_info, or the shortest image stamp gaps).
- ``Condition`` is one reason for WARN or ERROR; the node shows every active one.
"""

from collections import deque
from collections.abc import Sequence
import dataclasses
import threading

import numpy as np

OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels
WINDOW_S = 5.0  # rates, timings, causes and losses are over this many recent seconds
OUTCOMES = ('processed', 'rejected_decode', 'rejected_stale', 'failed', 'skipped_unsubscribed')
# Outcomes that answer a frame: published, or deliberately not computed for nobody.
ANSWERED = frozenset({'processed', 'skipped_unsubscribed'})
LOSS_WARN_RATIO = 0.2  # share of frames lost before the node that makes a WARN
MIN_GAPS = 5  # stamp gaps needed before a period or a loss is estimated
MAX_GAP_PERIODS = 10  # a longer stamp gap is a discontinuity (camera restart, bag jump), not loss
_MAX_EVENTS = 4096  # per deque: 5 s at 800 frames per second


@dataclasses.dataclass(frozen=True)
class Condition:
    """One reason for a status above OK."""

    level: int
    text: str


@dataclasses.dataclass(frozen=True)
class LossEstimate:
    """Frames lost before the node over the window, from header stamp gaps."""

    received: int  # frames with a stamp that arrived in the window
    lost: int
    rate_hz: float  # the nominal camera rate the gaps were measured against
    source: str  # where that rate came from: camera_rate, camera_info or image stamps

    @property
    def ratio(self) -> float:
        total = self.received + self.lost
        return self.lost / total if total else 0.0


@dataclasses.dataclass(frozen=True)
class WindowSnapshot:
    """What the last ``window_s`` seconds looked like."""

    window_s: float
    arrived: int
    input_rate_hz: float
    output_rate_hz: float
    outcomes: dict[str, int]  # per OUTCOMES key, within the window
    timings: dict[str, float]  # processing/latency/infer _mean/_max of frames done in the window
    objects: dict[str, float]  # objects_per_frame _mean/_max of the window's frames that had any
    last_reasons: dict[str, str]  # per outcome: what the last one said (error, age)
    waiting_since_ns: int | None  # first arrival not answered since (None: all answered)
    image_stamps: tuple[int, ...]  # header stamps of the window's frames, in arrival order
    info_stamps: tuple[int, ...]  # header stamps of the window's camera_info messages


def _rate(times_ns: Sequence[int]) -> float:
    """Events per second between the first and the last of ``times_ns`` (0 for fewer than 2)."""
    if len(times_ns) < 2 or times_ns[-1] <= times_ns[0]:
        return 0.0
    return (len(times_ns) - 1) * 1e9 / (times_ns[-1] - times_ns[0])


def _positive_gaps(stamps: Sequence[int]) -> list[int]:
    return [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True) if b > a]


def nominal_period_ns(camera_rate_hz: float, info_stamps: Sequence[int],
                      image_stamps: Sequence[int]) -> tuple[float, str] | None:
    """The camera's frame period and where it came from, or None when it cannot be known.

    ``camera_rate`` when set; else the median gap of camera_info stamps (small messages that
    arrive when large images do not); else the 10th percentile of image stamp gaps, which is the
    period as long as a tenth of the frames that arrive are consecutive (an underestimate of the
    losses otherwise, never an overestimate).
    """
    if camera_rate_hz > 0:
        return 1e9 / camera_rate_hz, 'camera_rate'
    info_gaps = _positive_gaps(info_stamps)
    if len(info_gaps) >= MIN_GAPS:
        return float(np.median(info_gaps)), 'camera_info'
    image_gaps = _positive_gaps(image_stamps)
    if len(image_gaps) >= MIN_GAPS:
        return float(np.percentile(image_gaps, 10)), 'image stamps'
    return None


def estimate_loss(stamps: Sequence[int], period_ns: float) -> int:
    """Frames missing between consecutive ``stamps`` (ns, arrival order) of a ``period_ns`` camera.

    A gap of k periods hides k - 1 frames. Gaps that go backwards or last more than
    MAX_GAP_PERIODS periods are discontinuities (reordering, a looping bag, a camera restart).
    """
    lost = 0
    for gap in _positive_gaps(stamps):
        periods = round(gap / period_ns)
        if periods <= MAX_GAP_PERIODS:
            lost += max(0, periods - 1)
    return lost


def loss_estimate(snapshot: WindowSnapshot, camera_rate_hz: float) -> LossEstimate | None:
    """The window's losses before the node, or None without enough stamps to tell."""
    stamps = [s for s in snapshot.image_stamps if s > 0]
    period = nominal_period_ns(camera_rate_hz, [s for s in snapshot.info_stamps if s > 0],
                               stamps)
    if period is None or len(stamps) < 2 or period[0] <= 0:
        return None
    period_ns, source = period
    return LossEstimate(received=len(stamps), lost=estimate_loss(stamps, period_ns),
                        rate_hz=1e9 / period_ns, source=source)


class FrameStats:
    """Counters, the window's events and recent timings of the running node (thread-safe).

    Frames arrive on the executor thread (``arrived``) and end on the worker thread (``count``,
    ``done``); /diagnostics reads a ``snapshot`` from the executor thread.
    """

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(OUTCOMES, 0)  # since activation
        self._arrivals: deque[tuple[int, int]] = deque(maxlen=_MAX_EVENTS)  # (t, stamp)
        self._infos: deque[tuple[int, int]] = deque(maxlen=_MAX_EVENTS)  # camera_info (t, stamp)
        self._outcomes: deque[tuple[int, str]] = deque(maxlen=_MAX_EVENTS)
        # (t, processing ms, latency ms or None, infer ms or None, anomaly objects or None) of
        # published frames; objects None: not computed (nobody asked for them)
        self._done: deque[tuple[int, float, float | None, float | None, int | None]] = deque(
            maxlen=_MAX_EVENTS)
        self._reasons: dict[str, str] = {}
        self.last_arrival_ns: int | None = None
        self.waiting_since_ns: int | None = None

    def arrived(self, now_ns: int, stamp_ns: int = 0) -> None:
        with self._lock:
            self._arrivals.append((now_ns, stamp_ns))
            self.last_arrival_ns = now_ns
            if self.waiting_since_ns is None:
                self.waiting_since_ns = now_ns

    def camera_info(self, now_ns: int, stamp_ns: int) -> None:
        with self._lock:
            self._infos.append((now_ns, stamp_ns))

    def count(self, key: str, now_ns: int, reason: str = '') -> None:
        """A frame ended as ``key`` (one of OUTCOMES); ``reason`` says why, for /diagnostics."""
        with self._lock:
            self.counts[key] += 1
            self._outcomes.append((now_ns, key))
            if reason:
                self._reasons[key] = reason
            if key in ANSWERED:
                self.waiting_since_ns = None

    def done(self, now_ns: int, processing_ms: float, latency_ms: float | None,
             infer_ms: float | None, objects: int | None = None) -> None:
        """A frame was published; ``objects``: how many anomaly objects it had (None: they
        were not computed)."""
        with self._lock:
            self._done.append((now_ns, processing_ms, latency_ms, infer_ms, objects))
        self.count('processed', now_ns)

    def snapshot(self, now_ns: int) -> WindowSnapshot:
        with self._lock:
            start = now_ns - int(self.window_s * 1e9)
            arrivals = [(t, s) for t, s in self._arrivals if t >= start]
            done = [d for d in self._done if d[0] >= start]
            outcomes = dict.fromkeys(OUTCOMES, 0)
            for t, key in self._outcomes:
                if t >= start:
                    outcomes[key] += 1
            timings: dict[str, float] = {}
            for index, key in ((1, 'processing_ms'), (2, 'latency_ms'), (3, 'infer_ms')):
                values = [value for d in done if (value := d[index]) is not None]
                if values:
                    timings[f'{key}_mean'] = float(np.mean(values))
                    timings[f'{key}_max'] = float(np.max(values))
            counted = [count for d in done if (count := d[4]) is not None]
            objects = ({'objects_per_frame_mean': float(np.mean(counted)),
                        'objects_per_frame_max': float(np.max(counted))} if counted else {})
            return WindowSnapshot(
                window_s=self.window_s, arrived=len(arrivals),
                input_rate_hz=_rate([t for t, _ in arrivals]),
                output_rate_hz=_rate([d[0] for d in done]), outcomes=outcomes,
                timings=timings, objects=objects, last_reasons=dict(self._reasons),
                waiting_since_ns=self.waiting_since_ns,
                image_stamps=tuple(s for _, s in arrivals),
                info_stamps=tuple(s for t, s in self._infos if t >= start))


def stall_causes(snapshot: WindowSnapshot, max_input_age: float) -> list[str]:
    """Why the window's frames produced no output, from what became of them."""
    counts, reasons = snapshot.outcomes, snapshot.last_reasons
    causes = []
    if counts['rejected_decode']:
        causes.append(f'{counts["rejected_decode"]} frames could not be decoded '
                      f'({reasons.get("rejected_decode", "")})')
    if counts['rejected_stale']:
        causes.append(
            f'{counts["rejected_stale"]} frames were older than max_input_age '
            f'{max_input_age:g} s (the last {reasons.get("rejected_stale", "?")} old): '
            'use_sim_time? A bag played with --clock needs use_sim_time:=true; otherwise check '
            'the camera clock or raise max_input_age')
    if counts['failed']:
        causes.append(f'{counts["failed"]} frames failed ({reasons.get("failed", "")})')
    if not causes:
        causes.append('no frame finished processing (is inference stuck?)')
    return causes


def stall_condition(snapshot: WindowSnapshot, now_ns: int, input_topic: str,
                    max_input_age: float, output_timeout: float) -> Condition | None:
    """WARN when input arrived for a whole window and nothing was published; ERROR after
    ``output_timeout`` seconds of that (0: never ERROR)."""
    waiting = snapshot.waiting_since_ns
    if snapshot.arrived == 0 or waiting is None:
        return None
    stalled_s = (now_ns - waiting) / 1e9
    if stalled_s < snapshot.window_s:
        return None
    level = ERROR if 0 < output_timeout <= stalled_s else WARN
    causes = '; '.join(stall_causes(snapshot, max_input_age))
    return Condition(level, f'nothing published for {stalled_s:.1f} s while frames arrive on '
                     f'{input_topic} ({snapshot.input_rate_hz:.1f} Hz): {causes}')


def loss_condition(loss: LossEstimate | None, input_reliability: str) -> Condition | None:
    """WARN when more than LOSS_WARN_RATIO of the camera's frames never reach the node."""
    if loss is None or loss.lost < 2 or loss.ratio < LOSS_WARN_RATIO:
        return None
    fix = ('raise the DDS receive buffer (README, QoS and threading)'
           + (' or set input_reliability reliable' if input_reliability == 'best_effort' else ''))
    return Condition(WARN, f'about {loss.lost} of {loss.received + loss.lost} frames '
                     f'({100 * loss.ratio:.0f} %) never reached the node (header stamp gaps '
                     f'against {loss.rate_hz:.1f} Hz from {loss.source}); for large images '
                     f'{fix}')
