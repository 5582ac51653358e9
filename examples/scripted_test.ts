/**
 * Scripted testing: test YOUR host service against a guest, with `deno test`, no VM needed.
 * Copy this file and replace the greeting service with yours. Run: deno test -A scripted_test.ts
 *
 * `startVm` spawns the vhost-user-vsock back end, connects an emulated VMM (front end) and
 * boots an emulated Linux-like guest driver; the guest's sockets are driven from this file.
 */
import assert from "node:assert/strict";
// In your project, import the package's "./testing" export instead, e.g.
//   import { startVm } from "jsr:@vhost-user-vsock/vhost-user-vsock/testing";
//   (or the npm package's ".../testing", or a URL ending in lib/testing/mod.ts)
import {
  GuestConnectError,
  readExactly,
  startVm,
  type VmHandle,
  writeAll,
} from "../lib/testing/mod.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();

/**
 * The host service under test: answers each line "NAME\n" with "hello NAME\n". A guest reaches
 * host port P through the back end, which connects to the Unix socket `<uds-path>_P`.
 */
function greetingService(path: string): Deno.UnixListener {
  const listener = Deno.listen({ transport: "unix", path });
  (async () => {
    for await (const conn of listener) {
      (async () => {
        const buf = new Uint8Array(1024);
        let line = "";
        for (let n; (n = await conn.read(buf)) !== null;) {
          line += dec.decode(buf.subarray(0, n));
          if (line.endsWith("\n")) {
            await writeAll(conn, enc.encode(`hello ${line}`));
            line = "";
          }
        }
        conn.close();
      })().catch(() => {}); // a peer reset is not the service's failure here
    }
  })().catch(() => {}); // the listener was closed
  return listener;
}

/** Runs `fn` with a fresh back end + guest; always tears everything down. */
async function withGuest(fn: (vm: VmHandle) => Promise<void>): Promise<void> {
  // profile "qemu" imitates QEMU's vhost-user-vsock-pci; "crosvm" imitates crosvm.
  const vm = await startVm({ profile: "qemu", cid: 3 });
  try {
    await fn(vm);
  } finally {
    await vm.stop(); // closes the guest, the front end and the guest RAM, then SIGTERMs the back end
  }
}

Deno.test("a guest client gets an answer from the host greeting service", async () => {
  await withGuest(async (vm) => {
    const service = greetingService(`${vm.udsPath}_5000`);
    try {
      // Guest side: connect(CID 2 = host, port 5000), like socket(AF_VSOCK) + connect().
      const conn = await vm.guest.connect(5000);
      await conn.write(enc.encode("guest\n"));
      const answer = await conn.readExactly("hello guest\n".length);
      assert.equal(dec.decode(answer), "hello guest\n");
      await conn.close(); // SHUTDOWN, then the back end's RST; the host sees EOF
    } finally {
      service.close();
    }
  });
});

Deno.test("a guest connect is refused (RST) while the host service is down", async () => {
  await withGuest(async (vm) => {
    await assert.rejects(vm.guest.connect(5000), GuestConnectError);
  });
});

Deno.test("a host client talks to a guest service through the hybrid socket", async () => {
  await withGuest(async (vm) => {
    // Guest side: a service on vsock port 1234 that answers in upper case.
    const listener = vm.guest.listen(1234);
    const guestService = (async () => {
      const conn = await listener.accept();
      const request = await conn.readExactly(4);
      await conn.write(enc.encode(dec.decode(request).toUpperCase()));
      await conn.close();
    })();
    // Host side: vm.hostConnect sends "CONNECT 1234\n" to the back end's socket and waits for
    // "OK <host-port>\n" (a plain Deno.connect to vm.udsPath works the same way).
    const host = await vm.hostConnect(1234);
    await writeAll(host.conn, enc.encode("ping"));
    assert.equal(dec.decode(await readExactly(host.conn, 4)), "PING");
    host.conn.close();
    await guestService;
    listener.close();
  });
});
