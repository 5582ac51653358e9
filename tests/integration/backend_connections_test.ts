/**
 * Integration tests of the back end's connection handling (main.ts as a child process, driven
 * through the testing library: a scripted VMM front end and a Linux-like guest driver on one
 * side, host applications on the hybrid-vsock Unix sockets on the other):
 *
 * - RST paths: refused connects both ways, packets for unknown connections, unknown socket
 *   types, spoofed source CIDs (never delivered, logged, no half-dead connection left);
 * - 200 concurrent connections with distinct data; the `--max-connections` cap both ways;
 *   the `--connect-timeout-ms` timeout.
 *
 * Every wait has a deadline; failures quote the back end's stderr.
 */
import assert from "node:assert/strict";
import {
  concat,
  type GuestConn,
  GuestConnectError,
  HostConnectError,
  HostTimeoutError,
  VIRTIO_VSOCK_OP_CREDIT_UPDATE,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RESPONSE,
  VIRTIO_VSOCK_OP_RST,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_OP_SHUTDOWN,
  VIRTIO_VSOCK_TYPE_SEQPACKET,
  VIRTIO_VSOCK_TYPE_STREAM,
  writeAll,
} from "../../lib/testing/mod.ts";
import {
  concurrentConnections,
  deviceStillWorks,
  expectClosedByBackend,
  guestToHost,
  hostToGuest,
  roundTrip,
  waitForLog,
  withVm,
} from "./vm_helpers.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();
const KiB = 1024;

// ---------------------------------------------------------------------------------------
// RST paths
// ---------------------------------------------------------------------------------------

Deno.test("guest connect to a host port nobody listens on is refused (RST) fast", async () => {
  await withVm({ profile: "qemu" }, async (vm) => {
    const start = performance.now();
    await assert.rejects(
      vm.guest.connect(7777, undefined, { timeoutMs: 5000 }),
      (e: unknown) => e instanceof GuestConnectError && e.reason === "refused",
    );
    const ms = performance.now() - start;
    assert.ok(ms < 1000, `refusal took ${ms.toFixed(0)} ms`);
    // A stale socket file with no listener behind it is refused too.
    const hl = vm.hostListen(7778);
    hl.listener.close(); // the file stays, nobody accepts
    await assert.rejects(
      vm.guest.connect(7778, undefined, { timeoutMs: 5000 }),
      (e: unknown) => e instanceof GuestConnectError && e.reason === "refused",
    );
    hl.close();
    await waitForLog(vm, /host port 7777: .*RST/); // the refusal is logged
  });
});

Deno.test("host CONNECT to a guest port nobody listens on: the socket is closed", async () => {
  await withVm({ profile: "crosvm" }, async (vm) => {
    const start = performance.now();
    const connecting = vm.hostConnect(4444, { timeoutMs: 5000 });
    let settled = false;
    connecting.then(() => settled = true, () => settled = true);
    // The guest services its rings meanwhile, so it can answer the REQUEST (with RST).
    await vm.guest.waitFor(() => settled, 5000, "the CONNECT to settle");
    await assert.rejects(connecting, HostConnectError);
    const ms = performance.now() - start;
    assert.ok(ms < 1500, `refusal took ${ms.toFixed(0)} ms (connect timeout is 2000 ms)`);
    await deviceStillWorks(vm, 4445, "after a refused CONNECT");
  });
});

Deno.test("packets for no connection get RST (except RST); RST mirrors ports and type", async () => {
  await withVm({ profile: "qemu" }, async (vm) => {
    const cap = vm.guest.capture();
    const cases = [
      { op: VIRTIO_VSOCK_OP_RW, srcPort: 4001, payload: enc.encode("data for nobody") },
      { op: VIRTIO_VSOCK_OP_SHUTDOWN, srcPort: 4002, flags: 3 },
      { op: VIRTIO_VSOCK_OP_CREDIT_UPDATE, srcPort: 4003 },
      { op: VIRTIO_VSOCK_OP_RESPONSE, srcPort: 4004 },
    ];
    for (const c of cases) {
      vm.faults.sendRawPacket(
        { op: c.op, srcPort: c.srcPort, dstPort: 9100, flags: c.flags },
        c.payload,
      );
    }
    // An RST for no connection is not answered.
    vm.faults.sendRawPacket({ op: VIRTIO_VSOCK_OP_RST, srcPort: 4005, dstPort: 9100 });
    const rsts = () =>
      cap.packets.filter((p) => p.direction === "rx" && p.header.op === VIRTIO_VSOCK_OP_RST);
    await vm.guest.waitFor(() => rsts().length >= cases.length, 5000, "RSTs for 4 packets");
    await vm.guest.idle(200);
    cap.stop();
    const got = rsts().map((p) => p.header);
    assert.deepEqual(got.map((h) => h.dstPort).sort(), [4001, 4002, 4003, 4004]);
    for (const h of got) {
      assert.equal(h.srcPort, 9100);
      assert.equal(h.srcCid, 2);
      assert.equal(h.dstCid, vm.cid);
      assert.equal(h.type, VIRTIO_VSOCK_TYPE_STREAM);
      assert.equal(h.len, 0);
    }
    await deviceStillWorks(vm, 9101, "after packets for no connection");
  });
});

