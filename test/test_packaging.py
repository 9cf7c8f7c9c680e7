"""The ROS 2 package builds with colcon (from PyPI, no ROS) into the expected install tree.

colcon builds a copy of the package's sources with a user's own export planted in models/, so
the test also shows what the install tree leaves out.
"""

import os
from pathlib import Path
import shutil
import stat
import subprocess
import sys

import pytest

from anomaly_seg_node.artifact import read_sidecar

REPO = Path(__file__).resolve().parents[1]
# What setup.py reads; models/ is assembled by the fixture.
SOURCES = ('setup.py', 'setup.cfg', 'package.xml', 'resource', 'launch', 'config',
           'anomaly_seg_node', 'anomaly_seg_tools', 'training')
SHIPPED_MODELS = ('demo.card.json', 'demo.json', 'demo.onnx')
USER_EXPORTS = ('mine.json', 'mine.onnx', 'mine.pt2', 'mine.card.json')


def _colcon() -> str:
    candidate = Path(sys.executable).with_name('colcon')
    found = str(candidate) if candidate.exists() else shutil.which('colcon')
    if found is None:
        pytest.fail('colcon is not installed: pip install -r requirements-dev.txt')
    return found


def _source(install_tree: Path) -> Path:
    return install_tree.parents[1] / 'src' / 'anomaly_seg'


@pytest.fixture(scope='module')
def install_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp('colcon')
    source = base / 'src' / 'anomaly_seg'
    source.mkdir(parents=True)
    ignore = shutil.ignore_patterns('__pycache__', '*.egg-info')
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    (source / 'models').mkdir()
    for name in sorted(p.name for p in (REPO / 'models').iterdir() if p.is_file()):
        (source / 'models' / name).symlink_to(REPO / 'models' / name)
    for name in USER_EXPORTS:
        (source / 'models' / name).write_text('a user export, not part of the package')
    result = subprocess.run(
        [_colcon(), '--log-base', str(base / 'log'), 'build', '--base-paths', str(source),
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


def test_scripts_run_the_python_of_the_environment(install_tree: Path) -> None:
    """colcon from /usr/bin wrote '#!/usr/bin/python3', so a node installed beside a virtual
    environment ran outside it and found no onnxruntime; setup.cfg's [build_scripts]
    executable makes it the first python3 on PATH, the activated environment's."""
    for name in ('anomaly_seg_node', 'anomaly-seg'):
        script = install_tree / 'lib' / 'anomaly_seg' / name
        assert script.read_text().splitlines()[0] == '#!/usr/bin/env python3', script


def test_installed_command_runs_with_the_python3_on_path(install_tree: Path,
                                                         tmp_path: Path) -> None:
    # A python3 first on PATH (as in an activated environment) that notes it was used.
    used = tmp_path / 'used'
    python3 = tmp_path / 'bin' / 'python3'
    python3.parent.mkdir()
    python3.write_text(f'#!/bin/sh\necho "$@" > {used}\nexec {sys.executable} "$@"\n')
    python3.chmod(python3.stat().st_mode | stat.S_IXUSR)
    site = next((install_tree / 'lib').glob('python3*/site-packages'))
    env = {**os.environ, 'PYTHONPATH': str(site),
           'PATH': f'{python3.parent}{os.pathsep}{os.environ.get("PATH", "")}'}
    script = install_tree / 'lib' / 'anomaly_seg' / 'anomaly-seg'
    result = subprocess.run([str(script), '--help'], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'synth' in result.stdout
    assert used.read_text().split() == [str(script), '--help']


def test_share_holds_manifest_launch_and_config(install_tree: Path) -> None:
    share = install_tree / 'share' / 'anomaly_seg'
    source = _source(install_tree)  # the copy colcon built, not the tree others may be editing
    assert (share / 'package.xml').read_bytes() == (source / 'package.xml').read_bytes()
    for folder in ('launch', 'config'):
        sources = sorted(p.name for p in (source / folder).iterdir() if p.is_file())
        assert sources, f'{folder}/ of the repository is empty'
        for name in sources:
            installed = share / folder / name
            assert installed.is_file(), f'{folder}/{name} is not installed under share/'
            assert installed.read_bytes() == (source / folder / name).read_bytes()


def test_share_holds_the_shipped_models_only(install_tree: Path) -> None:
    """setup.py once installed every .json/.onnx/.pt2 in models/, a user's exports included."""
    models = install_tree / 'share' / 'anomaly_seg' / 'models'
    assert sorted(p.name for p in models.iterdir()) == list(SHIPPED_MODELS)
    for name in SHIPPED_MODELS:
        assert (models / name).stat().st_size == (REPO / 'models' / name).stat().st_size
    # The installed demo artifact is complete: every file its sidecar lists, hashes matching.
    sidecar = read_sidecar(models / 'demo.json')
    assert sidecar.formats == ('onnx',)


def test_ament_index_marker(install_tree: Path) -> None:
    marker = install_tree / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'anomaly_seg'
    assert marker.is_file()


def test_python_packages_installed(install_tree: Path) -> None:
    site = list((install_tree / 'lib').glob('python3*/site-packages'))
    assert len(site) == 1, site
    for module in ('anomaly_seg_tools/cli.py', 'anomaly_seg_node/node.py',
                   'anomaly_seg_node/labels.py', 'training/data/transforms.py'):
        assert (site[0] / module).is_file(), f'{module} missing from the install tree'
