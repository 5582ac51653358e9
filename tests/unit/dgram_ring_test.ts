import assert from "node:assert/strict";
import fc from "fast-check";
import { DatagramRing, INITIAL_CAPACITY } from "../../lib/vsock/dgram_ring.ts";

/** A datagram of `len` bytes whose contents tell it apart from its neighbours. */
function datagram(id: number, len: number): Uint8Array {
  const d = new Uint8Array(len);
  for (let i = 0; i < len; i++) d[i] = (id * 31 + i) & 0xff;
  return d;
}

Deno.test("datagram ring: FIFO, contents intact, lengths and bytes counted", () => {
  const r = new DatagramRing(64 * 1024, 8);
  for (let i = 0; i < 5; i++) assert.ok(r.push(datagram(i, 100 + i)));
  assert.equal(r.length, 5);
  assert.equal(r.bytes, 100 + 101 + 102 + 103 + 104);
  for (let i = 0; i < 5; i++) {
    assert.equal(r.frontLength, 100 + i);
    assert.deepEqual(r.front(), datagram(i, 100 + i));
    r.shift();
  }
  assert.equal(r.length, 0);
  assert.equal(r.bytes, 0);
});

Deno.test("datagram ring: at most maxPackets datagrams", () => {
  const r = new DatagramRing(64 * 1024, 4);
  for (let i = 0; i < 4; i++) assert.ok(r.push(datagram(i, 10)));
  assert.equal(r.push(datagram(9, 10)), false);
  assert.equal(r.length, 4);
  r.shift();
  assert.ok(r.push(datagram(9, 10)));
});

Deno.test("datagram ring: storage starts small, doubles up to maxCapacity, then refuses", () => {
  const r = new DatagramRing(4 * INITIAL_CAPACITY, 64);
  assert.equal(r.capacity, INITIAL_CAPACITY);
  const size = INITIAL_CAPACITY / 2;
  for (let i = 0; i < 8; i++) assert.ok(r.push(datagram(i, size)), `datagram ${i}`);
  assert.equal(r.capacity, 4 * INITIAL_CAPACITY);
  assert.equal(r.push(datagram(8, 1)), false, "full at maxCapacity");
  for (let i = 0; i < 8; i++) {
    assert.deepEqual(r.front(), datagram(i, size));
    r.shift();
  }
});

Deno.test("datagram ring: a datagram larger than maxCapacity is refused, the ring unchanged", () => {
  const r = new DatagramRing(INITIAL_CAPACITY, 8);
  assert.ok(r.push(datagram(1, 10)));
  assert.equal(r.push(datagram(2, INITIAL_CAPACITY + 1)), false);
  assert.equal(r.length, 1);
  assert.deepEqual(r.front(), datagram(1, 10));
});

Deno.test("datagram ring: a datagram that would run past the end starts at the beginning", () => {
  const cap = INITIAL_CAPACITY; // 16 KiB: the ring may not grow
  const r = new DatagramRing(cap, 8);
  assert.ok(r.push(datagram(0, cap / 2)));
  assert.ok(r.push(datagram(1, cap / 4))); // [8192, 12288)
  r.shift(); // frees [0, 8192)
  // 5000 bytes do not fit after the second one (12288 + 5000 > 16384) but do at the start.
  assert.ok(r.push(datagram(2, 5000)));
  assert.equal(r.capacity, cap, "placed without growing");
  // Only the gap between the wrapped one and the oldest is free now: [5000, 8192).
  assert.equal(r.push(datagram(3, 8192 - 5000 + 1)), false);
  assert.ok(r.push(datagram(3, 8192 - 5000)));
  assert.deepEqual(r.front(), datagram(1, cap / 4));
  r.shift();
  // The oldest is the wrapped one: the used part is one run, [0, 8192), again.
  assert.ok(r.push(datagram(4, cap / 2)), "the end of the storage is free again");
  for (const [id, len] of [[2, 5000], [3, 8192 - 5000], [4, cap / 2]]) {
    assert.deepEqual(r.front(), datagram(id, len));
    r.shift();
  }
  assert.equal(r.length, 0);
});

Deno.test("datagram ring: zero-length datagrams are queued and leave room for others", () => {
  const r = new DatagramRing(INITIAL_CAPACITY, 8);
  assert.ok(r.push(new Uint8Array(0)));
  assert.ok(r.push(datagram(1, INITIAL_CAPACITY)), "the whole storage is still free");
  assert.equal(r.frontLength, 0);
  r.shift();
  assert.deepEqual(r.front(), datagram(1, INITIAL_CAPACITY));
});

Deno.test("datagram ring: matches a FIFO model under random pushes and shifts", () => {
  fc.assert(
    fc.property(
      fc.array(
        fc.oneof(
          fc.integer({ min: 0, max: 9000 }).map((len) => ({ push: len })),
          fc.constant({ push: -1 }),
        ),
        { maxLength: 300 },
      ),
      (ops) => {
        const maxCapacity = 32 * 1024;
        const maxPackets = 16;
        const r = new DatagramRing(maxCapacity, maxPackets);
        const model: Uint8Array[] = [];
        let id = 0;
        for (const op of ops) {
          if (op.push < 0) {
            r.shift();
            model.shift();
          } else {
            const d = datagram(id++, op.push);
            const bytes = model.reduce((n, x) => n + x.length, 0);
            const ok = r.push(d);
            if (ok) model.push(d);
            // Never refused while there is plenty of room; never over the bounds.
            if (model.length < maxPackets && bytes + d.length <= maxCapacity / 2) {
              assert.ok(ok, `refused ${d.length} bytes with ${bytes} queued`);
            }
            assert.ok(model.length <= maxPackets);
          }
          assert.equal(r.length, model.length);
          assert.equal(r.bytes, model.reduce((n, x) => n + x.length, 0));
          assert.ok(r.capacity <= maxCapacity);
          if (model.length > 0) assert.deepEqual(r.front(), model[0]);
        }
        while (model.length > 0) {
          assert.deepEqual(r.front(), model.shift());
          r.shift();
        }
      },
    ),
    { numRuns: 300 },
  );
});
