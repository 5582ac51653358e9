/**
 * Helpers for the isolation tests: a daemon serving several VMs from worker processes
 * (`--workers`), guests booted on its sockets, a host -> guest transfer with its speed, a
 * ping-pong latency sample, and the pid of the worker process serving a VM.
 */
import assert from "node:assert/strict";
import { repoRoot } from "../../lib/testing/backend_process.ts";
import {
  type BackendProcess,
  type FrontEndOptions,
  GuestRam,
  hostConnect,
  pattern,
  readExactly,
  spawnBackend,
  VhostUserFrontEnd,
  VsockGuest,
  type VsockGuestOptions,
  writeAll,
} from "../../lib/testing/mod.ts";
import { WORKER_ENV } from "../../lib/worker_plan.ts";

export interface MultiVmDaemon {
  backend: BackendProcess;
  /** vhost-user socket of VM i */
  socket(i: number): string;
  /** hybrid vsock socket of VM i */
  uds(i: number): string;
  cid(i: number): number;
}

/** A daemon serving `count` VMs (CIDs 3, 4, ...) with `extraArgs` (e.g. `--workers 2`). */
export async function multiVmDaemon(
  count: number,
  extraArgs: string[] = [],
  opts: { env?: Record<string, string>; groups?: (i: number) => string } = {},
): Promise<MultiVmDaemon> {
  const vms = Array.from(
    { length: count },
    (_, i) =>
      `--vm guest-cid=${3 + i},socket={socket}${suffix(i)},uds-path={uds}${suffix(i)},groups=${
        opts.groups?.(i) ?? "default"
      }`,
  ).join(" ");
  const backend = await spawnBackend({
    command: `${Deno.execPath()} run -A ${repoRoot()}/main.ts ${vms} ${extraArgs.join(" ")}`,
    env: opts.env,
  });
  const d: MultiVmDaemon = {
    backend,
    socket: (i) => `${backend.socketPath}${suffix(i)}`,
    uds: (i) => `${backend.udsPath}${suffix(i)}`,
    cid: (i) => 3 + i,
  };
  // spawnBackend waited for VM 0's socket only.
  for (let i = 1; i < count; i++) await waitForSocket(d.socket(i));
  return d;
}

/** VM 0 uses the paths spawnBackend waits for; VM i > 0 adds `.i`. */
function suffix(i: number): string {
  return i === 0 ? "" : `.${i}`;
}

export async function waitForSocket(path: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      if (Deno.lstatSync(path).isSocket) return;
    } catch { /* not yet */ }
    assert.ok(Date.now() < deadline, `${path} did not appear`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export interface Guest {
  guest: VsockGuest;
  memory: GuestRam;
  close(): Promise<void>;
}

/**
 * A front end (QEMU-like unless `frontEnd.profile` says otherwise) + guest driver (64 KiB rx
 * buffers unless `guest` says otherwise) on `socket`; retries while the socket comes back.
 */
export async function bootGuest(
  socket: string,
  opts: { timeoutMs?: number; frontEnd?: FrontEndOptions; guest?: VsockGuestOptions } = {},
): Promise<Guest> {
  const memory = new GuestRam({});
  const fe = await VhostUserFrontEnd.connect(socket, {
    profile: "qemu",
    ...opts.frontEnd,
    memory,
    connectTimeoutMs: opts.timeoutMs ?? 10_000,
  });
  const guest = await VsockGuest.boot(fe, { rxBufSize: 65536, ...opts.guest });
  return {
    guest,
    memory,
    async close() {
      await guest.close();
      fe.close();
      memory.close();
    },
  };
}

/** Moves `bytes` host -> guest on a fresh connection, checks them; returns MB/s. */
export async function transfer(g: Guest, uds: string, port: number, bytes: number) {
  const data = pattern(bytes, port);
  const listener = g.guest.listen(port);
  const [host, conn] = await Promise.all([hostConnect(uds, port), listener.accept()]);
  const t0 = performance.now();
  const writing = writeAll(host.conn, data);
  const got = await conn.readExactly(bytes, { timeoutMs: 60_000 });
  const ms = performance.now() - t0;
  await writing;
  assert.ok(got.length === data.length && got.every((b, i) => b === data[i]), "bytes intact");
  host.conn.close();
  await conn.close();
  listener.close();
  return bytes / 1e6 / (ms / 1000);
}

/** `rounds` 1-byte round trips host -> guest -> host; returns the p99 in ms. */
export async function pingPongP99(g: Guest, uds: string, port: number, rounds = 200) {
  const listener = g.guest.listen(port);
  const [host, conn] = await Promise.all([hostConnect(uds, port), listener.accept()]);
  const one = new Uint8Array([42]);
  const times: number[] = [];
  for (let i = 0; i < rounds; i++) {
    const t0 = performance.now();
    await host.conn.write(one);
    await conn.readExactly(1);
    await conn.write(one);
    await readExactly(host.conn, 1);
    times.push(performance.now() - t0);
  }
  host.conn.close();
  await conn.close();
  listener.close();
  times.sort((a, b) => a - b);
  return times[Math.floor(rounds * 0.99)];
}

/** Pid of the worker process `worker` of the daemon whose supervisor is `supervisorPid`. */
export function workerPid(supervisorPid: number, worker: number): number {
  const children = Deno.readTextFileSync(`/proc/${supervisorPid}/task/${supervisorPid}/children`)
    .trim().split(/\s+/).filter((s) => s !== "").map(Number);
  for (const pid of children) {
    try {
      const env = Deno.readTextFileSync(`/proc/${pid}/environ`).split("\0");
      const entry = env.find((e) => e.startsWith(`${WORKER_ENV}=`));
      if (entry !== undefined && entry.split(" ")[1] === String(worker)) return pid;
    } catch { /* exited */ }
  }
  return -1;
}

/** Waits until `predicate()` holds (polling), failing with `what` after `timeoutMs`. */
export async function waitFor(predicate: () => boolean, what: string, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    assert.ok(Date.now() < deadline, `timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
