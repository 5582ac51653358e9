/**
 * The fairness figure's raw AF_UNIX baseline (fairness.ts): `mixRaw` plays the guest's part of
 * guest_driver_proc.ts `mix` over plain Unix sockets, with no back end in between, so the
 * figure shows what the machine itself gives the same flows.
 *
 * Like the guest (one kernel serving several sockets), one process serves every flow in one
 * level-triggered epoll loop: an echo service (each readable turn: one read of up to 64 KiB,
 * written straight back; a partial write waits for EPOLLOUT before the next read), one
 * connection per bulk stream read to EOF with one 64 KiB read per readable turn and checked
 * against the pattern (`StreamChecker`, like the host app's `sink`), and a SOCK_DGRAM socket
 * whose datagrams are counted and discarded (up to `DGRAM_BURST` per readable turn). Nothing
 * is allocated per read.
 *
 * Plain AF_UNIX datagrams are never dropped: a connected sender gets EAGAIN while the
 * receiver's queue (net.unix.max_dgram_qlen) is full, so every datagram the load sent is
 * counted here (those still queued when the streams end are drained before returning).
 */
import {
  acceptRaw,
  bindUnixDgram,
  close,
  cpuSeconds,
  EAGAIN,
  Epoll,
  EPOLLIN,
  EPOLLOUT,
  listenUnix,
  readRaw,
  writeRaw,
} from "../../ffi/mod.ts";
import type { Command, EmitFn } from "./control.ts";
import { StreamChecker, type VerifyMode } from "./pattern.ts";
import { ArrivalClock, now, sinkResult } from "./stream_clock.ts";

/** Bytes per stream read (the guest's sockets and the host app's `sink` read 64 KiB too). */
const READ_SIZE = 65536;
/** Datagrams received per readable turn at most, so the streams get their turn. */
const DGRAM_BURST = 64;
/** Longest epoll wait, so the deadline is looked at. */
const POLL_SLICE_MS = 100;

function removeSocketFile(path: string): void {
  try {
    Deno.removeSync(path);
  } catch { /* gone */ }
}

/** A listener at `path` that accepts one connection, then goes away (the guest's unlisten). */
class OneShotListener {
  fd: number;

  constructor(readonly path: string) {
    this.fd = listenUnix(path, { backlog: 16, nonblocking: true });
  }

  /** The accepted connection (non-blocking), or -1 while none is pending. */
  accept(): number {
    const fd = acceptRaw(this.fd, true);
    if (fd === -EAGAIN) return -1;
    if (fd < 0) throw new Error(`accept at ${this.path}: errno ${-fd}`);
    this.close();
    return fd;
  }

  close(): void {
    if (this.fd < 0) return;
    close(this.fd);
    this.fd = -1;
    removeSocketFile(this.path);
  }
}

/** One bulk stream read to EOF and checked, with its arrival timing. */
class RawSink {
  fd = -1;
  readonly checker: StreamChecker;
  readonly clock = new ArrivalClock();

  constructor(pattern: Uint8Array, readonly verify: VerifyMode, readonly path: string) {
    this.checker = new StreamChecker(pattern, verify, 0, `raw stream at ${path}`);
  }

  get eof(): boolean {
    return this.clock.tEnd !== 0;
  }

  /** One read into `buf`; at EOF closes the connection. */
  read(buf: Uint8Array): void {
    const n = readRaw(this.fd, buf, READ_SIZE);
    if (n === -EAGAIN) return;
    if (n < 0) throw new Error(`read of the raw stream at ${this.path}: errno ${-n}`);
    if (n === 0) {
      this.clock.ended();
      close(this.fd);
      this.fd = -1;
      return;
    }
    this.clock.arrived();
    this.checker.check(buf.subarray(0, n));
  }

  result() {
    return sinkResult(this.checker.offset, this.clock, this.checker, this.verify);
  }
}

/** The echo service on one connection. */
class RawEcho {
  fd = -1;
  closed = false;
  echoed = 0;
  readonly #buf = new Uint8Array(READ_SIZE);
  #off = 0;
  #end = 0;

  constructor(readonly ep: Epoll) {}

