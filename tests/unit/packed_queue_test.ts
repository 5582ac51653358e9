/**
 * Device-side packed virtqueue (lib/virtio/packed_queue.ts) driven by a raw driver
 * (packed_raw_driver.ts) over PlainGuestMemory: single, chained and indirect buffers, laps
 * around rings of 4 and 5 descriptors, out-of-order completion, batches made visible by the
 * first used descriptor's flags, every rejection path (consumed chains and broken rings),
 * event suppression both ways with and without EVENT_IDX ("enable notification, then
 * re-check"), dirty marks, `unpop` and the vhost-user vring base.
 */

import assert from "node:assert/strict";
import { DescChain } from "../../lib/virtio/desc_chain.ts";
import { PlainGuestMemory } from "../../lib/virtio/memory.ts";
import {
  compactPackedRingLayout,
  isUsed,
  offWrap,
  PACKED_DESC_SIZE,
  PACKED_EVENT_FLAGS,
  packedRingBase,
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  usedFlags,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
} from "../../lib/virtio/packed_layout.ts";
import { PackedQueue } from "../../lib/virtio/packed_queue.ts";
import { POP_CHAIN, POP_EMPTY, POP_INVALID, QueueError } from "../../lib/virtio/virtqueue.ts";
import { RawPackedDriver, type RawSeg, rd, wr } from "./packed_raw_driver.ts";

// Two adjacent regions, a gap, a third region (as in split_queue_fixture.ts).
const R0 = { gpa: 0x0, size: 0x10000 };
const R1 = { gpa: 0x10000, size: 0x10000 };
const R2 = { gpa: 0x40000, size: 0x1000 };
const BUF = 0x2000;
const TABLE = 0x8000;
const FRESH_BASE = 0x8000_8000; // both wrap counters 1, both positions 0

interface Setup {
  mem: PlainGuestMemory;
  dirty: [number, number][];
  drv: RawPackedDriver;
  dev: PackedQueue;
  chain: DescChain;
}

function setup(opts: {
  size?: number;
  eventIdx?: boolean;
  indirect?: boolean;
  notifyOnEmpty?: boolean;
  maxIndirectDescs?: number;
  onDirty?: (gpa: number, len: number) => void;
} = {}): Setup {
  const size = opts.size ?? 8;
  const dirty: [number, number][] = [];
  const mem = new PlainGuestMemory([R0, R1, R2], (gpa, len) => {
    dirty.push([gpa, len]);
    opts.onDirty?.(gpa, len);
  });
  const ring = compactPackedRingLayout(size, 0);
  const drv = new RawPackedDriver(mem, size, ring);
  const dev = new PackedQueue(size, mem, ring.descGpa, ring.driverEventGpa, ring.deviceEventGpa, {
    eventIdx: opts.eventIdx ?? false,
    indirect: opts.indirect ?? false,
    notifyOnEmpty: opts.notifyOnEmpty,
    maxIndirectDescs: opts.maxIndirectDescs,
  });
  return { mem, dirty, drv, dev, chain: new DescChain(64) };
}

function segments(c: DescChain): [number, number, number][] {
  const out: [number, number, number][] = [];
  for (let i = 0; i < c.count; i++) out.push([c.region[i], c.offset[i], c.len[i]]);
  return out;
}

/** Pops one buffer (which must be valid), returns it with `len`, publishes. */
function complete(s: Setup, id: number, segs: readonly RawSeg[], len: number): void {
  s.drv.add(id, segs);
  assert.equal(s.dev.pop(s.chain), POP_CHAIN, s.dev.lastError);
  assert.equal(s.chain.head, id);
  s.dev.pushUsed(id, len);
  s.dev.publishUsed();
}

/** The device's ring base as the driver's positions say it should be. */
function driverBase(d: RawPackedDriver): number {
  return packedRingBase({
    availIdx: d.nextAvail,
    availWrap: d.availWrap,
    usedIdx: d.nextUsed,
    usedWrap: d.usedWrap,
  });
}

// ---------------------------------------------------------------------------
// Construction and ring base

