/**
 * The back end's region table (lib/vhost_user/guest_memory.ts, MappedGuestMemory) over real
 * memfd mappings: `regionOf` (guest-physical ranges, used for every descriptor) and `vaToGpa`
 * (front-end virtual addresses, used for SET_VRING_ADDR) exactly at the edges of each region,
 * one byte past them, across two adjacent regions, and with len 0, NaN, negative and huge
 * arguments. A range one byte too long is a read or write past the end of a mapping, so each
 * edge is tested on both sides.
 */

import assert from "node:assert/strict";
import { memfdCreate } from "../../ffi/mod.ts";
import { MappedGuestMemory } from "../../lib/vhost_user/guest_memory.ts";

const PAGE = 4096;

/** Two adjacent regions, then two separated by gaps; user addresses unrelated to GPAs. */
const LAYOUT = [
  { guestAddr: 0, size: 4 * PAGE, userAddr: 0x7f00_0000_0000, mmapOffset: 0 },
  { guestAddr: 4 * PAGE, size: 2 * PAGE, userAddr: 0x7e00_0000_0000, mmapOffset: 0 },
  { guestAddr: 0x10_0000, size: PAGE, userAddr: 0x7d00_0000_0000, mmapOffset: PAGE },
  { guestAddr: 2 ** 40, size: 3 * PAGE, userAddr: 0x7f00_0000_4000, mmapOffset: 0 },
] as const;

function withMemory(fn: (mem: MappedGuestMemory) => void): void {
  const mem = new MappedGuestMemory();
  try {
    for (const d of LAYOUT) mem.add(d, memfdCreate("guest-memory-test", d.mmapOffset + d.size));
    fn(mem);
  } finally {
    mem.clear();
  }
}

/** Index (in the sorted table) of the LAYOUT region starting at `gpa`. */
function indexOf(mem: MappedGuestMemory, gpa: number): number {
  return mem.regions.findIndex((r) => r.gpa === gpa);
}

Deno.test("MappedGuestMemory maps every region at its size, sorted by guest address", () => {
  withMemory((mem) => {
    assert.deepEqual(mem.regions.map((r) => [r.gpa, r.size, r.bytes.length]), [
      [0, 4 * PAGE, 4 * PAGE],
      [4 * PAGE, 2 * PAGE, 2 * PAGE],
      [0x10_0000, PAGE, PAGE],
      [2 ** 40, 3 * PAGE, 3 * PAGE],
    ]);
    for (const r of mem.regions) assert.notEqual(r.hostAddr, 0);
  });
});

Deno.test("regionOf: ranges ending exactly at a region's end are inside, one byte more is not", () => {
  withMemory((mem) => {
    for (const d of LAYOUT) {
      const i = indexOf(mem, d.guestAddr);
      const end = d.guestAddr + d.size;
      for (const len of [1, 2, 16, 44, 4096, d.size]) {
        assert.equal(
          mem.regionOf(end - len, len),
          i,
          `[end - ${len}, end) of 0x${end.toString(16)}`,
        );
        // One byte past the end: never this region. An adjacent region does not hold it whole
        // either (regionOf is "entirely inside one region"), unless it is all in that region.
        const next = len === 1 ? mem.regionOf(end, 1) : -1;
        assert.equal(mem.regionOf(end - len + 1, len), next, `[end - ${len} + 1, end + 1)`);
        assert.equal(mem.regionOf(end - len, len + 1), -1, `[end - ${len}, end + 1)`);
      }
      assert.equal(mem.regionOf(d.guestAddr, d.size), i, "the whole region");
      assert.equal(mem.regionOf(d.guestAddr, d.size + 1), -1, "the whole region plus one");
      assert.equal(mem.regionOf(d.guestAddr - 1, 2), -1, "one byte before the start");
    }
    // Adjacent regions: the first byte after region 0 belongs to region 1.
    assert.equal(mem.regionOf(4 * PAGE + 2 * PAGE, 1), -1, "nothing follows region 1");
    assert.equal(mem.regionOf(4 * PAGE, 1), 1);
    assert.equal(mem.regionOf(4 * PAGE - 1, 1), 0);
    // Gaps hold nothing.
    assert.equal(mem.regionOf(6 * PAGE, 1), -1);
    assert.equal(mem.regionOf(0x10_0000 + PAGE, 1), -1);
    assert.equal(mem.regionOf(0x10_0000 - 1, 1), -1);
  });
});

