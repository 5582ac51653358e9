/**
 * The testing guest's SEQPACKET sockets against the real back end (main.ts as a child): host
 * apps on SOCK_SEQPACKET Unix sockets (`<uds-path>.seqpacket`, `<uds-path>_<P>`). Every message
 * keeps its boundaries (AF_UNIX never reports MSG_EOR, so host apps see messages only; sibling
 * guests, which keep EOR, are in siblings_test.ts). Split and packed virtqueues alike.
 */
import assert from "node:assert/strict";
import { pattern, startVm } from "../../lib/testing/mod.ts";
import { seqpacketHybridConnect, SeqpacketListener } from "../e2e/host_seqpacket.ts";

const SIZES = [1, 4096, 65536, 128 * 1024];

for (const packed of [false, true]) {
  const rings = packed ? "packed" : "split";
  Deno.test(
    `guest seqpacket: host app via <uds>.seqpacket and guest client to <uds>_<P> [${rings} rings]`,
    async () => {
      const vm = await startVm({ profile: "qemu", frontEnd: { packed } });
      try {
        assert.equal(vm.guest.packed, packed);
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
    },
  );
}
