/**
 * A hostile guest on packed virtqueues (virtio 1.3 section 2.8), against a daemon serving two VMs
 * from one worker process (`--workers 1`: a VM that made it spin or block would stall the other
 * too). VM 0's
 * guest writes descriptors a Linux driver never writes through the fault hooks (`Faults`); VM 1 is
 * a well-behaved guest. Both use packed rings.
 *
 * - A buffer the device can return (addresses outside RAM or beyond 2^53, a readable descriptor
 *   after a writable one, INDIRECT with NEXT, indirect tables of a bad length, outside RAM or
 *   not negotiated, a nested table, wrong-direction or too small buffers, rx and tx) comes back
 *   with used length 0, logged at a bounded rate, and the device goes on.
 * - A descriptor that leaves the device no buffer id to return (an id >= the queue size, a chain
 *   longer than the ring, a chain made available before its end, an id reused while its buffer
 *   is in flight) breaks that queue only: one log line however often the guest kicks, no CPU
 *   spent on it, VM 1 unaffected, and VM 0's driver reset (new rings) recovers.
 * - A front end's packed vring base with a position beyond the queue size is refused (logged),
 *   and the back end goes on serving.
 *
 * The daemon never crashes: it exits 0 on SIGTERM at the end of every test.
 */
import assert from "node:assert/strict";
import {
  Faults,
  hostConnect,
  hostListen,
  pattern,
  VIRTIO_VSOCK_HDR_SIZE,
  VSOCK_VQ_RX,
  VSOCK_VQ_TX,
  writeAll,
} from "../../lib/testing/mod.ts";
import {
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
} from "../../lib/virtio/packed_layout.ts";
import { VIRTQ_INDIRECT_MAX_DESCS } from "../../lib/virtio/virtqueue.ts";
import { PacketHeader } from "../../lib/vsock/packet.ts";
import {
  bootGuest,
  type Guest,
  type MultiVmDaemon,
  multiVmDaemon,
  transfer,
  workerPid,
} from "./isolation_helpers.ts";
import { roundTrip } from "./vm_helpers.ts";

const KiB = 1024;
/** Guest options: a small rx ring, so raw rx buffers are reached (and run out) quickly. */
const GUEST = { rxBuffers: 16, rxBufSize: 4 * KiB };
/** CPU the worker may use in a second of kicks at a broken queue (a spinning one uses 100). */
const MAX_IDLE_TICKS = 25;

/** Both VMs of a fresh two-VM daemon with packed rings; `fn` gets them; everything stops. */
async function withTwoVms(
  profile: "qemu" | "crosvm",
  fn: (d: MultiVmDaemon, hostile: Guest, normal: Guest) => Promise<void>,
): Promise<void> {
  const d = await multiVmDaemon(2, ["--workers", "1"]);
  const guests: Guest[] = [];
  try {
    for (const i of [0, 1]) {
      guests.push(
        await bootGuest(d.socket(i), { frontEnd: { profile, packed: true }, guest: GUEST }),
      );
      assert.ok(guests[i].guest.packed, `VM ${i}: packed rings`);
    }
    await fn(d, guests[0], guests[1]);
    assert.deepEqual(guests[1].guest.anomalies, [], "the well-behaved VM saw nothing odd");
  } catch (e) {
    throw new Error(`${e instanceof Error ? e.stack : e}\n--- daemon ---\n${d.backend.stderr()}`);
  } finally {
    for (const g of guests) await g.close();
    const exit = await d.backend.stop();
    assert.equal(exit.code, 0, "the daemon exits cleanly");
  }
}

/** Back-end log lines matching `re`. */
function logCount(d: MultiVmDaemon, re: RegExp): number {
  return d.backend.stderr().split("\n").filter((l) => re.test(l)).length;
}

/** CPU time (user + system, in clock ticks) process `pid` used so far. */
function cpuTicks(pid: number): number {
  const f = Deno.readTextFileSync(`/proc/${pid}/stat`).split(") ")[1].split(" ");
  return Number(f[11]) + Number(f[12]); // utime, stime (fields 14 and 15)
}

/** A guest buffer holding a valid header (RW to host port 1, no payload). */
function headerBuffer(g: Guest): number {
  const gpa = g.memory.alloc(64, 16);
  const h = new PacketHeader();
  h.srcCid = g.guest.guestCid;
  h.dstCid = 2;
  h.srcPort = h.dstPort = 1;
  h.type = 1;
  const b = new Uint8Array(VIRTIO_VSOCK_HDR_SIZE);
  h.encodeTo(new DataView(b.buffer), 0);
  g.memory.write(gpa, b);
  return gpa;
}

