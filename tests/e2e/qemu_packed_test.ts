/**
 * End-to-end: packed virtqueues (virtio 1.3 section 2.8, VIRTIO_F_RING_PACKED) with a real
 * Linux guest. QEMU's `vhost-user-vsock-pci,packed=on` lets the back end's offer of the bit
 * through; the guest's virtio driver then lays out both rings (rx, tx) as packed rings and the
 * back end runs them with `PackedQueue`. One boot checks that the bit was negotiated (the
 * guest's `features` file in sysfs, and the back end's log), then moves data both ways
 * (8 MiB guest->host, a 4 MiB echo host->guest: many laps of the 128-entry rings, so the wrap
 * counters flip many times), reloads the guest's driver (the rings restart at offset 0, wrap
 * counter 1) and moves data again.
 */
import assert from "node:assert/strict";
import { GuestVM, skipE2e } from "./guest_vm.ts";
import { BackendProcess } from "./backend.ts";
import {
  BOOT_TIMEOUT_MS,
  GUEST_CMD_TIMEOUT_MS,
  GUEST_KERNEL_ARGS,
  type GuestDiagnostics,
  guestOk,
  report,
} from "./e2e_util.ts";
import { echoThroughGuest, guestToHostFile } from "./transfers.ts";
import { VIRTIO_F_RING_PACKED } from "../../lib/virtio/features.ts";

const ignore = skipE2e("packed rings");

const GUEST_CID = 3;
const MiB = 1024 * 1024;

/** The guest's negotiated feature bits of its vsock device ('0'/'1' per bit, bit 0 first). */
async function guestFeatureBits(d: GuestDiagnostics): Promise<string> {
  const out = await guestOk(
    d,
    "cat /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio*/features",
  );
  return out.trim();
}

Deno.test({
  name: "e2e: packed virtqueues (packed=on): negotiated, data both ways, driver reload",
  ignore,
  sanitizeOps: false,
  sanitizeResources: false,
}, async (t) => {
  const backend = await BackendProcess.start({ guestCid: GUEST_CID });
  let vm: GuestVM | undefined;
  try {
    vm = await GuestVM.boot({
      vhostSocket: backend.socket,
      timeoutMs: BOOT_TIMEOUT_MS,
      kernelArgs: GUEST_KERNEL_ARGS,
      vsockDeviceProps: "packed=on",
    }).catch((e) => {
      throw new Error(`${(e as Error).message}\n${backend.logTail()}`);
    });
    report("guest boot (packed=on)", vm.bootMs);
    const d = { vm, backend };

    await t.step("the guest's driver negotiated VIRTIO_F_RING_PACKED", async () => {
      const bits = await guestFeatureBits(d);
      assert.equal(bits[VIRTIO_F_RING_PACKED], "1", `guest feature bits ${bits}`);
    });
    await t.step(
      "guest->host 8 MiB over packed rings arrives intact",
      () => guestToHostFile(d, 5300, 8 * MiB, "packed rings: guest->host 8 MiB"),
    );
    await t.step(
      "host->guest echo of 4 MiB over packed rings is intact",
      () => echoThroughGuest(d, 6300, 4 * MiB, "packed rings: host->guest echo 4 MiB"),
    );
    await t.step("after a driver reload (rings restart), data still flows", async () => {
      await d.vm.reloadVsockDriver(GUEST_CMD_TIMEOUT_MS).catch((e) => {
        throw new Error(`${(e as Error).message}\n${backend.logTail()}`);
      });
      assert.equal((await guestFeatureBits(d))[VIRTIO_F_RING_PACKED], "1");
      await guestToHostFile(d, 5301, 8 * MiB, "packed rings: guest->host 8 MiB after a reload");
      await echoThroughGuest(d, 6301, 4 * MiB, "packed rings: host->guest echo after a reload");
    });
    assert.deepEqual(backend.errorLines(), []);
  } finally {
    await vm?.shutdown();
    await backend.stop();
  }
});
