/**
 * The benchmark's host application: a child process doing plain AF_UNIX socket I/O with
 * blocking read(2)/write(2) through the project's FFI (no Deno streams, no per-byte JS work),
 * controlled by the bench over JSON lines (control.ts).
 *
 * The same code serves both sides of the comparison: against the back end's hybrid socket
 * (`CONNECT <port>\n` to `--uds-path`, or a listener at `<uds-path>_<port>`), and against another
 * instance of itself for the raw AF_UNIX baselines. Single streams block; the many-connection
 * commands and the fairness load use non-blocking sockets. Host->guest datagrams follow the back
 * end's protocol (lib/vsock/dgram.ts): `<guest-port>\n<payload>` from `<uds-path>_<P>.dgram`.
 *
 * For the fairness figure's raw baseline a third instance plays the guest's part (`mixRaw`,
 * raw_mix.ts: echo, bulk sinks and a datagram socket in one epoll loop), `load` connects to it
 * directly and sends plain datagrams, and `pingpong` runs against it without the handshake.
 *
 * Commands: sink, source, echo, pingpong, load, burn, mixRaw, manyListen, manyOpen, manyTransfer,
 * manyClose, stats.
 */
import {
  acceptRaw,
  bindUnixDgram,
  close,
  connectRaw,
  connectUnix,
  cpuSeconds,
  EAGAIN,
  ECONNREFUSED,
  Epoll,
  EPOLLERR,
  EPOLLHUP,
  EPOLLIN,
  EPOLLOUT,
  listenUnix,
  MessageIo,
  pollFds,
  POLLOUT,
  readRaw,
  setNonBlocking,
  SHUT_WR,
  shutdownRaw,
  SOCK_DGRAM,
  unixSocket,
  writeRaw,
} from "../../ffi/mod.ts";
import { DGRAM_SUFFIX } from "../../lib/vsock/dgram.ts";
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
import { mixRaw } from "./raw_mix.ts";
import {
  ArrivalClock,
  now,
  PING_STAMP_ARRIVED,
  PING_STAMP_ECHOED,
  PING_STAMP_PUMPED,
  PING_STAMP_SENT,
  PING_STAMPED_SIZE,
  sinkResult,
  stampPing,
} from "./stream_clock.ts";

const pattern = makePattern();
const readBuf = new Uint8Array(MAX_CHUNK);
const enc = new TextEncoder();

function fail(what: string, neg: number): never {
  throw new Error(`${what}: errno ${-neg}`);
}

/** Writes all of `buf` to blocking `fd`. */
function writeFully(fd: number, buf: Uint8Array): void {
  let off = 0;
  while (off < buf.length) {
    const n = writeRaw(fd, buf.subarray(off), buf.length - off);
    if (n < 0) fail("write", n);
    off += n;
  }
}

/** Reads one line ("...\n") byte by byte from blocking `fd`; null at EOF. */
function readLine(fd: number): string | null {
  const one = new Uint8Array(1);
  let line = "";
  for (;;) {
    const n = readRaw(fd, one, 1);
    if (n === 0) return null;
    if (n < 0) fail("read", n);
    if (one[0] === 0x0a) return line;
    line += String.fromCharCode(one[0]);
    if (line.length > 64) throw new Error(`reply line too long: ${line}`);
  }
}

/**
 * Connects to `path` (blocking); with `hybridPort` speaks the hybrid vsock handshake
 * (`CONNECT <port>\n`, then `OK <host-port>\n` once the guest accepted).
 */
function connectTo(path: string, hybridPort: number | null): number {
  const fd = connectUnix(path, { nonblocking: false });
  if (hybridPort !== null) {
    writeFully(fd, enc.encode(`CONNECT ${hybridPort}\n`));
    const line = readLine(fd);
    if (line === null || !line.startsWith("OK ")) {
      close(fd);
      throw new Error(`CONNECT ${hybridPort}: ${line === null ? "closed" : line}`);
    }
  }
  return fd;
}

