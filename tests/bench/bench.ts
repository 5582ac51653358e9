/**
 * `deno task bench`: a benchmark for any vhost-user vsock back end, reported as ratios to
 * baselines measured in the same run on the same machine.
 *
 * Three kinds of child process take part, each a separate OS process:
 * - the back end under test (`--backend`, a command template with {socket} {uds} {cid};
 *   default: this repository's main.ts with `--max-connections 2000`);
 * - the guest (guest_driver_proc.ts): the `lib/testing` VMM front end + virtio-vsock driver,
 *   polling synchronously, with big pre-filled rx buffers;
 * - host applications (host_app_proc.ts): blocking AF_UNIX I/O through FFI; one talks to the
 *   back end's hybrid socket, and two of them talk to each other for the raw baselines.
 *
 * Workloads (full run; `--quick` shrinks every one of them to a few seconds in total and checks
 * every byte):
 * - single-stream throughput guest->host and host->guest at 4 KiB, 64 KiB and 1 MiB writes,
 *   each next to a raw AF_UNIX stream between two host apps with the same write and read sizes;
 * - 64-byte ping-pong RTT (p50/p99) host app <-> guest echo, next to the same ping-pong between
 *   two host apps;
 * - N concurrent connections (default 1000, half each way) each moving 1 MiB, every byte checked;
 * - back-end CPU seconds per GiB moved (/proc/<pid>/stat), next to the CPU the raw pair spends;
 * - back-end RSS when idle and per open idle connection.
 *
 * Output: a table on stdout, `--json FILE` with every figure, a progress line on stderr. The exit
 * status is non-zero only when data was corrupted or lost, or something stalled (every wait has
 * a timeout); targets are reported, never enforced.
 */
import { parseArgs } from "node:util";
import { type BackendProcess, repoRoot, spawnBackend } from "../../lib/testing/backend_process.ts";
import { BenchChild, StallError } from "./control.ts";
import {
  machineCpu,
  machineLoad,
  procCpuSeconds,
  procRssBytes,
  procSchedSeconds,
  procThreads,
} from "./proc_stats.ts";
import { type Figure, figure, figureTable, fmt, table } from "./report.ts";

const USAGE = `usage: deno task bench [options]
  --backend CMD        back end command template with {socket} {uds} {cid}
                       (default: deno run -A <repo>/main.ts --guest-cid {cid} --socket {socket}
                        --uds-path {uds} --max-connections 2000)
  --json FILE          also write every figure as JSON
  --quick              CI mode: a few seconds, every byte checked, no thresholds
  --duration-ms MS     per stream (default 1500; quick 150)
  --sizes LIST         write sizes in bytes (default 4096,65536,1048576)
  --conns N            concurrent connections (default 1000; quick 50)
  --conn-bytes N       bytes per connection (default 1048576; quick 65536)
  --iterations N       ping-pong round trips (default 20000; quick 300)
  --queue-size N       virtqueue size the guest uses (default 256)
  --rx-buf-size N      guest rx buffer payload bytes (default 65536)
  --buf-alloc N        guest per-connection buf_alloc (default 262144, Linux's)
  --profile P          front-end profile qemu|crosvm (default qemu)
  --cid N              guest CID (default 3)
  --guest-verify M     host->guest stream checks: none|sample|full (default none = discard;
                       quick: full)
  --repeat N           rounds of streams and ping-pong; medians are reported (default 5;
                       quick 1)
  --skip LIST          skip parts: streams,pingpong,many,rss
  --directions LIST    stream kinds to run: raw,g2h,h2g (default all; for profiling one path)`;

const { values: flags } = parseArgs({
  args: Deno.args,
  options: {
    backend: { type: "string" },
    json: { type: "string" },
    quick: { type: "boolean", default: false },
    "duration-ms": { type: "string" },
    sizes: { type: "string" },
    conns: { type: "string" },
    "conn-bytes": { type: "string" },
    iterations: { type: "string" },
    "queue-size": { type: "string", default: "256" },
    "rx-buf-size": { type: "string", default: "65536" },
    "buf-alloc": { type: "string", default: String(256 * 1024) },
    profile: { type: "string", default: "qemu" },
    cid: { type: "string", default: "3" },
    "guest-verify": { type: "string" },
    skip: { type: "string", default: "" },
    repeat: { type: "string" },
    directions: { type: "string", default: "raw,g2h,h2g" },
    help: { type: "boolean", short: "h", default: false },
  },
});
if (flags.help) {
  console.log(USAGE);
  Deno.exit(0);
}

