/**
 * The guest -> host backlog (lib/vsock/byte_queue.ts): a ring that never moves queued bytes,
 * whose reservations and front may come in two parts, and whose capacity can grow.
 */
import assert from "node:assert/strict";
import { ByteQueue } from "../../lib/vsock/byte_queue.ts";

/** Appends `bytes` through reserve/first/second/commit, as the connection does. */
function push(q: ByteQueue, bytes: Uint8Array): void {
  assert.ok(q.reserve(bytes.length), `room for ${bytes.length}`);
  q.first.set(bytes.subarray(0, q.first.length));
  q.second.set(bytes.subarray(q.first.length));
  assert.equal(q.first.length + q.second.length, bytes.length);
  q.commit(bytes.length);
}

/** Takes everything queued, oldest first. */
function drain(q: ByteQueue): number[] {
  const out: number[] = [];
  while (q.length > 0) {
    const f = q.front();
    out.push(...f);
    q.consume(f.length);
  }
  return out;
}

const seq = (from: number, n: number) =>
  Uint8Array.from({ length: n }, (_, i) => (from + i) & 0xff);

Deno.test("byte queue: FIFO order across the end of the ring, reservations in two parts", () => {
  const q = new ByteQueue(10);
  push(q, seq(0, 7));
  q.consume(5); // 2 queued at [5, 7)
  push(q, seq(7, 6)); // [7, 10) then [0, 3)
  assert.equal(q.length, 8);
  const [a, b] = q.peek(8);
  assert.deepEqual([...a, ...b], [...seq(5, 8)]);
  assert.equal(b.length, 3, "the front wraps");
  assert.deepEqual(drain(q), [...seq(5, 8)]);
  assert.equal(q.reserve(11), false, "beyond capacity");
});

Deno.test("byte queue: a nearly full queue never moves its bytes to make room (no compaction)", () => {
  // A 4 MiB window with a host app a little slower than the guest: the queue stays nearly
  // full while 64 KiB goes out and 64 KiB comes in. Compacting a linear buffer copied the
  // whole queue every time its tail reached the end.
  const cap = 4 << 20;
  const chunk = 65536;
  const q = new ByteQueue(cap);
  push(q, new Uint8Array(cap - chunk));
  let expectedTail = cap - chunk;
  for (let i = 0; i < 200; i++) {
    q.consume(chunk);
    assert.ok(q.reserve(chunk));
    // The window starts where the last one ended (mod capacity): nothing was moved.
    assert.equal(q.first.byteOffset, expectedTail % cap, `round ${i}`);
    q.commit(chunk);
    expectedTail = (expectedTail + chunk) % cap;
  }
});

Deno.test("byte queue: grow keeps the bytes in order when they wrap; dropTail and clear", () => {
  const q = new ByteQueue(8);
  push(q, seq(0, 6));
  q.consume(4);
  push(q, seq(6, 5)); // wraps
  q.grow(32);
  assert.equal(q.free, 32 - 7);
  push(q, seq(11, 20));
  q.dropTail(3);
  assert.deepEqual(drain(q), [...seq(4, 24)]);
  push(q, seq(0, 4));
  q.clear();
  assert.equal(q.length, 0);
  assert.equal(q.front().length, 0);
});
