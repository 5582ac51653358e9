/**
 * AF_UNIX sockets: stream/datagram sockets, listen/accept/connect by path,
 * shutdown, SO_ERROR, and sendmsg/recvmsg carrying file descriptors as
 * SCM_RIGHTS ancillary data (how vhost-user passes memory fds and eventfds).
 *
 * Layouts (x86_64): `struct sockaddr_un` = u16 family + 108-byte path;
 * `struct msghdr` = 56 bytes (name ptr, namelen u32 + pad, iov ptr, iovlen u64,
 * control ptr, controllen u64, flags i32 + pad); `struct cmsghdr` = len u64,
 * level i32, type i32, then data aligned to 8.
 */
import { sys } from "./libc.ts";
import { check, EINTR, errno, SysError } from "./errno.ts";

export const AF_UNIX = 1;
export const SOCK_STREAM = 1;
export const SOCK_DGRAM = 2;
export const SOCK_SEQPACKET = 5;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
export const SHUT_RD = 0;
export const SHUT_WR = 1;
export const SHUT_RDWR = 2;
export const SOL_SOCKET = 1;
export const SCM_RIGHTS = 1;
export const SO_ERROR = 4;
export const SO_SNDBUF = 7;
export const SO_RCVBUF = 8;
export const SO_ACCEPTCONN = 30;
export const MSG_CTRUNC = 0x8;
export const MSG_DONTWAIT = 0x40;
export const MSG_NOSIGNAL = 0x4000;
export const MSG_CMSG_CLOEXEC = 0x40000000;

/** Longest path a sockaddr_un holds (108 bytes including the NUL). */
export const UNIX_PATH_MAX = 107;
/** Most fds one vhost-user message may carry (VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_FDS_PER_MESSAGE = 8;

const encoder = new TextEncoder();

/** struct sockaddr_un for `path`; throws a plain Error if the path is too long. */
export function sockaddrUn(path: string): Uint8Array {
  const p = encoder.encode(path);
  if (p.byteLength > UNIX_PATH_MAX) {
    throw new Error(`socket path too long (${p.byteLength} > ${UNIX_PATH_MAX} bytes): ${path}`);
  }
  const a = new Uint8Array(2 + p.byteLength + 1);
  a[0] = AF_UNIX; // sa_family, little endian u16
  a.set(p, 2);
  return a;
}

/** socket(AF_UNIX, type | SOCK_CLOEXEC [| SOCK_NONBLOCK]). */
export function unixSocket(type = SOCK_STREAM, nonblocking = true): number {
  return check(
    "socket",
    sys.socket(AF_UNIX, type | SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0), 0),
  );
}

/** socketpair(AF_UNIX): two connected sockets. */
export function unixSocketPair(type = SOCK_STREAM, nonblocking = true): [number, number] {
  const sv = new Int32Array(2);
  check(
    "socketpair",
    sys.socketpair(AF_UNIX, type | SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0), 0, sv),
  );
  return [sv[0], sv[1]];
}

/** A listening socket bound to `path` (a stale socket file is replaced). */
export function listenUnix(
  path: string,
  opts: { backlog?: number; nonblocking?: boolean; type?: number } = {},
) {
  const addr = sockaddrUn(path);
  try {
    const st = Deno.lstatSync(path);
    if (st.isSocket) Deno.removeSync(path);
  } catch { /* no such file */ }
  const fd = unixSocket(opts.type ?? SOCK_STREAM, opts.nonblocking ?? true);
  try {
    check("bind", sys.bind(fd, addr, addr.byteLength), path);
    check("listen", sys.listen(fd, opts.backlog ?? 128), path);
  } catch (e) {
    sys.close(fd);
    throw e;
  }
  return fd;
}

/** A datagram socket bound to `path` (a stale socket file is replaced). */
export function bindUnixDgram(path: string, nonblocking = true): number {
  const addr = sockaddrUn(path);
  try {
    if (Deno.lstatSync(path).isSocket) Deno.removeSync(path);
  } catch { /* no such file */ }
  const fd = unixSocket(SOCK_DGRAM, nonblocking);
  try {
    check("bind", sys.bind(fd, addr, addr.byteLength), path);
  } catch (e) {
    sys.close(fd);
    throw e;
  }
  return fd;
}

