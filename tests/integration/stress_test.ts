/**
 * Randomized stress of the ring life cycle (no lost wakeups: kick after start; enable notification,
 * then re-check; never drop a kick): while data streams both ways over several connections, a
 * seeded PRNG interleaves spurious kicks, SET_VRING_ENABLE 0/1, ring stops and restarts
 * (GET_VRING_BASE, then SET_VRING_BASE/ADDR/KICK with the kick eventfds emptied: no kick), full
 * suspend/resume, RX starvation and refill, and pauses.
 *
 * Every so often a barrier restores the rings, lets traffic run for a few hundred ms with no ring
 * event, pauses the writers and requires every byte written so far to arrive within a bounded time:
 * a wakeup lost there shows up as a stall, with nothing left to wake the device. The run ends with
 * host data and a new CONNECT queued while the rings are stopped and a restart without a kick (kick
 * after start), then a bounded drain. Each byte is checked against a position-dependent pattern, so
 * a lost, duplicated or reordered byte fails. At the end the guest saw no anomaly and the back end
 * is alive with no error or warning in its log. One variant runs packed virtqueues.
 *
 * Reproduce a run with `STRESS_SEED=<seed>` (printed at the start); `STRESS_ITERATIONS` and
 * `STRESS_SECONDS` bound each variant (default 5000 iterations, 20 s).
 */
import assert from "node:assert/strict";
import {
  type GuestConn,
  type HostConnection,
  startVm,
  VIRTIO_VSOCK_SHUTDOWN_F_SEND,
  type VsockGuestOptions,
  writeAll,
} from "../../lib/testing/mod.ts";
import { mulberry32 } from "../../lib/testing/prng.ts";
import { clearKicks } from "./vm_helpers.ts";

const ITERATIONS = Number(Deno.env.get("STRESS_ITERATIONS") ?? 5000);
const SECONDS = Number(Deno.env.get("STRESS_SECONDS") ?? 20);
/** Longest a barrier or the final drain may take: far beyond any healthy delay. */
const DRAIN_TIMEOUT_MS = 10_000;
/** Iterations between barriers (on average). */
const BARRIER_EVERY = 200;
const MAX_CHUNK = 48 * 1024;

const prng = mulberry32;

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** One direction of one connection: bytes at position p are a hash of (seed, p). */
class Stream {
  sent = 0;
  received = 0;
  constructor(readonly name: string, readonly seed: number) {}

  #byte(p: number): number {
    let x = Math.imul((p >>> 2) ^ this.seed, 0x9e3779b1);
    x ^= x >>> 15;
    x = Math.imul(x, 0x85ebca77);
    x ^= x >>> 13;
    return (x >>> ((p & 3) * 8)) & 0xff;
  }

  /** The next `n` bytes to write (the caller adds them to `sent` once written). */
  next(n: number): Uint8Array {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i++) out[i] = this.#byte(this.sent + i);
    return out;
  }

  /** Checks received bytes against the pattern at the current position. */
  verify(bytes: Uint8Array): void {
    for (let i = 0; i < bytes.length; i++) {
      const want = this.#byte(this.received + i);
      if (bytes[i] !== want) {
        throw new Error(
          `${this.name}: byte ${this.received + i} is ${bytes[i]}, expected ${want} ` +
            `(lost, duplicated or reordered data; ${this.sent} bytes written so far)`,
        );
      }
    }
    this.received += bytes.length;
  }

  describe(): string {
    return `${this.name}: sent ${this.sent}, received ${this.received}`;
  }
}

/** Pauses writers at a safe point (between writes). */
class Gate {
  #paused = false;
  #open: (() => void) | null = null;
  #wait: Promise<void> = Promise.resolve();
  idle = 0;

