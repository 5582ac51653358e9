/**
 * The testing library's driver side of a packed virtqueue (DriverPackedQueue) against a tiny
 * device written for these tests from the spec (packed_device.ts: available descriptors read
 * in ring order, chains and indirect tables walked, used descriptors written with
 * usedFlags(wrap) and the used position skipped by the buffer's slot count): round trips,
 * out-of-order completion,
 * many wrap-arounds of rings of 4 and 5 entries, id reuse, batches made available by their
 * first descriptor, event suppression in both directions (with EVENT_IDX across a wrap) and
 * "enable notification, then re-check".
 */

import assert from "node:assert/strict";
import {
  DriverPackedQueue,
  PACKED_RING_START_BASE,
} from "../../lib/testing/driver_packed_queue.ts";
import type { DriverSegment } from "../../lib/testing/driver_queue.ts";
import { mulberry32 } from "../../lib/testing/prng.ts";
import { PlainGuestMemory } from "../../lib/virtio/memory.ts";
import {
  availFlags,
  compactPackedRingLayout,
  isAvailable,
  offWrap,
  PACKED_OFFSET_MASK,
  packedRingBase,
  parsePackedRingBase,
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  usedFlags,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
} from "../../lib/virtio/packed_layout.ts";
import { type Seg, type Taken, TinyDevice } from "./packed_device.ts";

const BUF = 0x4000;
const TABLE = 0x8000;

function rig(size: number, eventIdx = false) {
  const mem = new PlainGuestMemory([{ gpa: 0, size: 0x10000 }]);
  const l = compactPackedRingLayout(size, 0);
  const drv = new DriverPackedQueue(mem, size, l.descGpa, l.driverEventGpa, l.deviceEventGpa, {
    eventIdx,
  });
  return { mem, drv, dev: new TinyDevice(mem, size, l) };
}

const rd = (gpa: number, len: number): DriverSegment => ({ gpa, len, writable: false });
const wr = (gpa: number, len: number): DriverSegment => ({ gpa, len, writable: true });
const asSegs = (s: readonly DriverSegment[]): Seg[] =>
  s.map((x) => ({ addr: x.gpa, len: x.len, writable: x.writable }));

Deno.test("packed driver: single, chained and indirect buffers round-trip with their ids and lengths", () => {
  const { drv, dev } = rig(8);
  const a = [wr(BUF, 100)];
  const b = [rd(BUF + 0x100, 44), rd(BUF + 0x200, 10), wr(BUF + 0x300, 50)];
  const c = [rd(BUF + 0x400, 44), rd(BUF + 0x500, 7), rd(BUF + 0x600, 8), wr(BUF + 0x700, 9)];
  const ia = drv.addBuffer(a);
  const ib = drv.addBuffer(b);
  const ic = drv.addBuffer(c, TABLE);
  assert.deepEqual([ia, ib, ic], [0, 1, 2]);
  assert.equal(drv.numFree, 8 - 1 - 3 - 1);
  assert.deepEqual([drv.descCount(ia), drv.descCount(ib), drv.descCount(ic)], [1, 3, 1]);
  drv.publish();
  const taken = dev.takeAll();
  assert.deepEqual(taken.map((t) => [t.id, t.slots]), [[0, 1], [1, 3], [2, 1]]);
  assert.deepEqual(taken[0].segs, asSegs(a));
  assert.deepEqual(taken[1].segs, asSegs(b));
  assert.deepEqual(taken[2].segs, asSegs(c));
  dev.use(taken[0], 60);
  dev.use(taken[1], 0);
  dev.use(taken[2], 9);
  assert.deepEqual(drv.popUsed(), { head: 0, len: 60 });
  assert.deepEqual(drv.popUsed(), { head: 1, len: 0 });
  assert.deepEqual(drv.popUsed(), { head: 2, len: 9 });
  assert.equal(drv.popUsed(), null);
  assert.equal(drv.numFree, 8);
  assert.equal(drv.unexpectedUsed, 0);
  assert.equal(drv.lastUsed, offWrap(5, 1));
  assert.equal(drv.availIdx, offWrap(5, 1));
});

