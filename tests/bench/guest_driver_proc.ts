/**
 * The benchmark's guest: a child process running the `lib/testing` VMM front end and virtio-vsock
 * guest driver against the back end under test, controlled by the bench over JSON lines
 * (control.ts).
 *
 * Usage: deno run -A guest_driver_proc.ts --socket PATH [--queue-size 256] [--rx-buf-size 65536]
 *        [--buf-alloc 262144] [--ram-mib 64] [--profile qemu]
 *
 * Since this process does nothing else, it waits synchronously: a command loop pumps the
 * driver (`VsockGuest.pump`), does the command's socket work through the public `GuestConn`
 * API (only calls that complete at once: writes sized to the peer's credit and the free tx
 * descriptors, reads of buffered data), and when nothing moved blocks in poll(2) on the call
 * eventfds and the vhost-user socket. No async poll helper runs on the data path. The rx queue
 * is filled with big buffers (64 KiB + header by default, one per descriptor, re-posted after
 * every pump) and the tx side has one slot per descriptor, so the guest is never short of
 * buffers. Received payload is discarded (`discardIncoming`) or checked (pattern.ts): by samples
 * at full speed, completely in `--quick` runs and the many-connection test.
 *
 * Commands: source, sink, echo, manyOpen, manyTransfer, manyClose, stats (see the handlers).
 */
import { parseArgs } from "node:util";
import { sys } from "../../ffi/libc.ts";
import { cpuSeconds, POLLERR, POLLHUP, POLLIN } from "../../ffi/mod.ts";
import {
  type GuestConn,
  type GuestListener,
  VhostUserFrontEnd,
  VIRTIO_VSOCK_SHUTDOWN_F_SEND,
  VsockGuest,
} from "../../lib/testing/mod.ts";
import { type Command, type EmitFn, sendLine, serveCommands } from "./control.ts";
import {
  chunkAt,
  makePattern,
  MAX_CHUNK,
  parseStreamHeader,
  shiftOf,
  STREAM_HEADER_SIZE,
  StreamChecker,
  streamHeader,
  type VerifyMode,
} from "./pattern.ts";

/** Largest RW payload the driver puts in one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE). */
const MAX_PKT = 65536;
/** Longest single poll (ms): bounds how late a stall is noticed. */
const POLL_SLICE_MS = 100;
/** Largest read from a connection's receive queue per call. */
const READ_MAX = MAX_CHUNK;

const { values: args } = parseArgs({
  args: Deno.args,
  options: {
    socket: { type: "string" },
    profile: { type: "string", default: "qemu" },
    "queue-size": { type: "string", default: "256" },
    "rx-buf-size": { type: "string", default: "65536" },
    "buf-alloc": { type: "string", default: String(256 * 1024) },
    "ram-mib": { type: "string", default: "64" },
    "stall-ms": { type: "string", default: "10000" },
  },
});
if (args.socket === undefined) throw new Error("--socket is required");
const profile = args.profile === "crosvm" ? "crosvm" : "qemu";
const queueSize = Number(args["queue-size"]);
const rxBufSize = Number(args["rx-buf-size"]);
const bufAlloc = Number(args["buf-alloc"]);
const stallMs = Number(args["stall-ms"]);

const fe = await VhostUserFrontEnd.connect(args.socket, {
  profile,
  queueSize,
  regions: [{ gpa: 0, size: Number(args["ram-mib"]) * 1024 * 1024 }],
});
const guest = await VsockGuest.boot(fe, {
  rxBufSize,
  rxRefill: "always",
  txSlots: queueSize,
  bufAlloc,
  timeoutMs: 30000,
});
const pattern = makePattern();
const txq = guest.queue(1);
/** descriptors one data packet takes (header + payload, or one indirect descriptor) */
const descsPerPacket = guest.indirect ? 1 : 2;

/** Blocking poll(2) on the call eventfds and the vhost-user socket, preallocated. */
class CallPoller {
  readonly #pfd: Int32Array;
  readonly #bytes: Uint8Array;
  readonly #rev: Int16Array;
  readonly #count: bigint;
  readonly #calls: number;
  wakeups = 0;
  polls = 0;

  constructor(readonly frontEnd: VhostUserFrontEnd) {
    const fds = [...frontEnd.callFds, frontEnd.socketFd];
    this.#calls = frontEnd.callFds.length;
    this.#pfd = new Int32Array(fds.length * 2);
    this.#rev = new Int16Array(this.#pfd.buffer);
    for (let i = 0; i < fds.length; i++) {
      this.#pfd[2 * i] = fds[i];
      this.#rev[4 * i + 2] = i < this.#calls ? POLLIN : 0;
    }
    this.#bytes = new Uint8Array(this.#pfd.buffer);
    this.#count = BigInt(fds.length);
  }