Deno.test("packed: constructor rejects bad sizes, misaligned parts and parts outside memory", () => {
  const mem = new PlainGuestMemory([R0, R1, R2]);
  const opts = { eventIdx: false, indirect: false };
  const mk = (size: number, d: number, drv: number, dev: number) => () =>
    new PackedQueue(size, mem, d, drv, dev, opts);
  for (const size of [0, -1, 1.5, 32769]) {
    assert.throws(mk(size, 0, 0x1000, 0x1004), QueueError, `size ${size}`);
  }
  for (const size of [1, 5, 6, 32768 >> 4]) mk(size, 0, 0x9000, 0x9004)(); // any size
  assert.throws(mk(4, 8, 0x1000, 0x1004), /16-byte aligned/);
  assert.throws(mk(4, 0, 0x1002, 0x1004), /driver event suppression.*4-byte aligned/);
  assert.throws(mk(4, 0, 0x1000, 0x1006), /device event suppression.*4-byte aligned/);
  assert.throws(mk(4, 0x20000 - 32, 0x1000, 0x1004), /descriptor ring.*not inside one/);
  assert.throws(mk(4, 0, 0x30000, 0x1004), /driver event suppression.*not inside/);
  assert.throws(mk(4, 0, 0x1000, 0x41000), /device event suppression.*not inside/);
});

Deno.test("packed: ring base starts at 0x80008000, follows the driver, round-trips and is checked", () => {
  const s = setup({ size: 5 });
  assert.equal(s.dev.ringBase, FRESH_BASE);
  assert.equal(s.dev.packed, true);
  complete(s, 0, [rd(BUF, 8), rd(BUF + 8, 8), rd(BUF + 16, 8)], 0);
  assert.equal(s.drv.getUsed()?.id, 0);
  complete(s, 1, [rd(BUF, 8), rd(BUF + 8, 8), rd(BUF + 16, 8)], 0); // crosses the end
  assert.equal(s.drv.getUsed()?.id, 1);
  assert.equal(s.drv.availWrap, 0);
  assert.equal(s.dev.ringBase, driverBase(s.drv));
  assert.equal(
    s.dev.ringBase,
    packedRingBase({ availIdx: 1, availWrap: 0, usedIdx: 1, usedWrap: 0 }),
  );

  // A second queue over the same ring, started from that base, goes on where the first stopped.
  const r = s.drv.ring;
  const again = new PackedQueue(5, s.mem, r.descGpa, r.driverEventGpa, r.deviceEventGpa, {
    eventIdx: false,
    indirect: false,
  });
  again.ringBase = s.dev.ringBase;
  assert.equal(again.ringBase, s.dev.ringBase);
  s.drv.add(4, [wr(BUF, 64)]);
  assert.equal(again.pop(s.chain), POP_CHAIN, again.lastError);
  assert.equal(s.chain.head, 4);
  again.pushUsed(4, 10);
  again.publishUsed();
  assert.deepEqual(s.drv.getUsed(), { id: 4, len: 10, flags: VIRTQ_DESC_F_WRITE });

  // Positions beyond the queue size are refused: bits 0-14 (avail) and 16-30 (used).
  assert.throws(() => again.ringBase = 5, QueueError);
  assert.throws(() => again.ringBase = 5 << 16, QueueError);
});

// ---------------------------------------------------------------------------
// Buffers

Deno.test("packed: a single buffer, a chain across two regions, used descriptor fields", () => {
  const s = setup();
  s.drv.add(3, [wr(BUF, 100)], { hold: true });
  assert.equal(s.dev.pop(s.chain), POP_EMPTY, "not available before its flags are written");
  s.drv.release();
  assert.equal(s.dev.pop(s.chain), POP_CHAIN);
  assert.equal(s.chain.head, 3);
  assert.deepEqual(segments(s.chain), [[0, BUF, 100]]);
  assert.equal(s.chain.writableLen, 100);
  assert.equal(s.dev.inFlight, 1);
  s.dev.pushUsed(3, 44);
  assert.equal(s.dev.inFlight, 0);
  s.dev.publishUsed();
  assert.deepEqual(s.drv.getUsed(), { id: 3, len: 44, flags: s.drv.readDesc(0).flags });
  assert.ok(isUsed(s.drv.readDesc(0).flags, 1));
  assert.equal(s.drv.readDesc(0).flags & VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_WRITE, "len > 0");

  // Readable, readable crossing from R0 into R1, writable: four segments, id in the last.
  s.drv.add(6, [rd(BUF, 10), rd(0x10000 - 6, 16), wr(0x11000, 32)]);
  assert.equal(s.dev.pop(s.chain), POP_CHAIN, s.dev.lastError);
  assert.equal(s.chain.head, 6);
  assert.deepEqual(segments(s.chain), [[0, BUF, 10], [0, 0x10000 - 6, 6], [1, 0, 10], [
    1,
    0x1000,
    32,
  ]]);
  assert.equal(s.chain.readableCount, 3);
  assert.equal(s.chain.readableLen, 26);
  assert.equal(s.chain.writableLen, 32);
  assert.equal(s.chain.descCount, 3);
  s.dev.pushUsed(6, 0);
  s.dev.publishUsed();
  assert.deepEqual(s.drv.getUsed(), { id: 6, len: 0, flags: s.drv.readDesc(1).flags });
  assert.equal(s.drv.readDesc(1).flags & VIRTQ_DESC_F_WRITE, 0, "nothing written: no WRITE");
  assert.equal(s.dev.ringBase, driverBase(s.drv), "skipped by the chain's 3 descriptors");
  assert.throws(() => s.dev.pushUsed(6, 0), RangeError, "not in flight any more");
});

