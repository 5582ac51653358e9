/**
 * Device-side split virtqueue (lib/virtio/split_queue.ts, desc_chain.ts) driven by
 * the testing library's DriverSplitQueue over PlainGuestMemory: round trips, u16
 * wraparound, chains split at region boundaries, every rejection path, and the
 * notification protocol (EVENT_IDX batching, "enable notification, then re-check").
 */

import assert from "node:assert/strict";
import fc from "fast-check";
import { type DriverSegment, DriverSplitQueue } from "../../lib/testing/driver_queue.ts";
import { GuestRam } from "../../lib/testing/guest_ram.ts";
import { DescChain } from "../../lib/virtio/desc_chain.ts";
import {
  findRegion,
  type GuestMemory,
  type MemRegion,
  PlainGuestMemory,
  readGuest,
  writeGuest,
} from "../../lib/virtio/memory.ts";
import {
  describeFeatures,
  featureBits,
  featureWord,
  hasFeature,
  VIRTIO_F_VERSION_1,
  VIRTIO_F_VERSION_1_MASK,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_EVENT_IDX_MASK,
  VIRTIO_RING_F_INDIRECT_DESC,
  withFeature,
  withoutFeature,
} from "../../lib/virtio/features.ts";
import {
  compactRingLayout,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_USED_F_NO_NOTIFY,
  vringNeedEvent,
  writeDescriptor,
} from "../../lib/virtio/split_layout.ts";
import { SplitQueue } from "../../lib/virtio/split_queue.ts";
import { POP_CHAIN, POP_EMPTY, POP_INVALID, QueueError } from "../../lib/virtio/virtqueue.ts";
import { PROPERTY_TIME_LIMIT } from "../../lib/testing/timeout.ts";

// Memory map used by most tests: two adjacent regions, a gap, a third region.
const R0 = { gpa: 0x0, size: 0x10000 };
const R1 = { gpa: 0x10000, size: 0x10000 };
const R2 = { gpa: 0x40000, size: 0x1000 };
const RING_BASE = 0x0;
const BUF = 0x2000; // buffers from here on in R0
const TABLE = 0x8000; // indirect tables from here on in R0

interface Setup {
  mem: PlainGuestMemory;
  dirty: [number, number][];
  drv: DriverSplitQueue;
  dev: SplitQueue;
  chain: DescChain;
}

function setup(
  opts: {
    size?: number;
    eventIdx?: boolean;
    indirect?: boolean;
    notifyOnEmpty?: boolean;
    startIdx?: number;
    maxIndirectDescs?: number;
    capacity?: number;
    /** called after each dirty mark is recorded (e.g. to act as the driver at that moment) */
    onDirty?: (gpa: number, len: number) => void;
  } = {},
): Setup {
  const size = opts.size ?? 8;
  const eventIdx = opts.eventIdx ?? false;
  const dirty: [number, number][] = [];
  const mem = new PlainGuestMemory([R0, R1, R2], (gpa, len) => {
    dirty.push([gpa, len]);
    opts.onDirty?.(gpa, len);
  });
  const l = compactRingLayout(size, RING_BASE, eventIdx);
  const drv = new DriverSplitQueue(mem, size, l.descGpa, l.availGpa, l.usedGpa, {
    eventIdx,
    startIdx: opts.startIdx,
  });
  const dev = new SplitQueue(size, mem, l.descGpa, l.availGpa, l.usedGpa, {
    eventIdx,
    indirect: opts.indirect ?? false,
    notifyOnEmpty: opts.notifyOnEmpty,
    maxIndirectDescs: opts.maxIndirectDescs,
  });
  dev.lastAvail = opts.startIdx ?? 0;
  return { mem, dirty, drv, dev, chain: new DescChain(opts.capacity ?? 64) };
}

const rd = (gpa: number, len: number): DriverSegment => ({ gpa, len, writable: false });
const wr = (gpa: number, len: number): DriverSegment => ({ gpa, len, writable: true });

function segments(c: DescChain): [number, number, number][] {
  const out: [number, number, number][] = [];
  for (let i = 0; i < c.count; i++) out.push([c.region[i], c.offset[i], c.len[i]]);
  return out;
}

/** GuestMemory over caller-built regions (huge sparse regions, non-zero hostAddr). */
class FakeMemory implements GuestMemory {
  constructor(readonly regions: MemRegion[]) {}
  regionOf(gpa: number, len: number): number {
    return findRegion(this.regions, gpa, len);
  }
  markDirty(): void {}
}

function fakeRegion(gpa: number, size: number, backing: number, hostAddr = 0): MemRegion {
  const buf = new ArrayBuffer(backing);
  return { gpa, size, bytes: new Uint8Array(buf), view: new DataView(buf), hostAddr };
}

// ---------------------------------------------------------------------------
// Construction

Deno.test("constructor rejects bad sizes, misaligned rings and rings outside one region", () => {
  const mem = new PlainGuestMemory([R0, R1, R2]);
  const opts = { eventIdx: true, indirect: false };
  const mk = (size: number, d: number, a: number, u: number) => () =>
    new SplitQueue(size, mem, d, a, u, opts);
  for (const size of [0, 3, 100, 65536, 1.5, -8]) {
    assert.throws(mk(size, 0, 0x1000, 0x2000), QueueError, `size ${size}`);
  }
  assert.throws(mk(8, 0x8, 0x1000, 0x2000), /16-byte aligned/);
  assert.throws(mk(8, 0, 0x1001, 0x2000), /2-byte aligned/);
  assert.throws(mk(8, 0, 0x1000, 0x2002), /4-byte aligned/);
  assert.throws(mk(8, 0x30000, 0x1000, 0x2000), /descriptor table .* not inside/);
  // Spanning two adjacent regions is not "inside one region".
  assert.throws(mk(8, 0x10000 - 0x40, 0x1000, 0x2000), /descriptor table/);
  assert.throws(mk(8, 0, 0x41000 - 10, 0x2000), /available ring/);
  assert.throws(mk(8, 0, 0x1000, 0x41000 - 40), /used ring/);
  assert.throws(mk(8, 0, 0x1000, -4), /used ring/);
  assert.throws(mk(8, 0, 0x1000, 2 ** 60), /used ring/);
  // Without EVENT_IDX the rings are 2 bytes shorter: 8 * 8 + 4 = 68 bytes fit exactly.
  new SplitQueue(8, mem, 0, 0x1000, 0x41000 - 68, { eventIdx: false, indirect: false });
  assert.throws(() => new SplitQueue(8, mem, 0, 0x1000, 0x41000 - 68, opts), /used ring/);
  const big = new PlainGuestMemory([{ gpa: 0, size: 0xe0000 }]);
  new SplitQueue(32768, big, 0, 0x80000, 0x90000, { eventIdx: true, indirect: false });
  assert.throws(() => new SplitQueue(32768, big, 0, 0x80000, 0xa0000, opts), /used ring/);
});

Deno.test("the used index is read from guest memory and lastAvail is settable (VRING_BASE)", () => {
  const { mem, drv } = setup({ startIdx: 1234 });
  const l = compactRingLayout(8, RING_BASE, false);
  const dev = new SplitQueue(8, mem, l.descGpa, l.availGpa, l.usedGpa, {
    eventIdx: false,
    indirect: false,
  });
  assert.equal(dev.usedIdx, 1234);
  assert.equal(dev.lastAvail, 0);
  dev.lastAvail = 1234;
  assert.equal(dev.lastAvail, 1234);
  assert.equal(dev.availableCount(), 0);
  drv.addBuffer([rd(BUF, 8)]);
  drv.publish();
  assert.equal(dev.availableCount(), 1);
  dev.lastAvail = 70000; // u16
  assert.equal(dev.lastAvail, 70000 & 0xffff);
});

// ---------------------------------------------------------------------------
// Round trips

