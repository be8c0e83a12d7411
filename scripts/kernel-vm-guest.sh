#!/usr/bin/env bash
# Runs inside the VM that scripts/kernel-vm.sh boots (never on the host: it mounts
# over the interpreter's and the virtualenv's directories).
#   kernel-vm-guest.sh OUT BASE_PREFIX VENV pytest PYTEST_ARGS...
#   kernel-vm-guest.sh OUT BASE_PREFIX VENV bench FORMATION_ARGS...
# OUT is build/kernel-vm, writable from the guest (--rwdir); the results go to
# OUT/results: pytest.log and junit.xml (or bench.log), status (the exit code),
# boot-seconds.
# /tmp and /var/tmp would not do: in the guest they are an overlay and a tmpfs.
set -uo pipefail
OUT=$1 BASE=$2 VENV=$3 MODE=$4
shift 4
RESULTS=$OUT/results

fail() {
    echo "kernel-vm-guest: $*" | tee "$RESULTS/guest-error" >&2
    exit 1
}

# The disk holding the interpreter, the virtualenv and the tests: vng --disk
# attaches it over virtio-blk, and the root being 9p, it is the first one.
DISK=/dev/vda
for module in virtio_blk ext4 wireguard tun; do
    modprobe "$module" 2>/dev/null || true
done
for _ in $(seq 100); do
    [ -b "$DISK" ] && break
    sleep 0.2
done
[ -b "$DISK" ] || fail "no $DISK: the image disk did not appear"
mount -t ext4 "$DISK" "$OUT/image" || fail "cannot mount the image disk $DISK"
mount --bind "$OUT/image/python" "$BASE" || fail "cannot mount the interpreter over $BASE"
mount --bind "$OUT/image/venv" "$VENV" || fail "cannot mount the virtualenv over $VENV"
modprobe wireguard || fail "modprobe wireguard failed: the kernel has no WireGuard module"
awk '{print int($1)}' /proc/uptime >"$RESULTS/boot-seconds"
echo "kernel-vm-guest: $(uname -r), up $(cat "$RESULTS/boot-seconds") s; running $MODE $*"

cd "$OUT/image/src" || fail "no tests on the image"
# PATH: wireguard-go, wg, ip, tcpdump... are the host's own binaries, seen over 9p.
export PATH="$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
if [ "$MODE" = bench ]; then
    "$VENV/bin/python" bench/formation.py --kernel "$@" 2>&1 | tee "$RESULTS/bench.log"
    echo "${PIPESTATUS[0]}" >"$RESULTS/status"
    sync
    exit 0
fi
# -p no:cacheprovider: nothing to keep between runs.
# -rA: what each test printed (its times) is in the log, as the leak check saw it.
"$VENV/bin/python" -m pytest -p no:cacheprovider -rA --durations=8 \
    --junitxml="$RESULTS/junit.xml" "$@" 2>&1 | tee "$RESULTS/pytest.log"
echo "${PIPESTATUS[0]}" >"$RESULTS/status"
sync