Deno.test("packed: indirect tables (only WRITE counts inside), one ring position each", () => {
  const s = setup({ indirect: true });
  // Stray NEXT/INDIRECT flags inside the table are reserved and ignored; entries are consecutive.
  s.drv.addIndirect(2, TABLE, [
    { gpa: BUF, len: 44, flags: VIRTQ_DESC_F_NEXT },
    { gpa: BUF + 0x100, len: 8, flags: VIRTQ_DESC_F_INDIRECT },
    { gpa: BUF + 0x200, len: 300, writable: true },
  ], { flags: VIRTQ_DESC_F_WRITE }); // WRITE on the INDIRECT descriptor itself: ignored
  s.drv.add(5, [rd(BUF, 4)]);
  assert.equal(s.dev.pop(s.chain), POP_CHAIN, s.dev.lastError);
  assert.equal(s.chain.head, 2);
  assert.deepEqual(segments(s.chain), [[0, BUF, 44], [0, BUF + 0x100, 8], [0, BUF + 0x200, 300]]);
  assert.equal(s.chain.readableLen, 52);
  assert.equal(s.chain.writableLen, 300);
  assert.equal(s.chain.descCount, 4);
  assert.equal(s.dev.pop(s.chain), POP_CHAIN, "the next buffer is one position further");
  assert.equal(s.chain.head, 5);
  s.dev.pushUsed(5, 0);
  s.dev.pushUsed(2, 300);
  s.dev.publishUsed();
  assert.equal(s.drv.getUsed()?.id, 5);
  assert.equal(s.drv.getUsed()?.id, 2);
  assert.equal(s.dev.ringBase, driverBase(s.drv));
});

for (const size of [4, 5]) {
  Deno.test(`packed: laps around a ring of ${size} with chains of every length`, () => {
    const s = setup({ size });
    let descs = 0;
    for (let round = 0; round < 6 * size; round++) {
      const n = 1 + (round * 3) % size;
      const segs = Array.from({ length: n }, (_, i) => i < n - 1 ? rd(BUF, 8 + i) : wr(BUF, 64));
      const id = (round * 7) % size;
      s.drv.add(id, segs);
      assert.equal(s.dev.availableCount(), 1);
      assert.equal(s.dev.pop(s.chain), POP_CHAIN, `round ${round}: ${s.dev.lastError}`);
      assert.equal(s.chain.head, id);
      assert.equal(s.chain.count, n);
      assert.equal(s.dev.pop(s.chain), POP_EMPTY);
      s.dev.pushUsed(id, round + 1);
      s.dev.publishUsed();
      const wrap = s.drv.usedWrap;
      assert.deepEqual(s.drv.getUsed(), {
        id,
        len: round + 1,
        flags: usedFlags(wrap) | VIRTQ_DESC_F_WRITE,
      });
      assert.equal(s.drv.getUsed(), null);
      assert.equal(s.dev.ringBase, driverBase(s.drv), `round ${round}`);
      descs += n;
    }
    assert.ok(descs > 4 * size, "several laps");
  });

  Deno.test(`packed: out-of-order completion on a ring of ${size}: used descriptors skip by each buffer's count`, () => {
    const s = setup({ size });
    let free = Array.from({ length: size }, (_, i) => i);
    let lens = 1;
    const returned: number[] = [];
    for (let round = 0; round < 8 * size; round++) {
      // Fill the ring with buffers of 1..3 descriptors while there is room.
      const popped: number[] = [];
      for (let n = 1 + round % 3; s.drv.free >= n && free.length > 0; n = 1 + (n % 3)) {
        const id = free.shift()!;
        s.drv.add(id, Array.from({ length: n }, () => wr(BUF, 16)));
        assert.equal(s.dev.pop(s.chain), POP_CHAIN, s.dev.lastError);
        assert.equal(s.chain.head, id);
        assert.equal(s.chain.count, n);
        popped.push(id);
      }
      assert.equal(s.dev.inFlight, popped.length);
      // Complete in a rotated, reversed order; each round publishes once.
      const order = popped.map((_, i) => popped[(popped.length - 1 - i + round) % popped.length]);
      const want = new Map<number, number>();
      for (const id of order) {
        want.set(id, lens);
        s.dev.pushUsed(id, lens++);
      }
      s.dev.publishUsed();
      for (const id of order) {
        const u = s.drv.getUsed();
        assert.ok(u !== null, `round ${round}: buffer ${id} not seen used`);
        assert.equal(u.id, id);
        assert.equal(u.len, want.get(id));
        returned.push(u.id);
      }
      assert.equal(s.drv.getUsed(), null);
      assert.equal(s.dev.ringBase, driverBase(s.drv), `round ${round}`);
      free = free.concat(order);
    }
    assert.ok(returned.length > 2 * size);
  });
}

