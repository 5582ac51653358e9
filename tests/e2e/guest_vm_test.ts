/**
 * Self-test of the real-guest harness (guest_vm.ts), runnable without the vsock back end:
 * the guest boots with no vsock device, answers shell commands over the serial console,
 * has sha256sum and socat, loads the virtio vsock modules and can reload the transport.
 * AF_VSOCK itself is exercised through vsock_loopback (CID 1), which also pins down the socat
 * address syntax the scenarios use. A fake vhost-user listener checks that QEMU accepts the
 * vhost-user-vsock-pci command line and opens the protocol with GET_FEATURES.
 *
 * Skipped when QEMU or the guest kernel is missing, unless CI or E2E_REQUIRED is set.
 */
import assert from "node:assert/strict";
import { GuestVM, skipE2e } from "./guest_vm.ts";

const ignore = skipE2e("guest tests");

/** VHOST_USER_GET_FEATURES, the first request QEMU sends. */
const VHOST_USER_GET_FEATURES = 1;
/** vhost-user header: u32 request, u32 flags, u32 size. */
const VHOST_USER_HDR_SIZE = 12;
/** The local CID of the loopback transport. */
const VMADDR_CID_LOCAL = 1;
const ECHO_PORT = 1234;

Deno.test({
  name: "guest VM without vsock device: boot, shell, tools, vsock modules",
  ignore,
  sanitizeOps: true,
  sanitizeResources: true,
}, async (t) => {
  const logFile = await Deno.makeTempFile({ prefix: "e2e-guest-", suffix: ".log" });
  const vm = await GuestVM.boot({ timeoutMs: 90_000, logFile });
  try {
    console.log(
      `guest ready in ${vm.bootMs} ms (guest uptime ${vm.guestUptimeAtReady} s at the marker)`,
    );

    await t.step("run returns output and exit status", async () => {
      assert.deepEqual(await vm.run("echo hello"), { output: "hello\n", code: 0 });
      assert.deepEqual(await vm.run("printf abc"), { output: "abc", code: 0 });
      assert.deepEqual(await vm.run("true"), { output: "", code: 0 });
      assert.deepEqual(await vm.run("echo out; echo err >&2; sh -c 'exit 3'"), {
        output: "out\nerr\n",
        code: 3,
      });
      assert.deepEqual(await vm.run("echo one\necho two"), { output: "one\ntwo\n", code: 0 });
      const quoted = `it's "quoted" $HOME \\ back`;
      assert.deepEqual(await vm.run(`printf '%s' '${quoted.replaceAll("'", `'\\''`)}'`), {
        output: quoted,
        code: 0,
      });
    });

    await t.step("exit and syntax errors end only the command", async () => {
      assert.deepEqual(await vm.run("echo before; exit 4; echo never"), {
        output: "before\n",
        code: 4,
      });
      const bad = await vm.run("echo 'unterminated");
      assert.equal(bad.code, 2);
      assert.match(bad.output, /syntax error/);
      assert.equal(await vm.runOk("echo still-alive"), "still-alive\n");
      await assert.rejects(vm.runOk("false"), /exit 1/);
      assert.doesNotMatch(vm.consoleLog, /E2E-GUEST-SHELL-EXITED/);
    });

    await t.step("a timed-out command is interrupted", async () => {
      await assert.rejects(vm.run("sleep 600", 1_500), /timed out after 1500 ms/);
      assert.equal(await vm.runOk("echo after"), "after\n");
    });

    await t.step("sha256sum and socat are there", async () => {
      assert.equal(
        await vm.runOk("printf abc | sha256sum"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  -\n",
      );
      assert.match(await vm.runOk("socat -V"), /socat version \d+\.\d+/);
    });

    await t.step("virtio-pci and vsock modules are loaded", async () => {
      const modules = (await vm.runOk("cut -d' ' -f1 /proc/modules")).split("\n");
      for (const m of ["virtio_pci", "vsock", "vmw_vsock_virtio_transport_common"]) {
        assert.ok(modules.includes(m), `${m} not in /proc/modules: ${modules.join(" ")}`);
      }
      assert.ok(modules.includes("vmw_vsock_virtio_transport"));
      assert.equal((await vm.run("test -d /sys/module/vsock")).code, 0);
      assert.equal((await vm.run("test -c /dev/vsock")).code, 0);
    });

    await t.step("AF_VSOCK echo over vsock_loopback with socat", async () => {
      await vm.runOk("modprobe vsock_loopback");
      const server = await vm.spawn(`socat VSOCK-LISTEN:${ECHO_PORT},fork EXEC:cat`);
      // Wait until it listens (the loopback transport answers RST until then).
      await vm.runOk(
        `for i in $(seq 50); do echo ping | socat -t 1 - VSOCK-CONNECT:${VMADDR_CID_LOCAL}:` +
          `${ECHO_PORT} 2>/dev/null | grep -q ping && exit 0; sleep 0.1; done; exit 1`,
      ).catch(async (e) => {
        throw new Error(`${e}\nserver log:\n${(await vm.run(`cat ${server.log}`)).output}`);
      });
      const out = await vm.runOk(
        "head -c 200000 /dev/urandom > /tmp/blob; sha256sum < /tmp/blob; " +
          `socat -t 5 - VSOCK-CONNECT:${VMADDR_CID_LOCAL}:${ECHO_PORT} < /tmp/blob | sha256sum`,
        60_000,
      );
      const [sent, echoed] = out.trim().split("\n");
      assert.match(sent, /^[0-9a-f]{64} {2}-$/);
      assert.equal(echoed, sent);
      await vm.runOk(`kill ${server.pid}`);
    });

    await t.step("reloadVsockDriver unloads and loads the transport", async () => {
      await vm.runOk("rmmod vsock_loopback");
      await vm.reloadVsockDriver();
      const modules = (await vm.runOk("cut -d' ' -f1 /proc/modules")).split("\n");
      assert.ok(modules.includes("vmw_vsock_virtio_transport"));
      const dmesg = await vm.dmesg();
      assert.match(dmesg, /PF_VSOCK/);
    });
  } finally {
    const status = await vm.shutdown();
    assert.equal(status.code, 0, `QEMU exit status ${status.code}; console in ${logFile}`);
    assert.equal(vm.running, false);
  }
  const log = await Deno.readTextFile(logFile);
  assert.match(log, /E2E-GUEST-READY/);
  await Deno.remove(logFile);
});

Deno.test({
  name: "guest VM with vhost-user-vsock-pci: QEMU opens the protocol on the socket",
  ignore,
  sanitizeOps: true,
  sanitizeResources: true,
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "e2e-vhost-" });
  const path = `${dir}/vhost.sock`;
  const listener = Deno.listen({ transport: "unix", path });
  // Accept QEMU, read the first vhost-user header, then hang up: QEMU must give up.
  const firstRequest = (async () => {
    const conn = await listener.accept();
    try {
      const hdr = new Uint8Array(VHOST_USER_HDR_SIZE);
      let got = 0;
      while (got < hdr.length) {
        const n = await conn.read(hdr.subarray(got));
        if (n === null) break;
        got += n;
      }
      return new DataView(hdr.buffer).getUint32(0, true);
    } finally {
      conn.close();
    }
  })();
  firstRequest.catch(() => {}); // reported by the await below, not as an unhandled rejection
  try {
    const boot = GuestVM.boot({ vhostSocket: path, timeoutMs: 60_000 });
    await assert.rejects(boot, (e: Error) => {
      assert.match(e.message, /QEMU exited/);
      assert.match(e.message, /vhost-user-vsock-pci/);
      return true;
    });
    assert.equal(await firstRequest, VHOST_USER_GET_FEATURES);
  } finally {
    listener.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "guest VM boot: a missing vhost-user socket is reported",
  ignore,
}, async () => {
  await assert.rejects(
    GuestVM.boot({ vhostSocket: "/nonexistent/e2e-vhost.sock", timeoutMs: 200 }),
    /vhost-user socket \/nonexistent\/e2e-vhost.sock did not appear/,
  );
});