  /** Waits until a call eventfd fires (and clears it) or `timeoutMs` passes. */
  wait(timeoutMs: number): void {
    this.polls++;
    const n = sys.poll(this.#bytes, this.#count, timeoutMs);
    if (n <= 0) return; // timeout or EINTR
    const rev = this.#rev;
    for (let i = 0; i < this.#calls; i++) {
      if (rev[4 * i + 3] & POLLIN) {
        this.frontEnd.takeCall(i);
        this.wakeups++;
      }
    }
    if (rev[4 * this.#calls + 3] & (POLLHUP | POLLERR)) {
      throw new Error(`the back end closed the vhost-user socket\n${guest.describe()}`);
    }
  }
}
const poller = new CallPoller(fe);

/** Epoch milliseconds with sub-ms resolution, comparable across the bench processes. */
function now(): number {
  return performance.timeOrigin + performance.now();
}

/**
 * The synchronous driving loop: pump, run `step` (returns work done), stop when `done()`; when
 * neither the step nor the rings moved anything, block in poll. Throws after `stallMs` without
 * progress.
 */
async function drive(
  step: () => number | Promise<number>,
  done: () => boolean,
  what: string,
): Promise<void> {
  let last = performance.now();
  let seen = -1;
  for (;;) {
    guest.pump();
    const r = step();
    const work = typeof r === "number" ? r : await r;
    if (done()) return;
    const activity = guest.stats.rxPackets + guest.stats.txPackets;
    const t = performance.now();
    if (work > 0 || activity !== seen) {
      seen = activity;
      last = t;
      if (work > 0) continue;
    } else if (t - last > stallMs) {
      throw new Error(`stalled for ${stallMs} ms: ${what}\n${guest.describe()}`);
    }
    const before = poller.wakeups;
    poller.wait(POLL_SLICE_MS);
    if (poller.wakeups === before && firstQuietPoll === null) firstQuietPoll = ringState(what);
  }
}

/**
 * The rings' state the first time a poll slice passed with no notification while a command was
 * driving (for diagnosing pauses: e.g. a tx packet the device never consumed).
 */
let firstQuietPoll: string | null = null;

function ringState(what: string): string {
  const q = (i: number) => {
    const d = guest.queue(i);
    const ev = guest.features & (1n << 29n) ? ` avail_event ${d.readAvailEvent()}` : "";
    return `q${i} avail ${d.availIdx} used ${d.readUsedIdx()} reaped ${d.lastUsed}${ev}`;
  };
  return `${what} at ${new Date().toISOString()}: ${q(0)}; ${q(1)}; ` +
    `kicks ${guest.stats.kicks.join("/")}; conns ${
      guest.connections.map((c) => c.describe()).join(", ")
    }`;
}

/** Takes the quiet-poll record (and clears it). */
function takeQuietPoll(): string | null {
  const s = firstQuietPoll;
  firstQuietPoll = null;
  return s;
}

/** Counts writes that could not complete at once (they fell back to the async wait). */
let slowWrites = 0;
/** A write that did not complete at once; nothing else is written until it settles. */
let pendingWrite: Promise<void> | null = null;

/**
 * Queues `src` (or its first part) on `conn` if it fits now: at most the peer's credit and what
 * the free tx descriptors carry, so `GuestConn.write` completes synchronously (checked through
 * `bytesSent`; no await on the fast path). Returns the bytes queued (0 if nothing fits). In the
 * rare case the write did not complete (e.g. control packets took the descriptors), it is kept
 * in `pendingWrite` for the caller to await before writing again.
 */
function writeSome(conn: GuestConn, src: Uint8Array): number {
  if (pendingWrite !== null) return 0;
  const fit = Math.min(
    src.length,
    conn.credit.peerFree(),
    Math.floor(txq.numFree / descsPerPacket) * MAX_PKT,
  );
  if (fit <= 0 || conn.state !== "established") return 0;
  const before = conn.bytesSent;
  const p = conn.write(src.subarray(0, fit));
  if (conn.bytesSent - before !== fit) {
    slowWrites++;
    pendingWrite = p.finally(() => pendingWrite = null);
  }
  return fit;
}

/** Awaits a write that did not complete at once (see writeSome). */
async function settleWrite(): Promise<void> {
  if (pendingWrite !== null) await pendingWrite;
}

/** Listens on `port` and drives until one connection is accepted. */
async function acceptOne(l: GuestListener, what: string): Promise<GuestConn> {
  await drive(() => 0, () => l.pending > 0, what);
  return await l.accept();
}

/** Closes `conn` (SHUTDOWN both, wait for the RST) while driving the rings. */
async function closeConn(conn: GuestConn): Promise<void> {
  const closing = conn.close();
  await drive(() => 0, () => conn.closed, `close of ${conn.describe()}`);
  await closing;
}

/** Reads everything buffered on `conn` into `checker`; returns the bytes read. */
async function readInto(conn: GuestConn, checker: StreamChecker): Promise<number> {
  let n = 0;
  while (conn.buffered > 0) {
    const chunk = await conn.read(READ_MAX);
    if (chunk === null) break;
    checker.check(chunk);
    n += chunk.length;
  }
  return n;
}

function usage(cpu0: number, t0: number): Record<string, unknown> {
  return { cpu: cpuSeconds() - cpu0, wall: (now() - t0) / 1000 };
}

/**
 * source {port, writeSize, durationMs, maxBytes?}: connect to host port `port`, write
 * `writeSize`-byte application writes of the pattern until the duration or byte budget is used,
 * then SHUTDOWN(send) and wait for the host to finish (its close).
 */
async function source(msg: Command, emit: EmitFn) {
  const writeSize = Number(msg.writeSize);
  const maxBytes = Number(msg.maxBytes ?? Infinity);
  const conn = await guest.connect(Number(msg.port), 2, { timeoutMs: 10000 });
  emit("connected");
  const cpu0 = cpuSeconds();
  const t0 = now();
  const deadline = t0 + Number(msg.durationMs);
  const wakeups0 = poller.wakeups;
  let sent = 0;
  let inWrite = 0; // bytes of the current application write still to queue
  let finished = false;
  await drive(
    () => {
      if (pendingWrite !== null) return settleWrite().then(() => 1);
      let work = 0;
      for (;;) {
        if (inWrite === 0) {
          if (sent >= maxBytes || now() >= deadline) {
            finished = true;
            return work;
          }
          inWrite = Math.min(writeSize, maxBytes - sent);
        }
        const n = writeSome(conn, chunkAt(pattern, 0, sent, inWrite));
        if (n === 0) return work;
        sent += n;
        inWrite -= n;
        work += n;
      }
    },
    () => finished,
    `guest source on port ${msg.port}`,
  );
  if (pendingWrite !== null) await settleWrite();
  const tWritten = now();
  conn.shutdown(VIRTIO_VSOCK_SHUTDOWN_F_SEND);
  // The host reads to EOF and closes: the back end then ends the connection (SHUTDOWN/RST).
  await drive(() => 0, () => conn.eof || conn.closed, `host close after guest source`);
  const cpu = usage(cpu0, t0);
  await closeConn(conn);
  return {
    bytes: sent,
    t0,
    tWritten,
    ...cpu,
    wakeups: poller.wakeups - wakeups0,
    slowWrites,
    anomalies: guest.anomalies.length,
  };
}

/**
 * sink {port, verify}: listen on guest port `port`, accept one connection, consume it to EOF
 * (discarding, or reading and checking with `verify` "sample"/"full").
 */
async function sink(msg: Command, emit: EmitFn) {
  const verify = (msg.verify ?? "none") as VerifyMode;
  const l = guest.listen(Number(msg.port));
  emit("listening");
  const conn = await acceptOne(l, `a connection on guest port ${msg.port}`);
  l.close();
  const checker = new StreamChecker(pattern, verify, 0, `host->guest port ${msg.port}`);
  if (verify === "none") conn.discardIncoming();
  takeQuietPoll();
  const cpu0 = cpuSeconds();
  const wall0 = now();
  const wakeups0 = poller.wakeups;
  let tFirst = 0;
  // Longest time without new data once data flows (a stall shows up here).
  let lastBytes = 0;
  let lastAt = 0;
  let maxGapMs = 0;
  await drive(
    () => {
      const got = conn.bytesReceived;
      if (got !== lastBytes) {
        const t = performance.now();
        if (tFirst === 0) tFirst = now();
        else if (t - lastAt > maxGapMs) maxGapMs = t - lastAt;
        lastAt = t;
        lastBytes = got;
      }
      return verify === "none" ? 0 : readInto(conn, checker);
    },
    () => conn.eof && conn.buffered === 0,
    `host->guest data on port ${msg.port}`,
  );
  const tEnd = now();
  const cpu = usage(cpu0, wall0);
  await closeConn(conn);
  return {
    bytes: conn.bytesReceived,
    tFirst,
    tEnd,
    ...cpu,
    wakeups: poller.wakeups - wakeups0,
    maxGapMs,
    quietPoll: takeQuietPoll(),
    checked: checker.checked,
    mismatches: checker.mismatches,
    error: checker.error,
    anomalies: guest.anomalies.length,
  };
}

/** echo {port}: accept one connection and send back whatever arrives, until EOF. */
async function echo(msg: Command, emit: EmitFn) {
  const l = guest.listen(Number(msg.port));
  emit("listening");
  const conn = await acceptOne(l, `an echo client on guest port ${msg.port}`);
  l.close();
  const cpu0 = cpuSeconds();
  const t0 = now();
  let echoed = 0;
  await drive(
    async () => {
      let work = 0;
      while (conn.buffered > 0) {
        const chunk = await conn.read(READ_MAX);
        if (chunk === null) break;
        let off = 0;
        while (off < chunk.length) {
          const n = writeSome(conn, chunk.subarray(off));
          if (n === 0) throw new Error("echo: no credit or tx descriptors for the reply");
          off += n;
          if (pendingWrite !== null) await settleWrite();
        }
        work += chunk.length;
        echoed += chunk.length;
      }
      return work;
    },
    () => conn.eof && conn.buffered === 0,
    `echo on port ${msg.port}`,
  );
  const cpu = usage(cpu0, t0);
  await closeConn(conn);
  return { echoed, ...cpu };
}

// ---- many connections --------------------------------------------------------------------------

interface OutStream {
  conn: GuestConn;
  id: number;
  sent: number;
  shut: boolean;
}

interface InStream {
  conn: GuestConn;
  header: Uint8Array;
  headerLen: number;
  checker: StreamChecker | null;
  done: boolean;
}

const many = {
  out: [] as OutStream[],
  in: [] as InStream[],
  listener: null as GuestListener | null,
};

/**
 * manyOpen {listenPort, hostPort, nIn, nOut, firstId}: listen on `listenPort` and accept `nIn`
 * connections from the host while opening `nOut` connections to host port `hostPort`; returns
 * once all are established (they stay open, idle, for manyTransfer).
 */
async function manyOpen(msg: Command, emit: EmitFn) {
  const nIn = Number(msg.nIn);
  const nOut = Number(msg.nOut);
  const firstId = Number(msg.firstId);
  many.listener = guest.listen(Number(msg.listenPort));
  emit("listening");
  const t0 = now();
  const connecting: Promise<GuestConn>[] = [];
  for (let i = 0; i < nOut; i++) {
    connecting.push(guest.connect(Number(msg.hostPort), 2, { timeoutMs: 30000 }));
  }
  // Failures surface through Promise.all below; avoid unhandled rejections meanwhile.
  for (const p of connecting) p.catch(() => {});
  const l = many.listener;
  let failed = 0;
  let settled = 0;
  for (const p of connecting) p.then(() => settled++, () => (settled++, failed++));
  await drive(
    async () => {
      let work = 0;
      while (l.pending > 0) {
        const conn = await l.accept();
        many.in.push({
          conn,
          header: new Uint8Array(STREAM_HEADER_SIZE),
          headerLen: 0,
          checker: null,
          done: false,
        });
        work++;
      }
      return work;
    },
    () => (many.in.length >= nIn && settled >= nOut) || failed > 0,
    "many connections to open",
  );
  const outs = await Promise.all(connecting);
  outs.forEach((conn, i) => many.out.push({ conn, id: firstId + i, sent: 0, shut: false }));
  return { opened: many.in.length + many.out.length, seconds: (now() - t0) / 1000 };
}

/**
 * manyTransfer {bytesPerConn, verify}: every outgoing connection sends its header and
 * `bytesPerConn` pattern bytes (shifted by its id) then SHUTDOWN(send); every incoming one is
 * read to EOF and checked. Returns counts and the first integrity error.
 */
async function manyTransfer(msg: Command) {
  const bytesPerConn = Number(msg.bytesPerConn);
  const verify = (msg.verify ?? "full") as VerifyMode;
  const total = STREAM_HEADER_SIZE + bytesPerConn;
  const cpu0 = cpuSeconds();
  const t0 = now();
  let errors: string[] = [];
  let outDone = 0;
  let inDone = 0;
  let received = 0;
  const seenIds = new Set<number>();
  let rr = 0;
  await drive(
    async () => {
      let work = 0;
      // Senders, round robin from a rotating start so no connection always goes first.
      const outs = many.out;
      for (let k = 0; k < outs.length; k++) {
        const s = outs[(rr + k) % outs.length];
        if (s.shut) continue;
        while (s.sent < total) {
          let chunk: Uint8Array;
          if (s.sent < STREAM_HEADER_SIZE) chunk = streamHeader(s.id).subarray(s.sent);
          else {
            const off = s.sent - STREAM_HEADER_SIZE;
            chunk = chunkAt(pattern, shiftOf(s.id), off, Math.min(MAX_PKT, bytesPerConn - off));
          }
          const n = writeSome(s.conn, chunk);
          if (n === 0) break;
          if (pendingWrite !== null) await settleWrite();
          s.sent += n;
          work += n;
        }
        if (s.sent === total && pendingWrite === null) {
          s.conn.shutdown(VIRTIO_VSOCK_SHUTDOWN_F_SEND);
          s.shut = true;
          outDone++;
        }
      }
      rr = (rr + 1) % Math.max(1, outs.length);
      // Receivers.
      for (const r of many.in) {
        if (r.done) continue;
        while (r.conn.buffered > 0) {
          let chunk = await r.conn.read(READ_MAX);
          if (chunk === null) break;
          work += chunk.length;
          received += chunk.length;
          if (r.headerLen < STREAM_HEADER_SIZE) {
            const k = Math.min(STREAM_HEADER_SIZE - r.headerLen, chunk.length);
            r.header.set(chunk.subarray(0, k), r.headerLen);
            r.headerLen += k;
            chunk = chunk.subarray(k);
            if (r.headerLen === STREAM_HEADER_SIZE) {
              const id = parseStreamHeader(r.header);
              if (id < 0) errors.push(`incoming stream with a bad header`);
              else if (seenIds.has(id)) errors.push(`stream id ${id} seen twice`);
              seenIds.add(id);
              r.checker = new StreamChecker(
                pattern,
                verify,
                shiftOf(Math.max(id, 0)),
                `stream ${id}`,
              );
            }
          }
          if (r.checker !== null && chunk.length > 0) r.checker.check(chunk);
        }
        if (r.conn.eof && r.conn.buffered === 0) {
          r.done = true;
          inDone++;
          const got = r.checker?.offset ?? 0;
          if (got !== bytesPerConn) {
            errors.push(`stream ${r.checker?.label ?? "?"}: ${got} of ${bytesPerConn} bytes`);
          }
          if (r.checker?.error) errors.push(r.checker.error);
        }
      }
      return work;
    },
    () => outDone === many.out.length && inDone === many.in.length,
    "many-connection transfer",
  );
  if (errors.length > 20) errors = errors.slice(0, 20);
  return {
    sent: many.out.reduce((n, s) => n + s.sent - STREAM_HEADER_SIZE, 0),
    received: received - STREAM_HEADER_SIZE * many.in.length,
    streamsIn: many.in.length,
    streamsOut: many.out.length,
    errors,
    ...usage(cpu0, t0),
    anomalies: guest.anomalies.slice(0, 10),
  };
}

/** manyClose: closes every many-connection stream and the listener. */
async function manyClose() {
  const conns = [...many.out.map((s) => s.conn), ...many.in.map((r) => r.conn)];
  const closing = conns.map((c) => c.close());
  await drive(() => 0, () => conns.every((c) => c.closed), "many connections to close");
  await Promise.all(closing);
  many.listener?.close();
  many.out = [];
  many.in = [];
  many.listener = null;
  return { closed: conns.length };
}

/** stats: the driver's CPU time, counters and anomalies. */
function stats() {
  return {
    cpu: cpuSeconds(),
    guestStats: guest.stats,
    polls: poller.polls,
    wakeups: poller.wakeups,
    slowWrites,
    anomalies: guest.anomalies.slice(0, 20),
  };
}

sendLine({
  id: 0,
  ev: "booted",
  profile,
  queueSize,
  rxBufSize,
  rxBuffers: queueSize,
  bufAlloc,
  indirect: guest.indirect,
  features: guest.features.toString(16),
});

await serveCommands(
  { source, sink, echo, manyOpen, manyTransfer, manyClose, stats },
  async () => {
    await guest.close();
    fe.close();
  },
);
