/**
 * The testing guest's SEQPACKET side (guest_conn.ts, guest_transport.ts) on a wire between two
 * guests (guest_wire.ts), no back end: EOM / EOR on the right packets, splitting within the
 * peer's credit and 64 KiB, reassembly from 4 KiB pieces, EMSGSIZE, a CREDIT_UPDATE per message
 * read, and the type rules (a packet of the other type gets an RST).
 */
import assert from "node:assert/strict";
import { featureMask, VIRTIO_F_VERSION_1 } from "../../lib/virtio/features.ts";
import {
  MAX_PKT_PAYLOAD,
  VIRTIO_VSOCK_OP_CREDIT_UPDATE,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RST,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_SEQ_EOM,
  VIRTIO_VSOCK_SEQ_EOR,
  VIRTIO_VSOCK_TYPE_SEQPACKET,
  VIRTIO_VSOCK_TYPE_STREAM,
} from "../../lib/vsock/constants.ts";
import { pattern } from "../../lib/testing/host.ts";
import { type GuestConn, GuestConnError } from "../../lib/testing/guest_conn.ts";
import { GuestConnectError } from "../../lib/testing/guest_transport.ts";
import type { CapturedPacket, VsockGuestOptions } from "../../lib/testing/guest_types.ts";
import { splitRw, Wire, wireHeader } from "./guest_wire.ts";

async function withPair(
  opts: { a?: VsockGuestOptions; b?: VsockGuestOptions },
  body: (w: Wire, a: GuestConn, b: GuestConn) => Promise<void>,
): Promise<void> {
  const w = new Wire(opts);
  try {
    const l = w.b.transport.listen(5000, { type: "seqpacket" });
    const a = await w.a.transport.connect(5000, 4, { type: "seqpacket" });
    const b = await l.accept();
    assert.equal(a.type, "seqpacket");
    assert.equal(b.type, "seqpacket");
    await body(w, a, b);
    assert.deepEqual(w.a.anomalies, []);
    assert.deepEqual(w.b.anomalies, []);
    assert.equal(a.creditViolations + b.creditViolations, 0);
  } finally {
    w.close();
  }
}

const rw = (ps: CapturedPacket[]) => ps.filter((p) => p.header.op === VIRTIO_VSOCK_OP_RW);

Deno.test("seqpacket: EOM on the last packet of each message, EOR only with it, 64 KiB packets", async () => {
  await withPair({}, async (w, a, b) => {
    const sizes = [1, 4096, MAX_PKT_PAYLOAD, MAX_PKT_PAYLOAD + 1, 128 * 1024];
    const msgs = sizes.map((n, i) => pattern(n, i + 1));
    for (let i = 0; i < msgs.length; i++) {
      await a.sendMessage(msgs[i], { eor: i % 2 === 1 });
      const m = await b.readMessage();
      assert.ok(m !== null);
      assert.deepEqual(m.data, msgs[i], `message ${i} (${sizes[i]} B) intact`);
      assert.equal(m.eor, i % 2 === 1, `message ${i} EOR`);
    }
    for (const p of w.a.sent()) assert.equal(p.header.type, VIRTIO_VSOCK_TYPE_SEQPACKET);
    const packets = rw(w.a.sent());
    // 1 | 4096 | 65536 | 65536 + 1 | 65536 + 65536
    assert.deepEqual(packets.map((p) => p.payload.length), [
      1,
      4096,
      65536,
      65536,
      1,
      65536,
      65536,
    ]);
    const eom = VIRTIO_VSOCK_SEQ_EOM;
    const eor = VIRTIO_VSOCK_SEQ_EOM | VIRTIO_VSOCK_SEQ_EOR;
    assert.deepEqual(packets.map((p) => p.header.flags), [eom, eor, eom, 0, eor, 0, eom]);
    assert.equal(b.messagesReceived, 5);
  });
});

