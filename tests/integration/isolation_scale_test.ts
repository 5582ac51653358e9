/**
 * Isolation at scale: 32 VMs x 100 connections on one daemon (VMs sharded over the default
 * number of worker processes), every byte checked; and sibling traffic between VMs served by
 * different worker processes (through the shared-memory rings), every byte checked and in
 * order, both ways, on many connections at once.
 */
import assert from "node:assert/strict";
import { hostConnect, pattern, readExactly, writeAll } from "../../lib/testing/mod.ts";
import { bootGuest, type Guest, multiVmDaemon, workerPid } from "./isolation_helpers.ts";

const VMS = 32;
const CONNECTIONS = 100;
const BYTES = 2048;

Deno.test("scale: 32 VMs x 100 connections on one daemon, every byte checked", async () => {
  const d = await multiVmDaemon(VMS);
  const guests: Guest[] = [];
  try {
    for (let i = 0; i < VMS; i++) guests.push(await bootGuest(d.socket(i)));
    await Promise.all(guests.map(async (g, i) => {
      const listener = g.guest.listen(5000);
      for (let c = 0; c < CONNECTIONS; c++) {
        const seed = i * CONNECTIONS + c;
        const [host, conn] = await Promise.all([hostConnect(d.uds(i), 5000), listener.accept()]);
        // host -> guest and guest -> host, each checked
        const down = pattern(BYTES, seed);
        await writeAll(host.conn, down);
        assert.deepEqual(await conn.readExactly(BYTES), down, `VM ${i} conn ${c} down`);
        const up = pattern(BYTES, seed + 7);
        await conn.write(up);
        assert.deepEqual(await readExactly(host.conn, BYTES), up, `VM ${i} conn ${c} up`);
        host.conn.close();
        await conn.close();
      }
      listener.close();
    }));
  } finally {
    for (const g of guests) await g.close();
    const exit = await d.backend.stop();
    assert.equal(exit.code, 0, exit.stderr);
  }
});

Deno.test("siblings across worker processes: many connections both ways, every byte in order", async () => {
  const d = await multiVmDaemon(2, ["--workers", "2"]);
  const [a, b] = [await bootGuest(d.socket(0)), await bootGuest(d.socket(1))];
  try {
    assert.notEqual(workerPid(d.backend.pid, 0), workerPid(d.backend.pid, 1));
    const listener = b.guest.listen(7000);
    const conns = 32;
    const size = 256 * 1024; // several times a ring record and a receive buffer
    // Connections one after another (the test's two guest drivers share one thread), each
    // moving data both ways at once.
    for (let c = 0; c < conns; c++) {
      const [inA, inB] = await Promise.all([a.guest.connect(7000, 4), listener.accept()]);
      const ab = pattern(size, 100 + c);
      const ba = pattern(size / 2, 200 + c);
      const [gotB, gotA] = await Promise.all([
        inB.readExactly(ab.length, { timeoutMs: 30_000 }),
        inA.readExactly(ba.length, { timeoutMs: 30_000 }),
        inA.write(ab),
        inB.write(ba),
      ]);
      assert.deepEqual(gotB, ab, `connection ${c} A -> B`);
      assert.deepEqual(gotA, ba, `connection ${c} B -> A`);
      await Promise.all([inA.close(), inB.close()]);
    }
    assert.deepEqual(a.guest.anomalies, []);
    assert.deepEqual(b.guest.anomalies, []);
  } finally {
    await a.close();
    await b.close();
    const exit = await d.backend.stop();
    assert.equal(exit.code, 0, exit.stderr);
    assert.doesNotMatch(exit.stderr, /ERROR/);
  }
});
