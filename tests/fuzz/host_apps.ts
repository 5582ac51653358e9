/**
 * A host-app fuzzer: random hostile behaviour on the hybrid-vsock socket `<uds_path>` (the
 * `CONNECT <port>\n` handshake of Firecracker's protocol), against a real back end process
 * with an emulated guest (`startVm`), while one well-behaved connection keeps echoing.
 *
 * Each step is one of: a CONNECT line (valid, to a listening, a refusing or a random port;
 * invalid; in random pieces; huge; binary; without a newline), with or without data right
 * after the line, closed at once, abruptly after the OK, or kept half-open; a connect storm;
 * releasing some of the sockets kept open. After every step the invariants are checked:
 * - the back end answers a vhost-user request (GET_FEATURES) within `replyLimitMs`;
 * - the well-behaved connection (host client -> guest echo) loses and reorders nothing;
 * - every FRESH_CONNECT_EVERY steps, a new well-formed CONNECT gets its OK;
 * - the back end's fd count stays within what the fuzzer holds open plus a margin, and its
 *   RSS within a bound;
 * - its stderr stays bounded: a burst, a rate per second, and LOG_PER_CONNECTION lines per
 *   socket the fuzzer opened (the muxer logs each host connection's life cycle at info level,
 *   one line per event, not rate-limited yet; a per-byte or per-wakeup flood still fails);
 * - the guest driver saw no protocol anomaly.
 *
 * Random choices come from a seeded PRNG (mulberry32), so a failing seed replays the same
 * sequence of steps (timing on the back end side may differ). The seed is logged first.
 */
import assert from "node:assert/strict";
import {
  type GuestConn,
  type GuestListener,
  pattern,
  readExactly,
  startVm,
  type VmHandle,
  writeAll,
} from "../../lib/testing/mod.ts";
import { VhostUserRequest as R } from "../../lib/vhost_user/protocol.ts";
import { procRssBytes } from "../bench/proc_stats.ts";
import { mulberry32 } from "./prng.ts";

/** Options of `fuzzHostApps`. */
export interface FuzzHostAppsOptions {
  readonly seed: number;
  /** stop after this many steps (default: 200, or unbounded when `durationMs` is given) */
  readonly iterations?: number;
  /** stop after this long */
  readonly durationMs?: number;
  /** progress lines (default: none) */
  readonly log?: (s: string) => void;
  /** longest accepted vhost-user round trip (default 100 ms) */
  readonly replyLimitMs?: number;
}

/** What a run did. */
export interface FuzzHostAppsResult {
  readonly seed: number;
  readonly steps: number;
  /** steps taken per kind */
  readonly kinds: Record<string, number>;
  /** back-end stderr lines during the run */
  readonly logLines: number;
}

/** The guest port with an echo server (the well-behaved connection). */
const ECHO_PORT = 5000;
/** A guest port that accepts every connection and discards what it reads. */
const SINK_PORT = 5001;
/** A guest port nobody listens on: the guest refuses (RST). */
const REFUSED_PORT = 5002;
/** Most sockets the fuzzer keeps open at once. */
const MAX_HELD = 400;
/** Back-end fds allowed above its idle count plus the fuzzer's open sockets. */
const FD_MARGIN = 64;
/** Back-end RSS growth allowed over the run. */
const RSS_MARGIN = 128 * 1024 * 1024;
/** Back-end stderr lines allowed: a burst, plus this many per second of run time. */
const LOG_BURST = 200;
const LOG_PER_SEC = 50;
/** Life-cycle lines per host connection (connecting, established or gone, closed, timeout). */
const LOG_PER_CONNECTION = 4;
/** Steps between two checks that a new well-formed CONNECT still gets through. */
const FRESH_CONNECT_EVERY = 10;
/** Retries of a connect() that finds the back end's listen backlog full (5 ms apart). */
const CONNECT_RETRIES = 400;
/** How long a step waits for the back end to close a socket it should close. */
const SETTLE_MS = 1500;

const enc = new TextEncoder();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function safeClose(c: Deno.Conn): void {
  try {
    c.close();
  } catch { /* already closed */ }
}

/** Per-run state shared by the steps. */
class Run {
  readonly held: Deno.UnixConn[] = [];
  readonly kinds: Record<string, number> = {};
  /** sockets opened so far */
  connects = 0;