Deno.test("unknown socket types get RST and never reach the host", async () => {
  await withVm({ profile: "crosvm" }, async (vm) => {
    const hl = vm.hostListen(9200);
    const cap = vm.guest.capture();
    // SEQPACKET was not negotiated; 9 is no type at all. Both target a listening host port.
    for (const [type, srcPort] of [[VIRTIO_VSOCK_TYPE_SEQPACKET, 4100], [9, 4101]]) {
      vm.faults.sendRawPacket({ op: VIRTIO_VSOCK_OP_REQUEST, type, srcPort, dstPort: 9200 });
    }
    const rsts = () =>
      cap.packets.filter((p) => p.direction === "rx" && p.header.op === VIRTIO_VSOCK_OP_RST);
    await vm.guest.waitFor(() => rsts().length >= 2, 5000, "RSTs for unknown types");
    cap.stop();
    const byPort = new Map(rsts().map((p) => [p.header.dstPort, p.header]));
    assert.equal(byPort.get(4100)?.type, VIRTIO_VSOCK_TYPE_SEQPACKET);
    assert.equal(byPort.get(4101)?.type, 9);
    // Our guest driver, like Linux, drops an RST of a type it does not know; that is expected.
    const anomalies = vm.guest.anomalies.splice(0);
    assert.ok(anomalies.every((a) => /unsupported type/.test(a)), anomalies.join("\n"));
    await assert.rejects(hl.accept({ timeoutMs: 300 }), HostTimeoutError, "no host connection");
    hl.close();
    await deviceStillWorks(vm, 9201, "after unknown socket types");
  });
});

Deno.test("spoofed src_cid: never delivered, logged, dropped (no RST ends the live connection)", async () => {
  await withVm({ profile: "qemu" }, async (vm) => {
    const { host, guest } = await guestToHost(vm, 9300);
    const received: Uint8Array[] = [];
    const reader = (async () => {
      const buf = new Uint8Array(65536);
      try {
        for (;;) {
          const n = await host.read(buf);
          if (n === null) return;
          received.push(buf.slice(0, n));
        }
      } catch { /* closed at the end */ }
    })();
    await guest.write(enc.encode("legit-1;"));
    await vm.guest.waitFor(
      () => dec.decode(concat(received)) === "legit-1;",
      5000,
      "the legitimate bytes at the host",
    );
    const hl2 = vm.hostListen(9301);
    const spoofs = [
      // Another CID, on the live connection's ports.
      { srcCid: vm.cid + 1, srcPort: guest.localPort, dstPort: 9300, text: "SPOOF-A" },
      // The guest's CID in the low half, garbage in the reserved upper half.
      { srcCidHi: 1, srcPort: guest.localPort, dstPort: 9300, text: "SPOOF-B" },
      // The host's own CID.
      { srcCid: 2, srcPort: guest.localPort, dstPort: 9300, text: "SPOOF-C" },
    ];
    for (const s of spoofs) {
      vm.faults.sendRawPacket(
        { ...s, op: VIRTIO_VSOCK_OP_RW, bufAlloc: guest.credit.bufAlloc },
        enc.encode(s.text),
      );
    }
    // A spoofed REQUEST to a listening host port must not connect.
    vm.faults.sendRawPacket({
      srcCid: 77,
      srcPort: 3333,
      dstPort: 9301,
      op: VIRTIO_VSOCK_OP_REQUEST,
    });
    await waitForLog(vm, /bad packet from guest/, 4);
    await vm.guest.idle(200);
    await assert.rejects(hl2.accept({ timeoutMs: 300 }), HostTimeoutError, "spoofed REQUEST");
    hl2.close();
    const all = dec.decode(concat(received));
    assert.ok(!all.includes("SPOOF"), `spoofed payload reached the host: ${JSON.stringify(all)}`);
    // Dropped, as Linux's vhost-vsock does: an RST "from" the connection's ports would have
    // ended the guest's real connection.
    assert.equal(guest.closed, false, "the live connection survived the spoofed packets");
    await guest.write(enc.encode("legit-2;"));
    await vm.guest.waitFor(
      () => dec.decode(concat(received)) === "legit-1;legit-2;",
      5000,
      "more legitimate bytes at the host",
    );
    host.close();
    await reader;
    await guest.close();
    await deviceStillWorks(vm, 9302, "after spoofed packets");
  });
});

Deno.test("a spoofed packet on a live connection's ports is dropped; the connection goes on", async () => {
  // Linux's vhost-vsock drops misaddressed packets, and so do we: an RST from "2:<port>"
  // would end the guest's real connection on those ports.
  await withVm({ profile: "crosvm" }, async (vm) => {
    const { host, guest } = await guestToHost(vm, 9310);
    vm.faults.sendRawPacket(
      { srcCid: vm.cid + 7, srcPort: guest.localPort, dstPort: 9310, op: VIRTIO_VSOCK_OP_RW },
      enc.encode("spoof"),
    );
    await waitForLog(vm, /bad packet from guest/);
    await vm.guest.idle(300);
    assert.equal(guest.closed, false, "no RST reached the guest's connection");
    await roundTrip(guest, host, 64 * KiB, "the connection after a spoofed packet");
    await guest.close();
    host.close();
  });
});

