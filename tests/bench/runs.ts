/**
 * The benchmark's measurements: one function per workload, each driving the child processes
 * (control.ts) of one "rig" (a back end under test with its guest) and the host applications,
 * and returning what it measured, with CPU seconds of every process taking part.
 *
 * - `rawStream`: host app -> host app over a plain AF_UNIX stream (the baseline);
 * - `guestToHost` / `hostToGuest`: one connection through the back end, the sender writing the
 *   pattern in writes of one size for a fixed time, then half-closing; the receiver reads to
 *   EOF. MiB/s = bytes received / (receiver's EOF - sender's start), clocks shared across
 *   processes;
 * - `pingPong`: 64-byte round trips, host app <-> guest echo (or host app <-> host app);
 * - `manyConnections`: N connections opened together, half each way, all transferring at
 *   once, every byte checked, plus the back end's RSS before and with them open.
 *
 * Integrity problems (lost, extra or wrong bytes) are collected in `integrity`, what the guest
 * saw breaking the spec in `anomalies`; every wait has a timeout (StallError).
 */
import type { BackendProcess } from "../../lib/testing/backend_process.ts";
import type { BenchChild, Call } from "./control.ts";
import { procCpuSeconds, procRssBytes, procSchedSeconds } from "./proc_stats.ts";

type Rec = Record<string, unknown>;
const num = (r: Rec, k: string) => Number(r[k]);
const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

/** A back end under test with the guest attached to it. */
export interface Rig {
  /** the back end's name in reports ("ours", "vhost-device-vsock", ...) */
  readonly name: string;
  readonly backend: BackendProcess;
  readonly guest: BenchChild;
  /** payload bytes of the guest's rx buffers */
  readonly rxBufSize: number;
}

/** One single-stream run. */
export interface StreamRun {
  /** the stream case's key (e.g. "h2g_64k_rx4k"), "raw_<size>" for baselines */
  readonly key: string;
  /** back end name, "raw" for baselines */
  readonly backend: string;
  readonly kind: "raw" | "g2h" | "h2g";
  readonly size: number;
  readonly bytes: number;
  readonly seconds: number;
  readonly mibps: number;
  /** CPU seconds during the stream: back end, guest driver, host app, raw peer (raw only) */
  readonly cpu: { backend: number; guest: number; host: number; peer: number };
  /** guest interrupts (call eventfd signals) */
  readonly guestWakeups: number;
  /** guest kicks (queue notifications to the back end) */
  readonly guestKicks: number;
  /** data packets the guest sent (guest->host) or received (host->guest) */
  readonly guestPackets: number;
  /** longest pause of the receiver (ms) between data arrivals */
  readonly maxGapMs: number;
  /** guest only: ring state at the first 100 ms without a notification, if any */
  readonly quietPoll: string | null;
  /** seconds the processes were runnable but waited for a CPU (schedstat run delay) */
  readonly cpuWait: number;
}

/** CPU seconds per GiB moved of each process of a stream run. */
export function cpuPerGiB(s: StreamRun): {
  backend: number;
  guest: number;
  host: number;
  total: number;
} {
  const gib = s.bytes / GiB;
  if (s.kind === "raw") {
    return { backend: NaN, guest: NaN, host: NaN, total: (s.cpu.host + s.cpu.peer) / gib };
  }
  return {
    backend: s.cpu.backend / gib,
    guest: s.cpu.guest / gib,
    host: s.cpu.host / gib,
    total: (s.cpu.backend + s.cpu.guest + s.cpu.host) / gib,
  };
}

/** Ping-pong round-trip times (us). */
export interface PingPong {
  readonly p50: number;
  readonly p90: number;
  readonly p99: number;
  readonly mean: number;
  readonly max: number;
  readonly iterations: number;
  /** back end CPU seconds per round trip */
  readonly backendCpuPerRtt?: number;
  /** the legs of the round trips (us), when the echo stamped them (the guest's does) */
  readonly split?: PingSplit | null;
}

