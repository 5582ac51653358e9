/**
 * The whole device over packed virtqueues (virtio 1.3 section 2.8, VIRTIO_F_RING_PACKED: QEMU's
 * `packed=on`): the back end as a child process, the testing guest acking RING_PACKED and driving
 * one descriptor ring per queue with wrap counters, buffer ids and event suppression structures.
 *
 * - Traffic, for both VMM profiles with EVENT_IDX on and off, indirect descriptors on and off
 *   (crosvm never offers them): 8 MiB each way on a host- and on a guest-initiated connection,
 *   checked byte for byte, then 50 concurrent connections. Small packets in two payload segments
 *   make chains of 1 to 3 descriptors that wrap the rings many times at every alignment.
 * - The ring life cycle in the middle of a transfer: GET_VRING_BASE / SET_VRING_BASE round trips
 *   with the 32-bit packed base (avail half = used half = the position of the used descriptors,
 *   both wrap counters seen), a driver reset (new rings at the fresh base), a VMM reconnect
 *   (crosvm `attach`: the base recovered from the used descriptors), snapshot/restore with
 *   DEVICE_STATE (the transfer resumes intact on the source; a restore elsewhere resets the
 *   transport through the packed event queue), and dirty logging (used descriptors are written in
 *   the descriptor ring itself, and the device event suppression area is logged too).
 *
 * Seqpacket, datagrams and the lost-wakeup races over packed rings are parameters of
 * guest_seqpacket_test.ts, dgram_test.ts, the lifecycle_*_test.ts files,
 * lost_wakeup_inprocess_test.ts and stress_test.ts; hostile packed descriptors are in
 * packed_hostile_test.ts.
 */
import assert from "node:assert/strict";
import {
  baseAvailIdx,
  baseUsedIdx,
  type DriverPackedQueue,
  type FrontEndProfile,
  type GuestConn,
  hostConnect,
  PACKED_RING_START_BASE,
  pattern,
  readExactly,
  startVm,
  type VmHandle,
  writeAll,
} from "../../lib/testing/mod.ts";
import {
  PACKED_DESC_LEN,
  PACKED_DESC_SIZE,
  PACKED_OFFSET_MASK,
  PACKED_WRAP_BIT,
  parsePackedRingBase,
} from "../../lib/virtio/packed_layout.ts";
import { VhostUserRequest as R } from "../../lib/vhost_user/protocol.ts";
import {
  assertSameBytes,
  bulkFromGuest,
  bulkFromHost,
  clearKicks,
  concurrentConnections,
  dirtyLogTraffic,
  freshBackEnd,
  hostToGuest,
  logLines,
  PAGE,
  pagesOf,
  roundTrip,
  withVm,
} from "./vm_helpers.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
/** Guest options: 8 KiB packets in 2 payload segments, so tx chains take 1 to 3 slots. */
const SMALL_CHAINS = { maxPacketPayload: 8 * KiB, txPayloadSegments: 2 };

/** The driver side of a packed queue (fails if the rings are split). */
function packedQueue(vm: VmHandle, index: number): DriverPackedQueue {
  const q = vm.guest.queue(index);
  assert.ok(q.packed, `queue ${index} is packed`);
  return q;
}

/** The SET_VRING_BASE values the VM's front end sent from trace entry `from` on, by queue. */
function vringBasesSent(vm: VmHandle, from = 0): Map<number, number> {
  const out = new Map<number, number>();
  for (const t of vm.frontEnd.trace.slice(from)) {
    if (t.request !== R.SET_VRING_BASE) continue;
    const v = new DataView(t.payload.buffer, t.payload.byteOffset);
    out.set(v.getUint32(0, true), v.getUint32(4, true));
  }
  return out;
}

/** Asserts that both halves of `base`, a packed base of queue `index`, are its used position. */
function assertBaseAt(vm: VmHandle, index: number, base: number, what: string): void {
  const q = packedQueue(vm, index);
  const at = q.readUsedIdx();
  assert.equal(baseAvailIdx(q, base), at, `${what}: queue ${index}: avail half = used position`);
  assert.equal(baseUsedIdx(q, base), at, `${what}: queue ${index}: used half = used position`);
}

/** A transfer both ways on one host-initiated connection, left running. */
interface Transfer {
  readonly host: Deno.UnixConn;
  readonly guest: GuestConn;
  readonly toGuest: Uint8Array;
  readonly toHost: Uint8Array;
  /** the host app's writes and reads: resolve with what it received, or reject if cut */
  readonly hostSide: Promise<Uint8Array>;
  /** the guest's writes and reads: resolve with what it received, or reject if cut */
  readonly guestSide: Promise<Uint8Array>;
}

