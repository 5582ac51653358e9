/**
 * The benchmark's guest process: the lean virtio-vsock driver (lean_guest.ts) behind the
 * `lib/testing` VMM front end, against the back end under test, controlled by the bench over
 * JSON lines (control.ts).
 *
 * Usage: deno run -A guest_driver_proc.ts --socket PATH [--queue-size 256] [--rx-buf-size 4096]
 *        [--buf-alloc 262144] [--ram-mib 64] [--profile qemu] [--stall-ms 10000] [--packed]
 *
 * `--packed`: the VMM offers VIRTIO_F_RING_PACKED and the guest lays out packed rings (the
 * back end must offer the feature, else the boot fails saying so).
 *
 * It costs about what a kernel driver costs: payload is sent by reference from a pool in guest
 * RAM filled once (no copy per packet), received payload is checked in place by samples (or
 * every byte in `--quick` runs and the many-connection test) and rx buffers are re-posted as
 * they are. Every command runs synchronously: pump the rings, do the command's socket work,
 * and block in poll(2) on the call eventfds when nothing moved.
 *
 * Commands: source, sink, echo, mix, manyOpen, manyTransfer, manyClose, stats (see the
 * handlers).
 */
import { parseArgs } from "node:util";
import { cpuSeconds } from "../../ffi/mod.ts";
import { type Command, type EmitFn, sendLine, serveCommands } from "./control.ts";
import {
  type LeanConn,
  LeanGuest,
  type LeanListener,
  VIRTIO_VSOCK_SHUTDOWN_F_SEND,
} from "./lean_guest.ts";
import { INLINE_MAX } from "./lean_rings.ts";
import {
  makePattern,
  parseStreamHeader,
  shiftOf,
  STREAM_HEADER_SIZE,
  StreamChecker,
  streamHeader,
  type VerifyMode,
} from "./pattern.ts";
import {
  ArrivalClock,
  now,
  PING_STAMP_ARRIVED,
  PING_STAMP_ECHOED,
  PING_STAMP_PUMPED,
  PING_STAMPED_SIZE,
  sinkResult,
  stampPing,
} from "./stream_clock.ts";

/** Longest single poll (ms): bounds how late a stall is noticed. */
const POLL_SLICE_MS = 100;
/** Linux's VSOCK_CLOSE_TIMEOUT: close() sends the RST itself after this. */
const CLOSE_TIMEOUT_MS = 8000;

const { values: args } = parseArgs({
  args: Deno.args,
  options: {
    socket: { type: "string" },
    profile: { type: "string", default: "qemu" },
    "queue-size": { type: "string", default: "256" },
    "rx-buf-size": { type: "string", default: "4096" },
    "buf-alloc": { type: "string", default: String(256 * 1024) },
    "ram-mib": { type: "string", default: "64" },
    "stall-ms": { type: "string", default: "10000" },
    packed: { type: "boolean", default: false },
  },
});
if (args.socket === undefined) throw new Error("--socket is required");
const profile = args.profile === "crosvm" ? "crosvm" : "qemu";
const stallMs = Number(args["stall-ms"]);
const pattern = makePattern();
const g = await LeanGuest.boot(args.socket, {
  profile,
  queueSize: Number(args["queue-size"]),
  rxBufSize: Number(args["rx-buf-size"]),
  bufAlloc: Number(args["buf-alloc"]),
  ramMiB: Number(args["ram-mib"]),
  pool: pattern,
  packed: args.packed,
});

/** The rings' state the first time a poll slice passed with no notification while driving. */
let firstQuietPoll: string | null = null;

/**
 * The driving loop: pump, run `step` (returns work done), stop when `done()`; when neither
 * the step nor the rings moved anything, block in poll. Throws after `stallMs` without
 * progress, or returns false once `deadline` (epoch ms) passes.
 */
function drive(step: () => number, done: () => boolean, what: string, deadline = Infinity) {
  let last = performance.now();
  for (;;) {
    const moved = g.pump();
    const work = step();
    if (work > 0) g.flush();
    if (done()) return true;
    const t = performance.now();
    if (work > 0 || moved > 0) {
      last = t;
      if (work > 0) continue;
    } else if (t - last > stallMs) {
      throw new Error(`stalled for ${stallMs} ms: ${what}\n${g.describe()}`);
    }
    if (now() > deadline) return false;
    if (!g.wait(POLL_SLICE_MS) && firstQuietPoll === null) {
      firstQuietPoll = `${what} at ${new Date().toISOString()}: ${g.describe()}`;
    }
  }
}

