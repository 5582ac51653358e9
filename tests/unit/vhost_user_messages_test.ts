/**
 * vhost-user message codec: round trips of every request layout and the replies, size and
 * range validation, and property tests feeding arbitrary bytes to the decoders (a value or a
 * CodecError, never another exception).
 */

import assert from "node:assert/strict";
import fc from "fast-check";
import {
  backendRequestName,
  isKnownRequest,
  requestName,
  VHOST_MEMORY_BASELINE_NREGIONS,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_HDR_SIZE,
  VHOST_USER_MAX_PAYLOAD_SIZE,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_VERSION,
  VhostUserBackendRequest,
  VhostUserProtocolFeature,
  VhostUserProtocolFeatureMask,
  VhostUserRequest,
} from "../../lib/vhost_user/protocol.ts";
import { featureMask } from "../../lib/virtio/features.ts";
import {
  CodecError,
  decodeConfig,
  decodeHeader,
  decodeMemoryTable,
  decodePayload,
  decodeU64,
  decodeVringState,
  encodeConfig,
  encodeConfigReply,
  encodeHeader,
  encodeLog,
  encodeMemoryTable,
  encodePayload,
  encodeRequest,
  encodeSingleMemoryRegion,
  encodeStatus,
  encodeU64,
  encodeU64Reply,
  encodeVringAddr,
  encodeVringFd,
  encodeVringState,
  encodeVringStateReply,
  expectedPayloadSize,
  isReply,
  type MemoryRegion,
  needsReply,
  type Payload,
  payloadKind,
  type VhostUserHeader,
} from "../../lib/vhost_user/messages.ts";

const REQUEST_IDS = Object.values(VhostUserRequest).filter((id) => id !== 0);
const TWO_53 = 2 ** 53;

/** The tests patch raw fields; all supported Deno targets are little endian. */
assert.equal(new Uint8Array(new Uint16Array([1]).buffer)[0], 1, "tests assume little endian");

function patchU32(bytes: Uint8Array, off: number, value: number): Uint8Array {
  new DataView(bytes.buffer, bytes.byteOffset).setUint32(off, value, true);
  return bytes;
}

function patchU64(bytes: Uint8Array, off: number, value: bigint): Uint8Array {
  new DataView(bytes.buffer, bytes.byteOffset).setBigUint64(off, value, true);
  return bytes;
}

function ok<T>(value: T | CodecError): T {
  if (value instanceof CodecError) assert.fail(`unexpected CodecError: ${value.message}`);
  return value;
}

function codecError(value: unknown, pattern?: RegExp): void {
  assert.ok(value instanceof CodecError, `expected CodecError, got ${JSON.stringify(value, big)}`);
  if (pattern) assert.match(value.message, pattern);
}

function big(_k: string, v: unknown): unknown {
  return typeof v === "bigint" ? `${v}n` : v;
}

const REGION_A: MemoryRegion = {
  guestAddr: 0,
  size: 0x8000_0000,
  userAddr: 0x7f12_3456_0000,
  mmapOffset: 0,
};
const REGION_B: MemoryRegion = {
  guestAddr: 0x1_0000_0000,
  size: 0x4000_0000,
  userAddr: 0x7f9a_0000_0000,
  mmapOffset: 0x8000_0000,
};

/** A sample request payload of the layout each request id uses. */
function samplePayload(request: number): Payload {
  const kind = payloadKind(request);
  switch (kind) {
    case "none":
      return { kind };
    case "u64":
      return { kind, value: 0x8000_0001_4000_0000n };
    case "status":
      return { kind, value: 0x0f };
    case "vringState":
      return { kind, value: { index: 1, num: 0xffff_fffe } };
    case "vringAddr":
      return {
        kind,
        value: {
          index: 1,
          flags: 1,
          descUser: 0x7f12_3456_1000,
          usedUser: TWO_53 - 1,
          availUser: 0x7f12_3456_2000,
          logGuestAddr: 0xffff_ffff_ffff_ffffn,
        },
      };
    case "vringFd":
      return { kind, value: { index: 0xff, noFd: true } };
    case "memTable":
      return { kind, value: { regions: [REGION_A, REGION_B] } };
    case "memRegion":
      return { kind, value: REGION_B };
    case "log":
      return { kind, value: { mmapSize: 0x1000, mmapOffset: 0x2000 } };
    case "config":
      return {
        kind,
        value: { offset: 0, size: 8, flags: 1, payload: new Uint8Array([3, 0, 0, 0, 0, 0, 0, 0]) },
      };
    case "inflight":
      return { kind, value: { mmapSize: 0x3000, mmapOffset: 0, numQueues: 2, queueSize: 128 } };
    case "deviceState":
      return { kind, value: { direction: 1, phase: 0 } };
    case "opaque": {
      const { min, max } = expectedPayloadSize(request);
      const bytes = new Uint8Array(min === max ? min : 100);
      bytes.forEach((_, i) => (bytes[i] = i * 7));
      return { kind, value: bytes };
    }
    case undefined:
      throw new Error(`no layout for ${request}`);
  }
}