  constructor(readonly vm: VmHandle, readonly rand: () => number) {}

  int(lo: number, hi: number): number {
    return lo + Math.floor(this.rand() * (hi - lo + 1));
  }
  pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.rand() * xs.length)];
  }
  bytes(n: number): Uint8Array {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i++) b[i] = Math.floor(this.rand() * 256);
    return b;
  }

  /** Connects like a patient client: EAGAIN (the listen backlog is full) is retried. */
  async connect(): Promise<Deno.UnixConn> {
    this.connects++;
    for (let tries = 0;; tries++) {
      try {
        return await Deno.connect({ transport: "unix", path: this.vm.udsPath });
      } catch (e) {
        if (!(e instanceof Deno.errors.WouldBlock) || tries >= CONNECT_RETRIES) throw e;
        await sleep(5);
      }
    }
  }

  hold(c: Deno.UnixConn): void {
    if (this.held.length >= MAX_HELD) safeClose(this.held.shift()!);
    this.held.push(c);
  }

  /** A CONNECT line the back end accepts, in a random spelling. */
  validLine(port: number): Uint8Array {
    const kw = this.pick(["CONNECT", "connect", "Connect"]);
    const lead = this.pick(["", " ", "\t"]);
    const sep = this.pick([" ", "  ", "\t"]);
    const zeros = "0".repeat(this.int(0, 2));
    const tail = this.pick(["", " ", "\r"]);
    const line = `${lead}${kw}${sep}${zeros}${port}${tail}\n`;
    return enc.encode(line.length <= 32 ? line : `CONNECT ${port}\n`);
  }

  /** A line the back end must refuse. */
  invalidLine(): Uint8Array {
    switch (this.int(0, 7)) {
      case 0:
        return enc.encode("HELLO WORLD\n");
      case 1:
        return enc.encode("CONNECT\n");
      case 2:
        return enc.encode(`CONNECT ${this.int(0, 9999)} extra\n`);
      case 3:
        return enc.encode("CONNECT 4294967296\n");
      case 4:
        return enc.encode("CONNECT -1\n");
      case 5:
        return this.bytes(this.int(1, 64)); // binary, maybe with a newline
      case 6:
        return enc.encode("CONNECT " + "9".repeat(this.int(30, 200))); // huge, no newline
      default:
        return this.bytes(this.int(4096, 65536)); // huge binary
    }
  }

  /** Writes `bytes` in random pieces. */
  async writePieces(c: Deno.Conn, bytes: Uint8Array): Promise<void> {
    let off = 0;
    while (off < bytes.length) {
      const n = Math.min(bytes.length - off, this.int(1, 8));
      await writeAll(c, bytes.subarray(off, off + n));
      off += n;
      if (this.rand() < 0.3) await sleep(this.int(0, 5));
    }
  }
}

/** Reads until EOF/reset or `ms` pass; true if the socket was closed by the peer. */
async function closedWithin(c: Deno.Conn, ms: number): Promise<boolean> {
  const buf = new Uint8Array(4096);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<false>((r) => {
    timer = setTimeout(() => r(false), ms);
  });
  const reading = (async () => {
    try {
      while ((await c.read(buf)) !== null) { /* discard */ }
    } catch { /* reset, or closed by us */ }
    return true;
  })();
  const r = await Promise.race([reading, timeout]);
  clearTimeout(timer);
  return r;
}

type Step = (run: Run) => Promise<void>;

