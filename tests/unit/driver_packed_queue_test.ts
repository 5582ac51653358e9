/**
 * The testing library's driver side of a packed virtqueue (DriverPackedQueue) against a tiny
 * device written here with packed_layout's helpers (available descriptors read in ring order,
 * chains and indirect tables walked, used descriptors written with usedFlags(wrap) and the
 * used position skipped by the buffer's slot count): round trips, out-of-order completion,
 * many wrap-arounds of rings of 4 and 5 entries, id reuse, batches made available by their
 * first descriptor, event suppression in both directions (with EVENT_IDX across a wrap) and
 * "enable notification, then re-check". Also the packed ring's set-up for the VMM
 * (driver_rings.ts) and the qemu profile's event injection into a packed event queue.
 */

import assert from "node:assert/strict";
import {
  DriverPackedQueue,
  PACKED_RING_START_BASE,
} from "../../lib/testing/driver_packed_queue.ts";
import type { DriverSegment } from "../../lib/testing/driver_queue.ts";
import { allocDriverRing, baseAvailIdx, baseUsedIdx } from "../../lib/testing/driver_rings.ts";
import { GuestRam } from "../../lib/testing/guest_ram.ts";
import { qemuInjectEvent } from "../../lib/testing/profile_qemu.ts";
import { mulberry32 } from "../../lib/testing/prng.ts";
import { PlainGuestMemory } from "../../lib/virtio/memory.ts";
import {
  availFlags,
  compactPackedRingLayout,
  isAvailable,
  offWrap,
  PACKED_DESC_ADDR,
  PACKED_DESC_FLAGS,
  PACKED_DESC_ID,
  PACKED_DESC_LEN,
  PACKED_DESC_SIZE,
  PACKED_EVENT_FLAGS,
  PACKED_EVENT_OFF_WRAP,
  PACKED_OFFSET_MASK,
  packedNeedEvent,
  packedRingBase,
  parsePackedRingBase,
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  usedFlags,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
} from "../../lib/virtio/packed_layout.ts";

const BUF = 0x4000;
const TABLE = 0x8000;

interface Seg {
  readonly addr: number;
  readonly len: number;
  readonly writable: boolean;
}

/** A buffer the device took: its id, the ring slots it occupied and its segments. */
interface Taken {
  readonly id: number;
  readonly slots: number;
  readonly segs: Seg[];
}

/** The device side, as small as the spec allows. */
class TinyDevice {
  availIdx = 0;
  availWrap = 1;
  usedIdx = 0;
  usedWrap = 1;
  /** used slots written since the last notification decision */
  #usedSince = 0;
  readonly #v: DataView;

  constructor(
    readonly mem: PlainGuestMemory,
    readonly size: number,
    readonly l: ReturnType<typeof compactPackedRingLayout>,
  ) {
    this.#v = mem.regions[0].view;
  }

  #desc(slot: number) {
    const o = this.l.descGpa + slot * PACKED_DESC_SIZE;
    return {
      addr: Number(this.#v.getBigUint64(o + PACKED_DESC_ADDR, true)),
      len: this.#v.getUint32(o + PACKED_DESC_LEN, true),
      id: this.#v.getUint16(o + PACKED_DESC_ID, true),
      flags: this.#v.getUint16(o + PACKED_DESC_FLAGS, true),
    };
  }

