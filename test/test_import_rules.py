"""The layout is the deployment boundary: each folder imports only what its side may use.

Checked statically (every import statement of every file, in functions too) and, for the
runtime, by importing it in a fresh interpreter:

* ``runtime/``: the standard library, numpy, onnxruntime, OpenCV, tokenizers, jinja2
  (pure Python: renders converted checkpoints' chat templates; python3-jinja2 on apt),
  and nothing else of bluelm_ros. What an ARM robot runs.
* ``data/``: the standard library, numpy, OpenCV, and runtime/ (label sets).
* ``ros/``: runtime/ and data/ (and ROS); never tools/ or the torch side.
* ``tools/``: runtime/ and data/ (and torch, onnx, ...); never ros/ or ROS.
* ``cli.py``: the standard library only at import time; subcommands by name, lazily.
"""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, 'bluelm_ros')
STDLIB = set(sys.stdlib_module_names)
TORCH_SIDE = {'torch', 'torchvision', 'transformers', 'onnx', 'onnxscript', 'safetensors',
              'onnxruntime_genai'}
ROS = {'rclpy', 'rcl_interfaces', 'sensor_msgs', 'std_msgs', 'diagnostic_msgs',
       'lifecycle_msgs', 'action_msgs', 'builtin_interfaces', 'vision_msgs',
       'ament_index_python', 'launch', 'launch_ros'}
# folder -> (parts of bluelm_ros it may import, third-party allowed (None = any but banned),
#            third-party banned)
RULES = {
    'runtime': ({'runtime'}, {'numpy', 'onnxruntime', 'cv2', 'tokenizers', 'jinja2'}, set()),
    'data': ({'runtime', 'data'}, {'numpy', 'cv2'}, set()),
    'ros': ({'runtime', 'data', 'ros'}, None, TORCH_SIDE),
    'tools': ({'runtime', 'data', 'tools'}, None, ROS),
}


def python_files(folder):
    for dirpath, _, files in os.walk(os.path.join(PKG, folder)):
        for f in files:
            if f.endswith('.py'):
                yield os.path.join(dirpath, f)


def imports(path):
    """Every module a file imports (relative imports resolved): [(line, 'a.b.c')]."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    package = os.path.relpath(os.path.dirname(path), ROOT).split(os.sep)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y: relative to this file's package
                base = package[:len(package) - node.level + 1]
                module = '.'.join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            out.append((node.lineno, module))
    return out


def violations(folder):
    own, allowed, banned = RULES[folder]
    found = []
    for path in python_files(folder):
        where = os.path.relpath(path, ROOT)
        for line, module in imports(path):
            top = module.split('.')[0]
            if top == 'bluelm_ros':
                part = module.split('.')[1] if '.' in module else ''
                if part and part not in own:  # '': the (empty) package itself
                    found.append(f'{where}:{line}: imports {module} ({folder}/ may not)')
            elif top in STDLIB or top == '__future__':
                continue
            elif top in banned or (allowed is not None and top not in allowed):
                found.append(f'{where}:{line}: imports {module} ({folder}/ may not)')
    return found


@pytest.mark.parametrize('folder', sorted(RULES))
def test_each_folder_imports_only_what_its_side_may(folder):
    assert list(python_files(folder)), f'no files under bluelm_ros/{folder}'
    assert violations(folder) == []


def test_every_python_file_of_the_package_is_under_a_rule():
    top = {f for f in os.listdir(PKG) if f.endswith('.py')}
    assert top == {'__init__.py', 'cli.py'}, top
    folders = {d for d in os.listdir(PKG) if os.path.isdir(os.path.join(PKG, d))
               and d not in ('models', '__pycache__')}
    assert folders == set(RULES), folders


def test_the_rules_catch_a_violation(tmp_path, monkeypatch):
    """The checker itself: a runtime file importing torch and tools is reported."""
    fake = tmp_path / 'bluelm_ros' / 'runtime'
    fake.mkdir(parents=True)
    (fake / 'bad.py').write_text('import numpy\nfrom bluelm_ros.tools.vlm import export\n\n\n'
                                 'def f():\n    import torch\n    from . import image\n')
    monkeypatch.setattr(sys.modules[__name__], 'PKG', str(tmp_path / 'bluelm_ros'))
    monkeypatch.setattr(sys.modules[__name__], 'ROOT', str(tmp_path))
    found = violations('runtime')
    assert len(found) == 2, found
    assert 'bad.py:2: imports bluelm_ros.tools.vlm' in found[0] and 'torch' in found[1]


def test_cli_imports_only_the_standard_library_and_names_existing_modules():
    path = os.path.join(PKG, 'cli.py')
    assert {m.split('.')[0] for _, m in imports(path)} <= STDLIB
    from bluelm_ros import cli
    for name, command in cli.COMMANDS.items():
        parts = command.module.split('.')
        file = os.path.join(ROOT, *parts) + '.py'
        assert os.path.isfile(file) or os.path.isfile(os.path.join(ROOT, *parts,
                                                                   '__init__.py')), name


def test_importing_the_runtime_loads_nothing_else():
    """Import every runtime module in a fresh interpreter: no torch, ROS or other parts."""
    modules = sorted(
        'bluelm_ros.' + os.path.relpath(p, PKG)[:-3].replace(os.sep, '.').replace(
            '.__init__', '') for p in python_files('runtime'))
    code = ('import importlib, sys\n'
            f'for m in {modules!r}:\n    importlib.import_module(m)\n'
            'loaded = sorted(m for m in sys.modules if m.split(".")[0] in '
            f'{sorted(TORCH_SIDE | ROS)!r} or (m.startswith("bluelm_ros.") and not '
            'm.startswith("bluelm_ros.runtime")))\n'
            'print(loaded)\nassert not loaded, loaded\n')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       cwd='/')
    assert r.returncode == 0, r.stdout + r.stderr