Deno.test("seqpacket: a message larger than the peer's buf_alloc is refused (EMSGSIZE), nothing sent", async () => {
  await withPair({ b: { bufAlloc: 16384 } }, async (w, a, b) => {
    assert.equal(a.credit.peerBufAlloc, 16384);
    const before = w.a.sent().length;
    await assert.rejects(a.sendMessage(new Uint8Array(16385)), (e: Error) => {
      assert.ok(e instanceof GuestConnError);
      assert.match(e.message, /EMSGSIZE/);
      return true;
    });
    w.pump();
    assert.equal(w.a.sent().length, before, "no packet for a refused message");
    await a.sendMessage(pattern(16384, 3)); // exactly buf_alloc fits
    assert.deepEqual((await b.readMessage())?.data, pattern(16384, 3));
    // An empty message sends nothing, like Linux's sendmsg loop.
    await a.sendMessage(new Uint8Array(0));
    w.pump();
    assert.equal(rw(w.a.sent()).length, 1);
  });
});

Deno.test("seqpacket: a message is split at the peer's free credit and finished after its CREDIT_UPDATE", async () => {
  await withPair({ b: { bufAlloc: 16384 } }, async (w, a, b) => {
    await a.sendMessage(pattern(10000, 1));
    const second = a.sendMessage(pattern(10000, 2), { eor: true }); // 6384 now, the rest later
    w.pump();
    assert.deepEqual(rw(w.a.sent()).map((p) => p.payload.length), [10000, 6384]);
    assert.equal(a.credit.peerFree(), 0);
    const updatesBefore = w.b.sent().filter((p) => p.header.op === VIRTIO_VSOCK_OP_CREDIT_UPDATE)
      .length;
    const m1 = await b.readMessage();
    assert.deepEqual(m1?.data, pattern(10000, 1));
    await second;
    const m2 = await b.readMessage();
    assert.deepEqual(m2?.data, pattern(10000, 2));
    assert.equal(m2?.eor, true);
    const packets = rw(w.a.sent());
    assert.deepEqual(packets.map((p) => p.payload.length), [10000, 6384, 3616]);
    assert.deepEqual(packets.map((p) => p.header.flags), [
      VIRTIO_VSOCK_SEQ_EOM,
      0,
      VIRTIO_VSOCK_SEQ_EOM | VIRTIO_VSOCK_SEQ_EOR,
    ]);
    // Linux answers every dequeued message with a CREDIT_UPDATE.
    w.pump();
    const updates = w.b.sent().filter((p) => p.header.op === VIRTIO_VSOCK_OP_CREDIT_UPDATE);
    assert.equal(updates.length - updatesBefore, 2);
    assert.equal(updates.at(-1)!.header.fwdCnt, 20000);
  });
});

Deno.test("seqpacket: every message read returns its credit, even with more buffered", async () => {
  await withPair({}, async (w, a, b) => {
    for (let i = 0; i < 3; i++) await a.sendMessage(pattern(10, i));
    w.pump();
    const updates = () =>
      w.b.sent().filter((p) => p.header.op === VIRTIO_VSOCK_OP_CREDIT_UPDATE).map((p) =>
        p.header.fwdCnt
      );
    assert.deepEqual(updates(), []);
    await b.readMessage();
    w.pump();
    // The stream rule would wait (256 KiB free, 20 bytes still queued); Linux's seqpacket
    // dequeue does not.
    assert.deepEqual(updates(), [10]);
    await b.readMessage();
    await b.readMessage();
    w.pump();
    assert.deepEqual(updates(), [10, 20, 30]);
    assert.equal(a.credit.peerFree(), a.credit.peerBufAlloc);
  });
});

Deno.test("seqpacket: messages reassembled from 4 KiB pieces, boundaries kept, read() truncates", async () => {
  await withPair({}, async (w, a, b) => {
    w.rewrite = splitRw(4096);
    const sizes = [5000, 1, 4096, 100_000];
    for (const [i, n] of sizes.entries()) await a.sendMessage(pattern(n, i), { eor: i === 3 });
    w.pump();
    assert.equal(b.messagesBuffered, 4);
    for (const [i, n] of sizes.entries()) {
      const m = await b.readMessage();
      assert.equal(m?.data.length, n);
      assert.deepEqual(m?.data, pattern(n, i));
      assert.equal(m?.eor, i === 3);
    }
    assert.ok(w.b.received().filter((p) => p.header.op === VIRTIO_VSOCK_OP_RW).length > 25);
    // write()/read() are send()/recv(): one message each, recv truncating (MSG_TRUNC)
    await a.write(pattern(300, 7));
    await a.write(pattern(10, 8));
    assert.deepEqual(await b.read(100), pattern(300, 7).subarray(0, 100));
    assert.deepEqual(await b.read(), pattern(10, 8));
    assert.equal(b.buffered, 0);
  });
});

