#!/usr/bin/env bash
# Builds the tiny Linux guest used by the real-guest end-to-end tests.
#
# Outputs (relative to the repository root):
#   build/e2e/vmlinuz            the newest /boot/vmlinuz-*cloud-amd64 kernel
#   build/e2e/initramfs.cpio.gz  busybox-static + socat (with its shared libraries and the
#                                dynamic loader) + vsock_seq + the virtio-pci and vsock kernel
#                                modules (with a trimmed modules.dep for busybox modprobe) + /init
#   build/e2e/vsock_seq          tests/e2e/vsock_seq.c built with `gcc -static -O2` (the
#                                guest's AF_VSOCK SOCK_SEQPACKET tool: socat and busybox have
#                                none); without gcc and a static libc (Debian: gcc libc6-dev)
#                                it is left out, the reason is in build/e2e/vsock_seq.missing,
#                                and the seqpacket e2e tests are skipped
#
# /init mounts proc/sys/dev, loads virtio_pci and the virtio vsock transport, quiets the
# kernel console, turns off tty echo, prints the ready marker and runs an interactive shell
# on the serial console (setsid cttyhack sh, respawned if it exits). tests/e2e/guest_vm.ts
# drives that shell.
#
# Idempotent: a stamp of every input (this script, the kernel, busybox, socat, its
# libraries and the modules: path, size, mtime) is kept next to the outputs; when it
# matches, nothing is rebuilt. Set E2E_FORCE_REBUILD=1 to rebuild anyway.
# Needs the Debian packages linux-image-cloud-amd64, busybox-static and socat (and gcc +
# libc6-dev for vsock_seq).
set -euo pipefail

READY_MARKER="E2E-GUEST-READY"

die() {
  echo "build_initramfs: $*" >&2
  exit 1
}

script_path="$(readlink -f "${BASH_SOURCE[0]}")"
repo_root="$(cd "$(dirname "$script_path")/../.." && pwd)"
out_dir="${E2E_BUILD_DIR:-$repo_root/build/e2e}"
out_initrd="$out_dir/initramfs.cpio.gz"
out_kernel="$out_dir/vmlinuz"
out_vsock_seq="$out_dir/vsock_seq"
vsock_seq_missing="$out_dir/vsock_seq.missing"
vsock_seq_src="$repo_root/tests/e2e/vsock_seq.c"
stamp_file="$out_dir/.inputs.stamp"

# ---- locate inputs -------------------------------------------------------------------------

kernel="$(ls -1 /boot/vmlinuz-*cloud-amd64 2>/dev/null | sort -V | tail -n 1 || true)"
[ -n "$kernel" ] && [ -r "$kernel" ] ||
  die "no readable /boot/vmlinuz-*cloud-amd64 (install: apt-get install linux-image-cloud-amd64)"
kver="${kernel#/boot/vmlinuz-}"
moddir="/lib/modules/$kver"
[ -r "$moddir/modules.dep" ] || die "missing $moddir/modules.dep (reinstall linux-image-$kver)"
kconfig="/boot/config-$kver"

busybox=""
for candidate in /bin/busybox /usr/bin/busybox; do
  if [ -x "$candidate" ]; then busybox="$candidate"; break; fi
done
[ -n "$busybox" ] || die "busybox not found (install: apt-get install busybox-static)"
# (not "busybox --list | grep -q": with pipefail, grep quitting early fails the pipe)
applets="$("$busybox" --list)" || die "$busybox --list failed"
grep -qx cttyhack <<<"$applets" ||
  die "$busybox lacks the cttyhack applet (install: apt-get install busybox-static)"

socat="$(command -v socat || true)"
[ -n "$socat" ] || die "socat not found (install: apt-get install socat)"
socat="$(readlink -f "$socat")"
command -v ldd >/dev/null || die "ldd not found (install: apt-get install libc-bin)"
command -v gzip >/dev/null || die "gzip not found (install: apt-get install gzip)"