// --- protocol constants ------------------------------------------------------------------------

Deno.test("protocol: ids, names and feature masks follow the spec", () => {
  assert.equal(VhostUserRequest.SET_LOG_BASE, 6);
  assert.equal(VhostUserRequest.SET_BACKEND_REQ_FD, 21);
  assert.equal(VhostUserRequest.CHECK_DEVICE_STATE, 43);
  assert.equal(requestName(42), "SET_DEVICE_STATE_FD");
  assert.equal(requestName(999), "UNKNOWN(999)");
  assert.equal(backendRequestName(VhostUserBackendRequest.CONFIG_CHANGE_MSG), "CONFIG_CHANGE_MSG");
  assert.equal(isKnownRequest(0), false);
  assert.equal(isKnownRequest(44), false);
  assert.ok(REQUEST_IDS.every(isKnownRequest));
  assert.equal(featureMask(VHOST_USER_F_PROTOCOL_FEATURES), 0x4000_0000n);
  assert.equal(VhostUserProtocolFeature.DEVICE_STATE, 19);
  assert.equal(VhostUserProtocolFeatureMask.DEVICE_STATE, 1n << 19n);
  assert.equal(VhostUserProtocolFeatureMask.MQ, 1n);
  assert.equal(VhostUserProtocolFeatureMask.CONFIG, 0x200n);
});

// --- header ----------------------------------------------------------------------------------------

Deno.test("header: round trip, at an offset", () => {
  const header: VhostUserHeader = {
    request: VhostUserRequest.SET_VRING_ADDR,
    flags: VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK,
    size: 40,
  };
  const buf = new Uint8Array(20);
  encodeHeader(header, buf, 5);
  assert.deepEqual(decodeHeader(buf, 5), header);
  assert.deepEqual(decodeHeader(encodeHeader(header)), header);
  assert.ok(needsReply(header.flags));
  assert.ok(!isReply(header.flags));
});

Deno.test("header: rejects bad version, unknown flags, oversize payload, short buffers", () => {
  const h = (flags: number, size = 0) => encodeHeader({ request: 1, flags, size });
  codecError(decodeHeader(h(0)), /version 0/);
  codecError(decodeHeader(h(2)), /version 2/);
  codecError(decodeHeader(h(VHOST_USER_VERSION | 0x10)), /flag/);
  codecError(decodeHeader(h((VHOST_USER_VERSION | 0x8000_0000) >>> 0)), /flag/);
  const big = patchU32(h(VHOST_USER_VERSION), 8, VHOST_USER_MAX_PAYLOAD_SIZE + 1);
  codecError(decodeHeader(big), /size/);
  assert.equal(ok(decodeHeader(h(VHOST_USER_VERSION, VHOST_USER_MAX_PAYLOAD_SIZE))).size, 4096);
  codecError(decodeHeader(new Uint8Array(11)));
  codecError(decodeHeader(new Uint8Array(12), 1));
  codecError(decodeHeader(new Uint8Array(12), -1));
  codecError(decodeHeader(new Uint8Array(12), 0.5));
  assert.throws(() => encodeHeader({ request: 1, flags: 1, size: 4097 }), CodecError);
  assert.throws(() => encodeHeader({ request: -1, flags: 1, size: 0 }), CodecError);
  assert.throws(() => encodeHeader({ request: 1, flags: 1, size: 0 }, new Uint8Array(12), 1));
});

// --- round trips -----------------------------------------------------------------------------------