Deno.test("packed: a batch becomes visible at once: the first used descriptor's flags are written last", () => {
  let othersUsedWhenFirstWritten: boolean | null = null;
  const s: Setup = setup({
    onDirty: (gpa, len) => {
      // The dirty mark of the first used descriptor's flags (position 0) follows the store.
      if (gpa === s.drv.ring.descGpa + 14 && len === 2) {
        othersUsedWhenFirstWritten = isUsed(s.drv.readDesc(1).flags, 1) &&
          isUsed(s.drv.readDesc(3).flags, 1);
      }
    },
  });
  s.drv.add(0, [wr(BUF, 8)]);
  s.drv.add(1, [rd(BUF, 8), wr(BUF, 8)]);
  s.drv.add(2, [wr(BUF, 8)]);
  for (let i = 0; i < 3; i++) assert.equal(s.dev.pop(s.chain), POP_CHAIN);
  s.dev.pushUsed(0, 1);
  s.dev.pushUsed(1, 2);
  s.dev.pushUsed(2, 3);
  assert.equal(s.drv.getUsed(), null, "nothing visible before publishUsed");
  assert.ok(!isUsed(s.drv.readDesc(0).flags, 1), "the first one is not marked used yet");
  assert.equal(othersUsedWhenFirstWritten, null);
  s.dev.publishUsed();
  assert.equal(othersUsedWhenFirstWritten, true);
  assert.deepEqual([s.drv.getUsed()?.len, s.drv.getUsed()?.len, s.drv.getUsed()?.len], [1, 2, 3]);
  assert.equal(s.drv.getUsed(), null);
  s.dev.publishUsed(); // nothing pending: writes nothing
  assert.equal(s.dev.needsNotification(), true);
  assert.equal(s.dev.needsNotification(), false, "no progress since");
});

Deno.test("packed: unpop gives buffers back newest first, across the end of the ring", () => {
  const s = setup({ size: 4 });
  complete(s, 0, [rd(BUF, 8), rd(BUF, 8), rd(BUF, 8)], 0); // positions 0-2
  assert.ok(s.drv.getUsed());
  s.drv.add(1, [wr(BUF, 8), wr(BUF, 8)]); // positions 3, 0 (wraps)
  s.drv.add(2, [wr(BUF, 8)]); // position 1
  assert.equal(s.dev.pop(s.chain), POP_CHAIN);
  assert.equal(s.dev.pop(s.chain), POP_CHAIN);
  assert.equal(s.dev.inFlight, 2);
  s.dev.unpop();
  s.dev.unpop();
  assert.equal(s.dev.inFlight, 0);
  assert.equal(
    s.dev.ringBase,
    packedRingBase({ availIdx: 3, availWrap: 1, usedIdx: 3, usedWrap: 1 }),
  );
  assert.throws(() => s.dev.unpop(), /not in flight/);
  assert.equal(s.dev.pop(s.chain), POP_CHAIN);
  assert.equal(s.chain.head, 1);
  assert.equal(s.chain.count, 2);
  assert.equal(s.dev.pop(s.chain), POP_CHAIN);
  assert.equal(s.chain.head, 2);
  s.dev.pushUsed(2, 8);
  assert.throws(() => s.dev.unpop(), /not in flight/, "buffer 2 was used");
});