/** p50 and p99 (us) of each leg of a ping-pong's round trips (see stream_clock.ts). */
export interface PingSplit {
  /** host app's write -> the guest's rx processing hands the message to the echo service */
  readonly hostToGuest: { p50: number; p99: number };
  /** part of hostToGuest: the guest's pass over its rings, from its start to this message */
  readonly guestBefore: { p50: number; p99: number };
  /** -> the guest sends it back */
  readonly inGuest: { p50: number; p99: number };
  /** -> the host app has read it */
  readonly guestToHost: { p50: number; p99: number };
}

/** Many-connection result. */
export interface ManyResult {
  readonly conns: number;
  readonly bytesPerConn: number;
  readonly intact: boolean;
  readonly errors: string[];
  readonly openSeconds: number;
  readonly transferSeconds: number;
  readonly mibps: number;
  readonly backendCpuPerGiB: number;
  readonly rssBefore: number;
  readonly rssOpen: number;
  readonly rssPerConn: number;
}

/** Settings shared by every run. */
export interface RunnerOptions {
  readonly durationMs: number;
  /** how much of each chunk the host app checks */
  readonly hostVerify: string;
  /** how much of each packet the guest checks */
  readonly guestVerify: string;
  /** longest any single step may take beyond its own duration */
  readonly stallMs: number;
  /** a temporary directory for raw sockets */
  readonly tmp: string;
}

/** Runs workloads; `hostA` talks to back ends, `hostB` is the raw baselines' peer. */
export class Runner {
  /** integrity problems found (non-empty -> exit 1) */
  readonly integrity: string[] = [];
  /** spec violations the guest saw (a Linux guest would drop the packet), per back end */
  readonly anomalies = new Map<string, string[]>();
  #nextPort = 5000;

  constructor(
    readonly opts: RunnerOptions,
    readonly hostA: BenchChild,
    readonly hostB: BenchChild,
  ) {}

  /** Records an integrity problem unless `ok`. */
  check(what: string, ok: boolean, detail: string): void {
    if (!ok) this.integrity.push(`${what}: ${detail}`);
  }

  /** Records what the guest saw breaking the spec with back end `backend`. */
  noteAnomalies(backend: string, key: string, anomalies: readonly string[]): void {
    if (anomalies.length === 0) return;
    const list = this.anomalies.get(backend) ?? [];
    list.push(...anomalies.map((a) => `${key}: ${a}`));
    this.anomalies.set(backend, list);
  }

  /** A port number not used before in this run. */
  newPort(): number {
    return this.#nextPort++;
  }

