/**
 * Enable notification, then re-check (QEMU "network stall waiting for kick"): the device runs out
 * of RX buffers with a packet pending; between its empty check and its notification enable the
 * guest adds buffers and, seeing notifications still off, does not kick. The device must re-check
 * the ring after enabling notifications and deliver the packet. The interleaving is injected at the
 * device's write of the notification enable (a split ring's avail_event, a packed ring's device
 * event suppression off_wrap) through the guest-memory write hook. Split and packed rings alike.
 */
import assert from "node:assert/strict";
import { connectUnix, readRaw, writeRaw } from "../../ffi/mod.ts";
import { InProcessVm } from "./inprocess.ts";
import { VIRTIO_VSOCK_OP_REQUEST } from "../../lib/vsock/constants.ts";

for (const packed of [false, true]) {
  const rings = packed ? "packed" : "split";

  Deno.test(`enable notification, then re-check: buffers added between the empty check and the notification enable are used [${rings} rings]`, () => {
    const vm = new InProcessVm(3, packed);
    try {
      vm.activate(); // rings live, RX empty
      let injected = false;
      let kickWanted: boolean | null = null;
      const enableGpa = vm.notifyEnableGpa(vm.rxDrv);
      vm.mem.onDeviceWrite = (gpa) => {
        if (gpa === enableGpa && !injected) {
          // The device just re-armed notifications after finding RX empty. The guest
          // added buffers before that write became visible to it: it decided on the
          // stale notification state and sends no kick. Only a re-check can find them.
          injected = true;
          kickWanted = vm.postRxBuffers(4);
        }
      };
      // A host app connects: the device owes the guest a REQUEST but has no buffer.
      const host = connectUnix(vm.udsPath);
      writeRaw(host, new TextEncoder().encode("CONNECT 1234\n"));
      vm.run(6);
      assert.ok(injected, "the device enabled RX notifications after running dry");
      const pkts = vm.reapRx();
      assert.equal(
        pkts.length,
        1,
        `the REQUEST was delivered though the guest never kicked (a real guest racing would have decided kick=${kickWanted} on a stale notification state)`,
      );
      assert.equal(pkts[0].op, VIRTIO_VSOCK_OP_REQUEST);
      assert.equal(pkts[0].dstPort, 1234);
      assert.equal(
        readRaw(host, new Uint8Array(16)) < 0,
        true,
        "no OK yet: the guest has not accepted",
      );
    } finally {
      vm.dispose();
    }
  });

  Deno.test(`enable notification, then re-check: with no buffers the device sleeps with notifications armed, and a kick wakes it [${rings} rings]`, () => {
    const vm = new InProcessVm(3, packed);
    try {
      vm.activate();
      const host = connectUnix(vm.udsPath);
      writeRaw(host, new TextEncoder().encode("CONNECT 77\n"));
      vm.run(4);
      assert.equal(vm.reapRx().length, 0);
      const kick = vm.postRxBuffers(2);
      assert.equal(
        kick,
        true,
        "the device armed notifications, so the guest's add asks for a kick",
      );
      vm.device.queueKicked(0);
      vm.run(1, 0);
      const pkts = vm.reapRx();
      assert.equal(pkts.length, 1);
      assert.equal(pkts[0].dstPort, 77);
    } finally {
      vm.dispose();
    }
  });
}
