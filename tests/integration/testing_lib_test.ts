/**
 * Tests of the testing library itself (lib/testing): guest RAM and its allocator, the
 * front-end profiles' handshakes against the real back end (reply values, GET_CONFIG
 * carrying the CID), guest RAM made of several regions, ring stop/restart, driver reset,
 * reconnect, snapshot/restore, dirty logging and the clear failure modes (timeouts, refused
 * connects) that keep tests from hanging.
 */
import assert from "node:assert/strict";
import {
  Faults,
  GuestConnectError,
  GuestRam,
  GuestRamExhaustedError,
  GuestTimeoutError,
  hostConnect,
  pattern,
  readAll,
  readExactly,
  spawnBackend,
  startVm,
  VhostUserError,
  VhostUserFrontEnd,
  VIRTIO_CONFIG_S_DRIVER_OK,
  VIRTIO_CONFIG_S_FEATURES_OK,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RST,
  VIRTIO_VSOCK_SHUTDOWN_F_SEND,
  type VmHandle,
  writeAll,
} from "../../lib/testing/mod.ts";
import {
  VhostUserProtocolFeatureMask as PF,
  VhostUserRequest as R,
} from "../../lib/vhost_user/protocol.ts";
import {
  featureMask,
  VIRTIO_F_VERSION_1_MASK,
  VIRTIO_RING_F_EVENT_IDX_MASK,
  VIRTIO_RING_F_INDIRECT_DESC_MASK,
} from "../../lib/virtio/features.ts";
import { VIRTIO_VSOCK_F_SEQPACKET } from "../../lib/vsock/constants.ts";
import { withVm } from "./vm_helpers.ts";

/** VIRTIO_VSOCK_F_SEQPACKET: QEMU 7.2 passes it to the guest and Linux 6.1 acks it. */
const SEQPACKET_MASK = featureMask(VIRTIO_VSOCK_F_SEQPACKET);

const enc = new TextEncoder();
const dec = new TextDecoder();

/** Echo round trip host -> guest -> host through a guest listener on `port`. */
async function hostToGuestRoundTrip(vm: VmHandle, port: number, size: number): Promise<void> {
  const listener = vm.guest.listen(port);
  const [host, conn] = await Promise.all([vm.hostConnect(port), listener.accept()]);
  const data = pattern(size, port);
  const [, got] = await Promise.all([writeAll(host.conn, data), conn.readExactly(size)]);
  assert.deepEqual(got, data);
  const [, back] = await Promise.all([conn.write(got), readExactly(host.conn, size)]);
  assert.deepEqual(back, data);
  host.conn.close();
  assert.equal(await conn.read(), null, "EOF after the host closed");
  await conn.close();
  // The host app closed its socket entirely: the back end sends SHUTDOWN with both flags and
  // the guest ends the connection at once (with RST), unless its own close got there first.
  assert.ok(
    conn.closeReason === "peer-closed" || conn.closeReason === "closed",
    `a clean close, not ${conn.closeReason}`,
  );
  listener.close();
}

// ---------------------------------------------------------------------------------------
// Guest RAM (no back end)
// ---------------------------------------------------------------------------------------

Deno.test("GuestRam: allocator aligns, stays in one region, frees and merges", () => {
  const ram = new GuestRam({
    regions: [{ gpa: 0, size: 8192 }, { gpa: 0x1_0000_0000, size: 16384 }],
  });
  try {
    const a = ram.alloc(100, 64);
    assert.equal(a % 64, 0);
    const b = ram.alloc(5000, 4096); // does not fit after `a` in region 0 (8 KiB)
    assert.equal(b, 0x1_0000_0000);
    assert.equal(ram.regionOf(b, 5000), 1);
    assert.throws(() => ram.alloc(20000), GuestRamExhaustedError);
    ram.free(b);
    assert.equal(ram.alloc(16384, 4096, 1), 0x1_0000_0000, "freed block merged back");
    assert.throws(() => ram.free(12345), RangeError);
    ram.bytesAt(a, 4).set([1, 2, 3, 4]);
    assert.equal(ram.gpaToUser(a + 2), ram.regions[0].hostAddr + a + 2);
    assert.deepEqual([...ram.read(a, 4)], [1, 2, 3, 4]);
  } finally {
    ram.close();
  }
});

