/**
 * The testing guest's SEQPACKET sockets against the real back end (main.ts as a child): host
 * apps on SOCK_SEQPACKET Unix sockets (`<uds-path>.seqpacket`, `<uds-path>_<P>`) and sibling
 * guests of one daemon. Every message keeps its boundaries, and MSG_EOR survives guest to
 * guest (AF_UNIX never reports MSG_EOR, so host apps see messages only).
 */
import assert from "node:assert/strict";
import {
  GuestRam,
  pattern,
  spawnBackend,
  startVm,
  VhostUserFrontEnd,
  VsockGuest,
} from "../../lib/testing/mod.ts";
import { repoRoot } from "../../lib/testing/backend_process.ts";
import { seqpacketHybridConnect, SeqpacketListener } from "../e2e/host_seqpacket.ts";

const SIZES = [1, 4096, 65536, 128 * 1024];

Deno.test("guest seqpacket: host app via <uds>.seqpacket and guest client to <uds>_<P>", async () => {
  const vm = await startVm({ profile: "qemu" });
  try {
    // host -> guest
    const l = vm.guest.listen(6000, { type: "seqpacket" });
    const [{ sock }, conn] = await Promise.all([
      seqpacketHybridConnect(vm.udsPath, 6000),
      l.accept(),
    ]);
    assert.equal(conn.type, "seqpacket");
    const msgs = SIZES.map((n, i) => pattern(n, i + 1));
    const sending = (async () => {
      for (const m of msgs) await sock.send(m);
    })();
    for (const m of msgs) {
      const got = await conn.readMessage();
      assert.deepEqual(got?.data, m, `${m.length}-byte message from the host`);
    }
    await sending;
    // guest -> host app on the same connection
    const echoes = (async () => {
      const out: number[] = [];
      for (let i = 0; i < msgs.length; i++) out.push((await sock.recv())!.length);
      return out;
    })();
    for (const m of msgs) await conn.sendMessage(m, { eor: true });
    await vm.guest.waitFor(() => conn.credit.peerInFlight() === 0, 10_000, "host reads all");
    assert.deepEqual(await echoes, SIZES);
    sock.close();
    assert.equal(await conn.readMessage(), null, "EOF after the host app closed");
    await conn.close();

    // guest -> host listener
    const hl = new SeqpacketListener(`${vm.udsPath}_7000`);
    try {
      const [c, h] = await Promise.all([
        vm.guest.connect(7000, 2, { type: "seqpacket" }),
        hl.accept(10_000),
      ]);
      for (const m of msgs) await c.sendMessage(m);
      for (const m of msgs) assert.deepEqual(await h.recv(), m);
      h.close();
      await c.close();
    } finally {
      hl.close();
    }
    assert.deepEqual(vm.guest.anomalies, []);
  } finally {
    await vm.stop();
  }
});

Deno.test("guest seqpacket: sibling guests keep message boundaries and EOR", async () => {
  const backend = await spawnBackend({
    command: `${Deno.execPath()} run -A ${repoRoot()}/main.ts ` +
      `--vm guest-cid=3,socket={socket},uds-path={uds},groups=g ` +
      `--vm guest-cid=4,socket={socket}.b,uds-path={uds}.b,groups=g`,
  });
  const guests: VsockGuest[] = [];
  const mems: GuestRam[] = [];
  try {
    for (const path of [backend.socketPath, `${backend.socketPath}.b`]) {
      const memory = new GuestRam({});
      mems.push(memory);
      const fe = await VhostUserFrontEnd.connect(path, { profile: "qemu", memory });
      guests.push(await VsockGuest.boot(fe, {}));
    }
    const [a, b] = guests;
    const l = b.listen(7100, { type: "seqpacket" });
    const connecting = a.connect(7100, 4, { type: "seqpacket" });
    const inB = await l.accept({ timeoutMs: 5000 });
    const inA = await connecting;
    const msgs = [...SIZES, 7].map((n, i) => pattern(n, i + 3));
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
    assert.equal(inB.closeReason, "peer-closed");
    assert.deepEqual([...a.anomalies, ...b.anomalies], []);
  } finally {
    for (const g of guests) {
      await g.close();
      g.frontEnd.close();
    }
    for (const m of mems) m.close();
    await backend.stop();
  }
});
