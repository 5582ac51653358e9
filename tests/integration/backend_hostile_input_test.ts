/**
 * Integration tests of the back end's robustness against malformed input (main.ts as a child
 * process, driven through the testing library: a scripted VMM front end and a Linux-like guest
 * driver on one side, host applications on the hybrid-vsock Unix sockets on the other):
 * malformed descriptor chains (tx and rx), malformed vhost-user messages (error ack with
 * REPLY_ACK, a reply or a clean disconnect otherwise, never silence; a rejected SET_VRING_KICK
 * keeps the ring's kick fd), framing errors, bad CONNECT lines. Afterwards the back end still
 * works and accepts a new front end.
 *
 * Every wait has a deadline; failures quote the back end's stderr.
 */
import assert from "node:assert/strict";
import { VhostUserError, VSOCK_VQ_RX, VSOCK_VQ_TX, writeAll } from "../../lib/testing/mod.ts";
import { writeRaw } from "../../ffi/mod.ts";
import {
  encodeMemoryTable,
  encodeSingleMemoryRegion,
  encodeU64,
  encodeVringState,
} from "../../lib/vhost_user/messages.ts";
import { VhostUserRequest as R } from "../../lib/vhost_user/protocol.ts";
import { VRING_DESC_F_WRITE } from "../../lib/virtio/split_layout.ts";
import {
  assertSameBytes,
  deviceStillWorks,
  expectClosedByBackend,
  hostToGuest,
  randomBytes,
  roundTrip,
  waitForLog,
  waitForLogOnly,
  withVm,
} from "./vm_helpers.ts";

const enc = new TextEncoder();
const KiB = 1024;
const MiB = 1024 * 1024;
const PROFILES = ["qemu", "crosvm"] as const;

// ---------------------------------------------------------------------------------------
// Malformed input
// ---------------------------------------------------------------------------------------

for (const profile of PROFILES) {
  Deno.test(`${profile}: malformed tx descriptor chains are returned unused and logged; the device keeps working`, async () => {
    await withVm({ profile }, async (vm) => {
      const ramEnd = vm.memory.regions.at(-1)!.gpa + vm.memory.regions.at(-1)!.size;
      const f = vm.faults;
      const heads: [string, number][] = [
        ["address 2^60", f.malformedOutOfRange()],
        ["address >= 2^53, < 2^64", f.malformedOutOfRange(2n ** 64n - 4096n)],
        ["straddles the end of RAM", f.malformedOutOfRange(ramEnd - 20)],
        ["loop", f.malformedLoop()],
        ["nested indirect", f.malformedNestedIndirect()],
        ["empty indirect table", f.malformedEmptyIndirect()],
        ["device-writable header", f.malformedWriteOnlyTx()],
      ];
      await vm.guest.waitFor(
        () =>
          heads.every(([, h]) =>
            vm.guest.rawUsed.some((u) => u.queue === VSOCK_VQ_TX && u.head === h)
          ),
        5000,
        "every malformed tx chain back on the used ring",
      );
      for (const [what, head] of heads) {
        const u = vm.guest.rawUsed.find((x) => x.queue === VSOCK_VQ_TX && x.head === head)!;
        assert.equal(u.len, 0, `${what}: used len`);
      }
      await waitForLog(vm, /invalid tx descriptor chain|tx chain shorter than a header/, 5);
      assert.ok(vm.backend.running, "the back end is alive");
      await deviceStillWorks(vm, 9900, `after malformed tx chains (${profile})`);
    });
  });
}

Deno.test("malformed rx buffers (outside RAM, too small, read-only) are skipped and logged", async () => {
  await withVm({ profile: "qemu" }, async (vm) => {
    const { host, guest } = await hostToGuest(vm, 9910);
    // Free some rx descriptors (the ring starts full), then queue bad buffers behind the good.
    vm.faults.starveRx();
    await roundTrip(guest, host, 64 * KiB, "before");
    const small = vm.faults.allocGuest(64);
    const bad = [
      vm.faults.writeRawChain(VSOCK_VQ_RX, [{
        addr: 2n ** 60n,
        len: 4140,
        flags: VRING_DESC_F_WRITE,
      }]),
      vm.faults.writeRawChain(VSOCK_VQ_RX, [{ addr: small, len: 10, flags: VRING_DESC_F_WRITE }]),
      vm.faults.writeRawChain(VSOCK_VQ_RX, [{ addr: small, len: 64, flags: 0 }]),
    ];
    vm.faults.refillRx();
    // Enough traffic for the device to reach the bad buffers.
    await roundTrip(guest, host, 1 * MiB, "after");
    await vm.guest.waitFor(
      () => bad.every((h) => vm.guest.rawUsed.some((u) => u.queue === VSOCK_VQ_RX && u.head === h)),
      5000,
      "the bad rx buffers returned",
    );
    for (const h of bad) {
      assert.equal(vm.guest.rawUsed.find((u) => u.queue === VSOCK_VQ_RX && u.head === h)!.len, 0);
    }
    await waitForLog(vm, /invalid rx descriptor chain/, 3);
    host.close();
    await guest.close();
  });
});