async function startTransfer(vm: VmHandle, port: number, size: number): Promise<Transfer> {
  const { host, guest } = await hostToGuest(vm, port);
  const toGuest = pattern(size, port);
  const toHost = pattern(size, port + 1);
  const opts = { timeoutMs: 20_000 };
  const hostSide = Promise.all([writeAll(host, toGuest), readExactly(host, size, opts)])
    .then(([, got]) => got);
  const guestSide = Promise.all([guest.readExactly(size, opts), guest.write(toHost, opts)])
    .then(([got]) => got);
  hostSide.catch(() => {}); // awaited by the test; must not go unhandled meanwhile
  guestSide.catch(() => {});
  return { host, guest, toGuest, toHost, hostSide, guestSide };
}

/** Waits until at least `bytes` went each way on `t`. */
function transferred(vm: VmHandle, t: Transfer, bytes: number): Promise<void> {
  return vm.guest.waitFor(
    () => t.guest.bytesReceived >= bytes && t.guest.bytesSent >= bytes,
    10_000,
    `${bytes} bytes each way`,
  );
}

/** Both ends of `t` got everything, intact. */
async function assertTransferIntact(t: Transfer): Promise<void> {
  const [atGuest, atHost] = await Promise.all([t.guestSide, t.hostSide]);
  assertSameBytes(atGuest, t.toGuest, "host -> guest");
  assertSameBytes(atHost, t.toHost, "guest -> host");
}

// ---------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------

const TRAFFIC: { profile: FrontEndProfile; eventIdx: boolean; indirectDesc: boolean }[] = [
  { profile: "qemu", eventIdx: true, indirectDesc: true },
  { profile: "qemu", eventIdx: true, indirectDesc: false },
  { profile: "qemu", eventIdx: false, indirectDesc: true },
  { profile: "qemu", eventIdx: false, indirectDesc: false },
  { profile: "crosvm", eventIdx: true, indirectDesc: false },
  { profile: "crosvm", eventIdx: false, indirectDesc: false },
];

for (const v of TRAFFIC) {
  const on = (b: boolean) => b ? "on" : "off";
  Deno.test(`packed rings [${v.profile}, EVENT_IDX ${on(v.eventIdx)}, indirect ${on(v.indirectDesc)}]: 8 MiB each way both ways, then 50 concurrent connections`, async () => {
    await withVm({
      profile: v.profile,
      frontEnd: { packed: true, eventIdx: v.eventIdx, indirectDesc: v.indirectDesc },
      guest: { ...SMALL_CHAINS, connectTimeoutMs: 10_000 },
    }, async (vm) => {
      const g = vm.guest;
      assert.ok(g.packed, "VIRTIO_F_RING_PACKED negotiated");
      assert.equal(packedQueue(vm, 0).eventIdx, v.eventIdx, "EVENT_IDX as offered");
      assert.equal(g.indirect, v.indirectDesc, "INDIRECT_DESC as offered");
      await bulkFromHost(vm, 5000, 8 * MiB);
      await bulkFromGuest(vm, 6000, 8 * MiB);
      // Both rings went round many times: 4 KiB rx buffers, 8 KiB tx packets.
      const size = vm.frontEnd.queueSize;
      const laps = (n: number) => Math.floor(n / size);
      assert.ok(laps(g.stats.rxPackets) >= 16, `rx ring laps: ${laps(g.stats.rxPackets)}`);
      assert.ok(
        laps(g.stats.txPackets) >= 8,
        `tx ring laps (at least): ${laps(g.stats.txPackets)}`,
      );
      await concurrentConnections(vm, 7000, 25, 24 * KiB);
      assert.deepEqual(logLines(vm, / (WARN|ERROR) /), [], "no warning or error logged");
    });
  });
}

// ---------------------------------------------------------------------------------------
// Ring life cycle mid-transfer
// ---------------------------------------------------------------------------------------

