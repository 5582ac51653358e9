import assert from "node:assert/strict";
import fc from "fast-check";
import {
  HeaderError,
  type HeaderErrorReason,
  PACKET_HEADER_SIZE,
  PacketHeader,
  validateHeader,
} from "../../lib/vsock/packet.ts";
import {
  isValidGuestCid,
  MAX_PKT_PAYLOAD,
  opName,
  typeName,
  VIRTIO_VSOCK_CONFIG_SIZE,
  VIRTIO_VSOCK_F_DGRAM,
  VIRTIO_VSOCK_F_NO_IMPLIED_STREAM,
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_CREDIT_REQUEST,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RST,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_OP_SHUTDOWN,
  VIRTIO_VSOCK_SHUTDOWN_F_SEND,
  VIRTIO_VSOCK_TYPE_STREAM,
  VSOCK_HOST_CID,
  writeVsockConfig,
} from "../../lib/vsock/constants.ts";

const GUEST_CID = 3;

/** A header laid out by hand, field by field, little endian. */
function handBuilt(): Uint8Array {
  const b = new Uint8Array(44);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, 3, true); // src_cid lo
  dv.setUint32(4, 0, true); // src_cid hi
  dv.setUint32(8, 2, true); // dst_cid lo
  dv.setUint32(12, 0, true); // dst_cid hi
  dv.setUint32(16, 0x12345678, true); // src_port
  dv.setUint32(20, 1234, true); // dst_port
  dv.setUint32(24, 100, true); // len
  dv.setUint16(28, 1, true); // type STREAM
  dv.setUint16(30, 5, true); // op RW
  dv.setUint32(32, 0, true); // flags
  dv.setUint32(36, 262144, true); // buf_alloc
  dv.setUint32(40, 0xfffffff0, true); // fwd_cnt
  return b;
}

function validRw(): PacketHeader {
  const h = new PacketHeader();
  h.srcCid = GUEST_CID;
  h.dstCid = VSOCK_HOST_CID;
  h.srcPort = 1000;
  h.dstPort = 80;
  h.type = VIRTIO_VSOCK_TYPE_STREAM;
  h.op = VIRTIO_VSOCK_OP_RW;
  h.len = 10;
  return h;
}

const ALL_REASONS = new Set<string>(Object.values(HeaderError));

Deno.test("header size is 44 bytes", () => {
  assert.equal(VIRTIO_VSOCK_HDR_SIZE, 44);
  assert.equal(PACKET_HEADER_SIZE, 44);
});

Deno.test("decodeFrom reads every field at its spec offset, at any base offset", () => {
  const raw = handBuilt();
  const buf = new Uint8Array(100);
  buf.set(raw, 7);
  const h = new PacketHeader().decodeFrom(new DataView(buf.buffer), 7);
  assert.deepEqual({ ...h }, {
    srcCid: 3,
    srcCidHi: 0,
    dstCid: 2,
    dstCidHi: 0,
    srcPort: 0x12345678,
    dstPort: 1234,
    len: 100,
    type: 1,
    op: 5,
    flags: 0,
    bufAlloc: 262144,
    fwdCnt: 0xfffffff0,
  });
});

Deno.test("encodeTo writes the same bytes and nothing outside the header", () => {
  const raw = handBuilt();
  const h = new PacketHeader().decodeFrom(new DataView(raw.buffer), 0);
  const out = new Uint8Array(60).fill(0xaa);
  h.encodeTo(new DataView(out.buffer), 8);
  assert.deepEqual(out.subarray(8, 52), raw);
  assert.ok(out.subarray(0, 8).every((b) => b === 0xaa));
  assert.ok(out.subarray(52).every((b) => b === 0xaa));
});

Deno.test("decodeFrom beyond the view throws RangeError (caller must bound-check)", () => {
  const dv = new DataView(new ArrayBuffer(50));
  assert.throws(() => new PacketHeader().decodeFrom(dv, 7), RangeError);
  new PacketHeader().decodeFrom(dv, 6);
});

