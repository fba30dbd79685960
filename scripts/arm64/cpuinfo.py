"""Print an arm64 /proc/cpuinfo for the emulated CPU (run inside the arm64 root).

QEMU user mode passes the host's x86 /proc/cpuinfo through. ONNX Runtime's cpuinfo library
then fails to initialise (without /sys) or crashes the process at `import onnxruntime`
(with the host's /sys mounted, as seen here with ORT 1.32). test_arm64.sh mounts this
file over /proc/cpuinfo instead, so ORT sees what it sees on a real ARM board: the MIDR of
the QEMU CPU model and the features of the emulated CPU (read from AT_HWCAP/AT_HWCAP2,
which QEMU sets correctly; ORT and KleidiAI dispatch on those).

    python3 cpuinfo.py --model cortex-a76 --cpus 2
"""
import argparse
import ctypes

# Linux arch/arm64/kernel/cpuinfo.c hwcap_str order: bit i of AT_HWCAP, then of AT_HWCAP2.
HWCAP_NAMES = (
    'fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt '
    'fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs '
    'sb paca pacg').split()
HWCAP2_NAMES = (
    'dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm '
    'svef64mm svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 '
    'smei8i32 smef16f32 smeb16f32 smef32f32 smefa64 wfxt ebf16 sveebf16 cssc rprfm sve2p1 '
    'sme2 sme2p1 smei16i32 smebi32i32 smeb16b16 smef16f16 mops hbc').split()
AT_HWCAP, AT_HWCAP2 = 16, 26
# QEMU CPU model -> (implementer, variant, part, revision) of its MIDR_EL1.
MIDR = {
    'cortex-a35': (0x41, 0x0, 0xd04, 1),
    'cortex-a53': (0x41, 0x0, 0xd03, 4),
    'cortex-a57': (0x41, 0x1, 0xd07, 0),
    'cortex-a72': (0x41, 0x0, 0xd08, 3),
    'cortex-a76': (0x41, 0x4, 0xd0b, 1),
    'neoverse-n1': (0x41, 0x4, 0xd0c, 1),
    'a64fx': (0x46, 0x1, 0x001, 0),
    'max': (0x00, 0x0, 0x051, 0),
}


def features():
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    libc.getauxval.argtypes = [ctypes.c_ulong]
    hw, hw2 = libc.getauxval(AT_HWCAP), libc.getauxval(AT_HWCAP2)
    names = [n for i, n in enumerate(HWCAP_NAMES) if hw >> i & 1]
    return names + [n for i, n in enumerate(HWCAP2_NAMES) if hw2 >> i & 1]


def cpuinfo(model, cpus):
    impl, variant, part, rev = MIDR.get(model, MIDR['max'])
    block = (f'BogoMIPS\t: 50.00\nFeatures\t: {" ".join(features())}\n'
             f'CPU implementer\t: 0x{impl:02x}\nCPU architecture: 8\n'
             f'CPU variant\t: 0x{variant:x}\nCPU part\t: 0x{part:03x}\n'
             f'CPU revision\t: {rev}\n')
    return ''.join(f'processor\t: {i}\n{block}\n' for i in range(cpus))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--model', default='max', help='QEMU CPU model (for the MIDR fields)')
    ap.add_argument('--cpus', type=int, default=1, help='processors (match /sys .../present)')
    args = ap.parse_args()
    print(cpuinfo(args.model, args.cpus), end='')


if __name__ == '__main__':
    main()
