"""The training tests need torch; without it (a ROS 2 machine with only requirements-runtime.txt:
`pytest -m ros`, `colcon test`) none of them is imported, since launch_testing's pytest plugin
imports every test module while collecting and a failed import there breaks the whole run."""

import importlib.util

import pytest

HAS_TORCH = importlib.util.find_spec('torch') is not None
collect_ignore_glob = [] if HAS_TORCH else ['test_*.py']


def pytest_terminal_summary(terminalreporter: 'pytest.TerminalReporter') -> None:
    if not HAS_TORCH:
        terminalreporter.write_line('not collected: test/training needs torch '
                                    '(pip install -r requirements.txt)')


if HAS_TORCH:
    @pytest.fixture(scope='module')
    def one_thread():
        """One intra-op thread for the module's tests (restored afterwards): on shared 2-core
        machines several threads per tiny convolution cost ~8x in wall time."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)