Deno.test("packed driver: out-of-order completion skips by each id's slot count", () => {
  const { drv, dev } = rig(8);
  const ids = [
    drv.addBuffer([wr(BUF, 10)]),
    drv.addBuffer([rd(BUF, 1), rd(BUF + 16, 2), wr(BUF + 32, 3)]),
    drv.addBuffer([rd(BUF, 1), wr(BUF + 16, 2)]),
  ];
  drv.publish();
  const [a, b, c] = dev.takeAll();
  dev.use(c, 2); // slot 0, skip 2
  dev.use(a, 10); // slot 2, skip 1
  dev.use(b, 3); // slot 3, skip 3
  assert.equal(drv.readUsedIdx(), offWrap(6, 1), "the device's used position, found by walking");
  const got = [];
  for (let u = drv.popUsed(); u !== null; u = drv.popUsed()) got.push([u.head, u.len]);
  assert.deepEqual(got, [[ids[2], 2], [ids[0], 10], [ids[1], 3]]);
  assert.equal(drv.lastUsed, offWrap(6, 1));
  assert.equal(drv.numFree, 8);
  // the ring keeps working from there, across the end
  const d = drv.addBuffer([rd(BUF, 1), rd(BUF, 2), rd(BUF, 3), wr(BUF, 4)]); // slots 6, 7, 0, 1
  drv.publish();
  const [t] = dev.takeAll();
  assert.equal(t.id, d);
  assert.equal(t.slots, 4);
  dev.use(t, 4);
  assert.deepEqual(drv.popUsed(), { head: d, len: 4 });
  assert.equal(drv.lastUsed, offWrap(2, 0), "used wrap counter flipped");
});

for (const size of [4, 5]) {
  Deno.test(`packed driver: ring of ${size} wraps many times with random chains and completion order`, () => {
    const { drv, dev } = rig(size);
    const rnd = mulberry32(size * 7919);
    const int = (lo: number, hi: number) => lo + Math.floor(rnd() * (hi - lo + 1));
    const expect = new Map<number, Seg[]>();
    const inFlight: Taken[] = [];
    let laps = 0;
    let lastWrap = 1;
    for (let step = 0; step < 2000; step++) {
      // add a few buffers while there is room
      for (let k = int(0, 3); k > 0; k--) {
        const n = int(1, size);
        const indirect = rnd() < 0.25;
        if ((indirect ? 1 : n) > drv.numFree) break;
        const segs = Array.from({ length: n }, (_, i) => wr(BUF + 64 * i + step % 64, int(1, 999)));
        // one table per ring slot: unique among the buffers in flight
        const table = TABLE + 256 * (drv.availIdx & PACKED_OFFSET_MASK);
        const id = drv.addBuffer(segs, indirect ? table : undefined);
        assert.ok(id >= 0 && id < size, `id ${id}`);
        assert.ok(!expect.has(id), `id ${id} reused while outstanding`);
        expect.set(id, asSegs(segs));
      }
      if (rnd() < 0.8) drv.publish();
      inFlight.push(...dev.takeAll());
      // complete a random subset in random order
      for (let k = int(0, inFlight.length); k > 0; k--) {
        const t = inFlight.splice(int(0, inFlight.length - 1), 1)[0];
        assert.deepEqual(t.segs, expect.get(t.id), `segments of id ${t.id}`);
        dev.use(t, t.segs[0].len);
      }
      for (let u = drv.popUsed(); u !== null; u = drv.popUsed()) {
        const segs = expect.get(u.head);
        assert.ok(segs !== undefined, `id ${u.head} was outstanding`);
        assert.equal(u.len, segs[0].len);
        expect.delete(u.head);
      }
      const wrap = drv.lastUsed >> 15;
      if (wrap !== lastWrap) laps++;
      lastWrap = wrap;
    }
    assert.ok(laps > 50, `${laps} laps`);
    assert.equal(drv.unexpectedUsed, 0);
    // finish: everything outstanding comes back and every slot is free again
    drv.publish();
    inFlight.push(...dev.takeAll());
    for (const t of inFlight) dev.use(t, 1);
    drv.drainUsed((id) => expect.delete(id));
    assert.equal(expect.size, 0);
    assert.equal(drv.numFree, size);
    assert.equal(drv.readUsedIdx(), drv.availIdx);
  });
}

