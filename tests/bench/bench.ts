/**
 * `deno task bench`: a benchmark for vhost-user vsock back ends, reported as ratios to a raw
 * AF_UNIX baseline measured in the same run on the same machine, and (`--compare ref`) side
 * by side with rust-vmm's vhost-device-vsock.
 *
 * Every party is its own OS process:
 * - the back end(s) under test (`--backend`, a command template with {socket} {uds} {cid};
 *   default: this repository's main.ts), each started twice: once for a guest posting Linux's
 *   4 KiB rx buffers and once for a guest posting 64 KiB rx buffers (for the one case that
 *   needs them);
 * - the guests (guest_driver_proc.ts): the `lib/testing` VMM front end and a lean Linux-like
 *   virtio-vsock driver that costs about what a kernel driver costs (payload sent by reference
 *   from a pool in guest RAM, received payload checked in place by samples);
 * - two host applications (host_app_proc.ts): blocking AF_UNIX I/O through FFI; one talks to
 *   the back ends' hybrid sockets, both together make the raw baseline; with the fairness
 *   figure a third one plays the guest's part for its raw baseline (`mixRaw`).
 *
 * Workloads: single-stream throughput (guest->host and host->guest at 4 KiB, 64 KiB and 1 MiB
 * writes; host->guest 64 KiB also into 64 KiB rx buffers) with CPU seconds per GiB of every
 * process; 64-byte ping-pong RTT p50/p99; N concurrent connections with every byte checked and
 * RSS per open connection (first back end only); RSS idle; the fairness figure (fairness.ts:
 * ping-pong p99 and 4 bulk streams alone and under a datagram flood; first back end only, with
 * `--dgram` on the crosvm profile; beside a raw AF_UNIX run of the same phases). Rounds (`--repeat`) interleave the raw baseline and every
 * back end, medians are reported.
 *
 * Output: tables on stdout, `--json FILE` with every figure and run, `--markdown FILE` with the
 * tables as Markdown, progress on stderr. Exit status 1 when data was corrupted or lost (or the
 * guest saw the first back end break the spec), 2 when something stalled (every wait has a
 * timeout), else 0; targets are printed, never enforced.
 */
import { existsSync } from "node:fs";
import { parseArgs } from "node:util";
import { repoRoot, spawnBackend } from "../../lib/testing/backend_process.ts";
import { LINUX_RX_BUF_SIZE } from "../../lib/testing/guest_driver.ts";
import { BenchChild, StallError } from "./control.ts";
import {
  fairnessCells,
  fairnessHead,
  type FairnessRound,
  fairnessRound,
  fairnessRows,
} from "./fairness.ts";
import { machineCpu, machineLoad, procRssBytes, procThreads } from "./proc_stats.ts";
import { fmt, median, renderReport, type Row } from "./report.ts";
import {
  cpuPerGiB,
  type ManyResult,
  type PingPong,
  type Rig,
  Runner,
  type StreamRun,
} from "./runs.ts";

const USAGE = `usage: deno task bench [options]
  --backend CMD        back end command template with {socket} {uds} {cid}
                       (default: deno run -A <repo>/main.ts --guest-cid {cid} --socket {socket}
                        --uds-path {uds} --max-connections 2000)
  --compare WHAT       also run a second back end in the same run: "ref" for
                       ../shared/peers/vhost-device-vsock (skipped with a note if absent), or a
                       command template like --backend
  --json FILE          also write every figure and run as JSON
  --markdown FILE      also write the tables as Markdown
  --quick              CI mode: a few seconds, every byte checked, no targets
  --duration-ms MS     per stream (default 1500; quick 150)
  --sizes LIST         write sizes in bytes (default 4096,65536,1048576)
  --directions LIST    stream kinds to run: raw,g2h,h2g (default all; for profiling one path)
  --rx-bufs LIST       guest rx buffer sizes for host->guest streams (default 4096,65536:
                       4096 for every size, 65536 for 64 KiB writes only)
  --conns N            concurrent connections (default 1000; quick 50)
  --conn-bytes N       bytes per connection (default 1048576; quick 65536)
  --iterations N       ping-pong round trips (default 20000; quick 300)
  --queue-size N       virtqueue size the guest uses (default 256)
  --buf-alloc N        guest per-connection buf_alloc (default 262144, Linux's)
  --profile P          front-end profile qemu|crosvm (default qemu)
  --packed             packed virtqueues (VIRTIO_F_RING_PACKED): the VMM offers it, the guests
                       ack it (every back end under test must offer it)
  --cid N              guest CID (default 3)
  --guest-verify M     host->guest checks in the guest: none|sample|full (default sample;
                       quick: full)
  --repeat N           rounds of streams and ping-pong; medians are reported (default 3;
                       quick 1)
  --fair-ms MS         length of each fairness phase (default 2000; quick 300)
  --skip LIST          skip parts: streams,pingpong,many,rss,fairness`;

