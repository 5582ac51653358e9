/**
 * Kick after start (vhost-vsock "kick send_pkt worker once device is started"): work queued while
 * the rings are not started (a host `CONNECT`, host data, a credit update owed) is processed the
 * moment they start. The guest never kicks, nothing else happens: only "process on start" can
 * deliver it, and it must do so at once, not after a 2 s connect timeout.
 *
 * The back end runs as a child process (`lib/testing`). The first tests drive the rings with
 * `RawGuest` (raw_guest.ts), a bare driver that posts buffers and kicks only when told, so they
 * control exactly which notifications exist; the others stop and restart the rings of a whole VM
 * (split and packed virtqueues, VIRTIO_F_RING_PACKED).
 */
import assert from "node:assert/strict";
import {
  pattern,
  readExactly,
  VIRTIO_VSOCK_OP_CREDIT_UPDATE,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RESPONSE,
  VIRTIO_VSOCK_OP_RW,
  writeAll,
} from "../../lib/testing/mod.ts";
import { clearKicks, sleep, withVm } from "./vm_helpers.ts";
import { GUEST_CID, HOST_CID, RawGuest, RawHostSocket, waitUntil } from "./raw_guest.ts";
import {
  countOf,
  guestToHost,
  hostToGuest,
  later,
  rings,
  START_LATENCY_MS,
  VM_SETUPS,
  waitForLog,
  withBackend,
} from "./lifecycle_helpers.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();

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