Deno.test("packed driver: a freed id is the next one handed out (LIFO), and the device sees it reused", () => {
  const { drv, dev } = rig(4);
  const a = drv.addBuffer([wr(BUF, 8)]);
  const b = drv.addBuffer([wr(BUF + 8, 8)]);
  drv.publish();
  const [ta, tb] = dev.takeAll();
  dev.use(tb, 8);
  assert.deepEqual(drv.popUsed(), { head: b, len: 8 });
  const c = drv.addBuffer([wr(BUF + 16, 8)]);
  assert.equal(c, b, "b's id again");
  drv.publish();
  const [tc] = dev.takeAll();
  assert.equal(tc.id, b);
  dev.use(ta, 1);
  dev.use(tc, 2);
  assert.deepEqual(drv.popUsed(), { head: a, len: 1 });
  assert.deepEqual(drv.popUsed(), { head: c, len: 2 });
  assert.equal(drv.addBuffer([wr(BUF, 1)]), c, "most recently freed first");
});

Deno.test("packed driver: a batch becomes available only when publish writes its first flags", () => {
  const { drv, dev } = rig(8);
  drv.addBuffer([rd(BUF, 1), wr(BUF + 16, 1)]);
  drv.addBuffer([wr(BUF + 32, 1)]);
  assert.equal(dev.take(), null, "nothing visible before publish");
  assert.ok(isAvailable(drv.readDescFlags(2), 1), "later buffers of the batch are written");
  assert.ok(!isAvailable(drv.readDescFlags(0), 1), "the first one is withheld");
  drv.publish();
  assert.equal(dev.takeAll().length, 2);
  assert.equal(drv.addBuffer([wr(BUF, 1), wr(BUF, 1), wr(BUF, 1), wr(BUF, 1), wr(BUF, 1)]), 2);
  assert.equal(drv.addBuffer([wr(BUF, 1)]), -1, "no slot left");
  assert.equal(drv.numFree, 0);
});

Deno.test("packed driver: a used descriptor without WRITE reports length 0; an unknown id is counted", () => {
  const { drv, dev } = rig(4);
  drv.addBuffer([wr(BUF, 64)]);
  drv.publish();
  const [t] = dev.takeAll();
  dev.use(t, 64, false);
  assert.deepEqual(drv.popUsed(), { head: t.id, len: 0 });
  dev.useRawId(3, 5);
  assert.deepEqual(drv.popUsed(), { head: 3, len: 5 });
  assert.equal(drv.unexpectedUsed, 1);
});

Deno.test("packed driver: kicks follow device event suppression DISABLE / ENABLE / DESC", () => {
  const { drv, dev } = rig(4, true);
  drv.addBuffer([wr(BUF, 1)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), true, "ENABLE (zeroed area): kick");
  dev.suppress(RING_EVENT_FLAGS_DISABLE);
  drv.addBuffer([wr(BUF, 1)]);
  drv.publish();
  assert.equal(drv.kickNeeded(), false, "DISABLE");
  // avail is now at slot 2, wrap 1. Ask for a kick once slot 0 of the next lap is made available.
  dev.takeAll().forEach((t) => dev.use(t, 1));
  drv.drainUsed(() => {});
  dev.suppress(RING_EVENT_FLAGS_DESC, offWrap(0, 0));
  drv.addBuffer([wr(BUF, 1)]); // slot 2
  drv.publish();
  assert.equal(drv.kickNeeded(), false, "slot 2 is before the event");
  drv.addBuffer([wr(BUF, 1)]); // slot 3
  drv.publish();
  assert.equal(drv.kickNeeded(), false, "slot 3 is before the event");
  dev.takeAll().forEach((t) => dev.use(t, 1));
  drv.drainUsed(() => {});
  drv.addBuffer([wr(BUF, 1), wr(BUF, 1)]); // slots 0 and 1 of the next lap
  drv.publish();
  assert.equal(drv.availIdx, offWrap(2, 0));
  assert.equal(drv.kickNeeded(), true, "slot 0, wrap 0 was made available");
  assert.equal(drv.kickNeeded(), false, "nothing new since the decision");
  // an event in the previous lap (slot 3, wrap 1) crossed in one batch from slot 3
  dev.takeAll().forEach((t) => dev.use(t, 1));
  drv.drainUsed(() => {});
  drv.addBuffer([wr(BUF, 1)]); // slot 2
  drv.publish();
  drv.kickNeeded();
  dev.suppress(RING_EVENT_FLAGS_DESC, offWrap(3, 0));
  drv.addBuffer([wr(BUF, 1), wr(BUF, 1)]); // slots 3 (wrap 0) and 0 (wrap 1)
  drv.publish();
  assert.equal(
    drv.kickNeeded(),
    true,
    "slot 3, wrap 0 was made available in a batch crossing the end",
  );
});