const { values: flags } = parseArgs({
  args: Deno.args,
  options: {
    backend: { type: "string" },
    compare: { type: "string" },
    json: { type: "string" },
    markdown: { type: "string" },
    quick: { type: "boolean", default: false },
    "duration-ms": { type: "string" },
    sizes: { type: "string", default: "4096,65536,1048576" },
    directions: { type: "string", default: "raw,g2h,h2g" },
    "rx-bufs": { type: "string", default: `${LINUX_RX_BUF_SIZE},65536` },
    conns: { type: "string" },
    "conn-bytes": { type: "string" },
    iterations: { type: "string" },
    "queue-size": { type: "string", default: "256" },
    "buf-alloc": { type: "string", default: String(256 * 1024) },
    profile: { type: "string", default: "qemu" },
    packed: { type: "boolean", default: false },
    cid: { type: "string", default: "3" },
    "guest-verify": { type: "string" },
    skip: { type: "string", default: "" },
    "fair-ms": { type: "string" },
    repeat: { type: "string" },
    help: { type: "boolean", short: "h", default: false },
  },
});
if (flags.help) {
  console.log(USAGE);
  Deno.exit(0);
}

const quick = flags.quick;
const durationMs = Number(flags["duration-ms"] ?? (quick ? 150 : 1500));
const sizes = flags.sizes.split(",").map(Number);
const directions = new Set(flags.directions.split(","));
const rxBufs = flags["rx-bufs"].split(",").map(Number);
const nConns = Number(flags.conns ?? (quick ? 50 : 1000));
const connBytes = Number(flags["conn-bytes"] ?? (quick ? 65536 : 1 << 20));
const iterations = Number(flags.iterations ?? (quick ? 300 : 20000));
const warmup = quick ? 50 : 2000;
const hostVerify = quick ? "full" : "sample";
const guestVerify = flags["guest-verify"] ?? (quick ? "full" : "sample");
const repeat = Math.max(1, Number(flags.repeat ?? (quick ? 1 : 3)));
const skip = new Set(flags.skip.split(",").filter((s) => s !== ""));
const fairMs = Number(flags["fair-ms"] ?? (quick ? 300 : 2000));
/** Datagrams are offered with `--dgram` and reach the guest only on the crosvm profile. */
const FAIR_PROFILE = "crosvm";
const FAIR_BACKEND_FLAG = "--dgram";
const here = new URL(".", import.meta.url).pathname;
/** How long any single step may take beyond its own duration before it counts as a stall. */
const STALL_MS = quick ? 20000 : 60000;
const MiB = 1024 ** 2;
/** The reference back end, relative to the repository (the shared dir is beside the clone). */
const REF_PATH = `${repoRoot()}/../shared/peers/vhost-device-vsock`;
const REF_NAME = "vhost-device-vsock";

// ---- what runs ----------------------------------------------------------------------------

interface BackendSpec {
  readonly name: string;
  readonly template: string;
}

const backends: BackendSpec[] = [{
  name: "ours",
  template: flags.backend ??
    `${Deno.execPath()} run -A ${repoRoot()}/main.ts --guest-cid {cid} --socket {socket} ` +
      `--uds-path {uds} --max-connections 2000`,
}];
const notes: string[] = [];
if (flags.compare !== undefined) {
  if (flags.compare === "ref") {
    if (existsSync(REF_PATH)) {
      backends.push({
        name: REF_NAME,
        template: `${Deno.realPathSync(REF_PATH)} --guest-cid {cid} --socket {socket} ` +
          `--uds-path {uds}`,
      });
    } else {
      notes.push(`${REF_NAME} not found at ${REF_PATH}: the comparison is skipped`);
    }
  } else backends.push({ name: "compared", template: flags.compare });
}

/** One stream figure: direction, write size, the guest's rx buffer size. */
interface StreamCase {
  readonly key: string;
  readonly name: string;
  readonly kind: "g2h" | "h2g";
  readonly size: number;
  readonly rxBuf: number;
  readonly target?: Row["target"];
}