Deno.test("reset zeroes and copyFrom copies every field", () => {
  const raw = handBuilt();
  raw[4] = 1; // src_cid hi
  const a = new PacketHeader().decodeFrom(new DataView(raw.buffer), 0);
  const b = new PacketHeader().copyFrom(a);
  assert.deepEqual({ ...b }, { ...a });
  b.reset();
  for (const v of Object.values(b)) assert.equal(v, 0);
  assert.notEqual(a.srcCid, 0);
});

Deno.test("validateHeader accepts valid packets of every op", () => {
  assert.equal(validateHeader(validRw(), GUEST_CID), null);
  for (let op = VIRTIO_VSOCK_OP_REQUEST; op <= VIRTIO_VSOCK_OP_CREDIT_REQUEST; op++) {
    const h = validRw();
    h.op = op;
    h.len = op === VIRTIO_VSOCK_OP_RW ? MAX_PKT_PAYLOAD : 0;
    assert.equal(validateHeader(h, GUEST_CID), null, opName(op));
  }
  const rw0 = validRw();
  rw0.len = 0; // empty RW (e.g. a zero-length SEQPACKET message with EOM) is allowed
  assert.equal(validateHeader(rw0, GUEST_CID), null);
  const sd = validRw();
  sd.op = VIRTIO_VSOCK_OP_SHUTDOWN;
  sd.len = 0;
  sd.flags = VIRTIO_VSOCK_SHUTDOWN_F_SEND;
  assert.equal(validateHeader(sd, GUEST_CID), null);
});

Deno.test("validateHeader rejects each kind of invalid header with its reason", () => {
  const cases: [string, (h: PacketHeader) => void, HeaderErrorReason, number?][] = [
    ["foreign src_cid", (h) => h.srcCid = 4, HeaderError.SRC_CID],
    ["host as src_cid", (h) => h.srcCid = VSOCK_HOST_CID, HeaderError.SRC_CID],
    ["src_cid high bits", (h) => h.srcCidHi = 1, HeaderError.SRC_CID_HIGH],
    ["dst_cid high bits", (h) => h.dstCidHi = 0x80000000, HeaderError.DST_CID_HIGH],
    ["op INVALID", (h) => h.op = 0, HeaderError.UNKNOWN_OP],
    ["op 8", (h) => h.op = 8, HeaderError.UNKNOWN_OP],
    ["op 0xffff", (h) => h.op = 0xffff, HeaderError.UNKNOWN_OP],
    ["len 64K+1", (h) => h.len = MAX_PKT_PAYLOAD + 1, HeaderError.LEN_TOO_BIG],
    ["len u32 max", (h) => h.len = 0xffffffff, HeaderError.LEN_TOO_BIG],
    ["payload on REQUEST", (h) => {
      h.op = VIRTIO_VSOCK_OP_REQUEST;
      h.len = 1;
    }, HeaderError.PAYLOAD_ON_CONTROL_OP],
    ["payload on RST", (h) => {
      h.op = VIRTIO_VSOCK_OP_RST;
      h.len = 4;
    }, HeaderError.PAYLOAD_ON_CONTROL_OP],
    ["len beyond chain", (h) => h.len = 11, HeaderError.LEN_EXCEEDS_CHAIN, 10],
  ];
  for (const [name, mutate, reason, chain] of cases) {
    const h = validRw();
    mutate(h);
    assert.equal(validateHeader(h, GUEST_CID, chain), reason, name);
  }
  // the chain bound is inclusive
  const h = validRw();
  h.len = 10;
  assert.equal(validateHeader(h, GUEST_CID, 10), null);
});

Deno.test("validateHeader does not judge the type (unknown types get an RST, not a drop)", () => {
  const h = validRw();
  h.type = 0x7777;
  assert.equal(validateHeader(h, GUEST_CID), null);
});

Deno.test("describe names op and type and shows CIDs with high bits", () => {
  const h = validRw();
  h.srcCidHi = 1;
  const s = h.describe();
  assert.match(s, /^RW STREAM 0x100000003:1000 -> 2:80 len=10/);
  h.op = 42;
  h.type = 9;
  assert.match(h.describe(), /^OP_42 TYPE_9 /);
});

