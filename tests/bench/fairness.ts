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
 * 3. with bulk: 2 and 1 at the same time (no flood), to tell the streams' effect from the
 *    flood's;
 * 4. under load: 2 again, plus a host->guest datagram flood from app B (as fast as the back
 *    end's datagram socket takes them), and 1 running at the same time from app A;
 * 5. control: 1 beside app B spinning on a CPU (`burn`), no other vsock traffic: what CPU
 *    contention alone does to the ping-pong's tail, to tell it from queueing in the back end.
 * Targets (issue 9): p99 RTT under load (4) <= 3x p99 alone (1); bulk under load (4) >= 80 % of
 * bulk alone (2). Every phase also records the CPU wait (schedstat run delay) of the processes
 * taking part, so CPU starvation is told apart from queueing in the back end, and the legs of
 * the round trips (stream_clock.ts: the guest's echo stamps when its ring pass began, when it
 * got the message and when it echoed it), so the time is placed: host app -> guest (the back
 * end's rx path and the guest's pass), in the guest, guest -> host app.
 *
 * The guest serves everything in one loop (guest_driver_proc.ts `mix`), like one kernel; the
 * load comes from a second host process (host_app_proc.ts `load`) so the ping-pong's own
 * process does nothing else. On a 2-CPU machine the back end, the guest and both host apps
 * share two CPUs, so CPU contention is part of what "under load" measures.
 *
 * Raw AF_UNIX baseline: right after each of phases 1-4, the same phase runs with no back end,
 * a third host app process in the guest's place (host_app_proc.ts `mixRaw`, raw_mix.ts: the
 * echo, the 4 sinks and a datagram socket in one epoll loop). App A's ping-pong connects to
 * its echo directly, app B's `load` connects to its sinks directly and sends plain 1 KiB
 * datagrams (no `<port>\n` prefix, which is the back end's protocol). Same durations, same
 * integrity checks (plus: every raw datagram sent arrives, AF_UNIX blocks rather than drops),
 * the same CPU-wait accounting over the raw mix and both host apps. Its rows ("raw AF_UNIX:")
 * carry no target: they tell what the machine itself gives the same flows.
 */
import type { BenchChild, Call } from "./control.ts";
import type { PingPong, PingSplit, Rig, Runner } from "./runs.ts";
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
  /** CPU seconds of the back end (raw phases: NaN) */
  readonly backendCpu: number;
  readonly dgramsSent: number;
  readonly dgramsReceived: number;
  readonly seconds: number;
  /** CPU seconds of the load's host app (bulk writer and datagram sender) */
  readonly senderCpu: number;
}

/** What one phase measured. */
export interface FairPhase {
  readonly ping?: PingPong;
  readonly bulk?: BulkPhase;
  /** seconds the processes taking part were runnable without a CPU, per second */
  readonly cpuWaitPerS: number;
  /**
   * seconds each process was runnable without a CPU during the phase; `guest`: whoever plays
   * the guest's part (the raw mix in raw phases, which have no back end: NaN)
   */
  readonly waitSeconds: { backend: number; guest: number; ping: number; load: number };
  /** the phase's wall-clock seconds */
  readonly wallSeconds: number;
}

/** The four phases measured both through the back end and over plain AF_UNIX. */
export interface FairPhases {
  readonly pingAlone: FairPhase;
  readonly bulkAlone: FairPhase;
  readonly withBulk: FairPhase;
  readonly loaded: FairPhase;
}

/** One round of the figure: the phases through the back end, the control, the raw baseline. */
export interface FairnessRound extends FairPhases {
  /** control: the ping-pong beside a process spinning on a CPU, no other vsock traffic */
  readonly cpuBound: FairPhase;
  /** the same four phases with the raw mix (host_app_proc.ts `mixRaw`) in the guest's place */
  readonly raw: FairPhases;
}

/** What runs in one phase. */
interface What {
  readonly ping: boolean;
  readonly bulk: boolean;
  readonly flood: boolean;
  readonly burn?: boolean;
}