Deno.test("round trip: readable and writable segments, copies, used ring, dirty marks", () => {
  const { mem, dirty, drv, dev, chain } = setup();
  const hdr = Uint8Array.from({ length: 44 }, (_, i) => i + 1);
  const payload = Uint8Array.from({ length: 300 }, (_, i) => (i * 7) & 0xff);
  writeGuest(mem, BUF, hdr);
  writeGuest(mem, BUF + 0x100, payload);
  const head = drv.addBuffer([rd(BUF, 44), rd(BUF + 0x100, 300), wr(BUF + 0x400, 200)]);
  assert.equal(head, 0);
  assert.equal(drv.numFree, 5);
  assert.equal(dev.pop(chain), POP_EMPTY, "not visible before publish");
  drv.publish();
  assert.equal(dev.availableCount(), 1);
  assert.equal(dev.pop(chain), POP_CHAIN);
  assert.equal(chain.head, head);
  assert.deepEqual(segments(chain), [[0, BUF, 44], [0, BUF + 0x100, 300], [0, BUF + 0x400, 200]]);
  assert.equal(chain.readableCount, 2);
  assert.equal(chain.writableCount, 1);
  assert.equal(chain.readableLen, 344);
  assert.equal(chain.writableLen, 200);
  assert.equal(chain.descCount, 3);
  assert.equal(chain.gpaOf(1), BUF + 0x100);

  // Header (small copy) and payload skipping the header (subarray path), across segments.
  const h = new Uint8Array(44);
  assert.equal(chain.readInto(h, 0), 44);
  assert.deepEqual(h, hdr);
  const p = new Uint8Array(400);
  assert.equal(chain.readInto(p, 44), 300);
  assert.deepEqual(p.subarray(0, 300), payload);
  const tail = new Uint8Array(10);
  assert.equal(chain.readInto(tail, 40), 10);
  assert.deepEqual(tail, Uint8Array.of(41, 42, 43, 44, ...payload.subarray(0, 6)));
  assert.equal(chain.readInto(tail, 344), 0);

  assert.equal(dirty.length, 0, "pop writes nothing");
  const reply = Uint8Array.from({ length: 150 }, (_, i) => 255 - i);
  assert.equal(chain.writeFrom(reply, 10), 150);
  assert.deepEqual(dirty, [[BUF + 0x400 + 10, 150]]);
  const back = new Uint8Array(150);
  readGuest(mem, BUF + 0x400 + 10, back);
  assert.deepEqual(back, reply);
  assert.equal(chain.writeFrom(reply, 100), 100, "capped by the writable length");
  dirty.length = 0;
  assert.equal(chain.writeFrom(Uint8Array.of(9, 8, 7), 197), 3);
  assert.deepEqual(dirty, [[BUF + 0x400 + 197, 3]]);
  const small = new Uint8Array(3);
  readGuest(mem, BUF + 0x400 + 197, small);
  assert.deepEqual(small, Uint8Array.of(9, 8, 7));
  assert.equal(chain.writeFrom(reply, 200), 0);

  dirty.length = 0;
  assert.equal(drv.popUsed(), null);
  dev.pushUsed(chain.head, 160);
  assert.equal(drv.popUsed(), null, "not visible before publishUsed");
  dev.publishUsed();
  const usedRing = compactRingLayout(8, RING_BASE, false).usedGpa;
  assert.deepEqual(dirty, [[usedRing + 4, 8], [usedRing + 2, 2]]);
  assert.deepEqual(drv.popUsed(), { head, len: 160 });
  assert.equal(drv.numFree, 8);
  assert.equal(drv.unexpectedUsed, 0);
  assert.equal(dev.pop(chain), POP_EMPTY);
  assert.equal(dev.broken, null);
});

Deno.test("u16 indices wrap past 65535 on both rings", () => {
  const { drv, dev, chain } = setup({ size: 4, startIdx: 65530 });
  let expectedLast = 65530;
  for (let round = 0; round < 10; round++) {
    const heads = [
      drv.addBuffer([rd(BUF, 16), wr(BUF + 0x40, 16)]),
      drv.addBuffer([wr(BUF + 0x80, 32)]),
    ];
    drv.publish();
    assert.equal(dev.availableCount(), 2);
    for (const h of heads) {
      assert.equal(dev.pop(chain), POP_CHAIN);
      assert.equal(chain.head, h);
      dev.pushUsed(chain.head, round);
    }
    dev.publishUsed();
    expectedLast = (expectedLast + 2) & 0xffff;
    assert.equal(dev.lastAvail, expectedLast);
    assert.equal(dev.usedIdx, expectedLast);
    assert.equal(drv.readUsedIdx(), expectedLast);
    assert.deepEqual(drv.popUsed(), { head: heads[0], len: round });
    assert.deepEqual(drv.popUsed(), { head: heads[1], len: round });
    assert.equal(drv.popUsed(), null);
  }
  assert.equal(expectedLast, (65530 + 20) & 0xffff);
  assert.equal(dev.broken, null);
  assert.equal(drv.numFree, 4);
});

Deno.test("a buffer crossing into an adjacent region is split; into a gap is rejected", () => {
  const { mem, drv, dev, chain } = setup();
  const data = Uint8Array.from({ length: 32 }, (_, i) => i);
  writeGuest(mem, R1.gpa - 16, data);
  drv.addBuffer([rd(R1.gpa - 16, 32), wr(R1.gpa + R1.size - 8, 8)]);
  drv.publish();
  assert.equal(dev.pop(chain), POP_CHAIN);
  assert.deepEqual(segments(chain), [[0, R0.size - 16, 16], [1, 0, 16], [1, R1.size - 8, 8]]);
  assert.equal(chain.readableCount, 2);
  assert.equal(chain.readableLen, 32);
  const got = new Uint8Array(32);
  assert.equal(chain.readInto(got, 0), 32);
  assert.deepEqual(got, data);

  // R1 ends at 0x20000 and nothing follows: a buffer running past it is out of bounds.
  drv.addBuffer([rd(R1.gpa + R1.size - 8, 16)]);
  drv.publish();
  assert.equal(dev.pop(chain), POP_INVALID);
  assert.match(dev.lastError, /outside guest memory/);
});

Deno.test("indirect tables: round trip, after direct descriptors, WRITE on the pointer ignored", () => {
  const { drv, dev, chain } = setup({ indirect: true });
  const head = drv.addBuffer([rd(BUF, 44), rd(BUF + 0x100, 10), wr(BUF + 0x200, 64)], TABLE);
  assert.equal(drv.numFree, 7, "one descriptor for the whole chain");
  drv.publish();
  assert.equal(dev.pop(chain), POP_CHAIN);
  assert.equal(chain.head, head);
  assert.deepEqual(segments(chain), [[0, BUF, 44], [0, BUF + 0x100, 10], [0, BUF + 0x200, 64]]);
  assert.equal(chain.readableCount, 2);
  assert.equal(chain.descCount, 4);
  dev.pushUsed(head, 0);
  dev.publishUsed();
  assert.deepEqual(drv.popUsed(), { head, len: 0 });
  assert.equal(drv.numFree, 8);

  // Two direct descriptors, then an indirect one (flagged WRITE, which must be ignored).
  drv.writeDescAt(TABLE, BUF + 0x300, 8, VRING_DESC_F_NEXT, 1);
  drv.writeDescAt(TABLE + 16, BUF + 0x400, 8, VRING_DESC_F_WRITE, 0);
  drv.writeDesc(5, BUF, 4, VRING_DESC_F_NEXT, 6);
  drv.writeDesc(6, BUF + 0x10, 0, VRING_DESC_F_NEXT, 7); // zero length: no segment
  drv.writeDesc(7, TABLE, 32, VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE, 0);
  drv.pushAvailRaw(5);
  drv.publish();
  assert.equal(dev.pop(chain), POP_CHAIN, dev.lastError);
  assert.deepEqual(segments(chain), [[0, BUF, 4], [0, BUF + 0x300, 8], [0, BUF + 0x400, 8]]);
  assert.equal(chain.readableCount, 2);
  assert.equal(chain.descCount, 5);
});