Deno.test("GuestRam: adjacent regions read/write across the boundary; singleMemfd offsets", () => {
  const ram = new GuestRam({
    regions: [{ gpa: 0, size: 4096 }, { gpa: 4096, size: 4096 }],
    singleMemfd: true,
  });
  try {
    assert.equal(ram.regions[0].fd, ram.regions[1].fd);
    assert.equal(ram.regions[1].mmapOffset, 4096);
    ram.write(4090, enc.encode("straddle!"));
    assert.equal(dec.decode(ram.read(4090, 9)), "straddle!");
    assert.equal(ram.regionOf(4090, 9), -1, "no single region holds it");
    assert.throws(() => ram.write(8190, new Uint8Array(4)), RangeError);
  } finally {
    ram.close();
  }
});

Deno.test("GuestRam: rejects unaligned and overlapping regions", () => {
  assert.throws(() => new GuestRam({ regions: [{ gpa: 100, size: 4096 }] }), RangeError);
  assert.throws(() => new GuestRam({ regions: [{ gpa: 0, size: 1000 }] }), RangeError);
  assert.throws(
    () => new GuestRam({ regions: [{ gpa: 0, size: 8192 }, { gpa: 4096, size: 4096 }] }),
    RangeError,
  );
});

// ---------------------------------------------------------------------------------------
// Handshakes
// ---------------------------------------------------------------------------------------

Deno.test("qemu profile: QEMU 7.2 realize + start sequence, reply values, CID", async () => {
  await withVm({ profile: "qemu", cid: 42 }, async (vm) => {
    const fe = vm.frontEnd;
    const names = fe.trace.map((t) => t.name);
    assert.deepEqual(names, [
      // realize
      "GET_FEATURES",
      "GET_PROTOCOL_FEATURES",
      "SET_PROTOCOL_FEATURES",
      "GET_QUEUE_NUM",
      "GET_MAX_MEM_SLOTS",
      "SET_OWNER",
      "GET_FEATURES",
      "SET_VRING_CALL",
      "SET_VRING_CALL",
      "GET_CONFIG",
      // DRIVER_OK
      "SET_FEATURES",
      "GET_STATUS",
      "SET_STATUS",
      "ADD_MEM_REG",
      "SET_VRING_NUM",
      "SET_VRING_BASE",
      "SET_VRING_ADDR",
      "SET_VRING_KICK",
      "SET_VRING_NUM",
      "SET_VRING_BASE",
      "SET_VRING_ADDR",
      "SET_VRING_KICK",
      "SET_VRING_ENABLE",
      "SET_VRING_ENABLE",
      "GET_STATUS",
      "SET_STATUS",
      "SET_VRING_CALL",
      "SET_VRING_CALL",
    ]);
    // Reply values.
    const f = fe.backendFeatures;
    for (const bit of [0, 24, 26, 28, 29, 30, 32]) {
      assert.ok((f >> BigInt(bit)) & 1n, `back end offers feature bit ${bit}`);
    }
    for (const m of [PF.MQ, PF.REPLY_ACK, PF.CONFIG, PF.CONFIGURE_MEM_SLOTS, PF.STATUS]) {
      assert.ok(fe.backendProtocolFeatures & m);
      assert.ok(fe.ackedProtocolFeatures & m);
    }
    assert.ok(fe.backendProtocolFeatures & PF.DEVICE_STATE, "offered");
    assert.equal(fe.ackedProtocolFeatures & PF.DEVICE_STATE, 0n, "QEMU 7.2 does not ack it");
    assert.equal(fe.queueNum, 3);
    assert.ok(fe.maxMemSlots! >= 1);
    assert.equal(new DataView(fe.configCache!.buffer).getUint32(0, true), 42);
    assert.equal(vm.guest.guestCid, 42);
    // QEMU never sends bit 0 (F_STREAM) to the guest; Linux acks what it knows.
    assert.equal(
      vm.guest.features,
      VIRTIO_F_VERSION_1_MASK | VIRTIO_RING_F_EVENT_IDX_MASK | VIRTIO_RING_F_INDIRECT_DESC_MASK |
        SEQPACKET_MASK,
    );
    assert.equal(fe.ackedFeatures, vm.guest.features | (1n << 30n));
    // Status as QEMU left it; GET_CONFIG answers directly too.
    const status = fe.getStatus();
    assert.ok(status & VIRTIO_CONFIG_S_DRIVER_OK && status & VIRTIO_CONFIG_S_FEATURES_OK);
    const cfg = fe.getConfig(0, 8)!;
    assert.deepEqual([...cfg], [42, 0, 0, 0, 0, 0, 0, 0]);
    assert.equal(fe.hasPendingInput(), false, "no stray replies");
    await hostToGuestRoundTrip(vm, 5000, 200_000);
  });
});

