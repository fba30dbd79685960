"""Runtime test subset for the ONNX Runtime aarch64 build (run by `make test-arm64`).

These tests run inside the emulated arm64 Debian root made by scripts/test_arm64.sh, with only
numpy + onnxruntime + opencv-python-headless + tokenizers + pyyaml + pytest installed, and
compare with reference outputs computed on x86 (scripts/arm64/make_reference.py). Without
$BLUELM_ARM64_REF (e.g. in `make test` on x86) they are skipped.

The numbers each test measures are collected in REPORT, printed at the end of the run and
written to $BLUELM_ARM64_RESULTS (JSON).
"""
import json
import os
import platform

import pytest

REF_DIR = os.environ.get('BLUELM_ARM64_REF', '')
SKIP_REASON = ('arm64 runtime subset: needs the x86 references and an aarch64 Python; '
               'run `make test-arm64`')
REPORT = {}
HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if REF_DIR and platform.machine() == 'aarch64':
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if str(item.path).startswith(HERE + os.sep):
            item.add_marker(skip)


@pytest.fixture(scope='session')
def reference():
    """reference.json written by make_reference.py next to the .npz files."""
    path = os.path.join(REF_DIR, 'reference.json')
    if not os.path.exists(path):
        pytest.fail(f'{path} missing: scripts/test_arm64.sh writes it before pytest')
    with open(path, encoding='utf-8') as f:
        return json.load(f)


@pytest.fixture(scope='session')
def report():
    """Dict of measured numbers (section -> values) for the summary and the JSON file."""
    return REPORT


def pytest_terminal_summary(terminalreporter):
    if not REPORT:
        return
    tr = terminalreporter
    tr.section('arm64 vs x86 (ONNX Runtime aarch64 build)')
    for section, values in REPORT.items():
        tr.write_line(f'{section}:')
        for key, value in values.items():
            tr.write_line(f'  {key}: {value}')


def pytest_sessionfinish(session):
    path = os.environ.get('BLUELM_ARM64_RESULTS')
    if REPORT and path:
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(REPORT, f, indent=1, default=str)
