"""Collect the runtime tests where only requirements-runtime.txt and pytest are installed (a ROS
2 machine: `pytest -m ros`, `colcon test`).

A few modules here use test-only tools at module level (hypothesis, scikit-learn, onnx). Where
one is missing, the module is not imported at all: launch_testing's pytest plugin imports every
test module while collecting and a failed import there breaks the whole run. The terminal summary
lists what was left out and why.
"""

import ast
import importlib.util
from pathlib import Path

import pytest

# Imported by some test modules at module level; not part of requirements-runtime.txt.
TEST_ONLY = ('hypothesis', 'onnx', 'sklearn', 'threadpoolctl', 'torch')
HERE = Path(__file__).parent


def top_level_imports(path: Path) -> set[str]:
    """The root package names ``path`` imports at module level."""
    names = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split('.')[0])
    return names


def missing_test_tools(path: Path) -> list[str]:
    return sorted(name for name in top_level_imports(path) & set(TEST_ONLY)
                  if importlib.util.find_spec(name) is None)


LEFT_OUT = {path.name: missing for path in sorted(HERE.glob('test_*.py'))
            if (missing := missing_test_tools(path))}
collect_ignore = sorted(LEFT_OUT)


def pytest_terminal_summary(terminalreporter: 'pytest.TerminalReporter') -> None:
    for name, missing in LEFT_OUT.items():
        terminalreporter.write_line(
            f'not collected: test/runtime/{name} needs {", ".join(missing)} '
            '(pip install -r requirements-dev.txt)')