Deno.test("crosvm profile: create/activate sequence, 3 queues, GET_CONFIG per access", async () => {
  await withVm({ profile: "crosvm", cid: 1234567 }, async (vm) => {
    const fe = vm.frontEnd;
    const names = fe.trace.map((t) => t.name);
    const perQueue = [
      "SET_VRING_NUM",
      "SET_VRING_ADDR",
      "SET_VRING_BASE",
      "SET_VRING_CALL",
      "SET_VRING_KICK",
      "SET_VRING_ENABLE",
    ];
    assert.deepEqual(names, [
      "SET_OWNER",
      "GET_FEATURES",
      "GET_PROTOCOL_FEATURES",
      "SET_PROTOCOL_FEATURES",
      "GET_QUEUE_NUM",
      "GET_CONFIG",
      "GET_CONFIG",
      "SET_FEATURES",
      "SET_MEM_TABLE",
      ...perQueue,
      ...perQueue,
      ...perQueue,
    ]);
    assert.equal(fe.ackedProtocolFeatures, PF.CONFIG | PF.MQ | PF.DEVICE_STATE | PF.REPLY_ACK);
    assert.equal(fe.backendQueueCount, 3);
    assert.equal(vm.guest.guestCid, 1234567);
    // crosvm does not offer INDIRECT_DESC to the guest.
    assert.equal(vm.guest.features & VIRTIO_RING_F_INDIRECT_DESC_MASK, 0n);
    assert.equal(vm.guest.indirect, false);
    // No NEED_REPLY from crosvm.
    assert.ok(fe.trace.every((t) => (t.flags & 0x8) === 0));
    await hostToGuestRoundTrip(vm, 7000, 100_000);
  });
});

Deno.test("front end options: withhold EVENT_IDX, INDIRECT_DESC, REPLY_ACK; NEED_REPLY everywhere", async () => {
  await withVm({
    profile: "qemu",
    frontEnd: { eventIdx: false, indirectDesc: false, replyAck: false },
    guest: { txPayloadSegments: 3 },
  }, async (vm) => {
    assert.equal(vm.guest.features, VIRTIO_F_VERSION_1_MASK | SEQPACKET_MASK);
    assert.equal(vm.frontEnd.ackedProtocolFeatures & PF.REPLY_ACK, 0n);
    // Without REPLY_ACK QEMU uses GET_FEATURES as a barrier after SET_STATUS.
    const names = vm.frontEnd.trace.map((t) => t.name);
    const i = names.indexOf("SET_STATUS");
    assert.equal(names[i + 1], "GET_FEATURES");
    await hostToGuestRoundTrip(vm, 5001, 150_000);
  });
  await withVm({ profile: "crosvm", frontEnd: { needReplyAll: true } }, async (vm) => {
    const sets = vm.frontEnd.trace.filter((t) => t.name.startsWith("SET_VRING"));
    assert.ok(sets.length > 0 && sets.every((t) => (t.flags & 0x8) !== 0), "NEED_REPLY set");
    await hostToGuestRoundTrip(vm, 5002, 10_000);
  });
});