/** Reads until EOF or an error (the peer's close), discarding. */
function drainToEof(fd: number): void {
  for (;;) {
    const n = readRaw(fd, readBuf, 65536);
    if (n <= 0) return;
  }
}

const listeners = new Map<string, number>();

function listenerFor(path: string, blocking: boolean): number {
  let fd = listeners.get(path);
  if (fd === undefined) {
    fd = listenUnix(path, { backlog: 4096, nonblocking: !blocking });
    listeners.set(path, fd);
  }
  return fd;
}

function closeListener(path: string): void {
  const fd = listeners.get(path);
  if (fd === undefined) return;
  close(fd);
  listeners.delete(path);
  try {
    Deno.removeSync(path);
  } catch { /* gone */ }
}

/**
 * sink {listenPath, readSize, verify}: listen, accept one connection, read it to EOF with
 * `readSize`-byte reads, check by `verify`, close.
 */
function sink(msg: Command, emit: EmitFn) {
  const path = String(msg.listenPath);
  const readSize = Math.min(Number(msg.readSize), MAX_CHUNK);
  const verify = (msg.verify ?? "sample") as VerifyMode;
  const lfd = listenerFor(path, true);
  emit("listening");
  const fd = acceptRaw(lfd, false);
  if (fd < 0) fail("accept", fd);
  closeListener(path);
  const checker = new StreamChecker(pattern, verify, 0, `sink ${path}`);
  const cpu0 = cpuSeconds();
  const clock = new ArrivalClock();
  let reads = 0;
  for (;;) {
    const n = readRaw(fd, readBuf, readSize);
    if (n === 0) break;
    if (n < 0) fail("read", n);
    clock.arrived();
    reads++;
    checker.check(readBuf.subarray(0, n));
  }
  clock.ended();
  const cpu = cpuSeconds() - cpu0;
  close(fd);
  return { ...sinkResult(checker.offset, clock, checker, verify), cpu, reads };
}

/**
 * source {path, hybridPort, writeSize, durationMs, maxBytes?}: connect (through the hybrid
 * handshake when `hybridPort` is set), write the pattern in `writeSize` writes until the
 * duration or byte budget is used, shutdown(SHUT_WR), then wait for the peer's close.
 */
function source(msg: Command, emit: EmitFn) {
  const hybridPort = msg.hybridPort === null || msg.hybridPort === undefined
    ? null
    : Number(msg.hybridPort);
  const writeSize = Math.min(Number(msg.writeSize), MAX_CHUNK);
  const maxBytes = Number(msg.maxBytes ?? Infinity);
  const fd = connectTo(String(msg.path), hybridPort);
  emit("connected");
  const cpu0 = cpuSeconds();
  const t0 = now();
  const deadline = t0 + Number(msg.durationMs);
  let sent = 0;
  let writes = 0;
  while (sent < maxBytes && now() < deadline) {
    const n = Math.min(writeSize, maxBytes - sent);
    writeFully(fd, chunkAt(pattern, 0, sent, n));
    sent += n;
    writes++;
  }
  const tWritten = now();
  shutdownRaw(fd, SHUT_WR);
  const cpu = cpuSeconds() - cpu0;
  drainToEof(fd);
  close(fd);
  return { bytes: sent, t0, tWritten, cpu, writes };
}

/** echo {listenPath}: accept one connection and write back what arrives, until EOF. */
function echo(msg: Command, emit: EmitFn) {
  const path = String(msg.listenPath);
  const lfd = listenerFor(path, true);
  emit("listening");
  const fd = acceptRaw(lfd, false);
  if (fd < 0) fail("accept", fd);
  closeListener(path);
  const cpu0 = cpuSeconds();
  let echoed = 0;
  for (;;) {
    const n = readRaw(fd, readBuf, 65536);
    if (n <= 0) break;
    writeFully(fd, readBuf.subarray(0, n));
    echoed += n;
  }
  close(fd);
  return { echoed, cpu: cpuSeconds() - cpu0 };
}