  /** Reads once and writes it back (readable), or writes what is left (writable). */
  ready(): void {
    const waitingToWrite = this.#off !== this.#end;
    if (!waitingToWrite) {
      const n = readRaw(this.fd, this.#buf, READ_SIZE);
      if (n === -EAGAIN) return;
      if (n <= 0) { // EOF, or the client went away: the echo is over either way
        close(this.fd);
        this.fd = -1;
        this.closed = true;
        return;
      }
      this.#off = 0;
      this.#end = n;
    }
    const from = this.#off === 0 ? this.#buf : this.#buf.subarray(this.#off); // 0: nearly always
    const w = writeRaw(this.fd, from, this.#end - this.#off);
    if (w < 0 && w !== -EAGAIN) throw new Error(`echo write: errno ${-w}`);
    if (w > 0) {
      this.#off += w;
      this.echoed += w;
    }
    const pending = this.#off !== this.#end;
    if (pending !== waitingToWrite) this.ep.modify(this.fd, pending ? EPOLLOUT : EPOLLIN);
    if (!pending) this.#off = this.#end = 0;
  }
}

/**
 * mixRaw {echoPath, sinkPaths, dgramPath, verify, timeoutMs}: listens at `echoPath` (null:
 * no echo) and echoes the one connection there, accepts one connection at each of `sinkPaths`
 * and reads it to EOF checked by `verify`, and binds a datagram socket at `dgramPath` (null:
 * none) whose datagrams it counts. Emits "listening" once all are bound; ends when every
 * stream reached EOF and the echo connection closed, or throws after `timeoutMs`. The result
 * has the shape of the guest's `mix` (sinks in `sinkPaths` order).
 */
export function mixRaw(msg: Command, emit: EmitFn, pattern: Uint8Array) {
  const verify = (msg.verify ?? "sample") as VerifyMode;
  const echoPath = msg.echoPath === null || msg.echoPath === undefined
    ? null
    : String(msg.echoPath);
  const sinkPaths = (msg.sinkPaths as unknown[]).map(String);
  const dgramPath = msg.dgramPath === null || msg.dgramPath === undefined
    ? null
    : String(msg.dgramPath);
  const deadline = now() + Number(msg.timeoutMs ?? 60000);
  const readBuf = new Uint8Array(READ_SIZE);
  const ep = new Epoll(64);
  const echo = echoPath === null ? null : new RawEcho(ep);
  const sinks = sinkPaths.map((p) => new RawSink(pattern, verify, p));
  /** what each registered fd stands for */
  const onReady = new Map<number, () => void>();
  const listeners: OneShotListener[] = [];
  const listenFor = (path: string, take: (fd: number) => void, serve: () => void) => {
    const l = new OneShotListener(path);
    listeners.push(l);
    const lfd = l.fd;
    ep.add(lfd, EPOLLIN);
    onReady.set(lfd, () => {
      const fd = l.accept();
      if (fd < 0) return;
      onReady.delete(lfd); // closing the listener took it out of the epoll set
      take(fd);
      onReady.set(fd, serve);
      ep.add(fd, EPOLLIN);
    });
  };
  let dfd = -1;
  let datagrams = 0;
  let dgramBytes = 0;
  const receiveDatagrams = (max: number) => {
    for (let k = 0; k < max; k++) {
      const n = readRaw(dfd, readBuf, READ_SIZE);
      if (n === -EAGAIN) return;
      if (n < 0) throw new Error(`datagram receive at ${dgramPath}: errno ${-n}`);
      datagrams++;
      dgramBytes += n;
    }
  };
  try {
    if (echo !== null) {
      listenFor(echoPath!, (fd) => (echo.fd = fd), () => echo.ready());
    }
    for (const s of sinks) listenFor(s.path, (fd) => (s.fd = fd), () => s.read(readBuf));
    if (dgramPath !== null) {
      dfd = bindUnixDgram(dgramPath);
      ep.add(dfd, EPOLLIN);
      onReady.set(dfd, () => receiveDatagrams(DGRAM_BURST));
    }
    emit("listening");
    const cpu0 = cpuSeconds();
    const t0 = now();
    let wakeups = 0;
    const done = () => sinks.every((s) => s.eof) && (echo === null || echo.closed);
    while (!done()) {
      if (now() > deadline) {
        const open = sinks.filter((s) => !s.eof).map((s) => s.path);
        throw new Error(
          `raw fairness mix unfinished after ${msg.timeoutMs} ms: streams without EOF ` +
            `[${open.join(", ")}], echo ${
              echo === null ? "none" : echo.closed ? "closed" : "open"
            }`,
        );
      }
      const n = ep.wait(POLL_SLICE_MS);
      if (n > 0) wakeups++;
      for (let i = 0; i < n; i++) onReady.get(ep.events[3 * i + 1])?.();
    }
    if (dfd >= 0) receiveDatagrams(Infinity); // what was sent before the streams ended
    return {
      sinks: sinks.map((s) => s.result()),
      echoed: echo?.echoed ?? 0,
      datagrams,
      dgramBytes,
      cpu: cpuSeconds() - cpu0,
      wall: (now() - t0) / 1000,
      wakeups,
      anomalies: [],
    };
  } finally {
    for (const l of listeners) l.close();
    for (const fd of [echo?.fd ?? -1, ...sinks.map((s) => s.fd), dfd]) if (fd >= 0) close(fd);
    if (dgramPath !== null) removeSocketFile(dgramPath);
    ep.close();
  }
}
