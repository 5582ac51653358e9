/**
 * Snapshot/restore of the vsock back end (the snapshot/restore race, rust-vmm PR #936), with
 * crosvm's restore onto a fresh back-end process:
 *
 * - DEVICE_STATE: SET_DEVICE_STATE_FD save/load (phase "stopped", reply bit 8 = no fd of the
 *   back end's own) and CHECK_DEVICE_STATE; the back end owns the event queue and delivers
 *   VIRTIO_VSOCK_EVENT_TRANSPORT_RESET itself, as soon as the event queue is running (no kick
 *   from the front end needed); a source that saved but did not migrate keeps its connections;
 * - held traffic: after a load, host and sibling traffic reaches the driver only once it has
 *   re-read the config, and with the event queue ours a config read that happens before the
 *   reset was delivered does not count (the race PR #936 admitted).
 *
 * The guest driver (lib/testing) re-reads the CID when it handles TRANSPORT_RESET; some tests
 * wrap the front end's `readConfig`/`kick` to observe when that happens relative to ring
 * contents, without changing what is sent.
 */
import assert from "node:assert/strict";
import {
  type BackendProcess,
  GuestRam,
  hostConnect,
  pattern,
  readAll,
  repoRoot,
  spawnBackend,
  startVm,
  VhostUserFrontEnd,
  VIRTIO_VSOCK_OP_REQUEST,
  VsockGuest,
  writeAll,
} from "../../lib/testing/mod.ts";
import { decodeSnapshot } from "../../lib/snapshot/format.ts";
import { VhostUserRequest as R } from "../../lib/vhost_user/protocol.ts";
import { VRING_DESC_F_WRITE } from "../../lib/virtio/split_layout.ts";
import {
  closeBothWays,
  exchange,
  openBothWays,
  restoreWithoutKicks,
  waitForLog,
  withStderr,
} from "./snapshot_helpers.ts";
import { freshBackEnd } from "./vm_helpers.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();
/** How long a negative check ("nothing reaches the guest") watches. */
const QUIET_MS = 500;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/** Resolves once the host side of `conn` sees EOF or ECONNRESET (rejects on timeout). */
async function expectHostClosed(conn: Deno.Conn, what: string, timeoutMs = 5000): Promise<void> {
  try {
    await readAll(conn, { timeoutMs });
  } catch (e) {
    if (e instanceof Deno.errors.ConnectionReset) return;
    throw new Error(`${what}: the host socket was not closed: ${e}`, { cause: e });
  } finally {
    try {
      conn.close();
    } catch { /* closed by the timeout */ }
  }
}

/** Records the order of config reads and kicks through `fe` (wrapping, not replacing them). */
function observe(fe: VhostUserFrontEnd, onConfigRead?: () => void): string[] {
  const events: string[] = [];
  const readConfig = fe.readConfig.bind(fe);
  fe.readConfig = (offset: number, size: number) => {
    onConfigRead?.();
    events.push("config");
    return readConfig(offset, size);
  };
  const kick = fe.kick.bind(fe);
  fe.kick = (index: number) => {
    events.push(`kick${index}`);
    kick(index);
  };
  return events;
}

// ---------------------------------------------------------------------------------------
// crosvm: save with open connections, restore onto a fresh back end
// ---------------------------------------------------------------------------------------