  get paused(): boolean {
    return this.#paused;
  }
  pause(): void {
    if (this.#paused) return;
    this.#paused = true;
    this.#wait = new Promise((r) => this.#open = r);
  }
  resume(): void {
    this.#paused = false;
    this.#open?.();
    this.#open = null;
  }
  async pass(): Promise<void> {
    while (this.#paused) {
      this.idle++;
      await this.#wait;
      this.idle--;
    }
  }
}

interface Conn {
  readonly label: string;
  readonly host: Deno.UnixConn;
  readonly guest: GuestConn;
  readonly toGuest: Stream;
  readonly toHost: Stream;
}

interface Variant {
  readonly profile: "qemu" | "crosvm";
  readonly eventIdx: boolean;
  /** packed virtqueues (VIRTIO_F_RING_PACKED) instead of split ones */
  readonly packed?: boolean;
  /** guest driver options: ring sizes and refill policy shape the races */
  readonly guest: VsockGuestOptions;
}

async function stress(v: Variant, seed: number): Promise<void> {
  const rnd = prng(seed);
  const int = (lo: number, hi: number) => lo + Math.floor(rnd() * (hi - lo + 1));
  const vm = await startVm({
    profile: v.profile,
    frontEnd: { eventIdx: v.eventIdx, packed: v.packed },
    guest: { ...v.guest, timeoutMs: 60_000 },
  });
  const g = vm.guest;
  const log: string[] = [];
  const note = (s: string) => {
    log.push(s);
    if (log.length > 40) log.shift();
  };
  const conns: Conn[] = [];
  const tasks: Promise<void>[] = [];
  const gate = new Gate();
  let stopWriting = false;
  /** set before the VM is torn down: no task may touch the guest (its RAM is unmapped) */
  let dead = false;
  let failure: Error | null = null;
  const fail = (e: unknown) => {
    failure ??= e instanceof Error ? e : new Error(String(e));
  };
  const state = () =>
    `seed ${seed}, ${v.profile}, EVENT_IDX ${v.eventIdx}${v.packed ? ", packed" : ""}\n` +
    conns.flatMap((c) => [c.toGuest.describe(), c.toHost.describe()]).join("\n") +
    `\n${g.describe()}\nlast operations: ${log.join(", ")}`;

  try {
    // Connections: two from the host, two from the guest.
    const listener = g.listen(5000);
    const hl = vm.hostListen(6000);
    for (let i = 0; i < 4; i++) {
      let host: Deno.UnixConn;
      let guest: GuestConn;
      if (i < 2) {
        const [h, c]: [HostConnection, GuestConn] = await Promise.all([
          vm.hostConnect(5000),
          listener.accept(),
        ]);
        host = h.conn;
        guest = c;
      } else {
        [guest, host] = await Promise.all([g.connect(6000), hl.accept()]);
      }
      const label = `${i < 2 ? "host" : "guest"}-initiated #${i}`;
      conns.push({
        label,
        host,
        guest,
        toGuest: new Stream(`${label} host->guest`, seed ^ (i * 2 + 1)),
        toHost: new Stream(`${label} guest->host`, seed ^ (i * 2 + 2)),
      });
    }

    // Background traffic: a writer and a reader per direction and connection.
    for (const c of conns) {
      const wr = prng(seed + c.toGuest.seed);
      tasks.push((async () => {
        while (!stopWriting) {
          await gate.pass();
          if (stopWriting) break;
          const chunk = c.toGuest.next(1 + Math.floor(wr() * MAX_CHUNK));
          await writeAll(c.host, chunk);
          c.toGuest.sent += chunk.length;
          if (wr() < 0.3) await sleep(Math.floor(wr() * 3));
        }
      })());
      tasks.push((async () => {
        while (!stopWriting) {
          await gate.pass();
          if (stopWriting || dead) break;
          const chunk = c.toHost.next(1 + Math.floor(wr() * MAX_CHUNK));
          await c.guest.write(chunk);
          c.toHost.sent += chunk.length;
          if (wr() < 0.3) await sleep(Math.floor(wr() * 3));
        }
      })());
      tasks.push((async () => {
        const buf = new Uint8Array(65536);
        for (;;) {
          const n = await c.host.read(buf);
          if (n === null) return;
          c.toHost.verify(buf.subarray(0, n));
        }
      })());
      tasks.push((async () => {
        while (!dead) {
          const chunk = await c.guest.read();
          if (chunk === null || dead) return;
          c.toGuest.verify(chunk);
        }
      })());
    }
    for (const t of tasks) t.catch(fail);

    // Ring state the chaos loop keeps track of.
    const fe = () => vm.frontEnd;
    const queues = [0, 1, 2].filter((i) => fe().ownsQueue(i));
    const disabled = new Set<number>();
    let stopped = false; // GET_VRING_BASE only
    let suspendedBases: number[] | null = null; // full stop sequence
    const protocolFeatures = fe().protocolFeaturesOn;
    assert.ok(protocolFeatures, "SET_VRING_ENABLE needs PROTOCOL_FEATURES");

    const restoreOne = (): boolean => {
      if (suspendedBases !== null) {
        clearKicks(fe());
        g.resume(suspendedBases);
        suspendedBases = null;
        disabled.clear(); // the start sequence enables every ring
        note("resume");
        return true;
      }
      if (stopped) {
        clearKicks(fe());
        vm.faults.restartRings(); // no kick
        stopped = false;
        note("restart");
        return true;
      }
      const d = [...disabled][0];
      if (d !== undefined) {
        fe().setVringEnable(d, true);
        disabled.delete(d);
        note(`enable ${d}`);
        return true;
      }
      if (g.rxStarved) {
        vm.faults.refillRx();
        note("refill");
        return true;
      }
      return false;
    };
    const restoreAll = () => {
      while (restoreOne()) { /* until nothing is disrupted */ }
    };
    const waitFor = async (pred: () => boolean, what: string) => {
      const t0 = Date.now();
      while (!pred()) {
        if (failure !== null) throw failure;
        if (Date.now() - t0 > DRAIN_TIMEOUT_MS) {
          throw new Error(`stall: ${what} not done within ${DRAIN_TIMEOUT_MS} ms\n${state()}`);
        }
        await g.idle(5);
      }
    };
    const drained = () =>
      conns.every((c) =>
        c.toGuest.received === c.toGuest.sent &&
        c.toHost.received === c.toHost.sent
      );
    const writers = conns.length * 2;
    const barrier = async (label: string) => {
      restoreAll();
      // A calm spell: traffic, no ring events. A wakeup lost now has nothing to rescue it.
      await g.idle(int(200, 600));
      gate.pause();
      await waitFor(() => gate.idle === writers, `${label}: writers pausing`);
      await waitFor(drained, `${label}: every byte written delivered`);
      assert.deepEqual(g.anomalies, [], `${label}: guest anomalies`);
      gate.resume();
      note(label);
    };

    const ops: [number, () => void | Promise<void>][] = [
      [30, () => sleep(int(0, 2))],
      [6, () => {
        const i = queues[int(0, queues.length - 1)];
        g.kickQueue(i);
        note(`kick ${i}`);
      }],
      [10, () => {
        const i = queues[int(0, queues.length - 1)];
        const on = disabled.has(i);
        fe().setVringEnable(i, on);
        if (on) disabled.delete(i);
        else disabled.add(i);
        note(`${on ? "enable" : "disable"} ${i}`);
      }],
      [6, () => {
        if (stopped || suspendedBases !== null) return;
        vm.faults.stopRings();
        stopped = true;
        note("stop");
      }],
      [2, () => {
        if (stopped || suspendedBases !== null) return;
        suspendedBases = g.suspend();
        note("suspend");
      }],
      [5, () => {
        g.setRxStarved(true);
        note("starve");
      }],
      [25, () => void restoreOne()],
    ];
    const total = ops.reduce((s, o) => s + o[0], 0);
    const pick = () => {
      let r = rnd() * total;
      for (const [w, f] of ops) {
        if ((r -= w) < 0) return f;
      }
      return ops[0][1];
    };

    const t0 = Date.now();
    let iterations = 0;
    let barriers = 0;
    while (iterations < ITERATIONS && Date.now() - t0 < SECONDS * 1000) {
      if (failure !== null) throw failure;
      await pick()();
      iterations++;
      if (rnd() < 1 / BARRIER_EVERY) {
        await barrier(`barrier ${++barriers} (iteration ${iterations})`);
      }
      if (!(disabled.size || stopped || suspendedBases) && rnd() < 0.5) await sleep(0);
    }

    // Kick after start, at the end: writers stop, host data and a new CONNECT arrive while the
    // rings are stopped, and the rings restart without a kick. Nothing else will wake the device.
    restoreAll();
    gate.pause();
    await waitFor(() => gate.idle === writers, "writers pausing");
    vm.faults.stopRings();
    stopped = true;
    note("final stop");
    for (const c of conns) {
      const tail = c.toGuest.next(int(1, 20_000));
      await writeAll(c.host, tail);
      c.toGuest.sent += tail.length;
    }
    const late = vm.hostConnect(5000);
    late.catch(fail);
    await sleep(50);
    clearKicks(vm.frontEnd);
    vm.frontEnd.restartRings();
    stopped = false;
    note("final restart (no kick)");
    await waitFor(drained, "final drain");
    const [lateHost, lateGuest] = await Promise.all([late, listener.accept()]);
    await writeAll(lateHost.conn, new TextEncoder().encode("late"));
    assert.equal(new TextDecoder().decode(await lateGuest.readExactly(4)), "late");
    const secs = (Date.now() - t0) / 1000;
    const moved = conns.reduce((s, c) => s + c.toGuest.received + c.toHost.received, 0);
    console.log(
      `seed ${seed} ${v.profile} EVENT_IDX ${v.eventIdx}${v.packed ? " packed" : ""}: ` +
        `${iterations} iterations, ` +
        `${barriers} barriers, ${(moved / 1e6).toFixed(1)} MB verified in ${secs.toFixed(1)} s`,
    );

    // Clean close: EOF both ways on every connection.
    stopWriting = true;
    gate.resume();
    for (const c of conns) {
      await c.host.closeWrite();
      c.guest.shutdown(VIRTIO_VSOCK_SHUTDOWN_F_SEND);
    }
    await Promise.race([
      Promise.all(tasks),
      sleep(DRAIN_TIMEOUT_MS).then(() => {
        throw new Error(`stall: EOF not seen on every stream\n${state()}`);
      }),
    ]);
    if (failure !== null) throw failure;
    for (const c of conns) {
      assert.equal(c.toGuest.received, c.toGuest.sent, c.toGuest.describe());
      assert.equal(c.toHost.received, c.toHost.sent, c.toHost.describe());
      c.host.close();
    }
    lateHost.conn.close();
    lateGuest.reset();
    listener.close();
    hl.close();
    assert.deepEqual(g.anomalies, [], "guest anomalies");
    assert.ok(vm.backend.running, "the back end is alive");
  } catch (e) {
    stopWriting = true;
    dead = true;
    gate.resume();
    const why = e instanceof Error ? e.stack ?? e.message : String(e);
    const at = state(); // reads the rings: before the guest RAM is unmapped
    const exit = await vm.stop();
    throw new Error(`${why}\n${at}\n--- back end stderr (tail) ---\n${exit.stderr.slice(-4000)}`);
  }
  const exit = await vm.stop();
  const bad = exit.stderr.split("\n").filter((l) => / (ERROR|WARN) /.test(l));
  assert.deepEqual(bad, [], "the back end logged no error or warning");
}

for (
  const v of [
    // Small packets and a small rx ring refilled at once: many empty-ring races per second.
    {
      profile: "qemu",
      eventIdx: true,
      guest: { rxBuffers: 16, rxRefill: "always", maxPacketPayload: 4096 },
      what: "16 rx buffers refilled at once, 4 KiB packets",
    },
    {
      profile: "crosvm",
      eventIdx: false,
      guest: { rxBuffers: 64 },
      what: "64 rx buffers refilled at half, 64 KiB packets",
    },
    // Packed rings: chains of 1 to 4 descriptors (header, up to 3 payload segments, no
    // indirect tables on crosvm) wrap the ring's end at every alignment.
    {
      profile: "crosvm",
      eventIdx: true,
      packed: true,
      guest: { rxBuffers: 48, rxRefill: "always", maxPacketPayload: 16384, txPayloadSegments: 3 },
      what: "packed rings, 48 rx buffers refilled at once, 16 KiB packets in 3 segments",
    },
  ] as const
) {
  Deno.test(`stress: random ring life-cycle events under bidirectional traffic [${v.profile}, EVENT_IDX ${v.eventIdx ? "on" : "off"}, ${v.what}]`, async () => {
    const fixed = Deno.env.get("STRESS_SEED");
    const seed = fixed !== undefined ? Number(fixed) >>> 0 : crypto.getRandomValues(
      new Uint32Array(1),
    )[0];
    console.log(`stress seed ${seed} (STRESS_SEED=${seed} to reproduce)`);
    await stress(v, seed);
  });
}
