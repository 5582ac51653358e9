/**
 * Helpers shared by the integration tests that run a whole VM (`startVm`: the back end as a
 * child process, a scripted front end and guest driver): test data and its comparison, a VM
 * that is always stopped (failures quote the back end's stderr), connections both ways, waits
 * on the back end (a log line, with or without pumping the guest; a host socket it closes), and
 * the traffic scenarios run under several ring layouts and features (bulk streams both ways,
 * many concurrent connections).
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { eventFdRead } from "../../ffi/mod.ts";
import {
  type BackendProcess,
  type GuestConn,
  pattern,
  readAll,
  readExactly,
  spawnBackend,
  startVm,
  type StartVmOptions,
  VhostUserFrontEnd,
  VIRTIO_VSOCK_OP_RW,
  type VmHandle,
  writeAll,
} from "../../lib/testing/mod.ts";

const KiB = 1024;
/** The dirty log's page (VHOST_LOG_PAGE). */
export const PAGE = 4096;
/** Per-operation bound of the traffic scenarios below. */
const TRAFFIC_TIMEOUT_MS = 30_000;

/** `n` random bytes (getRandomValues fills at most 64 KiB per call). */
export function randomBytes(n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let off = 0; off < n; off += 65536) {
    crypto.getRandomValues(out.subarray(off, Math.min(n, off + 65536)));
  }
  return out;
}

/** Deterministic pseudo-random bytes (so both ends can compute the expected data). */
export function randomBytesSeeded(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = (seed * 2654435761 + 12345) >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** Byte-for-byte equality with a useful message (deepEqual on MiBs is slow and unreadable). */
export function assertSameBytes(got: Uint8Array, want: Uint8Array, what: string): void {
  if (Buffer.compare(Buffer.from(got.buffer, got.byteOffset, got.length), want) === 0) return;
  let i = 0;
  while (i < got.length && i < want.length && got[i] === want[i]) i++;
  assert.fail(
    `${what}: ${got.length} bytes received, ${want.length} expected; first difference at ` +
      `offset ${i}`,
  );
}

/**
 * Runs `fn` with a VM, always stopping it; appends the back end's stderr to failures. Fails if
 * the guest saw anomalies, if the back end does not exit 0 on SIGTERM, or if it logged an error
 * (unless `errorsLogged`: the test makes it log some).
 */
export async function withVm(
  opts: StartVmOptions,
  fn: (vm: VmHandle) => Promise<void>,
  { errorsLogged = false }: { errorsLogged?: boolean } = {},
): Promise<void> {
  const vm = await startVm(opts);
  try {
    await fn(vm);
    assert.deepEqual(vm.guest.anomalies, [], "the guest saw back-end misbehaviour");
  } catch (e) {
    const exit = await vm.stop();
    throw new Error(
      `${e instanceof Error ? e.stack : e}\n--- back end stderr (tail) ---\n${
        exit.stderr.slice(-6000)
      }`,
    );
  }
  const exit = await vm.stop();
  assert.equal(exit.code, 0, `back end exit status after SIGTERM\n${exit.stderr.slice(-3000)}`);
  if (!errorsLogged) {
    const errors = exit.stderr.split("\n").filter((l) => / ERROR /.test(l));
    assert.deepEqual(errors, [], "the back end logged no error");
  }
}

/** Back-end log lines matching `re`. */
export function logLines(vm: VmHandle, re: RegExp): string[] {
  return vm.backend.stderr().split("\n").filter((l) => re.test(l));
}

/** Waits (pumping the guest) until the back end logged a line matching `re`. */
export async function waitForLog(
  vm: VmHandle,
  re: RegExp,
  count = 1,
  timeoutMs = 5000,
): Promise<void> {
  await vm.guest.waitFor(
    () => logLines(vm, re).length >= count,
    timeoutMs,
    `${count} back-end log line(s) matching ${re}`,
  );
}

/** Like `waitForLog` without pumping the guest (for when the vhost-user connection is gone). */
export async function waitForLogOnly(vm: VmHandle, re: RegExp, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (logLines(vm, re).length === 0) {
    if (Date.now() >= deadline) {
      throw new Error(`no back-end log line matching ${re} within ${timeoutMs} ms`);
    }
    await sleep(20);
  }
}

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * Waits until the back end closes `conn` (EOF or ECONNRESET), discarding data; returns the
 * milliseconds since `start` (default: now). Rejects after `timeoutMs` (closing `conn`).
 */
export async function expectClosedByBackend(
  conn: Deno.Conn,
  timeoutMs: number,
  what: string,
  start = performance.now(),
): Promise<number> {
  const op = (async () => {
    const buf = new Uint8Array(4096);
    try {
      while ((await conn.read(buf)) !== null) { /* discard */ }
    } catch (e) {
      if (!(e instanceof Deno.errors.ConnectionReset)) throw e;
    }
    return performance.now() - start;
  })();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      try {
        conn.close();
      } catch { /* closed */ }
      reject(new Error(`${what}: the back end did not close the socket within ${timeoutMs} ms`));
    }, timeoutMs);
  });
  try {
    return await Promise.race([op, timeout]);
  } finally {
    clearTimeout(timer);
    op.catch(() => {});
  }
}

