"""Run every benchmark in turn (`make bench`); each saves bench/results/<name>.json + .png."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = ['bench_dsnet.py', 'bench_seg_node.py', 'bench_scene_qa.py', 'bench_vlm.py']


def main():
    failed = []
    for name in sys.argv[1:] or BENCHES:
        print(f'==> {name}', flush=True)
        if subprocess.call([sys.executable, os.path.join(HERE, name)]) != 0:
            failed.append(name)
    if failed:
        print(f'failed: {", ".join(failed)}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