Deno.test("front end: reply timeout and refused connection are clear errors", async () => {
  await withVm({ profile: "qemu" }, async (vm) => {
    const fe = vm.frontEnd;
    // SET_OWNER has no reply: asking for one must time out, not hang.
    assert.throws(
      () => fe.request(R.SET_OWNER, undefined, [], { expectReply: true, timeoutMs: 200 }),
      (e: unknown) => e instanceof VhostUserError && /no reply .* within/.test(e.message),
    );
    await assert.rejects(
      vm.guest.waitFor(() => false, 150, "something that never happens"),
      (e: unknown) =>
        e instanceof GuestTimeoutError && /something that never happens/.test(e.message) &&
        /rx: avail/.test(e.message),
    );
    await assert.rejects(vm.guest.connect(9), GuestConnectError);
  });
  await assert.rejects(
    VhostUserFrontEnd.connect("/nonexistent/vhost.sock", { connectTimeoutMs: 100 }),
    (e: unknown) => e instanceof VhostUserError && /could not connect/.test(e.message),
  );
});

Deno.test("front end: connect retries while the back end still serves another front end and resets the new connection", async () => {
  const backend = await spawnBackend({ cid: 3 });
  const first = await VhostUserFrontEnd.connect(backend.socketPath, { profile: "qemu" });
  try {
    // The back end refuses a second front end by closing it at once; the new front end's
    // GET_FEATURES is then still unread, so the close is a reset (ECONNRESET), not an EOF.
    const second = VhostUserFrontEnd.connect(backend.socketPath, {
      profile: "qemu",
      connectTimeoutMs: 5000,
    });
    second.catch(() => {}); // awaited below; must not go unhandled meanwhile
    const t0 = Date.now();
    await new Promise((r) => setTimeout(r, 300));
    first.close();
    const fe = await second;
    assert.ok(Date.now() - t0 >= 300, "served only once the first front end was gone");
    assert.ok(fe.getFeatures() !== 0n);
    fe.close();
    assert.match(backend.stderr(), /second front end tried to connect/);
  } finally {
    first.close();
    await backend.stop();
  }
});

// ---------------------------------------------------------------------------------------
// Memory layouts
// ---------------------------------------------------------------------------------------

Deno.test("several memory regions, one memfd, buffers above 4 GiB (qemu and crosvm)", async () => {
  const regions = [
    // small: only the rings fit, so buffers land in the high region
    { gpa: 0, size: 64 * 1024 },
    { gpa: 0x1_0000_0000, size: 16 * 1024 * 1024 },
  ];
  for (const profile of ["qemu", "crosvm"] as const) {
    await withVm({ profile, frontEnd: { regions, singleMemfd: true } }, async (vm) => {
      const fe = vm.frontEnd;
      const adds = fe.trace.filter((t) => t.request === R.ADD_MEM_REG).length;
      const tables = fe.trace.filter((t) => t.request === R.SET_MEM_TABLE);
      if (profile === "qemu") assert.equal(adds, 2);
      else assert.equal(tables[0].fds, 2);
      assert.equal(vm.memory.regions[1].mmapOffset, 64 * 1024);
      assert.ok(vm.guest.queueSetups.every((q) => q.descGpa < 64 * 1024), "rings in region 0");
      await hostToGuestRoundTrip(vm, 5000, 300_000);
    });
  }
});

// ---------------------------------------------------------------------------------------
// Ring life cycle
// ---------------------------------------------------------------------------------------