/** The step kinds, each a kind of host-app behaviour. */
const STEPS: Record<string, Step> = {
  /** a valid CONNECT to the sink, maybe with data after the line, closed at once or later */
  async validConnect(run) {
    const c = await run.connect();
    const line = run.validLine(run.pick([SINK_PORT, SINK_PORT, REFUSED_PORT, run.int(0, 0xffff)]));
    const early = run.rand() < 0.5 ? run.bytes(run.int(1, 8192)) : new Uint8Array(0);
    const msg = new Uint8Array(line.length + early.length);
    msg.set(line);
    msg.set(early, line.length);
    try {
      if (run.rand() < 0.5) await writeAll(c, msg);
      else await run.writePieces(c, msg.subarray(0, Math.min(msg.length, 64)));
    } catch { /* the back end may close first */ }
    switch (run.int(0, 2)) {
      case 0:
        safeClose(c); // abrupt close, maybe before the OK
        return;
      case 1:
        await closedWithin(c, run.int(1, 50));
        safeClose(c);
        return;
      default:
        run.hold(c); // an established (or refused) connection left open
    }
  },
  /** a bad line: the back end must close the socket */
  async invalidLine(run) {
    const c = await run.connect();
    try {
      if (run.rand() < 0.5) await writeAll(c, run.invalidLine());
      else await run.writePieces(c, run.invalidLine().subarray(0, 200));
    } catch { /* closed early: fine */ }
    if (!(await closedWithin(c, SETTLE_MS))) {
      safeClose(c);
      throw new Error("a bad CONNECT line was not answered by closing the socket");
    }
    safeClose(c);
  },
  /** a partial line, then half-open (our write side shut) or just idle */
  async halfOpen(run) {
    const c = await run.connect();
    const line = run.validLine(SINK_PORT);
    try {
      await writeAll(c, line.subarray(0, run.int(0, line.length - 1)));
      if (run.rand() < 0.5) await c.closeWrite();
    } catch { /* closed */ }
    run.hold(c);
  },
  /** many connects at once: closed at once, idle, or with a valid line */
  async storm(run) {
    const n = run.int(10, 150);
    const how = run.int(0, 2);
    const conns = await Promise.all(Array.from({ length: n }, () => run.connect()));
    for (const c of conns) {
      if (how === 0) safeClose(c);
      else if (how === 1) run.hold(c);
      else {
        writeAll(c, enc.encode(`CONNECT ${SINK_PORT}\n`)).catch(() => {});
        if (run.rand() < 0.5) safeClose(c);
        else run.hold(c);
      }
    }
  },
  /** closes some of the sockets kept open */
  async release(run) {
    const n = run.int(0, run.held.length);
    for (let i = 0; i < n; i++) safeClose(run.held.splice(run.int(0, run.held.length - 1), 1)[0]);
    await sleep(run.int(0, 20));
  },
};

const STEP_NAMES = Object.keys(STEPS);

/** Counts the open fds of process `pid`. */
export function fdCount(pid: number): number {
  let n = 0;
  for (const _ of Deno.readDirSync(`/proc/${pid}/fd`)) n++;
  return n;
}

function lineCount(s: string): number {
  let n = 0;
  for (let i = s.indexOf("\n"); i >= 0; i = s.indexOf("\n", i + 1)) n++;
  return n;
}

/** The well-behaved connection: host writes a pattern, the guest echoes it back. */
class EchoCheck {
  #offset = 0;
  readonly #data = pattern(1 << 20, 7);
  #guestLoop: Promise<void> = Promise.resolve();

  constructor(readonly host: Deno.UnixConn, readonly guest: GuestConn) {
    this.#guestLoop = (async () => {
      for (;;) {
        const d = await guest.read(Infinity, { timeoutMs: 3_600_000 });
        if (d === null) return;
        await guest.write(d, { timeoutMs: 30_000 });
      }
    })();
  }

  /** One round: `n` bytes out, the same `n` bytes back, in order. */
  async round(n: number): Promise<void> {
    const start = this.#offset % this.#data.length;
    const chunk = this.#data.subarray(start, Math.min(this.#data.length, start + n));
    await writeAll(this.host, chunk);
    const back = await readExactly(this.host, chunk.length, { timeoutMs: 10_000 });
    for (let i = 0; i < chunk.length; i++) {
      if (back[i] !== chunk[i]) {
        throw new Error(`echo: byte ${this.#offset + i} differs (lost or reordered data)`);
      }
    }
    this.#offset += chunk.length;
  }

  get bytes(): number {
    return this.#offset;
  }

  async close(): Promise<void> {
    safeClose(this.host);
    await this.#guestLoop.catch(() => {});
  }
}

/** Accepts every guest connection on `l` and lets it drain and close. */
function sinkLoop(l: GuestListener): Promise<void> {
  return (async () => {
    for (;;) {
      let c: GuestConn;
      try {
        c = await l.accept({ timeoutMs: 3_600_000 });
      } catch {
        return; // listener closed
      }
      c.discardIncoming();
      c.close({ timeoutMs: 30_000 }).catch(() => {});
    }
  })();
}