Deno.test("packed rings: GET_VRING_BASE / SET_VRING_BASE mid-transfer: 32-bit bases at the used position, both wrap counters, restarts without a kick", async () => {
  await withVm({ profile: "qemu", frontEnd: { packed: true }, guest: SMALL_CHAINS }, async (vm) => {
    const g = vm.guest;
    const t = await startTransfer(vm, 5000, 8 * MiB);
    /** wrap counters seen in the rx and tx bases (bit 15 avail, bit 31 used: always equal) */
    const wraps = [new Set<number>(), new Set<number>()];
    let stops = 0;
    const stopAndRestart = () => {
      const bases = vm.faults.stopRings();
      stops++;
      for (const i of [0, 1]) {
        assertBaseAt(vm, i, bases[i], `stop ${stops}`);
        const b = parsePackedRingBase(bases[i]);
        assert.equal(b.availWrap, b.usedWrap);
        wraps[i].add(b.usedWrap);
      }
      clearKicks(vm.frontEnd); // the restart carries no kick: queued work must resume by itself
      const from = vm.frontEnd.trace.length;
      vm.faults.restartRings(); // SET_VRING_BASE with the bases GET_VRING_BASE returned
      const sent = vringBasesSent(vm, from);
      assert.deepEqual([sent.get(0), sent.get(1)], [bases[0], bases[1]], "all 32 bits sent back");
    };
    let done = false;
    Promise.allSettled([t.hostSide, t.guestSide]).then(() => done = true);
    while (!done) {
      await g.idle(3);
      if (!done) stopAndRestart();
    }
    await assertTransferIntact(t);
    // Move single rx buffers (and single tx packets) until each ring was stopped on both laps.
    for (const i of [0, 1]) {
      for (let n = 0; wraps[i].size < 2; n++) {
        assert.ok(n < 2 * vm.frontEnd.queueSize, `queue ${i}: a wrap counter never flipped`);
        await roundTrip(t.guest, t.host, 1000, `queue ${i} round trip ${n}`);
        stopAndRestart();
      }
    }
    console.log(`${stops} ring stops and restarts mid-transfer`);
    t.host.close();
    await t.guest.close();
  });
});

Deno.test("packed rings: a driver reset mid-transfer ends the connections and restarts fresh rings; traffic flows again", async () => {
  await withVm({ profile: "qemu", frontEnd: { packed: true }, guest: SMALL_CHAINS }, async (vm) => {
    const g = vm.guest;
    const t = await startTransfer(vm, 5000, 8 * MiB);
    await transferred(vm, t, 1 * MiB);
    const from = vm.frontEnd.trace.length;
    await g.resetDevice(); // rmmod + modprobe: the rings stop, new ones are laid out
    const sent = vringBasesSent(vm, from);
    assert.deepEqual([...sent.values()], [PACKED_RING_START_BASE, PACKED_RING_START_BASE]);
    assert.equal(t.guest.closeReason, "driver-reset");
    await assert.rejects(t.hostSide, "the host app's connection ended");
    t.host.close();
    await bulkFromHost(vm, 5100, 2 * MiB);
    await bulkFromGuest(vm, 5200, 2 * MiB);
  });
});

Deno.test("packed rings: a VMM reconnect mid-transfer (crosvm attach) restarts each ring at the used position it finds", async () => {
  await withVm(
    { profile: "crosvm", frontEnd: { packed: true }, guest: SMALL_CHAINS },
    async (vm) => {
      const t = await startTransfer(vm, 5000, 8 * MiB);
      await transferred(vm, t, 1 * MiB);
      vm.faults.disconnect();
      await assert.rejects(t.hostSide, "the back end closed the host side with its front end");
      t.host.close();
      await vm.faults.reconnect(); // a new front end; the guest re-attaches
      await vm.guest.idle(50);
      const sent = vringBasesSent(vm);
      assert.equal(sent.size, 3, "every ring restarted");
      for (const [i, base] of sent) {
        const b = parsePackedRingBase(base);
        assert.deepEqual([b.availIdx, b.availWrap], [b.usedIdx, b.usedWrap], `queue ${i}`);
      }
      // The old connection is gone on the back end: the guest's next packet gets an RST.
      await assert.rejects(t.guestSide);
      await t.guest.close();
      // New connections, enough to take both rings round again from where they restarted.
      await bulkFromHost(vm, 5100, 2 * MiB);
      await bulkFromGuest(vm, 5200, 2 * MiB);
    },
  );
});

Deno.test("packed rings: snapshot mid-transfer (DEVICE_STATE): bases at the used positions, the transfer resumes intact; a restore elsewhere resets the transport on the packed event queue", async () => {
  const vm = await startVm({ profile: "crosvm", cid: 9, frontEnd: { packed: true } });
  let fresh: Awaited<ReturnType<typeof freshBackEnd>> | null = null;
  try {
    const g = vm.guest;
    const t = await startTransfer(vm, 5000, 4 * MiB);
    await transferred(vm, t, 1 * MiB);
    const snap = await g.snapshot();
    for (const i of [0, 1, 2]) assertBaseAt(vm, i, snap.bases[i], "snapshot");
    assert.equal(snap.bases[2], PACKED_RING_START_BASE, "no event buffer consumed");
    g.resume(snap.bases); // the source keeps running: nothing was lost
    await assertTransferIntact(t);

    const snap2 = await g.snapshot();
    for (const i of [0, 1, 2]) assertBaseAt(vm, i, snap2.bases[i], "second snapshot");
    fresh = await freshBackEnd(vm, 10);
    const eventAt = packedQueue(vm, 2).readUsedIdx();
    vm.frontEnd.close();
    await g.restore(fresh.fe, snap2);
    const sent = vringBasesSent(vm);
    assert.deepEqual([0, 1, 2].map((i) => sent.get(i)), snap2.bases, "the saved 32-bit bases");
    await g.waitFor(() => t.guest.closed, 5000, "TRANSPORT_RESET from the restored back end");
    assert.equal(t.guest.closeReason, "transport-reset");
    assert.equal(packedQueue(vm, 2).readUsedIdx(), eventAt + 1, "one event buffer used");
    assert.equal(g.guestCid, 10, "the driver re-read the CID");
    const listener = g.listen(5100);
    const [h, c] = await Promise.all([hostConnect(fresh.backend.udsPath, 5100), listener.accept()]);
    await roundTrip(c, h.conn, 2 * MiB, "through the restored back end");
    h.conn.close();
    await c.close();
    assert.deepEqual(g.anomalies, []);
    t.host.close();
  } catch (e) {
    const logs =
      `--- source ---\n${vm.backend.stderr()}\n--- restored ---\n${fresh?.backend.stderr()}`;
    throw new Error(`${e instanceof Error ? e.stack : e}\n${logs}`);
  } finally {
    await vm.stop();
    await fresh?.backend.stop();
  }
});