Deno.test("out-of-order completion: the driver's free list survives, descriptors are reused", () => {
  const { drv, dev, chain } = setup();
  const a = drv.addBuffer([rd(BUF, 1), rd(BUF + 1, 1), wr(BUF + 2, 1)]);
  const b = drv.addBuffer([wr(BUF + 0x10, 2)]);
  const c = drv.addBuffer([rd(BUF + 0x20, 3), wr(BUF + 0x30, 3)]);
  assert.equal(drv.addBuffer([rd(BUF, 1), rd(BUF, 1), rd(BUF, 1)]), -1, "only 2 free");
  assert.equal(drv.numFree, 2);
  drv.publish();
  const popped: number[] = [];
  while (dev.pop(chain) === POP_CHAIN) popped.push(chain.head);
  assert.deepEqual(popped, [a, b, c]);
  for (const h of [c, a, b]) dev.pushUsed(h, h);
  dev.publishUsed();
  for (const h of [c, a, b]) assert.deepEqual(drv.popUsed(), { head: h, len: h });
  assert.equal(drv.numFree, 8);
  // All 8 descriptors in one chain, then check the device sees it intact.
  const segs = Array.from({ length: 8 }, (_, i) => (i < 5 ? rd : wr)(BUF + 0x100 * i, 10 + i));
  const head = drv.addBuffer(segs);
  assert.notEqual(head, -1);
  assert.equal(drv.numFree, 0);
  drv.publish();
  assert.equal(dev.pop(chain), POP_CHAIN);
  assert.deepEqual(segments(chain), segs.map((s) => [0, s.gpa, s.len]));
  assert.equal(chain.readableCount, 5);
  // A used id the driver never handed out is counted, not trusted.
  dev.pushUsed(head, 0);
  dev.pushUsed(5, 0);
  dev.publishUsed();
  assert.deepEqual(drv.popUsed(), { head, len: 0 });
  assert.deepEqual(drv.popUsed(), { head: 5, len: 0 });
  assert.equal(drv.unexpectedUsed, 1);
  assert.equal(drv.numFree, 8);
});

Deno.test("layout helpers and feature bits", () => {
  assert.deepEqual(compactRingLayout(256, 0x1000), {
    descGpa: 0x1000,
    availGpa: 0x2000,
    usedGpa: 0x2000 + 520,
    end: 0x2000 + 520 + 2054,
  });
  assert.equal(compactRingLayout(1, 0, false).usedGpa, 16 + 8);
  assert.throws(() => compactRingLayout(3, 0));
  assert.throws(() => compactRingLayout(4, 8));
  // vring_need_event: notify iff event lies in [old, new), modulo 2^16.
  assert.equal(vringNeedEvent(5, 6, 5), true);
  assert.equal(vringNeedEvent(5, 5, 4), false);
  assert.equal(vringNeedEvent(4, 6, 5), false);
  assert.equal(vringNeedEvent(0xffff, 1, 0xfffe), true);
  assert.equal(vringNeedEvent(0, 1, 0xfffe), true);
  assert.equal(vringNeedEvent(1, 1, 0xfffe), false);
  const f = featureWord(VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX);
  assert.equal(f, VIRTIO_F_VERSION_1_MASK | VIRTIO_RING_F_EVENT_IDX_MASK);
  assert.equal(f, (1n << 32n) | (1n << 29n));
  assert.equal(hasFeature(f, VIRTIO_F_VERSION_1), true);
  assert.equal(hasFeature(f, VIRTIO_RING_F_INDIRECT_DESC), false);
  assert.equal(hasFeature(withFeature(f, 28), VIRTIO_RING_F_INDIRECT_DESC), true);
  assert.equal(withoutFeature(f, VIRTIO_F_VERSION_1), VIRTIO_RING_F_EVENT_IDX_MASK);
  assert.deepEqual(featureBits(f | (1n << 63n)), [29, 32, 63]);
  assert.equal(
    describeFeatures(f | 1n, new Map([[0, "VIRTIO_VSOCK_F_STREAM"]])),
    "VIRTIO_VSOCK_F_STREAM | VIRTIO_RING_F_EVENT_IDX | VIRTIO_F_VERSION_1",
  );
  assert.throws(() => hasFeature(f, 64), RangeError);
});

// ---------------------------------------------------------------------------
// Rejections

interface BadChain {
  name: string;
  error: RegExp;
  indirect?: boolean;
  maxIndirectDescs?: number;
  capacity?: number;
  /** writes descriptors and returns the head to put in the avail ring */
  build(drv: DriverSplitQueue): number;
}

const BAD_CHAINS: BadChain[] = [
  {
    name: "loop in the descriptor table",
    error: /longer than the queue size/,
    build(d) {
      d.writeDesc(2, BUF, 8, VRING_DESC_F_NEXT, 3);
      d.writeDesc(3, BUF, 8, VRING_DESC_F_NEXT, 2);
      return 2;
    },
  },
  {
    name: "self loop",
    error: /longer than the queue size/,
    build(d) {
      d.writeDesc(4, BUF, 8, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 4);
      return 4;
    },
  },
  {
    name: "next index beyond the queue size",
    error: /next 8 is beyond queue size 8/,
    build(d) {
      d.writeDesc(1, BUF, 8, VRING_DESC_F_NEXT, 8);
      return 1;
    },
  },
  {
    name: "buffer beyond all memory",
    error: /outside guest memory/,
    build(d) {
      d.writeDesc(0, 0x100000, 8, 0, 0);
      return 0;
    },
  },
  {
    name: "buffer in the gap between regions",
    error: /outside guest memory/,
    build(d) {
      d.writeDesc(0, 0x30000, 1, 0, 0);
      return 0;
    },
  },
  {
    name: "buffer straddling the end of the last region",
    error: /outside guest memory/,
    build(d) {
      d.writeDesc(0, R2.gpa + R2.size - 4, 8, VRING_DESC_F_WRITE, 0);
      return 0;
    },
  },
  {
    name: "address >= 2^53",
    error: /outside guest memory/,
    build(d) {
      d.writeDesc(0, 1n << 53n, 8, 0, 0);
      return 0;
    },
  },
  {
    name: "address 2^64 - 1",
    error: /outside guest memory/,
    build(d) {
      d.writeDesc(0, (1n << 64n) - 1n, 1, 0, 0);
      return 0;
    },
  },
  {
    name: "readable after writable (direct)",
    error: /readable buffer after a device-writable/,
    build(d) {
      d.writeDesc(0, BUF, 8, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1);
      d.writeDesc(1, BUF, 8, 0, 0);
      return 0;
    },
  },
  {
    name: "readable after writable (direct, then inside the indirect table)",
    indirect: true,
    error: /indirect entry 0: device-readable buffer after/,
    build(d) {
      d.writeDescAt(TABLE, BUF, 8, 0, 0);
      d.writeDesc(0, BUF, 8, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1);
      d.writeDesc(1, TABLE, 16, VRING_DESC_F_INDIRECT, 0);
      return 0;
    },
  },
  {
    name: "INDIRECT when not negotiated",
    error: /not negotiated/,
    build(d) {
      d.writeDescAt(TABLE, BUF, 8, 0, 0);
      d.writeDesc(0, TABLE, 16, VRING_DESC_F_INDIRECT, 0);
      return 0;
    },
  },
  {
    name: "INDIRECT together with NEXT",
    indirect: true,
    error: /both VRING_DESC_F_INDIRECT and VRING_DESC_F_NEXT/,
    build(d) {
      d.writeDescAt(TABLE, BUF, 8, 0, 0);
      d.writeDesc(0, TABLE, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1);
      d.writeDesc(1, BUF, 8, 0, 0);
      return 0;
    },
  },
  {
    name: "nested indirect table",
    indirect: true,
    error: /nested/,
    build(d) {
      d.writeDescAt(TABLE + 0x100, BUF, 8, 0, 0);
      d.writeDescAt(TABLE, BUF, 8, VRING_DESC_F_NEXT, 1);
      d.writeDescAt(TABLE + 16, TABLE + 0x100, 16, VRING_DESC_F_INDIRECT, 0);
      d.writeDesc(0, TABLE, 32, VRING_DESC_F_INDIRECT, 0);
      return 0;
    },
  },
  {
    name: "zero-length indirect table",
    indirect: true,
    error: /not a non-zero multiple of 16/,
    build(d) {
      d.writeDesc(0, TABLE, 0, VRING_DESC_F_INDIRECT, 0);
      return 0;
    },
  },
  {
    name: "indirect table length not a multiple of 16",
    indirect: true,
    error: /length 24 is not a non-zero multiple of 16/,
    build(d) {
      d.writeDescAt(TABLE, BUF, 8, 0, 0);
      d.writeDesc(0, TABLE, 24, VRING_DESC_F_INDIRECT, 0);
      return 0;
    },
  },
  {
    name: "indirect table with more entries than allowed",
    indirect: true,
    maxIndirectDescs: 4,
    error: /5 entries, more than 4/,
    build(d) {
      for (let i = 0; i < 5; i++) d.writeDescAt(TABLE + 16 * i, BUF, 8, 0, 0);
      d.writeDesc(0, TABLE, 80, VRING_DESC_F_INDIRECT, 0);
      return 0;
    },
  },
  {
    name: "indirect table outside memory",
    indirect: true,
    error: /indirect table .* not inside one memory region/,
    build(d) {
      d.writeDesc(0, 0x30000, 32, VRING_DESC_F_INDIRECT, 0);
      return 0;
    },
  },
  {
    name: "indirect table address >= 2^53",
    indirect: true,
    error: /indirect table/,
    build(d) {
      d.writeDesc(0, (1n << 64n) - 16n, 32, VRING_DESC_F_INDIRECT, 0);
      return 0;
    },
  },
  {
    name: "loop inside an indirect table",
    indirect: true,
    error: /indirect chain is longer than its table/,
    build(d) {
      d.writeDescAt(TABLE, BUF, 8, VRING_DESC_F_NEXT, 1);
      d.writeDescAt(TABLE + 16, BUF, 8, VRING_DESC_F_NEXT, 0);
      d.writeDesc(0, TABLE, 32, VRING_DESC_F_INDIRECT, 0);
      return 0;
    },
  },
  {
    name: "indirect next beyond the table",
    indirect: true,
    error: /next 2 is beyond the table/,
    build(d) {
      d.writeDescAt(TABLE, BUF, 8, VRING_DESC_F_NEXT, 2);
      d.writeDescAt(TABLE + 16, BUF, 8, 0, 0);
      d.writeDescAt(TABLE + 32, BUF, 8, 0, 0);
      d.writeDesc(0, TABLE, 32, VRING_DESC_F_INDIRECT, 0);
      return 0;
    },
  },
  {
    name: "more segments than the DescChain holds",
    capacity: 2,
    error: /more than 2 segments/,
    build(d) {
      d.writeDesc(0, BUF, 8, VRING_DESC_F_NEXT, 1);
      d.writeDesc(1, BUF, 8, VRING_DESC_F_NEXT, 2);
      d.writeDesc(2, BUF, 8, 0, 0);
      return 0;
    },
  },
];