Deno.test("packed: availableCount counts whole chains ahead; isEmpty looks at the next one", () => {
  const s = setup({ size: 8 });
  assert.equal(s.dev.availableCount(), 0);
  assert.equal(s.dev.isEmpty(), true);
  s.drv.add(0, [rd(BUF, 8), wr(BUF, 8)]);
  s.drv.add(1, [wr(BUF, 8)]);
  s.drv.add(2, [wr(BUF, 8)], { hold: true }); // written, first flags not yet
  s.drv.add(3, [wr(BUF, 8)]);
  assert.equal(s.dev.availableCount(), 2, "stops at the buffer not made available");
  assert.equal(s.dev.isEmpty(), false);
  s.drv.release();
  assert.equal(s.dev.availableCount(), 4);
  for (let i = 0; i < 4; i++) assert.equal(s.dev.pop(s.chain), POP_CHAIN);
  assert.equal(s.dev.availableCount(), 0);
  assert.equal(s.dev.isEmpty(), true);
});

// ---------------------------------------------------------------------------
// Invalid chains: consumed and returned with len 0

interface BadChain {
  name: string;
  build(d: RawPackedDriver, id: number): void;
  error: RegExp;
  indirect?: boolean;
}

const BAD_CHAINS: BadChain[] = [
  {
    name: "a buffer outside guest memory",
    build: (d, id) => d.add(id, [rd(BUF, 8), rd(0x30000, 16)]),
    error: /descriptor 4: buffer .* outside guest memory/, // ring position 3 + 1
  },
  {
    name: "a buffer running past the last region",
    build: (d, id) => d.add(id, [wr(R2.gpa + R2.size - 8, 16)]),
    error: /outside guest memory/,
  },
  {
    name: "an address beyond 2^53",
    build: (d, id) => d.add(id, [rd(2 ** 60, 16)]),
    error: /outside guest memory/,
  },
  {
    name: "a readable buffer after a writable one",
    build: (d, id) => d.add(id, [wr(BUF, 8), rd(BUF, 8), wr(BUF, 8)]),
    error: /readable buffer after a device-writable one/,
  },
  {
    name: "INDIRECT without VIRTIO_RING_F_INDIRECT_DESC",
    build: (d, id) => d.addIndirect(id, TABLE, [rd(BUF, 8)]),
    error: /not negotiated/,
    indirect: false,
  },
  {
    name: "INDIRECT together with NEXT",
    build: (d, id) =>
      d.add(id, [{ gpa: TABLE, len: 16, flags: VIRTQ_DESC_F_INDIRECT }, rd(BUF, 8)]),
    error: /both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT/,
  },
  {
    name: "INDIRECT inside a list linked by NEXT",
    build: (d, id) =>
      d.add(id, [rd(BUF, 8), { gpa: TABLE, len: 16, flags: VIRTQ_DESC_F_INDIRECT }]),
    error: /INDIRECT inside a list/,
  },
  {
    name: "an indirect table length that is not a multiple of 16",
    build: (d, id) => d.addIndirect(id, TABLE, [rd(BUF, 8), rd(BUF, 8)], { tableLen: 24 }),
    error: /length 24 is not a non-zero multiple of 16/,
  },
  {
    name: "an empty indirect table",
    build: (d, id) => d.addIndirect(id, TABLE, [], { tableLen: 0 }),
    error: /length 0 is not a non-zero multiple/,
  },
  {
    name: "an indirect table over maxIndirectDescs",
    build: (d, id) => d.addIndirect(id, TABLE, Array.from({ length: 5 }, () => rd(BUF, 8))),
    error: /5 entries, more than 4/,
  },
  {
    name: "an indirect table outside one region",
    build: (d, id) => d.add(id, [{ gpa: 0x10000 - 16, len: 32, flags: VIRTQ_DESC_F_INDIRECT }]),
    error: /indirect table .* not inside one memory region/,
  },
  {
    name: "an indirect entry outside memory",
    build: (d, id) => d.addIndirect(id, TABLE, [rd(BUF, 8), wr(0x30000, 8)]),
    error: /indirect entry 1: buffer .* outside guest memory/,
  },
];

