/**
 * Never drop a kick (virtiofsd dropping FUSE_INIT): a kick that arrives after SET_VRING_KICK but
 * before SET_VRING_ENABLE is remembered, TX and RX; with REPLY_ACK, the ack of a NEED_REPLY
 * SET_VRING_ENABLE comes only after the enable (and the work it released) was processed.
 *
 * The back end runs as a child process (`lib/testing`); the rings are driven with `RawGuest`
 * (raw_guest.ts), a bare driver that posts buffers and kicks only when told, so the tests control
 * exactly which notifications exist. Split and packed virtqueues (VIRTIO_F_RING_PACKED).
 */
import assert from "node:assert/strict";
import { acceptRaw, close, EAGAIN, listenUnix } from "../../ffi/mod.ts";
import {
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RESPONSE,
  VIRTIO_VSOCK_OP_RW,
} from "../../lib/testing/mod.ts";
import { VhostUserProtocolFeatureMask as PF } from "../../lib/vhost_user/protocol.ts";
import { sleep } from "./vm_helpers.ts";
import { RawGuest, RawHostSocket, waitUntil } from "./raw_guest.ts";
import {
  rings,
  START_LATENCY_MS,
  VM_SETUPS,
  waitForLog,
  withBackend,
} from "./lifecycle_helpers.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();

// ---------------------------------------------------------------------------------------
// Never drop a kick: a kick before SET_VRING_ENABLE is remembered
// ---------------------------------------------------------------------------------------

for (
  const v of [
    { profile: "qemu", needReply: true },
    { profile: "qemu", needReply: false },
    { profile: "crosvm", needReply: true },
    { profile: "crosvm", needReply: false },
    { profile: "qemu", needReply: true, packed: true },
    { profile: "crosvm", needReply: false, packed: true },
  ] as const
) {
  const mode = v.needReply ? "REPLY_ACK + NEED_REPLY" : "no NEED_REPLY";
  const packed = "packed" in v;
  Deno.test(`never drop a kick: a TX REQUEST kicked before SET_VRING_ENABLE is processed on enable [${v.profile}, ${mode}${rings(packed)}]`, async () => {
    await withBackend({ profile: v.profile, packed }, async (backend, connectFrontEnd) => {
      const listenFd = listenUnix(`${backend.udsPath}_6000`);
      let hostFd = -1;
      try {
        const fe = await connectFrontEnd();
        assert.ok(fe.hasProtocolFeature(PF.REPLY_ACK), "REPLY_ACK negotiated");
        const g = new RawGuest(fe);
        g.setupRings(); // started (kick fds set), not enabled
        // The driver finishes its set-up and talks at once (OVMF's FUSE_INIT): rx buffers,
        // a REQUEST to host port 6000, a kick on each, all before the enable arrives.
        g.postRx(8);
        g.kick(0);
        g.send({ op: VIRTIO_VSOCK_OP_REQUEST, srcPort: 1234, dstPort: 6000 });
        g.kick(1);
        // The back end must have taken both kicks before the enable is sent (its debug log
        // says so), or the test would not be testing the race.
        await waitForLog(backend, "vring 0 kicked while inactive");
        await waitForLog(backend, "vring 1 kicked while inactive");
        await sleep(20);
        assert.equal(acceptRaw(listenFd), -EAGAIN, "a disabled ring is not processed");
        assert.equal(g.tx.packed, packed, "ring layout");
        assert.equal(g.tx.readUsedIdx(), g.tx.lastUsed, "a disabled tx ring consumes nothing");
        assert.equal(g.rx.readUsedIdx(), g.rx.lastUsed, "a disabled rx ring produces nothing");

        if (v.needReply) {
          fe.setVringEnable(0, true, { needReply: true });
          fe.setVringEnable(1, true, { needReply: true });
          // The tx enable is acked: the enable, and the work the remembered kick released,
          // are done (checked before anything else reaches the back end).
          hostFd = acceptRaw(listenFd);
          assert.ok(
            hostFd >= 0,
            `the REQUEST was processed before SET_VRING_ENABLE was acked (accept: ${hostFd})`,
          );
          if (fe.ownsQueue(2)) fe.setVringEnable(2, true, { needReply: true });
        } else {
          g.enableRings();
          await waitUntil(
            () => (hostFd = acceptRaw(listenFd)) >= 0,
            START_LATENCY_MS,
            "the host listener to get the guest's connection after the enable",
          );
        }
        const resp = await g.waitPacket(
          (p) => p.header.op === VIRTIO_VSOCK_OP_RESPONSE,
          START_LATENCY_MS,
          "the RESPONSE to the early REQUEST",
        );
        assert.equal(resp.header.dstPort, 1234);
        assert.equal(resp.header.srcPort, 6000);
        assert.equal(g.kicks, 2, "only the two early kicks");
        // The connection works both ways.
        if (g.send({ op: VIRTIO_VSOCK_OP_RW, srcPort: 1234, dstPort: 6000 }, enc.encode("ping"))) {
          g.kick(1);
        }
        const host = new RawHostSocket(hostFd);
        hostFd = -1;
        await host.waitText("ping", 2000);
        host.send("pong");
        const pong = await g.waitPacket(
          (p) => p.header.op === VIRTIO_VSOCK_OP_RW,
          2000,
          "host data",
        );
        assert.equal(dec.decode(pong.payload), "pong");
        host.close();
        assert.equal(fe.hasPendingInput(), false, "no stray replies");
      } finally {
        close(listenFd);
        if (hostFd >= 0) close(hostFd);
      }
    }, { logLevel: "debug" }); // the debug log shows when early kicks were taken
  });
}

for (const { profile, packed } of VM_SETUPS) {
  Deno.test(`never drop a kick: an RX kick before SET_VRING_ENABLE is remembered: a pending host CONNECT reaches the guest on enable [${profile}${rings(packed)}]`, async () => {
    await withBackend({ profile, packed }, async (backend, connectFrontEnd) => {
      const fe = await connectFrontEnd();
      const host = RawHostSocket.connect(backend.udsPath);
      try {
        host.send("CONNECT 5000\n");
        await waitForLog(backend, "host app connecting to guest port 5000");
        const g = new RawGuest(fe);
        g.setupRings();
        assert.equal(g.postRx(16), true, "the driver's rx fill asks for a kick");
        g.kick(0);
        await waitForLog(backend, "vring 0 kicked while inactive");
        await sleep(20);
        assert.equal(g.rx.packed, packed, "ring layout");
        assert.equal(g.rx.readUsedIdx(), g.rx.lastUsed, "a disabled rx ring produces nothing");
        const t0 = performance.now();
        g.enableRings({ needReply: true });
        const req = await g.waitPacket(
          (p) => p.header.op === VIRTIO_VSOCK_OP_REQUEST,
          START_LATENCY_MS,
          "the REQUEST after the enable",
        );
        console.log(`REQUEST ${(performance.now() - t0).toFixed(1)} ms after the enable`);
        assert.equal(req.header.dstPort, 5000);
        assert.equal(g.kicks, 1, "only the early kick");
        if (g.send({ op: VIRTIO_VSOCK_OP_RESPONSE, srcPort: 5000, dstPort: req.header.srcPort })) {
          g.kick(1);
        }
        await host.waitText(`OK ${req.header.srcPort}\n`, 2000);
      } finally {
        host.close();
      }
    }, { logLevel: "debug" }); // the debug log shows when early kicks were taken
  });
}