const quick = flags.quick;
const cid = Number(flags.cid);
const durationMs = Number(flags["duration-ms"] ?? (quick ? 150 : 1500));
const sizes = (flags.sizes ?? "4096,65536,1048576").split(",").map(Number);
const nConns = Number(flags.conns ?? (quick ? 50 : 1000));
const connBytes = Number(flags["conn-bytes"] ?? (quick ? 65536 : 1 << 20));
const iterations = Number(flags.iterations ?? (quick ? 300 : 20000));
const warmup = quick ? 50 : 2000;
const hostVerify = quick ? "full" : "sample";
const guestVerify = flags["guest-verify"] ?? (quick ? "full" : "none");
const repeat = Math.max(1, Number(flags.repeat ?? (quick ? 1 : 5)));
const directions = new Set(flags.directions.split(","));
const skip = new Set(flags.skip.split(",").filter((s) => s !== ""));
const here = new URL(".", import.meta.url).pathname;
const defaultBackend = `${Deno.execPath()} run -A ${repoRoot()}/main.ts --guest-cid {cid} ` +
  `--socket {socket} --uds-path {uds} --max-connections 2000`;
const backendTemplate = flags.backend ?? defaultBackend;
/** How long any single step may take beyond its own duration before it counts as a stall. */
const STALL_MS = quick ? 20000 : 60000;
const GUEST_LISTEN_BASE = 5000;
const MANY_GUEST_PORT = 6000;
const MANY_HOST_PORT = 7000;
const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

// ---- progress -------------------------------------------------------------------------------------

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

function sizeName(n: number): string {
  if (n >= MiB && n % MiB === 0) return `${n / MiB} MiB`;
  if (n >= 1024 && n % 1024 === 0) return `${n / 1024} KiB`;
  return `${n} B`;
}
function sizeKey(n: number): string {
  if (n >= MiB && n % MiB === 0) return `${n / MiB}m`;
  if (n >= 1024 && n % 1024 === 0) return `${n / 1024}k`;
  return `${n}`;
}

// ---- failures -----------------------------------------------------------------------------------

/** Integrity problems found (non-empty -> exit 1). */
const integrity: string[] = [];
function checkIntegrity(what: string, ok: boolean, detail: string): void {
  if (!ok) integrity.push(`${what}: ${detail}`);
}

// ---- measurements -------------------------------------------------------------------------------

type Rec = Record<string, unknown>;
const num = (r: Rec, k: string) => Number(r[k]);

/** One single-stream run. */
interface StreamRun {
  kind: "raw" | "g2h" | "h2g";
  size: number;
  bytes: number;
  seconds: number;
  mibps: number;
  backendCpu: number;
  guestCpu: number;
  hostCpu: number;
  peerCpu: number;
  backendCpuPerGiB: number;
  /** raw only: sender + receiver CPU per GiB */
  pairCpuPerGiB: number;
  guestWakeups: number;
  slowWrites: number;
  /** longest pause of the receiver (ms) between data arrivals */
  maxGapMs: number;
  /** guest sink only: ring state at the first 100 ms without a notification, if any */
  quietPoll: string | null;
  /**
   * seconds each process spent runnable but waiting for a CPU during the stream (schedstat run
   * delay): large values mean the stream was starved of CPU, not slowed by the back end
   */
  cpuWait: { backend: number; guest: number; host: number; peer: number };
}

let backend: BackendProcess;
let guest: BenchChild;
let hostA: BenchChild;
let hostB: BenchChild;
let tmp = "";
let nextPort = GUEST_LISTEN_BASE;

function backendCpu(): number {
  return procCpuSeconds(backend.pid);
}

/** Run-delay snapshot of the four processes (see StreamRun.cpuWait). */
function waitSnapshot(): { backend: number; guest: number; host: number; peer: number } {
  return {
    backend: procSchedSeconds(backend.pid).waiting,
    guest: procSchedSeconds(guest.pid).waiting,
    host: procSchedSeconds(hostA.pid).waiting,
    peer: procSchedSeconds(hostB.pid).waiting,
  };
}

function waitSince(w0: ReturnType<typeof waitSnapshot>): ReturnType<typeof waitSnapshot> {
  const w1 = waitSnapshot();
  return {
    backend: w1.backend - w0.backend,
    guest: w1.guest - w0.guest,
    host: w1.host - w0.host,
    peer: w1.peer - w0.peer,
  };
}