for (const bad of BAD_CHAINS) {
  Deno.test(`packed: rejects ${bad.name}; the chain is consumed, returned, and the ring goes on`, () => {
    const s = setup({ size: 8, indirect: bad.indirect ?? true, maxIndirectDescs: 4 });
    complete(s, 0, [wr(BUF, 8), wr(BUF, 8), wr(BUF, 8)], 1); // start away from position 0
    assert.ok(s.drv.getUsed());
    bad.build(s.drv, 5);
    s.drv.add(6, [rd(BUF, 8)]);
    assert.equal(s.dev.pop(s.chain), POP_INVALID);
    assert.match(s.dev.lastError, bad.error);
    assert.equal(s.chain.head, 5);
    assert.equal(s.chain.count, 0);
    assert.equal(s.chain.readableLen + s.chain.writableLen, 0);
    assert.equal(s.dev.broken, null);
    assert.equal(s.dev.pop(s.chain), POP_CHAIN, `the next chain: ${s.dev.lastError}`);
    assert.equal(s.chain.head, 6);
    s.dev.pushUsed(5, 0);
    s.dev.pushUsed(6, 0);
    s.dev.publishUsed();
    assert.deepEqual(s.drv.getUsed(), { id: 5, len: 0, flags: usedFlags(1) });
    assert.equal(s.drv.getUsed()?.id, 6);
    assert.equal(s.dev.ringBase, driverBase(s.drv));
  });
}

// ---------------------------------------------------------------------------
// Broken rings: no buffer id to return the chain by, or ids the driver lost track of

const BROKEN: { name: string; build(s: Setup): void; error: RegExp }[] = [
  {
    name: "a chain longer than the ring",
    build: (s) => s.drv.add(1, Array.from({ length: 4 }, () => ({ ...rd(BUF, 8), flags: 1 }))),
    error: /chain at descriptor 0 is longer than the ring \(4\)/,
  },
  {
    name: "a chain that runs into a descriptor never made available",
    build: (s) => {
      s.drv.add(1, [rd(BUF, 8), rd(BUF, 8)]);
      s.drv.writeDescAt(s.drv.ring.descGpa + PACKED_DESC_SIZE, BUF, 8, 1, 0); // flags 0: not available
    },
    error: /runs into descriptor 1/,
  },
  {
    name: "a buffer id >= the queue size",
    build: (s) => s.drv.add(4, [rd(BUF, 8)]),
    error: /buffer id 4, beyond queue size 4/,
  },
  {
    name: "a buffer id already in flight",
    build: (s) => {
      s.drv.add(2, [rd(BUF, 8)]);
      assert.equal(s.dev.pop(s.chain), POP_CHAIN);
      s.drv.sgs.delete(2);
      s.drv.add(2, [rd(BUF, 8)]);
    },
    error: /buffer id 2, which is already in flight/,
  },
];

for (const b of BROKEN) {
  Deno.test(`packed: ${b.name} breaks the ring`, () => {
    const s = setup({ size: 4 });
    b.build(s);
    assert.equal(s.dev.pop(s.chain), POP_EMPTY);
    assert.match(s.dev.broken ?? "", b.error);
    assert.equal(s.dev.lastError, s.dev.broken);
    s.drv.add(3, [rd(BUF, 8)]);
    assert.equal(s.dev.pop(s.chain), POP_EMPTY, "yields nothing any more");
    assert.equal(s.dev.popOrArm(s.chain), POP_EMPTY, "does not spin");
    assert.equal(s.dev.enableNotification(), false);
    assert.equal(s.dev.availableCount(), 0);
    assert.equal(s.dev.isEmpty(), true);
  });
}

// ---------------------------------------------------------------------------
// Event suppression

Deno.test("packed: available buffer notifications: DISABLE while draining, ENABLE or DESC at the next position across a wrap", () => {
  for (const eventIdx of [false, true]) {
    const s = setup({ size: 4, eventIdx });
    s.dev.disableNotification();
    assert.deepEqual(s.drv.deviceEvent(), { offWrap: 0, flags: RING_EVENT_FLAGS_DISABLE });
    assert.equal(s.dev.enableNotification(), false, "empty ring");
    const armed = eventIdx ? RING_EVENT_FLAGS_DESC : RING_EVENT_FLAGS_ENABLE;
    assert.deepEqual(s.drv.deviceEvent(), { offWrap: eventIdx ? offWrap(0, 1) : 0, flags: armed });
    // Consume positions 0-2, then a chain over positions 3 and 0: the avail wrap counter flips.
    complete(s, 0, [rd(BUF, 8), rd(BUF, 8), rd(BUF, 8)], 0);
    assert.ok(s.drv.getUsed());
    s.dev.disableNotification();
    assert.equal(s.drv.deviceEvent().flags, RING_EVENT_FLAGS_DISABLE);
    complete(s, 1, [rd(BUF, 8), rd(BUF, 8)], 0);
    assert.equal(s.dev.enableNotification(), false);
    assert.deepEqual(s.drv.deviceEvent(), { offWrap: eventIdx ? offWrap(1, 0) : 0, flags: armed });
  }
});