/**
 * A fresh back end (guest CID `cid`) and a front end like the VM's (same profile and options,
 * create sequence only) on the guest's RAM: where a snapshot is restored.
 */
export async function freshBackEnd(
  vm: VmHandle,
  cid: number,
): Promise<{ backend: BackendProcess; fe: VhostUserFrontEnd }> {
  const backend = await spawnBackend({ cid });
  try {
    const fe = await VhostUserFrontEnd.connect(backend.socketPath, {
      ...vm.frontEnd.options,
      memory: vm.memory,
    });
    return { backend, fe };
  } catch (e) {
    await backend.stop();
    throw e;
  }
}

/**
 * Empties the kick eventfds before a ring restart, as a VMM that took its notifiers back while
 * the device was stopped: an eventfd the back end never reads back still holds old kicks, and
 * SET_VRING_KICK with it would look like a fresh kick. A restart after this carries none, so
 * only processing on start ("kick after start") can resume queued work.
 */
export function clearKicks(fe: VhostUserFrontEnd): void {
  for (const fd of fe.kickFds) eventFdRead(fd);
}

/** Host -> guest connection + guest accept on `port` (the guest listener must exist). */
export async function hostToGuest(
  vm: VmHandle,
  port: number,
  initialData?: Uint8Array,
): Promise<{ host: Deno.UnixConn; hostPort: number; guest: GuestConn }> {
  const listener = vm.guest.listen(port);
  try {
    const [h, guest] = await Promise.all([
      vm.hostConnect(port, { initialData }),
      listener.accept(),
    ]);
    return { host: h.conn, hostPort: h.hostPort, guest };
  } finally {
    listener.close();
  }
}

/** Guest -> host connection to a host listener on `<uds>_<port>`. */
export async function guestToHost(
  vm: VmHandle,
  port: number,
): Promise<{ host: Deno.UnixConn; guest: GuestConn }> {
  const hl = vm.hostListen(port);
  try {
    const [guest, host] = await Promise.all([vm.guest.connect(port), hl.accept()]);
    return { host, guest };
  } finally {
    hl.close();
  }
}

/** Echo round trip guest <-> host on an open pair, proving the device still works. */
export async function roundTrip(guest: GuestConn, host: Deno.Conn, size: number, what: string) {
  const a = randomBytes(size);
  const [, gotByGuest] = await Promise.all([writeAll(host, a), guest.readExactly(size)]);
  assertSameBytes(gotByGuest, a, `${what}: host -> guest`);
  const b = randomBytes(size);
  const [, gotByHost] = await Promise.all([guest.write(b), readExactly(host, size)]);
  assertSameBytes(gotByHost, b, `${what}: guest -> host`);
}

/** A fresh host->guest and guest->host round trip on new connections (the device works). */
export async function deviceStillWorks(vm: VmHandle, port: number, what: string): Promise<void> {
  const a = await hostToGuest(vm, port);
  await roundTrip(a.guest, a.host, 100 * KiB, `${what} (host-initiated)`);
  a.host.close();
  await a.guest.close();
  const b = await guestToHost(vm, port + 1);
  await roundTrip(b.guest, b.host, 100 * KiB, `${what} (guest-initiated)`);
  b.host.close();
  await b.guest.close();
}

