/**
 * Snapshot/restore and live migration of the vsock back end (the snapshot/restore race,
 * rust-vmm PR #936):
 *
 * - DEVICE_STATE: SET_DEVICE_STATE_FD save/load (phase "stopped", reply bit 8 = no fd of the
 *   back end's own) and CHECK_DEVICE_STATE, with crosvm's restore onto a fresh back-end
 *   process: the back end owns the event queue and delivers VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
 *   itself, as soon as the event queue is running (no kick from the front end needed);
 * - held traffic: after a load, host and sibling traffic reaches the driver only once it has
 *   re-read the config, and with the event queue ours a config read that happens before the
 *   reset was delivered does not count (the race PR #936 admitted); a source that saved but
 *   did not migrate keeps its connections;
 * - QEMU-style front ends keep the event queue (the back end never sees vring 2) and QEMU 7.2
 *   never acks DEVICE_STATE;
 * - corrupt, truncated, newer-version, garbage and empty states are refused with a clear log
 *   line and the back end keeps working; state transfers while the rings run are refused;
 * - dirty-page logging (LOG_SHMFD + VHOST_F_LOG_ALL): exactly the pages the back end wrote,
 *   none without LOG_ALL, and a log fd too small for its announced size is refused;
 * - `--print-capabilities`.
 *
 * The guest driver (lib/testing) re-reads the CID when it handles TRANSPORT_RESET; some tests
 * wrap the front end's `readConfig`/`kick` to observe when that happens relative to ring
 * contents, without changing what is sent.
 */
