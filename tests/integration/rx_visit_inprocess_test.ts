/**
 * How soon an interactive message reaches the guest while bulk data fills its rx ring, in
 * process (see inprocess.ts):
 * - rx visits are bounded (RX_VISIT_BYTES): a host socket that becomes readable during bulk
 *   fills is seen after at most one visit's worth of bulk buffers, because the device hands
 *   the reactor back between visits (`Reactor.again`: no sleep) instead of filling the whole
 *   ring first;
 * - a sparse flow's packet is published (used.idx) as soon as it is written, not after the
 *   rest of the visit's bulk buffers.
 * Each test fails on the device as it was before (one visit filled every posted buffer; the
 * used ring was published every 32 chains and at the end of the visit).
 */
import assert from "node:assert/strict";
import { close, setNonBlocking, writeRaw } from "../../ffi/mod.ts";
import { RX_VISIT_BYTES } from "../../lib/vsock/device.ts";
import { VIRTIO_VSOCK_OP_RW } from "../../lib/vsock/constants.ts";
import { VRING_USED_IDX } from "../../lib/virtio/split_layout.ts";
import { establishStream, InProcessGuest, InProcessVm, QUEUE_SIZE } from "./inprocess.ts";

const BUF = 4096;

/**
 * A device with two host-initiated streams: `bulk` (guest port 1234) with as much data
 * queued in its host socket as the socket takes (more than the guest's ring holds, less
 * than its credit), and `ping` (guest port 1235), idle.
 */
function bulkAndPing<P extends boolean>(packed: P) {
  const vm = new InProcessVm(3, packed);
  const g = new InProcessGuest(vm);
  vm.activate();
  const bulk = establishStream(vm, g, 1234);
  const ping = establishStream(vm, g, 1235);
  setNonBlocking(bulk.host);
  const chunk = new Uint8Array(QUEUE_SIZE * BUF + 8 * BUF).fill(7);
  let queued = 0;
  while (queued < chunk.length) {
    const n = writeRaw(bulk.host, chunk.subarray(queued), chunk.length - queued);
    if (n <= 0) break;
    queued += n;
  }
  return { vm, g, bulk, ping, queued };
}

for (const packed of [false, true]) {
  const rings = packed ? "packed" : "split";

  Deno.test(`rx visits are bounded: a socket readable during bulk fills goes next, after at most RX_VISIT_BYTES [${rings} rings]`, () => {
    const { vm, g, bulk, ping, queued } = bulkAndPing(packed);
    try {
      // The first visit stops with bulk data left; one visit over the ring would take it all.
      assert.ok(queued > RX_VISIT_BYTES + 16 * BUF, `only ${queued} bulk bytes in the socket`);
      g.postRx(BUF, QUEUE_SIZE);
      vm.reactor.runOnce(0); // the bulk socket is readable: one visit
      // The interactive connection's message arrives while bulk data is still waiting.
      writeRaw(ping.host, new Uint8Array([42]));
      vm.run(4, 0);
      const got = vm.reapRx();
      const firstPing = got.findIndex((h) => h.dstPort === 1235);
      assert.ok(firstPing >= 0, "the interactive message reached the guest");
      assert.equal(got[firstPing].op, VIRTIO_VSOCK_OP_RW);
      assert.equal(got[firstPing].len, 1);
      const bulkBefore = got.slice(0, firstPing).filter((h) => h.dstPort === 1234).length;
      assert.ok(
        bulkBefore <= RX_VISIT_BYTES / BUF,
        `${bulkBefore} bulk buffers went to the guest before the interactive message ` +
          `(at most ${RX_VISIT_BYTES / BUF}: one visit)`,
      );
      assert.ok(bulkBefore > 0, "the first visit did fill bulk buffers");
      close(bulk.host);
      close(ping.host);
    } finally {
      vm.dispose();
    }
  });
}

Deno.test("a sparse flow's packet is published at once, not after the visit's bulk buffers", () => {
  const { vm, g, bulk, ping, queued } = bulkAndPing(false);
  try {
    assert.ok(queued > 160 * 1024, `only ${queued} bulk bytes in the socket`);
    // The bulk flow uses up its first quantum (16 buffers) and joins the round robin.
    g.postRx(BUF, 20);
    vm.run(2, 0);
    assert.equal(vm.reapRx().length, 20);
    writeRaw(ping.host, new Uint8Array([42]));
    // Every publication of used.idx: how many new entries the guest could see at that moment.
    const idxGpa = vm.rxDrv.usedGpa + VRING_USED_IDX;
    const view = vm.mem.regions[0].view;
    const base = view.getUint16(idxGpa, true);
    const seen: number[] = [];
    vm.mem.onDeviceWrite = (gpa) => {
      if (gpa === idxGpa) seen.push((view.getUint16(idxGpa, true) - base) & 0xffff);
    };
    g.postRx(BUF, 40);
    vm.reactor.runOnce(0); // one visit: the interactive (sparse) message first, then bulk
    vm.mem.onDeviceWrite = null;
    const got = vm.reapRx();
    assert.equal(got[0].dstPort, 1235, "the interactive message went first");
    assert.ok(got.length > 16, `the visit also filled bulk buffers (${got.length} used)`);
    assert.equal(seen[0], 1, `first publication showed ${seen[0]} entries, not the message alone`);
    close(bulk.host);
    close(ping.host);
  } finally {
    vm.dispose();
  }
});
