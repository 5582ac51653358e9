/**
 * Sibling VMs: two guests served by one daemon reach each other by CID when
 * their devices share a group (`--vm ...,groups=a+b`), and get RST otherwise; a guest on split
 * rings and one on packed rings talk alike.
 */
import assert from "node:assert/strict";
import {
  GuestRam,
  pattern,
  spawnBackend,
  VhostUserFrontEnd,
  VsockGuest,
} from "../../lib/testing/mod.ts";
import { repoRoot } from "../../lib/testing/backend_process.ts";

/** VMs a (CID 3) and b (CID 4); `packed` says which use packed virtqueues. */
async function twoVms(groupsB: string, packed: readonly boolean[] = [false, false]) {
  const backend = await spawnBackend({
    command: `${Deno.execPath()} run -A ${repoRoot()}/main.ts ` +
      `--vm guest-cid=3,socket={socket},uds-path={uds},groups=g1 ` +
      `--vm guest-cid=4,socket={socket}.b,uds-path={uds}.b,groups=${groupsB}`,
  });
  const guests: VsockGuest[] = [];
  const mems: GuestRam[] = [];
  for (const [i, path] of [backend.socketPath, `${backend.socketPath}.b`].entries()) {
    const memory = new GuestRam({});
    mems.push(memory);
    const fe = await VhostUserFrontEnd.connect(path, {
      profile: "qemu",
      memory,
      packed: packed[i],
    });
    guests.push(await VsockGuest.boot(fe, {}));
  }
  return {
    a: guests[0],
    b: guests[1],
    async stop() {
      for (const g of guests) {
        await g.close();
        g.frontEnd.close();
      }
      for (const m of mems) m.close();
      return await backend.stop();
    },
  };
}

for (const packedB of [false, true]) {
  Deno.test(`siblings sharing a group talk both ways by CID [a: split rings, b: ${packedB ? "packed" : "split"} rings]`, async () => {
    const vms = await twoVms("g2+g1", [false, packedB]);
    try {
      assert.equal(vms.b.packed, packedB);
      assert.equal(vms.a.guestCid, 3);
      assert.equal(vms.b.guestCid, 4);
      const listener = vms.b.listen(7000);
      const connecting = vms.a.connect(7000, 4);
      const inB = await listener.accept({ timeoutMs: 5000 });
      const inA = await connecting;
      const data = pattern(1 << 20, 7); // larger than a receive buffer: RW split by the switch
      const w = inA.write(data);
      const got = await inB.readExactly(data.length);
      await w;
      assert.deepEqual(got, data);
      const back = pattern(200_000, 9);
      const w2 = inB.write(back);
      assert.deepEqual(await inA.readExactly(back.length), back);
      await w2;
      // Both guests run at once, as real ones do (each pumps its rings only while awaited).
      await Promise.all([inA.close(), inB.close()]);
      assert.equal(
        inA.closeReason === "close-timeout" || inB.closeReason === "close-timeout",
        false,
      );
      assert.deepEqual(vms.a.anomalies, []);
      assert.deepEqual(vms.b.anomalies, []);
    } finally {
      const exit = await vms.stop();
      assert.doesNotMatch(exit.stderr, /ERROR/);
    }
  });
}

Deno.test("a guest cannot reach a VM outside its groups: RST", async () => {
  const vms = await twoVms("other");
  try {
    vms.b.listen(7000);
    await assert.rejects(vms.a.connect(7000, 4, { timeoutMs: 3000 }), /refused|reset|RST/i);
    await assert.rejects(vms.a.connect(7000, 99, { timeoutMs: 3000 }), /refused|reset|RST/i);
  } finally {
    await vms.stop();
  }
});

Deno.test("siblings: seqpacket keeps message boundaries and EOR", async () => {
  const vms = await twoVms("g1");
  try {
    const l = vms.b.listen(7100, { type: "seqpacket" });
    const connecting = vms.a.connect(7100, 4, { type: "seqpacket" });
    const inB = await l.accept({ timeoutMs: 5000 });
    const inA = await connecting;
    const msgs = [1, 4096, 65536, 128 * 1024, 7].map((n, i) => pattern(n, i + 3));
    const sending = (async () => {
      for (const [i, m] of msgs.entries()) await inA.sendMessage(m, { eor: i % 2 === 0 });
    })();
    for (const [i, m] of msgs.entries()) {
      const got = await inB.readMessage();
      assert.deepEqual(got?.data, m, `message ${i}`);
      assert.equal(got?.eor, i % 2 === 0, `message ${i} EOR`);
    }
    await sending;
    // Both guests must run for the close handshake (a guest runs while it is waited on).
    await Promise.all([inA.close(), inB.waitClosed()]);
    assert.equal(inA.closeReason, "closed");
    assert.deepEqual([...vms.a.anomalies, ...vms.b.anomalies], []);
  } finally {
    const exit = await vms.stop();
    assert.doesNotMatch(exit.stderr, /ERROR/);
  }
});