import assert from "node:assert/strict";
import {
  close,
  EAGAIN,
  EPIPE,
  memfdCreate,
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
  type GuestConn,
  GuestRam,
  type GuestSnapshot,
  hostConnect,
  hostListen,
  pattern,
  readAll,
  readExactly,
  repoRoot,
  spawnBackend,
  startVm,
  VhostUserError,
  VhostUserFrontEnd,
  VIRTIO_VSOCK_OP_REQUEST,
  type VmHandle,
  VsockGuest,
  writeAll,
} from "../../lib/testing/mod.ts";
import { decodeSnapshot, encodeSnapshot } from "../../lib/snapshot/format.ts";
import { crc32 } from "../../lib/snapshot/crc32.ts";
import { encodeDeviceState, encodeLog } from "../../lib/vhost_user/messages.ts";
import {
  VHOST_TRANSFER_STATE_DIRECTION_LOAD,
  VHOST_TRANSFER_STATE_DIRECTION_SAVE,
  VHOST_TRANSFER_STATE_PHASE_STOPPED,
  VHOST_USER_DEVICE_STATE_ERROR_MASK,
  VhostUserProtocolFeatureMask as PF,
  VhostUserRequest as R,
} from "../../lib/vhost_user/protocol.ts";
import { VRING_DESC_F_WRITE } from "../../lib/virtio/split_layout.ts";
import { dirtyLogTraffic, freshBackEnd, PAGE, pagesOf } from "./vm_helpers.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();
/** How long a negative check ("nothing reaches the guest") watches. */
const QUIET_MS = 500;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/** Waits (polling its stderr every 20 ms, bounded) until the back end has logged `re`. */
async function waitForLog(
  b: BackendProcess,
  re: RegExp,
  timeoutMs = 5000,
  from = 0,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!re.test(b.stderr().slice(from))) {
    if (Date.now() >= deadline) {
      throw new Error(`the back end did not log ${re} within ${timeoutMs} ms:\n${b.stderr()}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

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

/** Host -> guest and guest -> host bytes over one established pair. */
async function exchange(host: Deno.Conn, guest: GuestConn, n: number, seed: number) {
  const a = pattern(n, seed);
  const [, got] = await Promise.all([writeAll(host, a), guest.readExactly(n)]);
  assert.deepEqual(got, a, "host -> guest bytes");
  const b = pattern(n, seed + 1);
  const [, back] = await Promise.all([guest.write(b), readExactly(host, n)]);
  assert.deepEqual(back, b, "guest -> host bytes");
}

/** Opens one host->guest connection (via `udsPath`) and one guest->host connection. */
async function openBothWays(
  guest: VsockGuest,
  udsPath: string,
  guestPort: number,
  hostPort: number,
  listener = guest.listen(guestPort),
) {
  const [h2g, g1] = await Promise.all([hostConnect(udsPath, guestPort), listener.accept()]);
  const hl = hostListen(udsPath, hostPort);
  const [g2, g2h] = await Promise.all([guest.connect(hostPort), hl.accept()]);
  hl.close();
  return { listener, h2g, g1, g2, g2h };
}

/** Closes both connections of an `openBothWays` pair: the host ends, then the guest ends. */
async function closeBothWays(c: Awaited<ReturnType<typeof openBothWays>>): Promise<void> {
  c.h2g.conn.close();
  c.g2h.close();
  await c.g1.close();
  await c.g2.close();
}

/** Runs `fn`; on failure appends the stderr of the back ends `backends()` lists then. */
async function withStderr(
  backends: () => (BackendProcess | null)[],
  fn: () => Promise<void>,
): Promise<void> {
  try {
    await fn();
  } catch (e) {
    const logs = backends()
      .map((b, i) => b === null ? "" : `--- back end ${i + 1} stderr ---\n${b.stderr()}`)
      .join("\n");
    throw new Error(`${e instanceof Error ? e.stack : e}\n${logs}`, { cause: e });
  }
}

/**
 * crosvm's restore without its final kicks: SET_FEATURES, load the state, then start the
 * rings at the saved bases (`VsockGuest.attach` starts them at each used index, which equals
 * the saved base after a clean stop; asserted). No queue is kicked by the front end.
 */
async function restoreWithoutKicks(guest: VsockGuest, fe: VhostUserFrontEnd, snap: GuestSnapshot) {
  for (let i = 0; i < 3; i++) {
    assert.equal(guest.queue(i).readUsedIdx(), snap.bases[i], `queue ${i}: used idx = saved base`);
  }
  fe.setFeatures(fe.backendFeaturesFor(snap.features));
  await fe.loadDeviceState(snap.deviceState);
  guest.attach(fe);
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

/** Used elements [from, to) of a split ring: {id, len}. */
function usedElems(vm: VmHandle, usedGpa: number, size: number, from: number, to: number) {
  const out: { id: number; len: number }[] = [];
  for (let i = from; i !== to; i = (i + 1) & 0xffff) {
    const v = new DataView(vm.memory.read(usedGpa + 4 + 8 * (i & (size - 1)), 8).buffer);
    out.push({ id: v.getUint32(0, true), len: v.getUint32(4, true) });
  }
  return out;
}

/** Descriptor `i` of the table at `descGpa`. */
function desc(vm: VmHandle, descGpa: number, i: number) {
  const v = new DataView(vm.memory.read(descGpa + 16 * i, 16).buffer);
  return {
    addr: v.getUint32(0, true) + v.getUint32(4, true) * 2 ** 32,
    len: v.getUint32(8, true),
    flags: v.getUint16(12, true),
  };
}

// ---------------------------------------------------------------------------------------
// 1. crosvm: save with open connections, restore onto a fresh back end
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
// 2. Held traffic after a load
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

// ---------------------------------------------------------------------------------------
// 3. QEMU-style front ends: the VMM keeps the event queue
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

// ---------------------------------------------------------------------------------------
// 4. Bad states and refused transfers
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

// ---------------------------------------------------------------------------------------
// 5. Dirty-page logging
// ---------------------------------------------------------------------------------------

Deno.test("dirty log with LOG_ALL: exactly the pages the back end wrote are marked", async () => {
  const vm = await startVm({ profile: "qemu", cid: 3 });
  try {
    await withStderr(() => [vm.backend], async () => {
      const fe = vm.frontEnd;
      assert.ok(fe.ackedProtocolFeatures & PF.LOG_SHMFD, "LOG_SHMFD negotiated");
      const listener = vm.guest.listen(5000);
      const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
      const log = fe.startDirtyLog();
      await vm.guest.idle(200);
      vm.faults.starveRx(); // rx descriptors keep pointing at the buffers the device filled
      const setups = vm.guest.queueSetups;
      for (const s of setups) {
        const end = s.usedGpa + 6 + 8 * s.size;
        assert.equal(Math.floor(s.descGpa / PAGE), Math.floor((end - 1) / PAGE), "1-page ring");
      }
      const rx = setups[0];
      const tx = setups[1];
      const rxFrom = vm.guest.queue(0).readUsedIdx();
      const txFrom = vm.guest.queue(1).readUsedIdx();
      log.clear();

      const { payloadGpa, payloadLen, headerGpa } = await dirtyLogTraffic(vm, conn, host.conn);

      const rxTo = vm.guest.queue(0).readUsedIdx();
      const txTo = vm.guest.queue(1).readUsedIdx();
      assert.ok(rxTo !== rxFrom && txTo !== txFrom, "both rings were used");
      const expected = new Set<number>([...pagesOf(rx.descGpa, 1), ...pagesOf(tx.descGpa, 1)]);
      for (const u of usedElems(vm, rx.usedGpa, rx.size, rxFrom, rxTo)) {
        const d = desc(vm, rx.descGpa, u.id);
        assert.equal(d.flags, VRING_DESC_F_WRITE, "one writable descriptor per rx buffer");
        assert.ok(u.len <= d.len);
        for (const p of pagesOf(d.addr, u.len)) expected.add(p);
      }
      const dirty = new Set(log.dirtyPages().map((g) => g / PAGE));
      const missing = [...expected].filter((p) => !dirty.has(p));
      const extra = [...dirty].filter((p) => !expected.has(p));
      assert.deepEqual(missing, [], "pages written by the back end but not marked");
      assert.deepEqual(extra, [], "pages marked that the back end did not write");
      // The checks above are not vacuous: the read-only payload and unused RAM are clear.
      for (const p of pagesOf(payloadGpa, payloadLen)) assert.ok(!dirty.has(p));
      assert.ok(!log.isDirty(setups[2].descGpa), "event ring (VMM's) is clear");
      assert.ok(!log.isDirty(vm.memory.topGpa - 1), "the last page of RAM is clear");
      assert.ok(!log.isDirty(headerGpa) || expected.has(Math.floor(headerGpa / PAGE)));

      vm.faults.refillRx();
      fe.stopDirtyLog();
      host.conn.close();
      await conn.close();
      assert.deepEqual(vm.guest.anomalies, []);
    });
  } finally {
    await vm.stop();
  }
});

Deno.test("dirty log without LOG_ALL: SET_LOG_BASE alone marks nothing; LOG_ALL then does", async () => {
  const vm = await startVm({ profile: "qemu", cid: 3 });
  try {
    await withStderr(() => [vm.backend], async () => {
      const fe = vm.frontEnd;
      const listener = vm.guest.listen(5000);
      const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
      const log = fe.setLogBase();
      assert.equal(fe.ackedFeatures! & (1n << 26n), 0n, "VHOST_F_LOG_ALL not acked");
      const a = pattern(30_000, 121);
      await writeAll(host.conn, a);
      assert.deepEqual(await conn.readExactly(a.length), a);
      await conn.write(a);
      assert.deepEqual(await readExactly(host.conn, a.length), a);
      await vm.guest.idle(100);
      assert.deepEqual(log.dirtyPages(), [], "no bits without LOG_ALL");

      // Same log, logging switched on: now bits appear (the log is live, the check above
      // was not vacuous).
      const on = fe.startDirtyLog();
      on.clear();
      await writeAll(host.conn, a);
      assert.deepEqual(await conn.readExactly(a.length), a);
      assert.ok(on.isDirty(vm.guest.queueSetups[0].usedGpa), "rx used ring marked");
      fe.stopDirtyLog();
      host.conn.close();
      await conn.close();
      assert.deepEqual(vm.guest.anomalies, []);
    });
  } finally {
    await vm.stop();
  }
});

Deno.test("dirty log: a log fd smaller than mmap_size is refused, not a SIGBUS", async () => {
  const vm = await startVm({ profile: "qemu", cid: 3 });
  try {
    await withStderr(() => [vm.backend], async () => {
      const fe = vm.frontEnd;
      const listener = vm.guest.listen(5000);
      const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
      // The front end claims a 4 KiB log but its memfd is empty: touching the mapping would
      // raise SIGBUS and kill every VM of the daemon.
      const fd = memfdCreate("short-dirty-log", 0);
      let ack: bigint;
      try {
        const reply = fe.request(R.SET_LOG_BASE, encodeLog({ mmapSize: PAGE, mmapOffset: 0 }), [
          fd,
        ]);
        assert.ok(reply !== null, "SET_LOG_BASE is answered (LOG_SHMFD)");
        ack = new DataView(reply.payload.buffer, reply.payload.byteOffset).getBigUint64(0, true);
      } finally {
        close(fd);
      }
      fe.setFeatures(fe.ackedFeatures! | (1n << 26n), { needReply: true }); // LOG_ALL
      const a = pattern(20_000, 131);
      await writeAll(host.conn, a);
      try {
        assert.deepEqual(await conn.readExactly(a.length), a);
      } catch (e) {
        const status = await Promise.race([
          vm.backend.exited,
          new Promise((r) => setTimeout(() => r("still running"), 2000)),
        ]);
        throw new Error(`traffic with the short log failed; back end: ${JSON.stringify(status)}`, {
          cause: e,
        });
      }
      assert.ok(vm.backend.running, "the back end survived");
      assert.notEqual(ack, 0n, "SET_LOG_BASE with a log the fd cannot back is refused");
      host.conn.close();
      await conn.close();
    });
  } finally {
    await vm.stop();
  }
});

// ---------------------------------------------------------------------------------------
// 6. --print-capabilities
// ---------------------------------------------------------------------------------------

Deno.test("--print-capabilities prints valid JSON with type vsock and exits 0", async () => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${repoRoot()}/main.ts`, "--print-capabilities"],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(60_000),
  }).output();
  const stdout = dec.decode(out.stdout);
  assert.equal(out.code, 0, dec.decode(out.stderr));
  const caps = JSON.parse(stdout);
  assert.equal(typeof caps, "object");
  assert.equal(caps.type, "vsock");
  // the snapshot/migration features are listed
  assert.ok(caps.features.includes("device-state"), stdout);
  assert.ok(caps.features.includes("dirty-log"), stdout);
});