Deno.test("packed driver: driver event suppression: DISABLE while draining, ENABLE or DESC(next used) after", () => {
  for (const eventIdx of [false, true]) {
    const { drv, dev } = rig(5, eventIdx);
    for (let i = 0; i < 4; i++) drv.addBuffer([wr(BUF, 1)]);
    drv.publish();
    const taken = dev.takeAll();
    drv.disableCallbacks();
    assert.equal(drv.readDriverEventFlags(), RING_EVENT_FLAGS_DISABLE);
    dev.use(taken[0], 1);
    assert.equal(dev.notifyNeeded(), false, `${eventIdx}: disabled`);
    assert.equal(drv.enableCallbacks(), true, `${eventIdx}: a used buffer is pending`);
    assert.equal(
      drv.readDriverEventFlags(),
      eventIdx ? RING_EVENT_FLAGS_DESC : RING_EVENT_FLAGS_ENABLE,
    );
    if (eventIdx) assert.equal(drv.readDriverEventOffWrap(), offWrap(0, 1));
    drv.popUsed();
    if (eventIdx) assert.equal(drv.readDriverEventOffWrap(), offWrap(1, 1), "kept at next used");
    dev.use(taken[1], 1);
    assert.equal(dev.notifyNeeded(), true, `${eventIdx}: enabled`);
  }
});

Deno.test("packed driver: EVENT_IDX used notifications across a wrap", () => {
  const { drv, dev } = rig(4, true);
  // move both sides to slot 3, wrap 1
  for (let i = 0; i < 3; i++) drv.addBuffer([wr(BUF, 1)]);
  drv.publish();
  dev.takeAll().forEach((t) => dev.use(t, 1));
  drv.drainUsed(() => {});
  assert.equal(drv.readDriverEventOffWrap(), offWrap(3, 1));
  dev.notifyNeeded();
  drv.addBuffer([wr(BUF, 1), wr(BUF, 1)]); // slots 3 and 0 (the chain crosses the end)
  drv.addBuffer([wr(BUF, 1)]); // slot 1, wrap 0
  drv.publish();
  const [chain, single] = dev.takeAll();
  // The driver wants an event at slot 3 wrap 1: using the chain there crosses it.
  dev.use(chain, 2);
  assert.equal(dev.usedIdx, 1);
  assert.equal(dev.usedWrap, 0);
  assert.equal(dev.notifyNeeded(), true, "event at (3, 1) reached");
  // Now the driver re-arms past the wrap: DESC at (1, 0).
  drv.disableCallbacks();
  assert.deepEqual(drv.popUsed(), { head: chain.id, len: 2 });
  assert.equal(drv.enableCallbacks(), false);
  assert.equal(drv.readDriverEventOffWrap(), offWrap(1, 0));
  assert.equal(dev.notifyNeeded(), false, "nothing used since");
  dev.use(single, 1);
  assert.equal(dev.notifyNeeded(), true, "event at (1, 0) reached");
  // an event armed for a later slot is not reached by an earlier one
  drv.popUsed();
  drv.setDriverEventRaw(offWrap(3, 0), RING_EVENT_FLAGS_DESC);
  drv.addBuffer([wr(BUF, 1)]);
  drv.publish();
  dev.use(dev.takeAll()[0], 1); // slot 2
  assert.equal(dev.notifyNeeded(), false, "slot 2 is before (3, 0)");
});