Deno.test("every request id: encodeRequest -> decodeHeader -> decodePayload round trip", () => {
  for (const request of REQUEST_IDS) {
    const sample = samplePayload(request);
    const wire = encodeRequest(request, encodePayload(sample), request % 2 === 0);
    const header = ok(decodeHeader(wire));
    assert.equal(header.request, request);
    assert.equal(needsReply(header.flags), request % 2 === 0);
    assert.equal(header.size, wire.length - VHOST_USER_HDR_SIZE);
    const { min, max } = expectedPayloadSize(request);
    assert.ok(header.size >= min && header.size <= max, requestName(request));
    const decoded = ok(decodePayload(request, wire.subarray(VHOST_USER_HDR_SIZE)));
    assert.deepEqual(decoded, sample, requestName(request));
  }
});

Deno.test("payload layouts match the spec byte for byte", () => {
  // vring addr: u32 index, u32 flags, desc, used, avail, log (u64 each) = 40 bytes
  const addr = encodeVringAddr({
    index: 2,
    flags: 1,
    descUser: 0x1000,
    usedUser: 0x2000,
    availUser: 0x3000,
    logGuestAddr: 0x4000n,
  });
  const v = new DataView(addr.buffer);
  assert.equal(addr.length, 40);
  assert.deepEqual(
    [v.getUint32(0, true), v.getUint32(4, true), v.getBigUint64(8, true), v.getBigUint64(32, true)],
    [2, 1, 0x1000n, 0x4000n],
  );
  assert.equal(v.getBigUint64(16, true), 0x2000n);
  assert.equal(v.getBigUint64(24, true), 0x3000n);
  // memory table: u32 nregions, u32 padding, then 32-byte regions
  const table = encodeMemoryTable({ regions: [REGION_B] });
  assert.equal(table.length, 8 + 32);
  const t = new DataView(table.buffer);
  assert.equal(t.getUint32(0, true), 1);
  assert.equal(t.getBigUint64(8, true), 0x1_0000_0000n);
  assert.equal(t.getBigUint64(24, true), 0x7f9a_0000_0000n);
  // single region: u64 padding first
  const single = new DataView(encodeSingleMemoryRegion(REGION_B).buffer);
  assert.equal(single.getBigUint64(0, true), 0n);
  assert.equal(single.getBigUint64(8, true), 0x1_0000_0000n);
  // kick/call/err u64: index in bits 0-7, bit 8 = no fd
  assert.deepEqual(encodeVringFd({ index: 3, noFd: true }), encodeU64(0x103));
  assert.deepEqual(encodeVringFd({ index: 3, noFd: false }), encodeU64(3));
  // log: size then offset
  assert.deepEqual(
    encodeLog({ mmapSize: 1, mmapOffset: 2 }),
    new Uint8Array([1, ...Array(7).fill(0), 2, ...Array(7).fill(0)]),
  );
  // status: a byte in a u64
  assert.deepEqual(encodeStatus(0x0f), encodeU64(0x0f));
});

Deno.test("replies: u64, vring state and config carry VERSION | REPLY", () => {
  const u64 = encodeU64Reply(VhostUserRequest.GET_FEATURES, 0x1_4000_0000n);
  const h = ok(decodeHeader(u64));
  assert.deepEqual(h, {
    request: VhostUserRequest.GET_FEATURES,
    flags: VHOST_USER_VERSION | VHOST_USER_REPLY_MASK,
    size: 8,
  });
  assert.ok(isReply(h.flags));
  assert.equal(ok(decodeU64(u64.subarray(12))), 0x1_4000_0000n);
  assert.equal(ok(decodeU64(encodeU64Reply(VhostUserRequest.GET_QUEUE_NUM, 3).subarray(12))), 3n);

  const base = encodeVringStateReply(VhostUserRequest.GET_VRING_BASE, { index: 1, num: 77 });
  assert.equal(ok(decodeHeader(base)).request, VhostUserRequest.GET_VRING_BASE);
  assert.deepEqual(ok(decodeVringState(base.subarray(12))), { index: 1, num: 77 });

  const cfg = { offset: 0, size: 4, flags: 0, payload: new Uint8Array([3, 0, 0, 0]) };
  const reply = encodeConfigReply(cfg);
  assert.equal(ok(decodeHeader(reply)).request, VhostUserRequest.GET_CONFIG);
  assert.deepEqual(ok(decodeConfig(reply.subarray(12))), cfg);
  assert.equal(ok(decodeHeader(encodeConfigReply(null))).size, 0);
});