  #timeout(): number {
    return this.opts.durationMs + this.opts.stallMs;
  }

  /** Seconds processes `pids` (and their descendants) were runnable without a CPU so far. */
  waits(pids: number[]): number {
    let s = 0;
    for (const p of pids) s += procSchedSeconds(p).waiting;
    return s;
  }

  #finish(
    key: string,
    backend: string,
    kind: StreamRun["kind"],
    size: number,
    src: Rec,
    snk: Rec,
    cpu: StreamRun["cpu"],
    guestSide: Rec | null,
    cpuWait: number,
  ): StreamRun {
    const bytes = num(snk, "bytes");
    const seconds = (num(snk, "tEnd") - num(src, "t0")) / 1000;
    const what = `${backend} ${key}`;
    this.check(what, bytes === num(src, "bytes"), `sent ${src.bytes} bytes, received ${bytes}`);
    if (snk.mismatches !== undefined) {
      this.check(what, num(snk, "mismatches") === 0, String(snk.error));
    }
    this.noteAnomalies(backend, key, (guestSide?.anomalies ?? []) as string[]);
    return {
      key,
      backend,
      kind,
      size,
      bytes,
      seconds,
      mibps: bytes / MiB / seconds,
      cpu,
      guestWakeups: guestSide === null ? 0 : num(guestSide, "wakeups"),
      guestKicks: guestSide === null ? 0 : num(guestSide, "kicks"),
      guestPackets: guestSide === null ? 0 : num(guestSide, "packets"),
      maxGapMs: num(snk, "maxGapMs"),
      quietPoll: guestSide === null ? null : (guestSide.quietPoll as string | null) ?? null,
      cpuWait,
    };
  }

  /** The raw AF_UNIX baseline: hostB writes `size`-byte writes to hostA. */
  async rawStream(size: number): Promise<StreamRun> {
    const { hostA, hostB } = this;
    const path = `${this.opts.tmp}/raw-${this.#nextPort++}.sock`;
    const sinkCall = hostA.call("sink", {
      listenPath: path,
      readSize: size,
      verify: this.opts.hostVerify,
    });
    await sinkCall.event("listening", this.opts.stallMs);
    const w0 = this.waits([hostA.pid, hostB.pid]);
    const srcCall = hostB.call("source", {
      path,
      hybridPort: null,
      writeSize: size,
      durationMs: this.opts.durationMs,
    });
    const [src, snk] = await Promise.all([
      srcCall.done(this.#timeout()),
      sinkCall.done(this.#timeout()),
    ]);
    const cpu = { backend: 0, guest: 0, host: num(snk, "cpu"), peer: num(src, "cpu") };
    const wait = this.waits([hostA.pid, hostB.pid]) - w0;
    return this.#finish(`raw_${size}`, "raw", "raw", size, src, snk, cpu, null, wait);
  }

  /** guest -> host: the guest writes `size`-byte writes, hostA reads them. */
  async guestToHost(rig: Rig, key: string, size: number): Promise<StreamRun> {
    const port = this.#nextPort++;
    const sinkCall = this.hostA.call("sink", {
      listenPath: `${rig.backend.udsPath}_${port}`,
      readSize: size,
      verify: this.opts.hostVerify,
    });
    return await this.#throughBackend(
      rig,
      key,
      "g2h",
      size,
      sinkCall,
      () => rig.guest.call("source", { port, writeSize: size, durationMs: this.opts.durationMs }),
    );
  }

  /** host -> guest: hostA writes `size`-byte writes through the hybrid socket. */
  async hostToGuest(rig: Rig, key: string, size: number): Promise<StreamRun> {
    const port = this.#nextPort++;
    const sinkCall = rig.guest.call("sink", { port, verify: this.opts.guestVerify });
    return await this.#throughBackend(
      rig,
      key,
      "h2g",
      size,
      sinkCall,
      () =>
        this.hostA.call("source", {
          path: rig.backend.udsPath,
          hybridPort: port,
          writeSize: size,
          durationMs: this.opts.durationMs,
        }),
    );
  }

  /**
   * A stream through the back end of `rig`: once `sinkCall` listens, starts the source and
   * measures every process's CPU while both run.
   */
  async #throughBackend(
    rig: Rig,
    key: string,
    kind: "g2h" | "h2g",
    size: number,
    sinkCall: Call,
    startSource: () => Call,
  ): Promise<StreamRun> {
    await sinkCall.event("listening", this.opts.stallMs);
    const pids = [rig.backend.pid, rig.guest.pid, this.hostA.pid];
    const b0 = procCpuSeconds(rig.backend.pid);
    const w0 = this.waits(pids);
    const srcCall = startSource();
    const [src, snk] = await Promise.all([
      srcCall.done(this.#timeout()),
      sinkCall.done(this.#timeout()),
    ]);
    const [guestSide, hostSide] = kind === "g2h" ? [src, snk] : [snk, src];
    const cpu = {
      backend: procCpuSeconds(rig.backend.pid) - b0,
      guest: num(guestSide, "cpu"),
      host: num(hostSide, "cpu"),
      peer: 0,
    };
    const wait = this.waits(pids) - w0;
    return this.#finish(key, rig.name, kind, size, src, snk, cpu, guestSide, wait);
  }

  /**
   * 64-byte ping-pong: hostA writes, the peer echoes (the guest through `rig`, or hostB for
   * the raw baseline when `rig` is null).
   */
  async pingPong(rig: Rig | null, warmup: number, iterations: number): Promise<PingPong> {
    const port = this.#nextPort++;
    const path = `${this.opts.tmp}/pp-${port}.sock`;
    const echoCall = rig === null
      ? this.hostB.call("echo", { listenPath: path })
      : rig.guest.call("echo", { port });
    await echoCall.event("listening", this.opts.stallMs);
    const b0 = rig === null ? 0 : procCpuSeconds(rig.backend.pid);
    const pp = await this.hostA.run(
      "pingpong",
      {
        path: rig === null ? path : rig.backend.udsPath,
        hybridPort: rig === null ? null : port,
        size: 64,
        warmup,
        iterations,
      },
      this.opts.stallMs * 2,
    );
    const b1 = rig === null ? 0 : procCpuSeconds(rig.backend.pid);
    await echoCall.done(this.opts.stallMs);
    this.check(`${rig?.name ?? "raw"} ping-pong`, num(pp, "mismatches") === 0, "echo mismatch");
    return {
      ...(pp as unknown as PingPong),
      backendCpuPerRtt: rig === null ? undefined : (b1 - b0) / (iterations + warmup),
    };
  }

  /** Samples the back end's RSS a few times over `ms` and returns the median. */
  async settledRss(rig: Rig, ms: number): Promise<number> {
    const xs: number[] = [];
    for (let i = 0; i < 5; i++) {
      await new Promise((r) => setTimeout(r, ms / 5));
      xs.push(procRssBytes(rig.backend.pid));
    }
    xs.sort((a, b) => a - b);
    return xs[2];
  }

  /**
   * `nConns` connections (half guest->host, half host->guest), opened together, then all
   * moving `connBytes` at once, every byte checked on receipt.
   */
  async manyConnections(
    rig: Rig,
    nConns: number,
    connBytes: number,
    measureRss: boolean,
  ): Promise<ManyResult> {
    const stall = this.opts.stallMs;
    const guestPort = 6000 + this.#nextPort++;
    const hostPort = 7000 + this.#nextPort++;
    const nOut = Math.floor(nConns / 2); // guest -> host
    const nIn = nConns - nOut; // host -> guest
    const listenPath = `${rig.backend.udsPath}_${hostPort}`;
    const rssBefore = measureRss ? await this.settledRss(rig, 500) : NaN;
    await this.hostA.run("manyListen", { listenPath }, stall);
    const gOpen = rig.guest.call("manyOpen", {
      listenPort: guestPort,
      hostPort,
      nIn,
      nOut,
      firstId: 0,
    });
    await gOpen.event("listening", stall);
    const hOpen = this.hostA.call("manyOpen", {
      udsPath: rig.backend.udsPath,
      guestPort,
      nOut: nIn,
      firstId: 1_000_000,
      listenPath,
      nIn: nOut,
      timeoutMs: stall,
    });
    const [go, ho] = await Promise.all([gOpen.done(stall * 2), hOpen.done(stall * 2)]);
    const rssOpen = measureRss ? await this.settledRss(rig, 1000) : NaN;
    const b0 = procCpuSeconds(rig.backend.pid);
    const timeoutMs = stall * 3;
    const gT = rig.guest.call("manyTransfer", { bytesPerConn: connBytes, verify: "full" });
    const hT = this.hostA.call("manyTransfer", {
      bytesPerConn: connBytes,
      verify: "full",
      timeoutMs,
    });
    const [gr, hr] = await Promise.all([gT.done(timeoutMs), hT.done(timeoutMs)]);
    const b1 = procCpuSeconds(rig.backend.pid);
    await this.hostA.run("manyClose", {}, stall);
    await rig.guest.run("manyClose", {}, stall);
    const errors = [...(gr.errors as string[]), ...(hr.errors as string[])];
    const expect = connBytes * nConns;
    const moved = num(gr, "received") + num(hr, "received");
    if (moved !== expect) errors.push(`moved ${moved} bytes, expected ${expect}`);
    if (num(gr, "streamsIn") !== nIn || num(hr, "streamsIn") !== nOut) {
      errors.push(`streams: guest got ${gr.streamsIn}/${nIn}, host got ${hr.streamsIn}/${nOut}`);
    }
    const intact = errors.length === 0;
    this.check(`${rig.name} ${nConns} connections`, intact, errors.slice(0, 5).join("; "));
    const seconds = Math.max(num(gr, "wall"), num(hr, "wall"));
    return {
      conns: nConns,
      bytesPerConn: connBytes,
      intact,
      errors: errors.slice(0, 20),
      openSeconds: Math.max(num(go, "seconds"), num(ho, "seconds")),
      transferSeconds: seconds,
      mibps: moved / MiB / seconds,
      backendCpuPerGiB: (b1 - b0) / (moved / GiB),
      rssBefore,
      rssOpen,
      rssPerConn: (rssOpen - rssBefore) / nConns,
    };
  }
}
