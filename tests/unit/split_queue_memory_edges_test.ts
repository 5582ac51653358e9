/**
 * Device-side split virtqueue (lib/virtio/split_queue.ts, desc_chain.ts) at the edges of guest
 * memory, over real memfd mappings (GuestRam): buffers and indirect tables ending exactly at a
 * region's end are accepted, one byte further is rejected (after a gap) or continues in the
 * adjacent region as a second segment. Off by one here reads or writes past a mapping.
 */

import assert from "node:assert/strict";
import { type DriverSegment, DriverSplitQueue } from "../../lib/testing/driver_queue.ts";
import { GuestRam } from "../../lib/testing/guest_ram.ts";
import { DescChain } from "../../lib/virtio/desc_chain.ts";
import {
  compactRingLayout,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  writeDescriptor,
} from "../../lib/virtio/split_layout.ts";
import { SplitQueue } from "../../lib/virtio/split_queue.ts";
import { POP_CHAIN, POP_EMPTY, POP_INVALID } from "../../lib/virtio/virtqueue.ts";
import { rd, segments, wr } from "./split_queue_fixture.ts";

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
