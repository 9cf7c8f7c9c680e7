"""The import contract of DESIGN.md, read from the source (AST) and checked in a fresh interpreter.

- `anomaly_seg_node` is the vehicle runtime: no module of it imports `training` or the command
  package `anomaly_seg_tools`, not even inside a function.
- Only `anomaly_seg_node/node.py` imports rclpy and the ROS 2 message packages.
- torch appears only in the torch/TensorRT backends (`backends.py`) and the engine builder
  (`build_engine.py`), and there only inside functions; torch_tensorrt and tensorrt are never
  imported by statement, only through `backends.import_tensorrt` (which turns a build that does
  not load into a reason); onnxruntime only inside functions.
- `anomaly_seg_tools` (the `anomaly-seg` command, demo, bench) imports `training` and torch only
  inside functions, and `anomaly-seg --help` loads neither torch nor the synthetic generators.
"""

import ast
from collections.abc import Iterator
import os
from pathlib import Path
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNTIME = REPO / 'anomaly_seg_node'
TOOLS = REPO / 'anomaly_seg_tools'
TORCH = ('torch', 'torch_tensorrt', 'tensorrt')
TORCH_MODULES = ('backends.py', 'build_engine.py')
NODE_MODULE = 'node.py'


def _is_ros(root: str) -> bool:
    return root in ('rclpy', 'ament_index_python') or root.endswith(('_msgs', '_interfaces'))


def imports(path: Path) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, inside a function) of every import statement in `path`."""
    tree = ast.parse(path.read_text(encoding='utf-8'), filename=str(path))

    def walk(node: ast.AST, in_function: bool) -> Iterator[tuple[str, int, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child.lineno, in_function
            elif isinstance(child, ast.ImportFrom):
                if child.level == 0 and child.module:
                    yield child.module, child.lineno, in_function
            yield from walk(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    yield from walk(tree, False)


class Rule:
    """A check of one import: the reason it breaks the contract, or ''."""

    def __call__(self, filename: str, root: str, in_function: bool) -> str:
        raise NotImplementedError


class RuntimeRule(Rule):
    def __call__(self, filename: str, root: str, in_function: bool) -> str:
        if root in ('training', 'anomaly_seg_tools'):
            return 'the runtime never imports the workstation side or the command package'
        if _is_ros(root) and filename != NODE_MODULE:
            return f'only {NODE_MODULE} imports rclpy and ROS message packages'
        if root in ('torch_tensorrt', 'tensorrt'):
            return 'import TensorRT through backends.import_tensorrt (a broken build is a reason)'
        if root in TORCH:
            if filename not in TORCH_MODULES:
                return f'{root} belongs to the torch/TensorRT backends ({TORCH_MODULES}) only'
            if not in_function:
                return 'import it inside the function that needs it (lazily)'
        if root == 'onnxruntime' and not in_function:
            return 'import onnxruntime lazily, inside the backend'
        return ''


class ToolsRule(Rule):
    def __call__(self, filename: str, root: str, in_function: bool) -> str:
        if root in ('training', *TORCH) and not in_function:
            return 'the command package imports training and torch lazily (--help stays light)'
        if _is_ros(root):
            return 'the command package does not need ROS'
        return ''


def _violations(folder: Path, rule: Rule) -> list[str]:
    found = []
    for path in sorted(folder.glob('*.py')):
        for module, line, in_function in imports(path):
            why = rule(path.name, module.split('.')[0], in_function)
            if why:
                found.append(f'{path.relative_to(REPO)}:{line}: {module}: {why}')
    return found


def test_the_rules_see_lazy_and_module_level_imports(tmp_path: Path) -> None:
    source = tmp_path / 'example.py'
    source.write_text('import os\nfrom torch import nn\n\n\ndef f():\n    import torch_tensorrt\n'
                      '    from training.synth import bag\n\n\nclass C:\n    import rclpy\n\n'
                      '    def g(self):\n        from sensor_msgs.msg import Image\n')
    assert list(imports(source)) == [('os', 1, False), ('torch', 2, False),
                                     ('torch_tensorrt', 6, True), ('training.synth', 7, True),
                                     ('rclpy', 11, False), ('sensor_msgs.msg', 14, True)]
    rule = RuntimeRule()
    assert rule('backends.py', 'torch', False) == \
        'import it inside the function that needs it (lazily)'
    assert rule('backends.py', 'torch', True) == ''
    assert 'import_tensorrt' in rule('build_engine.py', 'torch_tensorrt', True)
    assert 'backends' in rule('pipeline.py', 'torch', True)
    assert rule('replay.py', 'training', True).startswith('the runtime never imports')
    assert rule('replay.py', 'anomaly_seg_tools', True).startswith('the runtime never imports')
    assert rule('node.py', 'rclpy', False) == rule('node.py', 'vision_msgs', False) == ''
    assert 'only node.py' in rule('node_logic.py', 'sensor_msgs', True)
    assert 'only node.py' in rule('node_logic.py', 'rcl_interfaces', True)


def test_runtime_imports_follow_the_contract() -> None:
    assert sorted(p.name for p in RUNTIME.glob('*.py'))  # the folder is there
    assert _violations(RUNTIME, RuntimeRule()) == []


def test_command_package_imports_training_and_torch_lazily() -> None:
    assert (TOOLS / 'cli.py').is_file()
    assert _violations(TOOLS, ToolsRule()) == []


def _fresh_python(code: str) -> str:
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_importing_the_runtime_loads_no_torch_training_or_ros() -> None:
    modules = sorted(p.stem for p in RUNTIME.glob('*.py')
                     if p.name not in (NODE_MODULE, '__init__.py'))
    loaded = _fresh_python(
        'import importlib, sys\n'
        f'for name in {modules!r}:\n'
        '    importlib.import_module("anomaly_seg_node." + name)\n'
        'print(" ".join(sorted(sys.modules)))\n').split()
    roots = {name.split('.')[0] for name in loaded}
    assert not roots & {'torch', 'torch_tensorrt', 'tensorrt', 'training', 'anomaly_seg_tools',
                        'rclpy', 'onnxruntime'}


@pytest.mark.parametrize('argv', [['--help'], ['synth', '--help'], ['replay', '--help']])
def test_help_loads_no_torch_and_no_generators(argv: list[str]) -> None:
    loaded = _fresh_python(
        'import contextlib, io, sys\n'
        'from anomaly_seg_tools import cli\n'
        'with contextlib.redirect_stdout(io.StringIO()) as out:\n'
        '    try:\n'
        f'        cli.main({argv!r})\n'
        '    except SystemExit:\n'
        '        pass\n'
        'assert "usage: anomaly-seg" in out.getvalue(), out.getvalue()\n'
        'print(" ".join(sorted(sys.modules)))\n').split()
    assert 'torch' not in loaded
    assert not {'training.synth.bag', 'training.synth.dataset', 'training.synth.scene',
                'training.train', 'training.evaluate'} & set(loaded)
    if argv == ['--help']:  # the bare help imports no subcommand module at all
        assert not {'training.synth.command', 'anomaly_seg_node.replay_command',
                    'anomaly_seg_tools.bench', 'anomaly_seg_tools.demo', 'cv2'} & set(loaded)


@pytest.mark.parametrize('module', ['anomaly_seg_tools', 'anomaly_seg_tools.cli'])
def test_python_dash_m_runs_the_command(module: str) -> None:
    result = subprocess.run([sys.executable, '-m', module, '--help'], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('usage: anomaly-seg ')