const PHASES: Readonly<Record<keyof FairPhases, What>> = {
  pingAlone: { ping: true, bulk: false, flood: false },
  bulkAlone: { ping: false, bulk: true, flood: false },
  withBulk: { ping: true, bulk: true, flood: false },
  loaded: { ping: true, bulk: true, flood: true },
};

/**
 * Runs one round of the figure through `rig`, each phase followed by its raw twin against
 * `rawMix` (a host app child of its own), so load changes hit both alike.
 */
export async function fairnessRound(
  runner: Runner,
  rig: Rig,
  rawMix: BenchChild,
  o: FairnessOptions,
): Promise<FairnessRound> {
  const ours: Partial<Record<keyof FairPhases, FairPhase>> = {};
  const raw: Partial<Record<keyof FairPhases, FairPhase>> = {};
  for (const k of Object.keys(PHASES) as (keyof FairPhases)[]) {
    ours[k] = await phase(runner, rig, o, PHASES[k]);
    raw[k] = await phase(runner, rawMix, o, PHASES[k]);
  }
  const burn = { ping: true, bulk: false, flood: false, burn: true };
  return {
    ...(ours as FairPhases),
    cpuBound: await phase(runner, rig, o, burn),
    raw: raw as FairPhases,
  };
}

/** Where one phase's flows go: the guest's `mix` behind the back end, or the raw mix. */
interface Endpoints {
  readonly mix: Call;
  /** the back end's pid (raw: null) and the pid of whoever plays the guest's part */
  readonly backend: number | null;
  readonly guest: number;
  /** `pingpong`'s target */
  readonly ping: { path: string; hybridPort: number | null };
  /** `load`'s target (everything but its sizes and duration) */
  readonly load: Rec;
  /** reports' name of the side ("ours", "raw AF_UNIX") */
  readonly name: string;
}

/** Starts the receiving side of a phase on `to` (a rig, or the raw mix child). */
function endpoints(runner: Runner, to: Rig | BenchChild, o: FairnessOptions, what: What) {
  const nStreams = what.bulk ? FAIR_BULK_STREAMS : 0;
  const timeoutMs = o.durationMs + runner.opts.stallMs;
  if (!("backend" in to)) {
    const sock = (role: string) => `${runner.opts.tmp}/fair-${role}-${runner.newPort()}.sock`;
    const echoPath = what.ping ? sock("echo") : null;
    const sinkPaths = Array.from({ length: nStreams }, () => sock("bulk"));
    const dgramPath = what.flood ? sock("dgram") : null;
    return {
      mix: to.call("mixRaw", { echoPath, sinkPaths, dgramPath, verify: o.guestVerify, timeoutMs }),
      backend: null,
      guest: to.pid,
      ping: { path: echoPath ?? "", hybridPort: null },
      load: {
        paths: sinkPaths,
        dgram: dgramPath === null ? null : { path: dgramPath, size: FAIR_DGRAM_SIZE },
      },
      name: "raw AF_UNIX",
    } satisfies Endpoints;
  }
  const echoPort = what.ping ? runner.newPort() : null;
  const sinkPorts = Array.from({ length: nStreams }, () => runner.newPort());
  const dgramPort = what.flood ? runner.newPort() : null;
  return {
    mix: to.guest.call("mix", { echoPort, sinkPorts, dgramPort, verify: o.guestVerify }),
    backend: to.backend.pid,
    guest: to.guest.pid,
    ping: { path: to.backend.udsPath, hybridPort: echoPort },
    load: {
      udsPath: to.backend.udsPath,
      ports: sinkPorts,
      dgram: dgramPort === null
        ? null
        : { fromPort: FLOOD_HOST_PORT, toPort: dgramPort, size: FAIR_DGRAM_SIZE },
    },
    name: to.name,
  } satisfies Endpoints;
}

