/**
 * Datagrams end to end (`--dgram`, VIRTIO_VSOCK_F_DGRAM): the testing guest's datagram
 * sockets against the real back end and host apps on SOCK_DGRAM Unix sockets, with the
 * `<guest-port>\n` line of the host-side mapping; replies both ways; bounded drops; and a
 * back end without `--dgram` never offers the bit. Datagrams and their drops run over split
 * and packed virtqueues alike.
 */
import assert from "node:assert/strict";
import {
  bindUnixDgram,
  close,
  EAGAIN,
  MessageIo,
  pollFds,
  POLLIN,
  sockaddrUn,
} from "../../ffi/mod.ts";
import { startVm, type VmHandle } from "../../lib/testing/mod.ts";
import { featureMask } from "../../lib/virtio/features.ts";
import { VIRTIO_VSOCK_F_DGRAM } from "../../lib/vsock/constants.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();

/** A host app's datagram socket bound at `<uds>_<port>.dgram`. */
class HostDgram {
  readonly fd: number;
  readonly io = new MessageIo();
  readonly buf = new Uint8Array(70_000);
  constructor(readonly vm: VmHandle, readonly port: number) {
    this.fd = bindUnixDgram(`${vm.udsPath}_${port}.dgram`);
  }
  /** Sends `<guestPort>\n<text>` to the back end's `<uds>.dgram`. */
  sendTo(guestPort: number, payload: Uint8Array): number {
    const line = enc.encode(`${guestPort}\n`);
    this.io.setIov(0, line);
    this.io.setIov(1, payload);
    return this.io.send(this.fd, 2, 0, sockaddrUn(`${this.vm.udsPath}.dgram`));
  }
  /** The next datagram (polls while the guest runs). */
  async recv(timeoutMs = 3000): Promise<{ from: string; data: Uint8Array }> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      this.io.setIov(0, this.buf);
      const n = this.io.recv(this.fd, 1, 0, true);
      if (n >= 0) return { from: this.io.senderPath(), data: this.buf.slice(0, n) };
      assert.equal(n, -EAGAIN);
      assert.ok(performance.now() < deadline, "no datagram at the host app");
      await this.vm.guest.idle(5);
      pollFds([this.fd], [POLLIN], 0);
    }
  }
  close(): void {
    close(this.fd);
  }
}