/** accept4 with SOCK_NONBLOCK|SOCK_CLOEXEC; the new fd, or -errno (e.g. -EAGAIN). */
export function acceptRaw(listenFd: number, nonblocking = true): number {
  for (;;) {
    const fd = sys.accept4(listenFd, null, null, SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0));
    if (fd >= 0) return fd;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

/** connect(2) `fd` to `path`: 0 or -errno. Unix sockets connect at once or fail. */
export function connectRaw(fd: number, path: string): number {
  const addr = sockaddrUn(path);
  for (;;) {
    if (sys.connect(fd, addr, addr.byteLength) === 0) return 0;
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

/** A new socket of `type` connected to `path`; throws SysError (ENOENT, ECONNREFUSED...). */
export function connectUnix(path: string, opts: { type?: number; nonblocking?: boolean } = {}) {
  const fd = unixSocket(opts.type ?? SOCK_STREAM, opts.nonblocking ?? true);
  const r = connectRaw(fd, path);
  if (r < 0) {
    sys.close(fd);
    throw new SysError("connect", -r, path);
  }
  return fd;
}

/** shutdown(2): 0 or -errno. */
export function shutdownRaw(fd: number, how: number): number {
  return sys.shutdown(fd, how) === 0 ? 0 : -errno();
}

const intOpt = new Int32Array(1);
const intOptLen = new Uint32Array(1);

/** getsockopt(SOL_SOCKET, opt) for an int option. */
export function getSockOptInt(fd: number, opt: number): number {
  intOptLen[0] = 4;
  check(
    "getsockopt",
    sys.getsockopt(
      fd,
      SOL_SOCKET,
      opt,
      new Uint8Array(intOpt.buffer),
      new Uint8Array(intOptLen.buffer),
    ),
  );
  return intOpt[0];
}

/** setsockopt(SOL_SOCKET, opt) for an int option. */
export function setSockOptInt(fd: number, opt: number, value: number): void {
  intOpt[0] = value;
  check("setsockopt", sys.setsockopt(fd, SOL_SOCKET, opt, new Uint8Array(intOpt.buffer), 4));
}

function ptrValue(buf: Uint8Array): bigint {
  return BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
}

const CMSG_HDR_LEN = 16;

function cmsgSpace(dataLen: number): number {
  return CMSG_HDR_LEN + ((dataLen + 7) & ~7);
}

/**
 * sendmsg(2) of `data` with `fds` attached as SCM_RIGHTS, MSG_NOSIGNAL.
 * Returns bytes sent or -errno. For control paths (allocates a little).
 */
export function sendWithFds(sock: number, data: Uint8Array, fds: readonly number[] = []): number {
  if (fds.length > MAX_FDS_PER_MESSAGE) {
    throw new Error(`too many fds for one message: ${fds.length}`);
  }
  const iov = new BigUint64Array([data.byteLength ? ptrValue(data) : 0n, BigInt(data.byteLength)]);
  const msg = new BigUint64Array(7);
  msg[2] = ptrValue(new Uint8Array(iov.buffer));
  msg[3] = 1n;
  let control: Uint8Array | undefined;
  if (fds.length > 0) {
    control = new Uint8Array(cmsgSpace(4 * fds.length));
    const dv = new DataView(control.buffer);
    dv.setBigUint64(0, BigInt(CMSG_HDR_LEN + 4 * fds.length), true);
    dv.setInt32(8, SOL_SOCKET, true);
    dv.setInt32(12, SCM_RIGHTS, true);
    fds.forEach((fd, i) => dv.setInt32(CMSG_HDR_LEN + 4 * i, fd, true));
    msg[4] = ptrValue(control);
    msg[5] = BigInt(control.byteLength);
  }
  const msgBytes = new Uint8Array(msg.buffer);
  for (;;) {
    const n = sys.sendmsg(sock, msgBytes, MSG_NOSIGNAL);
    if (n >= 0) {
      // keep the buffers alive across the call
      void data.byteLength, void iov.length, void control?.byteLength;
      return n;
    }
    const e = errno();
    if (e !== EINTR) return -e;
  }
}

/** What `recvWithFds` got: byte count (0 = EOF) and received fds (close-on-exec). */
export interface Received {
  n: number;
  fds: number[];
  /** the kernel dropped fds that did not fit (MSG_CTRUNC): they are lost */
  truncated: boolean;
}

/**
 * recvmsg(2) into `buf` (up to `len` bytes), collecting SCM_RIGHTS fds.
 * Returns a Received, or -errno as a number.
 */
export function recvWithFds(
  sock: number,
  buf: Uint8Array,
  len = buf.byteLength,
  flags = 0,
): Received | number {
  const iov = new BigUint64Array([len ? ptrValue(buf) : 0n, BigInt(len)]);
  const control = new Uint8Array(cmsgSpace(4 * MAX_FDS_PER_MESSAGE));
  const msg = new BigUint64Array(7);
  msg[2] = ptrValue(new Uint8Array(iov.buffer));
  msg[3] = 1n;
  msg[4] = ptrValue(control);
  msg[5] = BigInt(control.byteLength);
  const msgBytes = new Uint8Array(msg.buffer);
  let n: number;
  for (;;) {
    n = sys.recvmsg(sock, msgBytes, flags | MSG_CMSG_CLOEXEC);
    if (n >= 0) break;
    const e = errno();
    if (e !== EINTR) return -e;
  }
  const fds: number[] = [];
  const controlLen = Number(msg[5]);
  const dv = new DataView(control.buffer);
  let off = 0;
  while (off + CMSG_HDR_LEN <= controlLen) {
    const cmsgLen = Number(dv.getBigUint64(off, true));
    if (cmsgLen < CMSG_HDR_LEN || off + cmsgLen > controlLen) break;
    const level = dv.getInt32(off + 8, true);
    const type = dv.getInt32(off + 12, true);
    if (level === SOL_SOCKET && type === SCM_RIGHTS) {
      for (let p = off + CMSG_HDR_LEN; p + 4 <= off + cmsgLen; p += 4) {
        fds.push(dv.getInt32(p, true));
      }
    }
    off += cmsgSpace(cmsgLen - CMSG_HDR_LEN);
  }
  const msgFlags = new DataView(msg.buffer).getInt32(48, true);
  return { n, fds, truncated: (msgFlags & MSG_CTRUNC) !== 0 };
}
