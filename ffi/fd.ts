/**
 * File descriptors: read/write/readv/writev, close, pipes, non-blocking mode.
 *
 * Two flavours of each I/O call:
 * - `*Raw` functions return the byte count or a negative errno (`-EAGAIN`) and never
 *   throw: they are for the reactor's hot paths, where EAGAIN is routine.
 * - the others throw `SysError` on failure: for set-up and control paths.
 *
 * iovec arrays are `BigUint64Array`s of (iov_base, iov_len) pairs, preallocated
 * by the caller, so a readv/writev costs one FFI call and no allocation.
 */
import { sys } from "./libc.ts";
import { check, EINTR, errno, SysError } from "./errno.ts";

export const O_NONBLOCK = 0o4000;
export const O_CLOEXEC = 0o2000000;
const F_GETFL = 3;
const F_SETFL = 4;

/** read(2) into `buf`; bytes read (0 = EOF) or -errno. */
export function readRaw(fd: number, buf: Uint8Array, len = buf.byteLength): number {
  for (;;) {
    const n = sys.read(fd, buf, BigInt(len));
    if (n >= 0) return n;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

/** write(2) from `buf`; bytes written or -errno. */
export function writeRaw(fd: number, buf: Uint8Array, len = buf.byteLength): number {
  for (;;) {
    const n = sys.write(fd, buf, BigInt(len));
    if (n >= 0) return n;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

/** readv(2) with `count` (base, len) pairs from `iov`; bytes read or -errno. */
export function readvRaw(fd: number, iov: BigUint64Array, count: number): number {
  for (;;) {
    const n = sys.readv(fd, iov, count);
    if (n >= 0) return n;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

/** writev(2) with `count` (base, len) pairs from `iov`; bytes written or -errno. */
export function writevRaw(fd: number, iov: BigUint64Array, count: number): number {
  for (;;) {
    const n = sys.writev(fd, iov, count);
    if (n >= 0) return n;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

/** read(2), throwing on error. */
export function read(fd: number, buf: Uint8Array, len = buf.byteLength): number {
  const n = readRaw(fd, buf, len);
  return n < 0 ? check("read", -1, `fd ${fd}`) : n;
}

/** write(2) of the whole buffer on a blocking fd, throwing on error. */
export function writeAll(fd: number, buf: Uint8Array): void {
  let off = 0;
  while (off < buf.byteLength) {
    const n = writeRaw(fd, buf.subarray(off), buf.byteLength - off);
    if (n < 0) throw sysErrorFromNeg("write", n, fd);
    off += n;
  }
}

/** close(2); errors other than EBADF are ignored (the fd is gone either way). */
export function close(fd: number): void {
  if (fd >= 0) sys.close(fd);
}

/** dup(2) with the result returned (throws on error). */
export function dup(fd: number): number {
  return check("dup", sys.dup(fd));
}

/** pipe2(2): [readEnd, writeEnd], close-on-exec, optionally non-blocking. */
export function pipe(nonblocking = false): [number, number] {
  const fds = new Int32Array(2);
  check("pipe2", sys.pipe2(fds, O_CLOEXEC | (nonblocking ? O_NONBLOCK : 0)));
  return [fds[0], fds[1]];
}

/** Sets or clears O_NONBLOCK. */
export function setNonBlocking(fd: number, on = true): void {
  const flags = check("fcntl", sys.fcntl(fd, F_GETFL, 0));
  check("fcntl", sys.fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK));
}

/** Whether `fd` is an open descriptor of this process. */
export function isOpen(fd: number): boolean {
  return sys.fcntl(fd, F_GETFL, 0) >= 0;
}

/** Builds a SysError from a `*Raw` result (a negative errno). */
export function sysErrorFromNeg(syscall: string, neg: number, fd?: number): SysError {
  return new SysError(syscall, -neg, fd === undefined ? undefined : `fd ${fd}`);
}

/** Number of open fds of this process (for leak tests). */
export function openFdCount(): number {
  let n = 0;
  for (const _ of Deno.readDirSync("/proc/self/fd")) n++;
  return n;
}
