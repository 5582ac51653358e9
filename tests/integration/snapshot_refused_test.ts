/**
 * Device states the back end refuses: corrupt, truncated, newer-version, garbage and empty
 * states (SET_DEVICE_STATE_FD(LOAD), then CHECK_DEVICE_STATE reports failure) are refused with
 * a clear log line and the back end keeps working, also for a fresh front end; state transfers
 * (save and load) while the rings run are refused and change nothing.
 */
import assert from "node:assert/strict";
import {
  close,
  EAGAIN,
  EPIPE,
  pipe,
  pollFdsAsync,
  POLLOUT,
  readRaw,
  setNonBlocking,
  writeRaw,
} from "../../ffi/mod.ts";
import {
  type BackendProcess,
  type DeviceStateFdReply,
  pattern,
  spawnBackend,
  startVm,
  VhostUserFrontEnd,
  VsockGuest,
} from "../../lib/testing/mod.ts";
import { decodeSnapshot, encodeSnapshot } from "../../lib/snapshot/format.ts";
import { crc32 } from "../../lib/snapshot/crc32.ts";
import {
  VHOST_TRANSFER_STATE_DIRECTION_LOAD,
  VHOST_TRANSFER_STATE_DIRECTION_SAVE,
} from "../../lib/vhost_user/protocol.ts";
import {
  closeBothWays,
  exchange,
  openBothWays,
  restoreWithoutKicks,
  waitForLog,
  withStderr,
} from "./snapshot_helpers.ts";
import { freshBackEnd } from "./vm_helpers.ts";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/** SET_DEVICE_STATE_FD(LOAD) with `bytes` written to the pipe, then CHECK_DEVICE_STATE. */
async function loadRaw(
  fe: VhostUserFrontEnd,
  bytes: Uint8Array,
  timeoutMs = 5000,
): Promise<{ reply: DeviceStateFdReply; check: bigint }> {
  let [r, w] = pipe(false);
  try {
    setNonBlocking(w);
    const reply = fe.setDeviceStateFd(VHOST_TRANSFER_STATE_DIRECTION_LOAD, r);
    close(r);
    r = -1;
    const deadline = Date.now() + timeoutMs;
    let off = 0;
    while (off < bytes.length) {
      const n = writeRaw(w, bytes.subarray(off), bytes.length - off);
      if (n >= 0) {
        off += n;
        continue;
      }
      if (n === -EPIPE) break; // the back end stopped reading (refused the state)
      if (n !== -EAGAIN) throw new Error(`writing the state: errno ${-n}`);
      if (Date.now() >= deadline) throw new Error(`state not taken within ${timeoutMs} ms`);
      await pollFdsAsync([w], [POLLOUT], 100);
    }
    close(w);
    w = -1;
    return { reply, check: fe.checkDeviceState() };
  } finally {
    if (r >= 0) close(r);
    if (w >= 0) close(w);
  }
}

/** A copy of a state with its CRC-32 recomputed (after editing header or body). */
function reseal(state: Uint8Array): Uint8Array {
  const out = state.slice();
  const v = new DataView(out.buffer);
  const end = out.length - 4;
  v.setUint32(end, crc32(out.subarray(0, end)), true);
  return out;
}

// ---------------------------------------------------------------------------------------
// Bad states and refused transfers
// ---------------------------------------------------------------------------------------