// ---------------------------------------------------------------------------------------
// Dirty logging
// ---------------------------------------------------------------------------------------

Deno.test("packed rings: dirty log with LOG_ALL marks the used descriptors' pages in the descriptor ring, the rx buffers written and the device event suppression area, nothing else", async () => {
  // 256 entries: each descriptor ring fills its own page, the event areas are on the next one.
  await withVm({ profile: "qemu", frontEnd: { packed: true, queueSize: 256 } }, async (vm) => {
    const g = vm.guest;
    const listener = g.listen(5000);
    const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
    const log = vm.frontEnd.startDirtyLog();
    await g.idle(200);
    g.setRxStarved(true); // posted rx buffers stay where they are
    const rx = packedQueue(vm, 0);
    const tx = packedQueue(vm, 1);
    for (const q of [rx, tx]) {
      assert.equal(q.descGpa % PAGE, 0);
      assert.equal(q.deviceEventGpa, q.descGpa + PAGE + 4, "event areas on the next page");
    }
    // Where each posted rx buffer is, by buffer id (a used descriptor carries no address).
    const rxBuffers = new Map<number, number>();
    for (let slot = 0; slot < rx.size; slot++) {
      const at = rx.descGpa + PACKED_DESC_SIZE * slot;
      const d = new DataView(vm.memory.read(at, PACKED_DESC_SIZE).buffer);
      rxBuffers.set(rx.readDescId(slot), d.getUint32(0, true) + d.getUint32(4, true) * 2 ** 32);
    }
    const rxFrom = rx.readUsedIdx();
    const txFrom = tx.readUsedIdx();
    log.clear();

    const { payloadGpa, payloadLen } = await dirtyLogTraffic(vm, conn, host.conn);

    // Pages the device must have written: the used descriptors (in the descriptor rings, rx
    // buffers one slot each), the rx buffers' bytes, and tx's device event suppression area
    // (re-armed after each drain). rx's may be written too (a re-arm).
    const expected = new Set<number>();
    const usedSlots = (q: DriverPackedQueue, from: number) => {
      const to = q.readUsedIdx();
      assert.notEqual(to, from, "the ring was used");
      for (let p = from; p !== to;) {
        const slot = p & PACKED_OFFSET_MASK;
        expected.add(Math.floor((q.descGpa + PACKED_DESC_SIZE * slot) / PAGE));
        if (q === rx) {
          const used = vm.memory.read(q.descGpa + PACKED_DESC_SIZE * slot + PACKED_DESC_LEN, 4);
          const len = new DataView(used.buffer).getUint32(0, true);
          for (const pg of pagesOf(rxBuffers.get(q.readDescId(slot))!, len)) expected.add(pg);
        }
        p = slot + 1 === q.size ? (p & PACKED_WRAP_BIT) ^ PACKED_WRAP_BIT : p + 1; // next lap
      }
    };
    usedSlots(rx, rxFrom);
    usedSlots(tx, txFrom);
    const txEvents = Math.floor(tx.deviceEventGpa / PAGE);
    expected.add(txEvents);
    const maybe = Math.floor(rx.deviceEventGpa / PAGE);
    const dirty = new Set(log.dirtyPages().map((a) => a / PAGE));
    const missing = [...expected].filter((p) => !dirty.has(p));
    const extra = [...dirty].filter((p) => !expected.has(p) && p !== maybe);
    assert.deepEqual(missing, [], "pages written by the back end but not marked");
    assert.deepEqual(extra, [], "pages marked that the back end did not write");
    for (const p of pagesOf(payloadGpa, payloadLen)) assert.ok(!dirty.has(p), "read only");

    g.setRxStarved(false);
    vm.faults.refillRx();
    vm.frontEnd.stopDirtyLog();
    host.conn.close();
    await conn.close();
  });
});