function takeQuietPoll(): string | null {
  const s = firstQuietPoll;
  firstQuietPoll = null;
  return s;
}

/** Drives until `c` is established (or refused). */
function waitConnected(c: LeanConn, what: string): void {
  drive(() => 0, () => c.state !== "connecting", what);
  if (c.state !== "established") throw new Error(`${what}: ${c.describe()}`);
}

/** Drives until `l` has a connection and takes it. */
function acceptOne(l: LeanListener, what: string): LeanConn {
  drive(() => 0, () => l.pending.length > 0, what);
  const c = l.pending.shift()!;
  g.unlisten(l);
  return c;
}

/** close(2) and wait for the RST like Linux: after CLOSE_TIMEOUT_MS send it ourselves. */
function closeConns(conns: readonly LeanConn[], what: string): void {
  for (const c of conns) g.close(c);
  const deadline = now() + CLOSE_TIMEOUT_MS;
  if (!drive(() => 0, () => conns.every((c) => c.closed), what, deadline)) {
    for (const c of conns) g.reset(c, "close-timeout");
  }
}

function usage(cpu0: number, t0: number): { cpu: number; wall: number } {
  return { cpu: cpuSeconds() - cpu0, wall: (now() - t0) / 1000 };
}

/**
 * source {port, writeSize, durationMs, maxBytes?}: connect to host port `port`, write the
 * pattern in `writeSize`-byte application writes (each split into packets by credit and the
 * 64 KiB packet limit, as Linux does) until the duration or byte budget is used, then
 * close.
 */
function source(msg: Command, emit: EmitFn) {
  const writeSize = Number(msg.writeSize);
  const maxBytes = Number(msg.maxBytes ?? Infinity);
  const conn = g.connect(Number(msg.port));
  waitConnected(conn, `connect to host port ${msg.port}`);
  emit("connected");
  takeQuietPoll();
  const a0 = g.anomalies.length;
  const cpu0 = cpuSeconds();
  const t0 = now();
  const deadline = t0 + Number(msg.durationMs);
  const irq0 = g.interrupts;
  const kick0 = g.kicks;
  const tx0 = g.stats.txPackets;
  let sent = 0;
  let inWrite = 0; // bytes of the current application write still to send
  let finished = false;
  drive(
    () => {
      let work = 0;
      for (;;) {
        if (inWrite === 0) {
          if (sent >= maxBytes || now() >= deadline) {
            finished = true;
            return work;
          }
          inWrite = Math.min(writeSize, maxBytes - sent);
        }
        const room = g.sendRoom(conn);
        if (room === 0) return work;
        const n = room < inWrite ? room : inWrite;
        g.sendPool(conn, sent, n);
        sent += n;
        inWrite -= n;
        work += n;
      }
    },
    () => finished,
    `guest source on port ${msg.port}`,
  );
  const tWritten = now();
  // close(2) like an application that is done: SHUTDOWN(both), then the back end's RST.
  // (SHUTDOWN(send) alone would do for this back end, but vhost-device-vsock acts only on a
  // SHUTDOWN with both flags, so its host app would never see EOF.)
  const cpu = usage(cpu0, t0);
  const counts = { wakeups: g.interrupts - irq0, kicks: g.kicks - kick0 };
  const packets = g.stats.txPackets - tx0;
  closeConns([conn], `close after guest source`);
  return {
    bytes: sent,
    t0,
    tWritten,
    ...cpu,
    ...counts,
    packets,
    quietPoll: takeQuietPoll(),
    anomalies: g.anomalies.slice(a0),
  };
}

/** One host->guest stream read to EOF, checked in place, with its timing. */
class SinkStream {
  readonly checker: StreamChecker;
  readonly clock = new ArrivalClock();
  #lastBytes = 0;

  constructor(readonly conn: LeanConn, readonly verify: VerifyMode, label: string) {
    this.checker = new StreamChecker(pattern, verify, 0, label);
    if (verify !== "none") conn.onData = (p) => this.checker.check(p);
  }

  /** Notes arrivals (call once per driving step); true once at EOF. */
  step(): boolean {
    const got = this.conn.bytesReceived;
    if (got !== this.#lastBytes) {
      this.clock.arrived();
      this.#lastBytes = got;
    }
    if (this.conn.eof) this.clock.ended();
    return this.conn.eof;
  }

