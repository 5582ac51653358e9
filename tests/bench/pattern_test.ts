/**
 * The benchmark's integrity checks must catch what a broken back end would do to a stream:
 * a flipped byte, a lost chunk, a repeated chunk, a stream delivered to the wrong connection.
 */
import assert from "node:assert/strict";
import {
  chunkAt,
  makePattern,
  MAX_CHUNK,
  parseStreamHeader,
  PATTERN_PERIOD,
  shiftOf,
  StreamChecker,
  streamHeader,
} from "./pattern.ts";

const p = makePattern();

/** Feeds `total` bytes of stream `shift` to `checker` in `size`-byte chunks. */
function feed(checker: StreamChecker, shift: number, total: number, size: number): void {
  for (let off = 0; off < total; off += size) {
    checker.check(chunkAt(p, shift, off, Math.min(size, total - off)));
  }
}

Deno.test("pattern: periodic, chunks are views that wrap around", () => {
  assert.equal(p.length, PATTERN_PERIOD + MAX_CHUNK);
  assert.equal(p[PATTERN_PERIOD + 5], p[5]);
  const c = chunkAt(p, 0, PATTERN_PERIOD - 10, 20);
  assert.equal(c.length, 20);
  assert.equal(c[10], p[0]);
  assert.throws(() => chunkAt(p, 0, 0, MAX_CHUNK + 1), RangeError);
});

Deno.test("StreamChecker: intact streams pass in full and sample mode, any chunking", () => {
  for (const mode of ["full", "sample"] as const) {
    for (const size of [1, 7, 4096, 65536, MAX_CHUNK]) {
      const c = new StreamChecker(p, mode, shiftOf(3));
      feed(c, shiftOf(3), 3 * MAX_CHUNK + 12345, size);
      assert.equal(c.mismatches, 0, `${mode} ${size}`);
      assert.equal(c.error, null);
      assert.equal(c.offset, 3 * MAX_CHUNK + 12345);
    }
  }
});

Deno.test("StreamChecker: a flipped byte is caught by the full check", () => {
  const c = new StreamChecker(p, "full");
  const chunk = chunkAt(p, 0, 100_000, 65536).slice();
  chunk[40_000] ^= 1;
  feed(c, 0, 100_000, 65536);
  assert.equal(c.check(chunk), false);
  assert.match(c.error!, /byte 140000 /);
});

Deno.test("StreamChecker: a lost or repeated chunk is caught, even by samples", () => {
  for (const mode of ["full", "sample"] as const) {
    const lost = new StreamChecker(p, mode);
    lost.check(chunkAt(p, 0, 0, 65536));
    lost.check(chunkAt(p, 0, 131072, 65536)); // the chunk at 65536 never arrived
    assert.equal(lost.mismatches, 1, `lost chunk, ${mode}`);

    const repeated = new StreamChecker(p, mode);
    repeated.check(chunkAt(p, 0, 0, 4096));
    repeated.check(chunkAt(p, 0, 0, 4096));
    assert.equal(repeated.mismatches, 1, `repeated chunk, ${mode}`);
  }
});

Deno.test("StreamChecker: another connection's stream is caught", () => {
  const c = new StreamChecker(p, "sample", shiftOf(1));
  c.check(chunkAt(p, shiftOf(2), 0, 65536));
  assert.equal(c.mismatches, 1);
  const shifts = new Set(Array.from({ length: 2000 }, (_, i) => shiftOf(i)));
  assert.equal(shifts.size, 2000, "distinct shifts for 2000 connections");
});

Deno.test("stream header round trip; a bad magic is rejected", () => {
  assert.equal(parseStreamHeader(streamHeader(123456)), 123456);
  const h = streamHeader(5);
  h[0] ^= 0xff;
  assert.equal(parseStreamHeader(h), -1);
  assert.equal(parseStreamHeader(new Uint8Array(4)), -1);
});