for (const bad of BAD_CHAINS) {
  Deno.test(`rejects: ${bad.name}; the chain is consumed and the queue goes on`, () => {
    const { drv, dev, chain } = setup({
      indirect: bad.indirect,
      maxIndirectDescs: bad.maxIndirectDescs,
      capacity: bad.capacity,
    });
    const head = bad.build(drv);
    drv.pushAvailRaw(head);
    drv.publish();
    assert.equal(dev.pop(chain), POP_INVALID);
    assert.match(dev.lastError, bad.error);
    assert.equal(chain.head, head);
    assert.equal(chain.count, 0);
    assert.equal(chain.readableLen + chain.writableLen, 0);
    assert.equal(dev.broken, null);
    assert.equal(dev.lastAvail, 1);
    dev.pushUsed(chain.head, 0);
    dev.publishUsed();
    // A good chain after the bad one still works.
    drv.writeDesc(7, BUF, 4, 0, 0);
    drv.pushAvailRaw(7);
    drv.publish();
    assert.equal(dev.pop(chain), POP_CHAIN, dev.lastError);
    assert.deepEqual(segments(chain), [[0, BUF, 4]]);
  });
}

Deno.test("rejects a chain longer than 2^32 - 1 bytes (and accepts exactly that)", () => {
  // A sparse memory: 16 GiB claimed at 4 GiB, never dereferenced by pop.
  const mem = new FakeMemory([fakeRegion(0, 0x1000, 0x1000), fakeRegion(2 ** 32, 2 ** 34, 0)]);
  const l = compactRingLayout(4, 0, false);
  const drv = new DriverSplitQueue(mem, 4, l.descGpa, l.availGpa, l.usedGpa);
  const dev = new SplitQueue(4, mem, l.descGpa, l.availGpa, l.usedGpa, {
    eventIdx: false,
    indirect: false,
  });
  const chain = new DescChain(8);
  drv.addBuffer([rd(2 ** 32, 0xffff_ffff), wr(2 ** 33, 1)]);
  drv.addBuffer([rd(2 ** 32, 0xffff_fffe), wr(2 ** 33, 1)]);
  drv.publish();
  assert.equal(dev.pop(chain), POP_INVALID);
  assert.match(dev.lastError, /longer than 2\^32 - 1 bytes/);
  assert.equal(dev.pop(chain), POP_CHAIN, dev.lastError);
  assert.equal(chain.readableLen, 0xffff_fffe);
  assert.equal(chain.writableLen, 1);
  assert.deepEqual(segments(chain), [[1, 0, 0xffff_fffe], [1, 2 ** 32, 1]]);
});

Deno.test("a head index >= queue size breaks the ring (it cannot be returned)", () => {
  const { drv, dev, chain } = setup();
  drv.addBuffer([rd(BUF, 8)]);
  drv.pushAvailRaw(8);
  drv.addBuffer([rd(BUF, 8)]);
  drv.publish();
  assert.equal(dev.pop(chain), POP_CHAIN);
  assert.equal(dev.pop(chain), POP_EMPTY);
  assert.match(dev.broken ?? "", /head 8, beyond queue size 8/);
  assert.equal(dev.lastAvail, 1, "the bad entry is not consumed");
  assert.equal(dev.pop(chain), POP_EMPTY);
  assert.equal(dev.availableCount(), 0);
  assert.equal(dev.enableNotification(), false);
});

Deno.test("avail.idx more than the queue size ahead breaks the ring instead of looping", () => {
  const { drv, dev, chain } = setup();
  drv.setAvailIdxRaw(9);
  assert.equal(dev.availableCount(), 0);
  assert.match(dev.broken ?? "", /9 entries ahead/);
  assert.equal(dev.pop(chain), POP_EMPTY);

  const s = setup({ startIdx: 65535 });
  s.drv.setAvailIdxRaw(7); // 8 ahead across the wrap: fine
  assert.equal(s.dev.availableCount(), 8);
  s.drv.setAvailIdxRaw(65534); // "behind" = 65535 ahead
  assert.equal(s.dev.pop(s.chain), POP_CHAIN, "shadow still says 8");
  s.dev.lastAvail = 65535;
  assert.equal(s.dev.pop(s.chain), POP_EMPTY);
  assert.match(s.dev.broken ?? "", /65535 entries ahead/);
});

// ---------------------------------------------------------------------------
// Host iovecs

Deno.test("hostIovecs: skip, cap, writable part, high host addresses, out capacity", () => {
  const host = 0x7f12_3456_0000;
  const mem = new FakeMemory([
    fakeRegion(0, 0x10000, 0x10000, host),
    fakeRegion(0x10000, 0x10000, 0x10000, 0x5555_0000_1000),
  ]);
  const l = compactRingLayout(8, 0, false);
  const drv = new DriverSplitQueue(mem, 8, l.descGpa, l.availGpa, l.usedGpa);
  const dev = new SplitQueue(8, mem, l.descGpa, l.availGpa, l.usedGpa, {
    eventIdx: false,
    indirect: false,
  });
  const chain = new DescChain(8);
  drv.addBuffer([rd(0x1000, 44), rd(0x2000, 100), wr(0xfff0, 0x20), wr(0x3000, 50)]);
  drv.publish();
  assert.equal(dev.pop(chain), POP_CHAIN);
  const out = new BigUint64Array(8);
  // Readable part minus the 44-byte header.
  assert.equal(chain.hostIovecs(mem, out, 44, 1 << 20, false), 1);
  assert.deepEqual([...out.subarray(0, 2)], [BigInt(host + 0x2000), 100n]);
  assert.equal(chain.iovBytes, 100);
  // Skip into the middle of a segment, with a cap.
  assert.equal(chain.hostIovecs(mem, out, 40, 50, false), 2);
  assert.deepEqual([...out.subarray(0, 4)], [
    BigInt(host + 0x1000 + 40),
    4n,
    BigInt(host + 0x2000),
    46n,
  ]);
  assert.equal(chain.iovBytes, 50);
  // Writable part: split at the region boundary, then the last buffer.
  assert.equal(chain.hostIovecs(mem, out, 0, 1 << 20, true), 3);
  assert.deepEqual([...out.subarray(0, 6)], [
    BigInt(host + 0xfff0),
    16n,
    0x5555_0000_1000n,
    16n,
    BigInt(host + 0x3000),
    50n,
  ]);
  assert.equal(chain.iovBytes, 82);
  // Out holds two iovecs only.
  const small = new BigUint64Array(4);
  assert.equal(chain.hostIovecs(mem, small, 8, 1 << 20, true), 2);
  assert.deepEqual([...small], [BigInt(host + 0xfff8), 8n, 0x5555_0000_1000n, 16n]);
  assert.equal(chain.iovBytes, 24);
  // Skipping everything yields nothing.
  assert.equal(chain.hostIovecs(mem, out, 144, 1 << 20, false), 0);
  assert.equal(chain.iovBytes, 0);
});