Deno.test("regionOf: len 0, NaN, negative, huge and unsafe arguments", () => {
  withMemory((mem) => {
    // A zero-length range touches no byte: inside a region up to and including its end.
    assert.equal(mem.regionOf(0, 0), 0);
    assert.equal(mem.regionOf(0x10_0000 + PAGE, 0), 2, "len 0 at the very end");
    assert.equal(mem.regionOf(0x10_0000 + PAGE + 1, 0), -1, "len 0 one past the end");
    assert.equal(mem.regionOf(6 * PAGE + 1, 0), -1, "len 0 in a gap");
    for (
      const [gpa, len] of [
        [NaN, 1],
        [0, NaN],
        [NaN, NaN],
        [0, -1],
        [4 * PAGE, -1],
        [4 * PAGE + 1, -2],
        [-1, 1],
        [-1, 2],
        [-PAGE, PAGE + 1],
        [0, Infinity],
        [Infinity, 1],
        [-Infinity, Infinity],
        [0, 2 ** 53],
        [2 ** 40, 2 ** 64],
        [2 ** 64, 1],
        [2 ** 64 - PAGE, PAGE],
        [Number.MAX_SAFE_INTEGER, 1],
        [Number.MAX_VALUE, 0],
      ]
    ) {
      assert.equal(mem.regionOf(gpa, len), -1, `regionOf(${gpa}, ${len})`);
    }
  });
});

Deno.test("vaToGpa: front-end addresses at the edges of each region translate, one past does not", () => {
  withMemory((mem) => {
    for (const d of LAYOUT) {
      const vend = d.userAddr + d.size;
      for (const len of [1, 2, 16, 4096, d.size]) {
        assert.equal(mem.vaToGpa(vend - len, len), d.guestAddr + d.size - len);
        const next = len === 1 ? mem.vaToGpa(vend, 1) : null;
        assert.equal(mem.vaToGpa(vend - len + 1, len), next, `va [end - ${len} + 1, end + 1)`);
        assert.equal(mem.vaToGpa(vend - len, len + 1), null, `va [end - ${len}, end + 1)`);
      }
      assert.equal(mem.vaToGpa(d.userAddr, d.size), d.guestAddr);
      const before = d.userAddr === 0x7f00_0000_4000 ? 4 * PAGE - 1 : null; // region 0's last
      assert.equal(mem.vaToGpa(d.userAddr - 1, 1), before, "one byte before the start");
      assert.equal(mem.vaToGpa(d.userAddr - 1, 2), null, "across the start");
    }
    assert.equal(mem.vaToGpa(0x7f00_0000_4000 + 3 * PAGE, 1), null, "nothing follows region 3");
    assert.equal(mem.vaToGpa(0x7f00_0000_4000 - 1, 1), 4 * PAGE - 1);
    // Region 3 starts 16 KiB above region 0's user address: region 0 (16 KiB) ends right
    // where region 3 begins, so a range across that line is not inside one region.
    assert.equal(mem.vaToGpa(0x7f00_0000_4000 - 8, 16), null);
    assert.equal(mem.vaToGpa(0x7f00_0000_4000, 16), 2 ** 40);
    assert.equal(mem.vaToGpa(0x7f00_0000_4000 - 16, 16), 4 * PAGE - 16);
  });
});

Deno.test("vaToGpa: len 0, NaN, huge arguments", () => {
  withMemory((mem) => {
    assert.equal(mem.vaToGpa(0x7f00_0000_0000, 0), 0);
    for (
      const [va, len] of [
        [NaN, 1],
        [0x7f00_0000_0000, NaN],
        [0x7f00_0000_0000, Infinity],
        [Infinity, 1],
        [-Infinity, 1],
        [0, 1],
        [0x7f00_0000_0000, 2 ** 53],
        [2 ** 64, 1],
        [Number.MAX_VALUE, 1],
      ]
    ) {
      assert.equal(mem.vaToGpa(va, len), null, `vaToGpa(${va}, ${len})`);
    }
  });
});

// A negative length once made `len <= r.size` true and let `va - userAddr <= size - len` reach
// past the end: vaToGpa(userAddr + size + 1, -1) yielded the guest address one byte past the
// region. Both lookups now share one bounds check (rangeInside).
Deno.test({
  name: "vaToGpa: a negative length is rejected like regionOf rejects it",
  fn() {
    withMemory((mem) => {
      const d = LAYOUT[0];
      assert.equal(mem.vaToGpa(d.userAddr + d.size + 1, -1), null);
      assert.equal(mem.vaToGpa(d.userAddr, -1), null);
    });
  },
});