async function phase(
  runner: Runner,
  to: Rig | BenchChild,
  o: FairnessOptions,
  what: What,
): Promise<FairPhase> {
  const stall = runner.opts.stallMs;
  const timeout = o.durationMs + stall;
  const label = [
    what.ping && "ping-pong",
    what.bulk && "bulk",
    what.flood && "datagram flood",
    what.burn && "a CPU-bound process",
  ]
    .filter((x) => x).join(" + ");
  const ep: Endpoints = endpoints(runner, to, o, what);
  await ep.mix.event("listening", stall);
  const pids = [ep.backend ?? -1, ep.guest, runner.hostA.pid, runner.hostB.pid];
  const waits = () => pids.map((p) => (p < 0 ? NaN : runner.waits([p])));
  const sum = (xs: number[]) => xs.reduce((a, b) => a + (Number.isNaN(b) ? 0 : b), 0);
  const each0 = waits();
  const wall0 = performance.now();
  const cpu = () => (ep.backend === null ? NaN : procCpuSeconds(ep.backend));
  const b0 = cpu();
  let loadCall = null;
  if (what.bulk) {
    loadCall = runner.hostB.call("load", {
      ...ep.load,
      writeSize: BULK_WRITE,
      durationMs: o.durationMs,
    });
    await loadCall.event("started", stall);
  }
  if (what.burn) {
    loadCall = runner.hostB.call("burn", { durationMs: o.durationMs });
    await loadCall.event("started", stall);
  }
  // Under load the round trips stop before the load does, so every one of them has it.
  const pingMs = what.bulk || what.burn ? Math.max(50, o.durationMs - 300) : o.durationMs;
  const pp = what.ping
    ? runner.hostA.run("pingpong", {
      ...ep.ping,
      size: 64,
      warmup: o.warmup,
      iterations: 1_000_000,
      durationMs: pingMs,
    }, timeout * 2)
    : Promise.resolve(null);
  const [ping, load, guest] = await Promise.all([
    pp,
    loadCall === null ? Promise.resolve(null) : loadCall.done(timeout),
    ep.mix.done(timeout * 2),
  ]);
  const backendCpu = cpu() - b0;
  const wallS = (performance.now() - wall0) / 1000;
  const each = waits().map((w, i) => w - each0[i]);
  const cpuWaitPerS = sum(each) / wallS;
  const waitSeconds = { backend: each[0], guest: each[1], ping: each[2], load: each[3] };
  const who = `${ep.name} fairness (${label})`;
  runner.noteAnomalies(ep.name, `fairness ${label}`, (guest.anomalies ?? []) as string[]);
  let out: FairPhase = { cpuWaitPerS, waitSeconds, wallSeconds: wallS };
  if (ping !== null) {
    runner.check(who, Number(ping.mismatches) === 0, "echo mismatch");
    const rtts = Number(ping.iterations);
    out = {
      ...out,
      ping: {
        ...(ping as unknown as PingPong),
        backendCpuPerRtt: ep.backend === null ? undefined : backendCpu / rtts,
      },
    };
  }
  if (load !== null && what.bulk) {
    const sinks = guest.sinks as Rec[];
    const sent = load.bytes as number[];
    const t0 = Number(load.t0);
    let bytes = 0;
    let tEnd = 0;
    const perStream: number[] = [];
    for (const s of sinks) {
      const got = Number(s.bytes);
      bytes += got;
      tEnd = Math.max(tEnd, Number(s.tEnd));
      perStream.push(got / MiB / ((Number(s.tEnd) - t0) / 1000));
      if (Number(s.mismatches) !== 0) runner.check(who, false, String(s.error));
    }
    const total = sent.reduce((a, b) => a + b, 0);
    const receiver = ep.backend === null ? "the raw mix" : "the guest";
    runner.check(who, bytes === total, `sent ${total} bytes, ${receiver} received ${bytes}`);
    const dgramsSent = Number(load.dgramsSent);
    const dgramsReceived = Number(guest.datagrams);
    if (ep.backend === null) {
      // Plain AF_UNIX datagrams block the sender rather than drop: all of them arrive.
      runner.check(
        who,
        dgramsReceived === dgramsSent && Number(load.dgramsRefused) === 0,
        `sent ${dgramsSent} datagrams (${load.dgramsRefused} refused), received ${dgramsReceived}`,
      );
    }
    const seconds = (tEnd - t0) / 1000;
    const bulk: BulkPhase = {
      mibps: bytes / MiB / seconds,
      perStream,
      backendCpu,
      dgramsSent,
      dgramsReceived,
      seconds,
      senderCpu: Number(load.cpu),
    };
    out = { ...out, bulk };
  }
  return out;
}