/**
 * pingpong {path, hybridPort, size, warmup, iterations, durationMs?}: connect, then `warmup` +
 * `iterations` round trips of `size` bytes (write, read all back), or fewer once `durationMs`
 * of measured round trips have passed; returns RTT percentiles in microseconds over the
 * measured iterations.
 */
function pingpong(msg: Command, emit: EmitFn) {
  const hybridPort = msg.hybridPort === null || msg.hybridPort === undefined
    ? null
    : Number(msg.hybridPort);
  const size = Number(msg.size);
  const warmup = Number(msg.warmup);
  const maxIterations = Number(msg.iterations);
  const durationMs = Number(msg.durationMs ?? Infinity);
  const fd = connectTo(String(msg.path), hybridPort);
  emit("connected");
  const out = chunkAt(pattern, 0, 0, size).slice(); // stamped below: not the shared pattern
  const back = new Uint8Array(size);
  const rtt = new Float64Array(maxIterations);
  // The legs of each round trip (us), when the echo stamps them (see stream_clock.ts).
  const stamped = size === PING_STAMPED_SIZE;
  const backView = new DataView(back.buffer);
  const toGuest = new Float64Array(maxIterations);
  const guestBefore = new Float64Array(maxIterations);
  const inGuest = new Float64Array(maxIterations);
  const toHost = new Float64Array(maxIterations);
  let legged = 0;
  const cpu0 = cpuSeconds();
  const t0 = now();
  let bad = 0;
  let iterations = maxIterations;
  let deadline = Infinity;
  for (let i = 0; i < warmup + maxIterations; i++) {
    const t = performance.now();
    if (i === warmup) deadline = t + durationMs;
    else if (i > warmup && t > deadline) {
      iterations = i - warmup;
      break;
    }
    if (stamped) stampPing(out, PING_STAMP_SENT);
    writeFully(fd, out);
    let got = 0;
    while (got < size) {
      const n = readRaw(fd, back.subarray(got), size - got);
      if (n === 0) throw new Error(`pingpong: EOF after ${i} round trips`);
      if (n < 0) fail("read", n);
      got += n;
    }
    const dt = performance.now() - t;
    if (i >= warmup) {
      rtt[i - warmup] = dt * 1000;
      const arrived = stamped ? backView.getFloat64(PING_STAMP_ARRIVED, true) : 0;
      const echoed = stamped ? backView.getFloat64(PING_STAMP_ECHOED, true) : 0;
      if (arrived > 0 && echoed > 0) {
        const sent = backView.getFloat64(PING_STAMP_SENT, true);
        toGuest[legged] = (arrived - sent) * 1000;
        guestBefore[legged] = (arrived - backView.getFloat64(PING_STAMP_PUMPED, true)) * 1000;
        inGuest[legged] = (echoed - arrived) * 1000;
        toHost[legged] = (now() - echoed) * 1000;
        legged++;
      }
    }
    if (back[0] !== out[0] || back[size - 1] !== out[size - 1]) bad++;
  }
  const wall = (now() - t0) / 1000;
  const cpu = cpuSeconds() - cpu0;
  shutdownRaw(fd, SHUT_WR);
  drainToEof(fd);
  close(fd);
  const measured = rtt.subarray(0, iterations).sort();
  const pct = (p: number) => percentile(measured, p);
  let sum = 0;
  for (const x of measured) sum += x;
  // Only a full set: an echo that stamped some round trips and not others is not split.
  const split = legged === 0 || legged !== iterations ? null : {
    hostToGuest: legPercentiles(toGuest.subarray(0, legged)),
    guestBefore: legPercentiles(guestBefore.subarray(0, legged)),
    inGuest: legPercentiles(inGuest.subarray(0, legged)),
    guestToHost: legPercentiles(toHost.subarray(0, legged)),
  };
  return {
    p50: pct(0.5),
    p90: pct(0.9),
    p99: pct(0.99),
    max: measured[iterations - 1],
    mean: sum / iterations,
    iterations,
    wall,
    cpu,
    mismatches: bad,
    split,
  };
}