# Shared libraries of an executable, absolute paths as the loader resolves them (including
# the loader itself). Prints nothing for a static executable.
shared_libs() {
  local out
  out="$(ldd "$1" 2>&1)" || {
    case "$out" in
    *"not a dynamic executable"* | *"statically linked"*) return 0 ;;
    *) die "ldd $1 failed: $out" ;;
    esac
  }
  if grep -q "not found" <<<"$out"; then die "ldd $1: missing libraries:"$'\n'"$out"; fi
  awk '/=> \// { print $3; next } /^[[:space:]]*\// { print $1 }' <<<"$out"
}

# Modules /init loads (with their dependencies; a built-in one is skipped) and extras that
# are only copied (vsock_loopback lets a test exercise AF_VSOCK inside the guest without a backend).
wanted_modules=(virtio_pci vmw_vsock_virtio_transport)
extra_modules=(vsock_loopback)

# Resolves module names against modules.dep in one pass. Prints one line per result:
#   "mod <relpath>"      every module to copy, dependencies first
#   "load <name>"        a wanted module to load at boot (in order)
#   "builtin <name>"     built into the kernel: nothing to load
#   "missing <name>"     neither a module nor built in
# Usage: resolve_modules <wanted...> -- <extra...>
resolve_modules() {
  awk -v args="$*" '
    function base(p) { sub(/^.*\//, "", p); sub(/\.ko(\.[a-z]+)?$/, "", p); gsub(/-/, "_", p); return p }
    function visit(p,   n, i, d) {
      if (p in seen) return
      seen[p] = 1
      n = split(deps[p], d, " ")
      for (i = 1; i <= n; i++) visit(d[i])
      print "mod " p
    }
    FILENAME == builtin_file { builtin[base($0)] = 1; next }
    { split($0, kv, ":"); path[base(kv[1])] = kv[1]; deps[kv[1]] = kv[2] }
    END {
      n = split(args, a, " "); extra = 0
      for (i = 1; i <= n; i++) {
        if (a[i] == "--") { extra = 1; continue }
        name = a[i]; gsub(/-/, "_", name)
        if (name in path) { visit(path[name]); if (!extra) print "load " name }
        else if (name in builtin) print "builtin " name
        else print "missing " name
      }
    }' builtin_file="$moddir/modules.builtin" "$moddir/modules.builtin" "$moddir/modules.dep"
}

resolved="$(resolve_modules "${wanted_modules[@]}" -- "${extra_modules[@]}")"
ordered_mods=()
load_order=()
while read -r kind value; do
  case "$kind" in
  mod) ordered_mods+=("$value") ;;
  load) load_order+=("$value") ;;
  builtin) ;;
  missing)
    die "kernel module $value is neither in $moddir/modules.dep nor built in (see $kconfig)"
    ;;
  esac
done <<<"$resolved"

# ---- idempotence ---------------------------------------------------------------------------

socat_libs_txt="$(shared_libs "$socat")"
busybox_libs_txt="$(shared_libs "$busybox")"
mapfile -t socat_libs <<<"$socat_libs_txt"
mapfile -t busybox_libs <<<"$busybox_libs_txt"
# An empty list (static busybox) reads as one empty line: drop it.
[ -n "$busybox_libs_txt" ] || busybox_libs=()
inputs=("$script_path" "$kernel" "$busybox" "$socat" "${socat_libs[@]}" "${busybox_libs[@]}")
inputs+=("$vsock_seq_src")
gcc="$(command -v gcc || true)"
[ -z "$gcc" ] || inputs+=("$(readlink -f "$gcc")")
for rel in "${ordered_mods[@]}"; do inputs+=("$moddir/$rel"); done
stamp="$(for f in "${inputs[@]}"; do stat -L -c '%n %s %Y' "$f"; done | sha256sum | cut -d' ' -f1)"

if [ "${E2E_FORCE_REBUILD:-0}" != 1 ] && [ -s "$out_initrd" ] && [ -s "$out_kernel" ] &&
  [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ]; then
  echo "build_initramfs: up to date ($out_initrd)"
  exit 0
fi

# ---- assemble the root file system ---------------------------------------------------------

mkdir -p "$out_dir"
root="$(mktemp -d "$out_dir/.root.XXXXXX")"
tmp_out="$out_initrd.tmp.$$"
trap 'rm -rf "$root" "$tmp_out" "$out_kernel.tmp.$$" "$stamp_file.tmp.$$" "$out_vsock_seq.tmp.$$"' EXIT

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,lib64}
chmod 1777 "$root/tmp"

