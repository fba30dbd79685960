#!/usr/bin/env bash
# `make test-arm64`: run the runtime test subset (test/arm64/) on the ONNX Runtime aarch64
# build, inside an emulated arm64 Debian 12 root, and compare with x86 reference outputs.
#
# Phases (each timed; the slow ones are cached and skipped on a second run):
#   host-tools  apt-get install qemu-user-static debootstrap binfmt-support (if missing)
#   binfmt      register qemu-aarch64 with binfmt_misc; else run qemu-aarch64-static by hand
#   rootfs      debootstrap --arch=arm64 bookworm (python3, venv, pip)       [cached]
#   venv        aarch64 wheels, same versions as the x86 venv               [cached]
#   reference   x86 outputs + input images -> reference .npz               [cached by hash]
#   test        pytest test/arm64 inside the root (repo bind-mounted read-only)
#
# Settings (environment):
#   BLUELM_ARM64_CACHE  cache dir (default ${XDG_CACHE_HOME:-$HOME/.cache}/bluelm_ros/arm64)
#   BLUELM_ARM64_CPU    emulated CPU model for QEMU (default cortex-a76: Raspberry Pi 5 /
#                       Jetson Orin class, NEON + dotprod, no i8mm/SVE; `max` = every
#                       feature QEMU has, which sends ORT down its i8mm/SVE/SME kernels)
#   BLUELM_ARM64_QEMU   auto (default) | binfmt | explicit (run qemu-aarch64-static by hand)
#   BLUELM_ARM64_THREADS  ORT intra-op threads on both sides (default 2)
#   BLUELM_ARM64_PINS   space-separated pins that replace the x86 ones in the root, e.g.
#                       "onnxruntime==1.23.2 numpy==1.26.4" (an apt-ROS-like robot); such a
#                       set gets its own venv in the root, so the default one stays cached
#   BLUELM_ARM64_VLM_BUNDLE  compare this VLM bundle instead of the shipped one
#   BLUELM_VENV         the x86 venv made by scripts/setup.sh (reference side)
#   PYTEST_ARGS         extra pytest arguments (e.g. -k dsnet)
set -euo pipefail
# The whole script is one brace group: bash parses it completely before running it, so
# editing this file while a (long) run is in progress cannot derail that run.
{

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${BLUELM_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bluelm_ros/arm64}
ROOTFS=$CACHE/root
PIP_CACHE=$CACHE/pip-cache
REF_DIR=$CACHE/reference
RESULTS=$CACHE/results
X86_VENV=${BLUELM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/bluelm_ros/venv}
SUITE=bookworm
MIRROR=${BLUELM_ARM64_MIRROR:-http://deb.debian.org/debian}
QEMU_CPU_MODEL=${BLUELM_ARM64_CPU:-cortex-a76}
QEMU_MODE=${BLUELM_ARM64_QEMU:-auto}
THREADS=${BLUELM_ARM64_THREADS:-2}
PYTEST_ARGS=${PYTEST_ARGS:-}
# Packages the runtime imports (scripts/requirements-runtime.txt, less tqdm) plus pytest.
WHEELS=(numpy onnxruntime opencv-python-headless tokenizers PyYAML pytest)
# Inside the root.
VENV_IN=/opt/venv
SRC_IN=/opt/bluelm_ros

T_START=$(date +%s)
PHASE_NAMES=()
PHASE_SECS=()
PHASE_NOTES=()
MOUNTS=()

log() { printf '\033[1;36m[arm64 %s]\033[0m %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '\033[1;31m[arm64] error:\033[0m %s\n' "$*" >&2; exit 1; }

phase_begin() { PHASE=$1; PHASE_T0=$(date +%s); log "== phase $PHASE: $2"; }
phase_end() {  # phase_end NOTE
  local dt=$(($(date +%s) - PHASE_T0))
  PHASE_NAMES+=("$PHASE"); PHASE_SECS+=("$dt"); PHASE_NOTES+=("$1")
  log "== phase $PHASE done in ${dt}s ($1)"
}

# shellcheck disable=SC2317  # called from the EXIT trap
print_timings() {
  local i total=$(($(date +%s) - T_START))
  printf '\n%-12s %8s  %s\n' phase seconds note
  for i in "${!PHASE_NAMES[@]}"; do
    printf '%-12s %8s  %s\n' "${PHASE_NAMES[$i]}" "${PHASE_SECS[$i]}" "${PHASE_NOTES[$i]}"
  done
  printf '%-12s %8s\n' total "$total"
}

# shellcheck disable=SC2317  # the EXIT trap
cleanup() {
  local rc=$? i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" 2>/dev/null || true
  done
  if [ ${#PHASE_NAMES[@]} -gt 0 ]; then
    print_timings | tee "$CACHE/timings.txt"
  fi
  exit "$rc"
}

bind() {  # bind SRC DEST [ro]
  mkdir -p "$2"
  if mountpoint -q "$2"; then umount "$2"; fi
  mount --bind "$1" "$2"
  MOUNTS+=("$2")
  if [ "${3:-}" = ro ]; then
    mount -o remount,bind,ro "$2"
  fi
}

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount, binfmt_misc)"
if [ -n "${BLUELM_ARM64_VLM_BUNDLE:-}" ]; then
  BLUELM_ARM64_VLM_BUNDLE=$(cd "$BLUELM_ARM64_VLM_BUNDLE" && pwd) \
    || die "BLUELM_ARM64_VLM_BUNDLE: no such folder"
  export BLUELM_ARM64_VLM_BUNDLE
fi
[ "$(uname -m)" = x86_64 ] || log "host is $(uname -m), not x86_64: the 'x86 reference' is this host"
mkdir -p "$CACHE" "$PIP_CACHE" "$REF_DIR" "$RESULTS"
# One run at a time per cache: a second run waits instead of sharing the mounts.
exec 9>"$CACHE/.lock"
flock -w 3600 9 || die "another test-arm64 run holds $CACHE/.lock"
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------
phase_begin host-tools "qemu-user-static, debootstrap, binfmt-support"
need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null \
    || log "apt-get update failed (trying the install anyway)"
  apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${need[@]}" \
    >"$CACHE/apt.log" 2>&1 || { tail -20 "$CACHE/apt.log"; die "apt-get install failed"; }
  phase_end "installed ${need[*]}"
else
  phase_end "already installed"
fi
QEMU_STATIC=$(command -v qemu-aarch64-static)
log "$("$QEMU_STATIC" --version | head -1)"

# ---------------------------------------------------------------------------------------
phase_begin binfmt "make arm64 ELF files executable"
BINFMT=/proc/sys/fs/binfmt_misc
binfmt_ok() { [ -r "$BINFMT/qemu-aarch64" ] && grep -q '^enabled' "$BINFMT/qemu-aarch64"; }
if [ "$QEMU_MODE" != explicit ] && ! binfmt_ok; then
  if [ ! -e "$BINFMT/register" ]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null \
      || log "cannot mount binfmt_misc here"
  fi
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 \
    || update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || true
fi
if [ "$QEMU_MODE" = explicit ]; then
  MODE=explicit
elif binfmt_ok; then
  MODE=binfmt
elif [ "$QEMU_MODE" = binfmt ]; then
  die "binfmt_misc registration of qemu-aarch64 failed (BLUELM_ARM64_QEMU=binfmt)"
else
  MODE=explicit
fi
if [ "$MODE" = binfmt ]; then
  # Flag F: the kernel opened the interpreter at registration, so the root needs no copy.
  phase_end "binfmt_misc: $(grep '^flags' "$BINFMT/qemu-aarch64")"
else
  phase_end "no binfmt_misc: every arm64 program runs as qemu-aarch64-static PROGRAM"
fi

# in_root CMD...: run an arm64 program in the root with a clean environment.
in_root() {
  local envs=(HOME=/root LANG=C.UTF-8 "PATH=$VENV_IN/bin:/usr/local/bin:/usr/bin:/bin"
    PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    PIP_DEFAULT_TIMEOUT=180 "${EXTRA_ENV[@]}")
  if [ "$MODE" = binfmt ]; then
    "$CHROOT" "$ROOTFS" /usr/bin/env -i "${envs[@]}" QEMU_CPU="$QEMU_CPU_MODEL" "$@"
  else
    # The x86 static qemu binary runs natively inside the chroot; env is x86 too. Only the
    # program named here is emulated: arm64 programs it execs would fail (no binfmt).
    env -i "${envs[@]}" "$CHROOT" "$ROOTFS" /usr/bin/qemu-aarch64-static -cpu "$QEMU_CPU_MODEL" "$@"
  fi
}
EXTRA_ENV=()
CHROOT=$(command -v chroot)

mount_root() {  # the kernel file systems (and the pip cache) the programs in the root need
  bind /proc "$ROOTFS/proc"
  bind /sys "$ROOTFS/sys"
  bind /dev "$ROOTFS/dev"
  bind "$PIP_CACHE" "$ROOTFS/root/.cache/pip"
  cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
  # Where TLS goes through a proxy with its own CA (as here), pip in the root needs the
  # host's CA bundle; Debian's ca-certificates in the root would reject it.
  local ca=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
  if [ -f "$ca" ]; then
    cp -L "$ca" "$ROOTFS/etc/ssl/certs/bluelm-host-ca.crt"
    EXTRA_ENV+=("PIP_CERT=/etc/ssl/certs/bluelm-host-ca.crt")
  fi
  # QEMU user mode shows the host's x86 /proc/cpuinfo, on which `import onnxruntime` crashes
  # (its cpuinfo library); mount an arm64 one for the emulated CPU over it.
  local cpus info=$CACHE/cpuinfo-$QEMU_CPU_MODEL
  cpus=$(getconf _NPROCESSORS_CONF)
  in_root /usr/bin/python3 - --model "$QEMU_CPU_MODEL" --cpus "$cpus" \
    <"$REPO/scripts/arm64/cpuinfo.py" >"$info.tmp"
  mv "$info.tmp" "$info"
  mount --bind "$info" "$ROOTFS/proc/cpuinfo"
  MOUNTS+=("$ROOTFS/proc/cpuinfo")
  log "arm64 /proc/cpuinfo for QEMU cpu $QEMU_CPU_MODEL: $(grep -m1 Features "$info")"
}

# ---------------------------------------------------------------------------------------
phase_begin rootfs "debootstrap --arch=arm64 $SUITE -> $ROOTFS"
STAMP_ROOT=$ROOTFS/.bluelm_rootfs_done
if [ -f "$STAMP_ROOT" ]; then
  phase_end "cached ($(du -shx "$ROOTFS" 2>/dev/null | cut -f1))"
else
  if [ -d "$ROOTFS" ]; then
    log "removing incomplete root from an earlier run"
    for m in proc sys dev root/.cache/pip; do
      if mountpoint -q "$ROOTFS/$m"; then umount -l "$ROOTFS/$m"; fi
    done
    rm -rf --one-file-system "$ROOTFS"
  fi
  INCLUDE=python3,python3-venv,python3-pip,ca-certificates
  if [ "$MODE" = binfmt ]; then
    debootstrap --arch=arm64 --variant=minbase --include="$INCLUDE" \
      "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -30 "$CACHE/debootstrap.log"; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
  else
    # Without binfmt the second stage (dpkg running arm64 maintainer scripts) cannot run:
    # download everything in the first stage and unpack the packages by hand. No
    # maintainer script runs, which a Python-only root does not need.
    debootstrap --foreign --arch=arm64 --variant=minbase --include="$INCLUDE" \
      "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -30 "$CACHE/debootstrap.log"; die "debootstrap --foreign failed"; }
    for deb in "$ROOTFS"/var/cache/apt/archives/*.deb; do
      dpkg-deb -x "$deb" "$ROOTFS"
    done
    cp "$QEMU_STATIC" "$ROOTFS/usr/bin/qemu-aarch64-static"
  fi
  rm -f "$ROOTFS"/var/cache/apt/archives/*.deb
  touch "$STAMP_ROOT"
  phase_end "built ($(du -shx "$ROOTFS" | cut -f1))"
fi
if [ "$MODE" = explicit ] && [ ! -x "$ROOTFS/usr/bin/qemu-aarch64-static" ]; then
  cp "$QEMU_STATIC" "$ROOTFS/usr/bin/qemu-aarch64-static"
fi

# ---------------------------------------------------------------------------------------
PIN_OVERRIDES=${BLUELM_ARM64_PINS:-}
if [ -n "$PIN_OVERRIDES" ]; then
  VENV_IN=/opt/venv-$(printf '%s' "$PIN_OVERRIDES" | sha256sum | cut -c1-8)
fi
phase_begin venv "aarch64 wheels into $VENV_IN (versions of the x86 venv)"
if [ ! -x "$X86_VENV/bin/python" ]; then
  log "x86 venv $X86_VENV missing: running scripts/setup.sh"
  bash "$REPO/scripts/setup.sh"
fi
# Pin to what the x86 venv has, so both sides run the same code.
mapfile -t PINS < <("$X86_VENV/bin/python" - "${WHEELS[@]}" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
for name in sys.argv[1:]:
    try:
        print(f'{name}=={version(name)}')
    except PackageNotFoundError:
        print(name)
PY
)
X86_PINS=("${PINS[@]}")
for over in $PIN_OVERRIDES; do
  for i in "${!PINS[@]}"; do
    if [ "${PINS[$i]%%[=<>!~]*}" = "${over%%[=<>!~]*}" ]; then PINS[i]=$over; fi
  done
done
log "pins: ${PINS[*]}"
WANT=$(printf '%s\n' "${PINS[@]}" "$MODE" | sha256sum | cut -d' ' -f1)
STAMP_VENV=$ROOTFS$VENV_IN/.bluelm_pins.sha
mount_root
if [ "$(cat "$STAMP_VENV" 2>/dev/null)" = "$WANT" ]; then
  phase_end "cached"
else
  rm -rf "${ROOTFS:?}$VENV_IN"
  if [ "$MODE" = binfmt ]; then
    in_root /usr/bin/python3 -m venv "$VENV_IN"
  else
    # venv's ensurepip runs a second (arm64) interpreter, which needs binfmt: use Debian's
    # pip from the system site-packages instead.
    in_root /usr/bin/python3 -m venv --without-pip --system-site-packages "$VENV_IN"
  fi
  in_root "$VENV_IN/bin/python" -m pip install -q --only-binary=:all: "${PINS[@]}" \
    2>&1 | tee "$CACHE/pip.log" | grep -v -E '^\s*$' || true
  in_root "$VENV_IN/bin/python" -c 'import numpy, onnxruntime, cv2, tokenizers, yaml, pytest' \
    || die "aarch64 wheel install failed (log: $CACHE/pip.log)"
  echo "$WANT" >"$STAMP_VENV"
  phase_end "installed"
fi
in_root "$VENV_IN/bin/python" - <<'PY'
import platform, numpy, onnxruntime as ort, cv2, tokenizers
print(f'  root: {platform.machine()} Python {platform.python_version()}, numpy {numpy.__version__}, '
      f'onnxruntime {ort.__version__} {ort.get_available_providers()}, opencv {cv2.__version__}, '
      f'tokenizers {tokenizers.__version__}')
PY

# ---------------------------------------------------------------------------------------
phase_begin reference "x86 reference outputs ($X86_VENV)"
# Cached by the hash of everything that can change them: code, models, x86 wheel versions.
REF_KEY=$( (printf '%s\n' "${X86_PINS[@]}"; cd "$REPO" && find bluelm_ros scripts/arm64 -type f \
  \( -name '*.py' -o -name '*.onnx' -o -name '*.data' -o -name '*.json' -o -name '*.npy' \) \
  -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum; echo "$THREADS"
  if [ -n "${BLUELM_ARM64_VLM_BUNDLE:-}" ]; then
    echo "$BLUELM_ARM64_VLM_BUNDLE"; cat "$BLUELM_ARM64_VLM_BUNDLE/manifest.json"
  fi) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$REF_DIR/.key" 2>/dev/null)" = "$REF_KEY" ]; then
  phase_end "cached"
else
  rm -f "$REF_DIR"/*.npz "$REF_DIR"/*.json
  PYTHONPATH=$REPO "$X86_VENV/bin/python" "$REPO/scripts/arm64/make_reference.py" \
    --out "$REF_DIR" --threads "$THREADS"
  echo "$REF_KEY" >"$REF_DIR/.key"
  phase_end "computed"
fi

# ---------------------------------------------------------------------------------------
phase_begin test "pytest test/arm64 in the arm64 root (QEMU cpu $QEMU_CPU_MODEL, $MODE)"
bind "$REPO/bluelm_ros" "$ROOTFS$SRC_IN/bluelm_ros" ro
bind "$REPO/test/arm64" "$ROOTFS$SRC_IN/test_arm64" ro
bind "$REF_DIR" "$ROOTFS$SRC_IN/reference" ro
rm -f "$RESULTS"/*.json
bind "$RESULTS" "$ROOTFS$SRC_IN/results"
EXTRA_ENV+=("PYTHONPATH=$SRC_IN" "BLUELM_ARM64_REF=$SRC_IN/reference"
  "BLUELM_ARM64_RESULTS=$SRC_IN/results/arm64_results.json" "BLUELM_ARM64_THREADS=$THREADS"
  "BLUELM_ARM64_CPU=$QEMU_CPU_MODEL")
if [ -n "${BLUELM_ARM64_VLM_BUNDLE:-}" ]; then
  # A bundle from outside the repo (see make_reference.py): visible read-only in the root.
  bind "$BLUELM_ARM64_VLM_BUNDLE" "$ROOTFS$SRC_IN/vlm_bundle" ro
  EXTRA_ENV+=("BLUELM_ARM64_VLM_BUNDLE=$SRC_IN/vlm_bundle")
fi
set +e
# shellcheck disable=SC2086
in_root "$VENV_IN/bin/python" -m pytest -p no:cacheprovider --rootdir "$SRC_IN/test_arm64" \
  -rs -q "$SRC_IN/test_arm64" $PYTEST_ARGS 2>&1 | tee "$CACHE/pytest.log"
RC=${PIPESTATUS[0]}
set -e
phase_end "pytest exit $RC"
[ -f "$RESULTS/arm64_results.json" ] && log "results: $RESULTS/arm64_results.json"
if [ "$RC" = 0 ]; then
  log "PASS: runtime subset on aarch64 ONNX Runtime matches the x86 references"
else
  log "FAIL: pytest exit $RC (log: $CACHE/pytest.log)"
fi
exit "$RC"
}
