/**
 * Device-side split virtqueue (lib/virtio/split_queue.ts, desc_chain.ts) driven by the testing
 * library's DriverSplitQueue over PlainGuestMemory, the well-formed paths: construction (ring
 * sizes, alignment, rings inside one region, VRING_BASE), round trips (copies, used ring, dirty
 * marks), u16 wraparound, chains split at region boundaries, indirect tables, out-of-order
 * completion, the layout and feature-bit helpers, and the host iovecs of a chain.
 */

import assert from "node:assert/strict";
import { DriverSplitQueue } from "../../lib/testing/driver_queue.ts";
import { DescChain } from "../../lib/virtio/desc_chain.ts";
import { PlainGuestMemory, readGuest, writeGuest } from "../../lib/virtio/memory.ts";
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
  vringNeedEvent,
} from "../../lib/virtio/split_layout.ts";
import { SplitQueue } from "../../lib/virtio/split_queue.ts";
import { POP_CHAIN, POP_EMPTY, POP_INVALID, QueueError } from "../../lib/virtio/virtqueue.ts";
import {
  BUF,
  FakeMemory,
  fakeRegion,
  R0,
  R1,
  R2,
  rd,
  RING_BASE,
  segments,
  setup,
  TABLE,
  wr,
} from "./split_queue_fixture.ts";

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