cp "$busybox" "$root/bin/busybox"

# vsock_seq: static, so it needs nothing else in the guest. Optional (see the header).
rm -f "$vsock_seq_missing"
if [ -z "$gcc" ]; then
  echo "gcc not found (install: apt-get install gcc libc6-dev)" >"$vsock_seq_missing"
elif ! gcc_out="$("$gcc" -static -O2 -Wall -o "$out_vsock_seq.tmp.$$" "$vsock_seq_src" 2>&1)"; then
  printf 'gcc -static failed (install: apt-get install gcc libc6-dev):\n%s\n' "$gcc_out" \
    >"$vsock_seq_missing"
  rm -f "$out_vsock_seq.tmp.$$"
else
  mv -f "$out_vsock_seq.tmp.$$" "$out_vsock_seq"
  cp "$out_vsock_seq" "$root/usr/bin/vsock_seq"
fi
if [ -e "$vsock_seq_missing" ]; then
  rm -f "$out_vsock_seq"
  echo "build_initramfs: vsock_seq left out, seqpacket e2e tests will be skipped: $(head -n 1 "$vsock_seq_missing")" >&2
fi
ln -s busybox "$root/bin/sh" # the other applet links are made by /init (busybox --install)

# socat and its libraries at the paths the loader looks for them.
cp "$socat" "$root/usr/bin/socat"
for lib in "${socat_libs[@]}" "${busybox_libs[@]}"; do
  dest="$root/${lib#/}"
  mkdir -p "$(dirname "$dest")"
  cp -L "$lib" "$dest"
done

# Kernel modules at their usual place plus a trimmed modules.dep for busybox modprobe.
for rel in "${ordered_mods[@]}"; do
  mkdir -p "$root/lib/modules/$kver/$(dirname "$rel")"
  cp "$moddir/$rel" "$root/lib/modules/$kver/$rel"
done
awk -v keep="${ordered_mods[*]}" '
  BEGIN { n = split(keep, k, " "); for (i = 1; i <= n; i++) want[k[i]] = 1 }
  { split($0, kv, ":"); if (kv[1] in want) print }' "$moddir/modules.dep" >"$root/lib/modules/$kver/modules.dep"

cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
EOF

cat >"$root/init" <<EOF
#!/bin/sh
# Guest init for the vhost-user-vsock e2e harness (generated by tests/e2e/build_initramfs.sh).
/bin/busybox --install -s
export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root PS1= PS2= ENV=
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
# Only emergencies reach the console: kernel lines must not interleave with command output.
# The full kernel log stays available through dmesg.
echo 1 > /proc/sys/kernel/printk
for m in ${load_order[*]}; do
  modprobe "\$m" || echo "E2E-GUEST-MODPROBE-FAILED \$m"
done
stty -F /dev/ttyS0 -echo -echoctl
echo "$READY_MARKER \$(cut -d' ' -f1 /proc/uptime)"
while true; do
  setsid cttyhack sh
  echo "E2E-GUEST-SHELL-EXITED"
done
EOF
chmod 755 "$root/init"

# ---- archive -------------------------------------------------------------------------------

(
  cd "$root"
  if [[ "$(cpio --version 2>/dev/null || true)" == *GNU* ]]; then
    find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible
  else
    find . -mindepth 1 | LC_ALL=C sort | "$busybox" cpio -o -H newc -R 0:0
  fi
) | gzip -6 -n >"$tmp_out"
# Renames are atomic, so a concurrent reader (a parallel test) sees the old or the new file.
cp -f "$kernel" "$out_kernel.tmp.$$"
mv -f "$out_kernel.tmp.$$" "$out_kernel"
mv -f "$tmp_out" "$out_initrd"
echo "$stamp" >"$stamp_file.tmp.$$"
mv -f "$stamp_file.tmp.$$" "$stamp_file"
echo "build_initramfs: built $out_initrd ($(stat -c %s "$out_initrd") bytes, kernel $kver," \
  "modules: ${load_order[*]})"