/** The u64 of a REPLY_ACK reply. */
function ackValue(reply: { payload: Uint8Array } | null): bigint {
  assert.ok(reply !== null, "a reply");
  assert.equal(reply.payload.length, 8, "u64 ack payload");
  return new DataView(reply.payload.buffer, reply.payload.byteOffset).getBigUint64(0, true);
}

Deno.test("malformed vhost-user requests with NEED_REPLY get a failure ack; the device keeps working", async () => {
  await withVm({ profile: "qemu", guest: { timeoutMs: 3000 } }, async (vm) => {
    const fe = vm.frontEnd;
    const region = vm.memory.regions[0];
    const regionDesc = fe.regionDescription(region);
    const cases: [string, number, Uint8Array, number[]][] = [
      ["SET_FEATURES, 4-byte payload", R.SET_FEATURES, new Uint8Array(4), []],
      ["SET_FEATURES, bits never offered", R.SET_FEATURES, encodeU64(1n << 63n), []],
      ["unknown request 99", 99, new Uint8Array(0), []],
      ["unknown request 0", 0, new Uint8Array(16), []],
      ["SET_VRING_NUM, vring 7", R.SET_VRING_NUM, encodeVringState({ index: 7, num: 128 }), []],
      ["SET_VRING_NUM 100", R.SET_VRING_NUM, encodeVringState({ index: 0, num: 100 }), []],
      ["SET_VRING_NUM 0", R.SET_VRING_NUM, encodeVringState({ index: 1, num: 0 }), []],
      ["SET_VRING_NUM 65536", R.SET_VRING_NUM, encodeVringState({ index: 1, num: 65536 }), []],
      ["SET_VRING_BASE, vring 3", R.SET_VRING_BASE, encodeVringState({ index: 3, num: 0 }), []],
      [
        "SET_VRING_ENABLE, vring 200",
        R.SET_VRING_ENABLE,
        encodeVringState({ index: 200, num: 1 }),
        [],
      ],
      ["VRING_KICK, vring 9", R.VRING_KICK, encodeVringState({ index: 9, num: 0 }), []],
      ["SET_VRING_CALL, vring 5", R.SET_VRING_CALL, encodeU64(5), []],
      ["SET_VRING_KICK, fd missing", R.SET_VRING_KICK, encodeU64(0), []],
      [
        "ADD_MEM_REG without fd",
        R.ADD_MEM_REG,
        encodeSingleMemoryRegion({ ...regionDesc, guestAddr: 0x4000_0000 }),
        [],
      ],
      ["ADD_MEM_REG, short payload", R.ADD_MEM_REG, new Uint8Array(20), []],
      [
        "SET_MEM_TABLE, 2 regions, 0 fds",
        R.SET_MEM_TABLE,
        encodeMemoryTable({ regions: [regionDesc, { ...regionDesc, guestAddr: 0x4000_0000 }] }),
        [],
      ],
      [
        "SET_MEM_TABLE, 9 regions claimed",
        R.SET_MEM_TABLE,
        (() => {
          const b = new Uint8Array(8 + 32);
          new DataView(b.buffer).setUint32(0, 9, true);
          return b;
        })(),
        [],
      ],
      [
        "SET_CONFIG on a read-only config",
        R.SET_CONFIG,
        (() => {
          const b = new Uint8Array(12 + 8);
          new DataView(b.buffer).setUint32(4, 8, true);
          return b;
        })(),
        [],
      ],
      ["SET_STATUS, 3-byte payload", R.SET_STATUS, new Uint8Array(3), []],
      ["SET_LOG_BASE without fd", R.SET_LOG_BASE, new Uint8Array(16), []],
      [
        // Last: it names a region whose user address range holds the live rings.
        "REM_MEM_REG of an unknown region",
        R.REM_MEM_REG,
        encodeSingleMemoryRegion({ ...regionDesc, guestAddr: 0x7000_0000 }),
        [],
      ],
    ];
    // A live connection: after each failed request, it must still carry data both ways.
    const live = await hostToGuest(vm, 9919);
    for (const [what, req, payload, fds] of cases) {
      let reply;
      try {
        reply = fe.request(req, payload, fds, {
          needReply: true,
          expectReply: true,
          timeoutMs: 3000,
        });
      } catch (e) {
        assert.fail(`${what}: no failure ack (${e instanceof Error ? e.message : e})`);
      }
      assert.notEqual(ackValue(reply), 0n, `${what}: acked as success`);
      try {
        await roundTrip(live.guest, live.host, 1 * MiB, what); // > the rx ring: needs kicks
      } catch (e) {
        assert.fail(`the device stopped working after a failed ${what}: ${e}`);
      }
    }
    live.host.close();
    await live.guest.close();
    assert.equal(fe.hasPendingInput(), false, "no stray replies");
    await waitForLog(vm, /vhost-user: .* failed: /, cases.length);
    // A valid request with NEED_REPLY still acks 0, and the data path still works.
    assert.equal(ackValue(fe.request(R.SET_OWNER, undefined, [], { needReply: true })), 0n);
    await deviceStillWorks(vm, 9920, "after malformed vhost-user requests");
    // And a new front end is accepted on the same socket.
    await vm.faults.reconnect();
    await deviceStillWorks(vm, 9922, "with a new front end");
  });
});

