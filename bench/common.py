"""Helpers shared by the benchmarks: timing, machine info, JSON + plot output."""
import json
import os
import platform
import statistics
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
CACHE = os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')),
                     'bluelm_ros', 'bench')


def time_it(fn, repeat=5, warmup=2):
    """Return per-call times in ms (median is what we quote)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def summarize(times):
    return {'median_ms': statistics.median(times), 'min_ms': min(times),
            'max_ms': max(times), 'n': len(times)}


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