Deno.test("markWritten marks exactly the written writable bytes dirty", () => {
  const { dirty, drv, dev, chain } = setup();
  drv.addBuffer([rd(BUF, 10), wr(R1.gpa - 8, 16), wr(BUF + 0x100, 100)]);
  drv.publish();
  assert.equal(dev.pop(chain), POP_CHAIN);
  chain.markWritten(4, 30);
  assert.deepEqual(dirty, [[R1.gpa - 4, 4], [R1.gpa, 8], [BUF + 0x100, 18]]);
});

// ---------------------------------------------------------------------------
// Notifications

Deno.test("used notifications without EVENT_IDX follow VRING_AVAIL_F_NO_INTERRUPT", () => {
  const { drv, dev, chain } = setup();
  assert.equal(dev.needsNotification(), false, "nothing published yet");
  for (let i = 0; i < 4; i++) drv.addBuffer([wr(BUF + 0x100 * i, 64)]);
  drv.publish();
  dev.pop(chain);
  dev.pushUsed(chain.head, 1);
  dev.publishUsed();
  assert.equal(dev.needsNotification(), true);
  assert.equal(dev.needsNotification(), false, "already decided for this batch");
  drv.disableCallbacks();
  dev.pop(chain);
  dev.pushUsed(chain.head, 1);
  dev.publishUsed();
  assert.equal(dev.needsNotification(), false);
  assert.equal(drv.enableCallbacks(), true, "two used elements pending");
  dev.pop(chain);
  dev.pushUsed(chain.head, 1);
  dev.publishUsed();
  assert.equal(dev.needsNotification(), true);
});

Deno.test("EVENT_IDX used notifications: first always, used_event window, batches of several", () => {
  const { drv, dev, chain } = setup({ eventIdx: true });
  for (let i = 0; i < 8; i++) drv.addBuffer([wr(BUF + 0x100 * i, 64)]);
  drv.publish();
  assert.equal(drv.enableCallbacks(), false); // used_event = 0
  const complete = (n: number) => {
    for (let i = 0; i < n; i++) {
      assert.equal(dev.pop(chain), POP_CHAIN);
      dev.pushUsed(chain.head, 0);
    }
    dev.publishUsed();
  };
  complete(1);
  assert.equal(dev.needsNotification(), true, "first decision");
  complete(1); // used_event still 0: the driver was told about entry 0 and has not reaped
  assert.equal(dev.needsNotification(), false);
  assert.notEqual(drv.popUsed(), null);
  assert.notEqual(drv.popUsed(), null); // used_event = 2
  // One decision for a batch of two: used_event (2) is the batch's first entry. Comparing
  // with only the last step (old = new - 1) would miss it.
  complete(2);
  assert.equal(dev.needsNotification(), true);
  assert.equal(dev.needsNotification(), false, "nothing new");
  // Driver suppresses: used_event moved far away.
  drv.disableCallbacks();
  complete(2);
  assert.equal(dev.needsNotification(), false);
  // Driver re-arms at its next unreaped entry (2), which was published long ago: enable
  // reports pending work (so the driver polls) and the device need not notify again.
  assert.equal(drv.enableCallbacks(), true);
  while (drv.popUsed() !== null) { /* reap */ }
  assert.equal(drv.enableCallbacks(), false); // used_event = 6
  complete(2);
  assert.equal(dev.needsNotification(), true);
});

Deno.test("EVENT_IDX: more than 2^16 entries between decisions still notify", () => {
  const { drv, dev } = setup({ size: 4, eventIdx: true });
  dev.pushUsed(0, 0);
  dev.publishUsed();
  assert.equal(dev.needsNotification(), true);
  drv.setUsedEventRaw(0x1234);
  // 65536 more entries: new idx == old idx mod 2^16, so vring_need_event alone says no.
  for (let i = 0; i < 0x4000; i++) {
    for (let k = 0; k < 4; k++) dev.pushUsed(k, 0);
    dev.publishUsed();
  }
  assert.equal(dev.usedIdx, 1);
  assert.equal(dev.needsNotification(), true);
  // Back to normal afterwards.
  dev.pushUsed(0, 0);
  dev.publishUsed();
  assert.equal(dev.needsNotification(), false);
});

Deno.test("NOTIFY_ON_EMPTY: notify when the ring runs dry despite NO_INTERRUPT", () => {
  for (const notifyOnEmpty of [false, true]) {
    const { drv, dev, chain } = setup({ notifyOnEmpty });
    drv.disableCallbacks();
    drv.addBuffer([wr(BUF, 8)]);
    drv.addBuffer([wr(BUF + 8, 8)]);
    drv.publish();
    assert.equal(dev.pop(chain), POP_CHAIN);
    dev.pushUsed(chain.head, 0);
    dev.publishUsed();
    assert.equal(dev.needsNotification(), false, "buffers remain");
    assert.equal(dev.isEmpty(), false);
    assert.equal(dev.pop(chain), POP_CHAIN);
    assert.equal(dev.isEmpty(), true);
    assert.equal(dev.inFlight, 1);
    dev.pushUsed(chain.head, 0);
    dev.publishUsed();
    assert.equal(dev.inFlight, 0);
    assert.equal(dev.needsNotification(), notifyOnEmpty);
  }
});