function finishStream(
  kind: StreamRun["kind"],
  size: number,
  src: Rec,
  snk: Rec,
  cpu: { backend: number; guest: number; host: number; peer: number },
  extra: { wakeups?: number; slowWrites?: number } = {},
  cpuWait: StreamRun["cpuWait"] = { backend: NaN, guest: NaN, host: NaN, peer: NaN },
): StreamRun {
  const bytes = num(snk, "bytes");
  const seconds = (num(snk, "tEnd") - num(src, "t0")) / 1000;
  const what = `${kind} ${sizeName(size)}`;
  checkIntegrity(what, bytes === num(src, "bytes"), `sent ${src.bytes} bytes, received ${bytes}`);
  if (snk.mismatches !== undefined) {
    checkIntegrity(what, num(snk, "mismatches") === 0, String(snk.error));
  }
  const gib = bytes / GiB;
  return {
    kind,
    size,
    bytes,
    seconds,
    mibps: bytes / MiB / seconds,
    backendCpu: cpu.backend,
    guestCpu: cpu.guest,
    hostCpu: cpu.host,
    peerCpu: cpu.peer,
    backendCpuPerGiB: cpu.backend / gib,
    pairCpuPerGiB: kind === "raw" ? (cpu.host + cpu.peer) / gib : NaN,
    guestWakeups: extra.wakeups ?? 0,
    slowWrites: extra.slowWrites ?? 0,
    maxGapMs: num(snk, "maxGapMs"),
    quietPoll: (snk.quietPoll as string | null | undefined) ?? null,
    cpuWait,
  };
}

const stepTimeout = () => durationMs + STALL_MS;

async function rawStream(size: number): Promise<StreamRun> {
  const path = `${tmp}/raw-${nextPort++}.sock`;
  const sinkCall = hostA.call("sink", { listenPath: path, readSize: size, verify: hostVerify });
  await sinkCall.event("listening", STALL_MS);
  const w0 = waitSnapshot();
  const srcCall = hostB.call("source", { path, hybridPort: null, writeSize: size, durationMs });
  const [src, snk] = await Promise.all([srcCall.done(stepTimeout()), sinkCall.done(stepTimeout())]);
  return finishStream(
    "raw",
    size,
    src,
    snk,
    {
      backend: 0,
      guest: 0,
      host: num(snk, "cpu"),
      peer: num(src, "cpu"),
    },
    {},
    waitSince(w0),
  );
}

async function guestToHost(size: number): Promise<StreamRun> {
  const port = nextPort++;
  const sinkCall = hostA.call("sink", {
    listenPath: `${backend.udsPath}_${port}`,
    readSize: size,
    verify: hostVerify,
  });
  await sinkCall.event("listening", STALL_MS);
  const b0 = backendCpu();
  const w0 = waitSnapshot();
  const srcCall = guest.call("source", { port, writeSize: size, durationMs });
  const [src, snk] = await Promise.all([srcCall.done(stepTimeout()), sinkCall.done(stepTimeout())]);
  const b1 = backendCpu();
  return finishStream(
    "g2h",
    size,
    src,
    snk,
    {
      backend: b1 - b0,
      guest: num(src, "cpu"),
      host: num(snk, "cpu"),
      peer: 0,
    },
    { wakeups: num(src, "wakeups"), slowWrites: num(src, "slowWrites") },
    waitSince(w0),
  );
}

async function hostToGuest(size: number): Promise<StreamRun> {
  const port = nextPort++;
  const sinkCall = guest.call("sink", { port, verify: guestVerify });
  await sinkCall.event("listening", STALL_MS);
  const b0 = backendCpu();
  const w0 = waitSnapshot();
  const srcCall = hostA.call("source", {
    path: backend.udsPath,
    hybridPort: port,
    writeSize: size,
    durationMs,
  });
  const [src, snk] = await Promise.all([srcCall.done(stepTimeout()), sinkCall.done(stepTimeout())]);
  const b1 = backendCpu();
  return finishStream(
    "h2g",
    size,
    src,
    snk,
    {
      backend: b1 - b0,
      guest: num(snk, "cpu"),
      host: num(src, "cpu"),
      peer: 0,
    },
    { wakeups: num(snk, "wakeups") },
    waitSince(w0),
  );
}