function sizeName(n: number): string {
  if (n >= MiB && n % MiB === 0) return `${n / MiB} MiB`;
  if (n >= 1024 && n % 1024 === 0) return `${n / 1024} KiB`;
  return `${n} B`;
}
function sizeKey(n: number): string {
  return sizeName(n).replace(" MiB", "m").replace(" KiB", "k").replace(" B", "");
}

/** The stream cases, in report order (the issue's targets for the first back end). */
function streamCases(): StreamCase[] {
  const cases: StreamCase[] = [];
  const linux = LINUX_RX_BUF_SIZE;
  for (
    const size of [
      65536,
      1048576,
      4096,
      ...sizes.filter((s) => ![65536, 1048576, 4096].includes(s)),
    ]
  ) {
    if (!sizes.includes(size)) continue;
    const big = size >= 65536;
    const ratio = size === 65536 ? 0.6 : size === 1048576 ? 0.4 : undefined;
    const vsSecond = big ? 1.5 : undefined;
    if (directions.has("g2h")) {
      cases.push({
        key: `g2h_${sizeKey(size)}`,
        name: `guest->host, ${sizeName(size)} writes`,
        kind: "g2h",
        size,
        rxBuf: linux,
        target: { ratio, vsSecond },
      });
    }
    if (!directions.has("h2g")) continue;
    for (const rx of rxBufs) {
      if (rx !== linux && size !== 65536) continue; // big rx buffers: 64 KiB writes only
      const rxName = rx === linux
        ? `${sizeName(rx)} rx buffers (Linux's)`
        : `${sizeName(rx)} rx buffers`;
      cases.push({
        key: `h2g_${sizeKey(size)}_rx${sizeKey(rx)}`,
        name: `host->guest, ${sizeName(size)} writes, ${rxName}`,
        kind: "h2g",
        size,
        rxBuf: rx,
        target: {
          ratio: size === 65536 && rx === linux ? 0.5 : ratio,
          vsSecond,
        },
      });
    }
  }
  return cases;
}

// ---- progress -----------------------------------------------------------------------------

const started = performance.now();
const isTty = Deno.stderr.isTerminal();
const enc = new TextEncoder();
function progress(msg: string): void {
  const line = `[bench ${((performance.now() - started) / 1000).toFixed(1)}s] ${msg}`;
  Deno.stderr.writeSync(enc.encode(isTty ? `\r\x1b[K${line}` : `${line}\n`));
}
function progressDone(): void {
  if (isTty) Deno.stderr.writeSync(enc.encode("\r\x1b[K"));
}

// ---- main ---------------------------------------------------------------------------------

/** Starts one back end and its guest with `rxBufSize`-byte rx buffers. */
async function startRig(b: BackendSpec, rxBufSize: number, profile = flags.profile): Promise<Rig> {
  const backend = await spawnBackend({
    command: b.template,
    cid: Number(flags.cid),
    startTimeoutMs: 30000,
  });
  const guest = BenchChild.spawn(`${b.name} guest`, `${here}guest_driver_proc.ts`, [
    "--socket",
    backend.socketPath,
    "--profile",
    profile,
    "--queue-size",
    flags["queue-size"],
    "--rx-buf-size",
    String(rxBufSize),
    "--buf-alloc",
    flags["buf-alloc"],
    "--stall-ms",
    String(quick ? 10000 : 20000),
    ...(flags.packed ? ["--packed"] : []),
  ]);
  try {
    await guest.unsolicited("booted", 30000);
  } catch (e) {
    await guest.close();
    const exit = await backend.stop();
    throw new Error(`${b.name}: the guest did not boot: ${e}\n${exit.stderr.slice(-2000)}`);
  }
  return { name: b.name, backend, guest, rxBufSize };
}

