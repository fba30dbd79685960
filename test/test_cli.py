"""The bluelm-ros command line lists every command and reaches each module."""
import subprocess

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
