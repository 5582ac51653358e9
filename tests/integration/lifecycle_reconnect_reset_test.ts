/**
 * Front-end reconnect and guest driver reset (the back end as a child process, `lib/testing`):
 * 100 front-end sessions on one back end, where each disconnect gives the old session's host
 * sockets EOF and the back end's fd count stays flat; after a driver reset, the host sockets of
 * the old connections are closed and new connections work both ways. Over split and packed
 * virtqueues.
 */
import assert from "node:assert/strict";
import {
  GuestRam,
  hostConnect,
  hostListen,
  pattern,
  readExactly,
  spawnBackend,
  VhostUserFrontEnd,
  VsockGuest,
  writeAll,
} from "../../lib/testing/mod.ts";
import { withVm } from "./vm_helpers.ts";
import { GUEST_CID } from "./raw_guest.ts";
import { guestToHost, hostToGuest, rings, VM_SETUPS } from "./lifecycle_helpers.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();

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