Deno.test("a rejected SET_VRING_KICK (no fd, no NOFD flag) leaves the ring's kick fd in place", async () => {
  await withVm({ profile: "qemu", guest: { timeoutMs: 5000 } }, async (vm) => {
    const { host, guest } = await hostToGuest(vm, 9925);
    const reply = vm.frontEnd.request(R.SET_VRING_KICK, encodeU64(VSOCK_VQ_RX), [], {
      needReply: true,
    });
    assert.notEqual(ackValue(reply), 0n, "rejected");
    // Make the device run out of rx buffers, so that it needs the guest's kick to go on.
    vm.faults.starveRx();
    const data = randomBytes(1 * MiB);
    const writing = writeAll(host, data);
    writing.catch(() => {}); // awaited below; a failure before that must not go unhandled
    // The guest reads (returning credit) but posts no rx buffers.
    const reading = guest.readExactly(data.length, { timeoutMs: 10000 });
    reading.catch(() => {}); // awaited below
    await vm.guest.waitFor(() => vm.guest.rxPosted === 0, 5000, "all rx buffers used");
    // Let the credit updates of those reads reach the device: from now on only the refill's
    // kick can tell it that buffers are back.
    await vm.guest.idle(300);
    assert.ok(guest.bytesReceived < data.length);
    vm.faults.refillRx(); // publishes and kicks the rx queue, as Linux does
    const got = await reading;
    assertSameBytes(got, data, "host -> guest after the refill kick");
    await writing;
    host.close();
    await guest.close();
  });
});

Deno.test("a failing request that always has a reply gets a reply or a disconnect, never silence", async () => {
  // A VMM blocks on the reply of GET_* (and of SET_DEVICE_STATE_FD / SET_LOG_BASE): a back end
  // that neither answers nor hangs up freezes it. One scenario per VM: each may end with a
  // disconnect.
  const cases: [string, number, Uint8Array][] = [
    ["GET_FEATURES with an 8-byte payload", R.GET_FEATURES, new Uint8Array(8)],
    ["GET_VRING_BASE of vring 7", R.GET_VRING_BASE, encodeVringState({ index: 7, num: 0 })],
    ["GET_VRING_BASE with a 4-byte payload", R.GET_VRING_BASE, new Uint8Array(4)],
    [
      "GET_CONFIG beyond the config space",
      R.GET_CONFIG,
      (() => {
        const b = new Uint8Array(12 + 8);
        new DataView(b.buffer).setUint32(0, 250, true); // offset
        new DataView(b.buffer).setUint32(4, 8, true); // size
        return b;
      })(),
    ],
    [
      "GET_CONFIG past the 8-byte vsock config (answered with an empty reply)",
      R.GET_CONFIG,
      (() => {
        const b = new Uint8Array(12 + 8);
        new DataView(b.buffer).setUint32(0, 8, true); // offset
        new DataView(b.buffer).setUint32(4, 8, true); // size
        return b;
      })(),
    ],
    ["SET_DEVICE_STATE_FD without DEVICE_STATE", R.SET_DEVICE_STATE_FD, new Uint8Array(8)],
    // The qemu profile acks LOG_SHMFD, which makes SET_LOG_BASE a request with a reply.
    ["SET_LOG_BASE without an fd", R.SET_LOG_BASE, new Uint8Array(16)],
  ];
  const silent: string[] = [];
  for (const [what, req, payload] of cases) {
    await withVm({ profile: "qemu" }, async (vm) => {
      let outcome: string;
      try {
        vm.frontEnd.request(req, payload, [], { expectReply: true, timeoutMs: 2000 });
        outcome = "reply";
      } catch (e) {
        assert.ok(e instanceof VhostUserError, String(e));
        outcome = /no reply .* within/.test(e.message) ? "silence" : "disconnect";
      }
      if (outcome === "silence") silent.push(what);
      else if (outcome === "disconnect") {
        await waitForLogOnly(vm, /vhost-user: .*(failed|protocol error|resetting the device)/);
      }
      // In every case, the back end serves the next front end.
      await vm.faults.reconnect();
      await deviceStillWorks(vm, 9930, `after ${what} (${outcome})`);
    });
  }
  assert.deepEqual(silent, [], "requests left without a reply and without a disconnect");
});