  result() {
    return sinkResult(this.conn.bytesReceived, this.clock, this.checker, this.verify);
  }
}

/** An echo service on one connection: what arrives is read (copied) and sent back. */
class Echoer {
  readonly #queue: Uint8Array[] = [];
  echoed = 0;

  constructor(readonly conn: LeanConn) {
    conn.onData = (p) => { // the application's read() copies
      const copy = p.slice();
      if (copy.length === PING_STAMPED_SIZE) {
        stampPing(copy, PING_STAMP_PUMPED, g.pumpStartedAt);
        stampPing(copy, PING_STAMP_ARRIVED);
      }
      this.#queue.push(copy);
    };
  }

  /** Sends back what credit and tx slots allow; returns bytes sent. */
  step(): number {
    const queue = this.#queue;
    let work = 0;
    while (queue.length > 0) {
      const chunk = queue[0];
      const n = Math.min(chunk.length, g.sendRoom(this.conn), INLINE_MAX);
      if (n === 0) break;
      if (n === PING_STAMPED_SIZE) stampPing(chunk, PING_STAMP_ECHOED);
      g.sendCopy(this.conn, chunk.subarray(0, n));
      if (n === chunk.length) queue.shift();
      else queue[0] = chunk.subarray(n);
      work += n;
      this.echoed += n;
    }
    return work;
  }

  get done(): boolean {
    return this.conn.eof && this.#queue.length === 0;
  }
}

/**
 * sink {port, verify}: listen on guest port `port`, accept one connection, consume it to EOF,
 * checking what arrives in place by `verify` (none, sample: 16 bytes per packet, full).
 */
function sink(msg: Command, emit: EmitFn) {
  const verify = (msg.verify ?? "sample") as VerifyMode;
  const l = g.listen(Number(msg.port));
  emit("listening");
  const conn = acceptOne(l, `a connection on guest port ${msg.port}`);
  const s = new SinkStream(conn, verify, `host->guest port ${msg.port}`);
  takeQuietPoll();
  const a0 = g.anomalies.length;
  const cpu0 = cpuSeconds();
  const wall0 = now();
  const irq0 = g.interrupts;
  const kick0 = g.kicks;
  const rx0 = g.stats.rxPackets;
  drive(() => (s.step(), 0), () => conn.eof, `host->guest data on port ${msg.port}`);
  s.step();
  const cpu = usage(cpu0, wall0);
  const kicks = g.kicks - kick0;
  const packets = g.stats.rxPackets - rx0;
  closeConns([conn], `close of the host->guest stream on port ${msg.port}`);
  return {
    ...s.result(),
    ...cpu,
    wakeups: g.interrupts - irq0,
    kicks,
    packets,
    quietPoll: takeQuietPoll(),
    anomalies: g.anomalies.slice(a0),
  };
}

/** echo {port}: accept one connection and send back whatever arrives, until EOF. */
function echo(msg: Command, emit: EmitFn) {
  const l = g.listen(Number(msg.port));
  emit("listening");
  const e = new Echoer(acceptOne(l, `an echo client on guest port ${msg.port}`));
  const cpu0 = cpuSeconds();
  const t0 = now();
  drive(() => e.step(), () => e.done, `echo on port ${msg.port}`);
  const cpu = usage(cpu0, t0);
  closeConns([e.conn], `close of the echo connection`);
  return { echoed: e.echoed, ...cpu };
}

/**
 * mix {echoPort, sinkPorts, dgramPort, verify}: the fairness figure's guest, one kernel serving
 * several sockets in one loop: an echo service on `echoPort` (null: none), a stream read to
 * EOF (checked by `verify`) on each of `sinkPorts`, and datagram port `dgramPort` (null: none)
 * bound and counted. Ends when every expected connection reached EOF.
 */