/** The `p` quantile of sorted `xs`. */
function percentile(xs: Float64Array, p: number): number {
  return xs[Math.min(xs.length - 1, Math.floor(p * xs.length))];
}

/** p50 and p99 of one leg of the round trips (us). */
function legPercentiles(xs: Float64Array): { p50: number; p99: number } {
  xs.sort();
  return { p50: percentile(xs, 0.5), p99: percentile(xs, 0.99) };
}

// ---- fairness load -----------------------------------------------------------------------------

/** Datagrams sent per loop turn at most, so the streams get their turn. */
const DGRAM_BURST = 64;

/**
 * load {udsPath, ports, writeSize, durationMs, dgram: {fromPort, toPort, size} | null}: the
 * fairness figure's background load through the back end. Opens one hybrid connection to each
 * guest port of `ports`; with `dgram`, binds a datagram socket at `<udsPath>_<fromPort>.dgram`
 * (the host port the guest sees) and connects it to the back end's `<udsPath>.dgram`, each
 * datagram being `<toPort>\n` + `size` bytes of payload.
 *
 * load {paths, writeSize, durationMs, dgram: {path, size} | null}: the same load for the raw
 * AF_UNIX baseline (`mixRaw`): connects to each of `paths` directly, and sends plain `size`-byte
 * datagrams from an unbound socket connected to `dgram.path`.
 *
 * Then, for `durationMs`, keeps every stream's socket full (non-blocking `writeSize` writes of
 * the pattern) and sends datagrams as fast as the socket takes them, sleeping in poll(2) only
 * when nothing moved; then half-closes the streams and waits for the peer's close. Emits
 * "started" once everything is open.
 */
function load(msg: Command, emit: EmitFn) {
  const raw = msg.paths !== undefined;
  const udsPath = String(msg.udsPath);
  const targets = raw
    ? (msg.paths as unknown[]).map(String)
    : (msg.ports as unknown[]).map((p) => `guest port ${p}`);
  const writeSize = Math.min(Number(msg.writeSize), MAX_CHUNK);
  const dg = msg.dgram as
    | { fromPort: number; toPort: number; size: number; path?: undefined }
    | { path: string; size: number }
    | null;
  const fds = raw
    ? targets.map((p) => connectTo(p, null))
    : (msg.ports as unknown[]).map((p) => connectTo(udsPath, Number(p)));
  for (const fd of fds) setNonBlocking(fd);
  const sent = fds.map(() => 0);
  let dfd = -1;
  let dgPath = "";
  let dgIovs = 0;
  const io = new MessageIo();
  if (dg !== null && dg.path !== undefined) {
    dfd = unixSocket(SOCK_DGRAM, true);
    const r = connectRaw(dfd, dg.path);
    if (r < 0) fail(`connect to ${dg.path}`, r);
    io.setIov(0, pattern.slice(0, dg.size));
    dgIovs = 1;
  } else if (dg !== null) {
    dgPath = `${udsPath}_${dg.fromPort}${DGRAM_SUFFIX}`;
    try {
      Deno.removeSync(dgPath);
    } catch { /* not there */ }
    dfd = bindUnixDgram(dgPath);
    const r = connectRaw(dfd, `${udsPath}${DGRAM_SUFFIX}`);
    if (r < 0) fail(`connect to ${udsPath}${DGRAM_SUFFIX}`, r);
    io.setIov(0, enc.encode(`${dg.toPort}\n`));
    io.setIov(1, pattern.slice(0, dg.size));
    dgIovs = 2;
  }
  const pollList = dfd < 0 ? fds : [...fds, dfd];
  const pollEvents = pollList.map(() => POLLOUT);
  emit("started");
  const cpu0 = cpuSeconds();
  const t0 = now();
  const deadline = t0 + Number(msg.durationMs);
  let dgramsSent = 0;
  let dgramsRefused = 0;
  let sleeps = 0;
  while (now() < deadline) {
    let moved = 0;
    for (let i = 0; i < fds.length; i++) {
      const n = writeRaw(fds[i], chunkAt(pattern, 0, sent[i], writeSize), writeSize);
      if (n > 0) {
        sent[i] += n;
        moved++;
      } else if (n !== -EAGAIN) fail(`write to ${targets[i]}`, n);
    }
    for (let k = 0; dfd >= 0 && k < DGRAM_BURST; k++) {
      const n = io.send(dfd, dgIovs);
      if (n > 0) {
        dgramsSent++;
        moved++;
      } else if (n === -EAGAIN) break;
      else if (n === -ECONNREFUSED) dgramsRefused++;
      else fail("datagram send", n);
    }
    if (moved === 0) {
      sleeps++;
      pollFds(pollList, pollEvents, 5);
    }
  }
  const tWritten = now();
  const cpu = cpuSeconds() - cpu0;
  for (const fd of fds) {
    setNonBlocking(fd, false);
    shutdownRaw(fd, SHUT_WR);
  }
  for (const fd of fds) {
    drainToEof(fd);
    close(fd);
  }
  if (dfd >= 0) close(dfd);
  if (dgPath !== "") Deno.removeSync(dgPath);
  return { bytes: sent, t0, tWritten, cpu, dgramsSent, dgramsRefused, sleeps };
}

