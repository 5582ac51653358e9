/**
 * Hostile host apps on the hybrid-vsock socket `<uds_path>` (the `CONNECT <port>\n`
 * handshake), against the back end as a child process:
 *
 * - out of fds: idle clients exhaust the back end's fd limit, so accept() fails with EMFILE.
 *   The listening fd is level-triggered; a handler that returns without backing off makes the
 *   reactor spin at 100% CPU and log one line per turn. The back end must pause accepts (low
 *   CPU, a few log lines) and serve CONNECTs again once fds are free;
 * - pending handshakes full: idle clients fill the handshake table. Refusing the newest locks
 *   every well-formed CONNECT out for as long as the flood goes on; evicting the oldest lets
 *   it through.
 */
import assert from "node:assert/strict";
import {
  pattern,
  readExactly,
  repoRoot,
  startVm,
  type StartVmOptions,
  type VmHandle,
  writeAll,
} from "../../lib/testing/mod.ts";
import { MAX_PENDING_HANDSHAKES } from "../../lib/vsock/host_listener.ts";
import { DEFAULT_MAX_CONNECTIONS } from "../../lib/config.ts";
import { procCpuSeconds } from "../bench/proc_stats.ts";
import { fdCount } from "../fuzz/host_apps.ts";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function logLines(vm: VmHandle, re: RegExp): string[] {
  return vm.backend.stderr().split("\n").filter((l) => re.test(l));
}

async function waitForLog(vm: VmHandle, re: RegExp, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (logLines(vm, re).length === 0) {
    if (Date.now() >= deadline) throw new Error(`no back-end log line matching ${re}`);
    await sleep(20);
  }
}

/** Opens `n` host clients that never send a byte (connect() retried while the backlog is full). */
async function idleClients(vm: VmHandle, n: number): Promise<Deno.UnixConn[]> {
  const conns: Deno.UnixConn[] = [];
  for (let i = 0; i < n; i++) {
    for (let tries = 0;; tries++) {
      try {
        conns.push(await Deno.connect({ transport: "unix", path: vm.udsPath }));
        break;
      } catch (e) {
        if (!(e instanceof Deno.errors.WouldBlock) || tries > 200) throw e;
        await sleep(10);
      }
    }
  }
  return conns;
}

/** Waits until the back end's fd count has not changed for 300 ms (it accepted what it will). */
async function acceptedAll(pid: number): Promise<void> {
  let last = -1;
  for (let stable = 0, i = 0; stable < 3 && i < 100; i++) {
    const n = fdCount(pid);
    stable = n === last ? stable + 1 : 0;
    last = n;
    await sleep(100);
  }
}

function closeAll(conns: Deno.Conn[]): void {
  for (const c of conns) {
    try {
      c.close();
    } catch { /* closed */ }
  }
}

/** A well-formed CONNECT to a listening guest port works, with data both ways. */
async function connectWorks(vm: VmHandle, port: number, what: string): Promise<void> {
  const listener = vm.guest.listen(port);
  try {
    const [h, g] = await Promise.all([
      vm.hostConnect(port, { timeoutMs: 5000 }),
      listener.accept({ timeoutMs: 5000 }),
    ]);
    const data = pattern(8192, port);
    await writeAll(h.conn, data);
    const got = await g.readExactly(data.length);
    assert.deepEqual(got, data, `${what}: host -> guest`);
    await g.write(data);
    const back = await readExactly(h.conn, data.length, { timeoutMs: 5000 });
    assert.deepEqual(back, data, `${what}: guest -> host`);
    h.conn.close();
    await g.close();
  } finally {
    listener.close();
  }
}

/**
 * Runs `fn` against a fresh VM with a list for the idle clients it opens; closes them and
 * stops the VM afterwards. Failures quote the back end's last log lines.
 */
async function withVm(
  opts: StartVmOptions,
  fn: (vm: VmHandle, idle: Deno.UnixConn[]) => Promise<void>,
): Promise<void> {
  const vm = await startVm(opts);
  const idle: Deno.UnixConn[] = [];
  try {
    await fn(vm, idle);
  } catch (e) {
    const tail = vm.backend.stderr().split("\n").slice(-20).join("\n");
    throw new Error(`${e instanceof Error ? e.message : e}\nback end stderr:\n${tail}`, {
      cause: e,
    });
  } finally {
    closeAll(idle);
    await vm.stop();
  }
}

Deno.test({
  name: "out of fds: accept() failing with EMFILE backs off (no spin, few log lines), then works",
  sanitizeResources: false,
  fn: async () => {
    // The back end idles at about 40 fds with a VM attached; 64 leaves room for ~20 clients.
    const command = `prlimit --nofile=64:64 ${Deno.execPath()} run -A ${repoRoot()}/main.ts ` +
      "--guest-cid {cid} --socket {socket} --uds-path {uds} --log-level info";
    // Idle clients must not time out while the shortage is measured.
    const backend = { command, extraArgs: ["--connect-timeout-ms", "60000"] };
    await withVm({ profile: "qemu", backend }, async (vm, idle) => {
      // more than the free fds, fewer than fds + listen backlog
      idle.push(...await idleClients(vm, 80));
      await waitForLog(vm, /accept.*failed/, 5000);
      const before = procCpuSeconds(vm.backend.pid);
      const linesBefore = vm.backend.stderr().split("\n").length;
      await sleep(1000);
      const cpu = procCpuSeconds(vm.backend.pid) - before;
      const lines = vm.backend.stderr().split("\n").length - linesBefore;
      assert.ok(cpu < 0.3, `back end used ${cpu.toFixed(2)} s of CPU in 1 s while out of fds`);
      assert.ok(lines <= 3, `back end logged ${lines} lines in 1 s while out of fds`);
      const failures = logLines(vm, /accept.*failed/).length;
      assert.ok(failures <= 3, `accept failures logged ${failures} times`);
      // The idle clients go away: fds are free again, and a CONNECT is served.
      closeAll(idle.splice(0));
      await connectWorks(vm, 7000, "after the fd shortage");
    });
  },
});

Deno.test({
  name: "pending handshakes full: the oldest idle client is evicted, a well-formed CONNECT works",
  sanitizeResources: false,
  fn: async () => {
    const backend = { extraArgs: ["--connect-timeout-ms", "60000"] };
    await withVm({ profile: "qemu", backend }, async (vm, idle) => {
      // More than the bound, and more than the connection limit (the old, shared bound).
      const n = Math.max(MAX_PENDING_HANDSHAKES, DEFAULT_MAX_CONNECTIONS) + 64;
      idle.push(...await idleClients(vm, n));
      await acceptedAll(vm.backend.pid);
      // The table is full of idle clients: a well-formed CONNECT still gets through, twice.
      await connectWorks(vm, 7100, "with the handshake table full of idle clients");
      idle.push(...await idleClients(vm, MAX_PENDING_HANDSHAKES));
      await connectWorks(vm, 7101, "after another flood of idle clients");
      // The first idle client was evicted: the back end closed its socket.
      const r = await Promise.race([
        idle[0].read(new Uint8Array(16)).catch(() => null),
        sleep(2000).then(() => "open" as const),
      ]);
      assert.equal(r, null, "the oldest idle client was closed by the back end");
      // Eviction is logged once per burst, not once per client.
      const evictLines = logLines(vm, /closing the oldest/).length;
      assert.ok(evictLines <= 2, `eviction logged ${evictLines} times`);
    });
  },
});