function mix(msg: Command, emit: EmitFn) {
  const verify = (msg.verify ?? "sample") as VerifyMode;
  const echoPort = msg.echoPort === null || msg.echoPort === undefined
    ? null
    : Number(msg.echoPort);
  const sinkPorts = (msg.sinkPorts as unknown[]).map(Number);
  const listeners = [...sinkPorts, ...(echoPort === null ? [] : [echoPort])].map((p) =>
    g.listen(p)
  );
  const dgram = msg.dgramPort === null || msg.dgramPort === undefined
    ? null
    : g.bindDgram(Number(msg.dgramPort));
  const rxDgrams0 = g.stats.rxDgrams;
  emit("listening");
  const a0 = g.anomalies.length;
  const cpu0 = cpuSeconds();
  const t0 = now();
  const irq0 = g.interrupts;
  let echoer: Echoer | null = null;
  const sinks: SinkStream[] = [];
  const open = new Set(listeners);
  drive(
    () => {
      let work = 0;
      for (const l of open) {
        const c = l.pending.shift();
        if (c === undefined) continue;
        open.delete(l);
        g.unlisten(l);
        if (l.port === echoPort) echoer = new Echoer(c);
        else sinks.push(new SinkStream(c, verify, `host->guest port ${l.port}`));
      }
      for (const s of sinks) s.step();
      if (echoer !== null) work += echoer.step();
      return work;
    },
    () =>
      sinks.length === sinkPorts.length && sinks.every((s) => s.conn.eof) &&
      (echoPort === null || (echoer !== null && echoer.done)),
    `fairness mix (echo ${echoPort}, sinks ${sinkPorts.join(",")}, datagrams ${msg.dgramPort})`,
  );
  for (const s of sinks) s.step();
  const cpu = usage(cpu0, t0);
  const e = echoer as Echoer | null;
  closeConns(
    [...sinks.map((s) => s.conn), ...(e === null ? [] : [e.conn])],
    "close of the fairness mix",
  );
  if (dgram !== null) g.unbindDgram(dgram);
  return {
    sinks: sinks.map((s) => s.result()),
    echoed: e?.echoed ?? 0,
    datagrams: dgram?.datagrams ?? 0,
    dgramBytes: dgram?.bytes ?? 0,
    rxDgrams: g.stats.rxDgrams - rxDgrams0,
    ...cpu,
    wakeups: g.interrupts - irq0,
    anomalies: g.anomalies.slice(a0),
  };
}

// ---- many connections ------------------------------------------------------------------

interface OutStream {
  conn: LeanConn;
  id: number;
  header: Uint8Array;
  sent: number;
  shut: boolean;
}

interface InStream {
  conn: LeanConn;
  header: Uint8Array;
  headerLen: number;
  checker: StreamChecker | null;
  done: boolean;
}

const many = {
  out: [] as OutStream[],
  in: [] as InStream[],
  verify: "full" as VerifyMode,
  errors: [] as string[],
  seen: new Set<number>(),
};

/** Starts reading incoming many-connection stream `r`: its header, then checked payload. */
function readStream(r: InStream): void {
  r.conn.onData = (p) => {
    let chunk = p;
    if (r.headerLen < STREAM_HEADER_SIZE) {
      const k = Math.min(STREAM_HEADER_SIZE - r.headerLen, chunk.length);
      r.header.set(chunk.subarray(0, k), r.headerLen);
      r.headerLen += k;
      chunk = chunk.subarray(k);
      if (r.headerLen === STREAM_HEADER_SIZE) {
        const id = parseStreamHeader(r.header);
        if (id < 0) many.errors.push(`incoming stream with a bad header`);
        else if (many.seen.has(id)) many.errors.push(`stream id ${id} seen twice`);
        many.seen.add(id);
        r.checker = new StreamChecker(pattern, many.verify, shiftOf(Math.max(id, 0)), `${id}`);
      }
    }
    if (r.checker !== null && chunk.length > 0) r.checker.check(chunk);
  };
}

/**
 * manyOpen {listenPort, hostPort, nIn, nOut, firstId}: listen on `listenPort` and accept
 * `nIn` connections from the host while opening `nOut` connections to host port `hostPort`;
 * returns once all are established (they stay open, idle, for manyTransfer).
 */
function manyOpen(msg: Command, emit: EmitFn) {
  const nIn = Number(msg.nIn);
  const nOut = Number(msg.nOut);
  const firstId = Number(msg.firstId);
  const l = g.listen(Number(msg.listenPort));
  emit("listening");
  const t0 = now();
  for (let i = 0; i < nOut; i++) {
    many.out.push({
      conn: g.connect(Number(msg.hostPort)),
      id: firstId + i,
      header: streamHeader(firstId + i),
      sent: 0,
      shut: false,
    });
  }
  drive(
    () => {
      let work = 0;
      for (let c = l.pending.shift(); c !== undefined; c = l.pending.shift()) {
        const r = { conn: c, header: new Uint8Array(8), headerLen: 0, checker: null, done: false };
        readStream(r);
        many.in.push(r);
        work++;
      }
      return work;
    },
    () =>
      many.in.length >= nIn && many.out.every((s) => s.conn.state !== "connecting") ||
      many.out.some((s) => s.conn.closed),
    "many connections to open",
  );
  g.unlisten(l);
  const refused = many.out.filter((s) => s.conn.state !== "established");
  if (refused.length > 0) throw new Error(`manyOpen: ${refused[0].conn.describe()}`);
  return { opened: many.in.length + many.out.length, seconds: (now() - t0) / 1000 };
}

