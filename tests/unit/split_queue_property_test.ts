/**
 * Device-side split virtqueue (lib/virtio/split_queue.ts, desc_chain.ts), property test:
 * arbitrary descriptor tables, indirect tables and avail rings over a memory map with adjacent
 * regions and a gap. pop never throws, never writes guest memory, stays inside it, terminates,
 * and agrees with a reference walk written independently of SplitQueue.
 */

import assert from "node:assert/strict";
import fc from "fast-check";
import { DriverSplitQueue } from "../../lib/testing/driver_queue.ts";
import { DescChain } from "../../lib/virtio/desc_chain.ts";
import {
  type GuestMemory,
  PlainGuestMemory,
  readGuest,
  writeGuest,
} from "../../lib/virtio/memory.ts";
import {
  compactRingLayout,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
} from "../../lib/virtio/split_layout.ts";
import { SplitQueue } from "../../lib/virtio/split_queue.ts";
import { POP_EMPTY, POP_INVALID } from "../../lib/virtio/virtqueue.ts";
import { PROPERTY_TIME_LIMIT } from "../../lib/testing/timeout.ts";

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
