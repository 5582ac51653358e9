/**
 * A hostile-guest fuzzer for a vhost-user vsock back end, driven through the testing library
 * (`startVm`): random valid and invalid rx buffers (0, 1, 43, 44, 45 bytes, many tiny segments,
 * indirect tables, buffers straddling two adjacent RAM regions, outside RAM, read-only), random
 * tx headers (every op and type, wrong lengths, spoofed CIDs and ports), malformed tx chains,
 * spurious kicks, rx starvation, and ring stops and restarts, while host connections keep
 * writing.
 *
 * Invariants, checked after every step (the cheap ones) or every `checkEveryMs` (the rest):
 * - the back end answers a vhost-user request (GET_FEATURES) within `replyLimitMs`;
 * - its CPU is not pegged while the guest is idle (`/proc/<pid>/stat`);
 * - a well-behaved guest -> host connection running alongside loses and reorders nothing;
 * - its fd count and RSS stay within a bound of their starting values;
 * - its log rate (stderr lines) stays bounded.
 *
 * Decisions come from a seeded PRNG (mulberry32), so a seed replays the same sequence of
 * steps (timing still varies). The seed is printed through `log` first.
 */

import type { VmHandle } from "./mod.ts";
import type { RawDescriptor } from "./guest_types.ts";
import {
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_DESC_SIZE,
} from "../virtio/split_layout.ts";
import { VSOCK_VQ_RX, VSOCK_VQ_TX } from "../vsock/constants.ts";
import { mulberry32 } from "./prng.ts";
export { mulberry32 };

/** Options of `fuzzGuest`. */
export interface GuestFuzzOptions {
  /** PRNG seed (default: random; printed) */
  readonly seed?: number;
  /** stop after this many steps (default: unbounded, see durationMs) */
  readonly iterations?: number;
  /** stop after this long (default 5000 ms) */
  readonly durationMs?: number;
  /** where progress and the seed go (default: nothing) */
  readonly log?: (line: string) => void;
  /** the vhost-user reply bound (default 100 ms) */
  readonly replyLimitMs?: number;
  /** how often the heavier invariants run (default 1000 ms) */
  readonly checkEveryMs?: number;
  /** host port the well-behaved connection uses (default 30000; 30001 for the host writer) */
  readonly port?: number;
}

/** What a run did. */
export interface GuestFuzzReport {
  readonly seed: number;
  readonly iterations: number;
  /** steps taken, by kind */
  readonly steps: Record<string, number>;
  /** bytes the well-behaved connection carried, verified */
  readonly verifiedBytes: number;
  readonly maxReplyMs: number;
  readonly maxFds: number;
  readonly maxRssKiB: number;
  readonly maxLogLinesPerSec: number;
}

/** An invariant broke: the message names the seed and the step. */
export class GuestFuzzViolation extends Error {
  override name = "GuestFuzzViolation";
}

/** Byte `i` of the well-behaved stream: position-dependent, so loss and reordering show. */
function streamByte(i: number, seed: number): number {
  return (i ^ (i >>> 8) ^ (i >>> 16) ^ (i >>> 24) ^ seed) & 0xff;
}

const FD_SLACK = 64;
const RSS_SLACK_KIB = 96 * 1024;
const LOG_LINES_PER_SEC = 200;
/** CPU share of one core (ticks / elapsed) above which an idle back end counts as pegged */
const IDLE_CPU_LIMIT = 0.5;
const OPS = [0, 1, 2, 3, 4, 5, 6, 7, 8];
const TYPES = [0, 1, 2, 3, 0xffff];
const ODD_SIZES = [0, 1, 43, 44, 45, 64, 4096, 4140, 65536];

/**
 * Fuzzes the guest side of `vm` (see the module doc). `vm` must be fresh (startVm) with at
 * least two adjacent RAM regions for straddling buffers (`fuzzGuestRun` sets that up).
 * Throws GuestFuzzViolation at the first broken invariant; returns a report otherwise.
 */