for (const eventIdx of [false, true]) {
  Deno.test(`enable notification, then re-check: a packed buffer made available during the re-arm is reported (EVENT_IDX ${eventIdx})`, () => {
    let addDuringRearm = true;
    const s: Setup = setup({
      size: 4,
      eventIdx,
      onDirty: (gpa) => {
        // Right after the device event flags were stored (the re-arm), the driver, which
        // saw notifications still off, publishes a buffer and does not kick.
        if (addDuringRearm && gpa === s.drv.ring.deviceEventGpa + PACKED_EVENT_FLAGS) {
          if (s.drv.deviceEvent().flags !== RING_EVENT_FLAGS_DISABLE) {
            addDuringRearm = false;
            s.drv.add(2, [wr(BUF, 8)]);
          }
        }
      },
    });
    assert.equal(s.dev.enableNotification(), true, "the re-check sees the buffer");
    assert.equal(s.dev.pop(s.chain), POP_CHAIN);
    s.dev.pushUsed(2, 0);
    s.dev.publishUsed();
    assert.ok(s.drv.getUsed());

    // popOrArm: empty -> re-arm (a buffer arrives meanwhile) -> re-check -> the buffer.
    addDuringRearm = true;
    s.dev.disableNotification();
    assert.equal(s.dev.popOrArm(s.chain), POP_CHAIN);
    assert.equal(s.chain.head, 2);
    assert.equal(s.drv.deviceEvent().flags, RING_EVENT_FLAGS_DISABLE, "disabled again to drain");
    assert.equal(s.dev.popOrArm(s.chain), POP_EMPTY, "really empty now: armed");
    assert.notEqual(s.drv.deviceEvent().flags, RING_EVENT_FLAGS_DISABLE);
  });
}

Deno.test("packed: used buffer notifications follow the driver's DISABLE / ENABLE / DESC, across a wrap", () => {
  const s = setup({ size: 4, eventIdx: true });
  let id = 0;
  const one = (descs: number) => {
    complete(s, id, Array.from({ length: descs }, () => wr(BUF, 8)), 8);
    assert.ok(s.drv.getUsed());
    id = (id + 1) % 4;
    return s.dev.needsNotification();
  };
  s.drv.setDriverEvent(RING_EVENT_FLAGS_DISABLE);
  assert.equal(one(1), false, "DISABLE"); // used position 0 -> 1
  assert.equal(s.dev.needsNotification(), false, "nothing new");
  s.drv.setDriverEvent(RING_EVENT_FLAGS_ENABLE);
  assert.equal(one(1), true, "ENABLE"); // 1 -> 2
  assert.equal(s.dev.needsNotification(), false, "ENABLE: once per progress");
  // DESC: an event at position 0 of the next lap (wrap 0): not passed by 2 -> 3 ...
  s.drv.setDriverEvent(RING_EVENT_FLAGS_DESC, offWrap(0, 0));
  assert.equal(one(1), false, "2 -> 3 does not pass (0, wrap 0)");
  // ... passed by a chain over positions 3 and 0 (the used position wraps: 3 -> 1, wrap 0).
  assert.equal(one(2), true, "3 -> 1 across the end passes (0, wrap 0)");
  s.drv.setDriverEvent(RING_EVENT_FLAGS_DESC, offWrap(3, 0));
  assert.equal(one(1), false, "1 -> 2 does not pass (3, wrap 0)");
  assert.equal(one(1), false, "2 -> 3 writes position 2, not 3");
  assert.equal(one(1), true, "3 -> 0 (wrap 1) writes position 3 of the wrap-0 lap");
  // Positions are compared on one lap's scale: an event at (2, wrap 1), passed before the
  // last decision, is not passed again by 3 -> 1 across the end of the ring.
  assert.equal(one(1), false, "0 -> 1: (3, wrap 0) is behind"); // used position 1, wrap 1
  assert.equal(one(1), false, "1 -> 2");
  assert.equal(one(1), false, "2 -> 3"); // decision at 3, wrap 1
  s.drv.setDriverEvent(RING_EVENT_FLAGS_DESC, offWrap(2, 1));
  assert.equal(one(2), false, "3 -> 1 (wrap 0) does not pass (2, wrap 1) again");
});

