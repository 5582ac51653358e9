/**
 * Integration tests of the back end's behaviour (main.ts as a child process), driven through
 * the testing library (`lib/testing`): a scripted VMM front end and a Linux-like guest driver
 * on one side, host applications on the hybrid-vsock Unix sockets on the other.
 *
 * What is covered, and why each matters:
 * - data integrity both ways (MiBs of random bytes, compared byte for byte), with data sent
 *   right after the CONNECT line (same write, or a separate write before OK) and a CONNECT
 *   line that arrives one byte at a time: vhost-device-vsock 0.3 lost such bytes;
 * - credit: a guest that stops reading makes host writes block with the back end's memory
 *   bounded (VmRSS), a host app that stops reading makes guest writes stall on credit; both
 *   resume and deliver every byte;
 * - RST paths: refused connects both ways, packets for unknown connections, unknown socket
 *   types, spoofed source CIDs (never delivered, logged, no half-dead connection left);
 * - half-close both ways (SHUTDOWN with one flag <-> shutdown(2));
 * - 200 concurrent connections with distinct data; the `--max-connections` cap both ways;
 *   the `--connect-timeout-ms` timeout;
 * - robustness: malformed descriptor chains, malformed vhost-user messages (error ack with
 *   REPLY_ACK, a reply or a clean disconnect otherwise, never silence), framing errors, bad
 *   CONNECT lines; afterwards the back end still works and accepts a new front end;
 * - CLI errors: exit status 2 and one line on stderr.
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
  readAll,
  readExactly,
  repoRoot,
  VhostUserError,
  VIRTIO_VSOCK_OP_CREDIT_UPDATE,
  VIRTIO_VSOCK_OP_REQUEST,
  VIRTIO_VSOCK_OP_RESPONSE,
  VIRTIO_VSOCK_OP_RST,
  VIRTIO_VSOCK_OP_RW,
  VIRTIO_VSOCK_OP_SHUTDOWN,
  VIRTIO_VSOCK_SHUTDOWN_F_SEND,
  VIRTIO_VSOCK_TYPE_SEQPACKET,
  VIRTIO_VSOCK_TYPE_STREAM,
  type VmHandle,
  VSOCK_VQ_RX,
  VSOCK_VQ_TX,
  writeAll,
} from "../../lib/testing/mod.ts";
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
  bulkFromGuest,
  bulkFromHost,
  concurrentConnections,
  deviceStillWorks,
  guestToHost,
  hostToGuest,
  logLines,
  randomBytes,
  roundTrip,
  waitForLog,
  withVm,
} from "./vm_helpers.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();
const KiB = 1024;
const MiB = 1024 * 1024;
const PROFILES = ["qemu", "crosvm"] as const;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/** Like `waitForLog` without pumping the guest (for when the vhost-user connection is gone). */
async function waitForLogOnly(vm: VmHandle, re: RegExp, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (logLines(vm, re).length === 0) {
    if (Date.now() >= deadline) {
      throw new Error(`no back-end log line matching ${re} within ${timeoutMs} ms`);
    }
    await sleep(20);
  }
}

/** Resident set size of a process, in bytes (from /proc/<pid>/status). */
function vmRss(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(Deno.readTextFileSync(`/proc/${pid}/status`));
  if (m === null) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]) * KiB;
}

/**
 * Waits until the back end closes `conn` (EOF or ECONNRESET), discarding data; returns the
 * milliseconds since `start` (default: now). Rejects after `timeoutMs` (closing `conn`).
 */