Deno.test("packed driver: drainUsed re-checks after enabling (enable notification, then re-check)", () => {
  const { drv, dev } = rig(8);
  for (let i = 0; i < 3; i++) drv.addBuffer([wr(BUF, 1)]);
  drv.publish();
  const taken = dev.takeAll();
  dev.use(taken[0], 1);
  const seen: number[] = [];
  const n = drv.drainUsed((id) => {
    seen.push(id);
    // the device uses the others while the driver is still reaping, callbacks off
    if (seen.length === 1) {
      assert.equal(drv.readDriverEventFlags(), RING_EVENT_FLAGS_DISABLE);
      dev.use(taken[1], 1);
      dev.use(taken[2], 1);
      assert.equal(dev.notifyNeeded(), false, "no notification for them");
    }
  });
  assert.equal(n, 3);
  assert.deepEqual(seen, taken.map((t) => t.id));
  assert.equal(drv.readDriverEventFlags(), RING_EVENT_FLAGS_ENABLE);
});

Deno.test("packed driver: drainUsed's re-check catches a buffer used right as callbacks come back on", () => {
  const { drv, dev } = rig(8);
  for (let i = 0; i < 2; i++) drv.addBuffer([wr(BUF, 1)]);
  drv.publish();
  const taken = dev.takeAll();
  dev.use(taken[0], 1);
  drv.disableCallbacks();
  assert.deepEqual(drv.popUsed(), { head: taken[0].id, len: 1 });
  dev.use(taken[1], 1); // raced the re-enable: the device saw DISABLE
  assert.equal(dev.notifyNeeded(), false);
  assert.equal(drv.enableCallbacks(), true, "the re-check finds it");
  assert.equal(drv.drainUsed(() => {}), 1);
});

Deno.test("packed driver: vring bases: a fresh start and the used position a VMM recovers", () => {
  assert.deepEqual(parsePackedRingBase(PACKED_RING_START_BASE), {
    availIdx: 0,
    availWrap: 1,
    usedIdx: 0,
    usedWrap: 1,
  });
  const { drv, dev } = rig(4);
  for (let i = 0; i < 3; i++) drv.addBuffer([wr(BUF, 1), wr(BUF, 1)].slice(0, 1 + (i % 2)));
  drv.publish(); // slots 0, 1-2, 3
  const taken = dev.takeAll();
  dev.use(taken[0], 1);
  dev.use(taken[1], 1);
  assert.equal(
    drv.recoveredBase(),
    packedRingBase({ availIdx: 3, availWrap: 1, usedIdx: 3, usedWrap: 1 }),
  );
  dev.use(taken[2], 1);
  assert.equal(drv.readUsedIdx(), offWrap(0, 0));
  assert.equal(
    drv.recoveredBase(),
    packedRingBase({ availIdx: 0, availWrap: 0, usedIdx: 0, usedWrap: 0 }),
  );
  assert.equal(drv.lastUsed, offWrap(0, 1), "nothing reaped yet");
});

Deno.test("packed driver: raw buffers: flags, ids and AVAIL/USED bits as given", () => {
  const { drv, dev } = rig(4);
  const id = drv.addRawBuffer([
    { addr: BUF, len: 8, flags: VIRTQ_DESC_F_NEXT },
    { addr: 2n ** 60n, len: 9, flags: VIRTQ_DESC_F_WRITE, id: 3 },
  ]);
  assert.equal(id, 0);
  assert.equal(dev.take(), null, "withheld until publish");
  drv.publish();
  const t = dev.take()!;
  assert.equal(t.id, 3, "the id written last");
  assert.deepEqual(t.segs.map((s) => s.len), [8, 9]);
  assert.equal(drv.readDescId(0), 0);
  // a descriptor whose AVAIL/USED bits say "not available" stays invisible
  drv.addRawBuffer([{ addr: BUF, len: 1, flags: 0, availBits: usedFlags(1) }]);
  drv.publish();
  assert.equal(dev.take(), null);
  // rewritten verbatim with the right bits, the device takes it
  drv.writeRawDesc(2, BUF + 8, 3, 7, availFlags(1) | VIRTQ_DESC_F_WRITE);
  assert.deepEqual(dev.take(), {
    id: 7,
    slots: 1,
    segs: [{ addr: BUF + 8, len: 3, writable: true }],
  });
});
