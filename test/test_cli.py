"""The bluelm-ros command line lists every command and reaches each module."""
import subprocess
import sys

from bluelm_ros import cli


def test_every_command_has_help():
    parser = cli.build_parser()
    text = parser.format_help()
    for name in cli.COMMANDS:
        assert name in text


def test_passthrough_and_unknown_commands():
    r = subprocess.run(['bluelm-ros', 'vlm-convert', '--help'], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and 'llava' in r.stdout
    r = subprocess.run(['bluelm-ros', 'no-such-command'], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and 'invalid choice' in r.stderr
    assert cli.main([]) == 2


def test_subcommand_modules_are_imported_only_when_they_run():
    """`bluelm-ros --help` on a robot: no torch, no ROS, no subcommand module imported."""
    code = ('import sys\nfrom bluelm_ros import cli\ncli.build_parser().format_help()\n'
            'heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "rclpy", '
            '"onnx") or m.startswith(("bluelm_ros.tools", "bluelm_ros.ros")))\n'
            'assert not heavy, heavy\n')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       timeout=120, cwd='/')
    assert r.returncode == 0, r.stderr
    r = subprocess.run(['bluelm-ros', 'dsnet-eval', '--help'], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and '--dataset' in r.stdout, r.stdout + r.stderr