/**
 * manyTransfer {bytesPerConn, verify}: every outgoing connection sends its header and
 * `bytesPerConn` pattern bytes (shifted by its id) then SHUTDOWN(send); every incoming one is
 * read to EOF and checked. Returns counts and the first integrity errors.
 */
function manyTransfer(msg: Command) {
  const bytesPerConn = Number(msg.bytesPerConn);
  many.verify = (msg.verify ?? "full") as VerifyMode;
  const total = STREAM_HEADER_SIZE + bytesPerConn;
  const cpu0 = cpuSeconds();
  const t0 = now();
  let outDone = 0;
  let inDone = 0;
  let rr = 0;
  drive(
    () => {
      let work = 0;
      // Senders, round robin from a rotating start so no connection always goes first.
      const outs = many.out;
      for (let k = 0; k < outs.length; k++) {
        const s = outs[(rr + k) % outs.length];
        if (s.shut) continue;
        while (s.sent < total) {
          const room = g.sendRoom(s.conn);
          if (room === 0) break;
          let n: number;
          if (s.sent < STREAM_HEADER_SIZE) {
            n = Math.min(room, STREAM_HEADER_SIZE - s.sent);
            g.sendCopy(s.conn, s.header.subarray(s.sent, s.sent + n));
          } else {
            n = Math.min(room, total - s.sent);
            g.sendPool(s.conn, shiftOf(s.id) + s.sent - STREAM_HEADER_SIZE, n);
          }
          s.sent += n;
          work += n;
        }
        if (s.sent === total && s.conn.state === "established") {
          g.shutdown(s.conn, VIRTIO_VSOCK_SHUTDOWN_F_SEND);
          s.shut = true;
          outDone++;
        } else if (s.conn.closed) {
          many.errors.push(`outgoing stream ${s.id} ended after ${s.sent} bytes`);
          s.shut = true;
          outDone++;
        }
      }
      rr = (rr + 1) % Math.max(1, outs.length);
      for (const r of many.in) {
        if (r.done || !r.conn.eof) continue;
        r.done = true;
        inDone++;
        const got = r.checker?.offset ?? 0;
        if (got !== bytesPerConn) {
          many.errors.push(`stream ${r.checker?.label ?? "?"}: ${got} of ${bytesPerConn} bytes`);
        }
        if (r.checker?.error) many.errors.push(r.checker.error);
      }
      return work;
    },
    () => outDone === many.out.length && inDone === many.in.length,
    "many-connection transfer",
  );
  return {
    sent: many.out.reduce((n, s) => n + s.sent - STREAM_HEADER_SIZE, 0),
    received: many.in.reduce((n, r) => n + r.conn.bytesReceived, 0) -
      STREAM_HEADER_SIZE * many.in.length,
    streamsIn: many.in.length,
    streamsOut: many.out.length,
    errors: many.errors.slice(0, 20),
    ...usage(cpu0, t0),
    anomalies: g.anomalies.slice(0, 10),
  };
}

/** manyClose: closes every many-connection stream. */
function manyClose() {
  const conns = [...many.out.map((s) => s.conn), ...many.in.map((r) => r.conn)];
  closeConns(conns, "many connections to close");
  many.out = [];
  many.in = [];
  many.errors = [];
  many.seen.clear();
  return { closed: conns.length };
}

/** stats: the driver's CPU time, counters and anomalies. */
function stats() {
  return { cpu: cpuSeconds(), guestStats: g.stats, anomalies: g.anomalies.slice(0, 20) };
}

sendLine({
  id: 0,
  ev: "booted",
  profile,
  queueSize: Number(args["queue-size"]),
  rxBufSize: g.rings.rxBufSize,
  rxBuffers: g.rings.rxBytes.length,
  bufAlloc: g.bufAlloc,
  indirect: g.rings.indirect,
  packed: g.rings.queues[0].packed,
  features: g.features.toString(16),
});

await serveCommands(
  { source, sink, echo, mix, manyOpen, manyTransfer, manyClose, stats },
  () => g.fe.close(),
);
