/**
 * Readiness and wakeups: epoll, eventfd, timerfd, poll.
 *
 * `struct epoll_event` is packed on x86_64: u32 events then u64 data (12 bytes);
 * the project stores an fd in the low 32 bits of data, so an event array is read
 * as a Uint32Array of (events, fd, 0) triples.
 */
import { sys } from "./libc.ts";
import { check, EAGAIN, EINTR, errno } from "./errno.ts";

export const EPOLLIN = 0x001;
export const EPOLLPRI = 0x002;
export const EPOLLOUT = 0x004;
export const EPOLLERR = 0x008;
export const EPOLLHUP = 0x010;
export const EPOLLRDHUP = 0x2000;
export const EPOLLET = 1 << 31;
export const EPOLL_CTL_ADD = 1;
export const EPOLL_CTL_DEL = 2;
export const EPOLL_CTL_MOD = 3;
export const EPOLL_CLOEXEC = 0o2000000;
export const EFD_CLOEXEC = 0o2000000;
export const EFD_NONBLOCK = 0o4000;
export const TFD_CLOEXEC = 0o2000000;
export const TFD_NONBLOCK = 0o4000;
export const CLOCK_MONOTONIC = 1;
export const POLLIN = 0x1;
export const POLLOUT = 0x4;
export const POLLERR = 0x8;
export const POLLHUP = 0x10;

/** An epoll instance with a preallocated event array. */
export class Epoll {
  readonly fd: number;
  /** (events, fd, unused) triples filled by `wait` */
  readonly events: Uint32Array;
  readonly #raw: Uint8Array;
  readonly #ctl = new Uint32Array(3);
  readonly #ctlBytes = new Uint8Array(this.#ctl.buffer);

  constructor(readonly maxEvents = 256) {
    this.fd = check("epoll_create1", sys.epoll_create1(EPOLL_CLOEXEC));
    this.events = new Uint32Array(maxEvents * 3);
    this.#raw = new Uint8Array(this.events.buffer);
  }

  #op(op: number, fd: number, events: number): void {
    this.#ctl[0] = events >>> 0;
    this.#ctl[1] = fd;
    this.#ctl[2] = 0;
    check("epoll_ctl", sys.epoll_ctl(this.fd, op, fd, this.#ctlBytes), `fd ${fd}`);
  }
  add(fd: number, events: number): void {
    this.#op(EPOLL_CTL_ADD, fd, events);
  }
  modify(fd: number, events: number): void {
    this.#op(EPOLL_CTL_MOD, fd, events);
  }
  delete(fd: number): void {
    if (sys.epoll_ctl(this.fd, EPOLL_CTL_DEL, fd, this.#ctlBytes) !== 0) {
      // ENOENT/EBADF: already gone; nothing to undo
    }
  }
  /** epoll_wait; returns the number of ready events (0 on timeout or EINTR). */
  wait(timeoutMs: number): number {
    const n = sys.epoll_wait(this.fd, this.#raw, this.maxEvents, timeoutMs);
    if (n >= 0) return n;
    const e = errno();
    if (e === EINTR) return 0;
    return check("epoll_wait", -1);
  }
  close(): void {
    sys.close(this.fd);
  }
}

const u64 = new BigUint64Array(1);
const u64Bytes = new Uint8Array(u64.buffer);

/** eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK). */
export function eventFd(nonblocking = true): number {
  return check("eventfd", sys.eventfd(0, EFD_CLOEXEC | (nonblocking ? EFD_NONBLOCK : 0)));
}

/** Adds 1 (or n) to an eventfd counter. EAGAIN (counter saturated) is ignored. */
export function eventFdWrite(fd: number, n = 1n): void {
  u64[0] = n;
  for (;;) {
    if (sys.write(fd, u64Bytes, 8n) === 8) return;
    const e = errno();
    if (e === EINTR) continue;
    if (e === EAGAIN) return;
    check("eventfd write", -1, `fd ${fd}`);
  }
}

/** Reads and clears a non-blocking eventfd; returns the counter (0 if it was 0). */
export function eventFdRead(fd: number): bigint {
  for (;;) {
    if (sys.read(fd, u64Bytes, 8n) === 8) return u64[0];
    const e = errno();
    if (e === EINTR) continue;
    if (e === EAGAIN) return 0n;
    check("eventfd read", -1, `fd ${fd}`);
  }
}

/** timerfd_create(CLOCK_MONOTONIC, NONBLOCK|CLOEXEC). */
export function timerFd(): number {
  return check("timerfd_create", sys.timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));
}

const itimerspec = new BigInt64Array(4);

/** Arms a timerfd to fire once after `ms` milliseconds (0 disarms). */
export function timerFdArm(fd: number, ms: number): void {
  itimerspec[0] = 0n;
  itimerspec[1] = 0n;
  const ns = BigInt(Math.max(0, Math.round(ms * 1e6)));
  itimerspec[2] = ns / 1_000_000_000n;
  itimerspec[3] = ns % 1_000_000_000n;
  if (ms > 0 && ns === 0n) itimerspec[3] = 1n;
  check("timerfd_settime", sys.timerfd_settime(fd, 0, new Uint8Array(itimerspec.buffer), null));
}

/**
 * poll(2) on a set of fds; returns a revents array parallel to `fds`.
 * For the testing library and tools; the backend uses epoll.
 */
export function pollFds(fds: readonly number[], events: readonly number[], timeoutMs: number) {
  const pfd = new Int32Array(fds.length * 2);
  const v = new Int16Array(pfd.buffer);
  for (let i = 0; i < fds.length; i++) {
    pfd[2 * i] = fds[i];
    v[4 * i + 2] = events[i];
  }
  for (;;) {
    const n = sys.poll(new Uint8Array(pfd.buffer), BigInt(fds.length), timeoutMs);
    if (n >= 0) break;
    if (errno() !== EINTR) check("poll", -1);
  }
  const out: number[] = [];
  for (let i = 0; i < fds.length; i++) out.push(v[4 * i + 3]);
  return out;
}

/**
 * poll(2) on a helper thread: resolves with the revents array (parallel to `fds`)
 * without blocking the JS thread's event loop. ~5 µs more per call than `pollFds`.
 */
export async function pollFdsAsync(
  fds: readonly number[],
  events: readonly number[],
  timeoutMs: number,
): Promise<number[]> {
  const pfd = new Int32Array(fds.length * 2);
  const v = new Int16Array(pfd.buffer);
  for (let i = 0; i < fds.length; i++) {
    pfd[2 * i] = fds[i];
    v[4 * i + 2] = events[i];
  }
  const n = await sys.poll_async(new Uint8Array(pfd.buffer), BigInt(fds.length), timeoutMs);
  const out: number[] = [];
  for (let i = 0; i < fds.length; i++) out.push(n > 0 ? v[4 * i + 3] : 0);
  return out;
}