interface PingPong {
  p50: number;
  p90: number;
  p99: number;
  mean: number;
  max: number;
  iterations: number;
  backendCpuPerRtt?: number;
}

async function rawPingPong(): Promise<PingPong> {
  const path = `${tmp}/pp-${nextPort++}.sock`;
  const echoCall = hostA.call("echo", { listenPath: path });
  await echoCall.event("listening", STALL_MS);
  const pp = await hostB.run(
    "pingpong",
    { path, hybridPort: null, size: 64, warmup, iterations },
    STALL_MS * 2,
  );
  await echoCall.done(STALL_MS);
  checkIntegrity("raw ping-pong", num(pp, "mismatches") === 0, "echo mismatch");
  return pp as unknown as PingPong;
}

async function guestPingPong(): Promise<PingPong> {
  const port = nextPort++;
  const echoCall = guest.call("echo", { port });
  await echoCall.event("listening", STALL_MS);
  const b0 = backendCpu();
  const pp = await hostA.run(
    "pingpong",
    { path: backend.udsPath, hybridPort: port, size: 64, warmup, iterations },
    STALL_MS * 2,
  );
  const b1 = backendCpu();
  await echoCall.done(STALL_MS);
  checkIntegrity("guest ping-pong", num(pp, "mismatches") === 0, "echo mismatch");
  return { ...(pp as unknown as PingPong), backendCpuPerRtt: (b1 - b0) / (iterations + warmup) };
}

interface ManyResult {
  conns: number;
  bytesPerConn: number;
  intact: boolean;
  errors: string[];
  openSeconds: number;
  transferSeconds: number;
  mibps: number;
  backendCpuPerGiB: number;
  rssBefore: number;
  rssOpen: number;
  rssPerConn: number;
  guestCpu: number;
  hostCpu: number;
}

async function sleep(ms: number): Promise<void> {
  await new Promise((r) => setTimeout(r, ms));
}

/** Samples the back end's RSS a few times over `ms` and returns the median. */
async function settledRss(ms: number): Promise<number> {
  const xs: number[] = [];
  for (let i = 0; i < 5; i++) {
    await sleep(ms / 5);
    xs.push(procRssBytes(backend.pid));
  }
  xs.sort((a, b) => a - b);
  return xs[2];
}

async function manyConnections(measureRss: boolean): Promise<ManyResult> {
  const nOut = Math.floor(nConns / 2); // guest -> host
  const nIn = nConns - nOut; // host -> guest
  const listenPath = `${backend.udsPath}_${MANY_HOST_PORT}`;
  const rssBefore = measureRss ? await settledRss(500) : NaN;
  await hostA.run("manyListen", { listenPath }, STALL_MS);
  const gOpen = guest.call("manyOpen", {
    listenPort: MANY_GUEST_PORT,
    hostPort: MANY_HOST_PORT,
    nIn,
    nOut,
    firstId: 0,
  });
  await gOpen.event("listening", STALL_MS);
  const hOpen = hostA.call("manyOpen", {
    udsPath: backend.udsPath,
    guestPort: MANY_GUEST_PORT,
    nOut: nIn,
    firstId: 1_000_000,
    listenPath,
    nIn: nOut,
    timeoutMs: STALL_MS,
  });
  const [go, ho] = await Promise.all([gOpen.done(STALL_MS * 2), hOpen.done(STALL_MS * 2)]);
  const rssOpen = measureRss ? await settledRss(1000) : NaN;
  progress(`${nConns} connections open; transferring ${sizeName(connBytes)} each`);
  const b0 = backendCpu();
  const timeoutMs = STALL_MS * 3;
  const gT = guest.call("manyTransfer", { bytesPerConn: connBytes, verify: "full" });
  const hT = hostA.call("manyTransfer", { bytesPerConn: connBytes, verify: "full", timeoutMs });
  const [gr, hr] = await Promise.all([gT.done(timeoutMs), hT.done(timeoutMs)]);
  const b1 = backendCpu();
  await hostA.run("manyClose", {}, STALL_MS);
  await guest.run("manyClose", {}, STALL_MS);
  const errors = [...(gr.errors as string[]), ...(hr.errors as string[])];
  const expect = connBytes * nConns;
  const moved = num(gr, "received") + num(hr, "received");
  if (moved !== expect) errors.push(`moved ${moved} bytes, expected ${expect}`);
  if (num(gr, "streamsIn") !== nIn || num(hr, "streamsIn") !== nOut) {
    errors.push(`streams: guest got ${gr.streamsIn}/${nIn}, host got ${hr.streamsIn}/${nOut}`);
  }
  const intact = errors.length === 0;
  checkIntegrity(`${nConns} connections`, intact, errors.slice(0, 5).join("; "));
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
    guestCpu: num(gr, "cpu"),
    hostCpu: num(hr, "cpu"),
  };
}