/** The VM still moves data: host -> guest on a new connection, then both ways on another. */
async function stillWorks(g: Guest, uds: string, port: number): Promise<void> {
  await transfer(g, uds, port, 256 * KiB);
  const hl = hostListen(uds, port + 1);
  try {
    const [c, h] = await Promise.all([g.guest.connect(port + 1), hl.accept()]);
    await roundTrip(c, h, 256 * KiB, `port ${port + 1}`);
    h.close();
    await c.close();
  } finally {
    hl.close();
  }
}

// ---------------------------------------------------------------------------------------
// Buffers the device returns with used length 0
// ---------------------------------------------------------------------------------------

for (const profile of ["qemu", "crosvm"] as const) {
  Deno.test(`packed hostile [${profile}]: malformed buffers come back with used length 0, logged at a bounded rate; both VMs keep working`, async () => {
    await withTwoVms(profile, async (d, a, b) => {
      const f = new Faults(a.guest);
      const hdr = headerBuffer(a);
      const table = a.memory.alloc(16 * (VIRTQ_INDIRECT_MAX_DESCS + 1), 16);
      f.writeDescTable(table, [{ addr: hdr, len: VIRTIO_VSOCK_HDR_SIZE, flags: 0 }]);
      const ram = a.memory.regions.at(-1)!;
      const INDIRECT = VIRTQ_DESC_F_INDIRECT;
      const tx: [string, number][] = [
        ["address 2^60", f.malformedOutOfRange()],
        ["address >= 2^53, < 2^64", f.malformedOutOfRange(2n ** 64n - 4096n)],
        ["straddles the end of RAM", f.malformedOutOfRange(ram.gpa + ram.size - 20)],
        ["device-writable header", f.malformedWriteOnlyTx()],
        [
          "readable after writable",
          f.writeRawChain(VSOCK_VQ_TX, [
            {
              addr: hdr,
              len: VIRTIO_VSOCK_HDR_SIZE,
              flags: VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            },
            { addr: hdr, len: 8, flags: 0 },
          ]),
        ],
        [
          "INDIRECT with NEXT",
          f.writeRawChain(VSOCK_VQ_TX, [
            { addr: table, len: 16, flags: INDIRECT | VIRTQ_DESC_F_NEXT },
            { addr: hdr, len: VIRTIO_VSOCK_HDR_SIZE, flags: 0 },
          ]),
        ],
        [
          "indirect table of 17 bytes",
          f.writeRawChain(VSOCK_VQ_TX, [
            { addr: table, len: 17, flags: INDIRECT },
          ]),
        ],
        ["empty indirect table", f.malformedEmptyIndirect()],
        [
          `indirect table of ${VIRTQ_INDIRECT_MAX_DESCS + 1} entries`,
          f.writeRawChain(VSOCK_VQ_TX, [
            { addr: table, len: 16 * (VIRTQ_INDIRECT_MAX_DESCS + 1), flags: INDIRECT },
          ]),
        ],
        [
          "indirect table outside RAM",
          f.writeRawChain(VSOCK_VQ_TX, [
            { addr: 2n ** 60n, len: 32, flags: INDIRECT },
          ]),
        ],
        // Inside a table only WRITE counts: the inner INDIRECT is a 16-byte buffer, too short.
        ["nested indirect", f.malformedNestedIndirect()],
      ];
      if (profile === "crosvm") {
        // crosvm does not offer INDIRECT_DESC: then even a well-formed table is refused.
        const id = f.writeRawChain(VSOCK_VQ_TX, [{ addr: table, len: 16, flags: INDIRECT }]);
        tx.push(["indirect table, not negotiated", id]);
      }
      const small = a.memory.alloc(64, 16);
      const rx: [string, number][] = [
        [
          "rx buffer outside RAM",
          f.writeRawChain(VSOCK_VQ_RX, [
            { addr: 2n ** 60n, len: 4140, flags: VIRTQ_DESC_F_WRITE },
          ]),
        ],
        [
          "rx buffer smaller than a header",
          f.writeRawChain(VSOCK_VQ_RX, [
            { addr: small, len: 10, flags: VIRTQ_DESC_F_WRITE },
          ]),
        ],
        ["read-only rx buffer", f.writeRawChain(VSOCK_VQ_RX, [{ addr: small, len: 64, flags: 0 }])],
        [
          "rx: readable after writable",
          f.writeRawChain(VSOCK_VQ_RX, [
            { addr: small, len: 64, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT },
            { addr: small, len: 64, flags: 0 },
          ]),
        ],
      ];
      // Host data makes the device take rx buffers until it reaches the bad ones.
      await transfer(a, d.uds(0), 5000, 512 * KiB);
      const back = (q: number, id: number) =>
        a.guest.rawUsed.find((u) => u.queue === q && u.head === id);
      await a.guest.waitFor(
        () =>
          [
            ...tx.map(([, id]) => back(VSOCK_VQ_TX, id)),
            ...rx.map(([, id]) => back(VSOCK_VQ_RX, id)),
          ]
            .every((u) => u !== undefined),
        5000,
        "every malformed buffer back",
      );
      const lens = (q: number, list: [string, number][]) =>
        list.map(([what, id]) => [what, back(q, id)!.len]);
      assert.deepEqual(lens(VSOCK_VQ_TX, tx), tx.map(([what]) => [what, 0]), "tx used lengths");
      assert.deepEqual(lens(VSOCK_VQ_RX, rx), rx.map(([what]) => [what, 0]), "rx used lengths");
      const badLines = () => logCount(d, /invalid (tx|rx) descriptor chain|shorter than a header/);
      await a.guest.waitFor(() => badLines() >= 10, 5000, "a log line per bad buffer (up to 10)");

      // A flood of bad chains: the log stays bounded (LogLimiter: 10 lines, then a summary).
      for (let round = 0; round < 10; round++) {
        const ids = Array.from({ length: 20 }, () => f.malformedOutOfRange());
        await a.guest.waitFor(
          () => ids.every((id) => back(VSOCK_VQ_TX, id) !== undefined),
          5000,
          `flood round ${round}`,
        );
      }
      await a.guest.idle(100);
      assert.ok(badLines() <= 20, `${badLines()} lines for ~220 bad buffers`);
      assert.equal(logCount(d, /queue broken/), 0, "no queue is broken");
      await stillWorks(b, d.uds(1), 6000);
      await stillWorks(a, d.uds(0), 6100);
    });
  });
}