Deno.test("crosvm: restore onto a fresh back end resets the transport, re-reads the CID, works both ways", async () => {
  const vm = await startVm({ profile: "crosvm", cid: 9 });
  let backend2: BackendProcess | null = null;
  try {
    await withStderr(() => [vm.backend, backend2], async () => {
      const old = await openBothWays(vm.guest, vm.udsPath, 5000, 6000);
      await exchange(old.h2g.conn, old.g1, 3000, 1);
      await exchange(old.g2h, old.g2, 3000, 3);

      const snap = await vm.guest.snapshot();
      const saved = decodeSnapshot(snap.deviceState);
      assert.equal(saved.guestCid, 9);
      assert.equal(saved.connections.length, 2, "both open connections are recorded");
      assert.deepEqual(saved.guestListenerPorts, [5000]);

      // The guest moves to a host where its CID is 10.
      const fresh = await freshBackEnd(vm, 10);
      backend2 = fresh.backend;
      const fe2 = fresh.fe;
      const events = observe(fe2);
      const oldFe = vm.frontEnd;
      await vm.guest.restore(fe2, snap);
      const names = fe2.trace.map((t) => t.name);
      const sf = names.indexOf("SET_FEATURES");
      assert.deepEqual(names.slice(sf, sf + 4), [
        "SET_FEATURES",
        "SET_DEVICE_STATE_FD",
        "CHECK_DEVICE_STATE",
        "SET_MEM_TABLE",
      ]);

      await vm.guest.waitFor(
        () => old.g1.closed && old.g2.closed,
        5000,
        "TRANSPORT_RESET from the restored back end",
      );
      assert.equal(old.g1.closeReason, "transport-reset");
      assert.equal(old.g2.closeReason, "transport-reset");
      assert.equal(vm.guest.queue(2).readUsedIdx(), (snap.bases[2] + 1) & 0xffff, "one event");
      // The driver re-read the config (two 4-byte GET_CONFIG through crosvm) after the rings
      // started, and now uses the new CID.
      const lastEnable = names.lastIndexOf("SET_VRING_ENABLE");
      const reads = fe2.trace.map((t, i) => ({ t, i })).filter(({ t }) => t.name === "GET_CONFIG");
      assert.ok(reads.length >= 2 && reads.every(({ i }) => i > lastEnable), "CID re-read");
      assert.ok(events.includes("config"));
      assert.equal(vm.guest.guestCid, 10);
      assert.ok(!old.listener.closed, "the listener survives the transport reset");

      // The old back end's host sockets close once its front end is gone.
      oldFe.close();
      await Promise.all([
        expectHostClosed(old.h2g.conn, "host app of the old host->guest connection"),
        expectHostClosed(old.g2h, "host app of the old guest->host connection"),
      ]);
      await waitForLog(vm.backend, /closed 2 host connections/);

      // New connections through the new back end, both ways, on the kept listener.
      const now = await openBothWays(vm.guest, backend2!.udsPath, 5000, 6000, old.listener);
      await exchange(now.h2g.conn, now.g1, 50_000, 5);
      await exchange(now.g2h, now.g2, 50_000, 7);
      assert.equal(now.g1.peerCid, 2);
      now.h2g.conn.close();
      now.g2h.close();
      await now.g1.close();
      await now.g2.close();
      assert.deepEqual(vm.guest.anomalies, []);
      assert.ok(backend2!.running && vm.backend.running, "no back end crashed");
    });
  } finally {
    await vm.stop();
    await (backend2 as BackendProcess | null)?.stop();
  }
});

Deno.test("crosvm: TRANSPORT_RESET arrives without any kick of the event queue by the front end", async () => {
  const vm = await startVm({ profile: "crosvm", cid: 9 });
  let backend2: BackendProcess | null = null;
  try {
    await withStderr(() => [vm.backend, backend2], async () => {
      const old = await openBothWays(vm.guest, vm.udsPath, 5000, 6000);
      const snap = await vm.guest.snapshot();
      const fresh = await freshBackEnd(vm, 9);
      backend2 = fresh.backend;
      const events = observe(fresh.fe);
      vm.frontEnd.close();
      await restoreWithoutKicks(vm.guest, fresh.fe, snap);
      await vm.guest.waitFor(() => old.g1.closed && old.g2.closed, 5000, "TRANSPORT_RESET");
      assert.equal(old.g1.closeReason, "transport-reset");
      assert.equal(old.g2.closeReason, "transport-reset");
      // Nobody kicked the event queue before the driver had handled the event (its
      // re-post of the event buffer may kick afterwards, as Linux does).
      const firstRead = events.indexOf("config");
      assert.ok(firstRead >= 0, `the driver re-read the config: ${events}`);
      assert.ok(
        !events.slice(0, firstRead).includes("kick2"),
        `no kick of the event queue before the event: ${events}`,
      );
      assert.equal(
        fresh.fe.trace.filter((t) => t.request === R.VRING_KICK).length,
        0,
        "no in-band kick either",
      );
      // Traffic flows afterwards.
      const now = await openBothWays(vm.guest, backend2!.udsPath, 5000, 6001, old.listener);
      await exchange(now.h2g.conn, now.g1, 10_000, 11);
      await exchange(now.g2h, now.g2, 10_000, 13);
      now.h2g.conn.close();
      now.g2h.close();
      old.h2g.conn.close();
      old.g2h.close();
      await now.g1.close();
      await now.g2.close();
      assert.deepEqual(vm.guest.anomalies, []);
    });
  } finally {
    await vm.stop();
    await (backend2 as BackendProcess | null)?.stop();
  }
});

Deno.test("crosvm: a save leaves the source intact; resuming on it keeps connections", async () => {
  const vm = await startVm({ profile: "crosvm", cid: 9 });
  try {
    await withStderr(() => [vm.backend], async () => {
      const c = await openBothWays(vm.guest, vm.udsPath, 5000, 6000);
      const snap = await vm.guest.snapshot(); // migration starts ...
      await writeAll(c.h2g.conn, enc.encode("during the save"));
      vm.guest.resume(snap.bases); // ... and is abandoned: the source VM runs on
      assert.equal(dec.decode(await c.g1.readExactly(15)), "during the save");
      await exchange(c.h2g.conn, c.g1, 20_000, 21);
      await exchange(c.g2h, c.g2, 20_000, 23);
      assert.equal(vm.guest.queue(2).readUsedIdx(), 0, "no TRANSPORT_RESET without a load");
      await closeBothWays(c);
      assert.deepEqual(vm.guest.anomalies, []);
    });
  } finally {
    await vm.stop();
  }
});

