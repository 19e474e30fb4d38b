#!/bin/busybox sh
# /init of a throw-away initramfs that measures which capability sets the
# nllb agent needs on the booted kernel (the numbers in docs/deploy.md).
# Not part of `cargo test`: the kernel matrix belongs to `cargo xtask`; this
# is the recipe it can run.
#
# Initramfs contents: /bin/busybox (static), /setpriv (util-linux, with its
# libcap-ng and libc from ldd), /nllb (stripped, with its ldd libraries),
# /c.yaml (below), /srv.sh (`#!/bin/sh` + `echo steered`), this file as /init.
#   c.yaml: services: [{name: apiserver, listen: ["127.0.0.1:17443"],
#           backendPort: 6443}], backends: ["198.18.0.1"], health: {enabled: false}
#   (cd root && find . | busybox cpio -o -H newc -R 0:0 | gzip -1 > ../initrd.gz)
#   qemu-system-x86_64 -accel tcg -smp 1 -m 512M -nographic -no-reboot \
#     -kernel vmlinuz -initrd initrd.gz -append "console=ttyS0 panic=-1 quiet"
# (6.12 from trixie needs `noapic` on the command line under TCG.)
# Each RESULT line: the bounding set, whether the agent became ready, what a
# connect from the steered cgroup to the virtual address received, the exit
# code, programs the kernel refused, and the agent's error.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /run /var /tmp
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /sys/fs/cgroup; mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
ip addr add 198.18.0.1/32 dev lo
mkdir /sys/fs/cgroup/t
echo "KERNEL $(uname -r)"
nc -ll -p 6443 -e /srv.sh &
i=0
for caps in +bpf,+net_admin,+perfmon,+sys_resource +bpf,+net_admin,+sys_resource +bpf,+net_admin,+perfmon +net_admin,+perfmon,+sys_resource +bpf,+perfmon,+sys_resource +sys_admin,+net_admin,+sys_resource; do
  i=$((i+1))
  /setpriv --inh-caps=-all --ambient-caps=-all --bounding-set=-all,$caps -- /nllb agent --config /c.yaml --cgroup /sys/fs/cgroup/t --pin-path /sys/fs/bpf/n$i --run-dir /run/n$i --state-dir /var/n$i > /log$i 2>&1 &
  pid=$!
  ready=no; n=0
  while [ $n -lt 100 ]; do
    [ -e /run/n$i/status.json ] && { ready=yes; break; }
    kill -0 $pid 2>/dev/null || break
    sleep 0.1; n=$((n+1))
  done
  got=none
  if [ $ready = yes ]; then
    got=$(sh -c 'echo $$ > /sys/fs/cgroup/t/cgroup.procs; exec nc -w 2 127.0.0.1 17443 </dev/null' 2>&1 | head -1)
    kill $pid; wait $pid; code=$?
  else
    wait $pid; code=$?
  fi
  refused=$(grep -o 'refused an optional program[^=]*program="[a-z_0-9]*"' /log$i | grep -o '"[a-z_0-9]*"' | tr '\n' ' ')
  err=$(grep -o 'nllb agent: .*' /log$i | cut -c1-140)
  [ $ready = no ] && tail -3 /log$i
  echo "RESULT caps=$caps ready=$ready connect=[$got] exit=$code refused=[$refused] err=[$err]"
  echo $$ > /sys/fs/cgroup/cgroup.procs
done
echo DONE
poweroff -f
