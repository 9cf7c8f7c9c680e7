"""Clean shutdown on SIGINT and SIGTERM (node_signals), without ROS: a process that runs the
node's main loop gets real signals at start, while spinning and again during its cleanup, and
still finishes the cleanup and exits 0 without a traceback. Before, the second SIGINT (Ctrl-C
reaches the whole process group, and ros2 launch forwards one more) raised KeyboardInterrupt
inside the cleanup and the process died with -2."""

import os
from pathlib import Path
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from anomaly_seg_node.node_signals import StopRequest, run_until_stopped

REPO = Path(__file__).resolve().parents[2]

# The shape of node.main(): start (create + autostart), spin in slices, finish (cleanup).
MAIN = """
import sys
import time

from anomaly_seg_node.node_signals import StopRequest, run_until_stopped

stop = StopRequest().install()
slow_start = sys.argv[1] == 'start'


def say(word):
    print(word, flush=True)


def start():
    say('starting')
    time.sleep(1.5 if slow_start else 0.0)  # a configure that takes a while
    say('started')


def finish():
    say('cleanup')
    time.sleep(1.0)  # destroying the subscription, joining the worker
    say('cleaned up')


run_until_stopped(stop, start=start, spin_once=time.sleep, ok=lambda: True, finish=finish)
say(f'stopped by {stop.reason} after {stop.signals} signals')
"""


class _Process:
    def __init__(self, script: Path, phase: str) -> None:
        env = {**os.environ, 'PYTHONPATH': str(REPO)}
        self.popen = subprocess.Popen([sys.executable, str(script), phase], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.put(line.strip())

    def wait_for(self, word: str, timeout: float = 30.0) -> None:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f'no {word!r} from the process within {timeout} s')
            if line == word:
                return

    def signal(self, signum: int) -> None:
        os.killpg(self.popen.pid, signum)

    def finish(self) -> tuple[int, list[str], str]:
        code = self.popen.wait(timeout=30)
        self.reader.join(timeout=10)
        stderr = self.popen.stderr.read()
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        return code, rest, stderr


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / 'main.py'
    path.write_text(textwrap.dedent(MAIN))
    return path


@pytest.mark.parametrize('phase, first, then', [
    ('spin', signal.SIGINT, (signal.SIGINT, signal.SIGINT)),  # Ctrl-C under ros2 launch
    ('spin', signal.SIGTERM, (signal.SIGINT,)),
    ('spin', signal.SIGINT, (signal.SIGTERM,)),  # launch escalates to SIGTERM
    ('start', signal.SIGINT, (signal.SIGINT,)),  # during configure
])
def test_signals_in_every_phase_end_in_a_clean_exit(script: Path, phase: str, first: int,
                                                    then: tuple[int, ...]) -> None:
    process = _Process(script, phase)
    try:
        process.wait_for('starting' if phase == 'start' else 'started')
        process.signal(first)
        process.wait_for('cleanup')
        for signum in then:
            time.sleep(0.05)  # the kernel merges a signal that is still pending
            process.signal(signum)
        code, rest, stderr = process.finish()
    finally:
        if process.popen.poll() is None:
            process.signal(signal.SIGKILL)
    assert code == 0, stderr
    assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr, stderr
    name = signal.Signals(first).name
    assert rest == ['cleaned up', f'stopped by {name} after {1 + len(then)} signals']


def test_finish_runs_once_also_when_start_fails() -> None:
    calls: list[str] = []

    def start() -> None:
        raise RuntimeError('node construction failed')

    with pytest.raises(RuntimeError, match='construction failed'):
        run_until_stopped(StopRequest(), start=start, spin_once=lambda t: calls.append('spin'),
                          ok=lambda: True, finish=lambda: calls.append('finish'))
    assert calls == ['finish']


def test_a_stop_requested_before_start_skips_start_and_spin() -> None:
    stop = StopRequest()
    stop.request('SIGINT')
    stop.request('SIGTERM')  # the first reason stays
    calls: list[str] = []
    run_until_stopped(stop, start=lambda: calls.append('start'),
                      spin_once=lambda t: calls.append('spin'), ok=lambda: True,
                      finish=lambda: calls.append('finish'))
    assert calls == ['finish'] and stop.reason == 'SIGINT'


def test_spins_until_the_context_is_gone() -> None:
    alive = [True, True, False]
    slices: list[float] = []
    run_until_stopped(StopRequest(), start=lambda: None, spin_once=slices.append,
                      ok=lambda: alive.pop(0), finish=lambda: None, poll_s=0.25)
    assert slices == [0.25, 0.25]


def test_install_and_restore_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest().install([signal.SIGTERM])
    try:
        assert signal.getsignal(signal.SIGTERM) == stop._on_signal
        os.kill(os.getpid(), signal.SIGTERM)  # handled between bytecodes of this thread
        assert stop.requested and stop.reason == 'SIGTERM' and stop.signals == 1
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before