for (const packed of [false, true]) {
  const rings = packed ? "packed" : "split";

  Deno.test(`datagrams: guest -> host app -> reply -> guest, with the port line [${rings} rings]`, async () => {
    const vm = await startVm({
      profile: "crosvm",
      backend: { extraArgs: ["--dgram"] },
      frontEnd: { packed },
    });
    const app = new HostDgram(vm, 7000);
    try {
      assert.equal(vm.guest.packed, packed);
      assert.ok(
        ((vm.frontEnd.ackedFeatures ?? 0n) & featureMask(VIRTIO_VSOCK_F_DGRAM)) !== 0n,
        "the guest acked VIRTIO_VSOCK_F_DGRAM",
      );
      const sock = vm.guest.bindDgram(5555);
      await sock.sendTo(2, 7000, enc.encode("hello host"));
      const got = await app.recv();
      assert.equal(dec.decode(got.data), "5555\nhello host");
      assert.equal(got.from, `${vm.udsPath}.dgram`);
      // The app answers the guest's port; the guest sees it from CID 2, port 7000.
      assert.equal(app.sendTo(5555, enc.encode("hello guest")), 5 + 11);
      const back = await sock.recvFrom({ timeoutMs: 3000 });
      assert.deepEqual([back.cid, back.port, dec.decode(back.data)], [2, 7000, "hello guest"]);
      // Boundaries: each datagram arrives whole and separate, up to 60 KB.
      for (const size of [1, 4096, 60_000]) {
        await sock.sendTo(2, 7000, new Uint8Array(size).fill(size & 0xff));
        const d = await app.recv();
        assert.equal(d.data.length, 5 + size);
      }
      sock.close();
    } finally {
      app.close();
      await vm.stop();
    }
  });

  Deno.test(`datagrams: a flood the guest does not read is dropped and counted, then held back, never queued without bound [${rings} rings]`, async () => {
    const vm = await startVm({
      profile: "crosvm",
      backend: { extraArgs: ["--dgram"] },
      frontEnd: { packed },
    });
    const app = new HostDgram(vm, 7001);
    try {
      const sock = vm.guest.bindDgram(6000);
      vm.faults.starveRx(); // the guest stops giving rx buffers back: everything backs up
      let sent = 0;
      for (let i = 0; i < 3000; i++) {
        if (app.sendTo(6000, new Uint8Array(1000)) > 0) sent++;
        if (i % 100 === 0) await vm.guest.idle(1);
      }
      await vm.guest.idle(300);
      // The back end dropped what did not fit (logged, rate-limited), then stopped reading until
      // the guest takes datagrams: the kernel's queue filled and the host app got EAGAIN
      // (back-pressure) instead of the back end reading datagrams only to drop them.
      assert.ok(sent > 64, `only ${sent} datagrams could be sent`);
      assert.ok(sent < 3000, "the host app felt back-pressure (EAGAIN)");
      await vm.guest.waitFor(
        () => /datagram to the guest dropped/.test(vm.backend.stderr()),
        3000,
        "a drop line",
      );
      const lines = vm.backend.stderr().split("\n").filter((l) => /datagram/.test(l)).length;
      assert.ok(lines < 20, `${lines} datagram log lines`);
      // Streams still work alongside once the guest posts buffers again.
      vm.faults.refillRx();
      const listener = vm.guest.listen(5000);
      const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
      await host.conn.write(enc.encode("ping"));
      assert.equal(dec.decode(await conn.readExactly(4)), "ping");
      host.conn.close();
      await conn.close();
      sock.close();
    } finally {
      app.close();
      await vm.stop();
    }
  });

  Deno.test(`datagrams: sources taking turns in bursts each keep their port and order (drained flows' storage is reused) [${rings} rings]`, async () => {
    const vm = await startVm({
      profile: "crosvm",
      backend: { extraArgs: ["--dgram"] },
      frontEnd: { packed },
    });
    const apps = [new HostDgram(vm, 7100), new HostDgram(vm, 7101)];
    try {
      const sock = vm.guest.bindDgram(6100);
      const burst = 40; // more than one scheduler quantum of 4 KiB rx buffers
      const next = [0, 0];
      const got = [0, 0];
      const payload = new Uint8Array(1000);
      const view = new DataView(payload.buffer);
      for (let round = 0; round < 6; round++) {
        for (let a = 0; a < 2; a++) {
          for (let k = 0; k < burst; k++) {
            view.setUint32(0, apps[a].port);
            view.setUint32(4, next[a]++);
            for (;;) { // a Unix datagram socket queues few datagrams: wait for the back end
              const n = apps[a].sendTo(6100, payload);
              if (n !== -EAGAIN) {
                assert.equal(n, 5 + payload.length);
                break;
              }
              await vm.guest.idle(1);
            }
          }
          // Let the back end take this burst (and drain its flow) before the other source.
          await vm.guest.idle(2);
        }
        for (let n = 0; n < 2 * burst; n++) {
          const d = await sock.recvFrom({ timeoutMs: 3000 });
          const dv = new DataView(d.data.buffer, d.data.byteOffset);
          const a = apps.findIndex((x) => x.port === d.port);
          assert.ok(a >= 0, `datagram from port ${d.port}`);
          assert.equal(dv.getUint32(0), d.port, "the datagram carries its source's port");
          assert.equal(dv.getUint32(4), got[a]++, `datagram order from port ${d.port}`);
        }
      }
      assert.deepEqual(got, next);
      sock.close();
    } finally {
      for (const a of apps) a.close();
      await vm.stop();
    }
  });
}

Deno.test("datagrams: without --dgram the bit is not offered and nothing is bound", async () => {
  const vm = await startVm({ profile: "crosvm" });
  try {
    assert.equal((vm.frontEnd.ackedFeatures ?? 0n) & featureMask(VIRTIO_VSOCK_F_DGRAM), 0n);
    assert.throws(() => Deno.lstatSync(`${vm.udsPath}.dgram`), Deno.errors.NotFound);
  } finally {
    await vm.stop();
  }
});
