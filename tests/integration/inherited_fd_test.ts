/**
 * `--fd N` (vhost-user "Backend program conventions"): the daemon serves a
 * listening socket it inherited instead of creating one (how libvirt starts
 * back ends). python3 creates the socket and execs the daemon with it as fd 3.
 */
import assert from "node:assert/strict";
import { repoRoot } from "../../lib/testing/backend_process.ts";
import { GuestRam, VhostUserFrontEnd, VsockGuest } from "../../lib/testing/mod.ts";

const havePython = (() => {
  try {
    return new Deno.Command("python3", { args: ["-c", "pass"] }).outputSync().success;
  } catch {
    return false;
  }
})();

Deno.test({
  name: "--fd: the daemon serves an inherited listening socket",
  ignore: !havePython,
  async fn() {
    const dir = Deno.makeTempDirSync({ prefix: "vuv-fd-" });
    const socket = `${dir}/vhost.sock`;
    const uds = `${dir}/vm.vsock`;
    const script = `
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(4)
os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.execv(sys.argv[2], [sys.argv[2], "run", "-A", sys.argv[3], "--fd", "3", "--uds-path", sys.argv[4], "--guest-cid", "7"])
`;
    const child = new Deno.Command("python3", {
      args: ["-c", script, socket, Deno.execPath(), `${repoRoot()}/main.ts`, uds],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const memory = new GuestRam({});
    let guest: VsockGuest | null = null;
    try {
      const fe = await VhostUserFrontEnd.connect(socket, { profile: "qemu", memory });
      guest = await VsockGuest.boot(fe, {});
      assert.equal(guest.guestCid, 7);
      const listener = Deno.listen({ transport: "unix", path: `${uds}_4000` });
      const [conn, host] = await Promise.all([guest.connect(4000), listener.accept()]);
      await conn.write(new TextEncoder().encode("via --fd"));
      const buf = new Uint8Array(16);
      const n = await host.read(buf);
      assert.equal(new TextDecoder().decode(buf.subarray(0, n ?? 0)), "via --fd");
      host.close();
      listener.close();
      await Promise.all([conn.close({ timeoutMs: 3000 })]);
    } finally {
      await guest?.close();
      guest?.frontEnd.close();
      memory.close();
      child.kill("SIGTERM");
      const out = await child.output();
      assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
      Deno.removeSync(dir, { recursive: true });
    }
  },
});
