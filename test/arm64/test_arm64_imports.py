"""The runtime imports only aarch64 code: no torch, no ROS, no x86 binary anywhere.

Every module under bluelm_ros/runtime/ (the robot side of the layout; the static import
rules are test/test_import_rules.py) is imported here, in a root that has neither torch
nor ROS installed.
"""
import ctypes
import importlib
import importlib.util
import os
import pkgutil
import platform
import sys

# Packages the runtime must never pull in (training/export side, or ROS).
FORBIDDEN = ('torch', 'torchvision', 'transformers', 'onnx', 'onnxruntime_genai', 'rclpy')
EM_AARCH64, EM_X86_64, EM_386 = 183, 62, 3
# Linux arm64 HWCAP / HWCAP2 bits (arch/arm64/include/uapi/asm/hwcap.h).
HWCAP = {'asimd': 1, 'atomics': 8, 'asimdhp': 10, 'asimddp': 20, 'sve': 22}
HWCAP2 = {'sve2': 1, 'i8mm': 13, 'bf16': 14, 'sme': 23}
AT_HWCAP, AT_HWCAP2 = 16, 26


def elf_machine(path):
    """e_machine of an ELF file, or None if it is not one."""
    try:
        with open(path, 'rb') as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b'\x7fELF':
        return None
    return int.from_bytes(head[18:20], 'little' if head[5] == 1 else 'big')


def mapped_libraries():
    """Shared objects mapped into this process (/proc/self/maps, emulated by QEMU)."""
    libs = set()
    with open('/proc/self/maps', encoding='utf-8', errors='replace') as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and '.so' in parts[5]:
                libs.add(parts[5].strip())
    return sorted(libs)


def cpu_features():
    """ARM features the kernel (here: QEMU) reports; what ORT/KleidiAI dispatch on."""
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    libc.getauxval.argtypes = [ctypes.c_ulong]
    hw, hw2 = libc.getauxval(AT_HWCAP), libc.getauxval(AT_HWCAP2)
    have = [n for n, b in HWCAP.items() if hw >> b & 1]
    have += [n for n, b in HWCAP2.items() if hw2 >> b & 1]
    return have


def test_runtime_imports_only_aarch64_code(report):
    assert platform.machine() == 'aarch64'
    for name in FORBIDDEN:
        # Not even installed in the arm64 root: importing one would fail the import below.
        assert importlib.util.find_spec(name) is None, f'{name} is installed in the root'
    runtime = importlib.import_module('bluelm_ros.runtime')
    modules = [m.name for m in pkgutil.walk_packages(runtime.__path__, 'bluelm_ros.runtime.')]
    assert 'bluelm_ros.runtime.vlm.engine' in modules, modules
    for name in modules:
        importlib.import_module(name)
    loaded = sorted({m.split('.')[0] for m in sys.modules} & set(FORBIDDEN))
    assert not loaded, f'runtime imported {loaded}'
    others = sorted(m for m in sys.modules
                    if m.startswith('bluelm_ros.') and not m.startswith('bluelm_ros.runtime'))
    assert not others, f'runtime imported other parts of bluelm_ros: {others}'

    import onnxruntime as ort
    assert 'CPUExecutionProvider' in ort.get_available_providers()

    extensions = sorted({m.__file__ for m in list(sys.modules.values())
                         if getattr(m, '__file__', None) and m.__file__.endswith('.so')})
    libs = sorted(set(mapped_libraries()) | set(extensions))
    machines = {lib: elf_machine(lib) for lib in libs}
    foreign = [lib for lib, m in machines.items() if m is not None and m != EM_AARCH64]
    assert not foreign, f'non-aarch64 binaries loaded: {foreign}'
    native = [lib for lib, m in machines.items() if m == EM_AARCH64]
    ort_libs = [os.path.basename(lib) for lib in native if 'onnxruntime' in lib]
    assert ort_libs, 'onnxruntime native library not found among the mapped ones'

    report['runtime'] = {
        'machine': platform.machine(),
        'python': platform.python_version(),
        'onnxruntime': f'{ort.__version__} {ort.get_available_providers()}',
        'emulated_cpu': os.environ.get('BLUELM_ARM64_CPU', '?'),
        'cpu_features': ' '.join(cpu_features()),
        'aarch64_shared_objects_checked': len(native),
        'onnxruntime_libs': ' '.join(ort_libs),
        'runtime_modules_imported': len(modules),
        'forbidden_modules_loaded': loaded,
    }