// ---------------------------------------------------------------------------------------
// Descriptors that break a queue
// ---------------------------------------------------------------------------------------

interface Breaker {
  readonly name: string;
  /** the log line's reason */
  readonly reason: RegExp;
  /** "tx" or "rx": the queue broken */
  readonly queue: "tx" | "rx";
  /** Writes the descriptors (and whatever traffic gets the device to them). */
  inject(d: MultiVmDaemon, g: Guest, f: Faults): Promise<void>;
}

const BREAKERS: Breaker[] = [
  {
    name: "a buffer id >= the queue size",
    reason: /holds buffer id \d+, beyond queue size/,
    queue: "tx",
    inject(_d, g, f) {
      const id = g.guest.queue(VSOCK_VQ_TX).size;
      f.writeRawChain(VSOCK_VQ_TX, [{
        addr: headerBuffer(g),
        len: VIRTIO_VSOCK_HDR_SIZE,
        flags: 0,
        id,
      }]);
      return Promise.resolve();
    },
  },
  {
    name: "a chain longer than the ring",
    reason: /is longer than the ring/,
    queue: "tx",
    async inject(_d, g, f) {
      const q = g.guest.queue(VSOCK_VQ_TX);
      await g.guest.waitFor(() => q.numFree === q.size, 5000, "every tx slot free");
      const hdr = headerBuffer(g);
      // Every slot of the ring, each with NEXT: the chain never ends.
      f.writeRawChain(
        VSOCK_VQ_TX,
        Array.from({ length: q.size }, () => ({ addr: hdr, len: 16, flags: VIRTQ_DESC_F_NEXT })),
      );
    },
  },
  {
    name: "a chain made available before its end",
    reason: /which is not available/,
    queue: "tx",
    inject(_d, g, f) {
      const hdr = headerBuffer(g);
      f.writeRawChain(VSOCK_VQ_TX, [
        { addr: hdr, len: VIRTIO_VSOCK_HDR_SIZE, flags: VIRTQ_DESC_F_NEXT },
        { addr: hdr, len: 8, flags: 0, availBits: 0 }, // AVAIL = USED = 0: never available
      ]);
      return Promise.resolve();
    },
  },
  {
    name: "a buffer id reused while its buffer is in flight",
    reason: /holds buffer id \d+, which is already in flight/,
    queue: "rx",
    async inject(d, g, f) {
      // The device holds an rx buffer in flight while it takes more for the same read (one
      // readv into several buffers): two buffers with one id are then both in flight.
      const listener = g.guest.listen(5000);
      const [host, conn] = await Promise.all([hostConnect(d.uds(0), 5000), listener.accept()]);
      g.guest.setRxStarved(true);
      for (let n = 0; g.guest.rxPosted > 0; n++) { // use up the posted buffers, 1 by 1
        assert.ok(n < 64, "rx buffers used up");
        await writeAll(host.conn, pattern(4 * KiB, n));
        await conn.readExactly(4 * KiB);
      }
      // 64 KiB waits for buffers; then two buffers with the same id arrive, with one kick.
      await writeAll(host.conn, pattern(64 * KiB, 99));
      await g.guest.idle(50);
      const len = VIRTIO_VSOCK_HDR_SIZE + 4 * KiB;
      const at = () => g.memory.alloc(len, 64);
      const kick = { kick: false }; // one kick for both, below (EVENT_IDX would skip a second)
      const id = f.writeRawChain(
        VSOCK_VQ_RX,
        [{ addr: at(), len, flags: VIRTQ_DESC_F_WRITE }],
        kick,
      );
      f.writeRawChain(VSOCK_VQ_RX, [{ addr: at(), len, flags: VIRTQ_DESC_F_WRITE, id }], kick);
      g.guest.kickQueue(VSOCK_VQ_RX);
      await g.guest.waitFor(() => /rx queue broken/.test(d.backend.stderr()), 5000, "rx broken");
      g.guest.setRxStarved(false);
      host.conn.close();
      listener.close();
    },
  },
];