// ---------------------------------------------------------------------------------------
// Held traffic after a load
// ---------------------------------------------------------------------------------------

Deno.test("after a load, a host CONNECT is held until the driver re-read the config, then succeeds", async () => {
  const vm = await startVm({ profile: "crosvm", cid: 9 });
  let backend2: BackendProcess | null = null;
  try {
    await withStderr(() => [vm.backend, backend2], async () => {
      const listener = vm.guest.listen(5000);
      const snap = await vm.guest.snapshot();
      const rxBase = snap.bases[0];
      const fresh = await freshBackEnd(vm, 9);
      backend2 = fresh.backend;
      const fe2 = fresh.fe;
      vm.frontEnd.close();

      fe2.setFeatures(fe2.backendFeaturesFor(snap.features));
      await fe2.loadDeviceState(snap.deviceState);
      // A host app connects while the device is loaded but the driver has not re-read.
      const pending = hostConnect(backend2!.udsPath, 5000, { timeoutMs: 10000 });
      pending.catch(() => {}); // awaited below
      await waitForLog(backend2!, /host app connecting to guest port 5000/);

      // At each config read, note what the device had written to the rx used ring: the
      // published index, and the element slot the REQUEST would take (written before the
      // index is published; this slot has never been used, so it is still zero).
      const rx = vm.guest.queueSetups[0];
      assert.ok(rxBase < rx.size, "the slot after the saved base is fresh");
      const slotGpa = rx.usedGpa + 4 + 8 * rxBase;
      assert.ok(vm.memory.read(slotGpa, 8).every((b) => b === 0));
      const atRead: { used: number; slotWritten: boolean }[] = [];
      const events = observe(fe2, () =>
        atRead.push({
          used: vm.guest.queue(0).readUsedIdx(),
          slotWritten: vm.memory.read(slotGpa, 8).some((b) => b !== 0),
        }));
      const cap = vm.guest.capture();
      vm.guest.attach(fe2); // rings start; the back end sends the event on its own
      const conn = await listener.accept({ timeoutMs: 10000 });
      const host = await pending; // OK line
      assert.ok(host.hostPort >= 1 << 30);
      assert.ok(events.includes("config"));
      assert.deepEqual(
        atRead[0],
        { used: rxBase, slotWritten: false },
        "nothing was written to the rx ring before the driver re-read the config",
      );
      const reqs = cap.packets.filter((p) =>
        p.direction === "rx" && p.header.op === VIRTIO_VSOCK_OP_REQUEST
      );
      assert.equal(reqs.length, 1, "exactly one REQUEST");
      cap.stop();
      await exchange(host.conn, conn, 10_000, 31);
      host.conn.close();
      await conn.close();
      assert.deepEqual(vm.guest.anomalies, []);
    });
  } finally {
    await vm.stop();
    await (backend2 as BackendProcess | null)?.stop();
  }
});

