#!/usr/lib/smolvm/sh
# SmolVM guest init, run as PID 1 after switch_root. Sets up mounts, identity, network and
# SSH from the per-VM config disk, then hands PID 1 to the agent (which reaps orphans and
# powers off cleanly). Only busybox applets (static) are used: dynamic execs cost ~50 ms
# each under TCG.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev 2>/dev/null
$B mkdir -p /dev/pts /dev/shm /run
$B mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$B mount -t tmpfs -o mode=1777 shm /dev/shm
$B mount -t tmpfs -o mode=755 run /run
$B mkdir -p /run/smolvm/config /run/lock /var/log
$B hostname -F /etc/hostname 2>/dev/null

cmdline=$($B cat /proc/cmdline)
net=""; resize=""
for arg in $cmdline; do
  case "$arg" in
    smolvm.net=*) net="${arg#smolvm.net=}" ;;
    smolvm.resize=*) resize="${arg#smolvm.resize=}" ;;
  esac
done

rootdev=$($B cat /.smolvm-rootdev 2>/dev/null)
for d in /dev/vd?; do
  [ "$d" = "$rootdev" ] && continue
  if [ "$($B dd if="$d" bs=1 skip=257 count=5 2>/dev/null)" = "ustar" ]; then
    $B tar -xf "$d" -C /run/smolvm/config 2>/dev/null
    break
  fi
done
C=/run/smolvm/config
if [ -s $C/hostname ]; then
  h=$($B cat $C/hostname)
  $B hostname "$h"
  echo "$h" > /etc/hostname
  echo "127.0.0.1 localhost
127.0.1.1 $h" > /etc/hosts
fi
if [ -f $C/authorized_keys ]; then
  $B mkdir -p /root/.ssh
  $B cp $C/authorized_keys /root/.ssh/authorized_keys
  $B chmod 700 /root/.ssh
  $B chmod 600 /root/.ssh/authorized_keys
fi
if [ -f $C/env.sh ]; then
  $B cp $C/env.sh /etc/profile.d/smolvm_env.sh
  $B chmod 644 /etc/profile.d/smolvm_env.sh
fi
# Workspace mounts ("<tag> <ro|rw> <guest path>" per line): virtio-9p from the host. A
# read-only share gets a writable overlay on this VM's disk, so changes stay in the VM.
if [ -f $C/mounts ]; then
  while read -r tag mode gpath; do
    [ -n "$gpath" ] || continue
    o="trans=virtio,version=9p2000.L,msize=262144,cache=none"
    $B mkdir -p "$gpath"
    if [ "$mode" = rw ]; then
      $B mount -t 9p -o "$o" "$tag" "$gpath" || echo "smolvm: mount of $tag failed" > /dev/console
    else
      low=/run/smolvm/mnt/$tag; st=/var/lib/smolvm/overlay/$tag
      $B mkdir -p "$low" "$st/upper" "$st/work"
      $B mount -t 9p -o "$o,ro" "$tag" "$low" &&
        $B mount -t overlay overlay -o "lowerdir=$low,upperdir=$st/upper,workdir=$st/work" "$gpath" ||
        echo "smolvm: mount of $tag failed" > /dev/console
    fi
  done < $C/mounts
fi

# Command containment (cgroup v2, see agent_cg.c): commands run in per-session groups
# under smolvm-cmd, SSH sessions in smolvm-ssh; both capped below the VM's memory, with a
# pids cap and a low CPU weight, so a runaway command never starves the agent or init.
CG=/sys/fs/cgroup
if $B mount -t cgroup2 -o nsdelegate cgroup2 $CG 2>/dev/null; then
  echo "+pids +memory +cpu" > $CG/cgroup.subtree_control
  total=0
  while read -r k v _; do [ "$k" = MemTotal: ] && total=$v && break; done < /proc/meminfo
  cap=$(( (total - 65536) * 1024 ))   # everything but 64 MiB for the kernel, agent and init
  [ $cap -lt 67108864 ] && cap=67108864
  for g in smolvm-cmd smolvm-ssh; do
    $B mkdir -p $CG/$g
    echo $cap > $CG/$g/memory.max
    echo 0 > $CG/$g/memory.swap.max 2>/dev/null
    echo 2048 > $CG/$g/pids.max
    echo 10 > $CG/$g/cpu.weight
  done
  echo "+pids +memory +cpu" > $CG/smolvm-cmd/cgroup.subtree_control
fi

$B ip link set lo up
if [ -n "$net" ]; then
  # smolvm.net=<ip>/<prefix>,<gateway>,<dns>
  addr="${net%%,*}"; rest="${net#*,}"; gw="${rest%%,*}"; dns="${rest#*,}"
  $B ip link set eth0 up 2>/dev/null
  $B ip addr add "$addr" dev eth0 2>/dev/null
  [ -n "$gw" ] && $B ip route add default via "$gw" 2>/dev/null
  [ -n "$dns" ] && echo "nameserver $dns" > /etc/resolv.conf
fi
if [ "$resize" = "1" ] && [ -n "$rootdev" ]; then
  (resize2fs "$rootdev" >/dev/null 2>&1 &)
fi

waitport=""
if [ -x /usr/sbin/dropbear ] && [ -f $C/ssh_host_ed25519_key ]; then
  $B mkdir -p /etc/dropbear
  $B cp $C/ssh_host_ed25519_key /etc/dropbear/dropbear_ed25519_host_key
  $B chmod 600 /etc/dropbear/dropbear_ed25519_host_key
  pwopt="-s"
  [ -f /etc/smolvm/password-auth ] && pwopt=""
  echo $$ > $CG/smolvm-ssh/cgroup.procs 2>/dev/null  # dropbear and its sessions: smolvm-ssh
  /usr/sbin/dropbear -r /etc/dropbear/dropbear_ed25519_host_key -p 22 $pwopt
  echo $$ > $CG/cgroup.procs 2>/dev/null
  waitport="--ready-wait-port 22"
fi

if [ -x /usr/lib/smolvm/agent ]; then
  exec /usr/lib/smolvm/agent --pid1 $waitport
fi
# No agent in this image: announce readiness and stay PID 1, reaping orphans.
echo SMOLVM_READY > /dev/console
trap '$B kill -TERM -1; $B sync; $B mount -o remount,ro /; $B reboot -f' TERM INT
while :; do wait; $B sleep 1; done