/** One line of the fairness table: a value per phase column (NaN: not measured there). */
export interface FairnessRow {
  readonly key: string;
  readonly name: string;
  /** alone, with the bulk streams, with bulk streams and the datagram flood */
  readonly values: readonly [number, number, number];
  /** on (with flood) / alone */
  readonly target?: { op: "<=" | ">="; bound: number };
}

/** The figure's rows (medians over rounds); each raw AF_UNIX row follows its own figure. */
export function fairnessRows(rounds: readonly FairnessRound[]): FairnessRow[] {
  const m = (f: (r: FairnessRound) => number | undefined) => median(rounds.map((r) => f(r) ?? NaN));
  type Pick = (p: FairPhase) => number | undefined;
  type Side = (r: FairnessRound) => FairPhases;
  const ours: Side = (r) => r;
  const raw: Side = (r) => r.raw;
  /** a figure of each phase with the ping-pong (alone, with bulk, with bulk + flood) */
  const pingPhase = (f: Pick, side = ours): [number, number, number] => [
    m((r) => f(side(r).pingAlone)),
    m((r) => f(side(r).withBulk)),
    m((r) => f(side(r).loaded)),
  ];
  /** a figure of the ping-pong phases (alone, with bulk, with bulk + flood) */
  const ping = (f: (p: PingPong) => number, side = ours) =>
    pingPhase((p) => (p.ping === undefined ? undefined : f(p.ping)), side);
  /** a figure of the bulk phases (bulk alone, with ping-pong, with ping-pong + flood) */
  const bulk = (f: (b: BulkPhase) => number, side = ours): [number, number, number] => {
    const g: Pick = (p) => (p.bulk === undefined ? undefined : f(p.bulk));
    return [
      m((r) => g(side(r).bulkAlone)),
      m((r) => g(side(r).withBulk)),
      m((r) => g(side(r).loaded)),
    ];
  };
  /** the flood phase's datagrams delivered per second */
  const dgramsPerS = (side: Side): [number, number, number] => {
    const perS = (b: BulkPhase | undefined) => b && b.dgramsReceived / b.seconds;
    return [NaN, NaN, m((r) => perS(side(r).loaded.bulk))];
  };
  const spread = (b: BulkPhase) => Math.min(...b.perStream) / Math.max(...b.perStream);
  const RAW = "raw AF_UNIX:";
  const p50 = "64 B ping-pong RTT p50 (us)";
  const p99 = "64 B ping-pong RTT p99 (us)";
  const bulkName = `${FAIR_BULK_STREAMS} bulk host->guest streams together (MiB/s)`;
  const dgramName = `datagrams (${FAIR_DGRAM_SIZE} B) delivered to the guest per s`;
  const waitName = "CPU wait of all processes, ping-pong phases (s per s)";
  return [
    { key: "fair_pingpong_p50", name: p50, values: ping((p) => p.p50) },
    { key: "fair_raw_pingpong_p50", name: `${RAW} ${p50}`, values: ping((p) => p.p50, raw) },
    {
      key: "fair_pingpong_p99",
      name: p99,
      values: ping((p) => p.p99),
      target: { op: "<=", bound: 3 },
    },
    { key: "fair_raw_pingpong_p99", name: `${RAW} ${p99}`, values: ping((p) => p.p99, raw) },
    {
      key: "fair_pingpong_p99_cpu_bound",
      name: "control: p99 beside a CPU-bound process instead of the load (us)",
      values: [
        m((r) => r.pingAlone.ping?.p99),
        m((r) => r.cpuBound.ping?.p99),
        NaN,
      ],
    },
    ...legRows(ping),
    { key: "fair_pingpong_rtts", name: "round trips measured", values: ping((p) => p.iterations) },
    {
      key: "fair_pingpong_backend_cpu",
      name: "back-end CPU per round trip (us, all its work)",
      values: ping((p) => 1e6 * (p.backendCpuPerRtt ?? NaN)),
    },
    {
      key: "fair_bulk_throughput",
      name: bulkName,
      values: bulk((b) => b.mibps),
      target: { op: ">=", bound: 0.8 },
    },
    {
      key: "fair_raw_bulk_throughput",
      name: `${RAW} ${FAIR_BULK_STREAMS} bulk streams together (MiB/s)`,
      values: bulk((b) => b.mibps, raw),
    },
    { key: "fair_bulk_spread", name: "slowest bulk stream / fastest", values: bulk(spread) },
    { key: "fair_dgrams_per_s", name: dgramName, values: dgramsPerS(ours) },
    {
      key: "fair_raw_dgrams_per_s",
      name: `${RAW} datagrams (${FAIR_DGRAM_SIZE} B) delivered per s`,
      values: dgramsPerS(raw),
    },
    {
      key: "fair_dgrams_delivered",
      name: "datagrams delivered / sent by the host app",
      values: [
        NaN,
        NaN,
        m((r) => r.loaded.bulk && r.loaded.bulk.dgramsReceived / r.loaded.bulk.dgramsSent),
      ],
    },
    {
      key: "fair_backend_cpu",
      name: "back-end CPU, bulk phases (CPU s per s)",
      values: bulk((b) => b.backendCpu / b.seconds),
    },
    {
      key: "fair_sender_cpu",
      name: "load host app CPU, bulk phases (CPU s per s)",
      values: bulk((b) => b.senderCpu / b.seconds),
    },
    {
      key: "fair_ping_wait_per_rtt",
      name: "ping-pong app's CPU wait per round trip (us)",
      values: pingPhase((p) => p.ping && (1e6 * p.waitSeconds.ping) / p.ping.iterations),
    },
    {
      key: "fair_backend_wait",
      name: "back end's CPU wait, ping-pong phases (ms per s)",
      values: pingPhase((p) => (1000 * p.waitSeconds.backend) / p.wallSeconds),
    },
    {
      key: "fair_guest_wait",
      name: "guest's CPU wait, ping-pong phases (ms per s)",
      values: pingPhase((p) => (1000 * p.waitSeconds.guest) / p.wallSeconds),
    },
    { key: "fair_cpu_wait", name: waitName, values: pingPhase((p) => p.cpuWaitPerS) },
    {
      key: "fair_raw_cpu_wait",
      name: `${RAW} ${waitName}`,
      values: pingPhase((p) => p.cpuWaitPerS, raw),
    },
  ];
}