export async function fuzzGuest(
  vm: VmHandle,
  opts: GuestFuzzOptions = {},
): Promise<GuestFuzzReport> {
  const seed = (opts.seed ?? Math.floor(Math.random() * 2 ** 32)) >>> 0;
  const log = opts.log ?? (() => {});
  log(`guest fuzz: seed ${seed} (replay with FUZZ_SEED=${seed})`);
  const rnd = mulberry32(seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)];
  const int = (lo: number, hi: number) => lo + Math.floor(rnd() * (hi - lo + 1));
  const steps: Record<string, number> = {};
  const durationMs = opts.durationMs ?? (opts.iterations === undefined ? 5000 : Infinity);
  const iterations = opts.iterations ?? Infinity;
  const replyLimitMs = opts.replyLimitMs ?? 100;
  const checkEveryMs = opts.checkEveryMs ?? 1000;
  const port = opts.port ?? 30000;
  const pid = vm.backend.pid;
  let step = 0;
  let what = "setup";
  const fail = (msg: string): never => {
    throw new GuestFuzzViolation(
      `guest fuzz (seed ${seed}, step ${step}: ${what}): ${msg}\n${vm.guest.describe()}\n` +
        `guest anomalies (first 10): ${vm.guest.anomalies.slice(0, 10).join("; ")}`,
    );
  };

  // The well-behaved connection (guest -> host, verified) and a host writer (host -> guest).
  const hl = vm.hostListen(port);
  const [good, goodHost] = await Promise.all([vm.guest.connect(port), hl.accept()]);
  hl.close();
  const listener = vm.guest.listen(port + 1);
  const [noisy, noisyGuest] = await Promise.all([vm.hostConnect(port + 1), listener.accept()]);
  listener.close();
  let stopping = false;
  /** while set, the traffic generators hold still (the idle-CPU check) */
  let quiet = false;
  let streamError: GuestFuzzViolation | null = null;
  let sent = 0;
  let verified = 0;
  const holdWhileQuiet = async () => {
    while (quiet && !stopping) await sleep(10);
  };
  const writerRnd = mulberry32(seed ^ 0x9e3779b9); // its own: timing must not shift the steps
  const writer = (async () => {
    const chunk = new Uint8Array(8192);
    while (!stopping) {
      await holdWhileQuiet();
      const n = 1 + Math.floor(writerRnd() * chunk.length);
      for (let k = 0; k < n; k++) chunk[k] = streamByte(sent + k, seed);
      await good.write(chunk.subarray(0, n), { timeoutMs: 30000 });
      sent += n;
    }
  })();
  const reader = (async () => {
    const buf = new Uint8Array(65536);
    for (;;) {
      const n = await goodHost.read(buf);
      if (n === null) return;
      for (let k = 0; k < n; k++) {
        if (buf[k] !== streamByte(verified + k, seed)) {
          try {
            fail(`well-behaved stream corrupt at byte ${verified + k} (lost or reordered data)`);
          } catch (e) {
            streamError = e as GuestFuzzViolation;
            return;
          }
        }
      }
      verified += n;
    }
  })();
  const hostWriter = (async () => {
    const chunk = new Uint8Array(16384).fill(0x5a);
    try {
      while (!stopping) {
        await holdWhileQuiet();
        await noisy.conn.write(chunk);
      }
    } catch { /* closed at the end, or reset by the guest's faults */ }
  })();
  const guestDrain = (async () => {
    try {
      for (;;) {
        await holdWhileQuiet();
        if ((await noisyGuest.read(Infinity, { timeoutMs: 60000 })) === null) return;
      }
    } catch { /* ended by the run's end */ }
  })();
  for (const p of [writer, reader, hostWriter, guestDrain]) p.catch(() => {});

  const fds0 = fdCount(pid);
  const rss0 = rssKiB(pid);
  let maxReplyMs = 0;
  let maxFds = fds0;
  let maxRss = rss0;
  let maxLogRate = 0;
  let logLines0 = lineCount(vm.backend.stderr());
  let lastHeavy = performance.now();
  const started = performance.now();
  const elsewhere = vm.faults.allocGuest(8192);
  const regions = vm.memory.regions;
  const seam = regions.find((r) => regions.some((o) => o.gpa === r.gpa + r.size));
  const seamGpa = seam === undefined ? null : seam.gpa + seam.size;

  // A raw rx buffer may swallow a CREDIT_UPDATE meant for the well-behaved connection (the
  // fuzzer's buffers are not the driver's): after a stall, ask again, as a guest may.
  let lastSent = 0;
  let lastProgress = performance.now();
  const unstall = () => {
    if (sent !== lastSent) {
      lastSent = sent;
      lastProgress = performance.now();
    } else if (performance.now() - lastProgress > 200 && good.state === "established") {
      good.requestCredit();
      lastProgress = performance.now();
    }
  };

  const checkReply = () => {
    for (let attempt = 0;; attempt++) {
      const t0 = performance.now();
      vm.frontEnd.getFeatures();
      const ms = performance.now() - t0;
      maxReplyMs = Math.max(maxReplyMs, ms);
      if (ms <= replyLimitMs) return;
      // One late reply may be this machine's scheduler; two in a row is the back end.
      if (attempt >= 1) fail(`GET_FEATURES took ${ms.toFixed(0)} ms (limit ${replyLimitMs})`);
    }
  };

  const checkHeavy = async () => {
    const fds = fdCount(pid);
    const rss = rssKiB(pid);
    maxFds = Math.max(maxFds, fds);
    maxRss = Math.max(maxRss, rss);
    if (fds > fds0 + FD_SLACK) fail(`back-end fds grew from ${fds0} to ${fds}`);
    if (rss > rss0 + RSS_SLACK_KIB) fail(`back-end RSS grew from ${rss0} to ${rss} KiB`);
    const now = performance.now();
    const lines = lineCount(vm.backend.stderr());
    const rate = (lines - logLines0) / ((now - lastHeavy) / 1000);
    maxLogRate = Math.max(maxLogRate, rate);
    if (rate > LOG_LINES_PER_SEC) fail(`back end logged ${rate.toFixed(0)} lines/s`);
    // Idle: no faults, the traffic held; once it settles the back end must sleep.
    quiet = true;
    await vm.guest.idle(150);
    const cpu0 = cpuTicks(pid);
    const t0 = performance.now();
    await vm.guest.idle(300);
    const share = (cpuTicks(pid) - cpu0) / CLOCK_TICKS / ((performance.now() - t0) / 1000);
    if (share > IDLE_CPU_LIMIT) {
      // Confirm over a longer window before calling it pegged.
      const c1 = cpuTicks(pid);
      const t1 = performance.now();
      await vm.guest.idle(700);
      const again = (cpuTicks(pid) - c1) / CLOCK_TICKS / ((performance.now() - t1) / 1000);
      if (again > IDLE_CPU_LIMIT) fail(`back end at ${(again * 100).toFixed(0)}% CPU while idle`);
    }
    quiet = false;
    logLines0 = lineCount(vm.backend.stderr());
    lastHeavy = performance.now();
    vm.frontEnd.trace.length = 0; // a long run must not grow the test's own memory
  };

  /** A random rx buffer layout (valid or not). */
  const rxLayout = (): RawDescriptor[] => {
    const W = VRING_DESC_F_WRITE;
    switch (int(0, 7)) {
      case 0: // one buffer of an odd size (0 and < 44 are invalid)
        return [{ addr: elsewhere, len: pick(ODD_SIZES.filter((n) => n <= 8192)), flags: W }];
      case 1: { // many tiny segments
        const n = int(2, 48);
        return Array.from({ length: n }, (_, k) => ({
          addr: elsewhere + 8 * k,
          len: int(0, 3),
          flags: W | (k + 1 < n ? VRING_DESC_F_NEXT : 0),
        }));
      }
      case 2: { // indirect table of a few segments
        const n = int(1, 6);
        const segs = Array.from({ length: n }, (_, k) => ({
          addr: elsewhere + 1024 * k,
          len: pick([1, 20, 24, 44, 100, 1000]),
          flags: W | (k + 1 < n ? VRING_DESC_F_NEXT : 0),
        }));
        const tableGpa = elsewhere + 7168;
        vm.faults.writeDescTable(tableGpa, segs); // next: the following entry
        return [{
          addr: tableGpa,
          len: VRING_DESC_SIZE * segs.length,
          flags: VRING_DESC_F_INDIRECT,
        }];
      }
      case 3: // straddling two adjacent regions
        if (seamGpa === null) return [{ addr: elsewhere, len: 4096, flags: W }];
        return [{ addr: seamGpa - int(1, 60), len: int(44, 200), flags: W }];
      case 4: // outside RAM, or past its end
        return [{ addr: pick([2n ** 60n, BigInt(vm.memory.topGpa - 20)]), len: 4096, flags: W }];
      case 5: // read-only (wrong direction)
        return [{ addr: elsewhere, len: 4096, flags: 0 }];
      case 6: // a loop (split rings; a packed ring has no next links)
        if (vm.guest.packed) return [{ addr: elsewhere, len: 0, flags: W }];
        return [{ addr: elsewhere, len: 8, flags: W | VRING_DESC_F_NEXT, next: 0 }];
      default: // an ordinary buffer
        return [{ addr: elsewhere, len: 4096 + 44, flags: W }];
    }
  };

  const ignoreNoRoom = (e: unknown) => {
    // Descriptors or tx buffers all in use: this step is skipped, not a finding.
    if (!(e instanceof Error) || !/not free|no free|free tx/i.test(e.message)) throw e;
  };

  const actions: [string, number, () => Promise<void> | void][] = [
    ["rx buffer", 6, () => {
      try {
        vm.faults.writeRawChain(VSOCK_VQ_RX, rxLayout(), { kick: rnd() < 0.8 });
      } catch (e) {
        ignoreNoRoom(e);
      }
    }],
    ["tx header", 6, () => {
      const goodPort = good.localPort;
      let srcPort = int(0, 3) === 0 ? pick([0, 1, 1023, 0xffffffff]) : int(1024, 65535);
      if (srcPort === goodPort) srcPort++;
      const payload = new Uint8Array(pick([0, 0, 1, 16, 300]));
      try {
        vm.faults.sendRawPacket({
          srcCid: int(0, 4) === 0 ? pick([0, 1, 2, vm.cid + 1, 0xffffffff]) : undefined,
          srcCidHi: int(0, 9) === 0 ? 1 : undefined,
          dstCid: int(0, 5) === 0 ? pick([0, 1, 3, vm.cid, 0xffffffff]) : undefined,
          srcPort,
          dstPort: int(0, 3) === 0 ? pick([port, port + 1, 0, 0xffffffff]) : int(1, 65535),
          op: pick(OPS),
          type: int(0, 3) === 0 ? pick(TYPES) : 1,
          flags: int(0, 3) === 0 ? int(0, 0xffffffff) : int(0, 3),
          len: int(0, 2) === 0 ? pick([0, 1, 44, 65536, 0xffffffff]) : undefined,
          bufAlloc: int(0, 3) === 0 ? pick([0, 1, 0xffffffff]) : undefined,
          fwdCnt: int(0, 3) === 0 ? int(0, 0xffffffff) : undefined,
        }, payload);
      } catch (e) {
        ignoreNoRoom(e);
      }
    }],
    ["malformed tx chain", 2, () => {
      const f = vm.faults;
      try {
        pick([
          () => f.malformedOutOfRange(),
          () => f.malformedOutOfRange(BigInt(vm.memory.topGpa - int(1, 43))),
          () => vm.guest.packed ? f.malformedEmptyIndirect() : f.malformedLoop(),
          () => f.malformedNestedIndirect(),
          () => f.malformedEmptyIndirect(),
          () => f.malformedWriteOnlyTx(),
          () =>
            f.writeRawChain(VSOCK_VQ_TX, [{ addr: elsewhere, len: pick([0, 1, 43]), flags: 0 }]),
        ])();
      } catch (e) {
        ignoreNoRoom(e);
      }
    }],
    ["kick", 2, () => vm.guest.kickQueue(int(0, 2))],
    ["stop and restart rings", 1, async () => {
      vm.faults.stopRings();
      if (rnd() < 0.5) await sleep(int(0, 20));
      vm.faults.restartRings({ kick: rnd() < 0.5 });
    }],
    ["starve rx", 1, () => vm.faults.starveRx()],
    ["refill rx", 2, () => void vm.faults.refillRx({ kick: rnd() < 0.7 })],
    ["pump", 3, () => vm.guest.idle(int(0, 15))],
  ];
  const totalWeight = actions.reduce((n, a) => n + a[1], 0);

  try {
    while (step < iterations && performance.now() - started < durationMs) {
      step++;
      let r = rnd() * totalWeight;
      const action = actions.find((a) => (r -= a[1]) < 0) ?? actions[actions.length - 1];
      what = action[0];
      steps[what] = (steps[what] ?? 0) + 1;
      await action[2]();
      await vm.guest.idle(1);
      if (!vm.backend.running) fail("the back end exited");
      if (streamError !== null) throw streamError;
      unstall();
      checkReply();
      if (performance.now() - lastHeavy >= checkEveryMs) {
        what = "idle check";
        vm.faults.refillRx();
        await checkHeavy();
      }
    }
    // The end: every byte the well-behaved connection sent arrives, in order.
    what = "final drain";
    vm.faults.refillRx();
    stopping = true;
    const deadline = performance.now() + 20000;
    let written = false;
    writer.then(() => written = true, () => written = true);
    while (!written || verified < sent) {
      if (streamError !== null) throw streamError;
      if (performance.now() > deadline) fail(`${verified} of ${sent} bytes arrived`);
      unstall();
      await vm.guest.idle(20);
    }
    await writer;
    await checkHeavy();
  } finally {
    stopping = true;
    try {
      goodHost.close();
    } catch { /* closed */ }
    try {
      noisy.conn.close();
    } catch { /* closed */ }
    await Promise.allSettled([writer, reader, hostWriter]);
  }
  log(
    `guest fuzz: seed ${seed}: ${step} steps, ${verified} bytes verified, ` +
      `max reply ${maxReplyMs.toFixed(1)} ms, fds <= ${maxFds}, RSS <= ${maxRss} KiB, ` +
      `log <= ${maxLogRate.toFixed(0)} lines/s; ${JSON.stringify(steps)}`,
  );
  return {
    seed,
    iterations: step,
    steps,
    verifiedBytes: verified,
    maxReplyMs,
    maxFds,
    maxRssKiB: maxRss,
    maxLogLinesPerSec: maxLogRate,
  };
}

/** USER_HZ: /proc/<pid>/stat counts CPU time in these. */
const CLOCK_TICKS = 100;

/** utime + stime of a process, in clock ticks. */
export function cpuTicks(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  // Fields after the command name (which may hold spaces) start after the last ")".
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(f[11]) + Number(f[12]); // fields 14 and 15 of proc(5)
}

/** Open fds of a process. */
export function fdCount(pid: number): number {
  let n = 0;
  for (const _ of Deno.readDirSync(`/proc/${pid}/fd`)) n++;
  return n;
}

/** VmRSS of a process, in KiB. */
export function rssKiB(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(Deno.readTextFileSync(`/proc/${pid}/status`));
  return m === null ? 0 : Number(m[1]);
}

function lineCount(s: string): number {
  let n = 0;
  for (let i = s.indexOf("\n"); i >= 0; i = s.indexOf("\n", i + 1)) n++;
  return n;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
