#!/bin/busybox sh
# vmpod guest /init (runs from the initramfs as PID 1).
# Early mounts use the static busybox: a dynamic exec costs ~40 ms under TCG.
# Then the read-only guest root (erofs, virtio serial vmpod-root) becomes / and
# the agent replaces us as PID 1.
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
B=/bin/busybox
fail() { echo "vmpod-init: $*"; $B sync; $B poweroff -f; }
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
mods=$($B cat /etc/modules.load)
case " $($B cat /proc/cmdline) " in
    *" vmpod.channel=vsock "*) mods="$mods $($B cat /etc/modules.vsock)" ;;
esac
for m in $mods; do
    $B insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done
# The NIC driver only where the VM has a virtio-net device (id 1): no cost elsewhere.
net=
for d in /sys/bus/virtio/devices/*/device; do
    [ -r "$d" ] && read -r id <"$d" && [ "$id" = 0x0001 ] && net=$($B cat /etc/modules.net)
done
for m in $net; do
    $B insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done
# Find the guest root by its virtio serial: virtio-mmio probe order is not stable.
root=
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    for s in /sys/block/vd*/serial; do
        [ "$($B cat "$s" 2>/dev/null)" = vmpod-root ] && root=/dev/${s#/sys/block/} && root=${root%/serial}
    done
    [ -n "$root" ] && break
    $B usleep 50000
done
$B mount -t erofs -o ro "$root" /sysroot || fail "cannot mount guest root"
$B mount --move /proc /sysroot/proc
$B mount --move /sys /sysroot/sys
$B mount -t cgroup2 cgroup2 /sysroot/sys/fs/cgroup
$B mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /sysroot/run
$B mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /sysroot/tmp
$B mount --move /dev /sysroot/dev
$B mkdir -p /sysroot/dev/pts /sysroot/dev/shm
$B mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /sysroot/dev/pts
$B mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /sysroot/dev/shm
# Modules the host appended in an extra cpio (vmpod run --load-module, matrix).
if [ -d /vmpod-modules ]; then
    $B mkdir -p /sysroot/run/vmpod/modules
    $B cp /vmpod-modules/* /sysroot/run/vmpod/modules/
fi
# CRIU's modules, in load order: the agent loads them when checkpoint/restore is asked.
$B mkdir -p /sysroot/run/vmpod/criu-modules
for m in $($B cat /etc/modules.criu); do
    $B cp "/lib/modules/$m.ko" /sysroot/run/vmpod/criu-modules/
done
$B cp /etc/modules.criu /sysroot/run/vmpod/criu-modules/order
echo "vmpod-init: starting agent at $($B cut -d" " -f1 /sysroot/proc/uptime)"
exec $B switch_root /sysroot /usr/bin/python3 -I -S /opt/vmpod/agent.py