// ---- many connections --------------------------------------------------------------------------

interface Stream {
  fd: number;
  /** outgoing: id sent in the header; incoming: id from the header (-1 until read) */
  id: number;
  out: boolean;
  /** outgoing: handshake line bytes so far (until "OK ...\n") */
  line: string;
  ok: boolean;
  sent: number;
  header: Uint8Array;
  headerLen: number;
  checker: StreamChecker | null;
  done: boolean;
}

const many = { streams: [] as Stream[], byFd: new Map<number, Stream>(), ep: null as Epoll | null };

function newStream(fd: number, out: boolean, id: number): Stream {
  const s: Stream = {
    fd,
    id,
    out,
    line: "",
    ok: !out,
    sent: 0,
    header: new Uint8Array(STREAM_HEADER_SIZE),
    headerLen: 0,
    checker: null,
    done: false,
  };
  many.streams.push(s);
  many.byFd.set(fd, s);
  return s;
}

/** manyListen {listenPath}: a non-blocking listener for the guest's connections. */
function manyListen(msg: Command) {
  listenerFor(String(msg.listenPath), false);
  return {};
}

/**
 * manyOpen {udsPath, guestPort, nOut, firstId, listenPath, nIn, timeoutMs}: opens `nOut`
 * connections to guest port `guestPort` through the hybrid socket (each waits for its OK line)
 * and accepts `nIn` connections on `listenPath`, in one epoll loop.
 */