Deno.test("event queue ours: a config read before TRANSPORT_RESET was delivered does not release traffic (PR #936's race)", async () => {
  // The driver had posted no event buffers when the snapshot was taken (it was still
  // initializing), so after the restore the event cannot be delivered until it posts one.
  const vm = await startVm({ profile: "crosvm", cid: 9, guest: { eventBuffers: 0 } });
  let backend2: BackendProcess | null = null;
  try {
    await withStderr(() => [vm.backend, backend2], async () => {
      const listener = vm.guest.listen(5000);
      const snap = await vm.guest.snapshot();
      const fresh = await freshBackEnd(vm, 9);
      backend2 = fresh.backend;
      const fe2 = fresh.fe;
      vm.frontEnd.close();
      await vm.guest.restore(fe2, snap); // rings run (all kicked, as crosvm does)

      // The driver's (initial, stale) config read: the reset has not been delivered yet.
      assert.equal(fe2.readGuestCid(), 9);
      await waitForLog(backend2!, /config read before the transport reset was delivered/);
      const cap = vm.guest.capture();
      const pending = hostConnect(backend2!.udsPath, 5000, { timeoutMs: 15000 });
      pending.catch(() => {});
      await waitForLog(backend2!, /host app connecting to guest port 5000/);
      await vm.guest.idle(QUIET_MS);
      assert.equal(listener.pending, 0, "no connection reached the guest");
      assert.equal(cap.packets.filter((p) => p.direction === "rx").length, 0, "rx is quiet");

      // The driver posts an event buffer: the back end delivers TRANSPORT_RESET into it.
      const evGpa = vm.faults.allocGuest(8, 8);
      vm.memory.write(evGpa, new Uint8Array([0xff, 0xff, 0xff, 0xff]));
      const head = vm.guest.addRawChain(2, [{ addr: evGpa, len: 4, flags: VRING_DESC_F_WRITE }]);
      await vm.guest.waitFor(
        () => vm.guest.rawUsed.some((u) => u.queue === 2 && u.head === head),
        5000,
        "the TRANSPORT_RESET event",
      );
      assert.equal(vm.guest.rawUsed.find((u) => u.head === head && u.queue === 2)!.len, 4);
      assert.deepEqual([...vm.memory.read(evGpa, 4)], [0, 0, 0, 0], "event id TRANSPORT_RESET");

      // Delivered, but the driver has not re-read the config since: still held.
      await vm.guest.idle(QUIET_MS);
      assert.equal(listener.pending, 0, "still nothing before the post-reset read");

      // The driver handles the event: re-reads its CID. Now the REQUEST comes.
      assert.equal(fe2.readGuestCid(), 9);
      const conn = await listener.accept({ timeoutMs: 10000 });
      const host = await pending;
      assert.ok(
        cap.packets.some((p) => p.direction === "rx" && p.header.op === VIRTIO_VSOCK_OP_REQUEST),
      );
      cap.stop();
      await exchange(host.conn, conn, 5000, 41);
      host.conn.close();
      await conn.close();
      assert.deepEqual(vm.guest.anomalies, []);
    });
  } finally {
    await vm.stop();
    await (backend2 as BackendProcess | null)?.stop();
  }
});

Deno.test("sibling traffic to a loaded VM is held until its driver re-read the config", async () => {
  // One daemon, two VMs in one group: A (crosvm, restored in place) and B (a sibling).
  const backend = await spawnBackend({
    command: `${Deno.execPath()} run -A ${repoRoot()}/main.ts ` +
      `--vm guest-cid=3,socket={socket},uds-path={uds},groups=g1 ` +
      `--vm guest-cid=4,socket={socket}.b,uds-path={uds}.b,groups=g1`,
  });
  const mems: GuestRam[] = [];
  const guests: VsockGuest[] = [];
  try {
    await withStderr(() => [backend], async () => {
      const boot = async (path: string, profile: "qemu" | "crosvm", eventBuffers?: number) => {
        const memory = new GuestRam({});
        mems.push(memory);
        const fe = await VhostUserFrontEnd.connect(path, { profile, memory });
        const g = await VsockGuest.boot(fe, { eventBuffers });
        guests.push(g);
        return g;
      };
      // A has posted no event buffer yet, so its TRANSPORT_RESET stays owed after the load.
      const a = await boot(backend.socketPath, "crosvm", 0);
      const b = await boot(`${backend.socketPath}.b`, "qemu");
      const listener = a.listen(7000);
      const snap = await a.snapshot();
      a.frontEnd.close(); // A's VMM restarts ...
      const fe2 = await VhostUserFrontEnd.connect(backend.socketPath, {
        profile: "crosvm",
        memory: a.memory,
      });
      await a.restore(fe2, snap); // ... and restores A onto the same daemon
      await waitForLog(backend, /TRANSPORT_RESET owed, host traffic held/);

      const connecting = b.connect(7000, 3, { timeoutMs: 10000 });
      connecting.catch(() => {});
      await a.idle(QUIET_MS);
      assert.equal(listener.pending, 0, "B's REQUEST is held while A has not re-read");

      const evGpa = a.memory.alloc(8, 8);
      const head = a.addRawChain(2, [{ addr: evGpa, len: 4, flags: VRING_DESC_F_WRITE }]);
      await a.waitFor(
        () => a.rawUsed.some((u) => u.queue === 2 && u.head === head),
        5000,
        "TRANSPORT_RESET for A",
      );
      assert.equal(fe2.readGuestCid(), 3); // A's driver handles the event
      const inA = await listener.accept({ timeoutMs: 10000 });
      const inB = await connecting;
      const data = pattern(50_000, 141);
      const w = inB.write(data);
      assert.deepEqual(await inA.readExactly(data.length), data);
      await w;
      await Promise.all([inA.close(), inB.close()]);
      assert.deepEqual(a.anomalies, []);
      assert.deepEqual(b.anomalies, []);
    });
  } finally {
    for (const g of guests) {
      await g.close();
      g.frontEnd.close();
    }
    for (const m of mems) m.close();
    await backend.stop();
  }
});
