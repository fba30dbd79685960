"""Linters as tests: flake8 (ament settings), pep257, and a strict package.xml parse."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY_DIRS = ['bluelm_ros', 'test', 'bench', 'nodes', 'setup.py']


def _run(args):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True)


def test_flake8():
    targets = [p for p in PY_DIRS if os.path.exists(os.path.join(ROOT, p))]
    r = _run([sys.executable, '-m', 'flake8', *targets])
    assert r.returncode == 0, r.stdout + r.stderr


def test_pep257():
    r = _run([sys.executable, '-m', 'pydocstyle', 'bluelm_ros'])
    assert r.returncode == 0, r.stdout + r.stderr


def test_package_xml_is_valid():
    from catkin_pkg.package import parse_package
    from lxml import etree
    path = os.path.join(ROOT, 'package.xml')
    etree.parse(path)  # well-formed XML (the xmllint part)
    pkg = parse_package(path)  # strict catkin_pkg validation, as colcon/bloom do
    pkg.validate()
    assert pkg.name == 'bluelm_ros'
    assert pkg.get_build_type() == 'ament_cmake'
    deps = {d.name for d in pkg.build_depends + pkg.exec_depends + pkg.buildtool_depends}
    for needed in ('rclpy', 'sensor_msgs', 'rosidl_default_generators', 'action_msgs'):
        assert needed in deps