Deno.test("decoded values do not alias the input buffer", () => {
  const wire = encodeConfig({ offset: 0, size: 2, flags: 0, payload: new Uint8Array([5, 6]) });
  const decoded = ok(decodeConfig(wire));
  wire.fill(0);
  assert.deepEqual(decoded.payload, new Uint8Array([5, 6]));
});

// --- size and range validation -------------------------------------------------------------------

Deno.test("every request id rejects a payload one byte too short or too long", () => {
  for (const request of REQUEST_IDS) {
    const { min, max } = expectedPayloadSize(request);
    if (min > 0) codecError(decodePayload(request, new Uint8Array(min - 1)), /payload of/);
    codecError(decodePayload(request, new Uint8Array(max + 1)), /payload of/);
  }
  codecError(decodePayload(0, new Uint8Array(0)), /unknown request/);
  codecError(decodePayload(44, new Uint8Array(0)), /unknown request/);
  assert.deepEqual(expectedPayloadSize(44), { min: 0, max: VHOST_USER_MAX_PAYLOAD_SIZE });
  assert.deepEqual(expectedPayloadSize(VhostUserRequest.SET_MEM_TABLE), {
    kind: "memTable",
    min: 8,
    max: 8 + 8 * 32,
  });
});

Deno.test("memory table: nregions bounds and payload length must agree", () => {
  const two = encodeMemoryTable({ regions: [REGION_A, REGION_B] });
  codecError(decodeMemoryTable(patchU32(two.slice(), 0, 3)), /3 regions/);
  codecError(decodeMemoryTable(patchU32(two.slice(), 0, 1)), /1 regions/);
  codecError(decodeMemoryTable(patchU32(new Uint8Array(8 + 9 * 32), 0, 9)), /9 regions > 8/);
  codecError(decodeMemoryTable(patchU32(new Uint8Array(8), 0, 0xffff_ffff)), /regions > 8/);
  assert.deepEqual(ok(decodeMemoryTable(new Uint8Array(8))), { regions: [] });
  const eight = Array.from({ length: VHOST_MEMORY_BASELINE_NREGIONS }, () => REGION_A);
  assert.equal(ok(decodeMemoryTable(encodeMemoryTable({ regions: eight }))).regions.length, 8);
  assert.throws(() => encodeMemoryTable({ regions: [...eight, REGION_A] }), CodecError);
});

Deno.test("64-bit addresses at or beyond 2^53 are CodecErrors; 2^53 - 1 is accepted", () => {
  const table = () => encodeMemoryTable({ regions: [{ ...REGION_A, size: 0x1000 }] });
  for (
    const [field, off] of [["guest address", 8], ["size", 16], ["user address", 24], [
      "mmap offset",
      32,
    ]] as const
  ) {
    codecError(
      decodeMemoryTable(patchU64(table(), off, 1n << 53n)),
      new RegExp(`${field}: address out of range`),
    );
    codecError(decodeMemoryTable(patchU64(table(), off, 0xffff_ffff_ffff_ffffn)), /out of range/);
  }
  const edge = { guestAddr: TWO_53 - 1, size: 1, userAddr: 0, mmapOffset: 0 };
  assert.deepEqual(ok(decodeMemoryTable(encodeMemoryTable({ regions: [edge] }))).regions, [edge]);
  // a region whose end passes 2^53 cannot be used for exact arithmetic
  const past = patchU64(table(), 8, BigInt(TWO_53 - 0x800));
  codecError(decodeMemoryTable(past), /guest address: end out of range/);
  const single = patchU64(encodeSingleMemoryRegion(REGION_A), 16 + 8, (1n << 53n) - 1n);
  codecError(
    decodePayload(VhostUserRequest.ADD_MEM_REG, single),
    /ADD_MEM_REG: .*user address: end/,
  );

  const addr = encodePayload(samplePayload(VhostUserRequest.SET_VRING_ADDR));
  codecError(
    decodePayload(VhostUserRequest.SET_VRING_ADDR, patchU64(addr.slice(), 16, 1n << 60n)),
    /used: address out of range/,
  );
  // the log address is opaque (only used with VHOST_VRING_F_LOG): any u64 goes
  const anyLog = ok(
    decodePayload(VhostUserRequest.SET_VRING_ADDR, patchU64(addr.slice(), 32, 1n << 63n)),
  );
  assert.equal(anyLog.kind === "vringAddr" && anyLog.value.logGuestAddr, 1n << 63n);

  const log = encodeLog({ mmapSize: 0x1000, mmapOffset: 0 });
  codecError(
    decodePayload(VhostUserRequest.SET_LOG_BASE, patchU64(log.slice(), 8, 1n << 53n)),
    /log offset/,
  );
  codecError(
    decodePayload(VhostUserRequest.SET_LOG_BASE, patchU64(log.slice(), 8, (1n << 53n) - 1n)),
    /log area: end/,
  );
  const inflight = encodePayload(samplePayload(VhostUserRequest.SET_INFLIGHT_FD));
  codecError(
    decodePayload(VhostUserRequest.SET_INFLIGHT_FD, patchU64(inflight, 0, 1n << 53n)),
    /inflight mmap size/,
  );

  assert.throws(() => encodeSingleMemoryRegion({ ...REGION_A, userAddr: TWO_53 }), CodecError);
  assert.throws(() => encodeSingleMemoryRegion({ ...REGION_A, size: -1 }), CodecError);
  assert.throws(() => encodeSingleMemoryRegion({ ...REGION_A, size: 1.5 }), CodecError);
});

