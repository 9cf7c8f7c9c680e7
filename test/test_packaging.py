"""The ROS 2 package builds with colcon (from PyPI, no ROS) into the expected install tree."""

import os
from pathlib import Path
import shutil
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]


def _colcon() -> str:
    candidate = Path(sys.executable).with_name('colcon')
    found = str(candidate) if candidate.exists() else shutil.which('colcon')
    if found is None:
        pytest.fail('colcon is not installed: pip install -r requirements-dev.txt')
    return found


@pytest.fixture(scope='module')
def install_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp('colcon')
    result = subprocess.run(
        [_colcon(), '--log-base', str(base / 'log'), 'build', '--base-paths', str(REPO),
         '--build-base', str(base / 'build'), '--install-base', str(base / 'install'),
         '--event-handlers', 'console_direct-'],
        cwd=base, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return base / 'install' / 'anomaly_seg'


def test_executables_where_ros2_run_finds_them(install_tree: Path) -> None:
    for name in ('anomaly_seg_node', 'anomaly-seg'):
        script = install_tree / 'lib' / 'anomaly_seg' / name
        assert script.is_file(), f'{script} missing: check setup.cfg script_dir/install_scripts'
        assert script.stat().st_mode & 0o111, f'{script} is not executable'
        assert f"'console_scripts','{name}'" in script.read_text()


def test_installed_command_runs(install_tree: Path) -> None:
    site = next((install_tree / 'lib').glob('python3*/site-packages'))
    env = {**os.environ, 'PYTHONPATH': str(site)}
    script = install_tree / 'lib' / 'anomaly_seg' / 'anomaly-seg'
    result = subprocess.run([sys.executable, str(script), '--help'],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'synth' in result.stdout


def test_share_holds_manifest_launch_and_config(install_tree: Path) -> None:
    share = install_tree / 'share' / 'anomaly_seg'
    assert (share / 'package.xml').read_bytes() == (REPO / 'package.xml').read_bytes()
    for folder in ('launch', 'config'):
        sources = sorted(p.name for p in (REPO / folder).iterdir() if p.is_file())
        assert sources, f'{folder}/ of the repository is empty'
        for name in sources:
            installed = share / folder / name
            assert installed.is_file(), f'{folder}/{name} is not installed under share/'
            assert installed.read_bytes() == (REPO / folder / name).read_bytes()
    shipped = [p for p in (REPO / 'models').glob('*') if p.suffix in ('.json', '.onnx', '.pt2')]
    for artifact_file in shipped:
        installed = share / 'models' / artifact_file.name
        assert installed.is_file(), f'models/{artifact_file.name} is not installed under share/'
        assert installed.stat().st_size == artifact_file.stat().st_size


def test_ament_index_marker(install_tree: Path) -> None:
    marker = install_tree / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'anomaly_seg'
    assert marker.is_file()


def test_python_packages_installed(install_tree: Path) -> None:
    site = list((install_tree / 'lib').glob('python3*/site-packages'))
    assert len(site) == 1, site
    for module in ('anomaly_seg_node/cli.py', 'anomaly_seg_node/node.py',
                   'anomaly_seg_node/labels.py', 'training/data/transforms.py'):
        assert (site[0] / module).is_file(), f'{module} missing from the install tree'
