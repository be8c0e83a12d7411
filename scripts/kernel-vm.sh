#!/usr/bin/env bash
# The kernel stage (`make test-kernel`, and the end of `make test`): kernel WireGuard
# checked on a real kernel.  This machine's own kernel has no WireGuard module and
# cannot load one, so a Debian kernel that has it boots in a VM (virtme-ng, QEMU)
# over the host's own filesystem, and the kernel tests run there:
# tests/test_netlink.py (none may skip) and tests/integration/test_kernel_mesh.py.
#
# What it installs when missing (as root): Debian's qemu-system-x86, busybox-static
# (virtme-ng's init needs a static busybox) and a kernel package; virtme-ng in the
# virtualenv.  KVM stops with "emulation failure" on these machines, so the CPU is
# emulated (TCG, about ten times slower): the stage takes a few minutes.
#
# Python over the VM's 9p root under TCG spends over a minute importing each
# daemon, file by file.  So the interpreter, the virtualenv and the tests are put
# on an ext4 image (build/kernel-vm/image.ext4) attached as a virtio-blk disk, which the
# guest mounts over the same paths: one block device, read through the guest's
# page cache, instead of a 9p round trip per file.
#
# Ends with one line: "kernel stage: PASS|FAIL|SKIPPED: ...".  A VM that cannot
# boot fails the run under CI=true, and skips, saying why, elsewhere.
#
# `scripts/kernel-vm.sh bench ARGS...` (make bench-kernel) runs
# `bench/formation.py --kernel ARGS...` in the VM instead of the tests.
#
# Environment: VENV (.venv), WGNAT_VM_KERNEL (a /boot/vmlinuz-* to boot),
# WGNAT_VM_TIMEOUT (seconds, 900), WGNAT_VM_CPUS (2), WGNAT_VM_TESTS (the pytest
# arguments run in the guest).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-.venv}
VENV_ABS=$(cd "$VENV" 2>/dev/null && pwd || echo "$ROOT/$VENV")
OUT=$ROOT/build/kernel-vm
TIMEOUT=${WGNAT_VM_TIMEOUT:-900}
CPUS=${WGNAT_VM_CPUS:-2}
TESTS=${WGNAT_VM_TESTS:-tests/test_netlink.py tests/integration/test_kernel_mesh.py}
MODE=pytest
STAGE="kernel stage"
if [ "${1:-}" = bench ]; then
    MODE=bench STAGE="kernel bench"
    shift
    TESTS="$*"
fi
started=$(date +%s)

elapsed() { echo "$(($(date +%s) - started)) s"; }

unavailable() {  # the VM cannot run here: fail under CI, skip elsewhere
    if [ "${CI:-}" = true ]; then
        echo "$STAGE: FAIL: $* (CI=true: the kernel stage must run)"
        exit 1
    fi
    echo "$STAGE: SKIPPED: $*"
    exit 0
}

apt_install() {
    echo "$STAGE: installing $*"
    export DEBIAN_FRONTEND=noninteractive
    # Another apt may hold the lock (a shared machine): wait for it.
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@" >/dev/null
}

# A kernel virtme-ng can boot over 9p that has WireGuard's module: its config has
# 9p over virtio (the "cloud" flavour has no 9p at all) and its modules are here.
usable_kernel() {
    local image=$1 version
    version=${image#/boot/vmlinuz-}
    [ -r "$image" ] || return 1
    grep -Eq '^CONFIG_9P_FS=(y|m)' "/boot/config-$version" 2>/dev/null || return 1
    grep -Eq '^CONFIG_NET_9P_VIRTIO=(y|m)' "/boot/config-$version" || return 1
    compgen -G "/lib/modules/$version/kernel/drivers/net/wireguard/wireguard.ko*" >/dev/null
}

find_kernel() {
    local image
    if [ -n "${WGNAT_VM_KERNEL:-}" ]; then
        usable_kernel "$WGNAT_VM_KERNEL" && echo "$WGNAT_VM_KERNEL"
        return
    fi
    for image in $(ls /boot/vmlinuz-* 2>/dev/null | sort -V -r); do
        if usable_kernel "$image"; then
            echo "$image"
            return
        fi
    done
}

[ "$(id -u)" = 0 ] || unavailable "needs root (QEMU, network namespaces in the guest): run as root"
[ -x "$VENV_ABS/bin/python" ] || unavailable "no virtualenv at $VENV: run make venv install first"

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed" ||
    need+=(busybox-static)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ -z "$(find_kernel)" ]; then
    if [ -n "${WGNAT_VM_KERNEL:-}" ]; then
        unavailable "WGNAT_VM_KERNEL=$WGNAT_VM_KERNEL has no 9p or no WireGuard module"
    fi
    # The generic flavour: linux-image-cloud-amd64 has WireGuard but no 9p.
    need+=(linux-image-amd64)
