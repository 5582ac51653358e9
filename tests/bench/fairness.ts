/**
 * The benchmark's fairness figure: does the back end's rx scheduler (deficit round robin over
 * flows, rx_scheduler.ts) keep an interactive connection responsive and bulk streams fed while
 * other flows flood the guest's rx queue? Datagrams carry no credit, so a host->guest datagram
 * flood is limited only by the scheduler (the datagram RFC's qdisc problem).
 *
 * One round, against a back end started with `--dgram` and a guest on the crosvm profile (the
 * only profile that passes VIRTIO_VSOCK_F_DGRAM through; QEMU 7.2 filters bit 3):
 * 1. ping-pong alone: 64-byte round trips, host app A <-> guest echo, for a fixed time;
 * 2. bulk alone: host app B writes 64 KiB writes into 4 host->guest streams for a fixed time;
 *    aggregate MiB/s = bytes the guest received / (last EOF - start of writing);
 * 3. under load: 2 again, plus a host->guest datagram flood from app B (as fast as the back
 *    end's datagram socket takes them), and 1 running at the same time from app A.
 * Targets (issue 9): p99 RTT under load <= 3x p99 alone; bulk under load >= 80 % of alone.
 *
 * The guest serves everything in one loop (guest_driver_proc.ts `mix`), like one kernel; the
 * load comes from a second host process (host_app_proc.ts `load`) so the ping-pong's own
 * process does nothing else. On a 2-CPU machine the back end, the guest and both host apps
 * share two CPUs, so CPU contention is part of what "under load" measures.
 */
import type { PingPong, Rig, Runner } from "./runs.ts";
import { procCpuSeconds } from "./proc_stats.ts";
import { fmt, median } from "./report.ts";

type Rec = Record<string, unknown>;
const MiB = 1024 ** 2;

/** Bulk host->guest streams of the figure. */
export const FAIR_BULK_STREAMS = 4;
/** Payload bytes per flood datagram (fits Linux's 4 KiB rx buffers with the header). */
export const FAIR_DGRAM_SIZE = 1024;
/** Bulk streams' write size. */
const BULK_WRITE = 65536;
/** Host port the flood comes from (the guest sees CID 2, this port). */
const FLOOD_HOST_PORT = 9100;

/** Settings of the figure. */
export interface FairnessOptions {
  /** length of each phase (ms) */
  readonly durationMs: number;
  /** ping-pong round trips before measuring */
  readonly warmup: number;
  /** how the guest checks the bulk streams */
  readonly guestVerify: string;
}

/** A bulk phase: the 4 streams' aggregate, and the flood when there was one. */
export interface BulkPhase {
  readonly mibps: number;
  /** each stream's MiB/s (same clock as the aggregate) */
  readonly perStream: number[];
  readonly backendCpu: number;
  readonly dgramsSent: number;
  readonly dgramsReceived: number;
  readonly seconds: number;
}

/** One round of the figure. */
export interface FairnessRound {
  readonly pingAlone: PingPong;
  readonly bulkAlone: BulkPhase;
  readonly pingLoaded: PingPong;
  readonly bulkLoaded: BulkPhase;
}

/** Runs one round of the figure through `rig`. */
export async function fairnessRound(
  runner: Runner,
  rig: Rig,
  o: FairnessOptions,
): Promise<FairnessRound> {
  const pingAlone = (await phase(runner, rig, o, { ping: true, bulk: false, flood: false })).ping!;
  const bulkAlone = (await phase(runner, rig, o, { ping: false, bulk: true, flood: false })).bulk!;
  const loaded = await phase(runner, rig, o, { ping: true, bulk: true, flood: true });
  return { pingAlone, bulkAlone, pingLoaded: loaded.ping!, bulkLoaded: loaded.bulk! };
}