Deno.test("packed: used notifications: DESC without EVENT_IDX counts as ENABLE; over a ring between decisions notifies", () => {
  const s = setup({ size: 4, eventIdx: false });
  s.drv.setDriverEvent(RING_EVENT_FLAGS_DESC, offWrap(3, 0)); // far away, and not negotiated
  complete(s, 0, [wr(BUF, 8)], 8);
  assert.equal(s.dev.needsNotification(), true);

  // EVENT_IDX: publish more than a ring's worth without deciding; the event index window
  // cannot tell laps apart then, so the device notifies.
  const e = setup({ size: 4, eventIdx: true });
  e.drv.setDriverEvent(RING_EVENT_FLAGS_ENABLE);
  complete(e, 0, [wr(BUF, 8)], 8);
  assert.ok(e.drv.getUsed());
  assert.equal(e.dev.needsNotification(), true); // decision at position 1, wrap 1
  e.drv.setDriverEvent(RING_EVENT_FLAGS_DESC, offWrap(0, 1)); // already passed in this lap
  for (let i = 1; i <= 5; i++) {
    complete(e, i % 4, [wr(BUF, 8)], 8); // 5 positions: 1 -> 2 (wrap 0)
    assert.ok(e.drv.getUsed());
  }
  assert.equal(e.dev.needsNotification(), true, "5 positions > ring of 4 since the decision");
});

Deno.test("packed: NOTIFY_ON_EMPTY notifies when the ring runs dry despite DISABLE", () => {
  const s = setup({ size: 4, notifyOnEmpty: true });
  s.drv.setDriverEvent(RING_EVENT_FLAGS_DISABLE);
  s.drv.add(0, [wr(BUF, 8)]);
  s.drv.add(1, [wr(BUF, 8)]);
  assert.equal(s.dev.pop(s.chain), POP_CHAIN);
  s.dev.pushUsed(0, 8);
  s.dev.publishUsed();
  assert.equal(s.dev.needsNotification(), false, "a buffer is still available");
  assert.equal(s.dev.pop(s.chain), POP_CHAIN);
  s.dev.pushUsed(1, 8);
  s.dev.publishUsed();
  assert.equal(s.dev.needsNotification(), true, "ran dry");
});

Deno.test("packed: every byte the device writes to guest memory is marked dirty, nothing else", () => {
  const s = setup({ size: 5, eventIdx: true, indirect: true });
  const snapshot = () => s.mem.regions.map((r) => r.bytes.slice());
  const check = (what: string, op: () => void) => {
    const before = snapshot();
    s.dirty.length = 0;
    op();
    const marked = (gpa: number) => s.dirty.some(([g, l]) => gpa >= g && gpa < g + l);
    s.mem.regions.forEach((r, i) => {
      for (let off = 0; off < r.size; off++) {
        if (r.bytes[off] !== before[i][off]) {
          assert.ok(marked(r.gpa + off), `${what}: 0x${(r.gpa + off).toString(16)} not marked`);
        }
      }
    });
    const ring = s.drv.ring;
    for (const [g, l] of s.dirty) {
      assert.ok(g >= ring.descGpa && g + l <= ring.end, `${what}: marked outside the ring`);
    }
  };
  for (let round = 0; round < 6; round++) {
    s.drv.add(0, [rd(BUF, 8), wr(BUF + 0x100, 8)]);
    s.drv.addIndirect(1, TABLE, [wr(BUF, 16)]);
    s.drv.add(2, [wr(BUF, 8)]);
    check("pops", () => {
      for (let i = 0; i < 3; i++) assert.equal(s.dev.pop(s.chain), POP_CHAIN);
    });
    check("pushUsed", () => {
      s.dev.pushUsed(1, 16);
      s.dev.pushUsed(2, 0);
      s.dev.pushUsed(0, 8);
    });
    check("publishUsed", () => s.dev.publishUsed());
    check("disableNotification", () => s.dev.disableNotification());
    check("enableNotification", () => s.dev.enableNotification());
    assert.ok(s.dirty.length > 0, "the re-arm wrote off_wrap");
    while (s.drv.getUsed()) { /* drain */ }
  }
});