Deno.test("property: any 44 bytes decode and validate without throwing, and re-encode exactly", () => {
  fc.assert(
    fc.property(
      fc.uint8Array({ minLength: 44, maxLength: 44 }),
      fc.nat({ max: 16 }),
      fc.nat({ max: 0xffffffff }),
      fc.option(fc.nat({ max: 0x20000 }), { nil: undefined }),
      (bytes, pad, cid, chain) => {
        const buf = new Uint8Array(pad + 44 + 3);
        buf.set(bytes, pad);
        const h = new PacketHeader().decodeFrom(new DataView(buf.buffer), pad);
        const r = validateHeader(h, cid, chain);
        assert.ok(r === null || ALL_REASONS.has(r));
        if (r === null) {
          assert.equal(h.srcCid, cid);
          assert.equal(h.srcCidHi, 0);
          assert.equal(h.dstCidHi, 0);
          assert.ok(h.op >= 1 && h.op <= 7);
          assert.ok(h.len <= MAX_PKT_PAYLOAD);
          assert.ok(h.len === 0 || h.op === VIRTIO_VSOCK_OP_RW);
          if (chain !== undefined) assert.ok(h.len <= chain);
        }
        const out = new Uint8Array(44);
        h.encodeTo(new DataView(out.buffer), 0);
        assert.deepEqual(out, bytes);
        const again = new PacketHeader().decodeFrom(new DataView(out.buffer), 0);
        assert.deepEqual({ ...again }, { ...h });
      },
    ),
    { numRuns: 2000 },
  );
});

Deno.test("property: in-range fields survive encode -> decode", () => {
  const u32 = fc.nat({ max: 0xffffffff });
  const u16 = fc.nat({ max: 0xffff });
  fc.assert(
    fc.property(
      fc.record({
        srcCid: u32,
        srcCidHi: u32,
        dstCid: u32,
        dstCidHi: u32,
        srcPort: u32,
        dstPort: u32,
        len: u32,
        type: u16,
        op: u16,
        flags: u32,
        bufAlloc: u32,
        fwdCnt: u32,
      }),
      (fields) => {
        const h = Object.assign(new PacketHeader(), fields);
        const dv = new DataView(new ArrayBuffer(44));
        h.encodeTo(dv, 0);
        assert.deepEqual({ ...new PacketHeader().decodeFrom(dv, 0) }, { ...fields });
      },
    ),
  );
});

Deno.test("constants: guest CID validity, config layout, feature bits, names", () => {
  for (const cid of [0, 1, 2, 0xffffffff, 2 ** 32, 2 ** 53, -1, 3.5, NaN]) {
    assert.equal(isValidGuestCid(cid), false, `${cid}`);
  }
  for (const cid of [3, 4, 1000, 0xfffffffe]) assert.equal(isValidGuestCid(cid), true);

  const dv = new DataView(new ArrayBuffer(VIRTIO_VSOCK_CONFIG_SIZE + 2));
  new Uint8Array(dv.buffer).fill(0xff);
  writeVsockConfig(dv, 1, 0xdeadbeef);
  assert.deepEqual(
    [...new Uint8Array(dv.buffer)],
    [0xff, 0xef, 0xbe, 0xad, 0xde, 0, 0, 0, 0, 0xff],
  );
  assert.throws(() => writeVsockConfig(dv, 0, 2), RangeError);

  assert.notEqual(VIRTIO_VSOCK_F_DGRAM, VIRTIO_VSOCK_F_NO_IMPLIED_STREAM);
  assert.equal(VIRTIO_VSOCK_F_DGRAM, 3);
  assert.equal(opName(VIRTIO_VSOCK_OP_CREDIT_REQUEST), "CREDIT_REQUEST");
  assert.equal(opName(0), "INVALID");
  assert.equal(typeName(2), "SEQPACKET");
  assert.equal(typeName(0), "TYPE_0");
});