Deno.test("vhost-user framing errors: disconnect with a log line, then a new front end works", async () => {
  const frames: [string, Uint8Array][] = [
    [
      "version 0 header",
      (() => {
        const b = new Uint8Array(12);
        new DataView(b.buffer).setUint32(0, R.GET_FEATURES, true);
        return b;
      })(),
    ],
    [
      "payload size 1 MiB",
      (() => {
        const b = new Uint8Array(12);
        const v = new DataView(b.buffer);
        v.setUint32(0, R.SET_FEATURES, true);
        v.setUint32(4, 1, true);
        v.setUint32(8, 1 << 20, true);
        return b;
      })(),
    ],
    [
      "unknown flag bits",
      (() => {
        const b = new Uint8Array(12);
        const v = new DataView(b.buffer);
        v.setUint32(0, R.SET_OWNER, true);
        v.setUint32(4, 1 | 0x100, true);
        return b;
      })(),
    ],
  ];
  for (const [what, bytes] of frames) {
    await withVm({ profile: "crosvm" }, async (vm) => {
      const fe = vm.frontEnd;
      assert.equal(writeRaw(fe.socketFd, bytes), bytes.length);
      // The back end hangs up: the next request fails.
      await waitForLogOnly(vm, /vhost-user: protocol error: .*resetting the device/);
      assert.throws(() => fe.getFeatures(), VhostUserError, `${what}: connection still open`);
      await vm.faults.reconnect();
      await deviceStillWorks(vm, 9940, `after a framing error (${what})`);
    });
  }
});

Deno.test("bad CONNECT lines close only that host socket", async () => {
  await withVm({ profile: "qemu" }, async (vm) => {
    const { host, guest } = await hostToGuest(vm, 9950);
    const lines: [string, Uint8Array][] = [
      ["garbage", enc.encode("HELLO WORLD\n")],
      ["no port", enc.encode("CONNECT\n")],
      ["port not a number", enc.encode("CONNECT abc\n")],
      ["port out of range", enc.encode("CONNECT 4294967296\n")],
      ["a third word", enc.encode("CONNECT 9950 now\n")],
      ["binary", new Uint8Array([0, 0xff, 0x80, 0x0a])],
      ["overlong, no newline", enc.encode("CONNECT " + "0".repeat(100))],
      ["negative port", enc.encode("CONNECT -1\n")],
    ];
    const listener = vm.guest.listen(9950);
    for (const [what, bytes] of lines) {
      const conn = await Deno.connect({ transport: "unix", path: vm.udsPath });
      await writeAll(conn, bytes);
      // The guest pumps meanwhile: a REQUEST reaching it would show up as a pending accept.
      const [, ms] = await Promise.all([
        vm.guest.idle(50),
        expectClosedByBackend(conn, 1500, what),
      ]);
      assert.ok(ms < 1500, what);
      conn.close();
    }
    await vm.guest.idle(100);
    assert.equal(listener.pending, 0, "no bad line reached the guest");
    listener.close();
    await waitForLog(vm, /host client dropped: bad CONNECT line/, lines.length);
    // The established connection is untouched.
    await roundTrip(guest, host, 256 * KiB, "the established connection after bad lines");
    host.close();
    await guest.close();
    await deviceStillWorks(vm, 9951, "after bad CONNECT lines");
  });
});