Deno.test("stopRings/restartRings mid-transfer: nothing moves while stopped, all arrives after", async () => {
  await withVm({ profile: "qemu" }, async (vm) => {
    const listener = vm.guest.listen(5000);
    const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
    const first = pattern(10_000, 1);
    await writeAll(host.conn, first);
    assert.deepEqual(await conn.readExactly(first.length), first);

    const faults = new Faults(vm.guest);
    const bases = faults.stopRings();
    assert.equal(bases.length, 2);
    const rx = vm.guest.queue(0);
    const usedBefore = rx.readUsedIdx();
    const second = pattern(50_000, 2);
    await writeAll(host.conn, second);
    await vm.guest.idle(200);
    assert.equal(rx.readUsedIdx(), usedBefore, "no rx buffer used while the rings are stopped");
    assert.equal(conn.buffered, 0);

    faults.restartRings();
    assert.deepEqual(await conn.readExactly(second.length), second);
    const [, back] = await Promise.all([conn.write(second), readExactly(host.conn, second.length)]);
    assert.deepEqual(back, second);
    host.conn.close();
    await conn.close();
  });
});

Deno.test("starveRx/refillRx: the device runs out of rx buffers, then gets them back", async () => {
  await withVm({ profile: "crosvm", guest: { rxBuffers: 64 } }, async (vm) => {
    const listener = vm.guest.listen(5000);
    const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
    vm.faults.starveRx();
    const data = pattern(600_000, 4); // > 64 buffers of 4 KiB
    const writing = writeAll(host.conn, data);
    const reading = conn.readExactly(data.length, { timeoutMs: 15000 });
    await vm.guest.waitFor(() => vm.guest.rxPosted === 0, 5000, "all rx buffers used");
    const received = conn.bytesReceived;
    await vm.guest.idle(150);
    assert.equal(conn.bytesReceived, received, "nothing arrives without buffers");
    assert.ok(received < data.length);
    assert.ok(vm.faults.refillRx() > 0);
    assert.deepEqual(await reading, data);
    await writing;
    host.conn.close();
    await conn.close();
  });
});

Deno.test("suspend/resume keeps connections; driver reset drops them and moves the rings", async () => {
  await withVm({ profile: "crosvm" }, async (vm) => {
    const listener = vm.guest.listen(5000);
    const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
    const bases = vm.guest.suspend();
    assert.equal(bases.length, 3);
    await writeAll(host.conn, enc.encode("while suspended"));
    vm.guest.resume(bases);
    assert.equal(dec.decode(await conn.readExactly(15)), "while suspended");

    const before = vm.guest.queueSetups.map((q) => q.descGpa);
    const traceLen = vm.frontEnd.trace.length;
    await vm.guest.resetDevice();
    assert.equal(conn.closeReason, "driver-reset");
    await assert.rejects(conn.read(), /reset/);
    const after = vm.guest.queueSetups.map((q) => q.descGpa);
    assert.ok(after.every((a, i) => a !== before[i]), "new ring addresses");
    const bases2 = vm.frontEnd.trace.slice(traceLen).filter((t) => t.request === R.SET_VRING_BASE);
    assert.ok(bases2.every((t) => new DataView(t.payload.buffer).getUint32(4, true) === 0));
    host.conn.close();
    // The listener survived the reset.
    const [host2, conn2] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
    await writeAll(host2.conn, enc.encode("again"));
    assert.equal(dec.decode(await conn2.readExactly(5)), "again");
    host2.conn.close();
    await conn2.close();
  });
});

Deno.test("driver reset forgets raw chains left on the old rings: the new rings' buffers with the same ids stay the driver's", async () => {
  for (const packed of [false, true]) {
    await withVm({ profile: "qemu", frontEnd: { packed } }, async (vm) => {
      // A raw tx chain the device takes but the driver never reaps before the reset.
      const head = vm.faults.malformedOutOfRange();
      await vm.guest.resetDevice();
      // The new rings hand out the same ids (tx id `head` first): their packets are the
      // driver's, not the raw chain's.
      await hostToGuestRoundTrip(vm, 5000, 300_000);
      assert.deepEqual(vm.guest.rawUsed, [], `raw chain ${head} of the old rings never came back`);
      await vm.guest.waitFor(
        () => /tx buffers free 64\/64/.test(vm.guest.describe()),
        2000,
        "every tx buffer back",
      );
    });
  }
});

