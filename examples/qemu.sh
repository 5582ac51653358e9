#!/usr/bin/env bash
# Boot a QEMU guest with a vhost-user-vsock device served by this project.
#   examples/qemu.sh <kernel> <initrd> [extra qemu args...]
# Host apps then reach the guest through /tmp/vm3.vsock ("CONNECT <port>\n"), and the guest
# reaches host services listening on /tmp/vm3.vsock_<port> by connecting to CID 2.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
kernel=${1:?kernel image}; initrd=${2:?initrd}; shift 2
sock=/tmp/vhost3.socket
"$here/node_modules/.bin/deno" run -A "$here/main.ts" --guest-cid 3 --socket "$sock" --uds-path /tmp/vm3.vsock &
backend=$!
trap 'kill $backend 2>/dev/null' EXIT
while [ ! -S "$sock" ]; do sleep 0.1; done
accel=tcg; [ -w /dev/kvm ] && accel=kvm
qemu-system-x86_64 -accel "$accel" -m 512M -smp 1 -nographic \
  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
  -chardev socket,id=vsock0,path="$sock" \
  -device vhost-user-vsock-pci,chardev=vsock0 \
  -kernel "$kernel" -initrd "$initrd" -append "console=ttyS0" "$@"
