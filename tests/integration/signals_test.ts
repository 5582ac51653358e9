/**
 * The daemon stops cleanly on SIGTERM and SIGINT: the reactor worker is woken
 * through its eventfd, host connections are closed, socket files are removed,
 * and the process exits 0.
 */
import assert from "node:assert/strict";
import { repoRoot } from "../../lib/testing/backend_process.ts";

async function runAndSignal(signal: Deno.Signal) {
  const dir = Deno.makeTempDirSync({ prefix: "vuv-signal-" });
  const socket = `${dir}/vhost.sock`;
  const uds = `${dir}/vm.vsock`;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${repoRoot()}/main.ts`, "--socket", socket, "--uds-path", uds],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  try {
    const deadline = Date.now() + 30_000;
    while (!exists(socket) || !exists(uds)) {
      assert.ok(Date.now() < deadline, "the daemon did not create its sockets");
      await new Promise((r) => setTimeout(r, 50));
    }
    // a host app in the middle of a CONNECT handshake is closed too
    const host = await Deno.connect({ transport: "unix", path: uds });
    await host.write(new TextEncoder().encode("CONN"));
    child.kill(signal);
    const out = await child.output();
    const stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 0, stderr);
    assert.match(stderr, new RegExp(`${signal}: shutting down`));
    assert.equal(exists(socket), false, "vhost-user socket file removed");
    assert.equal(exists(uds), false, "hybrid socket file removed");
    // EOF, or ECONNRESET when the daemon closed before reading the partial line: closed.
    const r = await host.read(new Uint8Array(8)).catch((e) => e);
    assert.ok(r === null || r instanceof Deno.errors.ConnectionReset, `host app: ${r}`);
    host.close();
  } finally {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
    Deno.removeSync(dir, { recursive: true });
  }
}

function exists(path: string): boolean {
  try {
    Deno.lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

Deno.test("SIGTERM stops the daemon cleanly", () => runAndSignal("SIGTERM"));
Deno.test("SIGINT stops the daemon cleanly", () => runAndSignal("SIGINT"));