/** A figure; in --quick runs targets are not evaluated (every byte is checked in JS there). */
function fig(f: Parameters<typeof figure>[0]): Figure {
  return figure(f, { withTargets: !quick });
}

// ---- main ---------------------------------------------------------------------------------------

async function main(): Promise<number> {
  const cpuAtStart = machineCpu();
  progress(`starting back end: ${backendTemplate}`);
  tmp = await Deno.makeTempDir({ prefix: "vsock-bench-" });
  backend = await spawnBackend({ command: backendTemplate, cid, startTimeoutMs: 30000 });
  const guestArgs = [
    "--socket",
    backend.socketPath,
    "--profile",
    flags.profile,
    "--queue-size",
    flags["queue-size"],
    "--rx-buf-size",
    flags["rx-buf-size"],
    "--buf-alloc",
    flags["buf-alloc"],
    "--stall-ms",
    String(quick ? 10000 : 20000),
  ];
  guest = BenchChild.spawn("guest driver", `${here}guest_driver_proc.ts`, guestArgs);
  hostA = BenchChild.spawn("host app", `${here}host_app_proc.ts`, []);
  hostB = BenchChild.spawn("raw peer", `${here}host_app_proc.ts`, []);
  const results: Rec = {};
  const figures: Figure[] = [];
  const streams: StreamRun[] = [];
  let exitCode = 0;
  try {
    const [booted] = await Promise.all([
      guest.unsolicited("booted", 30000),
      hostA.unsolicited("ready", 30000),
      hostB.unsolicited("ready", 30000),
    ]);
    results.guest = booted;
    progress(
      `guest booted (queue ${booted.queueSize}, ${booted.rxBuffers} rx buffers of ` +
        `${booted.rxBufSize} + 44 bytes, indirect ${booted.indirect})`,
    );
    const idleRss = await settledRss(500);
    // Context for the idle figure: an idle Deno process with the project's FFI loaded.
    const denoRss = procRssBytes(hostA.pid);
    results.idleRss = idleRss;
    results.hostAppIdleRss = denoRss;

    // Many connections first: the idle RSS and per-connection RSS are measured on a fresh back end.
    let many: ManyResult | null = null;
    if (!skip.has("many")) {
      progress(`opening ${nConns} connections`);
      many = await manyConnections(!skip.has("rss"));
      results.many = many;
    }

    if (!skip.has("streams")) {
      for (let r = 1; r <= repeat; r++) {
        const round = repeat > 1 ? ` (round ${r}/${repeat})` : "";
        for (const size of sizes) {
          if (directions.has("raw")) {
            progress(`raw AF_UNIX stream, ${sizeName(size)} writes${round}`);
            streams.push(await rawStream(size));
          }
          if (directions.has("g2h")) {
            progress(`guest->host stream, ${sizeName(size)} writes${round}`);
            streams.push(await guestToHost(size));
          }
          if (directions.has("h2g")) {
            progress(`host->guest stream, ${sizeName(size)} writes${round}`);
            streams.push(await hostToGuest(size));
          }
        }
      }
      const med = (kind: StreamRun["kind"], size: number, f: (s: StreamRun) => number) =>
        median(streams.filter((s) => s.kind === kind && s.size === size).map(f));
      for (const size of sizes) {
        const target = size === 65536 ? 0.75 : size === 4096 ? 0.5 : undefined;
        for (const kind of ["g2h", "h2g"] as const) {
          const dir = kind === "g2h" ? "guest->host" : "host->guest";
          figures.push(fig({
            key: `${kind}_${sizeKey(size)}_throughput`,
            name: `${dir} ${sizeName(size)} writes`,
            unit: "MiB/s",
            ours: med(kind, size, (s) => s.mibps),
            baseline: med("raw", size, (s) => s.mibps),
            better: "higher",
            target,
          }));
        }
      }
      for (const size of sizes) {
        for (const kind of ["g2h", "h2g"] as const) {
          figures.push(fig({
            key: `${kind}_${sizeKey(size)}_backend_cpu_per_gib`,
            name: `back-end CPU ${kind === "g2h" ? "guest->host" : "host->guest"} ${
              sizeName(size)
            } (baseline: raw pair)`,
            unit: "s/GiB",
            ours: med(kind, size, (s) => s.backendCpuPerGiB),
            baseline: med("raw", size, (s) => s.pairCpuPerGiB),
            better: "lower",
          }));
        }
      }
      // On a machine where the processes compete for CPU, throughput follows the CPU the whole
      // pipeline spends per byte: back end + guest driver + host app against the raw pair.
      for (const size of sizes) {
        for (const kind of ["g2h", "h2g"] as const) {
          figures.push(fig({
            key: `${kind}_${sizeKey(size)}_pipeline_cpu_per_gib`,
            name: `all three processes' CPU ${kind === "g2h" ? "guest->host" : "host->guest"} ${
              sizeName(size)
            } (baseline: raw pair)`,
            unit: "s/GiB",
            ours: med(kind, size, (s) => (s.backendCpu + s.guestCpu + s.hostCpu) / (s.bytes / GiB)),
            baseline: med("raw", size, (s) => s.pairCpuPerGiB),
            better: "lower",
          }));
        }
      }
    }

    if (!skip.has("pingpong")) {
      const raws: PingPong[] = [];
      const ourss: PingPong[] = [];
      for (let r = 1; r <= repeat; r++) {
        const round = repeat > 1 ? ` (round ${r}/${repeat})` : "";
        progress(`raw AF_UNIX ping-pong, ${iterations} round trips${round}`);
        raws.push(await rawPingPong());
        progress(`host <-> guest echo ping-pong, ${iterations} round trips${round}`);
        ourss.push(await guestPingPong());
      }
      results.pingpong = { raw: raws, ours: ourss };
      for (const p of ["p50", "p99"] as const) {
        figures.push(fig({
          key: `pingpong_${p}`,
          name: `64 B ping-pong RTT ${p}`,
          unit: "us",
          ours: median(ourss.map((x) => x[p])),
          baseline: median(raws.map((x) => x[p])),
          better: "lower",
          target: p === "p50" ? 4 : undefined,
        }));
      }
    }

    if (many !== null) {
      figures.push(fig({
        key: "many_intact",
        name: `${many.conns} connections x ${sizeName(many.bytesPerConn)}, every byte checked`,
        unit: "intact",
        ours: many.intact ? 1 : 0,
        baseline: NaN,
        better: "higher",
        target: 1,
        targetOn: "value",
        note: many.intact ? `yes, ${many.conns}/${many.conns}` : "NO",
      }));
      figures.push(fig({
        key: "many_throughput",
        name: `${many.conns} connections aggregate`,
        unit: "MiB/s",
        ours: many.mibps,
        baseline: NaN,
        better: "higher",
      }));
      figures.push(fig({
        key: "many_backend_cpu_per_gib",
        name: `back-end CPU, ${many.conns} connections`,
        unit: "s/GiB",
        ours: many.backendCpuPerGiB,
        baseline: NaN,
        better: "lower",
      }));
    }
    figures.push(fig({
      key: "idle_rss",
      name: "back-end RSS, idle (baseline: idle host app, a bare Deno + FFI process)",
      unit: "MiB",
      ours: idleRss / MiB,
      baseline: denoRss / MiB,
      better: "lower",
    }));
    if (many !== null && Number.isFinite(many.rssPerConn)) {
      figures.push(fig({
        key: "rss_per_conn",
        name: `back-end RSS per idle open connection (${many.conns} open)`,
        unit: "KiB",
        ours: many.rssPerConn / 1024,
        baseline: NaN,
        better: "lower",
        target: 32,
        targetOn: "value",
      }));
    }
    results.backendThreads = procThreads(backend.pid);
    results.guestStats = await guest.run("stats", {}, STALL_MS);
  } catch (e) {
    progressDone();
    const msg = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
    console.error(`bench failed: ${msg}`);
    if (e instanceof StallError) console.error("(a stall: some step did not finish in time)");
    console.error(`back end stderr (tail):\n${backend.stderr().slice(-3000)}`);
    exitCode = 2;
  } finally {
    await Promise.all([guest.close(), hostA.close(), hostB.close()]);
    const exit = await backend.stop();
    results.backendExit = { code: exit.code, killed: exit.killed };
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
  }
  progressDone();

  const total = (performance.now() - started) / 1000;
  const load = machineLoad(cpuAtStart, machineCpu());
  const loadAvg = Deno.loadavg();
  results.machine = {
    cpus: navigator.hardwareConcurrency,
    loadAvg,
    stealShare: load.steal,
    busyShare: load.busy,
  };
  console.log(`vhost-user vsock benchmark${quick ? " (--quick)" : ""}, ${total.toFixed(1)} s`);
  console.log(`back end: ${backendTemplate}`);
  console.log(
    `machine: ${navigator.hardwareConcurrency} CPUs; CPU time during the run: ${
      (100 * (load.busy - load.steal)).toFixed(0)
    }% running (any process), ${(100 * load.steal).toFixed(0)}% stolen by the hypervisor, ${
      (100 * (1 - load.busy)).toFixed(0)
    }% idle; load average ${loadAvg.map((x) => x.toFixed(2)).join(" ")}`,
  );
  if (load.steal > 0.2 || 1 - load.busy < 0.05) {
    console.log(
      "WARNING: the machine was short of CPU during the run (steal or no idle time); " +
        "ratios are unreliable, run again when it is quieter",
    );
  }
  console.log(
    `guest: ${flags.profile} profile, queue ${flags["queue-size"]}, rx buffers ` +
      `${flags["rx-buf-size"]} + 44 bytes x ${flags["queue-size"]}, buf_alloc ` +
      `${flags["buf-alloc"]}; streams ${durationMs} ms each, ${repeat} round(s), medians; ` +
      `host checks ${hostVerify}, ` +
      `guest checks ${guestVerify}`,
  );
  if (quick) {
    console.log(
      "quick mode: integrity and stall check only; every byte is checked in JS, so the " +
        "figures below are not performance figures and targets are not evaluated",
    );
  }
  console.log("");
  console.log(figureTable(figures));
  if (streams.length > 0) {
    console.log("");
    console.log("Every stream run (CPU columns: seconds of CPU per second of wall clock):");
    console.log(table(
      [
        "stream",
        "MiB/s",
        "back end",
        "guest driver",
        "host app",
        "raw peer",
        "guest wakeups",
        "longest gap ms",
        "CPU wait s",
      ],
      streams.map((s) => [
        `${s.kind} ${sizeName(s.size)}`,
        fmt(s.mibps),
        s.kind === "raw" ? "-" : fmt(s.backendCpu / s.seconds),
        s.kind === "raw" ? "-" : fmt(s.guestCpu / s.seconds),
        fmt(s.hostCpu / s.seconds),
        s.kind === "raw" ? fmt(s.peerCpu / s.seconds) : "-",
        s.kind === "raw" ? "-" : String(s.guestWakeups),
        fmt(s.maxGapMs),
        fmt(
          s.kind === "raw"
            ? s.cpuWait.host + s.cpuWait.peer
            : s.cpuWait.backend + s.cpuWait.guest + s.cpuWait.host,
        ),
      ]),
    ));
  }
  if (integrity.length > 0) {
    console.log("");
    console.log("INTEGRITY FAILURES:");
    for (const f of integrity) console.log(`  ${f}`);
    exitCode = exitCode || 1;
  }
  if (flags.json !== undefined) {
    const out = {
      date: new Date().toISOString(),
      quick,
      backend: backendTemplate,
      config: {
        durationMs,
        repeat,
        sizes,
        conns: nConns,
        connBytes,
        iterations,
        queueSize: Number(flags["queue-size"]),
        rxBufSize: Number(flags["rx-buf-size"]),
        bufAlloc: Number(flags["buf-alloc"]),
        profile: flags.profile,
        hostVerify,
        guestVerify,
      },
      seconds: total,
      figures: figures.map((f) => ({
        ...f,
        ours: nullable(f.ours),
        baseline: nullable(f.baseline),
        ratio: nullable(f.ratio),
        target: nullable(f.target),
      })),
      streams,
      ...results,
      integrityFailures: integrity,
      exitCode,
    };
    await Deno.writeTextFile(flags.json, JSON.stringify(out, null, 2) + "\n");
  }
  return exitCode;
}

function median(xs: readonly number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function nullable(x: number): number | null {
  return Number.isFinite(x) ? x : null;
}

Deno.exit(await main());
