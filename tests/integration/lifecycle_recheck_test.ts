/**
 * Enable notification, then re-check (QEMU "network stall waiting for kick"): TX and RX enable
 * notifications and re-check the ring when it runs empty. In process (the in-process harness),
 * the guest's add is injected at the device's avail_event write and its kick decision uses the
 * avail_event it read before that write (stale: no kick), so only the re-check finds the
 * buffers. Across processes (`lib/testing`), the device runs out of RX buffers with data pending
 * and the guest's refill must find it armed (EVENT_IDX on and off, split and packed rings).
 */
import assert from "node:assert/strict";
import { close, connectUnix, writeRaw } from "../../ffi/mod.ts";
import {
  PacketHeader,
  pattern,
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_TYPE_STREAM,
  writeAll,
} from "../../lib/testing/mod.ts";
import { VIRTIO_RING_F_EVENT_IDX_MASK } from "../../lib/virtio/features.ts";
import { availEventOffset, vringNeedEvent } from "../../lib/virtio/split_layout.ts";
import { InProcessVm } from "./inprocess.ts";
import { withVm } from "./vm_helpers.ts";
import { GUEST_CID, HOST_CID } from "./raw_guest.ts";
import { hostToGuest, later, rings } from "./lifecycle_helpers.ts";

const enc = new TextEncoder();

// ---------------------------------------------------------------------------------------
// Enable notification, then re-check
// ---------------------------------------------------------------------------------------

Deno.test("enable notification, then re-check (TX): a packet posted between the device's empty check and its notification enable is processed", () => {
  const vm = new InProcessVm();
  try {
    vm.activate(); // both rings live and empty: the device armed TX notifications at 0
    vm.postRxBuffers(8); // room for the replies
    const view = vm.mem.regions[0].view;
    const hdrAt = (i: number) => 0x300000 + 64 * i;
    // An RW for no connection: the device answers each with an RST to src_port.
    const post = (i: number) => {
      const h = new PacketHeader();
      h.srcCid = GUEST_CID;
      h.dstCid = HOST_CID;
      h.srcPort = 100 + i;
      h.dstPort = 7000;
      h.type = VIRTIO_VSOCK_TYPE_STREAM;
      h.op = VIRTIO_VSOCK_OP_RW;
      h.encodeTo(view, hdrAt(i));
      vm.txDrv.addBuffer([{ gpa: hdrAt(i), len: VIRTIO_VSOCK_HDR_SIZE, writable: false }]);
      vm.txDrv.publish();
    };
    post(1);
    post(2);
    assert.equal(vm.txDrv.kickNeeded(), true, "the armed device asks for a kick");
    const staleEvent = vm.txDrv.readAvailEvent();
    const availEventGpa = vm.txDrv.usedGpa + availEventOffset(vm.txDrv.size);
    let injected = false;
    let wouldKick: boolean | null = null;
    vm.mem.onDeviceWrite = (gpa) => {
      if (gpa !== availEventGpa || injected) return;
      // The device drained 1 and 2, found the ring empty and is re-arming. Packet 3 was
      // published before this write became visible: the guest's kick decision read the old
      // avail_event, which says "the device is busy, no kick".
      injected = true;
      const before = vm.txDrv.availIdx;
      post(3);
      wouldKick = vringNeedEvent(staleEvent, vm.txDrv.availIdx, before);
      vm.txDrv.kickNeeded(); // consume the decision; the kick is not delivered
    };
    vm.device.queueKicked(1); // the kick for 1 and 2
    vm.run(4);
    assert.ok(injected, "the device re-armed TX notifications after draining");
    assert.equal(wouldKick, false, "a guest racing the re-arm legitimately sends no kick");
    assert.equal(
      vm.txDrv.readUsedIdx(),
      3,
      "packet 3, published between the empty check and the re-arm, was consumed without a kick",
    );
    const rsts = vm.reapRx().map((h) => h.dstPort).sort();
    assert.deepEqual(rsts, [101, 102, 103], "each packet was processed (an RST for each)");
    // The device sleeps armed: the next packet asks for a kick.
    post(4);
    assert.equal(vm.txDrv.kickNeeded(), true, "notifications armed after the re-check");
  } finally {
    vm.dispose();
  }
});