Deno.test("available notifications without EVENT_IDX: VRING_USED_F_NO_NOTIFY", () => {
  const { drv, dev, dirty } = setup();
  drv.addBuffer([wr(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), true);
  dev.disableNotification();
  assert.equal(drv.readUsedFlags() & VRING_USED_F_NO_NOTIFY, VRING_USED_F_NO_NOTIFY);
  assert.equal(dirty.length, 1);
  drv.addBuffer([wr(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), false);
  assert.equal(dev.availableCount(), 2);
  assert.equal(dev.enableNotification(), false, "nothing new since the device looked");
  assert.equal(drv.readUsedFlags() & VRING_USED_F_NO_NOTIFY, 0);
  drv.addBuffer([wr(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), true);
});

Deno.test("available notifications with EVENT_IDX: avail_event = avail idx seen", () => {
  const { drv, dev, chain } = setup({ eventIdx: true });
  dev.disableNotification(); // a no-op with EVENT_IDX
  assert.equal(drv.readUsedFlags(), 0);
  assert.equal(dev.enableNotification(), false);
  assert.equal(drv.readAvailEvent(), 0);
  drv.addBuffer([wr(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), true);
  drv.addBuffer([wr(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), false, "the device was already kicked past avail_event");
  while (dev.pop(chain) === POP_CHAIN) { /* drain */ }
  assert.equal(dev.enableNotification(), false);
  assert.equal(drv.readAvailEvent(), 2);
  drv.addBuffer([wr(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), true);
});

// Enable notification, then re-check: the device found too few buffers, the driver added more
// without kicking (avail_event was stale), then the device re-armed and went to sleep: a stall
// forever.
Deno.test("enable notification, then re-check: enableNotification reports buffers added before the re-arm (EVENT_IDX)", () => {
  const { drv, dev } = setup({ eventIdx: true });
  assert.equal(dev.enableNotification(), false);
  for (let i = 0; i < 3; i++) drv.addBuffer([wr(BUF + 0x100 * i, 64)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), true);
  // The device needs 5 buffers for its packet and sees only 3 ...
  assert.equal(dev.availableCount(), 3);
  // ... the driver adds 2 more; avail_event (0) is behind, so it does not kick ...
  drv.addBuffer([wr(BUF + 0x300, 64)]);
  drv.addBuffer([wr(BUF + 0x400, 64)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), false);
  // ... the device re-arms. No kick will ever come for these 2 buffers, so
  // enableNotification must report them.
  assert.equal(dev.enableNotification(), true);
  assert.equal(dev.availableCount(), 5);
  // Nothing new now: the device may sleep, and the next buffer does kick.
  assert.equal(dev.enableNotification(), false);
  assert.equal(drv.readAvailEvent(), 5);
  drv.addBuffer([wr(BUF + 0x500, 64)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), true);
});

Deno.test("enable notification, then re-check: drain, buffers arrive, re-arm reports them (without EVENT_IDX)", () => {
  const { drv, dev, chain } = setup();
  drv.addBuffer([rd(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), true);
  dev.disableNotification();
  assert.equal(dev.pop(chain), POP_CHAIN);
  assert.equal(dev.pop(chain), POP_EMPTY);
  // Between the device's empty check and its re-arm:
  drv.addBuffer([rd(BUF, 8)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), false);
  assert.equal(dev.enableNotification(), true);
  assert.equal(dev.pop(chain), POP_CHAIN);
  assert.equal(dev.pop(chain), POP_EMPTY);
  assert.equal(dev.enableNotification(), false);
});

// ---------------------------------------------------------------------------
// Property: arbitrary descriptor tables and avail rings

/**
 * Reference walk written independently of SplitQueue (BigInt addresses, explicit
 * per-byte-range membership): the chain's buffers as (gpa, len, writable), or null.
 */
function referenceWalk(
  mem: GuestMemory,
  descGpa: number,
  size: number,
  head: number,
  indirectOk: boolean,
): [number, number, boolean][] | null {
  const out: [number, number, boolean][] = [];
  let sawWritable = false;
  let total = 0n;
  const readDesc = (gpa: number) => {
    const b = new Uint8Array(16);
    if (!readGuest(mem, gpa, b)) return null;
    const v = new DataView(b.buffer);
    return {
      addr: v.getBigUint64(0, true),
      len: v.getUint32(8, true),
      flags: v.getUint16(12, true),
      next: v.getUint16(14, true),
    };
  };
  const inMemory = (addr: bigint, len: number) => {
    if (addr + BigInt(len) > BigInt(Number.MAX_SAFE_INTEGER)) return false;
    for (let g = Number(addr), left = len; left > 0;) {
      const r = mem.regions.find((r) => g >= r.gpa && g < r.gpa + r.size);
      if (r === undefined) return false;
      const n = Math.min(left, r.gpa + r.size - g);
      g += n;
      left -= n;
    }
    return true;
  };
  const take = (addr: bigint, len: number, writable: boolean): boolean => {
    if (!writable && sawWritable) return false;
    if (writable) sawWritable = true;
    if (len === 0) return true;
    total += BigInt(len);
    if (total > 0xffff_ffffn || !inMemory(addr, len)) return false;
    out.push([Number(addr), len, writable]);
    return true;
  };
  let idx = head;
  for (let n = 1;; n++) {
    if (n > size) return null;
    const d = readDesc(descGpa + 16 * idx)!;
    if (d.flags & VRING_DESC_F_INDIRECT) {
      if (!indirectOk || (d.flags & VRING_DESC_F_NEXT)) return null;
      if (d.len === 0 || d.len % 16 !== 0 || d.len / 16 > 1024) return null;
      const table = d.addr;
      if (table >= 1n << 53n || mem.regionOf(Number(table), d.len) < 0) return null;
      const entries = d.len / 16;
      let i = 0;
      for (let m = 1;; m++) {
        if (m > entries) return null;
        const e = readDesc(Number(table) + 16 * i)!;
        if (e.flags & VRING_DESC_F_INDIRECT) return null;
        if (!take(e.addr, e.len, (e.flags & VRING_DESC_F_WRITE) !== 0)) return null;
        if (!(e.flags & VRING_DESC_F_NEXT)) return out;
        if (e.next >= entries) return null;
        i = e.next;
      }
    }
    if (!take(d.addr, d.len, (d.flags & VRING_DESC_F_WRITE) !== 0)) return null;
    if (!(d.flags & VRING_DESC_F_NEXT)) return out;
    if (d.next >= size) return null;
    idx = d.next;
  }
}

/** Buffers of a popped chain, merged where contiguous, as (gpa, len, writable). */
function chainBuffers(c: DescChain): [number, number, boolean][] {
  const out: [number, number, boolean][] = [];
  for (let i = 0; i < c.count; i++) out.push([c.gpaOf(i), c.len[i], i >= c.readableCount]);
  return merge(out);
}

function merge(list: [number, number, boolean][]): [number, number, boolean][] {
  const out: [number, number, boolean][] = [];
  for (const [g, l, w] of list) {
    const last = out[out.length - 1];
    if (last !== undefined && last[0] + last[1] === g && last[2] === w) last[1] += l;
    else out.push([g, l, w]);
  }
  return out;
}

Deno.test("property: arbitrary tables and avail rings: pop never throws, stays in memory, terminates, agrees with a reference walk", () => {
  const SIZE = 8;
  const PROP_R0 = { gpa: 0, size: 0x2000 };
  const PROP_R1 = { gpa: 0x2000, size: 0x1000 }; // adjacent
  const PROP_R2 = { gpa: 0x5000, size: 0x800 }; // after a gap
  const TABLE_AREA = 0x1000; // 256 bytes of arbitrary "indirect table" bytes
  const interesting = fc.oneof(
    fc.constantFrom(0, 0x1ff0, 0x1ffc, 0x2000, 0x2ff8, 0x3000, 0x4ffc, 0x5000, 0x57f0, 0x5800),
    fc.integer({ min: 0, max: 0x6000 }),
    fc.constantFrom(TABLE_AREA, TABLE_AREA + 16, TABLE_AREA + 8),
  );
  const addr = fc.oneof(
    { weight: 6, arbitrary: interesting.map(BigInt) },
    { weight: 1, arbitrary: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }) },
    { weight: 1, arbitrary: fc.constantFrom(1n << 53n, (1n << 53n) - 1n, (1n << 64n) - 1n) },
  );
  const len = fc.oneof(
    { weight: 4, arbitrary: fc.integer({ min: 0, max: 0x40 }) },
    { weight: 2, arbitrary: fc.constantFrom(16, 32, 48, 64, 256, 0x1000, 0x2000) },
    { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff_ffff }) },
  );
  const desc = fc.record({
    addr,
    len,
    flags: fc.oneof({ weight: 5, arbitrary: fc.integer({ min: 0, max: 7 }) }, {
      weight: 1,
      arbitrary: fc.integer({ min: 0, max: 0xffff }),
    }),
    next: fc.oneof({ weight: 5, arbitrary: fc.integer({ min: 0, max: SIZE }) }, {
      weight: 1,
      arbitrary: fc.integer({ min: 0, max: 0xffff }),
    }),
  });
  fc.assert(
    fc.property(
      fc.array(desc, { minLength: SIZE, maxLength: SIZE }),
      fc.array(desc, { minLength: 16, maxLength: 16 }),
      fc.uint8Array({ minLength: 0, maxLength: 256 }),
      fc.array(
        fc.oneof({ weight: 8, arbitrary: fc.integer({ min: 0, max: SIZE - 1 }) }, {
          weight: 1,
          arbitrary: fc.integer({ min: 0, max: 0xffff }),
        }),
        { minLength: SIZE, maxLength: SIZE },
      ),
      fc.integer({ min: 0, max: 0xffff }),
      fc.integer({ min: 0, max: 0xffff }),
      fc.boolean(),
      fc.boolean(),
      (table, indirectTable, rawBytes, heads, startIdx, availAdvance, indirect, eventIdx) => {
        let dirtyCalls = 0;
        const mem = new PlainGuestMemory([PROP_R0, PROP_R1, PROP_R2], () => dirtyCalls++);
        const l = compactRingLayout(SIZE, 0, eventIdx);
        const drv = new DriverSplitQueue(mem, SIZE, l.descGpa, l.availGpa, l.usedGpa, {
          eventIdx,
          startIdx,
        });
        table.forEach((d, i) => drv.writeDesc(i, d.addr, d.len, d.flags, d.next));
        indirectTable.forEach((d, i) =>
          drv.writeDescAt(TABLE_AREA + 16 * i, d.addr, d.len, d.flags, d.next)
        );
        writeGuest(mem, TABLE_AREA + 0x100 - rawBytes.length, rawBytes);
        for (const h of heads) drv.pushAvailRaw(h);
        // Mostly a sane avail.idx, sometimes anything.
        const published = availAdvance <= 0xf000
          ? (startIdx + (availAdvance % (SIZE + 1)))
          : availAdvance;
        drv.setAvailIdxRaw(published);
        const dev = new SplitQueue(SIZE, mem, l.descGpa, l.availGpa, l.usedGpa, {
          eventIdx,
          indirect,
        });
        dev.lastAvail = startIdx;
        const before = mem.regions.map((r) => r.bytes.slice());
        // Room for the longest valid chain: 1024 indirect entries, each split once.
        const chain = new DescChain(2 * (SIZE + 1024));
        const ahead = (published - startIdx) & 0xffff;
        let pops = 0;
        for (;;) {
          const res = dev.pop(chain);
          if (res === POP_EMPTY) break;
          pops++;
          assert.ok(pops <= SIZE, "pop terminates: at most avail.idx - lastAvail chains");
          const head = heads[pops - 1];
          const expected = referenceWalk(mem, l.descGpa, SIZE, head, indirect);
          assert.equal(chain.head, head);
          if (res === POP_INVALID) {
            assert.equal(expected, null, `reference accepts what pop rejected: ${dev.lastError}`);
            assert.equal(chain.count, 0);
            continue;
          }
          assert.notEqual(expected, null, "reference rejects what pop accepted");
          // Every segment lies inside its region; readable first; lengths add up.
          let readable = 0;
          let writable = 0;
          for (let i = 0; i < chain.count; i++) {
            const r = mem.regions[chain.region[i]];
            assert.ok(r !== undefined);
            assert.ok(chain.len[i] > 0);
            assert.ok(chain.offset[i] >= 0 && chain.offset[i] + chain.len[i] <= r.size);
            if (i < chain.readableCount) readable += chain.len[i];
            else writable += chain.len[i];
          }
          assert.equal(readable, chain.readableLen);
          assert.equal(writable, chain.writableLen);
          assert.ok(readable + writable <= 0xffff_ffff);
          assert.deepEqual(chainBuffers(chain), merge(expected!));
        }
        if (ahead > SIZE) {
          assert.equal(pops, 0);
          assert.notEqual(dev.broken, null);
        } else if (dev.broken === null) {
          assert.equal(pops, ahead);
        } else {
          assert.match(dev.broken, /beyond queue size/);
          assert.ok(heads[pops] >= SIZE);
        }
        // pop only reads guest memory.
        assert.equal(dirtyCalls, 0);
        mem.regions.forEach((r, i) => assert.deepEqual(r.bytes, before[i]));
      },
    ),
    { numRuns: 3000, ...PROPERTY_TIME_LIMIT },
  );
});

// ---------------------------------------------------------------------------
// Edges of guest memory, over real memfd mappings (GuestRam)

// Two adjacent regions, then two more each after a gap. A descriptor ending exactly at a
// region's end is inside; one byte further is outside (after a gap) or continues in the
// adjacent region (a second segment). Off by one here reads or writes past a mapping.
const EDGE_REGIONS = [
  { gpa: 0x0, size: 0x10000 },
  { gpa: 0x10000, size: 0x4000 },
  { gpa: 0x40000, size: 0x1000 },
  { gpa: 0x80000, size: 0x2000 },
];

interface EdgeSetup {
  ram: GuestRam;
  drv: DriverSplitQueue;
  dev: SplitQueue;
  chain: DescChain;
}

function withEdgeRam(fn: (s: EdgeSetup) => void): void {
  const ram = new GuestRam({ regions: EDGE_REGIONS });
  try {
    const size = 8;
    const l = compactRingLayout(size, 0x1000, true);
    const drv = new DriverSplitQueue(ram, size, l.descGpa, l.availGpa, l.usedGpa, {
      eventIdx: true,
    });
    const dev = new SplitQueue(size, ram, l.descGpa, l.availGpa, l.usedGpa, {
      eventIdx: true,
      indirect: true,
    });
    fn({ ram, drv, dev, chain: new DescChain(16) });
  } finally {
    ram.close();
  }
}

/**
 * Posts `segs` (through an indirect table at `table` if given), pops it, returns it to the
 * driver (used len 0 when invalid, as the device does) and returns what pop said plus the
 * segments. The driver must get the head back whatever happened.
 */
function edgePop(
  s: EdgeSetup,
  segs: DriverSegment[],
  table?: number,
): { res: number; segs: [number, number, number][]; used: number } {
  const head = s.drv.addBuffer(segs, table);
  assert.notEqual(head, -1);
  s.drv.publish();
  const res = s.dev.pop(s.chain);
  assert.notEqual(res, POP_EMPTY);
  assert.equal(s.chain.head, head);
  const got = segments(s.chain);
  const written = res === POP_CHAIN ? s.chain.writableLen : 0;
  s.dev.pushUsed(s.chain.head, written);
  s.dev.publishUsed();
  const u = s.drv.popUsed();
  assert.deepEqual(u, { head, len: written });
  assert.equal(s.dev.broken, null);
  return { res, segs: got, used: u!.len };
}

Deno.test("edges of memory: buffers ending exactly at each region's end are accepted, one byte past is not", () => {
  withEdgeRam((s) => {
    s.ram.regions.forEach((r, i) => {
      const end = r.gpa + r.size;
      const adjacent = s.ram.regionOf(end, 1); // the region right after, or -1
      for (const [what, mk] of [["readable (tx)", rd], ["writable (rx)", wr]] as const) {
        for (const len of [1, 44, 45, 4096]) {
          const at = `${what} ${len} bytes at the end of region ${i}`;
          const inside = edgePop(s, [mk(end - len, len)]);
          assert.equal(inside.res, POP_CHAIN, `${at}: ${s.dev.lastError}`);
          assert.deepEqual(inside.segs, [[i, r.size - len, len]], at);
          const past = edgePop(s, [mk(end - len + 1, len)]);
          if (adjacent < 0) {
            assert.equal(past.res, POP_INVALID, `${at} + 1: accepted`);
            assert.equal(past.used, 0);
          } else {
            // Continues into the adjacent region: two segments, each inside its mapping.
            assert.equal(past.res, POP_CHAIN, `${at} + 1: ${s.dev.lastError}`);
            assert.deepEqual(
              past.segs,
              len === 1 ? [[adjacent, 0, 1]] : [[i, r.size - len + 1, len - 1], [adjacent, 0, 1]],
              `${at} + 1`,
            );
          }
        }
      }
      // A header in one descriptor, the payload ending at the edge (rx: all writable).
      const rx = edgePop(s, [wr(end - 1024 - 44, 44), wr(end - 1024, 1024)]);
      assert.equal(rx.res, POP_CHAIN, s.dev.lastError);
      assert.equal(rx.used, 1068);
    });
  });
});

/**
 * Pops a chain of one INDIRECT descriptor whose table of `entries` (encoded as 16-byte
 * descriptors) starts at `table`; table bytes outside RAM are simply not written (the device
 * must not read them). Returns pop's result; the head goes back with used len 0 if invalid.
 */
function edgePopIndirect(s: EdgeSetup, table: number, entries: DriverSegment[]): number {
  const bytes = new Uint8Array(16 * entries.length);
  const v = new DataView(bytes.buffer);
  entries.forEach((e, k) => {
    const last = k === entries.length - 1;
    const flags = (e.writable ? VRING_DESC_F_WRITE : 0) | (last ? 0 : VRING_DESC_F_NEXT);
    writeDescriptor(v, 16 * k, e.gpa, e.len, flags, last ? 0 : k + 1);
  });
  // Byte by byte through the mappings, independently of regionOf (the code under test).
  for (let k = 0; k < bytes.length; k++) {
    const g = table + k;
    const r = s.ram.regions.find((r) => g >= r.gpa && g < r.gpa + r.size);
    if (r !== undefined) r.bytes[g - r.gpa] = bytes[k];
  }
  const head = 6;
  s.drv.writeDesc(head, table, bytes.length, VRING_DESC_F_INDIRECT, 0);
  s.drv.pushAvailRaw(head);
  s.drv.publish();
  const res = s.dev.pop(s.chain);
  assert.equal(s.chain.head, head);
  s.dev.pushUsed(head, 0);
  s.dev.publishUsed();
  assert.deepEqual(s.drv.popUsed(), { head, len: 0 });
  assert.equal(s.dev.broken, null);
  return res;
}

Deno.test("edges of memory: indirect tables ending exactly at a region's end are accepted, one byte past is not", () => {
  withEdgeRam((s) => {
    s.ram.regions.forEach((r, i) => {
      const end = r.gpa + r.size;
      const data = [rd(0x4000, 44), wr(0x5000, 100)];
      for (const entries of [1, 2]) {
        const table = end - 16 * entries;
        const what = `table of ${entries} at the end of region ${i}`;
        assert.equal(edgePopIndirect(s, table, data.slice(0, entries)), POP_CHAIN, what);
        assert.equal(s.chain.descCount, entries + 1);
        assert.deepEqual(segments(s.chain), [[0, 0x4000, 44], [0, 0x5000, 100]].slice(0, entries));
        // One byte further: a table must lie inside one region, adjacent or not.
        const past = edgePopIndirect(s, table + 1, data.slice(0, entries));
        assert.equal(past, POP_INVALID, `${what}, one byte past`);
        assert.equal(s.chain.count, 0);
      }
    });
    // Entries of a table pointing at the edges follow the buffer rules.
    const last = s.ram.regions[3];
    const end = last.gpa + last.size;
    assert.equal(edgePop(s, [wr(end - 44, 44)], 0x6000).res, POP_CHAIN);
    assert.equal(edgePop(s, [wr(end - 43, 44)], 0x6000).res, POP_INVALID);
    // And the queue still works.
    assert.equal(edgePop(s, [rd(0x4000, 44)]).res, POP_CHAIN);
  });
});

// ---------------------------------------------------------------------------
// popOrArm: pop, or arm notifications and re-check ("enable notification, then re-check")

Deno.test("popOrArm on an empty ring arms notifications and reports POP_EMPTY", () => {
  // EVENT_IDX: avail_event = the avail idx the device has consumed up to.
  {
    const { drv, dev, chain } = setup({ eventIdx: true });
    drv.addBuffer([wr(BUF, 8)]);
    drv.addBuffer([wr(BUF + 8, 8)]);
    drv.publish();
    assert.equal(dev.popOrArm(chain), POP_CHAIN);
    assert.equal(dev.popOrArm(chain), POP_CHAIN);
    assert.equal(drv.readAvailEvent(), 0, "not armed while buffers were there");
    assert.equal(dev.popOrArm(chain), POP_EMPTY);
    assert.equal(drv.readAvailEvent(), 2, "armed at the next avail idx");
    drv.addBuffer([wr(BUF, 8)]);
    drv.publish();
    assert.equal(drv.kickNeeded(), true, "the next buffer comes with a kick");
  }
  // Without EVENT_IDX: VRING_USED_F_NO_NOTIFY cleared.
  {
    const { drv, dev, chain } = setup();
    dev.disableNotification();
    assert.equal(drv.readUsedFlags() & VRING_USED_F_NO_NOTIFY, VRING_USED_F_NO_NOTIFY);
    assert.equal(dev.popOrArm(chain), POP_EMPTY);
    assert.equal(drv.readUsedFlags() & VRING_USED_F_NO_NOTIFY, 0);
    drv.addBuffer([wr(BUF, 8)]);
    drv.publish();
    assert.equal(drv.kickNeeded(), true);
  }
});

Deno.test("popOrArm returns a buffer published while it armed notifications, not POP_EMPTY", () => {
  for (const eventIdx of [true, false]) {
    const l = compactRingLayout(8, RING_BASE, eventIdx);
    // The arm's store: avail_event (EVENT_IDX) or used.flags.
    const armGpa = eventIdx ? l.usedGpa + 4 + 8 * 8 : l.usedGpa;
    let inject = 0;
    let injected = -1;
    const s: Setup = setup({
      eventIdx,
      onDirty(gpa) {
        // The driver, between the device's empty check and its re-read, adds a buffer; it
        // saw notifications off (or avail_event stale), so it will never kick for it.
        if (gpa !== armGpa || inject === 0) return;
        if (!eventIdx && (s.drv.readUsedFlags() & VRING_USED_F_NO_NOTIFY) !== 0) return;
        inject--;
        injected = s.drv.addBuffer([wr(BUF + 0x100, 32)]);
        s.drv.publish();
      },
    });
    const { drv, dev, chain } = s;
    drv.addBuffer([wr(BUF, 8)]);
    drv.publish();
    dev.disableNotification();
    assert.equal(dev.popOrArm(chain), POP_CHAIN);
    inject = 1;
    assert.equal(dev.popOrArm(chain), POP_CHAIN, `EVENT_IDX ${eventIdx}: the re-check`);
    assert.equal(chain.head, injected);
    assert.equal(chain.writableLen, 32);
    assert.equal(inject, 0);
    // Now it is really empty: armed, POP_EMPTY.
    assert.equal(dev.popOrArm(chain), POP_EMPTY);
    if (eventIdx) assert.equal(drv.readAvailEvent(), 2);
    else assert.equal(drv.readUsedFlags() & VRING_USED_F_NO_NOTIFY, 0);
  }
});

Deno.test("popOrArm on a broken ring yields nothing and does not spin", () => {
  const { drv, dev, chain } = setup({ eventIdx: true });
  drv.setAvailIdxRaw(100);
  assert.equal(dev.popOrArm(chain), POP_EMPTY);
  assert.notEqual(dev.broken, null);
  assert.equal(dev.popOrArm(chain), POP_EMPTY);
});

// ---------------------------------------------------------------------------
// Loops, by behaviour: consumed, bounded work, returned with len 0, the next chain works

Deno.test("a chain that loops is consumed after bounded work, returned with used len 0, and the next chain works", () => {
  const loops: [string, (d: DriverSplitQueue) => number][] = [
    ["self loop", (d) => {
      d.writeDesc(4, BUF, 8, VRING_DESC_F_NEXT, 4);
      return 4;
    }],
    ["two-descriptor cycle", (d) => {
      d.writeDesc(2, BUF, 8, VRING_DESC_F_NEXT, 3);
      d.writeDesc(3, BUF + 8, 8, VRING_DESC_F_NEXT, 2);
      return 2;
    }],
    ["cycle through every descriptor", (d) => {
      for (let i = 0; i < 8; i++) d.writeDesc(i, BUF + 16 * i, 16, VRING_DESC_F_NEXT, (i + 1) % 8);
      return 0;
    }],
    ["cycle inside an indirect table", (d) => {
      d.writeDescAt(TABLE, BUF, 8, VRING_DESC_F_NEXT, 1);
      d.writeDescAt(TABLE + 16, BUF + 8, 8, VRING_DESC_F_NEXT, 0);
      d.writeDesc(5, TABLE, 32, VRING_DESC_F_INDIRECT, 0);
      return 5;
    }],
  ];
  for (const [what, build] of loops) {
    // A DescChain with room for far more segments than a loop-free chain can have: only
    // loop detection ends the walk early.
    const { drv, dev } = setup({ indirect: true });
    const chain = new DescChain(4096);
    const head = build(drv);
    drv.pushAvailRaw(head);
    drv.publish();
    assert.equal(dev.pop(chain), POP_INVALID, what);
    assert.equal(chain.head, head);
    assert.equal(chain.count, 0, `${what}: nothing usable`);
    assert.ok(chain.descCount <= 8 + 1, `${what}: walked ${chain.descCount} descriptors`);
    assert.equal(dev.broken, null);
    dev.pushUsed(chain.head, 0);
    dev.publishUsed();
    assert.deepEqual(drv.popUsed(), { head, len: 0 }, what);
    drv.writeDesc(7, BUF + 0x200, 44, 0, 0);
    drv.pushAvailRaw(7);
    drv.publish();
    assert.equal(dev.pop(chain), POP_CHAIN, `${what}: the next chain`);
    assert.deepEqual(segments(chain), [[0, BUF + 0x200, 44]]);
    assert.equal(dev.pop(chain), POP_EMPTY);
  }
});