Deno.test("kick before SET_VRING_ENABLE: buffers posted early are used", async () => {
  for (const profile of ["qemu", "crosvm"] as const) {
    const backend = await spawnBackend({ cid: 3 });
    const fe = await VhostUserFrontEnd.connect(backend.socketPath, { profile });
    const guest = await Faults.bootKickBeforeEnable(fe);
    try {
      const names = fe.trace.map((t) => t.name);
      assert.ok(names.lastIndexOf("SET_VRING_KICK") < names.indexOf("SET_VRING_ENABLE"));
      assert.equal(guest.stats.kicks[0], 1, "rx kicked before enable");
      const listener = guest.listen(5000);
      const [host, conn] = await Promise.all([
        hostConnect(backend.udsPath, 5000),
        listener.accept(),
      ]);
      await writeAll(host.conn, enc.encode("early"));
      assert.equal(dec.decode(await conn.readExactly(5)), "early");
      host.conn.close();
      await conn.close();
      assert.deepEqual(guest.anomalies, []);
    } finally {
      await guest.close();
      fe.close();
      await backend.stop();
    }
  }
});

Deno.test("disconnect/reconnect: a new front end on the same socket and guest RAM", async () => {
  await withVm({ profile: "qemu" }, async (vm) => {
    const faults = vm.faults;
    const old = vm.frontEnd;
    faults.disconnect();
    assert.ok(old.closed);
    assert.equal(vm.memory.closed, false, "guest RAM survives the disconnect");
    const fe = await faults.reconnect();
    assert.equal(vm.frontEnd, fe);
    assert.equal(fe.trace.filter((t) => t.request === R.ADD_MEM_REG).length, 1);
    const hl = vm.hostListen(6000);
    const [conn, h] = await Promise.all([vm.guest.connect(6000), hl.accept()]);
    await conn.write(enc.encode("after reconnect"));
    assert.equal(dec.decode(await readExactly(h, 15)), "after reconnect");
    conn.shutdown(VIRTIO_VSOCK_SHUTDOWN_F_SEND);
    assert.equal((await readAll(h)).length, 0);
    h.close();
    hl.close();
    await conn.close();
  });
});

// ---------------------------------------------------------------------------------------
// Events, snapshot, dirty log
// ---------------------------------------------------------------------------------------

Deno.test("qemu: the VMM's TRANSPORT_RESET drops connections and keeps listeners", async () => {
  await withVm({ profile: "qemu" }, async (vm) => {
    const listener = vm.guest.listen(5000);
    const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
    vm.guest.injectTransportReset();
    assert.equal(conn.closeReason, "transport-reset");
    assert.equal(vm.guest.connections.length, 0);
    host.conn.close();
    assert.ok(!listener.closed);
  });
});