function manyOpen(msg: Command) {
  const nOut = Number(msg.nOut);
  const nIn = Number(msg.nIn);
  const firstId = Number(msg.firstId);
  const lfd = listenerFor(String(msg.listenPath), false);
  const deadline = Date.now() + Number(msg.timeoutMs ?? 30000);
  const ep = many.ep ?? new Epoll(1024);
  many.ep = ep;
  ep.add(lfd, EPOLLIN);
  const t0 = now();
  let accepted = 0;
  let okCount = 0;
  let connected = 0;
  const lineBuf = new Uint8Array(64);
  const acceptAll = () => {
    for (;;) {
      const fd = acceptRaw(lfd, true);
      if (fd === -EAGAIN) return;
      if (fd < 0) fail("accept", fd);
      newStream(fd, false, -1);
      accepted++;
    }
  };
  while (okCount < nOut || accepted < nIn) {
    // Open outgoing connections a few at a time so the back end's accept backlog never fills.
    while (connected < nOut && connected - okCount < 64) {
      const fd = connectUnix(String(msg.udsPath), { nonblocking: false });
      writeFully(fd, enc.encode(`CONNECT ${msg.guestPort}\n`));
      setNonBlocking(fd, true);
      newStream(fd, true, firstId + connected);
      ep.add(fd, EPOLLIN);
      connected++;
    }
    if (Date.now() > deadline) {
      throw new Error(`manyOpen: ${okCount}/${nOut} OK lines, ${accepted}/${nIn} accepted`);
    }
    const n = ep.wait(100);
    for (let i = 0; i < n; i++) {
      const fd = ep.events[3 * i + 1];
      if (fd === lfd) {
        acceptAll();
        continue;
      }
      const s = many.byFd.get(fd);
      if (s === undefined || s.ok) continue;
      const r = readRaw(fd, lineBuf, 1);
      if (r === -EAGAIN) continue;
      if (r <= 0) throw new Error(`manyOpen: CONNECT ${msg.guestPort} refused (stream ${s.id})`);
      if (lineBuf[0] === 0x0a) {
        if (!s.line.startsWith("OK ")) throw new Error(`manyOpen: reply ${s.line}`);
        s.ok = true;
        okCount++;
        ep.modify(fd, 0);
      } else {
        s.line += String.fromCharCode(lineBuf[0]);
      }
    }
  }
  ep.delete(lfd);
  for (const s of many.streams) if (!s.out) ep.add(s.fd, 0);
  return { opened: many.streams.length, seconds: (now() - t0) / 1000 };
}

/**
 * manyTransfer {bytesPerConn, verify, timeoutMs}: outgoing streams send their header and
 * `bytesPerConn` bytes then shutdown(SHUT_WR); incoming ones are read to EOF and checked.
 */
