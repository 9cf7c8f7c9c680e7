"""The README's ROS test commands run where only requirements-runtime.txt is installed:
`python -m pytest -m ros test` collects without torch, hypothesis, scikit-learn or onnx (also
under launch_testing's pytest plugin, which imports every test module while collecting), and
`colcon test` picks pytest rather than unittest (which found 0 tests)."""

import importlib.util
from pathlib import Path
import subprocess
import sys
import textwrap

import pytest

REPO = Path(__file__).resolve().parents[2]
# Installed on the development machine, absent beside ROS with requirements-runtime.txt only.
NOT_IN_RUNTIME = ('torch', 'torchvision', 'torch_tensorrt', 'hypothesis', 'sklearn', 'onnx',
                  'onnxscript', 'threadpoolctl')

# launch_testing's pytest plugin (launch_testing/pytest/hooks.py, Jazzy) imports every module
# it is offered to find generate_test_description; an ImportError there is a collection error.
LAUNCH_TESTING_LIKE = """
from _pytest.pathlib import import_path


def pytest_pycollect_makemodule(module_path, parent):
    import_path(module_path, root=parent.config.rootpath, consider_namespace_packages=False)
"""

# sys.modules[name] = None: `import name` fails and importlib.util.find_spec(name) is None, as
# when the package is not installed.
RUN_PYTEST = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_pytest_m_ros_collects_with_only_the_runtime_requirements(tmp_path: Path) -> None:
    (tmp_path / 'launch_testing_like.py').write_text(textwrap.dedent(LAUNCH_TESTING_LIKE))
    code = RUN_PYTEST.format(blocked=NOT_IN_RUNTIME)
    # No plugin autoload: the plugins of the blocked packages (hypothesis) are not there either.
    env = {'PYTHONPATH': str(tmp_path), 'PATH': '/usr/bin:/bin', 'OMP_NUM_THREADS': '1',
           'PYTEST_DISABLE_PLUGIN_AUTOLOAD': '1'}
    result = subprocess.run(
        [sys.executable, '-c', code, '--collect-only', '-q', '-m', 'ros',
         '-p', 'no:cacheprovider', '-p', 'launch_testing_like', 'test'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    # 5: nothing selected here (the ros tests skip without rclpy); 2 would be collection errors.
    assert result.returncode in (0, 5), output
    assert 'ERROR' not in output and 'errors' not in output, output
    assert 'not collected: test/training needs torch' in output
    assert 'not collected: test/runtime/test_artifact.py needs hypothesis' in output
    assert 'not collected: test/runtime/test_metrics.py needs hypothesis, sklearn' in output


def test_runtime_conftest_reads_module_level_imports_only(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location('runtime_conftest',
                                                  Path(__file__).with_name('conftest.py'))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    module = tmp_path / 'test_x.py'
    module.write_text('import os.path\nfrom hypothesis import given\nimport sklearn.metrics as m\n'
                      'from . import local\n\ndef test():\n    import torch\n')
    assert conftest.top_level_imports(module) == {'os', 'hypothesis', 'sklearn'}


def test_colcon_test_runs_pytest() -> None:
    """colcon-core runs pytest only when setup.py declares it as a test dependency; otherwise
    `python -m unittest`, which finds none of these tests. setuptools >= 72 ignores
    tests_require ("Unknown distribution option"), so it has to be extras_require['test']."""
    pytest.importorskip('colcon_python_setup_py')
    from colcon_core.task.python.test import has_test_dependency
    from colcon_python_setup_py.package_identification.python_setup_py import (
        get_setup_information,
    )

    data = get_setup_information(REPO / 'setup.py')
    assert has_test_dependency(data, 'pytest'), (
        "setup.py needs extras_require={..., 'test': ['pytest']} for colcon test")