Deno.test("seqpacket: EOF after the peer closes; buffered messages stay readable", async () => {
  await withPair({}, async (w, a, b) => {
    await a.sendMessage(pattern(70_000, 1));
    await a.sendMessage(pattern(2, 2));
    const closing = a.close();
    await w.waitFor(() => b.eof, 5000, "b sees the SHUTDOWN");
    assert.deepEqual((await b.readMessage())?.data, pattern(70_000, 1));
    assert.deepEqual((await b.readMessage())?.data, pattern(2, 2));
    assert.equal(await b.readMessage(), null);
    await closing;
    assert.equal(a.closeReason, "closed");
  });
});

Deno.test("seqpacket: stream and seqpacket sockets do not mix: RST of the packet's type", async () => {
  const w = new Wire();
  try {
    w.b.transport.listen(5000); // stream
    w.b.transport.listen(5001, { type: "seqpacket" });
    await assert.rejects(
      w.a.transport.connect(5000, 4, { type: "seqpacket" }),
      (e: Error) => e instanceof GuestConnectError && e.reason === "refused",
    );
    await assert.rejects(
      w.a.transport.connect(5001, 4, {}),
      (e: Error) => e instanceof GuestConnectError && e.reason === "refused",
    );
    const rsts = w.a.received().filter((p) => p.header.op === VIRTIO_VSOCK_OP_RST);
    assert.deepEqual(rsts.map((p) => p.header.type), [
      VIRTIO_VSOCK_TYPE_SEQPACKET,
      VIRTIO_VSOCK_TYPE_STREAM,
    ]);
    // A stream RW on an established seqpacket connection's ports: RST back, connection kept.
    const l = w.b.transport.listen(5002, { type: "seqpacket" });
    const a = await w.a.transport.connect(5002, 4, { type: "seqpacket" });
    const b = await l.accept();
    const h = wireHeader({
      srcPort: a.localPort,
      dstPort: 5002,
      type: VIRTIO_VSOCK_TYPE_STREAM,
      op: VIRTIO_VSOCK_OP_RW,
      bufAlloc: a.credit.bufAlloc,
    });
    assert.ok(w.a.transport.placeRaw(w.a.rings, h, pattern(10, 1), 10));
    w.pump();
    const last = w.a.received().at(-1)!.header;
    assert.equal(last.op, VIRTIO_VSOCK_OP_RST);
    assert.equal(last.type, VIRTIO_VSOCK_TYPE_STREAM);
    assert.equal(b.state, "established");
    assert.equal(b.buffered, 0, "the mistyped payload was not taken");
    await a.sendMessage(pattern(5, 2));
    assert.deepEqual((await b.readMessage())?.data, pattern(5, 2));
    assert.deepEqual(w.b.anomalies, []);
  } finally {
    w.close();
  }
});

Deno.test("seqpacket: without VIRTIO_VSOCK_F_SEQPACKET connect fails at once, a REQUEST gets RST", async () => {
  const w = new Wire({ features: featureMask(VIRTIO_F_VERSION_1) });
  try {
    await assert.rejects(
      w.a.transport.connect(5000, 4, { type: "seqpacket" }),
      /ESOCKTNOSUPPORT/,
    );
    assert.equal(w.a.sent().length, 0);
    w.b.transport.listen(5000, { type: "seqpacket" });
    const h = wireHeader({
      srcPort: 1024,
      dstPort: 5000,
      type: VIRTIO_VSOCK_TYPE_SEQPACKET,
      op: VIRTIO_VSOCK_OP_REQUEST,
    });
    assert.ok(w.a.transport.placeRaw(w.a.rings, h, new Uint8Array(0), 0));
    w.pump();
    assert.equal(w.b.sent().at(-1)?.header.op, VIRTIO_VSOCK_OP_RST);
    assert.equal(w.b.anomalies.length, 1, "a SEQPACKET packet the driver never negotiated");
  } finally {
    w.close();
  }
});
