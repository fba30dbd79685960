"""The `bluelm-ros` command line: demo, export, conversion, training, evaluation, bringup.

Only the chosen subcommand's module is imported, after the command name is known, so
`bluelm-ros --help` and the runtime commands work on a robot without torch; a torch
command there says which extra to install.
"""
import argparse
from dataclasses import dataclass
import importlib
import sys


@dataclass(frozen=True)
class Command:
    """A subcommand: its module and one-line help.

    The module provides add_arguments(parser) and run(args), or, with ``passthrough``, its
    own main(argv) that parses the rest of the line (e.g. `bluelm-ros vlm-export --help`).
    """

    module: str
    help: str
    passthrough: bool = False


COMMANDS = {
    'dsnet-train': Command('bluelm_ros.tools.dsnet.train',
                           'train DSNet (synthetic scenes, Cityscapes, ADE20K)'),
    'dsnet-export': Command('bluelm_ros.tools.dsnet.export',
                            'official DSNet checkpoint -> static ONNX (FP32, optional INT8)'),
    'dsnet-eval': Command('bluelm_ros.tools.dsnet.evaluate',
                          'evaluate exported DSNet models (mIoU)'),
    'vlm-export': Command('bluelm_ros.tools.vlm.export',
                          'BlueLM-V model -> ONNX bundle (INT8 vision, INT4 decoder, manifest '
                          'with hashes)', passthrough=True),
    'vlm-convert': Command('bluelm_ros.tools.vlm.convert',
                           'convert a local HF checkpoint (see --help for the families) to '
                           "this project's format", passthrough=True),
    'vlm-eval': Command('bluelm_ros.tools.vlm.evaluate_bundle',
                        'score an exported bundle on held-out scene questions with the robot '
                        'runtime'),
    'vlm-train': Command('bluelm_ros.tools.vlm.train',
                         'train the scene-QA BlueLM-V model (synthetic scenes)'),
    'bringup': Command('bluelm_ros.ros.bringup',
                       'run segmentation + scene QA (+ demo camera) in one process from a YAML'),
    'demo': Command('bluelm_ros.ros.demo', 'the main job: both nodes on the shipped models, '
                    'answers and overlays written to a folder'),
}


def build_parser():
    """Return the top-level parser: command names and their help, no module imported."""
    parser = argparse.ArgumentParser(
        prog='bluelm-ros', description='DSNet segmentation and BlueLM-V scene QA for ROS 2.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    return parser


def main(argv=None):
    """Run the CLI; return the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    parser.parse_args(argv[:1])  # --help, or an unknown command: argparse says so and exits
    name, rest = argv[0], argv[1:]
    command = COMMANDS[name]
    try:
        module = importlib.import_module(command.module)
    except ImportError as exc:  # e.g. torch missing on a robot: say which extra to install
        print(f'bluelm-ros {name}: {exc} (install the extra: pip install "bluelm-ros[train]")',
              file=sys.stderr)
        return 2
    if command.passthrough:
        return module.main(rest) or 0
    sub = argparse.ArgumentParser(prog=f'bluelm-ros {name}', description=command.help)
    module.add_arguments(sub)
    return module.run(sub.parse_args(rest)) or 0


if __name__ == '__main__':
    sys.exit(main())