function manyTransfer(msg: Command) {
  const bytesPerConn = Number(msg.bytesPerConn);
  const verify = (msg.verify ?? "full") as VerifyMode;
  const total = STREAM_HEADER_SIZE + bytesPerConn;
  const ep = many.ep!;
  const deadline = Date.now() + Number(msg.timeoutMs ?? 60000);
  const errors: string[] = [];
  const seen = new Set<number>();
  const cpu0 = cpuSeconds();
  const t0 = now();
  let pending = 0;
  let received = 0;
  for (const s of many.streams) {
    ep.modify(s.fd, s.out ? EPOLLOUT : EPOLLIN);
    pending++;
  }
  let lastProgress = Date.now();
  while (pending > 0) {
    const n = ep.wait(100);
    const t = Date.now();
    if (n > 0) lastProgress = t;
    if (t > deadline || t - lastProgress > 10000) {
      throw new Error(`manyTransfer stalled: ${pending} streams unfinished`);
    }
    for (let i = 0; i < n; i++) {
      const ev = ep.events[3 * i];
      const s = many.byFd.get(ep.events[3 * i + 1]);
      if (s === undefined || s.done) continue;
      if (s.out) {
        if (ev & (EPOLLERR | EPOLLHUP)) {
          errors.push(`outgoing stream ${s.id}: hang-up after ${s.sent} bytes`);
          s.done = true;
          pending--;
          ep.modify(s.fd, 0);
          continue;
        }
        while (s.sent < total) {
          let chunk: Uint8Array;
          if (s.sent < STREAM_HEADER_SIZE) chunk = streamHeader(s.id).subarray(s.sent);
          else {
            const off = s.sent - STREAM_HEADER_SIZE;
            chunk = chunkAt(pattern, shiftOf(s.id), off, Math.min(65536, bytesPerConn - off));
          }
          const w = writeRaw(s.fd, chunk, chunk.length);
          if (w === -EAGAIN) break;
          if (w < 0) {
            errors.push(`outgoing stream ${s.id}: errno ${-w} after ${s.sent} bytes`);
            s.sent = total;
            break;
          }
          s.sent += w;
        }
        if (s.sent >= total) {
          shutdownRaw(s.fd, SHUT_WR);
          s.done = true;
          pending--;
          ep.modify(s.fd, 0);
        }
        continue;
      }
      for (;;) {
        const r = readRaw(s.fd, readBuf, 262144);
        if (r === -EAGAIN) break;
        if (r <= 0) {
          const got = s.checker?.offset ?? 0;
          if (r < 0) errors.push(`incoming stream ${s.id}: errno ${-r}`);
          if (got !== bytesPerConn) {
            errors.push(`incoming stream ${s.id}: ${got} of ${bytesPerConn} bytes`);
          }
          if (s.checker?.error) errors.push(s.checker.error);
          s.done = true;
          pending--;
          ep.modify(s.fd, 0);
          break;
        }
        received += r;
        let chunk = readBuf.subarray(0, r);
        if (s.headerLen < STREAM_HEADER_SIZE) {
          const k = Math.min(STREAM_HEADER_SIZE - s.headerLen, r);
          s.header.set(chunk.subarray(0, k), s.headerLen);
          s.headerLen += k;
          chunk = chunk.subarray(k);
          if (s.headerLen === STREAM_HEADER_SIZE) {
            s.id = parseStreamHeader(s.header);
            if (s.id < 0) errors.push("incoming stream with a bad header");
            else if (seen.has(s.id)) errors.push(`stream id ${s.id} seen twice`);
            seen.add(s.id);
            s.checker = new StreamChecker(
              pattern,
              verify,
              shiftOf(Math.max(s.id, 0)),
              `stream ${s.id}`,
            );
          }
        }
        if (s.checker !== null && chunk.length > 0) s.checker.check(chunk);
      }
    }
  }
  const outs = many.streams.filter((s) => s.out);
  return {
    sent: outs.reduce((n, s) => n + Math.max(0, s.sent - STREAM_HEADER_SIZE), 0),
    received: received - STREAM_HEADER_SIZE * (many.streams.length - outs.length),
    streamsOut: outs.length,
    streamsIn: many.streams.length - outs.length,
    errors: errors.slice(0, 20),
    errorCount: errors.length,
    cpu: cpuSeconds() - cpu0,
    wall: (now() - t0) / 1000,
  };
}

/** manyClose: closes every many-connection socket and listener. */
function manyClose() {
  const n = many.streams.length;
  for (const s of many.streams) close(s.fd);
  many.streams = [];
  many.byFd.clear();
  many.ep?.close();
  many.ep = null;
  for (const path of [...listeners.keys()]) closeListener(path);
  return { closed: n };
}

function stats() {
  return { cpu: cpuSeconds() };
}

/**
 * burn {durationMs}: the fairness figure's control load: spins on the CPU for `durationMs`
 * without any I/O (emits "started" first), so a ping-pong beside it shows what CPU contention
 * alone does to its latency.
 */
function burn(msg: Command, emit: EmitFn) {
  emit("started");
  const cpu0 = cpuSeconds();
  const deadline = now() + Number(msg.durationMs);
  let spins = 0;
  while (now() < deadline) spins++;
  return { cpu: cpuSeconds() - cpu0, spins };
}

sendLine({ id: 0, ev: "ready" });
await serveCommands(
  {
    sink,
    source,
    echo,
    pingpong,
    load,
    burn,
    mixRaw: (msg, emit) => mixRaw(msg, emit, pattern),
    manyListen,
    manyOpen,
    manyTransfer,
    manyClose,
    stats,
  },
  () => {
    for (const path of [...listeners.keys()]) closeListener(path);
  },
);