for (const k of BREAKERS) {
  Deno.test(`packed hostile: ${k.name} breaks only VM 0's ${k.queue} queue: one log line, no spinning, VM 1 unaffected, a driver reset recovers`, async () => {
    await withTwoVms("qemu", async (d, a, b) => {
      const broken = new RegExp(`${k.queue} queue broken`);
      await k.inject(d, a, new Faults(a.guest));
      await a.guest.waitFor(() => logCount(d, broken) > 0, 5000, `the ${k.queue} queue broken`);
      const line = d.backend.stderr().split("\n").find((l) => broken.test(l))!;
      assert.match(line, k.reason);

      // The guest keeps kicking the broken queue for a second: the worker stays idle.
      const q = k.queue === "tx" ? VSOCK_VQ_TX : VSOCK_VQ_RX;
      const worker = workerPid(d.backend.pid, 0);
      assert.ok(worker > 0, "the worker process");
      const t0 = cpuTicks(worker);
      for (let i = 0; i < 100; i++) {
        for (let k = 0; k < 10; k++) a.guest.kickQueue(q);
        await a.guest.idle(10);
      }
      const ticks = cpuTicks(worker) - t0;
      assert.ok(ticks <= MAX_IDLE_TICKS, `the worker used ${ticks} ticks in a second of kicks`);
      assert.equal(logCount(d, broken), 1, "logged once, however often the guest kicked");
      assert.ok(a.guest.frontEnd.getFeatures() !== 0n, "VM 0's back end still answers");

      await stillWorks(b, d.uds(1), 6000);
      await a.guest.resetDevice(); // new rings: the device starts afresh
      await stillWorks(a, d.uds(0), 6100);
      assert.equal(logCount(d, /queue broken/), 1, "nothing else broke");
    });
  });
}

// ---------------------------------------------------------------------------------------
// A hostile front end's vring base
// ---------------------------------------------------------------------------------------

Deno.test("packed hostile: vring bases with positions beyond the queue size are refused; a driver reset brings the rings back", async () => {
  await withTwoVms("qemu", async (d, a, b) => {
    const size = a.guest.queue(VSOCK_VQ_RX).size;
    a.guest.frontEnd.stopRings();
    // rx: avail and used index 0x7fff; tx: every bit set (both wrap counters, index 0x7fff)
    a.guest.frontEnd.restartRings([0x7fff7fff, 0xffffffff]);
    await a.guest.waitFor(
      () => logCount(d, new RegExp(`position beyond queue size ${size}`)) === 2,
      5000,
      "both bases refused",
    );
    assert.ok(a.guest.frontEnd.getFeatures() !== 0n, "VM 0's back end still answers");
    await stillWorks(b, d.uds(1), 6000);
    await a.guest.resetDevice();
    await stillWorks(a, d.uds(0), 6100);
  });
});