async function phase(
  runner: Runner,
  rig: Rig,
  o: FairnessOptions,
  what: { ping: boolean; bulk: boolean; flood: boolean },
): Promise<{ ping?: PingPong; bulk?: BulkPhase }> {
  const stall = runner.opts.stallMs;
  const timeout = o.durationMs + stall;
  const echoPort = what.ping ? runner.newPort() : null;
  const sinkPorts = what.bulk
    ? Array.from({ length: FAIR_BULK_STREAMS }, () => runner.newPort())
    : [];
  const dgramPort = what.flood ? runner.newPort() : null;
  const label = [what.ping && "ping-pong", what.bulk && "bulk", what.flood && "datagram flood"]
    .filter((x) => x).join(" + ");
  const mix = rig.guest.call("mix", {
    echoPort,
    sinkPorts,
    dgramPort,
    verify: o.guestVerify,
  });
  await mix.event("listening", stall);
  const b0 = procCpuSeconds(rig.backend.pid);
  let loadCall = null;
  if (what.bulk) {
    loadCall = runner.hostB.call("load", {
      udsPath: rig.backend.udsPath,
      ports: sinkPorts,
      writeSize: BULK_WRITE,
      durationMs: o.durationMs,
      dgram: what.flood
        ? { fromPort: FLOOD_HOST_PORT, toPort: dgramPort, size: FAIR_DGRAM_SIZE }
        : null,
    });
    await loadCall.event("started", stall);
  }
  // Under load the round trips stop before the load does, so every one of them has it.
  const pingMs = what.bulk ? Math.max(50, o.durationMs - 300) : o.durationMs;
  const pp = what.ping
    ? runner.hostA.run("pingpong", {
      path: rig.backend.udsPath,
      hybridPort: echoPort,
      size: 64,
      warmup: o.warmup,
      iterations: 1_000_000,
      durationMs: pingMs,
    }, timeout * 2)
    : Promise.resolve(null);
  const [ping, load, guest] = await Promise.all([
    pp,
    loadCall === null ? Promise.resolve(null) : loadCall.done(timeout),
    mix.done(timeout * 2),
  ]);
  const backendCpu = procCpuSeconds(rig.backend.pid) - b0;
  const what_ = `${rig.name} fairness (${label})`;
  runner.noteAnomalies(rig.name, `fairness ${label}`, (guest.anomalies ?? []) as string[]);
  const out: { ping?: PingPong; bulk?: BulkPhase } = {};
  if (ping !== null) {
    runner.check(what_, Number(ping.mismatches) === 0, "echo mismatch");
    const rtts = Number(ping.iterations);
    out.ping = { ...(ping as unknown as PingPong), backendCpuPerRtt: backendCpu / rtts };
  }
  if (load !== null) {
    const sinks = guest.sinks as Rec[];
    const sent = load.bytes as number[];
    const t0 = Number(load.t0);
    let bytes = 0;
    let tEnd = 0;
    const perStream: number[] = [];
    sinks.forEach((s, i) => {
      const got = Number(s.bytes);
      bytes += got;
      tEnd = Math.max(tEnd, Number(s.tEnd));
      perStream.push(got / MiB / ((Number(s.tEnd) - t0) / 1000));
      if (Number(s.mismatches) !== 0) runner.check(what_, false, String(s.error));
    });
    const total = sent.reduce((a, b) => a + b, 0);
    runner.check(what_, bytes === total, `sent ${total} bytes, the guest received ${bytes}`);
    const seconds = (tEnd - t0) / 1000;
    out.bulk = {
      mibps: bytes / MiB / seconds,
      perStream,
      backendCpu,
      dgramsSent: Number(load.dgramsSent),
      dgramsReceived: Number(guest.datagrams),
      seconds,
    };
  }
  return out;
}

/** One line of the fairness table. */
export interface FairnessRow {
  readonly key: string;
  readonly name: string;
  readonly alone: number;
  readonly loaded: number;
  /** loaded / alone, with the target on it */
  readonly target?: { op: "<=" | ">="; bound: number };
}

/** The figure's rows (medians over rounds). */
export function fairnessRows(rounds: readonly FairnessRound[]): FairnessRow[] {
  const m = (f: (r: FairnessRound) => number) => median(rounds.map(f));
  const rate = (b: BulkPhase) => b.dgramsReceived / b.seconds;
  return [
    {
      key: "fair_pingpong_p50",
      name: "64 B ping-pong RTT p50 (us)",
      alone: m((r) => r.pingAlone.p50),
      loaded: m((r) => r.pingLoaded.p50),
    },
    {
      key: "fair_pingpong_p99",
      name: "64 B ping-pong RTT p99 (us)",
      alone: m((r) => r.pingAlone.p99),
      loaded: m((r) => r.pingLoaded.p99),
      target: { op: "<=", bound: 3 },
    },
    {
      key: "fair_pingpong_rtts",
      name: "round trips measured",
      alone: m((r) => r.pingAlone.iterations),
      loaded: m((r) => r.pingLoaded.iterations),
    },
    {
      key: "fair_bulk_throughput",
      name: `${FAIR_BULK_STREAMS} bulk host->guest streams together (MiB/s)`,
      alone: m((r) => r.bulkAlone.mibps),
      loaded: m((r) => r.bulkLoaded.mibps),
      target: { op: ">=", bound: 0.8 },
    },
    {
      key: "fair_bulk_slowest_share",
      name: "slowest bulk stream / fastest",
      alone: m((r) => Math.min(...r.bulkAlone.perStream) / Math.max(...r.bulkAlone.perStream)),
      loaded: m((r) => Math.min(...r.bulkLoaded.perStream) / Math.max(...r.bulkLoaded.perStream)),
    },
    {
      key: "fair_dgrams_per_s",
      name: `datagrams (${FAIR_DGRAM_SIZE} B) delivered to the guest per s`,
      alone: NaN,
      loaded: m((r) => rate(r.bulkLoaded)),
    },
    {
      key: "fair_dgrams_delivered",
      name: "datagrams delivered / sent by the host app",
      alone: NaN,
      loaded: m((r) => r.bulkLoaded.dgramsReceived / r.bulkLoaded.dgramsSent),
    },
    {
      key: "fair_backend_cpu_share",
      name: "back-end CPU during the bulk phase (CPU s / s)",
      alone: m((r) => r.bulkAlone.backendCpu / r.bulkAlone.seconds),
      loaded: m((r) => r.bulkLoaded.backendCpu / r.bulkLoaded.seconds),
    },
  ];
}

/** The table cells: figure, alone, under load, loaded/alone, target. */
export function fairnessCells(rows: readonly FairnessRow[], targets: boolean): string[][] {
  return rows.map((r) => {
    const q = r.loaded / r.alone;
    const cells = [r.name, fmt(r.alone), fmt(r.loaded), Number.isFinite(q) ? `${fmt(q)}x` : "-"];
    if (targets) {
      const t = r.target;
      const ok = t === undefined ? false : t.op === "<=" ? q <= t.bound : q >= t.bound;
      cells.push(t === undefined ? "" : `${t.op} ${t.bound}x: ${ok ? "met" : "MISSED"}`);
    }
    return cells;
  });
}

/** The table header matching `fairnessCells`. */
export function fairnessHead(targets: boolean): string[] {
  const h = ["fairness (ours, --dgram, crosvm profile)", "alone", "under load", "load/alone"];
  return targets ? [...h, "target"] : h;
}
