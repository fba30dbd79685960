"""The `bluelm-ros` command line: demo, export, conversion, training, evaluation, benchmarks.

Subcommands import their (possibly heavy, possibly torch) modules lazily so `bluelm-ros
--help` and the runtime commands work on a robot without torch.
"""
import argparse
import importlib
import sys

# name -> (module, help). Each module provides add_arguments(parser) and run(args), or, for
# the commands in PASSTHROUGH, its own main(argv) that parses the rest of the line.
COMMANDS = {
    'dsnet-train': ('bluelm_ros.seg.train', 'train DSNet (synthetic scenes, Cityscapes, ADE20K)'),
    'dsnet-export': ('bluelm_ros.seg.export',
                     'official DSNet checkpoint -> static ONNX (FP32, optional INT8)'),
    'dsnet-eval': ('bluelm_ros.seg.evaluate', 'evaluate exported DSNet models (mIoU)'),
    'vlm-export': ('bluelm_ros.vlm.export', 'BlueLM-V model -> ONNX bundle (INT8 vision, INT4 '
                   'decoder, manifest with hashes)'),
    'vlm-convert': ('bluelm_ros.vlm.convert', 'convert a local HF LLaVA / Idefics3 / SmolVLM '
                    'checkpoint to this project\'s format'),
    'vlm-train': ('bluelm_ros.vlm.train', 'train the scene-QA BlueLM-V model (synthetic scenes)'),
    'bringup': ('bluelm_ros.nodes.bringup',
                'run segmentation + scene QA (+ demo camera) in one process from a YAML'),
    'demo': ('bluelm_ros.demo', 'the main job: both nodes on the shipped models, answers '
             'and overlays written to a folder'),
}

PASSTHROUGH = {'vlm-export', 'vlm-convert'}


def register(name, module, help_text):
    """Add a subcommand implemented by `module` (add_arguments(parser), run(args))."""
    COMMANDS[name] = (module, help_text)


def build_parser():
    parser = argparse.ArgumentParser(
        prog='bluelm-ros', description='DSNet segmentation and BlueLM-V scene QA for ROS 2.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name in PASSTHROUGH:  # e.g. `bluelm-ros vlm-export --help` shows its own help
            p.add_argument('argv', nargs=argparse.REMAINDER, help='see COMMAND --help')
            p.set_defaults(_passthrough=True)
            continue
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError as exc:  # e.g. torch missing on a robot: keep the CLI usable
            p.set_defaults(_import_error=exc)
    return parser


def main(argv=None):
    """Run the CLI; return the process exit code."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:
        return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:]) or 0
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, '_import_error', None):
        print(f'bluelm-ros {args.command}: {args._import_error} '
              '(install the extra: pip install "bluelm-ros[train]")', file=sys.stderr)
        return 2
    return importlib.import_module(args._module).run(args) or 0


if __name__ == '__main__':
    sys.exit(main())