/**
 * A host-initiated connection on `port` carrying `size` random bytes host -> guest (the first
 * 3000 in the same write as the CONNECT line), then `size` back; the guest sees EOF once the
 * host app closes.
 */
export async function bulkFromHost(vm: VmHandle, port: number, size: number): Promise<void> {
  const data = randomBytes(size);
  const { host, guest } = await hostToGuest(vm, port, data.subarray(0, 3000));
  const [, got] = await Promise.all([
    writeAll(host, data.subarray(3000)),
    guest.readExactly(size, { timeoutMs: TRAFFIC_TIMEOUT_MS }),
  ]);
  assertSameBytes(got, data, "host -> guest");
  const back = randomBytes(size);
  const [, gotBack] = await Promise.all([
    guest.write(back, { timeoutMs: TRAFFIC_TIMEOUT_MS }),
    readExactly(host, size, { timeoutMs: TRAFFIC_TIMEOUT_MS }),
  ]);
  assertSameBytes(gotBack, back, "guest -> host");
  host.close();
  assert.equal(await guest.read(), null, "EOF after the host closed");
  await guest.close();
  assert.equal(guest.creditViolations, 0);
}

/**
 * A guest-initiated connection to a host listener on `port` carrying `size` random bytes
 * guest -> host, then `size` back; the host app sees EOF once the guest closes.
 */
export async function bulkFromGuest(vm: VmHandle, port: number, size: number): Promise<void> {
  const { host, guest } = await guestToHost(vm, port);
  const data = randomBytes(size);
  const [, got] = await Promise.all([
    guest.write(data, { timeoutMs: TRAFFIC_TIMEOUT_MS }),
    readExactly(host, size, { timeoutMs: TRAFFIC_TIMEOUT_MS }),
  ]);
  assertSameBytes(got, data, "guest -> host");
  const back = randomBytes(size);
  const [, gotBack] = await Promise.all([
    writeAll(host, back),
    guest.readExactly(size, { timeoutMs: TRAFFIC_TIMEOUT_MS }),
  ]);
  assertSameBytes(gotBack, back, "host -> guest");
  await guest.close();
  assert.equal(guest.closeReason, "closed", "the back end confirmed the close with RST");
  assert.equal((await readAll(host)).length, 0, "host reads EOF after the guest closed");
  host.close();
}

/**
 * `perSide` host-initiated connections to a guest listener on `port` and `perSide`
 * guest-initiated ones to a host listener on `port + 1`, all at once, each carrying `size`
 * distinct bytes each way (the first 4 bytes name the connection, so the server knows which
 * answer to send); every connection ends cleanly.
 */
