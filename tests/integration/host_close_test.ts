/**
 * Host apps that go away: a full close of the host socket is a full close toward the guest
 * (SHUTDOWN with both flags, the host fd freed at once, RST after SHUTDOWN_TIMEOUT_MS if
 * the guest never answers), so connect-and-close clients cannot pin the connection table;
 * and after a restore where the VMM delivers TRANSPORT_RESET itself (QEMU style), a
 * connection the driver dropped on that reset does not leave its host app holding an OK.
 */
import assert from "node:assert/strict";
import {
  HostConnectError,
  startVm,
  VhostUserFrontEnd,
  type VmHandle,
} from "../../lib/testing/mod.ts";
import { spawnBackend } from "../../lib/testing/backend_process.ts";
import { VhostUserProtocolFeatureMask as PF } from "../../lib/vhost_user/protocol.ts";
import {
  VIRTIO_VSOCK_OP_SHUTDOWN,
  VIRTIO_VSOCK_SHUTDOWN_F_BOTH,
} from "../../lib/vsock/constants.ts";
import { hostConnect } from "../../lib/testing/host.ts";

/** Awaits `p` while the emulated guest runs (it only handles packets while polled). */
async function pumped<T>(vm: VmHandle, p: Promise<T>): Promise<T> {
  let done = false;
  p.then(() => done = true, () => done = true);
  while (!done) await vm.guest.idle(5);
  return p;
}

Deno.test("connect-then-close host apps never exhaust the connection table", async () => {
  const vm = await startVm({ backend: { extraArgs: ["--max-connections", "8"] } });
  try {
    // The guest listens but its app never accepts: connections wait in the backlog, as in
    // Linux, and only the back end can end them.
    const listener = vm.guest.listen(5000);
    const cap = vm.guest.capture();
    // Host ports whose connection the guest was told is closed both ways.
    const fullyClosed = () =>
      new Set(
        cap.packets.filter((p) =>
          p.direction === "rx" && p.header.op === VIRTIO_VSOCK_OP_SHUTDOWN &&
          p.header.flags === VIRTIO_VSOCK_SHUTDOWN_F_BOTH
        ).map((p) => p.header.srcPort),
      ).size;
    for (let i = 0; i < 24; i++) {
      let host;
      try {
        host = await pumped(vm, vm.hostConnect(5000, { timeoutMs: 5000 }));
      } catch (e) {
        if (e instanceof HostConnectError) {
          assert.fail(`CONNECT ${i} refused: the table filled with closed host apps`);
        }
        throw e;
      }
      host.conn.close();
    }
    // Every one of them was told to the guest as a full close.
    await vm.guest.waitFor(() => fullyClosed() === 24, 5000, "24 full SHUTDOWNs");
    cap.stop();
    listener.close();
  } finally {
    await vm.stop();
  }
});

for (const when of ["before", "after"] as const) {
  Deno.test(`VMM-delivered TRANSPORT_RESET ${when} a host CONNECT: no host app keeps an OK for a dropped connection`, async () => {
    const frontEnd = { extraProtocolFeatures: PF.DEVICE_STATE };
    const vm = await startVm({ profile: "qemu", cid: 5, frontEnd });
    const backend2 = await spawnBackend({ cid: 5 });
    try {
      const listener = vm.guest.listen(5000);
      const snap = await vm.guest.snapshot();
      const fe2 = await VhostUserFrontEnd.connect(backend2.socketPath, {
        profile: "qemu",
        memory: vm.memory,
        ...frontEnd,
      });
      vm.frontEnd.close();
      await vm.guest.restore(fe2, snap);
      if (when === "before") vm.guest.injectTransportReset();
      const [host, conn] = await Promise.all([
        // The guest accepts right away (its reset not handled yet in the "after" case).
        hostConnect(backend2.udsPath, 5000, { timeoutMs: 5000 }),
        listener.accept({ timeoutMs: 5000 }),
      ]);
      if (when === "after") {
        // QEMU's post-load event reaches the driver now: it drops the connection silently.
        vm.guest.injectTransportReset();
        assert.equal(conn.closeReason, "transport-reset");
        // The back end confirms connections opened around the reset: the guest answers RST
        // for the dropped one, and the host app sees its socket closed.
        const buf = new Uint8Array(16);
        const n = await pumped(
          vm,
          Promise.race([
            host.conn.read(buf),
            new Promise<"timeout">((r) => setTimeout(() => r("timeout"), 5000)),
          ]),
        );
        assert.equal(n, null, "the host app saw EOF, not an open connection to nobody");
      } else {
        // The reset came first: the connection is real and survives the confirmation.
        await vm.guest.idle(1000);
        await conn.write(new TextEncoder().encode("still here"));
        const buf = new Uint8Array(16);
        const n = await pumped(vm, host.conn.read(buf));
        assert.equal(new TextDecoder().decode(buf.subarray(0, n ?? 0)), "still here");
        await conn.close();
      }
      host.conn.close();
      listener.close();
    } finally {
      await vm.stop();
      await backend2.stop();
    }
  });
}