Deno.test("config: access within 256 bytes and length = 12 + size", () => {
  const cfg = (offset: number, size: number) =>
    patchU32(patchU32(new Uint8Array(12 + size), 0, offset), 4, size);
  assert.equal(ok(decodeConfig(cfg(0, 256))).payload.length, 256);
  assert.equal(ok(decodeConfig(cfg(248, 8))).offset, 248);
  codecError(decodeConfig(cfg(249, 8)), /beyond 256/);
  codecError(decodeConfig(patchU32(cfg(0, 8), 0, 0xffff_fff8)), /beyond 256/);
  codecError(decodeConfig(patchU32(cfg(0, 8), 4, 9)), /config of 9 bytes/);
  codecError(decodeConfig(patchU32(cfg(0, 8), 4, 0xffff_ffff)), /beyond 256/);
  codecError(decodeConfig(new Uint8Array(11)), /too short/);
  assert.throws(
    () => encodeConfig({ offset: 0, size: 3, flags: 0, payload: new Uint8Array(2) }),
    CodecError,
  );
  assert.throws(
    () => encodeConfig({ offset: 250, size: 8, flags: 0, payload: new Uint8Array(8) }),
    CodecError,
  );
});

Deno.test("status, vring fd and u64 value checks", () => {
  codecError(decodePayload(VhostUserRequest.SET_STATUS, encodeU64(0x100)), /u8/);
  codecError(decodePayload(VhostUserRequest.SET_STATUS, encodeU64(1n << 32n)), /u8/);
  codecError(decodePayload(VhostUserRequest.SET_VRING_KICK, encodeU64(0x200)), /reserved/);
  codecError(decodePayload(VhostUserRequest.SET_VRING_CALL, encodeU64(1n << 40n)), /reserved/);
  assert.deepEqual(ok(decodePayload(VhostUserRequest.SET_VRING_ERR, encodeU64(0x1ff))), {
    kind: "vringFd",
    value: { index: 0xff, noFd: true },
  });
  assert.throws(() => encodeStatus(256), CodecError);
  assert.throws(() => encodeU64(-1), CodecError);
  assert.throws(() => encodeU64(1n << 64n), CodecError);
  assert.throws(() => encodeU64(TWO_53), CodecError);
  assert.throws(() => encodeVringFd({ index: 256, noFd: false }), CodecError);
  assert.throws(() => encodeVringState({ index: 0, num: 2 ** 32 }), CodecError);
  assert.equal(ok(decodeU64(encodeU64(0xffff_ffff_ffff_ffffn))), 0xffff_ffff_ffff_ffffn);
});

// --- properties -----------------------------------------------------------------------------------

/** Any request id: the known ones (often) and arbitrary u32s. */
const anyRequest = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom(...REQUEST_IDS) },
  { weight: 1, arbitrary: fc.nat({ max: 0xffff_ffff }) },
);

