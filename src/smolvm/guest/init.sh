#!/usr/lib/smolvm/sh
# SmolVM guest init, run as PID 1 after switch_root. Sets up mounts, identity, network and
# SSH from the per-VM config disk, then hands PID 1 to the agent (which reaps orphans and
# powers off cleanly). Only busybox applets (static) are used: dynamic execs cost ~50 ms
# each under TCG. Applets are called by name, not as `busybox NAME`: this shell runs them
# in-process or without an exec (half the cost), and files are read with `read`, not cat.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /run
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t tmpfs -o mode=755 run /run
mkdir -p /run/smolvm/config /run/lock /var/log
hostname -F /etc/hostname 2>/dev/null

read -r cmdline < /proc/cmdline
net=""; resize=""
for arg in $cmdline; do
  case "$arg" in
    smolvm.net=*) net="${arg#smolvm.net=}" ;;
    smolvm.resize=*) resize="${arg#smolvm.resize=}" ;;
  esac
done

rootdev=""; [ -f /.smolvm-rootdev ] && read -r rootdev < /.smolvm-rootdev
for d in /dev/vd?; do
  [ "$d" = "$rootdev" ] && continue
  if [ "$(dd if="$d" bs=1 skip=257 count=5 2>/dev/null)" = "ustar" ]; then
    tar -xf "$d" -C /run/smolvm/config 2>/dev/null
    break
  fi
done
C=/run/smolvm/config
if [ -s $C/hostname ]; then
  read -r h < $C/hostname
  hostname "$h"
  echo "$h" > /etc/hostname
  echo "127.0.0.1 localhost
127.0.1.1 $h" > /etc/hosts
fi
if [ -f $C/authorized_keys ]; then
  mkdir -p /root/.ssh
  cp $C/authorized_keys /root/.ssh/authorized_keys
  chmod 700 /root/.ssh
  chmod 600 /root/.ssh/authorized_keys
fi
if [ -f $C/env.sh ]; then
  cp $C/env.sh /etc/profile.d/smolvm_env.sh
  chmod 644 /etc/profile.d/smolvm_env.sh
fi
# Workspace mounts ("<tag> <ro|rw> <guest path>" per line): virtio-9p from the host. A
# read-only share gets a writable overlay on this VM's disk, so changes stay in the VM.
if [ -f $C/mounts ]; then
  while read -r tag mode gpath; do
    [ -n "$gpath" ] || continue
    o="trans=virtio,version=9p2000.L,msize=262144,cache=none"
    mkdir -p "$gpath"
    if [ "$mode" = rw ]; then
      mount -t 9p -o "$o" "$tag" "$gpath" || echo "smolvm: mount of $tag failed" > /dev/console
    else
      low=/run/smolvm/mnt/$tag; st=/var/lib/smolvm/overlay/$tag
      mkdir -p "$low" "$st/upper" "$st/work"
      mount -t 9p -o "$o,ro" "$tag" "$low" &&
        mount -t overlay overlay -o "lowerdir=$low,upperdir=$st/upper,workdir=$st/work" "$gpath" ||
        echo "smolvm: mount of $tag failed" > /dev/console
    fi
  done < $C/mounts
fi

# Command containment (cgroup v2, see agent_cg.c): commands run in per-session groups
# under smolvm-cmd, SSH sessions in smolvm-ssh; both capped below the VM's memory, with a
# pids cap and a low CPU weight, so a runaway command never starves the agent or init.
# favordynmods (Linux 6.0+): moving a process between groups, which the agent does twice
# per command, no longer waits for an RCU grace period (~2-4 ms per command under TCG).
CG=/sys/fs/cgroup
if mount -t cgroup2 -o nsdelegate,favordynmods cgroup2 $CG 2>/dev/null ||
  mount -t cgroup2 -o nsdelegate cgroup2 $CG 2>/dev/null; then
  echo "+pids +memory +cpu" > $CG/cgroup.subtree_control
  total=0
  while read -r k v _; do [ "$k" = MemTotal: ] && total=$v && break; done < /proc/meminfo
  cap=$(( (total - 65536) * 1024 ))   # everything but 64 MiB for the kernel, agent and init
  [ $cap -lt 67108864 ] && cap=67108864
  for g in smolvm-cmd smolvm-ssh; do
    mkdir -p $CG/$g
    echo $cap > $CG/$g/memory.max
    echo 0 > $CG/$g/memory.swap.max 2>/dev/null
    echo 2048 > $CG/$g/pids.max
    echo 10 > $CG/$g/cpu.weight
  done
  echo "+pids +memory +cpu" > $CG/smolvm-cmd/cgroup.subtree_control
fi

ip link set lo up
if [ -n "$net" ]; then
  # smolvm.net=<ip>/<prefix>,<gateway>,<dns>
  addr="${net%%,*}"; rest="${net#*,}"; gw="${rest%%,*}"; dns="${rest#*,}"
  ip link set eth0 up 2>/dev/null
  ip addr add "$addr" dev eth0 2>/dev/null
  [ -n "$gw" ] && ip route add default via "$gw" 2>/dev/null
  [ -n "$dns" ] && echo "nameserver $dns" > /etc/resolv.conf
fi
if [ "$resize" = "1" ] && [ -n "$rootdev" ]; then
  (resize2fs "$rootdev" >/dev/null 2>&1 &)
fi

waitport=""
if [ -x /usr/sbin/dropbear ] && [ -f $C/ssh_host_ed25519_key ]; then
  mkdir -p /etc/dropbear
  cp $C/ssh_host_ed25519_key /etc/dropbear/dropbear_ed25519_host_key
  chmod 600 /etc/dropbear/dropbear_ed25519_host_key
  pwopt="-s"
  [ -f /etc/smolvm/password-auth ] && pwopt=""
  echo $$ > $CG/smolvm-ssh/cgroup.procs 2>/dev/null  # dropbear and its sessions: smolvm-ssh
  /usr/sbin/dropbear -r /etc/dropbear/dropbear_ed25519_host_key -p 22 $pwopt
  echo $$ > $CG/cgroup.procs 2>/dev/null
  # Ready means "SSH listens" only for SSH-channel VMs (~60 ms of dropbear start-up).
  [ -f $C/wait-ssh ] && waitport="--ready-wait-port 22"
fi

if [ -x /usr/lib/smolvm/agent ]; then
  exec /usr/lib/smolvm/agent --pid1 $waitport
fi
# No agent in this image: announce readiness and stay PID 1, reaping orphans.
echo SMOLVM_READY > /dev/console
trap 'kill -TERM -1; sync; mount -o remount,ro /; reboot -f' TERM INT
while :; do wait; sleep 1; done
