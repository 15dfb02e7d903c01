#!/bin/busybox sh
# SmolVM stage-1 init (initramfs): load the virtio/ext4 modules, find the root disk by its
# label, and switch_root into it. Static busybox only: every exec under TCG is expensive.
export PATH=/bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done < /lib/modules/order
# vsock (Firecracker's agent channel) only when the VM has a vsock device (virtio id 19):
# its three modules cost ~70 ms under TCG, and QEMU VMs use virtio-serial.
for d in /sys/bus/virtio/devices/*; do
  [ -f "$d/device" ] && read -r id < "$d/device" && [ "$id" = 0x0013 ] &&
    while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done < /lib/modules/order.vsock && break
done
# Workspace mounts (virtio-9p + overlay): loaded only when the VM has some (~20 ms each).
case " $(cat /proc/cmdline) " in
  *" smolvm.shares=1 "*)
    while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done < /lib/modules/order.shares ;;
esac

target=/init
for arg in $(cat /proc/cmdline); do
  case "$arg" in init=*) target="${arg#init=}" ;; esac
done

root=""
tries=0
while [ -z "$root" ] && [ $tries -lt 200 ]; do
  for d in /dev/vd?; do
    [ -b "$d" ] || continue
    # ext4 volume label: superblock at 1024, label at +120 (busybox-static has no blkid).
    [ "$(dd if="$d" bs=1 skip=1144 count=11 2>/dev/null)" = "smolvm-root" ] && root="$d"
  done
  [ -n "$root" ] || { usleep 10000; tries=$((tries + 1)); }
done
if [ -z "$root" ]; then
  echo "smolvm: no root disk labelled smolvm-root found" > /dev/console
  poweroff -f
fi
mount -t ext4 -o noatime "$root" /newroot || { echo "smolvm: cannot mount $root" > /dev/console; poweroff -f; }
echo "$root" > /newroot/.smolvm-rootdev 2>/dev/null
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot "$target"