async function main(): Promise<number> {
  const cpuAtStart = machineCpu();
  const uptimeAtStart = Deno.loadavg();
  const tmp = await Deno.makeTempDir({ prefix: "vsock-bench-" });
  const cases = skip.has("streams") ? [] : streamCases();
  const rigSizes = [...new Set([LINUX_RX_BUF_SIZE, ...cases.map((c) => c.rxBuf)])];
  const hostA = BenchChild.spawn("host app", `${here}host_app_proc.ts`, []);
  const hostB = BenchChild.spawn("raw peer", `${here}host_app_proc.ts`, []);
  // The fairness figure's raw baseline: a host app in the guest's part (`mixRaw`).
  const rawMix = skip.has("fairness")
    ? null
    : BenchChild.spawn("raw mix", `${here}host_app_proc.ts`, []);
  const runner = new Runner(
    { durationMs, hostVerify, guestVerify, stallMs: STALL_MS, tmp },
    hostA,
    hostB,
  );
  /** rigs[backend index].get(rx buffer size) */
  const rigs: Map<number, Rig>[] = backends.map(() => new Map());
  const streams: StreamRun[] = [];
  const pings = new Map<string, PingPong[]>();
  const many = new Map<string, ManyResult>();
  const idleRss = new Map<string, number>();
  const fairRounds: FairnessRound[] = [];
  let fairRig: Rig | null = null;
  const extra: Record<string, unknown> = {};
  let exitCode = 0;
  try {
    progress(`starting ${backends.length * rigSizes.length} back end(s) and their guests`);
    await Promise.all(
      [hostA, hostB, ...(rawMix === null ? [] : [rawMix])].map((h) =>
        h.unsolicited("ready", 30000)
      ),
    );
    await Promise.all(
      backends.flatMap((b, i) =>
        rigSizes.map(async (rx) => rigs[i].set(rx, await startRig(b, rx)))
      ),
    );
    if (!skip.has("fairness")) {
      const b = backends[0];
      fairRig = await startRig(
        { name: b.name, template: `${b.template} ${FAIR_BACKEND_FLAG}` },
        LINUX_RX_BUF_SIZE,
        FAIR_PROFILE,
      );
      if (backends.length > 1) {
        notes.push(
          `fairness: first back end only (${backends.slice(1).map((x) => x.name).join(", ")} ` +
            `offers no datagrams, so the flood cannot run there)`,
        );
      }
    }
    const linuxRig = (i: number) => rigs[i].get(LINUX_RX_BUF_SIZE)!;
    extra.hostAppIdleRss = procRssBytes(hostA.pid);
    for (let i = 0; i < backends.length; i++) {
      idleRss.set(backends[i].name, await runner.settledRss(linuxRig(i), 500));
    }
    // Many connections first: per-connection RSS is measured on a fresh back end. Only the
    // first back end: vhost-device-vsock stalled in it (its host side never finished).
    if (!skip.has("many")) {
      progress(`${backends[0].name}: ${nConns} connections x ${sizeName(connBytes)}`);
      many.set(
        backends[0].name,
        await runner.manyConnections(linuxRig(0), nConns, connBytes, !skip.has("rss")),
      );
    }
    for (let r = 1; r <= repeat; r++) {
      const round = repeat > 1 ? ` (round ${r}/${repeat})` : "";
      for (const size of sizes) {
        if (directions.has("raw") && cases.some((c) => c.size === size)) {
          progress(`raw AF_UNIX, ${sizeName(size)} writes${round}`);
          streams.push(await runner.rawStream(size));
        }
        for (let i = 0; i < backends.length; i++) {
          for (const c of cases.filter((c) => c.size === size)) {
            progress(`${backends[i].name}: ${c.name}${round}`);
            const rig = rigs[i].get(c.rxBuf)!;
            streams.push(
              c.kind === "g2h"
                ? await runner.guestToHost(rig, c.key, c.size)
                : await runner.hostToGuest(rig, c.key, c.size),
            );
          }
        }
      }
      if (!skip.has("pingpong")) {
        progress(`raw AF_UNIX ping-pong, ${iterations} round trips${round}`);
        pings.set("raw", [
          ...(pings.get("raw") ?? []),
          await runner.pingPong(null, warmup, iterations),
        ]);
        for (let i = 0; i < backends.length; i++) {
          progress(`${backends[i].name}: ping-pong${round}`);
          const pp = await runner.pingPong(linuxRig(i), warmup, iterations);
          pings.set(backends[i].name, [...(pings.get(backends[i].name) ?? []), pp]);
        }
      }
      if (fairRig !== null) {
        progress(`${fairRig.name}: fairness, ${fairMs} ms per phase${round}`);
        fairRounds.push(
          await fairnessRound(runner, fairRig, rawMix!, {
            durationMs: fairMs,
            warmup: quick ? 50 : 500,
            guestVerify,
          }),
        );
      }
    }
    for (let i = 0; i < backends.length; i++) {
      extra[`${backends[i].name}Threads`] = procThreads(linuxRig(i).backend.pid);
      extra[`${backends[i].name}GuestStats`] = await linuxRig(i).guest.run("stats", {}, STALL_MS);
    }
  } catch (e) {
    progressDone();
    console.error(`bench failed: ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}`);
    if (e instanceof StallError) console.error("(a stall: some step did not finish in time)");
    for (const rig of [...rigs.flatMap((m) => [...m.values()]), ...(fairRig ? [fairRig] : [])]) {
      console.error(`${rig.name} back end stderr (tail):\n${rig.backend.stderr().slice(-2000)}`);
    }
    exitCode = 2;
  } finally {
    const all = [...rigs.flatMap((m) => [...m.values()]), ...(fairRig === null ? [] : [fairRig])];
    await Promise.all([
      hostA.close(),
      hostB.close(),
      ...(rawMix === null ? [] : [rawMix.close()]),
      ...all.map((r) => r.guest.close()),
    ]);
    await Promise.all(all.map((r) => r.backend.stop()));
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
  }
  progressDone();

  // ---- figures ----
  const names = backends.map((b) => b.name);
  const med = (backend: string, key: string, f: (s: StreamRun) => number) =>
    median(streams.filter((s) => s.backend === backend && s.key === key).map(f));
  const rows: Row[] = [];
  const cpuRows: string[][] = [];
  for (const c of cases) {
    const rawKey = `raw_${c.size}`;
    rows.push({
      key: `${c.key}_throughput`,
      name: c.name,
      unit: "MiB/s",
      better: "higher",
      raw: med("raw", rawKey, (s) => s.mibps),
      values: names.map((n) => med(n, c.key, (s) => s.mibps)),
      target: quick ? undefined : c.target,
    });
    const cells = [c.name, fmt(med("raw", rawKey, (s) => cpuPerGiB(s).total))];
    for (const n of names) {
      const p = (f: (x: ReturnType<typeof cpuPerGiB>) => number) =>
        fmt(med(n, c.key, (s) => f(cpuPerGiB(s))));
      cells.push(p((x) => x.backend), p((x) => x.guest), p((x) => x.host), p((x) => x.total));
    }
    cpuRows.push(cells);
  }
  if (pings.size > 0) {
    for (const p of ["p50", "p99"] as const) {
      rows.push({
        key: `pingpong_${p}`,
        name: `64 B ping-pong RTT ${p}`,
        unit: "us",
        better: "lower",
        raw: median((pings.get("raw") ?? []).map((x) => x[p])),
        values: names.map((n) => median((pings.get(n) ?? []).map((x) => x[p]))),
        target: quick || p === "p99" ? undefined : { ratio: 2.5 },
      });
    }
    rows.push({
      key: "pingpong_backend_cpu_per_rtt",
      name: "back-end CPU per round trip",
      unit: "us",
      better: "lower",
      raw: NaN,
      values: names.map((n) =>
        1e6 * median((pings.get(n) ?? []).map((x) => x.backendCpuPerRtt ?? NaN))
      ),
    });
  }
  if (many.size > 0) {
    const m = (n: string) => many.get(n);
    rows.push({
      key: "many_intact",
      name: `${nConns} connections x ${sizeName(connBytes)}, every byte checked`,
      unit: "intact",
      better: "higher",
      raw: NaN,
      values: names.map((n) => (m(n)?.intact ? 1 : 0)),
      notes: names.map((
        n,
      ) => (m(n) === undefined ? "-" : m(n)!.intact ? `yes, ${nConns}/${nConns}` : "NO")),
    });
    rows.push({
      key: "many_throughput",
      name: `${nConns} connections aggregate`,
      unit: "MiB/s",
      better: "higher",
      raw: NaN,
      values: names.map((n) => m(n)?.mibps ?? NaN),
    });
    rows.push({
      key: "many_backend_cpu_per_gib",
      name: `back-end CPU, ${nConns} connections`,
      unit: "s/GiB",
      better: "lower",
      raw: NaN,
      values: names.map((n) => m(n)?.backendCpuPerGiB ?? NaN),
    });
    if (!skip.has("rss")) {
      rows.push({
        key: "rss_per_conn",
        name: `back-end RSS per idle open connection (${nConns} open)`,
        unit: "KiB",
        better: "lower",
        raw: NaN,
        values: names.map((n) => (m(n)?.rssPerConn ?? NaN) / 1024),
        target: quick ? undefined : { value: 32 },
      });
    }
  }
  rows.push({
    key: "idle_rss",
    name: "back-end RSS, idle",
    unit: "MiB",
    better: "lower",
    raw: NaN,
    values: names.map((n) => (idleRss.get(n) ?? NaN) / MiB),
  });

  const total = (performance.now() - started) / 1000;
  const load = machineLoad(cpuAtStart, machineCpu());
  const header = [
    `vhost-user vsock benchmark${quick ? " (--quick)" : ""}, ${total.toFixed(1)} s`,
    ...backends.map((b) => `${b.name}: ${b.template}`),
    ...notes,
    `machine: ${navigator.hardwareConcurrency} CPUs; CPU time during the run: ${
      (100 * (load.busy - load.steal)).toFixed(0)
    }% running (any process), ${(100 * load.steal).toFixed(0)}% stolen by the hypervisor, ${
      (100 * (1 - load.busy)).toFixed(0)
    }% idle; load average at start ${uptimeAtStart.map((x) => x.toFixed(2)).join(" ")}, at end ${
      Deno.loadavg().map((x) => x.toFixed(2)).join(" ")
    }`,
    `guest: ${flags.profile} profile, ${flags.packed ? "packed" : "split"} rings, queue ${
      flags["queue-size"]
    }, buf_alloc ${flags["buf-alloc"]}, rx buffers ${
      rxBufs.join(" / ")
    } + 44 bytes; streams ${durationMs} ms, ${repeat} ` +
    `round(s), medians; the host checks ${hostVerify}, the guest ${guestVerify}`,
  ];
  // The streams themselves keep every CPU busy: other work shows in the load average.
  if (load.steal > 0.2 || uptimeAtStart[0] > navigator.hardwareConcurrency) {
    header.push(
      "WARNING: other work was competing for the CPUs (load average above the CPU count at " +
        "the start, or hypervisor steal); ratios are unreliable, run again when it is quieter",
    );
  }
  if (quick) {
    header.push(
      "quick mode: integrity and stall check only (every byte is checked in JS, so the figures " +
        "are not performance figures; targets are not evaluated)",
    );
  }
  const fairRows = fairnessRows(fairRounds);
  const report = renderReport({
    header,
    rows,
    cpuRows,
    names,
    streams,
    fairness: fairRounds.length === 0
      ? undefined
      : { head: fairnessHead(!quick), rows: fairnessCells(fairRows, !quick) },
  });
  console.log(report.text);
  if (runner.integrity.length > 0) {
    console.log("\nINTEGRITY FAILURES:");
    for (const f of runner.integrity) console.log(`  ${f}`);
    exitCode = exitCode || 1;
  }
  for (const [name, list] of runner.anomalies) {
    console.log(`\nGUEST ANOMALIES with ${name} (packets a Linux guest would drop):`);
    for (const a of list.slice(0, 10)) console.log(`  ${a}`);
    if (name === backends[0].name) exitCode = exitCode || 1;
  }
  if (flags.markdown !== undefined) await Deno.writeTextFile(flags.markdown, report.markdown);
  if (flags.json !== undefined) {
    const json = {
      date: new Date().toISOString(),
      quick,
      backends,
      config: {
        durationMs,
        repeat,
        sizes,
        rxBufs,
        conns: nConns,
        connBytes,
        iterations,
        queueSize: Number(flags["queue-size"]),
        bufAlloc: Number(flags["buf-alloc"]),
        profile: flags.profile,
        packed: flags.packed,
        fairMs,
        fairProfile: FAIR_PROFILE,
        hostVerify,
        guestVerify,
      },
      seconds: total,
      machine: {
        cpus: navigator.hardwareConcurrency,
        loadAvgStart: uptimeAtStart,
        loadAvgEnd: Deno.loadavg(),
        stealShare: load.steal,
        busyShare: load.busy,
      },
      figures: rows,
      streams,
      pingpong: Object.fromEntries(pings),
      many: Object.fromEntries(many),
      idleRss: Object.fromEntries(idleRss),
      fairness: fairRounds.length === 0 ? null : { rows: fairRows, rounds: fairRounds },
      ...extra,
      integrityFailures: runner.integrity,
      guestAnomalies: Object.fromEntries(runner.anomalies),
      exitCode,
    };
    await Deno.writeTextFile(
      flags.json,
      JSON.stringify(json, (_, v) => (typeof v === "number" && !Number.isFinite(v) ? null : v), 2) +
        "\n",
    );
  }
  return exitCode;
}

Deno.exit(await main());
