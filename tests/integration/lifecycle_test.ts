/**
 * No lost wakeups across the ring life cycle: regression tests for "kick after start", "enable
 * notification, then re-check" and "never drop a kick", suspend/resume, reconnect and driver reset,
 * against the back end as a child process (`lib/testing`) and, for the exact enable-then-re-check
 * interleaving, the in-process harness.
 *
 * - Kick after start (vhost-vsock "kick send_pkt worker once device is started"): work queued while
 *   the rings are not started (a host `CONNECT`, host data, a credit update owed) is processed the
 *   moment they start. The guest never kicks, nothing else happens: only "process on start" can
 *   deliver it, and it must do so at once, not after a 2 s connect timeout.
 * - Enable notification, then re-check (QEMU "network stall waiting for kick"): TX and RX enable
 *   notifications and re-check the ring when it runs empty. In process, the guest's add is injected
 *   at the device's avail_event write and its kick decision uses the avail_event it read before
 *   that write (stale: no kick), so only the re-check finds the buffers. Across processes, the
 *   device runs out of RX buffers with data pending and the guest's refill must find it armed
 *   (EVENT_IDX on and off).
 * - Never drop a kick (virtiofsd dropping FUSE_INIT): a kick that arrives after SET_VRING_KICK but
 *   before SET_VRING_ENABLE is remembered, TX and RX; with REPLY_ACK, the ack of a NEED_REPLY
 *   SET_VRING_ENABLE comes only after the enable (and the work it released) was processed.
 * - Suspend (GET_VRING_BASE on every ring): no guest memory write, no interrupt, host traffic and
 *   connections kept, the right ring bases, everything flows after the restart.
 * - Reconnect: 100 front-end sessions on one back end; the old session's host sockets see EOF and
 *   the back end's fd count stays flat.
 * - Driver reset: host sockets of the old connections are closed; new ones work both ways.
 *
 * The kick-after-start and never-drop-a-kick tests drive the rings with `RawGuest` (raw_guest.ts),
 * a bare driver that posts buffers and kicks only when told, so the tests control exactly which
 * notifications exist. The tests across processes run over split and packed virtqueues
 * (VIRTIO_F_RING_PACKED; a packed ring's vring base carries both positions, compared with
 * `baseAvailIdx` / `baseUsedIdx`).
 */
import assert from "node:assert/strict";
import {
  acceptRaw,
  close,
  connectUnix,
  EAGAIN,
  listenUnix,
  pollFds,
  POLLIN,
  writeRaw,
} from "../../ffi/mod.ts";
import {
  type BackendProcess,
  baseAvailIdx,
  baseUsedIdx,
  GuestRam,
  hostConnect,
  hostListen,
  PacketHeader,
  pattern,
  readExactly,
  spawnBackend,
  VhostUserFrontEnd,
  VIRTIO_VSOCK_HDR_SIZE,
  VIRTIO_VSOCK_OP_CREDIT_UPDATE,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RESPONSE,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_TYPE_STREAM,
  type VmHandle,
  VsockGuest,
  writeAll,
} from "../../lib/testing/mod.ts";
import { VhostUserProtocolFeatureMask as PF } from "../../lib/vhost_user/protocol.ts";
import { VIRTIO_RING_F_EVENT_IDX_MASK } from "../../lib/virtio/features.ts";
import { availEventOffset, usedRingSize, vringNeedEvent } from "../../lib/virtio/split_layout.ts";
import { PACKED_EVENT_SIZE } from "../../lib/virtio/packed_layout.ts";
import { InProcessVm } from "./inprocess.ts";
import { clearKicks, withVm } from "./vm_helpers.ts";
import { GUEST_CID, HOST_CID, RawGuest, RawHostSocket, waitUntil } from "./raw_guest.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();
/**
 * The stall that kick after start prevents: Linux's VSOCK_DEFAULT_CONNECT_TIMEOUT. Everything
 * here must beat it.
 */
const KICK_AFTER_START_STALL_MS = 2000;
/**
 * How soon work released by a ring start or enable must reach the guest. It takes 5-10 ms
 * here; the bound is generous because the test machine is shared (hundreds of ms have been
 * seen under load), yet half of that stall. A back end that waits for a kick or a
 * timeout never delivers at all: nothing else happens in these tests.
 */