  /** The next available buffer (chain or indirect table), or null. */
  take(): Taken | null {
    if (!isAvailable(this.#desc(this.availIdx).flags, this.availWrap)) return null;
    const segs: Seg[] = [];
    let slots = 0;
    for (;;) {
      const d = this.#desc(this.availIdx);
      assert.ok(isAvailable(d.flags, this.availWrap), `slot ${this.availIdx} of a chain available`);
      slots++;
      if (++this.availIdx === this.size) {
        this.availIdx = 0;
        this.availWrap ^= 1;
      }
      if (d.flags & VIRTQ_DESC_F_INDIRECT) {
        for (let o = d.addr; o < d.addr + d.len; o += PACKED_DESC_SIZE) {
          const f = this.#v.getUint16(o + PACKED_DESC_FLAGS, true);
          assert.equal(f & ~VIRTQ_DESC_F_WRITE, 0, "only WRITE in an indirect table");
          segs.push({
            addr: Number(this.#v.getBigUint64(o + PACKED_DESC_ADDR, true)),
            len: this.#v.getUint32(o + PACKED_DESC_LEN, true),
            writable: (f & VIRTQ_DESC_F_WRITE) !== 0,
          });
        }
      } else {
        segs.push({ addr: d.addr, len: d.len, writable: (d.flags & VIRTQ_DESC_F_WRITE) !== 0 });
      }
      if ((d.flags & VIRTQ_DESC_F_NEXT) === 0) return { id: d.id, slots, segs };
    }
  }

  /** Takes every available buffer. */
  takeAll(): Taken[] {
    const out: Taken[] = [];
    for (let t = this.take(); t !== null; t = this.take()) out.push(t);
    return out;
  }

  /** Writes a used descriptor for `t` (flags last) and skips its slots. */
  use(t: Taken, len: number, write = len > 0): void {
    const o = this.l.descGpa + this.usedIdx * PACKED_DESC_SIZE;
    this.#v.setUint16(o + PACKED_DESC_ID, t.id, true);
    this.#v.setUint32(o + PACKED_DESC_LEN, len, true);
    this.#v.setUint16(
      o + PACKED_DESC_FLAGS,
      usedFlags(this.usedWrap) | (write ? VIRTQ_DESC_F_WRITE : 0),
      true,
    );
    this.usedIdx += t.slots;
    this.#usedSince += t.slots;
    if (this.usedIdx >= this.size) {
      this.usedIdx -= this.size;
      this.usedWrap ^= 1;
    }
  }

  /** Writes a used descriptor with any id at the next used slot, advancing by one. */
  useRawId(id: number, len: number): void {
    this.use({ id, slots: 1, segs: [] }, len);
  }

  /** Whether the driver wants a used buffer notification for what was used since last asked. */
  notifyNeeded(): boolean {
    const since = this.#usedSince;
    this.#usedSince = 0;
    const flags = this.#v.getUint16(this.l.driverEventGpa + PACKED_EVENT_FLAGS, true);
    if (flags === RING_EVENT_FLAGS_DISABLE) return false;
    if (flags === RING_EVENT_FLAGS_ENABLE) return true;
    const ev = this.#v.getUint16(this.l.driverEventGpa + PACKED_EVENT_OFF_WRAP, true);
    return packedNeedEvent(ev, this.usedIdx, this.usedIdx - since, this.usedWrap, this.size);
  }

  /** Writes the device event suppression structure. */
  suppress(flags: number, offWrapWord = 0): void {
    this.#v.setUint16(this.l.deviceEventGpa + PACKED_EVENT_OFF_WRAP, offWrapWord, true);
    this.#v.setUint16(this.l.deviceEventGpa + PACKED_EVENT_FLAGS, flags, true);
  }
}

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

Deno.test("packed event queue: a fresh ring's set-up, and the VMM's event injection (qemu) reaped across wraps", () => {
  const ram = new GuestRam({ regions: [{ gpa: 0, size: 1 << 20 }] });
  try {
    const ring = allocDriverRing(ram, (n, a) => ram.alloc(n, a), 2, 4, {
      packed: true,
      eventIdx: true,
    });
    const q = ring.queue;
    assert.ok(q.packed);
    const l = compactPackedRingLayout(4, ring.block);
    assert.deepEqual(ring.setup, {
      index: 2,
      size: 4,
      packed: true,
      descGpa: l.descGpa,
      availGpa: l.driverEventGpa,
      usedGpa: l.deviceEventGpa,
      base: PACKED_RING_START_BASE,
    });
    const bufs = [0, 1, 2].map(() => ram.alloc(8, 8));
    const bufOf = new Map<number, number>();
    const post = (gpa: number) => bufOf.set(q.addBuffer([wr(gpa, 4)]), gpa);
    bufs.forEach(post);
    q.publish();
    let base = ring.setup.base;
    const events: number[] = [];
    for (let i = 0; i < 7; i++) {
      base = qemuInjectEvent(ram, ring.setup, base, 100 + i);
      q.drainUsed((id, len) => {
        assert.equal(len, 4);
        const gpa = bufOf.get(id)!;
        events.push(new DataView(ram.read(gpa, 4).buffer).getUint32(0, true));
        post(gpa); // virtio_vsock_event_fill_one: re-post at once
      });
      q.publish();
    }
    assert.deepEqual(events, [100, 101, 102, 103, 104, 105, 106]);
    // 7 single-slot buffers: both sides at slot 3 of the second lap (wrap 0)
    assert.deepEqual(parsePackedRingBase(base), {
      availIdx: 3,
      availWrap: 0,
      usedIdx: 3,
      usedWrap: 0,
    });
    assert.equal(baseUsedIdx(q, base), q.readUsedIdx());
    assert.equal(baseUsedIdx(q, base), q.lastUsed);
    assert.equal(q.availIdx, offWrap(2, 1), "three buffers posted ahead");
    assert.equal(baseAvailIdx(q, base), offWrap(3, 0));
    // nothing posted: the event is missed, as QEMU reports it
    const empty = allocDriverRing(ram, (n, a) => ram.alloc(n, a), 2, 4, {
      packed: true,
      eventIdx: false,
    });
    assert.throws(
      () => qemuInjectEvent(ram, empty.setup, empty.setup.base, 1),
      /posted no event buffer/,
    );
  } finally {
    ram.close();
  }
});