Deno.test("enable notification, then re-check (RX): buffers posted between the device's empty check and its re-arm, with a stale avail_event, are used", () => {
  const vm = new InProcessVm();
  const hosts: number[] = [];
  try {
    vm.activate(); // rings live, nothing to do: the device has not armed RX (avail_event 0)
    vm.postRxBuffers(2); // the guest's fill; the device takes these without re-arming
    const staleEvent = vm.rxDrv.readAvailEvent();
    const availEventGpa = vm.rxDrv.usedGpa + availEventOffset(vm.rxDrv.size);
    let injected = false;
    let wouldKick: boolean | null = null;
    vm.mem.onDeviceWrite = (gpa) => {
      if (gpa !== availEventGpa || injected) return;
      // The device used both buffers, found the ring empty with a REQUEST still owed and is
      // re-arming. The guest refilled just before: its kick decision read the stale
      // avail_event, outside the window it published, so it does not kick.
      injected = true;
      const before = vm.rxDrv.availIdx;
      vm.postRxBuffers(2);
      wouldKick = vringNeedEvent(staleEvent, vm.rxDrv.availIdx, before);
    };
    for (const port of [1001, 1002, 1003]) {
      const fd = connectUnix(vm.udsPath);
      hosts.push(fd);
      assert.equal(writeRaw(fd, enc.encode(`CONNECT ${port}\n`)), `CONNECT ${port}\n`.length);
    }
    vm.run(6);
    assert.ok(injected, "the device re-armed RX notifications after running dry");
    assert.equal(wouldKick, false, "a guest racing the re-arm legitimately sends no kick");
    const ports = vm.reapRx().filter((h) => h.op === VIRTIO_VSOCK_OP_REQUEST).map((h) => h.dstPort);
    assert.deepEqual(
      ports.sort(),
      [1001, 1002, 1003],
      "the third REQUEST went into a buffer posted during the re-arm, without a kick",
    );
  } finally {
    for (const fd of hosts) close(fd);
    vm.dispose();
  }
});

for (const [eventIdx, packed] of [[true, false], [false, false], [true, true], [false, true]]) {
  Deno.test(`enable notification, then re-check: the device runs out of RX buffers with host data pending and resumes on refill [EVENT_IDX ${eventIdx ? "on" : "off"}${rings(packed)}]`, async () => {
    await withVm({
      profile: "qemu",
      frontEnd: { eventIdx, packed },
      guest: { rxBuffers: 32 },
    }, async (vm) => {
      const g = vm.guest;
      assert.equal((g.features & VIRTIO_RING_F_EVENT_IDX_MASK) !== 0n, eventIdx);
      assert.equal(g.packed, packed);
      const a = await hostToGuest(vm, 5000);
      for (let round = 0; round < 4; round++) {
        vm.faults.starveRx();
        const data = pattern(400_000, round + 1); // > 32 buffers of 4 KiB
        const writing = later(writeAll(a.host.conn, data));
        const reading = later(a.conn.readExactly(data.length, { timeoutMs: 10_000 }));
        await g.waitFor(() => g.rxPosted === 0, 5000, "the device to use every rx buffer");
        await g.idle(100); // the device has data pending and no buffer: it goes to sleep
        const got = a.conn.bytesReceived;
        await g.idle(50);
        assert.equal(a.conn.bytesReceived, got, "nothing arrives without buffers");
        const kicks = g.stats.kicks[0];
        assert.ok(vm.faults.refillRx() > 0);
        assert.equal(
          g.stats.kicks[0],
          kicks + 1,
          "the device armed RX notifications before sleeping, so the refill kicked it",
        );
        assert.deepEqual(await reading, data, `round ${round}: all data arrived`);
        await writing;
      }
      a.host.conn.close();
      await a.conn.close();
    });
  });
}