const START_LATENCY_MS = KICK_AFTER_START_STALL_MS / 2;
/** The VMMs and ring layouts (split; packed: VIRTIO_F_RING_PACKED) the tests run over. */
const VM_SETUPS = [
  { profile: "qemu", packed: false },
  { profile: "crosvm", packed: false },
  { profile: "qemu", packed: true },
  { profile: "crosvm", packed: true },
] as const;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/** Marks a promise awaited later as handled, so a test failing first does not also crash. */
function later<T>(p: Promise<T>): Promise<T> {
  p.catch(() => {});
  return p;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Waits until the back end logged a line containing `text` (its log is our event trace). */
function waitForLog(backend: BackendProcess, text: string, timeoutMs = 5000): Promise<number> {
  return waitUntil(() => backend.stderr().includes(text), timeoutMs, `back-end log "${text}"`);
}

/** Whether an eventfd's counter is non-zero (poll without consuming it). */
function eventPending(fd: number): boolean {
  return (pollFds([fd], [POLLIN], 0)[0] & POLLIN) !== 0;
}

/** Spawns a back end and connects a front end; `fn` gets both; everything is torn down. */
async function withBackend(
  frontEndOpts: Parameters<typeof VhostUserFrontEnd.connect>[1],
  fn: (backend: BackendProcess, connectFrontEnd: () => Promise<VhostUserFrontEnd>) => Promise<void>,
  backendOpts: { logLevel?: string } = {},
): Promise<void> {
  const backend = await spawnBackend({ cid: GUEST_CID, ...backendOpts });
  const fes: VhostUserFrontEnd[] = [];
  try {
    await fn(backend, async () => {
      const fe = await VhostUserFrontEnd.connect(backend.socketPath, frontEndOpts);
      fes.push(fe);
      return fe;
    });
  } catch (e) {
    for (const fe of fes) fe.close();
    const exit = await backend.stop();
    throw new Error(`${e instanceof Error ? e.stack : e}\n--- back end stderr ---\n${exit.stderr}`);
  }
  for (const fe of fes) fe.close();
  const exit = await backend.stop();
  assert.doesNotMatch(exit.stderr, / ERROR /, "the back end logged no error");
}

/** A guest listener on `port` and a host app connected to it. */
async function hostToGuest(vm: VmHandle, port: number) {
  const listener = vm.guest.listen(port);
  const [host, conn] = await Promise.all([vm.hostConnect(port), listener.accept()]);
  return { listener, host, conn };
}

/** A host listener on `port` and a guest connection to it. */
async function guestToHost(vm: VmHandle, port: number) {
  const hl = vm.hostListen(port);
  const [conn, host] = await Promise.all([vm.guest.connect(port), hl.accept()]);
  return { hl, host, conn };
}

// ---------------------------------------------------------------------------------------
// Kick after start: work queued before the rings start is processed when they start
// ---------------------------------------------------------------------------------------

for (
  const v of [
    { profile: "qemu", when: "before the front end connects" },
    { profile: "crosvm", when: "before the front end connects" },
    { profile: "qemu", when: "after realize, before DRIVER_OK" },
    { profile: "crosvm", when: "after realize, before DRIVER_OK", protocolFeatures: false },
    { profile: "qemu", when: "before the front end connects", packed: true },
    {
      profile: "crosvm",
      when: "after realize, before DRIVER_OK",
      protocolFeatures: false,
      packed: true,
    },
  ] as const
) {
  const pf = "protocolFeatures" in v ? " (no PROTOCOL_FEATURES: start = SET_VRING_KICK)" : "";
  const packed = "packed" in v;
  Deno.test(`kick after start: a host CONNECT ${v.when} reaches the guest when the rings start, with no kick [${v.profile}${pf}${rings(packed)}]`, async () => {
    await withBackend({
      profile: v.profile,
      protocolFeatures: "protocolFeatures" in v ? v.protocolFeatures : undefined,
      packed,
    }, async (backend, connectFrontEnd) => {
      const hosts: RawHostSocket[] = [];
      const hostConnects = async () => {
        const h = RawHostSocket.connect(backend.udsPath);
        hosts.push(h);
        h.send("CONNECT 5000\n");
        await waitForLog(backend, "host app connecting to guest port 5000");
      };
      try {
        if (v.when === "before the front end connects") await hostConnects();
        const fe = await connectFrontEnd();
        if (v.when !== "before the front end connects") await hostConnects();
        const guest = new RawGuest(fe);
        assert.equal(guest.rx.packed, packed, "ring layout");
        // The rx buffers are in the ring when it starts, and the driver never kicks (Linux
        // would kick after filling; that kick would hide the bug): only processing the rings
        // on start can find the buffers and deliver the REQUEST queued before.
        guest.postRx(16);
        const t0 = performance.now();
        guest.startDevice();
        const req = await guest.waitPacket(
          (p) => p.header.op === VIRTIO_VSOCK_OP_REQUEST,
          START_LATENCY_MS,
          "the REQUEST queued before the rings started",
        );
        const latency = performance.now() - t0;
        assert.equal(guest.kicks, 0, "the guest never kicked");
        assert.equal(req.header.dstPort, 5000);
        assert.equal(req.header.srcCid, HOST_CID);
        assert.equal(req.header.dstCid, GUEST_CID);
        assert.ok(
          latency < START_LATENCY_MS,
          `REQUEST ${latency.toFixed(1)} ms after the ring start (limit ${START_LATENCY_MS} ms)`,
        );
        console.log(`REQUEST delivered ${latency.toFixed(1)} ms after the start sequence began`);
        // The connection completes and carries data (the rx ring is still never kicked).
        const resp = { op: VIRTIO_VSOCK_OP_RESPONSE, srcPort: 5000, dstPort: req.header.srcPort };
        if (guest.send(resp)) guest.kick(1);
        await hosts[0].waitText(`OK ${req.header.srcPort}\n`, 5000);
        hosts[0].send("hello guest");
        const data = await guest.waitPacket(
          (p) => p.header.op === VIRTIO_VSOCK_OP_RW,
          5000,
          "host data after the OK",
        );
        assert.equal(dec.decode(data.payload), "hello guest");
      } finally {
        for (const h of hosts) h.close();
      }
    });
  });
}

Deno.test("kick after start: host data and a host CONNECT that arrive while the rings are stopped are delivered on restart, with no kick", async () => {
  for (const { profile, packed } of VM_SETUPS) {
    await withVm({ profile, frontEnd: { packed } }, async (vm) => {
      const g = vm.guest;
      assert.equal(g.packed, packed);
      const a = await hostToGuest(vm, 5000);
      const b = await guestToHost(vm, 6000);
      await writeAll(a.host.conn, enc.encode("before"));
      assert.equal(dec.decode(await a.conn.readExactly(6)), "before");
      await writeAll(b.host, enc.encode("b-before"));
      assert.equal(dec.decode(await b.conn.readExactly(8)), "b-before");

      vm.faults.stopRings(); // GET_VRING_BASE on every ring: the device is suspended
      const rx = g.queue(0);
      const usedAtStop = rx.readUsedIdx();
      const dataA = pattern(30_000, 1);
      const dataB = pattern(5_000, 2);
      await writeAll(a.host.conn, dataA);
      await writeAll(b.host, dataB);
      const connecting = later(vm.hostConnect(5000));
      await waitUntil(
        () => countOf(vm.backend.stderr(), "host app connecting to guest port 5000") === 2,
        5000,
        "the second CONNECT to be parsed",
      );
      await sleep(50); // the back end has seen the data; it must not deliver it yet
      assert.equal(rx.readUsedIdx(), usedAtStop, "nothing delivered while stopped");

      const kicks = [...g.stats.kicks];
      const t0 = performance.now();
      clearKicks(vm.frontEnd);
      vm.frontEnd.restartRings(); // SET_VRING_BASE/ADDR/KICK; the guest does not kick
      await waitUntil(
        () => rx.readUsedIdx() !== usedAtStop,
        START_LATENCY_MS,
        "the host traffic queued while stopped, after the restart (no guest kick)",
      );
      assert.deepEqual(g.stats.kicks, kicks, "no kick before the data arrived");
      const ms = (performance.now() - t0).toFixed(1);
      console.log(`${profile}${rings(packed)}: delivered ${ms} ms after restart`);

      assert.deepEqual(await a.conn.readExactly(dataA.length), dataA);
      assert.deepEqual(await b.conn.readExactly(dataB.length), dataB);
      const [h3, c3] = await Promise.all([connecting, a.listener.accept()]);
      await writeAll(h3.conn, enc.encode("third"));
      assert.equal(dec.decode(await c3.readExactly(5)), "third");
      await c3.write(enc.encode("back"));
      assert.equal(dec.decode(await readExactly(h3.conn, 4)), "back");
      for (const h of [a.host.conn, b.host, h3.conn]) h.close();
      b.hl.close();
    });
  }
});

Deno.test("kick after start: a credit update owed while the rings were stopped is sent on restart", async () => {
  for (const { profile, packed } of VM_SETUPS) {
    await withVm({ profile, frontEnd: { packed } }, async (vm) => {
      const g = vm.guest;
      assert.equal(g.packed, packed);
      const b = await guestToHost(vm, 6000);
      const data = pattern(1 << 20, 7);
      const writing = later(b.conn.write(data, { timeoutMs: 20_000 }));
      const tx = g.queue(1);
      // The host app reads nothing: its socket and the device's buffer fill up, the guest
      // runs out of credit with every packet it sent consumed.
      await g.waitFor(
        () => b.conn.credit.peerFree() === 0 && tx.readUsedIdx() === tx.availIdx,
        10_000,
        "the guest to run out of credit",
      );
      vm.faults.stopRings();
      const rx = g.queue(0);
      const usedAtStop = rx.readUsedIdx();
      const sent = b.conn.bytesSent;
      // Now the host app drains everything: the device forwards its buffered bytes while the
      // rings are stopped and owes the guest a CREDIT_UPDATE it cannot send yet.
      assert.deepEqual(
        await readExactly(b.host, sent, { timeoutMs: 5000 }),
        data.subarray(0, sent),
      );
      await sleep(50);
      assert.equal(rx.readUsedIdx(), usedAtStop, "nothing sent while stopped");
      assert.equal(b.conn.credit.peerFree(), 0, "the guest still has no credit");

      const cap = g.capture();
      clearKicks(vm.frontEnd);
      vm.frontEnd.restartRings(); // no kick: the guest has nothing to send
      await waitUntil(
        () => rx.readUsedIdx() !== usedAtStop,
        START_LATENCY_MS,
        "the CREDIT_UPDATE owed since the stop",
      );
      const rest = await readExactly(b.host, data.length - sent, { timeoutMs: 10_000 });
      assert.deepEqual(rest, data.subarray(sent));
      await writing;
      // The guest kicks tx only for packets it sends and rx only after reaping buffers: the
      // first packet on either ring being the device's CREDIT_UPDATE means no kick woke it.
      const first = cap.packets[0];
      assert.ok(first !== undefined);
      assert.equal(first.direction, "rx", "the device spoke first, unprompted");
      assert.equal(first.header.op, VIRTIO_VSOCK_OP_CREDIT_UPDATE, first.header.describe());
      assert.equal(first.header.dstPort, b.conn.localPort);
      cap.stop();
      b.host.close();
      b.hl.close();
      await b.conn.close();
    });
  }
});

/** A test-name suffix for packed rings (split is the default). */
function rings(packed: boolean): string {
  return packed ? ", packed rings" : "";
}

function countOf(haystack: string, needle: string): number {
  return haystack.split(needle).length - 1;
}

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

// ---------------------------------------------------------------------------------------
// Never drop a kick: a kick before SET_VRING_ENABLE is remembered
// ---------------------------------------------------------------------------------------

for (
  const v of [
    { profile: "qemu", needReply: true },
    { profile: "qemu", needReply: false },
    { profile: "crosvm", needReply: true },
    { profile: "crosvm", needReply: false },
    { profile: "qemu", needReply: true, packed: true },
    { profile: "crosvm", needReply: false, packed: true },
  ] as const
) {
  const mode = v.needReply ? "REPLY_ACK + NEED_REPLY" : "no NEED_REPLY";
  const packed = "packed" in v;
  Deno.test(`never drop a kick: a TX REQUEST kicked before SET_VRING_ENABLE is processed on enable [${v.profile}, ${mode}${rings(packed)}]`, async () => {
    await withBackend({ profile: v.profile, packed }, async (backend, connectFrontEnd) => {
      const listenFd = listenUnix(`${backend.udsPath}_6000`);
      let hostFd = -1;
      try {
        const fe = await connectFrontEnd();
        assert.ok(fe.hasProtocolFeature(PF.REPLY_ACK), "REPLY_ACK negotiated");
        const g = new RawGuest(fe);
        g.setupRings(); // started (kick fds set), not enabled
        // The driver finishes its set-up and talks at once (OVMF's FUSE_INIT): rx buffers,
        // a REQUEST to host port 6000, a kick on each, all before the enable arrives.
        g.postRx(8);
        g.kick(0);
        g.send({ op: VIRTIO_VSOCK_OP_REQUEST, srcPort: 1234, dstPort: 6000 });
        g.kick(1);
        // The back end must have taken both kicks before the enable is sent (its debug log
        // says so), or the test would not be testing the race.
        await waitForLog(backend, "vring 0 kicked while inactive");
        await waitForLog(backend, "vring 1 kicked while inactive");
        await sleep(20);
        assert.equal(acceptRaw(listenFd), -EAGAIN, "a disabled ring is not processed");
        assert.equal(g.tx.packed, packed, "ring layout");
        assert.equal(g.tx.readUsedIdx(), g.tx.lastUsed, "a disabled tx ring consumes nothing");
        assert.equal(g.rx.readUsedIdx(), g.rx.lastUsed, "a disabled rx ring produces nothing");

        if (v.needReply) {
          fe.setVringEnable(0, true, { needReply: true });
          fe.setVringEnable(1, true, { needReply: true });
          // The tx enable is acked: the enable, and the work the remembered kick released,
          // are done (checked before anything else reaches the back end).
          hostFd = acceptRaw(listenFd);
          assert.ok(
            hostFd >= 0,
            `the REQUEST was processed before SET_VRING_ENABLE was acked (accept: ${hostFd})`,
          );
          if (fe.ownsQueue(2)) fe.setVringEnable(2, true, { needReply: true });
        } else {
          g.enableRings();
          await waitUntil(
            () => (hostFd = acceptRaw(listenFd)) >= 0,
            START_LATENCY_MS,
            "the host listener to get the guest's connection after the enable",
          );
        }
        const resp = await g.waitPacket(
          (p) => p.header.op === VIRTIO_VSOCK_OP_RESPONSE,
          START_LATENCY_MS,
          "the RESPONSE to the early REQUEST",
        );
        assert.equal(resp.header.dstPort, 1234);
        assert.equal(resp.header.srcPort, 6000);
        assert.equal(g.kicks, 2, "only the two early kicks");
        // The connection works both ways.
        if (g.send({ op: VIRTIO_VSOCK_OP_RW, srcPort: 1234, dstPort: 6000 }, enc.encode("ping"))) {
          g.kick(1);
        }
        const host = new RawHostSocket(hostFd);
        hostFd = -1;
        await host.waitText("ping", 2000);
        host.send("pong");
        const pong = await g.waitPacket(
          (p) => p.header.op === VIRTIO_VSOCK_OP_RW,
          2000,
          "host data",
        );
        assert.equal(dec.decode(pong.payload), "pong");
        host.close();
        assert.equal(fe.hasPendingInput(), false, "no stray replies");
      } finally {
        close(listenFd);
        if (hostFd >= 0) close(hostFd);
      }
    }, { logLevel: "debug" }); // the debug log shows when early kicks were taken
  });
}

for (const { profile, packed } of VM_SETUPS) {
  Deno.test(`never drop a kick: an RX kick before SET_VRING_ENABLE is remembered: a pending host CONNECT reaches the guest on enable [${profile}${rings(packed)}]`, async () => {
    await withBackend({ profile, packed }, async (backend, connectFrontEnd) => {
      const fe = await connectFrontEnd();
      const host = RawHostSocket.connect(backend.udsPath);
      try {
        host.send("CONNECT 5000\n");
        await waitForLog(backend, "host app connecting to guest port 5000");
        const g = new RawGuest(fe);
        g.setupRings();
        assert.equal(g.postRx(16), true, "the driver's rx fill asks for a kick");
        g.kick(0);
        await waitForLog(backend, "vring 0 kicked while inactive");
        await sleep(20);
        assert.equal(g.rx.packed, packed, "ring layout");
        assert.equal(g.rx.readUsedIdx(), g.rx.lastUsed, "a disabled rx ring produces nothing");
        const t0 = performance.now();
        g.enableRings({ needReply: true });
        const req = await g.waitPacket(
          (p) => p.header.op === VIRTIO_VSOCK_OP_REQUEST,
          START_LATENCY_MS,
          "the REQUEST after the enable",
        );
        console.log(`REQUEST ${(performance.now() - t0).toFixed(1)} ms after the enable`);
        assert.equal(req.header.dstPort, 5000);
        assert.equal(g.kicks, 1, "only the early kick");
        if (g.send({ op: VIRTIO_VSOCK_OP_RESPONSE, srcPort: 5000, dstPort: req.header.srcPort })) {
          g.kick(1);
        }
        await host.waitText(`OK ${req.header.srcPort}\n`, 2000);
      } finally {
        host.close();
      }
    }, { logLevel: "debug" }); // the debug log shows when early kicks were taken
  });
}

// ---------------------------------------------------------------------------------------
// Suspend / resume
// ---------------------------------------------------------------------------------------

/** A copy of every byte of guest RAM. */
function snapshotRam(mem: GuestRam): Uint8Array[] {
  return mem.regions.map((r) => r.bytes.slice());
}

/** The guest-physical address of the first byte that differs from `snap`, or null. */
function firstDifference(mem: GuestRam, snap: Uint8Array[]): number | null {
  for (let i = 0; i < snap.length; i++) {
    const r = mem.regions[i];
    const now = r.bytes;
    const was = snap[i];
    const a = new Float64Array(now.buffer, now.byteOffset, now.length >>> 3);
    const b = new Float64Array(was.buffer, was.byteOffset, was.length >>> 3);
    for (let k = 0; k < a.length; k++) {
      if (!Object.is(a[k], b[k])) {
        for (let j = k * 8; j < k * 8 + 8; j++) if (now[j] !== was[j]) return r.gpa + j;
      }
    }
  }
  return null;
}

/** Names the ring structure holding `gpa`, or "a buffer". */
function whereIs(g: VsockGuest, gpa: number): string {
  const names = ["rx", "tx", "event"];
  for (const s of g.queueSetups) {
    // split: descriptor table, avail ring, used ring; packed: the descriptor ring and the
    // driver and device event suppression areas
    const [desc, avail, used] = s.packed
      ? ["descriptor ring", "driver event suppression", "device event suppression"]
      : ["descriptor table", "avail ring", "used ring"];
    const usedEnd = s.usedGpa + (s.packed ? PACKED_EVENT_SIZE : usedRingSize(s.size, true));
    if (gpa >= s.descGpa && gpa < s.availGpa) return `${names[s.index]} ${desc}`;
    if (gpa >= s.availGpa && gpa < s.usedGpa) return `${names[s.index]} ${avail}`;
    if (gpa >= s.usedGpa && gpa < usedEnd) return `${names[s.index]} ${used}`;
  }
  return "a buffer";
}

for (
  const v of [
    { profile: "qemu", how: "GET_VRING_BASE only" },
    { profile: "crosvm", how: "SET_VRING_ENABLE 0 + GET_VRING_BASE, restart with the bases" },
    { profile: "qemu", how: "GET_VRING_BASE only", packed: true },
    {
      profile: "crosvm",
      how: "SET_VRING_ENABLE 0 + GET_VRING_BASE, restart with the bases",
      packed: true,
    },
  ] as const
) {
  const packed = "packed" in v;
  Deno.test(`suspend/resume: no guest memory write or interrupt while suspended, right bases, traffic kept [${v.profile}: ${v.how}${rings(packed)}]`, async () => {
    await withVm({ profile: v.profile, frontEnd: { packed } }, async (vm) => {
      const g = vm.guest;
      assert.equal(g.packed, packed);
      const fe = vm.frontEnd;
      const rx = g.queue(0);
      const tx = g.queue(1);
      const suspend = () => v.profile === "qemu" ? vm.faults.stopRings() : g.suspend();
      const resume = (bases: number[]) =>
        v.profile === "qemu" ? fe.restartRings(bases) : g.resume(bases);
      const a = await hostToGuest(vm, 5000);
      const b = await guestToHost(vm, 6000);
      const exchange = async (n: number, seed: number) => {
        const d = pattern(n, seed);
        await Promise.all([writeAll(a.host.conn, d), b.conn.write(d)]);
        assert.deepEqual(await a.conn.readExactly(n), d);
        assert.deepEqual(await readExactly(b.host, n), d);
      };
      await exchange(50_000, 1);
      // A base's avail position (a packed base's low half) is where the device goes on
      // taking buffers; a packed base's used half must match the used descriptors too.
      const checkBases = (bases: number[], label: string) => {
        const txAt = baseAvailIdx(tx, bases[1]);
        assert.equal(txAt, tx.availIdx, `${label}: GET_VRING_BASE(tx) = chains posted`);
        assert.equal(txAt, tx.readUsedIdx(), `${label}: = chains the device consumed`);
        const rxAt = baseAvailIdx(rx, bases[0]);
        assert.equal(rxAt, rx.readUsedIdx(), `${label}: GET_VRING_BASE(rx) = buffers used`);
        if (packed) {
          assert.equal(baseUsedIdx(tx, bases[1]), txAt, `${label}: tx used half`);
          assert.equal(baseUsedIdx(rx, bases[0]), rxAt, `${label}: rx used half`);
        } else {
          assert.ok(bases[0] <= rx.availIdx);
        }
        if (fe.ownsQueue(2)) {
          assert.equal(bases[2], g.queueSetups[2].base, `${label}: no event buffer consumed`);
        }
      };
      await g.waitFor(() => tx.readUsedIdx() === tx.availIdx, 5000, "tx ring drained");
      const bases = suspend();
      checkBases(bases, "first suspend");
      const fresh = g.queueSetups.map((q) => q.base);
      assert.ok(bases[0] !== fresh[0] && bases[1] !== fresh[1], `non-trivial bases ${bases}`);

      const owned = [0, 1, 2].filter((i) => fe.ownsQueue(i));
      for (const i of owned) fe.takeCall(i);
      const snap = snapshotRam(vm.memory);
      // Host traffic while suspended: data on both connections and a new connect.
      const dataA = pattern(40_000, 11);
      const dataB = pattern(20_000, 12);
      await writeAll(a.host.conn, dataA);
      await writeAll(b.host, dataB);
      const connecting = later(vm.hostConnect(5000));
      await waitUntil(
        () => countOf(vm.backend.stderr(), "host app connecting to guest port 5000") === 2,
        5000,
        "the CONNECT to be parsed",
      );
      await sleep(300);
      const diff = firstDifference(vm.memory, snap);
      assert.equal(
        diff,
        null,
        diff === null
          ? ""
          : `guest memory written while suspended at 0x${diff.toString(16)} (${whereIs(g, diff)})`,
      );
      for (const i of owned) {
        assert.equal(eventPending(fe.callFds[i]), false, `no interrupt on queue ${i}`);
      }
      assert.equal(a.conn.state, "established");
      assert.equal(b.conn.state, "established");
      assert.ok(vm.backend.running);

      clearKicks(fe); // the guest did not kick while suspended
      resume(bases);
      assert.deepEqual(await a.conn.readExactly(dataA.length), dataA);
      assert.deepEqual(await b.conn.readExactly(dataB.length), dataB);
      const [h3, c3] = await Promise.all([connecting, a.listener.accept()]);
      await exchange(30_000, 2);
      await writeAll(h3.conn, enc.encode("third"));
      assert.equal(dec.decode(await c3.readExactly(5)), "third");

      // Suspend again: the bases moved on with the traffic.
      await g.waitFor(() => tx.readUsedIdx() === tx.availIdx, 5000, "tx ring drained");
      const bases2 = suspend();
      checkBases(bases2, "second suspend");
      assert.ok(bases2[0] !== bases[0] && bases2[1] !== bases[1]);
      resume(bases2);
      await exchange(10_000, 3);
      for (const h of [a.host.conn, b.host, h3.conn]) h.close();
      b.hl.close();
      await Promise.all([a.conn.close(), c3.close()]);
    });
  });
}

// ---------------------------------------------------------------------------------------
// Reconnect
// ---------------------------------------------------------------------------------------

/** Open fds of process `pid`. */
function fdCount(pid: number): number {
  let n = 0;
  for (const _ of Deno.readDirSync(`/proc/${pid}/fd`)) n++;
  return n;
}

/** Waits for the host end of a connection to end: EOF (or ECONNRESET). Returns bytes read. */
async function expectHostEnd(conn: Deno.Conn, what: string): Promise<number> {
  const buf = new Uint8Array(65536);
  let n = 0;
  const deadline = Date.now() + 5000;
  try {
    for (;;) {
      const left = deadline - Date.now();
      let timer: ReturnType<typeof setTimeout> | undefined;
      const r = await Promise.race([
        conn.read(buf),
        new Promise<"timeout">((res) => timer = setTimeout(() => res("timeout"), left)),
      ]);
      clearTimeout(timer);
      if (r === "timeout") {
        conn.close();
        throw new Error(`${what}: no EOF within 5000 ms (the host socket was left open)`);
      }
      if (r === null) return n;
      n += r;
    }
  } catch (e) {
    if (e instanceof Deno.errors.ConnectionReset) return n;
    throw e;
  }
}

Deno.test("reconnect: 100 front-end sessions (split and packed rings); each disconnect closes the host sockets, fd count stays flat", async () => {
  const backend = await spawnBackend({ cid: GUEST_CID });
  const hl = hostListen(backend.udsPath, 6000);
  const counts: number[] = [];
  const t0 = performance.now();
  try {
    for (let i = 0; i < 100; i++) {
      const { profile, packed } = VM_SETUPS[i % VM_SETUPS.length];
      const memory = new GuestRam({ regions: [{ gpa: 0, size: 2 << 20 }] });
      let fe: VhostUserFrontEnd | null = null;
      let guest: VsockGuest | null = null;
      try {
        fe = await VhostUserFrontEnd.connect(backend.socketPath, { profile, memory, packed });
        assert.equal(fe.trace[0].name, profile === "qemu" ? "GET_FEATURES" : "SET_OWNER");
        guest = await VsockGuest.boot(fe, { rxBuffers: 16, txSlots: 4, maxPacketPayload: 4096 });
        assert.equal(guest.packed, packed);
        assert.equal(guest.guestCid, GUEST_CID);
        const listener = guest.listen(5000);
        const [h, c] = await Promise.all([
          hostConnect(backend.udsPath, 5000),
          listener.accept(),
        ]);
        const [gc, hc] = await Promise.all([guest.connect(6000), hl.accept()]);
        await writeAll(h.conn, enc.encode(`ping ${i}`));
        assert.equal(dec.decode(await c.readExactly(`ping ${i}`.length)), `ping ${i}`);
        await gc.write(enc.encode(`pong ${i}`));
        assert.equal(dec.decode(await readExactly(hc, `pong ${i}`.length)), `pong ${i}`);
        // The VMM goes away with both connections open: the back end must drop them cleanly.
        fe.close();
        await expectHostEnd(h.conn, `session ${i}: host-initiated connection`);
        await expectHostEnd(hc, `session ${i}: guest-initiated connection`);
        tryClose(h.conn);
        tryClose(hc);
      } finally {
        await guest?.close();
        fe?.close();
        memory.close();
      }
      if (i === 4 || i === 49 || i === 99) counts.push(fdCount(backend.pid));
    }
    const ms = performance.now() - t0;
    console.log(
      `100 sessions in ${(ms / 1000).toFixed(1)} s; back-end fds after 5/50/100: ${counts}`,
    );
    assert.ok(
      counts[2] <= counts[0] + 2,
      `back-end fd count grew from ${counts[0]} (after 5 sessions) to ${counts[2]} (after 100)`,
    );
    assert.ok(backend.running);
  } finally {
    hl.close();
    const exit = await backend.stop();
    assert.doesNotMatch(exit.stderr, / ERROR /);
  }
});

function tryClose(c: { close(): void }): void {
  try {
    c.close();
  } catch { /* already closed */ }
}

// ---------------------------------------------------------------------------------------
// Driver reset
// ---------------------------------------------------------------------------------------

for (const { profile, packed } of VM_SETUPS) {
  Deno.test(`driver reset: the old connections' host sockets are closed; new connections work both ways [${profile}${rings(packed)}]`, async () => {
    await withVm({ profile, frontEnd: { packed } }, async (vm) => {
      const g = vm.guest;
      assert.equal(g.packed, packed);
      const a = await hostToGuest(vm, 5000);
      const b = await guestToHost(vm, 6000);
      await writeAll(a.host.conn, enc.encode("a"));
      assert.equal(dec.decode(await a.conn.readExactly(1)), "a");
      await b.conn.write(enc.encode("b"));
      assert.equal(dec.decode(await readExactly(b.host, 1)), "b");
      const oldRings = g.queueSetups.map((s) => s.descGpa);
      const old = [a.conn, b.conn].map((c) => `${c.peerPort}>${c.localPort}`);

      await g.resetDevice(); // rmmod + modprobe: rings stopped, new rings at base 0
      assert.ok(g.queueSetups.every((s, i) => s.descGpa !== oldRings[i]), "new ring addresses");
      assert.equal(a.conn.closeReason, "driver-reset");
      const cap = g.capture();
      await expectHostEnd(a.host.conn, "host-initiated connection after the driver reset");
      await expectHostEnd(b.host, "guest-initiated connection after the driver reset");
      tryClose(a.host.conn);
      tryClose(b.host);

      const [h2, c2] = await Promise.all([vm.hostConnect(5000), a.listener.accept()]);
      const [c3, h3] = await Promise.all([g.connect(6000), b.hl.accept()]);
      const d = pattern(100_000, 5);
      await Promise.all([writeAll(h2.conn, d), c3.write(d)]);
      assert.deepEqual(await c2.readExactly(d.length), d);
      assert.deepEqual(await readExactly(h3, d.length), d);
      await Promise.all([c2.write(d), writeAll(h3, d)]);
      assert.deepEqual(await readExactly(h2.conn, d.length), d);
      assert.deepEqual(await c3.readExactly(d.length), d);
      const stale = cap.packets.filter((p) =>
        p.direction === "rx" && old.includes(`${p.header.srcPort}>${p.header.dstPort}`)
      );
      assert.deepEqual(stale.map((p) => p.header.describe()), [], "nothing of the old connections");
      cap.stop();
      h2.conn.close();
      h3.close();
      b.hl.close();
      await Promise.all([c2.close(), c3.close()]);
    });
  });
}
