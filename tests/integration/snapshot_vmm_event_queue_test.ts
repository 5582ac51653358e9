/**
 * Snapshot/restore with QEMU-style front ends, which keep the event queue: the back end never
 * gets vring 2 nor writes event-queue memory and the VMM injects TRANSPORT_RESET; QEMU 7.2
 * offers no way to migrate (DEVICE_STATE offered but not acked, SET_DEVICE_STATE_FD then fails
 * with an error reply); a VMM that keeps the event queue, caches the config and loads state
 * gets traffic flowing after its own TRANSPORT_RESET.
 */
import assert from "node:assert/strict";
import { close, pipe, readRaw, setNonBlocking } from "../../ffi/mod.ts";
import {
  type BackendProcess,
  hostConnect,
  spawnBackend,
  startVm,
  VhostUserError,
  VhostUserFrontEnd,
} from "../../lib/testing/mod.ts";
import { encodeDeviceState } from "../../lib/vhost_user/messages.ts";
import {
  VHOST_TRANSFER_STATE_DIRECTION_SAVE,
  VHOST_TRANSFER_STATE_PHASE_STOPPED,
  VHOST_USER_DEVICE_STATE_ERROR_MASK,
  VhostUserProtocolFeatureMask as PF,
  VhostUserRequest as R,
} from "../../lib/vhost_user/protocol.ts";
import {
  closeBothWays,
  exchange,
  openBothWays,
  waitForLog,
  withStderr,
} from "./snapshot_helpers.ts";

// ---------------------------------------------------------------------------------------
// QEMU-style front ends: the VMM keeps the event queue
// ---------------------------------------------------------------------------------------

Deno.test("qemu: the back end never gets vring 2 nor writes event-queue memory; the VMM's event works", async () => {
  const vm = await startVm({ profile: "qemu", cid: 5 });
  try {
    await withStderr(() => [vm.backend], async () => {
      const c = await openBothWays(vm.guest, vm.udsPath, 5000, 6000);
      await exchange(c.h2g.conn, c.g1, 100_000, 51);
      await exchange(c.g2h, c.g2, 100_000, 53);
      const vringRequests = new Set<number>([
        R.SET_VRING_NUM,
        R.SET_VRING_ADDR,
        R.SET_VRING_BASE,
        R.GET_VRING_BASE,
        R.SET_VRING_KICK,
        R.SET_VRING_CALL,
        R.SET_VRING_ERR,
        R.SET_VRING_ENABLE,
        R.VRING_KICK,
      ]);
      const vringMsgs = vm.frontEnd.trace.filter((t) => vringRequests.has(t.request));
      assert.ok(vringMsgs.length > 0);
      for (const t of vringMsgs) {
        const index = new DataView(t.payload.buffer, t.payload.byteOffset).getUint32(0, true) &
          0xff;
        assert.ok(index < 2, `${t.name} names vring ${index}`);
      }
      // The event ring's used area is the device side's: nobody but the VMM writes it.
      const ev = vm.guest.queueSetups[2];
      const used = vm.memory.read(ev.usedGpa, 6 + 8 * ev.size);
      assert.ok(used.every((b) => b === 0), "the back end wrote nothing into the event ring");
      assert.equal(vm.guest.stats.interrupts[2], 0);

      // QEMU injects TRANSPORT_RESET itself.
      vm.guest.injectTransportReset();
      assert.equal(c.g1.closeReason, "transport-reset");
      assert.equal(c.g2.closeReason, "transport-reset");
      assert.equal(vm.guest.queue(2).readUsedIdx(), 1);
      c.h2g.conn.close();
      c.g2h.close();
      // Nothing was loaded, so nothing is held: new traffic flows at once.
      const now = await openBothWays(vm.guest, vm.udsPath, 5000, 6001, c.listener);
      await exchange(now.h2g.conn, now.g1, 20_000, 55);
      now.h2g.conn.close();
      now.g2h.close();
      await now.g1.close();
      await now.g2.close();
      assert.deepEqual(vm.guest.anomalies, []);
    });
  } finally {
    await vm.stop();
  }
});