async function expectClosedByBackend(
  conn: Deno.Conn,
  timeoutMs: number,
  what: string,
  start = performance.now(),
): Promise<number> {
  const op = (async () => {
    const buf = new Uint8Array(4096);
    try {
      while ((await conn.read(buf)) !== null) { /* discard */ }
    } catch (e) {
      if (!(e instanceof Deno.errors.ConnectionReset)) throw e;
    }
    return performance.now() - start;
  })();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      try {
        conn.close();
      } catch { /* closed */ }
      reject(new Error(`${what}: the back end did not close the socket within ${timeoutMs} ms`));
    }, timeoutMs);
  });
  try {
    return await Promise.race([op, timeout]);
  } finally {
    clearTimeout(timer);
    op.catch(() => {});
  }
}

/** Reads a "\n"-terminated line byte by byte (so nothing after it is consumed); null on EOF. */
async function readLine(conn: Deno.Conn, timeoutMs = 10000): Promise<string | null> {
  const op = (async () => {
    const bytes: number[] = [];
    const one = new Uint8Array(1);
    for (;;) {
      let n: number | null;
      try {
        n = await conn.read(one);
      } catch (e) {
        if (e instanceof Deno.errors.ConnectionReset) return null;
        throw e;
      }
      if (n === null) return null;
      if (one[0] === 0x0a) return dec.decode(new Uint8Array(bytes));
      bytes.push(one[0]);
      if (bytes.length > 64) throw new Error("reply line too long");
    }
  })();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      try {
        conn.close();
      } catch { /* closed */ }
      reject(new HostTimeoutError(`no reply line within ${timeoutMs} ms`));
    }, timeoutMs);
  });
  try {
    return await Promise.race([op, timeout]);
  } finally {
    clearTimeout(timer);
    op.catch(() => {});
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Closes a host socket that may already be closed (by a timeout helper or a test step). */
function closeQuietly(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch { /* already closed */ }
}

// ---------------------------------------------------------------------------------------
// Data integrity
// ---------------------------------------------------------------------------------------

for (const profile of PROFILES) {
  Deno.test(`${profile}: host -> guest and back, 4 MiB random, data in the CONNECT write`, async () => {
    await withVm({ profile }, (vm) => bulkFromHost(vm, 5000, 4 * MiB));
  });

  Deno.test(`${profile}: guest -> host and back, 4 MiB random each way`, async () => {
    await withVm({ profile }, (vm) => bulkFromGuest(vm, 6000, 4 * MiB));
  });
}

Deno.test("CONNECT line in 1-byte pieces, then data in a separate write before OK", async () => {
  await withVm({ profile: "qemu" }, async (vm) => {
    const listener = vm.guest.listen(5001);
    const early = randomBytes(200 * KiB);
    const line = enc.encode("connect 5001\r\n"); // keyword in any case, CRLF accepted
    const conn = await Deno.connect({ transport: "unix", path: vm.udsPath });
    const handshake = (async () => {
      for (let i = 0; i < line.length; i++) {
        await writeAll(conn, line.subarray(i, i + 1));
        await sleep(5);
      }
      // Right after the line, before the OK arrives.
      await writeAll(conn, early);
      return await readLine(conn);
    })();
    try {
      // Awaited together: a host-side error (BrokenPipe when the back end closes the socket)
      // rejects this test instead of escaping as an unhandled rejection that aborts the module.
      const [guest, ok] = await Promise.all([listener.accept(), handshake]);
      assert.match(ok ?? "<EOF>", /^OK \d+$/);
      const got = await guest.readExactly(early.length);
      assertSameBytes(got, early, "bytes sent right after the CONNECT line");
      // The stream continues normally.
      await roundTrip(guest, conn, 64 * KiB, "after the early data");
      closeQuietly(conn);
      await guest.close();
    } finally {
      closeQuietly(conn);
      listener.close();
    }
  });
});

Deno.test("CONNECT line and data in one write, line split mid-keyword across writes", async () => {
  await withVm({ profile: "crosvm" }, async (vm) => {
    const listener = vm.guest.listen(5002);
    const payload = randomBytes(5000);
    const conn = await Deno.connect({ transport: "unix", path: vm.udsPath });
    const handshake = (async () => {
      await writeAll(conn, enc.encode("CONN"));
      await sleep(20);
      await writeAll(conn, concat([enc.encode("ECT 5002\n"), payload]));
      return await readLine(conn);
    })();
    try {
      const [guest, ok] = await Promise.all([listener.accept(), handshake]);
      assert.match(ok ?? "<EOF>", /^OK \d+$/);
      assertSameBytes(
        await guest.readExactly(payload.length),
        payload,
        "data in the CONNECT write",
      );
      closeQuietly(conn);
      await guest.close();
    } finally {
      closeQuietly(conn);
      listener.close();
    }
  });
});

// ---------------------------------------------------------------------------------------
// Credit: exhaustion and recovery
// ---------------------------------------------------------------------------------------

for (const profile of PROFILES) {
  Deno.test(`${profile}: guest stops reading -> host writes block, back-end memory bounded; then all 64 MiB arrive`, async () => {
    await withVm({ profile }, async (vm) => {
      const size = 64 * MiB;
      const data = randomBytes(size);
      const { host, guest } = await hostToGuest(vm, 5100);
      const rssBefore = vmRss(vm.backend.pid);
      let written = 0;
      const writer = (async () => {
        while (written < size) {
          written += await host.write(data.subarray(written, Math.min(size, written + 256 * KiB)));
        }
      })();
      writer.catch(() => {}); // awaited below
      // The guest keeps servicing its rings (idle pumps them) but its socket is not read.
      await vm.guest.idle(1500);
      const stalledAt = written;
      await vm.guest.idle(500);
      assert.equal(written, stalledAt, "host writes made progress while the guest did not read");
      assert.ok(
        stalledAt < 4 * MiB,
        `${stalledAt} bytes accepted from the host while the guest reads nothing`,
      );
      assert.ok(guest.buffered <= guest.credit.bufAlloc, "the device respected the guest's credit");
      assert.equal(guest.creditViolations, 0);
      const grown = vmRss(vm.backend.pid) - rssBefore;
      assert.ok(grown < 32 * MiB, `back-end RSS grew by ${(grown / MiB).toFixed(1)} MiB`);

      // The guest reads again: everything arrives, in order.
      const got = await guest.readExactly(size, { timeoutMs: 60000 });
      await writer;
      assertSameBytes(got, data, "host -> guest after the stall");
      host.close();
      await guest.close();
    });
  });

  Deno.test(`${profile}: host app stops reading -> guest writes stall on credit; then all 16 MiB arrive`, async () => {
    await withVm({ profile }, async (vm) => {
      const size = 16 * MiB;
      const data = randomBytes(size);
      const { host, guest } = await guestToHost(vm, 6100);
      const rssBefore = vmRss(vm.backend.pid);
      const writing = guest.write(data, { timeoutMs: 60000 });
      writing.catch(() => {}); // awaited below
      await vm.guest.idle(1000);
      const stalledAt = guest.bytesSent;
      await vm.guest.idle(400);
      assert.equal(
        guest.bytesSent,
        stalledAt,
        "the guest kept sending while the host did not read",
      );
      assert.ok(stalledAt > 0 && stalledAt < 4 * MiB, `${stalledAt} bytes sent before stalling`);
      assert.equal(guest.credit.peerFree(), 0, "stalled on credit (the back end's buf_alloc)");
      const grown = vmRss(vm.backend.pid) - rssBefore;
      assert.ok(grown < 32 * MiB, `back-end RSS grew by ${(grown / MiB).toFixed(1)} MiB`);

      const got = await readExactly(host, size, { timeoutMs: 60000 });
      await writing;
      assertSameBytes(got, data, "guest -> host after the stall");
      await guest.close();
      host.close();
    });
  });
}

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
// Half-close
// ---------------------------------------------------------------------------------------

for (const initiator of ["host", "guest"] as const) {
  Deno.test(`half-close (${initiator}-initiated): guest SHUTDOWN(SEND) -> host EOF, host still writes`, async () => {
    await withVm({ profile: "qemu" }, async (vm) => {
      const { host, guest } = initiator === "host"
        ? await hostToGuest(vm, 9400)
        : await guestToHost(vm, 9400);
      const request = randomBytes(300 * KiB);
      const [got] = await Promise.all([
        readAll(host),
        (async () => {
          await guest.write(request);
          guest.shutdown(VIRTIO_VSOCK_SHUTDOWN_F_SEND);
        })(),
      ]);
      assertSameBytes(got, request, "data before the guest's SHUTDOWN(SEND), then EOF");
      // The other direction is still open.
      const answer = randomBytes(500 * KiB);
      const [, back] = await Promise.all([
        writeAll(host, answer),
        guest.readExactly(answer.length),
      ]);
      assertSameBytes(back, answer, "host -> guest after the half-close");
      assert.equal(guest.state, "established");
      host.close();
      assert.equal(await guest.read(), null, "EOF once the host closed too");
      await guest.close();
    });
  });

  Deno.test(`half-close (${initiator}-initiated): host SHUT_WR -> guest EOF (SEND only), guest still writes`, async () => {
    await withVm({ profile: "crosvm" }, async (vm) => {
      const { host, guest } = initiator === "host"
        ? await hostToGuest(vm, 9500)
        : await guestToHost(vm, 9500);
      const request = randomBytes(300 * KiB);
      const [got] = await Promise.all([
        guest.readToEnd(),
        (async () => {
          await writeAll(host, request);
          await host.closeWrite();
        })(),
      ]);
      assertSameBytes(got, request, "data before the host's SHUT_WR, then EOF");
      assert.equal(
        guest.peerShutdown,
        VIRTIO_VSOCK_SHUTDOWN_F_SEND,
        "host EOF is SHUTDOWN with SEND only, not both",
      );
      assert.equal(guest.state, "established");
      const answer = randomBytes(500 * KiB);
      const [, back] = await Promise.all([guest.write(answer), readExactly(host, answer.length)]);
      assertSameBytes(back, answer, "guest -> host after the host's half-close");
      await guest.close();
      assert.equal(guest.closeReason, "closed");
      assert.equal((await readAll(host)).length, 0, "host EOF after the guest's close");
      host.close();
    });
  });
}

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

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

Deno.test("CLI: bad flags exit with status 2 and one line on stderr", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vsock-cli-" });
  const base = ["--socket", `${dir}/v.sock`, "--uds-path", `${dir}/u.sock`];
  const cases: string[][] = [
    ["--no-such-flag"],
    ["--guest-cid", "2", ...base],
    ["--guest-cid", "abc", ...base],
    ["--queue-size", "1000", ...base],
    ["--max-connections", "many", ...base],
    ["--connect-timeout-ms", "-5", ...base],
    [...base, "--log-level"],
    ["--log-level", "chatty", ...base],
    ["--vm", "guest-cid=4,bogus=1"],
    ["--vm", "guest-cid=4", "--guest-cid", "5"],
    ["--tx-buffer-size", "0", ...base],
    ["stray-positional", ...base],
  ];
  try {
    const results = await Promise.all(cases.map((args) =>
      new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", `${repoRoot()}/main.ts`, ...args],
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).output()
    ));
    results.forEach((r, i) => {
      const what = cases[i].join(" ");
      const stderr = dec.decode(r.stderr);
      assert.equal(r.code, 2, `${what}: exit status (stderr: ${stderr})`);
      assert.equal(dec.decode(r.stdout), "", `${what}: nothing on stdout`);
      assert.match(stderr, /^[^\n]+\n$/, `${what}: exactly one line on stderr`);
      assert.match(stderr, /^vhost-user-vsock: /, what);
    });
    // Nothing was created for a run that failed.
    assert.deepEqual([...Deno.readDirSync(dir)], []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
