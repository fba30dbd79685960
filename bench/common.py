"""Helpers shared by the benchmarks: machine info, JSON + plot output (timing: harness.py)."""
import json
import os
import platform

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
CACHE = os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')),
                     'bluelm_ros', 'bench')


def machine():
    import onnxruntime
    info = {'machine': platform.machine(), 'processor': platform.processor(),
            'cpus': os.cpu_count(), 'python': platform.python_version(),
            'onnxruntime': onnxruntime.__version__}
    try:
        import torch
        info['torch'] = torch.__version__
    except ImportError:
        pass
    return info


def save(name, data):
    """Write results/<name>.json and return its path."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f'{name}.json')
    with open(path, 'w') as f:
        json.dump(data, f, indent=1)
    print(f'saved {path}')
    return path


def plot_path(name):
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, f'{name}.png')
