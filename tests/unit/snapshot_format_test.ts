/** The saved-state format: round trip, and every way a bad state is refused. */
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  decodeSnapshot,
  encodeSnapshot,
  SNAPSHOT_VERSION,
  SnapshotError,
  type VsockSnapshot,
} from "../../lib/snapshot/format.ts";
import { crc32 } from "../../lib/snapshot/crc32.ts";
import { PROPERTY_TIME_LIMIT } from "../../lib/testing/timeout.ts";

const sample: VsockSnapshot = {
  guestCid: 42,
  features: "130000001",
  guestListenerPorts: [22, 1234],
  connections: [{ localPort: 1 << 30, peerPort: 1234, hostInitiated: true }],
  transportResetPending: false,
  activated: true,
  savedAt: "2026-11-22T00:00:00.000Z",
};

Deno.test("crc32 matches the IEEE check value", () => {
  assert.equal(crc32(new TextEncoder().encode("123456789")), 0xcbf43926);
});

Deno.test("snapshot round trip", () => {
  assert.deepEqual(decodeSnapshot(encodeSnapshot(sample)), sample);
});

Deno.test("snapshot: truncated, corrupt, newer version and bad bodies are refused with reasons", () => {
  const good = encodeSnapshot(sample);
  const refuse = (bytes: Uint8Array, re: RegExp) =>
    assert.throws(
      () => decodeSnapshot(bytes),
      (e: unknown) => e instanceof SnapshotError && re.test(e.message),
    );
  refuse(good.subarray(0, 10), /truncated/);
  refuse(good.subarray(0, good.length - 1), /length mismatch/);
  const flipped = good.slice();
  flipped[20] ^= 0x40;
  refuse(flipped, /checksum mismatch/);
  const magic = good.slice();
  magic[0] = 0;
  refuse(magic, /bad magic/);
  const newer = good.slice();
  new DataView(newer.buffer).setUint32(8, SNAPSHOT_VERSION + 1, true);
  refuse(newer, /version 2 is not supported/);
  const bad = encodeSnapshot({ ...sample, guestCid: -1 } as VsockSnapshot);
  refuse(bad, /guestCid/);
  const noConns = encodeSnapshot(
    { ...sample, connections: [{ localPort: "x" }] } as unknown as VsockSnapshot,
  );
  refuse(noConns, /connection entry/);
});

Deno.test("snapshot: arbitrary bytes give a state or a SnapshotError, never another exception", () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 300 }), fc.boolean(), (bytes, withHeader) => {
      let input = bytes;
      if (withHeader) {
        // a valid envelope around arbitrary JSON-ish bytes reaches the body checks
        const out = new Uint8Array(16 + bytes.length + 4);
        const v = new DataView(out.buffer);
        out.set(new TextEncoder().encode("VUVSOCK\0"), 0);
        v.setUint32(8, 1, true);
        v.setUint32(12, bytes.length, true);
        out.set(bytes, 16);
        v.setUint32(16 + bytes.length, crc32(out.subarray(0, 16 + bytes.length)), true);
        input = out;
      }
      try {
        decodeSnapshot(input);
      } catch (e) {
        if (!(e instanceof SnapshotError)) throw e;
      }
    }),
    { numRuns: 2000, ...PROPERTY_TIME_LIMIT },
  );
});

/** Replaces `from` with `to` (same length) in the JSON body of an encoded state, keeping the CRC. */
function editBody(state: Uint8Array, from: string, to: string): Uint8Array {
  assert.equal(from.length, to.length, "same length: only the CRC can notice");
  const text = new TextDecoder().decode(state.subarray(16, state.length - 4));
  const at = text.indexOf(from);
  assert.ok(at >= 0, `${from} in the body`);
  const out = state.slice();
  out.set(new TextEncoder().encode(to), 16 + at);
  return out;
}

/** Recomputes the CRC of an encoded state (what a careful forger would do). */
function reseal(state: Uint8Array): Uint8Array {
  const out = state.slice();
  const end = out.length - 4;
  new DataView(out.buffer).setUint32(end, crc32(out.subarray(0, end)), true);
  return out;
}

Deno.test("snapshot CRC: a changed value that is still valid JSON is refused; resealed it is accepted", () => {
  const good = encodeSnapshot(sample);
  // Each edit leaves a well-formed state a decoder without the CRC would load silently.
  const edits: [string, string, (s: VsockSnapshot) => unknown][] = [
    ['"guestCid":42', '"guestCid":43', (s) => s.guestCid],
    ['"peerPort":1234', '"peerPort":1235', (s) => s.connections[0].peerPort],
    ["[22,1234]", "[23,1234]", (s) => s.guestListenerPorts],
    // JSON whitespace keeps the length: a flag flipped to its other value.
    [
      '"transportResetPending":false',
      '"transportResetPending":true ',
      (s) => s.transportResetPending,
    ],
  ];
  const want = [43, 1235, [23, 1234], true];
  edits.forEach(([from, to, field], i) => {
    const forged = editBody(good, from, to);
    assert.throws(() => decodeSnapshot(forged), SnapshotError, `${to} with the old CRC`);
    const resealed = decodeSnapshot(reseal(forged));
    assert.deepEqual(field(resealed), want[i], `${to} resealed`);
    assert.notDeepEqual(resealed, sample);
  });
  // The untouched state decodes, and resealing it changes nothing.
  assert.deepEqual(reseal(good), good);
  assert.deepEqual(decodeSnapshot(good), sample);
});