// ---------------------------------------------------------------------------------------
// Many connections, connection cap, connect timeout
// ---------------------------------------------------------------------------------------

Deno.test("200 concurrent connections (100 each way), distinct data both directions", async () => {
  await withVm(
    { profile: "qemu", guest: { connectTimeoutMs: 10000 } },
    (vm) => concurrentConnections(vm, 9600, 100, 24 * KiB),
  );
});

Deno.test("--max-connections 8: the 9th is refused both ways, and works after one closes", async () => {
  await withVm({
    profile: "crosvm",
    backend: { extraArgs: ["--max-connections", "8"] },
  }, async (vm) => {
    const hostInit: { host: Deno.UnixConn; guest: GuestConn }[] = [];
    const guestInit: { host: Deno.UnixConn; guest: GuestConn }[] = [];
    for (let i = 0; i < 4; i++) hostInit.push(await hostToGuest(vm, 9700));
    for (let i = 0; i < 4; i++) guestInit.push(await guestToHost(vm, 9701));

    // 9th from the host: the back end closes the socket without asking the guest.
    const listener = vm.guest.listen(9700);
    const pumping = vm.guest.idle(1500);
    await assert.rejects(vm.hostConnect(9700, { timeoutMs: 5000 }), HostConnectError);
    await pumping;
    assert.equal(listener.pending, 0, "the guest never saw the 9th REQUEST");
    // 9th from the guest: RST.
    const hl = vm.hostListen(9701);
    await assert.rejects(
      vm.guest.connect(9701),
      (e: unknown) => e instanceof GuestConnectError && e.reason === "refused",
    );
    await waitForLog(vm, /connection limit \(8\) reached/, 2); // both refusals are logged

    // One closes: a guest connect works again.
    const first = guestInit.shift()!;
    await first.guest.close();
    first.host.close();
    const [g9, h9] = await Promise.all([vm.guest.connect(9701), hl.accept()]);
    await roundTrip(g9, h9, 10 * KiB, "9th guest connection after a close");
    // Full again: refused again.
    await assert.rejects(vm.guest.connect(9701), GuestConnectError);
    // Another closes: a host connect works again.
    const second = hostInit.shift()!;
    await second.guest.close();
    second.host.close();
    const [h10, g10] = await Promise.all([vm.hostConnect(9700), listener.accept()]);
    await roundTrip(g10, h10.conn, 10 * KiB, "9th host connection after a close");

    for (
      const c of [...hostInit, ...guestInit, { host: h9, guest: g9 }, {
        host: h10.conn,
        guest: g10,
      }]
    ) {
      await c.guest.close();
      c.host.close();
    }
    listener.close();
    hl.close();
  });
});

Deno.test("--connect-timeout-ms 300: a CONNECT the guest never answers is closed in ~300 ms", async () => {
  await withVm({
    profile: "qemu",
    backend: { extraArgs: ["--connect-timeout-ms", "300"] },
  }, async (vm) => {
    const listener = vm.guest.listen(9800);
    // Nobody waits on the guest: its driver does not service the rings, so the REQUEST is
    // never answered (a hung guest).
    // Times are measured from before connect(): the back end's timers start later, so the
    // lower bound is exact; the upper bound allows for a busy machine.
    const t0 = performance.now();
    const conn = await Deno.connect({ transport: "unix", path: vm.udsPath });
    await writeAll(conn, enc.encode("CONNECT 9800\n"));
    const ms = await expectClosedByBackend(conn, 5000, "CONNECT to a silent guest", t0);
    assert.ok(ms >= 295 && ms < 1500, `closed after ${ms.toFixed(0)} ms`);
    await waitForLog(vm, /did not accept .* within 300 ms/); // the timeout is logged
    conn.close();
    // The guest wakes up: its late RESPONSE finds no connection and is answered with RST.
    const late = await listener.accept({ timeoutMs: 5000 });
    await late.waitClosed({ timeoutMs: 5000 });
    assert.equal(late.closeReason, "peer-reset");
    // A CONNECT line that never ends is dropped after the same timeout.
    const t1 = performance.now();
    const slow = await Deno.connect({ transport: "unix", path: vm.udsPath });
    await writeAll(slow, enc.encode("CONNECT 98"));
    const ms2 = await expectClosedByBackend(slow, 5000, "an unfinished CONNECT line", t1);
    assert.ok(ms2 >= 295 && ms2 < 1500, `unfinished line dropped after ${ms2.toFixed(0)} ms`);
    slow.close();
    listener.close();
    await deviceStillWorks(vm, 9801, "after connect timeouts");
  });
});