Deno.test("corrupt, truncated, newer, garbage and empty states are refused; the back end keeps working", async () => {
  const vm = await startVm({ profile: "crosvm", cid: 9 });
  let backend2: BackendProcess | null = null;
  try {
    await withStderr(() => [vm.backend, backend2], async () => {
      const old = await openBothWays(vm.guest, vm.udsPath, 5000, 6000);
      const snap = await vm.guest.snapshot();
      const good = snap.deviceState;
      const fresh = await freshBackEnd(vm, 9);
      backend2 = fresh.backend;
      const fe2 = fresh.fe;
      vm.frontEnd.close();
      fe2.setFeatures(fe2.backendFeaturesFor(snap.features));

      const flipped = good.slice();
      flipped[20] ^= 0x01; // a byte of the JSON body
      const newer = good.slice();
      new DataView(newer.buffer).setUint32(8, 2, true);
      const badBody = encodeSnapshot({ ...decodeSnapshot(good), guestCid: 2 ** 40 });
      const notJsonRaw = good.slice();
      notJsonRaw[16] = 0x7c; // "{" -> "|"
      const notJson = reseal(notJsonRaw);
      const cases: [string, Uint8Array, RegExp][] = [
        ["truncated (last 10 bytes cut)", good.subarray(0, good.length - 10), /length mismatch/],
        ["truncated (header only)", good.subarray(0, 12), /state truncated: 12 bytes/],
        ["a flipped body byte", flipped, /checksum mismatch/],
        ["a newer version, resealed", reseal(newer), /version 2 is not supported/],
        ["a newer version", newer, /version 2 is not supported/],
        ["random garbage", pattern(300, 77), /bad magic/],
        ["an empty pipe", new Uint8Array(0), /state truncated: 0 bytes/],
        ["a body of the wrong shape", badBody, /guestCid is not a u32/],
        ["a body that is not JSON", notJson, /not JSON/],
        ["more than 1 MiB", new Uint8Array((1 << 20) + 4096), /state larger than/],
      ];
      for (const [what, bytes, reason] of cases) {
        const before = backend2!.stderr().length;
        const { reply, check } = await loadRaw(fe2, bytes);
        assert.equal(reply.error, 0, `${what}: the transfer itself is accepted`);
        assert.equal(reply.backendFd, null, `${what}: bit 8 (no fd returned)`);
        assert.notEqual(check, 0n, `${what}: CHECK_DEVICE_STATE reports failure`);
        await waitForLog(backend2!, reason, 5000, before); // logged for this load
        assert.match(
          backend2!.stderr().slice(before),
          /WARN +(\[w\d+ cid [\d,]+\] )?device state: /,
          `${what}: a warning`,
        );
        assert.ok(backend2!.running, `${what}: the back end is still running`);
      }
      assert.doesNotMatch(backend2!.stderr(), /TRANSPORT_RESET owed/, "nothing was loaded");

      // A good load on the same back end then succeeds and the device works.
      await restoreWithoutKicks(vm.guest, fe2, snap);
      await vm.guest.waitFor(() => old.g1.closed, 5000, "TRANSPORT_RESET after the good load");
      old.h2g.conn.close();
      old.g2h.close();
      const now = await openBothWays(vm.guest, backend2!.udsPath, 5000, 6001, old.listener);
      await exchange(now.h2g.conn, now.g1, 10_000, 81);
      await exchange(now.g2h, now.g2, 10_000, 83);
      now.h2g.conn.close();
      now.g2h.close();
      await now.g1.close();
      await now.g2.close();
      assert.deepEqual(vm.guest.anomalies, []);
    });
  } finally {
    await vm.stop();
    await (backend2 as BackendProcess | null)?.stop();
  }
});

Deno.test("corrupt state: a fresh front end on the same back end boots normally afterwards", async () => {
  const backend = await spawnBackend({ cid: 4 });
  let guest: VsockGuest | null = null;
  let fe: VhostUserFrontEnd | null = null;
  try {
    await withStderr(() => [backend], async () => {
      const fe1 = await VhostUserFrontEnd.connect(backend.socketPath, { profile: "crosvm" });
      try {
        const { check } = await loadRaw(fe1, pattern(64, 3));
        assert.notEqual(check, 0n);
      } finally {
        fe1.close();
      }
      fe = await VhostUserFrontEnd.connect(backend.socketPath, { profile: "crosvm" });
      guest = await VsockGuest.boot(fe);
      const c = await openBothWays(guest, backend.udsPath, 5000, 6000);
      await exchange(c.h2g.conn, c.g1, 10_000, 91);
      await exchange(c.g2h, c.g2, 10_000, 93);
      await closeBothWays(c);
      assert.deepEqual(guest.anomalies, []);
    });
  } finally {
    await (guest as VsockGuest | null)?.close();
    (fe as VhostUserFrontEnd | null)?.close();
    await backend.stop();
  }
});

Deno.test("SET_DEVICE_STATE_FD while the rings run is refused (save and load); nothing changes", async () => {
  const vm = await startVm({ profile: "crosvm", cid: 9 });
  try {
    await withStderr(() => [vm.backend], async () => {
      const c = await openBothWays(vm.guest, vm.udsPath, 5000, 6000);
      const fe = vm.frontEnd;

      const [r1, w1] = pipe(false);
      const save = fe.setDeviceStateFd(VHOST_TRANSFER_STATE_DIRECTION_SAVE, w1);
      close(w1);
      assert.notEqual(save.error, 0, "save refused");
      assert.equal(save.backendFd, null);
      setNonBlocking(r1);
      assert.equal(readRaw(r1, new Uint8Array(16)), 0, "EOF: nothing written, fd closed");
      close(r1);
      assert.notEqual(fe.checkDeviceState(), 0n);

      const [r2, w2] = pipe(false);
      const load = fe.setDeviceStateFd(VHOST_TRANSFER_STATE_DIRECTION_LOAD, r2);
      close(r2);
      assert.notEqual(load.error, 0, "load refused");
      setNonBlocking(w2);
      assert.equal(writeRaw(w2, new Uint8Array(1)), -EPIPE, "the back end closed its read end");
      close(w2);
      assert.notEqual(fe.checkDeviceState(), 0n);
      await waitForLog(vm.backend, /state transfer requested while rings are running/);

      // The open connections were not touched.
      await exchange(c.h2g.conn, c.g1, 20_000, 101);
      await exchange(c.g2h, c.g2, 20_000, 103);
      assert.equal(vm.guest.queue(2).readUsedIdx(), 0, "no TRANSPORT_RESET");
      await closeBothWays(c);
      assert.deepEqual(vm.guest.anomalies, []);
    });
  } finally {
    await vm.stop();
  }
});
