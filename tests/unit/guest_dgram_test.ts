/**
 * The testing guest's datagram sockets (guest_dgram.ts) on a wire between two guests
 * (guest_wire.ts), no back end: one packet per datagram (type DGRAM, op RW, no credit), the
 * 64 KiB limit, the bounded receive queue (drops counted), silent drops for unbound ports and
 * invalid ops, and no datagrams without VIRTIO_VSOCK_F_DGRAM.
 */
import assert from "node:assert/strict";
import { featureMask, VIRTIO_F_VERSION_1 } from "../../lib/virtio/features.ts";
import {
  VIRTIO_VSOCK_F_SEQPACKET,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_TYPE_DGRAM,
} from "../../lib/vsock/constants.ts";
import { pattern } from "../../lib/testing/host.ts";
import { GuestConnError } from "../../lib/testing/guest_conn.ts";
import { LINUX_RMEM_DEFAULT } from "../../lib/testing/guest_dgram.ts";
import { Wire, wireHeader } from "./guest_wire.ts";

function withWire(body: (w: Wire) => Promise<void>, opts = {}): () => Promise<void> {
  return async () => {
    const w = new Wire(opts);
    try {
      await body(w);
    } finally {
      w.close();
    }
  };
}

Deno.test(
  "dgram: one packet per datagram, type DGRAM op RW, no credit; the reply goes to the source port",
  withWire(async (w) => {
    const sa = w.a.transport.bindDgram(7000);
    const sb = w.b.transport.bindDgram(8000);
    assert.equal(sb.rcvBuf, LINUX_RMEM_DEFAULT);
    const big = pattern(65536, 2);
    await sa.sendTo(4, 8000, pattern(100, 1));
    await sa.sendTo(4, 8000, big);
    const d1 = await sb.recvFrom();
    assert.deepEqual(d1, { cid: 3, port: 7000, data: pattern(100, 1) });
    assert.deepEqual((await sb.recvFrom()).data, big);
    await sb.sendTo(d1.cid, d1.port, pattern(3, 3));
    assert.deepEqual(await sa.recvFrom(), { cid: 4, port: 8000, data: pattern(3, 3) });
    const sent = w.a.sent();
    assert.equal(sent.length, 2);
    for (const [i, p] of sent.entries()) {
      const h = p.header;
      assert.equal(h.type, VIRTIO_VSOCK_TYPE_DGRAM);
      assert.equal(h.op, VIRTIO_VSOCK_OP_RW);
      assert.equal(h.len, [100, 65536][i]);
      assert.deepEqual([h.srcCid, h.dstCid, h.srcPort, h.dstPort], [3, 4, 7000, 8000]);
      assert.deepEqual([h.bufAlloc, h.fwdCnt, h.flags], [0, 0, 0]);
    }
    assert.deepEqual([sa.sent, sb.received, sb.drops], [2, 2, 0]);
    await assert.rejects(sa.sendTo(4, 8000, new Uint8Array(65537)), /EMSGSIZE/);
    assert.throws(() => w.a.transport.bindDgram(7000), GuestConnError);
    assert.deepEqual([...w.a.anomalies, ...w.b.anomalies], []);
  }),
);

Deno.test(
  "dgram: a full receive queue drops (like sk_rcvbuf) and counts; reading makes room again",
  withWire(async (w) => {
    const sa = w.a.transport.bindDgram(7000);
    const sb = w.b.transport.bindDgram(8000, { rcvBuf: 10000 });
    for (let i = 0; i < 5; i++) await sa.sendTo(4, 8000, pattern(4000, i));
    w.pump();
    // Queued while fewer than rcvBuf bytes wait: 0, 4000, 8000 -> three, then two dropped.
    assert.deepEqual([sb.pending, sb.queuedBytes, sb.drops], [3, 12000, 2]);
    assert.equal(w.b.stats.dgramRxDropped, 2);
    for (let i = 0; i < 3; i++) assert.deepEqual((await sb.recvFrom()).data, pattern(4000, i));
    await sa.sendTo(4, 8000, pattern(10, 9));
    assert.deepEqual((await sb.recvFrom()).data, pattern(10, 9));
    await assert.rejects(sb.recvFrom({ timeoutMs: 50 }), /timed out/);
  }),
);

Deno.test(
  "dgram: unbound port and invalid op are dropped silently (no RST); closed sockets unbind",
  withWire(async (w) => {
    const sa = w.a.transport.bindDgram(7000);
    await sa.sendTo(4, 9999, pattern(10, 1));
    w.pump();
    assert.equal(w.b.stats.dgramRxNoSocket, 1);
    assert.deepEqual(w.b.sent(), [], "connectionless: nothing answers");
    const sb = w.b.transport.bindDgram(8000);
    const h = wireHeader({
      srcPort: 7000,
      dstPort: 8000,
      type: VIRTIO_VSOCK_TYPE_DGRAM,
      op: VIRTIO_VSOCK_OP_REQUEST,
    });
    assert.ok(w.a.transport.placeRaw(w.a.rings, h, new Uint8Array(0), 0));
    w.pump();
    assert.equal(w.b.stats.dgramRxInvalid, 1);
    assert.equal(sb.pending, 0);
    assert.deepEqual(w.b.sent(), []);
    assert.equal(w.b.anomalies.length, 1);
    sb.close();
    await assert.rejects(sb.recvFrom(), GuestConnError);
    await sa.sendTo(4, 8000, pattern(1, 1));
    w.pump();
    assert.equal(w.b.stats.dgramRxNoSocket, 2);
    w.b.transport.bindDgram(8000); // the port is free again
  }),
);

Deno.test(
  "dgram: without VIRTIO_VSOCK_F_DGRAM no socket binds and a DGRAM packet is an anomaly",
  withWire(async (w) => {
    assert.throws(() => w.a.transport.bindDgram(7000), /VIRTIO_VSOCK_F_DGRAM not negotiated/);
    const h = wireHeader({
      srcPort: 7000,
      dstPort: 8000,
      type: VIRTIO_VSOCK_TYPE_DGRAM,
      op: VIRTIO_VSOCK_OP_RW,
    });
    assert.ok(w.a.transport.placeRaw(w.a.rings, h, pattern(5, 1), 5));
    w.pump();
    assert.match(w.b.anomalies.join("\n"), /without VIRTIO_VSOCK_F_DGRAM/);
    assert.deepEqual(w.b.sent(), []);
    await Promise.resolve();
  }, {
    features: featureMask(VIRTIO_F_VERSION_1) | featureMask(VIRTIO_VSOCK_F_SEQPACKET),
  }),
);