/** Runs the fuzzer (see the module doc); throws on the first broken invariant. */
export async function fuzzHostApps(opts: FuzzHostAppsOptions): Promise<FuzzHostAppsResult> {
  const say = opts.log ?? (() => {});
  const seed = opts.seed >>> 0;
  say(`host-app fuzzer: seed ${seed} (replay with FUZZ_SEED=${seed})`);
  const iterations = opts.iterations ?? (opts.durationMs === undefined ? 200 : Infinity);
  const deadline = performance.now() + (opts.durationMs ?? Infinity);
  const replyLimit = opts.replyLimitMs ?? 100;
  const vm = await startVm({ profile: "qemu" });
  const run = new Run(vm, mulberry32(seed));
  const pid = vm.backend.pid;
  let step = 0;
  let what = "set-up";
  let echo: EchoCheck | null = null;
  const sink = vm.guest.listen(SINK_PORT);
  const sinking = sinkLoop(sink);
  try {
    const echoListener = vm.guest.listen(ECHO_PORT);
    const [h, g] = await Promise.all([vm.hostConnect(ECHO_PORT), echoListener.accept()]);
    echo = new EchoCheck(h.conn, g);
    await echo.round(4096);
    const fdBase = fdCount(pid);
    const rssBase = procRssBytes(pid);
    const logBase = lineCount(vm.backend.stderr());
    const t0 = performance.now();

    const check = async () => {
      const t = performance.now();
      vm.frontEnd.request(R.GET_FEATURES, new Uint8Array(0), [], {
        expectReply: true,
        timeoutMs: 5000,
      });
      const ms = performance.now() - t;
      assert.ok(ms <= replyLimit, `GET_FEATURES answered after ${ms.toFixed(1)} ms`);
      await echo!.round(run.int(1, 16384));
      const fdLimit = fdBase + run.held.length + FD_MARGIN;
      for (const until = performance.now() + SETTLE_MS; fdCount(pid) > fdLimit;) {
        if (performance.now() > until) {
          throw new Error(`back end holds ${fdCount(pid)} fds (limit ${fdLimit})`);
        }
        await sleep(20);
      }
      const grown = procRssBytes(pid) - rssBase;
      assert.ok(grown <= RSS_MARGIN, `back end RSS grew by ${grown >> 20} MiB`);
      const lines = lineCount(vm.backend.stderr()) - logBase;
      const allowed = LOG_BURST + LOG_PER_SEC * (performance.now() - t0) / 1000 +
        LOG_PER_CONNECTION * run.connects;
      assert.ok(lines <= allowed, `back end logged ${lines} lines (allowed ${allowed.toFixed(0)})`);
      assert.deepEqual(vm.guest.anomalies, [], "guest anomalies");
      if (step % FRESH_CONNECT_EVERY === 0) {
        const fresh = await vm.hostConnect(SINK_PORT, { timeoutMs: 5000 });
        safeClose(fresh.conn);
      }
    };

    while (step < iterations && performance.now() < deadline) {
      what = run.pick(STEP_NAMES);
      run.kinds[what] = (run.kinds[what] ?? 0) + 1;
      await STEPS[what](run);
      await check();
      step++;
    }
    for (const c of run.held.splice(0)) safeClose(c);
    what = "final check";
    await check();
    const logLines = lineCount(vm.backend.stderr()) - logBase;
    say(
      `host-app fuzzer: seed ${seed}: ${step} steps ${JSON.stringify(run.kinds)}, ` +
        `${echo.bytes} bytes echoed, ${logLines} log lines`,
    );
    return { seed, steps: step, kinds: run.kinds, logLines };
  } catch (e) {
    const msg = e instanceof Error ? e.message : String(e);
    const tail = vm.backend.stderr().split("\n").slice(-30).join("\n");
    throw new Error(
      `host-app fuzzer, seed ${seed}, step ${step} (${what}): ${msg}\n` +
        `back end stderr (last lines):\n${tail}`,
      { cause: e },
    );
  } finally {
    for (const c of run.held.splice(0)) safeClose(c);
    await echo?.close();
    sink.close();
    await vm.stop();
    await sinking;
  }
}
