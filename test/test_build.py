"""The two install paths: `colcon build` in a fresh workspace, and `pip install .`."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.environ.get('VIRTUAL_ENV', sys.prefix)
NODES = ['segmentation_node', 'scene_qa_node', 'camera_source_node', 'bringup']


def _bash(script, cwd):
    return subprocess.run(['bash', '-c', script], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.skipif(shutil.which('colcon') is None, reason='colcon not installed')
def test_plain_colcon_build_in_a_fresh_workspace(tmp_path):
    src = tmp_path / 'ws' / 'src'
    src.mkdir(parents=True)
    os.symlink(ROOT, src / 'bluelm_ros')
    # A user's plain `colcon build`, only with the venv's ROS prefix on the paths.
    r = _bash(f'export AMENT_PREFIX_PATH={VENV} CMAKE_PREFIX_PATH={VENV}; '
              'colcon build --event-handlers console_direct- 2>&1 | tail -20',
              cwd=tmp_path / 'ws')
    install = tmp_path / 'ws' / 'install'
    assert (install / 'setup.bash').exists(), r.stdout + r.stderr
    # `ros2 run bluelm_ros <node>` looks in <prefix>/lib/bluelm_ros for executables.
    prefix = install / 'bluelm_ros'
    for node in NODES:
        exe = prefix / 'lib' / 'bluelm_ros' / node
        assert exe.exists() and os.access(exe, os.X_OK), node
    assert (prefix / 'share' / 'bluelm_ros' / 'launch').is_dir()
    assert (prefix / 'share' / 'bluelm_ros' / 'config').is_dir()
    r = _bash('. install/setup.bash && cd / && python -c "from bluelm_ros.srv import AskScene; '
              'import bluelm_ros.ros.interfaces, bluelm_ros; print(bluelm_ros.__file__)"',
              cwd=tmp_path / 'ws')
    assert r.returncode == 0, r.stdout + r.stderr
    assert str(install) in r.stdout


def test_pip_install_is_library_only_and_cannot_shadow_colcon(tmp_path):
    target = tmp_path / 'site'
    r = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps',
                        '--no-build-isolation', '--target', str(target), ROOT],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / 'bin' / 'bluelm-ros').exists()
    code = ('import bluelm_ros, bluelm_ros.ros.interfaces as i\n'
            'print(bluelm_ros.__file__)\n'
            'try:\n    i.load("srv")\nexcept i.InterfacesUnavailable as e:\n'
            '    print("NOIFACE", e)\n')
    env = dict(os.environ)
    # pip copy alone (ahead of everything): imports, has no interfaces, says how to fix it.
    env['PYTHONPATH'] = f'{target}'
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       cwd='/')
    assert str(target) in r.stdout and 'NOIFACE' in r.stdout and 'colcon' in r.stdout
    # Sourced colcon workspace in front (what setup.bash does): colcon's copy wins whole.
    env['PYTHONPATH'] = f'{os.environ.get("PYTHONPATH", "")}:{target}'
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       cwd='/')
    assert str(target) not in r.stdout and 'NOIFACE' not in r.stdout, r.stdout + r.stderr