export async function concurrentConnections(
  vm: VmHandle,
  port: number,
  perSide: number,
  size: number,
): Promise<void> {
  const N = perSide;
  const toGuest = (i: number) => randomBytesSeeded(size, i);
  const fromGuest = (i: number) => randomBytesSeeded(size, 1000 + i);
  const toHost = (i: number) => randomBytesSeeded(size, 2000 + i);
  const fromHost = (i: number) => randomBytesSeeded(size, 3000 + i);
  const opts = { timeoutMs: TRAFFIC_TIMEOUT_MS };

  // Host-initiated: host sends toGuest(i), guest answers fromGuest(i).
  const listener = vm.guest.listen(port);
  const hostSide = Array.from({ length: N }, async (_, i) => {
    const h = await vm.hostConnect(port, { timeoutMs: 20000 });
    const payload = toGuest(i);
    new DataView(payload.buffer).setUint32(0, i);
    await writeAll(h.conn, payload);
    const got = await readExactly(h.conn, size, opts);
    assertSameBytes(got, fromGuest(i), `host-initiated #${i}: answer`);
    h.conn.close();
  });
  const serveGuest = async (c: GuestConn) => {
    const got = await c.readExactly(size, opts);
    const i = new DataView(got.buffer).getUint32(0);
    const want = toGuest(i);
    new DataView(want.buffer).setUint32(0, i);
    assertSameBytes(got, want, `host-initiated #${i}: request`);
    await c.write(fromGuest(i), opts);
    assert.equal(await c.read(Infinity, opts), null);
    await c.close();
  };
  // One accept at a time, like a server's accept loop; each connection served concurrently.
  const guestServers: Promise<void>[] = [];
  const guestAcceptLoop = (async () => {
    for (let n = 0; n < N; n++) {
      const served = serveGuest(await listener.accept(opts));
      served.catch(() => {}); // awaited below; must not go unhandled meanwhile
      guestServers.push(served);
    }
  })();

  // Guest-initiated: guest sends toHost(i), host answers fromHost(i).
  const hl = vm.hostListen(port + 1);
  const guestClients = Array.from({ length: N }, async (_, i) => {
    const c = await vm.guest.connect(port + 1);
    const payload = toHost(i);
    new DataView(payload.buffer).setUint32(0, i);
    await c.write(payload, opts);
    const got = await c.readExactly(size, opts);
    assertSameBytes(got, fromHost(i), `guest-initiated #${i}: answer`);
    await c.close();
  });
  const serveHost = async (h: Deno.UnixConn) => {
    const got = await readExactly(h, size, opts);
    const i = new DataView(got.buffer).getUint32(0);
    const want = toHost(i);
    new DataView(want.buffer).setUint32(0, i);
    assertSameBytes(got, want, `guest-initiated #${i}: request`);
    await writeAll(h, fromHost(i));
    assert.equal((await readAll(h, opts)).length, 0);
    h.close();
  };
  // Deno allows one pending accept per listener: accept in a loop, serve concurrently.
  const hostServers: Promise<void>[] = [];
  const acceptLoop = (async () => {
    for (let n = 0; n < N; n++) {
      const served = serveHost(await hl.accept(opts));
      served.catch(() => {}); // awaited below; must not go unhandled meanwhile
      hostServers.push(served);
    }
  })();
  await Promise.all([...hostSide, ...guestClients, guestAcceptLoop, acceptLoop]);
  await Promise.all([...guestServers, ...hostServers]);
  listener.close();
  hl.close();
  assert.equal(vm.guest.connections.length, 0, "every connection ended");
}

/** Guest-physical page numbers covering [gpa, gpa+len). */
export function pagesOf(gpa: number, len: number): number[] {
  const out: number[] = [];
  for (let p = Math.floor(gpa / PAGE); p * PAGE < gpa + len; p++) out.push(p);
  return out;
}

/**
 * The traffic of a dirty-log check, on an established pair: guest -> host, a payload in two
 * pages of its own (which the device only reads) through a raw tx chain, until the chain came
 * back; host -> guest, 20 000 bytes into the guest's rx buffers. Returns where the payload and
 * its header are.
 */
export async function dirtyLogTraffic(
  vm: VmHandle,
  conn: GuestConn,
  host: Deno.Conn,
): Promise<{ payloadGpa: number; payloadLen: number; headerGpa: number }> {
  const payloadGpa = vm.faults.allocGuest(2 * PAGE, PAGE);
  const headerGpa = vm.faults.allocGuest(64, 64);
  const payload = pattern(2 * PAGE - 100, 111);
  const raw = vm.faults.sendPacketAt(
    {
      srcPort: conn.localPort,
      dstPort: conn.peerPort,
      op: VIRTIO_VSOCK_OP_RW,
      bufAlloc: conn.credit.bufAlloc,
    },
    payload,
    { headerGpa, payloadGpa },
  );
  assert.deepEqual(await readExactly(host, payload.length), payload);
  await vm.guest.waitFor(() => vm.guest.rawUsed.some((u) => u.head === raw), 5000, "raw tx");
  const data = pattern(20_000, 113);
  await writeAll(host, data);
  assert.deepEqual(await conn.readExactly(data.length), data);
  await vm.guest.idle(200);
  return { payloadGpa, payloadLen: payload.length, headerGpa };
}