fi
if [ ${#need[@]} -gt 0 ]; then
    apt_install "${need[@]}" || unavailable "could not install ${need[*]} (apt-get failed)"
fi
KERNEL=$(find_kernel)
[ -n "$KERNEL" ] || unavailable "no kernel with 9p and WireGuard's module in /boot"
if [ ! -x "$VENV_ABS/bin/vng" ]; then
    "$VENV_ABS/bin/python" -m pip install -q 'virtme-ng>=1.30' ||
        unavailable "could not install virtme-ng into $VENV (pip failed)"
fi

# -- the image: interpreter, virtualenv and tests, mounted by the guest over the
# same paths (so pyvenv.cfg, the console scripts' shebangs and the tests'
# byte-code caches stay valid) ------------------------------------------------
BASE=$("$VENV_ABS/bin/python" -c 'import sys; print(sys.base_prefix)')
PYVER=$("$VENV_ABS/bin/python" -c 'import sys; print("python%d.%d" % sys.version_info[:2])')
rm -rf "$OUT"
mkdir -p "$OUT/image"/{python,venv,src} "$OUT/results"
stage=$OUT/image
# The standard library without what no test imports (its own tests are 120 MB).
tar -C "$BASE" \
    --exclude="./lib/$PYVER/test" --exclude="./lib/$PYVER/site-packages" \
    --exclude="./lib/$PYVER/idlelib" --exclude="./lib/$PYVER/tkinter" \
    --exclude="./lib/$PYVER/ensurepip" --exclude="./lib/$PYVER/lib2to3" \
    --exclude="./lib/$PYVER/config-*" --exclude="./lib/*.a" \
    --exclude="./include" --exclude="./share" \
    -cf - . | tar -C "$stage/python" -xf -
# The virtualenv without the linters and the Docker tools (none runs in the VM).
site=./lib/$PYVER/site-packages
tar -C "$VENV_ABS" \
    --exclude="$site/compose" --exclude="$site/mypy" --exclude="$site/*mypyc*" \
    --exclude="$site/pip" --exclude="./bin/ruff" --exclude="./bin/docker-compose" \
    -cf - . | tar -C "$stage/venv" -xf -
# The tests, with pytest's rewritten byte code made here (collecting writes it),
# so the guest's emulated CPU does not rewrite them.
cp -a tests bench pyproject.toml "$stage/src/"
mkdir -p "$stage/src/compose" && cp -a compose/testbed.py "$stage/src/compose/"
find "$stage/src" -name __pycache__ -prune -exec rm -rf {} +
if [ "$MODE" = pytest ]; then
    # shellcheck disable=SC2086 # TESTS is a list of pytest arguments
    (cd "$stage/src" && "$VENV_ABS/bin/python" -m pytest -q --collect-only \
        -p no:cacheprovider $TESTS >/dev/null) || true
else
    "$VENV_ABS/bin/python" -m compileall -q "$stage/src/bench" "$stage/src/tests" >/dev/null || true
fi
size_mb=$(($(du -sm "$stage" | cut -f1) * 13 / 10 + 64))
mkfs.ext4 -q -F -L wgnatvm -d "$stage" "$OUT/image.ext4" "${size_mb}M"
echo "$STAGE: booting $(basename "$KERNEL") (TCG, $CPUS CPUs), image ${size_mb} MB," \
    "after $(elapsed) of preparation"

# -- the VM ------------------------------------------------------------------
export PATH="$VENV_ABS/bin:$PATH" # vng runs virtme-run from the virtualenv
vm_status=0
# The root stays read-only: the guest writes only build/kernel-vm (--rwdir).
timeout --kill-after=10 "$TIMEOUT" vng -r "$KERNEL" --force-9p --disable-kvm \
    --memory 3G --cpus "$CPUS" --rwdir "$OUT" --disk "$OUT/image.ext4" \
    --exec "bash $ROOT/scripts/kernel-vm-guest.sh $OUT $BASE $VENV_ABS $MODE $TESTS" \
    </dev/null 2>&1 | tee "$OUT/console.log" || vm_status=$?

# -- the verdict -------------------------------------------------------------
if [ ! -f "$OUT/results/status" ]; then
    reason="the VM did not run the tests (vng exit $vm_status"
    [ "$vm_status" = 124 ] && reason+=", timed out after $TIMEOUT s"
    reason+="; console in build/kernel-vm/console.log"
    [ -f "$OUT/results/guest-error" ] && reason+=": $(cat "$OUT/results/guest-error")"
    unavailable "$reason)"
fi
status=$(cat "$OUT/results/status")
if [ "$MODE" = bench ]; then
    if [ "$status" != 0 ]; then
        echo "kernel bench: FAIL: bench/formation.py --kernel exited $status" \
            "(log: build/kernel-vm/results/bench.log)"
        exit 1
    fi
    echo "kernel bench: done in $(elapsed); figures above and in build/kernel-vm/results/bench.log"
    exit 0
fi
summary=$(grep -E '^=+ .*(passed|failed|error|skipped).* =+$' "$OUT/results/pytest.log" |
    tail -1 | sed -E 's/^=+ //; s/ =+$//')
# "none skipped": a kernel test that skips in the VM has not run on a kernel.
skipped=$(grep -Eo '[0-9]+ skipped' <<<"$summary" | cut -d' ' -f1 || true)
boot=$(cat "$OUT/results/boot-seconds" 2>/dev/null || echo "?")
where="guest pytest: $summary; kernel $(basename "$KERNEL"), boot to tests ${boot} s, stage $(elapsed)"
if [ "$status" != 0 ]; then
    echo "kernel stage: FAIL: $where (log: build/kernel-vm/results/pytest.log)"
    exit 1
fi
if [ -n "$skipped" ] && [ "$skipped" != 0 ]; then
    echo "kernel stage: FAIL: $skipped kernel tests skipped in the VM: $where"
    exit 1
fi
echo "kernel stage: PASS: $where"
