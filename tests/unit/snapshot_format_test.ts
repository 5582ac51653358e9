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
    { numRuns: 2000 },
  );
});