/**
 * Bytes of a size the request accepts, with the count fields (memory table nregions, config
 * size) often set to small values so the decoders get past their first checks.
 */
const sizedPayload = anyRequest.chain((request) => {
  const { min, max } = expectedPayloadSize(request);
  return fc.tuple(
    fc.constant(request),
    fc.uint8Array({ minLength: min, maxLength: Math.min(max, 300) }),
    fc.nat({ max: 9 }),
    fc.boolean(),
  ).map(([request, bytes, small, patch]) => {
    const kind = payloadKind(request);
    if (patch && kind === "memTable" && bytes.length >= 8) patchU32(bytes, 0, small);
    if (patch && kind === "config" && bytes.length >= 12) {
      patchU32(bytes, 0, small);
      patchU32(bytes, 4, bytes.length - 12);
    }
    return [request, bytes] as const;
  });
});

function decodedOrCodecError(request: number, bytes: Uint8Array): void {
  let result: Payload | CodecError;
  try {
    result = decodePayload(request, bytes);
  } catch (e) {
    assert.fail(`decodePayload(${request}) threw ${e}`);
  }
  if (result instanceof CodecError) return;
  assert.equal(result.kind, payloadKind(request));
  // a decoded payload re-encodes to bytes that decode to the same value
  assert.deepEqual(decodePayload(request, encodePayload(result)), result);
}

Deno.test("property: arbitrary bytes into decodePayload give a value or a CodecError", () => {
  fc.assert(
    fc.property(anyRequest, fc.uint8Array({ maxLength: 300 }), decodedOrCodecError),
    { numRuns: 3000 },
  );
  fc.assert(
    fc.property(sizedPayload, ([request, bytes]) => decodedOrCodecError(request, bytes)),
    { numRuns: 5000 },
  );
});

Deno.test("property: payloads in subarrays at odd offsets decode like copies", () => {
  fc.assert(
    fc.property(sizedPayload, fc.nat({ max: 7 }), ([request, bytes], pad) => {
      const backing = new Uint8Array(pad + bytes.length);
      backing.set(bytes, pad);
      assert.deepEqual(
        decodePayload(request, backing.subarray(pad)),
        decodePayload(request, bytes),
      );
    }),
    { numRuns: 1000 },
  );
});

Deno.test("property: arbitrary bytes into decodeHeader give a header or a CodecError", () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 40 }), fc.integer({ min: -4, max: 44 }), (buf, off) => {
      let result: VhostUserHeader | CodecError;
      try {
        result = decodeHeader(buf, off);
      } catch (e) {
        assert.fail(`decodeHeader threw ${e}`);
      }
      if (result instanceof CodecError) return;
      assert.equal(result.flags & 3, VHOST_USER_VERSION);
      assert.ok(result.size <= VHOST_USER_MAX_PAYLOAD_SIZE);
      assert.deepEqual(encodeHeader(result), buf.slice(off, off + VHOST_USER_HDR_SIZE));
    }),
    { numRuns: 3000 },
  );
});

const addr = fc.nat({ max: 2 ** 40 });
const region = fc.record({ guestAddr: addr, size: addr, userAddr: addr, mmapOffset: addr })
  .map((r) => ({ ...r }));

Deno.test("property: valid values round trip through encode/decode", () => {
  fc.assert(
    fc.property(fc.array(region, { maxLength: 8 }), (regions) => {
      assert.deepEqual(
        decodePayload(VhostUserRequest.SET_MEM_TABLE, encodeMemoryTable({ regions })),
        { kind: "memTable", value: { regions } },
      );
    }),
  );
  fc.assert(
    fc.property(fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }), (value) => {
      assert.equal(decodeU64(encodeU64(value)), value);
    }),
  );
  fc.assert(
    fc.property(
      fc.nat({ max: 256 }).chain((offset) =>
        fc.record({
          offset: fc.constant(offset),
          flags: fc.nat({ max: 1 }),
          payload: fc.uint8Array({ maxLength: 256 - offset }),
        })
      ),
      ({ offset, flags, payload }) => {
        const cfg = { offset, size: payload.length, flags, payload };
        assert.deepEqual(decodeConfig(encodeConfig(cfg)), cfg);
      },
    ),
  );
});
