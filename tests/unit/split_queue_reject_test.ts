/**
 * Device-side split virtqueue (lib/virtio/split_queue.ts, desc_chain.ts): every rejection path.
 * A malformed chain (loops, bad next indices, buffers outside guest memory, readable after
 * writable, bad or nested indirect tables, too many segments, more than 2^32 - 1 bytes) is
 * consumed, returned with used len 0 after bounded work, and the next chain works; a bad head
 * index or an avail.idx too far ahead breaks the ring instead.
 */

import assert from "node:assert/strict";
import { DriverSplitQueue } from "../../lib/testing/driver_queue.ts";
import { DescChain } from "../../lib/virtio/desc_chain.ts";
import {
  compactRingLayout,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
} from "../../lib/virtio/split_layout.ts";
import { SplitQueue } from "../../lib/virtio/split_queue.ts";
import { POP_CHAIN, POP_EMPTY, POP_INVALID } from "../../lib/virtio/virtqueue.ts";
import {
  BUF,
  FakeMemory,
  fakeRegion,
  R2,
  rd,
  segments,
  setup,
  TABLE,
  wr,
} from "./split_queue_fixture.ts";

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