Deno.test("crosvm snapshot and restore onto a new back end", async () => {
  const vm = await startVm({ profile: "crosvm", cid: 9 });
  let backend2: Awaited<ReturnType<typeof spawnBackend>> | null = null;
  try {
    const listener = vm.guest.listen(5000);
    const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
    await writeAll(host.conn, enc.encode("before"));
    assert.equal(dec.decode(await conn.readExactly(6)), "before");
    const snap = await vm.guest.snapshot();
    assert.ok(snap.deviceState.length > 0);
    const names = vm.frontEnd.trace.map((t) => t.name);
    assert.deepEqual(names.slice(-2), ["SET_DEVICE_STATE_FD", "CHECK_DEVICE_STATE"]);
    host.conn.close();

    backend2 = await spawnBackend({ cid: 9 });
    const fe2 = await VhostUserFrontEnd.connect(backend2.socketPath, {
      profile: "crosvm",
      memory: vm.memory,
    });
    vm.frontEnd.close();
    await vm.guest.restore(fe2, snap);
    const rt = fe2.trace.map((t) => t.name);
    assert.deepEqual(rt.slice(rt.indexOf("SET_FEATURES"), rt.indexOf("SET_FEATURES") + 4), [
      "SET_FEATURES",
      "SET_DEVICE_STATE_FD",
      "CHECK_DEVICE_STATE",
      "SET_MEM_TABLE",
    ]);
    // The back end owns the event queue: it must tell the guest about the reset.
    await vm.guest.waitFor(() => conn.closed, 5000, "TRANSPORT_RESET from the restored back end");
    assert.equal(conn.closeReason, "transport-reset");
    assert.equal(vm.guest.guestCid, 9);
    // The restored device works.
    const [host2, conn2] = await Promise.all([
      hostConnect(backend2.udsPath, 5000),
      listener.accept(),
    ]);
    await writeAll(host2.conn, enc.encode("after"));
    assert.equal(dec.decode(await conn2.readExactly(5)), "after");
    host2.conn.close();
    await conn2.close();
    assert.deepEqual(vm.guest.anomalies, []);
  } finally {
    await vm.stop();
    if (backend2 !== null) await backend2.stop();
  }
});

Deno.test("dirty log: pages the back end writes get marked", async () => {
  await withVm({ profile: "qemu" }, async (vm) => {
    const listener = vm.guest.listen(5000);
    const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
    const log = vm.frontEnd.startDirtyLog();
    log.clear();
    await writeAll(host.conn, pattern(20_000, 5));
    await conn.readExactly(20_000);
    const rxUsed = vm.guest.queueSetups[0].usedGpa;
    assert.ok(log.isDirty(rxUsed), "the rx used ring page is dirty");
    assert.ok(log.dirtyPages().length >= 2, "payload pages are dirty too");
    vm.frontEnd.stopDirtyLog();
    host.conn.close();
    await conn.close();
  });
});

// ---------------------------------------------------------------------------------------
// Raw packets and captures
// ---------------------------------------------------------------------------------------

Deno.test("raw packets: a REQUEST to a closed host port is answered with RST", async () => {
  await withVm({ profile: "qemu" }, async (vm) => {
    const cap = vm.guest.capture();
    vm.faults.sendRawPacket({ op: VIRTIO_VSOCK_OP_REQUEST, srcPort: 4444, dstPort: 4445 });
    await vm.guest.waitFor(
      () => cap.packets.some((p) => p.direction === "rx" && p.header.op === VIRTIO_VSOCK_OP_RST),
      5000,
      "RST for a REQUEST nobody listens to",
    );
    const rst = cap.packets.find((p) => p.direction === "rx")!.header;
    assert.equal(rst.dstPort, 4444);
    assert.equal(rst.srcPort, 4445);
    cap.stop();
  });
});

Deno.test("raw packets: RW payload straddling two adjacent RAM regions reaches the host", async () => {
  const half = 8 * 1024 * 1024;
  const regions = [{ gpa: 0, size: half }, { gpa: half, size: half }];
  await withVm({ profile: "qemu", frontEnd: { regions } }, async (vm) => {
    const hl = vm.hostListen(6000);
    const [conn, h] = await Promise.all([vm.guest.connect(6000), hl.accept()]);
    const payload = pattern(100, 9);
    const head = vm.faults.sendPacketAt(
      {
        srcPort: conn.localPort,
        dstPort: conn.peerPort,
        op: 5, // RW
        bufAlloc: conn.credit.bufAlloc,
      },
      payload,
      { headerGpa: vm.faults.allocGuest(64), payloadGpa: half - 50 },
    );
    assert.deepEqual(await readExactly(h, 100), payload);
    await vm.guest.waitFor(() => vm.guest.rawUsed.some((u) => u.head === head), 5000, "raw chain");
    h.close();
    hl.close();
    conn.reset();
  });
});
