/**
 * Integration tests of the back end's byte streams (main.ts as a child process, driven through
 * the testing library: a scripted VMM front end and a Linux-like guest driver on one side, host
 * applications on the hybrid-vsock Unix sockets on the other):
 *
 * - data integrity both ways (MiBs of random bytes, compared byte for byte), with data sent
 *   right after the CONNECT line (same write, or a separate write before OK) and a CONNECT
 *   line that arrives one byte at a time: vhost-device-vsock 0.3 lost such bytes;
 * - credit: a guest that stops reading makes host writes block with the back end's memory
 *   bounded (VmRSS), a host app that stops reading makes guest writes stall on credit; both
 *   resume and deliver every byte;
 * - half-close both ways (SHUTDOWN with one flag <-> shutdown(2)).
 *
 * Every wait has a deadline; failures quote the back end's stderr.
 */
import assert from "node:assert/strict";
import {
  concat,
  HostTimeoutError,
  readAll,
  readExactly,
  VIRTIO_VSOCK_SHUTDOWN_F_SEND,
  writeAll,
} from "../../lib/testing/mod.ts";
import {
  assertSameBytes,
  bulkFromGuest,
  bulkFromHost,
  guestToHost,
  hostToGuest,
  randomBytes,
  roundTrip,
  sleep,
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

/** Resident set size of a process, in bytes (from /proc/<pid>/status). */
function vmRss(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(Deno.readTextFileSync(`/proc/${pid}/status`));
  if (m === null) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]) * KiB;
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
