#!/usr/bin/env bash
# Run a crosvm guest with this project as its vhost-user vsock device.
#   examples/crosvm.sh <bzImage> [extra crosvm args...]
# crosvm hands the back end all three queues and negotiates DEVICE_STATE, so
# `crosvm snapshot take/restore` carries the device across (TRANSPORT_RESET included).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
kernel=${1:?bzImage}; shift
sock=/tmp/vhost3.socket
"$here/node_modules/.bin/deno" run -A "$here/main.ts" --guest-cid 3 --socket "$sock" --uds-path /tmp/vm3.vsock &
backend=$!
trap 'kill $backend 2>/dev/null' EXIT
while [ ! -S "$sock" ]; do sleep 0.1; done
crosvm run --vhost-user vsock,socket="$sock" "$@" "$kernel"