Deno.test("qemu 7.2: DEVICE_STATE offered but not acked; SET_DEVICE_STATE_FD then fails cleanly", async () => {
  const vm = await startVm({ profile: "qemu", cid: 5 });
  try {
    await withStderr(() => [vm.backend], async () => {
      const fe = vm.frontEnd;
      assert.ok(fe.backendProtocolFeatures & PF.DEVICE_STATE, "offered");
      assert.equal(fe.ackedProtocolFeatures & PF.DEVICE_STATE, 0n, "QEMU 7.2 does not ack it");
      await assert.rejects(fe.saveDeviceState(), /unmigratable/);

      // A front end that sends it anyway (rings stopped, as for a real save).
      const bases = vm.guest.suspend();
      const [r, w] = pipe(false);
      let reply: bigint | string;
      try {
        const res = fe.request(
          R.SET_DEVICE_STATE_FD,
          encodeDeviceState({
            direction: VHOST_TRANSFER_STATE_DIRECTION_SAVE,
            phase: VHOST_TRANSFER_STATE_PHASE_STOPPED,
          }),
          [w],
          { expectReply: true, timeoutMs: 2000 },
        )!;
        reply = new DataView(res.payload.buffer, res.payload.byteOffset).getBigUint64(0, true);
      } catch (e) {
        if (!(e instanceof VhostUserError)) throw e;
        reply = e.message;
      }
      close(w);
      // The back end kept no copy of the fd: our read end sees EOF at once.
      setNonBlocking(r);
      assert.equal(readRaw(r, new Uint8Array(16)), 0, "the back end closed the state fd");
      close(r);
      assert.equal(fe.hasPendingInput(), false, "no stray reply");
      await waitForLog(vm.backend, /DEVICE_STATE was not negotiated/);
      vm.guest.resume(bases);
      const c = await openBothWays(vm.guest, vm.udsPath, 5000, 6000);
      await exchange(c.h2g.conn, c.g1, 5000, 61);
      await closeBothWays(c);
      // The reply to SET_DEVICE_STATE_FD is mandatory (vhost-user.rst: "Reply payload: u64");
      // a front end blocks on it, so a refusal must come as an error reply, not silence.
      assert.equal(typeof reply, "bigint", `SET_DEVICE_STATE_FD got no reply: ${reply}`);
      assert.notEqual(
        Number(reply as bigint) & VHOST_USER_DEVICE_STATE_ERROR_MASK,
        0,
        "error bits set",
      );
    });
  } finally {
    await vm.stop();
  }
});

Deno.test("a VMM that keeps the event queue and caches the config, loading state: traffic flows after its TRANSPORT_RESET", async () => {
  // Not QEMU 7.2 (unmigratable), but what a QEMU that migrates vhost-user-vsock would do:
  // the event queue stays in the VMM, guest config reads are answered from the config cached
  // at realize (they never reach the back end), and the VMM injects TRANSPORT_RESET.
  const frontEnd = { extraProtocolFeatures: PF.DEVICE_STATE };
  const vm = await startVm({ profile: "qemu", cid: 5, frontEnd });
  let backend2: BackendProcess | null = null;
  try {
    await withStderr(() => [vm.backend, backend2], async () => {
      assert.ok(vm.frontEnd.ackedProtocolFeatures & PF.DEVICE_STATE);
      const c = await openBothWays(vm.guest, vm.udsPath, 5000, 6000);
      const snap = await vm.guest.snapshot();
      backend2 = await spawnBackend({ cid: 5 });
      const fe2 = await VhostUserFrontEnd.connect(backend2.socketPath, {
        profile: "qemu",
        memory: vm.memory,
        ...frontEnd,
      });
      vm.frontEnd.close();
      c.h2g.conn.close();
      c.g2h.close();
      await vm.guest.restore(fe2, snap);
      vm.guest.injectTransportReset(); // QEMU's post-load timer
      assert.equal(c.g1.closeReason, "transport-reset");
      const [host, conn] = await Promise.all([
        hostConnect(backend2.udsPath, 5000, { timeoutMs: 10000 }),
        c.listener.accept({ timeoutMs: 10000 }),
      ]);
      await exchange(host.conn, conn, 5000, 71);
      host.conn.close();
      await conn.close();
    });
  } finally {
    await vm.stop();
    await (backend2 as BackendProcess | null)?.stop();
  }
});