/** The round trips' legs (stamped by the guest's echo, see stream_clock.ts): p50 and p99 each. */
function legRows(
  ping: (f: (p: PingPong) => number) => [number, number, number],
): FairnessRow[] {
  const legs = [
    ["host_to_guest", "host app -> guest's echo service", (s: PingSplit) => s.hostToGuest],
    ["guest_before", "of which the guest's ring pass before it", (s: PingSplit) => s.guestBefore],
    ["in_guest", "in the guest, until echoed", (s: PingSplit) => s.inGuest],
    ["guest_to_host", "guest's echo -> host app", (s: PingSplit) => s.guestToHost],
  ] as const;
  return legs.flatMap(([key, name, leg]) =>
    (["p50", "p99"] as const).map((q) => ({
      key: `fair_pingpong_${key}_${q}`,
      name: `  leg: ${name}, ${q} (us)`,
      values: ping((p) => (p.split ? leg(p.split)[q] : NaN)),
    }))
  );
}

/** The table cells: figure, the three columns, with flood / alone, target. */
export function fairnessCells(rows: readonly FairnessRow[], targets: boolean): string[][] {
  return rows.map((r) => {
    const q = r.values[2] / r.values[0];
    const cells = [r.name, ...r.values.map(fmt), Number.isFinite(q) ? `${fmt(q)}x` : "-"];
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
  const h = [
    "fairness (ours, --dgram, crosvm profile)",
    "alone",
    "with bulk",
    "with bulk + flood",
    "flood/alone",
  ];
  return targets ? [...h, "target"] : h;
}
