/**
 * The project's demo (`deno task demo`): the vhost-user-vsock back end at work, step by step.
 *
 * Default (emulated guest, no VM needed): starts the back end (`main.ts`) as a child process,
 * connects the testing library's QEMU-like vhost-user front end to it, boots the Linux-like
 * virtio-vsock guest driver, and then
 *   - runs an echo service in the guest on vsock port 1234; a host app reaches it through the
 *     hybrid socket (`CONNECT 1234\n` -> `OK <host-port>\n`) and gets its bytes back;
 *   - runs a host echo service on `<uds>_5000`; the guest connects to CID 2 port 5000;
 *   - measures throughput (64 MiB host -> guest -> host echo, 64 MiB guest -> host);
 *   - stops the back end with SIGTERM and checks it exits cleanly.
 *
 * `--qemu`: the same story with a real Linux guest under QEMU (TCG), when
 * `qemu-system-x86_64`, a Debian cloud kernel, busybox-static and socat are installed.
 *
 * Exit status 0 on success; on failure a one-paragraph explanation and status 1.
 */
import { createHash } from "node:crypto";
import {
  type BackendExit,
  type BackendProcess,
  hostConnect,
  type HostConnection,
  readExactly,
  spawnBackend,
  startVm,
  writeAll,
} from "../lib/testing/mod.ts";
import { VhostUserProtocolFeature } from "../lib/vhost_user/protocol.ts";
import { GuestVM, missingPrerequisites } from "../tests/e2e/guest_vm.ts";

const GUEST_PORT = 1234;
const HOST_PORT = 5000;
const HOST_SINK_PORT = 5001;
const MiB = 1024 * 1024;
/** The whole demo must end well within a minute. */
const DEMO_DEADLINE_MS = 50_000;

let step = 0;
function say(text: string): void {
  console.log(`[${++step}] ${text}`);
}
function detail(text: string): void {
  console.log(`    ${text}`);
}

/** Virtio feature bits a vsock front end may negotiate, by name. */
const VIRTIO_FEATURE_NAMES: Record<number, string> = {
  0: "VSOCK_F_STREAM",
  1: "VSOCK_F_SEQPACKET",
  24: "NOTIFY_ON_EMPTY",
  26: "LOG_ALL",
  28: "RING_INDIRECT_DESC",
  29: "RING_EVENT_IDX",
  30: "PROTOCOL_FEATURES",
  32: "VERSION_1",
};

function featureNames(bits: bigint, names: Record<number, string>): string {
  const out: string[] = [];
  for (let b = 0; b < 64; b++) {
    if ((bits >> BigInt(b)) & 1n) out.push(names[b] ?? `bit ${b}`);
  }
  return out.join(", ");
}

const PROTOCOL_FEATURE_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(VhostUserProtocolFeature).map(([name, bit]) => [bit, name]),
);

/** `n` random bytes. */
function randomBytes(n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let off = 0; off < n; off += 65536) {
    crypto.getRandomValues(out.subarray(off, Math.min(n, off + 65536)));
  }
  return out;
}

function sha256(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

function mibPerSecond(bytes: number, ms: number): string {
  return `${(bytes / MiB / (ms / 1000)).toFixed(1)} MiB/s`;
}

/** Reads `conn` to EOF, hashing; returns byte count and digest. */
/**
 * Sends `size` random bytes on `conn`, half-closes, reads the echo to EOF and checks it
 * (length and sha256). Returns the milliseconds the round trip took.
 */
async function timedEcho(conn: Deno.UnixConn, size: number, what: string): Promise<number> {
  const data = randomBytes(size);
  const want = sha256(data);
  const t0 = performance.now();
  const [, echoed] = await Promise.all([
    (async () => {
      await writeAll(conn, data);
      await conn.closeWrite();
    })(),
    drainAndHash(conn),
  ]);
  const ms = performance.now() - t0;
  if (echoed.bytes !== size || echoed.sha256 !== want) {
    throw new Error(`${what}: got ${echoed.bytes} bytes, sha256 ${echoed.sha256}`);
  }
  return ms;
}

async function drainAndHash(conn: Deno.Conn): Promise<{ bytes: number; sha256: string }> {
  const hash = createHash("sha256");
  const buf = new Uint8Array(256 * 1024);
  let bytes = 0;
  for (;;) {
    const n = await conn.read(buf);
    if (n === null) break;
    hash.update(buf.subarray(0, n));
    bytes += n;
  }
  return { bytes, sha256: hash.digest("hex") };
}

/** A host echo service on `path`: echoes every connection until EOF, then closes. */
function hostEchoService(path: string): { close(): void } {
  const listener = Deno.listen({ transport: "unix", path });
  (async () => {
    for await (const conn of listener) {
      (async () => {
        const buf = new Uint8Array(256 * 1024);
        try {
          for (;;) {
            const n = await conn.read(buf);
            if (n === null) break;
            await writeAll(conn, buf.subarray(0, n));
          }
          await conn.closeWrite();
        } catch { /* the peer went away */ }
        conn.close();
      })();
    }
  })().catch(() => {/* listener closed */});
  return {
    close() {
      listener.close();
      Deno.removeSync(path);
    },
  };
}

/** Throws unless the back end exited 0 on its own after SIGTERM. */
function checkCleanExit(exit: BackendExit | null): void {
  if (exit === null || exit.code !== 0 || exit.killed) {
    throw new Error(
      `the back end did not stop cleanly (exit ${exit?.code})\n${exit?.stderr.slice(-2000)}`,
    );
  }
}

// ---------------------------------------------------------------------------------------
// Emulated guest
// ---------------------------------------------------------------------------------------

async function emulatedDemo(): Promise<void> {
  console.log("vhost-user-vsock demo: the back end serving an emulated VMM and guest");
  console.log("(run `deno task demo --qemu` for a real Linux guest under QEMU)\n");
  const vm = await startVm({ profile: "qemu", cid: 3 });
  let echoService: { close(): void } | null = null;
  let exit: BackendExit;
  let stopping = false;
  try {
    say(`back end started (pid ${vm.backend.pid})`);
    detail(`vhost-user socket: ${vm.socketPath}`);
    detail(`hybrid vsock socket for host apps: ${vm.udsPath}`);

    const fe = vm.frontEnd;
    say(`front end (a QEMU 7.2-like VMM) connected and negotiated with the back end`);
    detail(`virtio features acked: ${featureNames(fe.ackedFeatures ?? 0n, VIRTIO_FEATURE_NAMES)}`);
    detail(
      `vhost-user protocol features acked: ${
        featureNames(fe.ackedProtocolFeatures, PROTOCOL_FEATURE_NAMES)
      }`,
    );
    detail(
      `guest RAM: ${
        vm.memory.regions.map((r) => `${r.size / MiB} MiB at 0x${r.gpa.toString(16)}`).join(", ")
      }, a memfd shared with the back end (ADD_MEM_REG)`,
    );
    detail(
      `the back end drives ${fe.backendQueueCount} queues (rx, tx); the VMM keeps the event queue`,
    );

    say(
      `guest driver up: CID ${vm.guest.guestCid}, read from the device config space (GET_CONFIG)`,
    );
    detail(`queue size ${fe.queueSize}, ${vm.guest.rxPosted} rx buffers of 4 KiB posted`);

    // A guest echo service.
    const listener = vm.guest.listen(GUEST_PORT);
    const guestEcho = (async () => {
      for (;;) {
        const conn = await listener.accept({ timeoutMs: DEMO_DEADLINE_MS }).catch(() => null);
        if (conn === null) return;
        (async () => {
          for (;;) {
            const chunk = await conn.read(Infinity, { timeoutMs: DEMO_DEADLINE_MS });
            if (chunk === null) break;
            await conn.write(chunk, { timeoutMs: DEMO_DEADLINE_MS });
          }
          await conn.close();
        })().catch((e) => {
          if (!stopping) console.error(`guest echo: ${e}`);
        });
      }
    })();
    say(`guest listening on vsock port ${GUEST_PORT} (an echo service)`);

    const host = await vm.hostConnect(GUEST_PORT);
    say(`host app sent "CONNECT ${GUEST_PORT}" to ${vm.udsPath}, got "OK ${host.hostPort}"`);
    const hello = new TextEncoder().encode("hello from the host, through the guest and back\n");
    await writeAll(host.conn, hello);
    const back = await readExactly(host.conn, hello.length);
    if (sha256(back) !== sha256(hello)) throw new Error("the guest echo came back different");
    say(
      `echoed ${hello.length} bytes through the guest, intact: ${
        JSON.stringify(new TextDecoder().decode(back))
      }`,
    );

    // Guest -> host.
    echoService = hostEchoService(`${vm.udsPath}_${HOST_PORT}`);
    const gconn = await vm.guest.connect(HOST_PORT);
    say(
      `guest connected to host port ${HOST_PORT}: the back end connected it to ` +
        `${vm.udsPath}_${HOST_PORT} (a host echo service)`,
    );
    const ping = randomBytes(100_000);
    const [, pong] = await Promise.all([gconn.write(ping), gconn.readExactly(ping.length)]);
    if (sha256(pong) !== sha256(ping)) throw new Error("the host echo came back different");
    await gconn.close();
    say(`guest sent ${ping.length} random bytes, the host echoed them back intact`);

    // Throughput.
    const size = 64 * MiB;
    const echoMs = await timedEcho(host.conn, size, "64 MiB echo");
    host.conn.close();
    const data = randomBytes(size); // the guest -> host leg
    const want = sha256(data);
    detail(`64 MiB host -> guest -> host echo: ${echoMs.toFixed(0)} ms, sha256 matches`);

    const sink = Deno.listen({ transport: "unix", path: `${vm.udsPath}_${HOST_SINK_PORT}` });
    const t0 = performance.now();
    const [sunk] = await Promise.all([
      sink.accept().then(async (c) => {
        const r = await drainAndHash(c);
        c.close();
        return r;
      }),
      (async () => {
        const c = await vm.guest.connect(HOST_SINK_PORT);
        await c.write(data, { timeoutMs: DEMO_DEADLINE_MS });
        await c.close();
      })(),
    ]);
    const sinkMs = performance.now() - t0;
    sink.close();
    if (sunk.bytes !== size || sunk.sha256 !== want) {
      throw new Error(`64 MiB guest -> host: got ${sunk.bytes} bytes, sha256 ${sunk.sha256}`);
    }
    detail(`64 MiB guest -> host: ${sinkMs.toFixed(0)} ms, sha256 matches`);
    say(
      `throughput: host -> guest -> host echo ${mibPerSecond(size, echoMs)} (each way at once), ` +
        `guest -> host ${mibPerSecond(size, sinkMs)}`,
    );
    detail("(the emulated guest is JavaScript in this process: a real guest is faster)");

    listener.close();
    await guestEcho;
  } finally {
    stopping = true;
    echoService?.close();
    exit = await vm.stop();
  }
  checkCleanExit(exit);
  say("shutdown: guest and front end closed, back end stopped on SIGTERM (exit status 0)");
}

// ---------------------------------------------------------------------------------------
// Real guest under QEMU
// ---------------------------------------------------------------------------------------

/** CONNECT, retried while the guest refuses (its socat is not listening yet). */
async function connectWhenListening(udsPath: string, port: number): Promise<HostConnection> {
  const deadline = Date.now() + 20_000;
  for (;;) {
    try {
      return await hostConnect(udsPath, port, { timeoutMs: 10_000 });
    } catch (e) {
      if (Date.now() >= deadline) throw e;
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

async function qemuDemo(): Promise<void> {
  const missing = missingPrerequisites();
  if (missing.length > 0) {
    throw new Error(
      `--qemu needs: ${missing.join(", ")}.\nOn Debian/Ubuntu: sudo apt-get install ` +
        "qemu-system-x86 linux-image-cloud-amd64 busybox-static socat\n" +
        "(or run `deno task demo` without --qemu for the emulated guest)",
    );
  }
  console.log("vhost-user-vsock demo: the back end serving a real Linux guest under QEMU (TCG)\n");
  let backend: BackendProcess | null = null;
  let vm: GuestVM | null = null;
  let echoService: { close(): void } | null = null;
  let exit: BackendExit | null = null;
  try {
    backend = await spawnBackend({ cid: 3 });
    say(`back end started (pid ${backend.pid}) on ${backend.socketPath}`);
    detail(`hybrid vsock socket for host apps: ${backend.udsPath}`);
    vm = await GuestVM.boot({
      vhostSocket: backend.socketPath,
      kernelArgs: "no_timer_check",
      timeoutMs: 40_000,
    });
    say(
      `QEMU booted the guest in ${vm.bootMs} ms (vhost-user-vsock-pci, QEMU owns the event queue)`,
    );
    const kernel = (await vm.runOk("uname -r")).trim();
    detail(`guest kernel ${kernel}; its CID 3 comes from the back end's config space (GET_CONFIG)`);

    await vm.spawn(`socat VSOCK-LISTEN:${GUEST_PORT},fork EXEC:cat`);
    say(`guest runs "socat VSOCK-LISTEN:${GUEST_PORT},fork EXEC:cat" (an echo service)`);
    const host = await connectWhenListening(backend.udsPath, GUEST_PORT);
    say(`host app sent "CONNECT ${GUEST_PORT}", got "OK ${host.hostPort}"`);
    const hello = randomBytes(64 * 1024);
    const [, back] = await Promise.all([
      writeAll(host.conn, hello),
      readExactly(host.conn, hello.length, { timeoutMs: 20_000 }),
    ]);
    if (sha256(back) !== sha256(hello)) throw new Error("the guest echo came back different");
    say(`echoed ${hello.length} random bytes through the guest, intact`);

    echoService = hostEchoService(`${backend.udsPath}_${HOST_PORT}`);
    const out = await vm.runOk(
      "head -c 100000 /dev/urandom > /tmp/ping && " +
        `socat -t 5 STDIO VSOCK-CONNECT:2:${HOST_PORT} </tmp/ping >/tmp/pong && ` +
        "cmp /tmp/ping /tmp/pong && echo intact",
    );
    if (out.trim() !== "intact") throw new Error(`guest -> host echo: ${out}`);
    say(
      `guest connected to CID 2 port ${HOST_PORT} -> ${backend.udsPath}_${HOST_PORT} ` +
        "(host echo service): 100000 bytes came back intact",
    );

    const size = 4 * MiB;
    const echoMs = await timedEcho(host.conn, size, "4 MiB echo");
    host.conn.close();
    await vm.runOk(`head -c ${size} /dev/urandom > /tmp/blob`);
    const sink = Deno.listen({ transport: "unix", path: `${backend.udsPath}_${HOST_SINK_PORT}` });
    const t0 = performance.now();
    const [sunk] = await Promise.all([
      sink.accept().then(async (c) => {
        const r = await drainAndHash(c);
        c.close();
        return r;
      }),
      vm.runOk(`socat -u FILE:/tmp/blob VSOCK-CONNECT:2:${HOST_SINK_PORT}`),
    ]);
    const sinkMs = performance.now() - t0;
    sink.close();
    if (sunk.bytes !== size) throw new Error(`4 MiB guest -> host: got ${sunk.bytes} bytes`);
    say(
      `throughput: host -> guest -> host echo ${mibPerSecond(size, echoMs)} (4 MiB), ` +
        `guest -> host ${mibPerSecond(size, sinkMs)} (4 MiB)`,
    );
    detail("(QEMU emulates the CPU here (TCG, no KVM): the guest, not the back end, is the limit)");
  } finally {
    echoService?.close();
    if (vm !== null) await vm.shutdown();
    if (backend !== null) exit = await backend.stop();
  }
  checkCleanExit(exit);
  say("shutdown: guest powered off, back end stopped on SIGTERM (exit status 0)");
}

// ---------------------------------------------------------------------------------------

if (import.meta.main) {
  const qemu = Deno.args.includes("--qemu");
  const unknown = Deno.args.filter((a) => a !== "--qemu");
  if (unknown.length > 0) {
    console.error(`demo: unknown argument ${unknown[0]} (usage: deno task demo [--qemu])`);
    Deno.exit(2);
  }
  const started = performance.now();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`the demo did not finish within ${DEMO_DEADLINE_MS / 1000} s`)),
      qemu ? DEMO_DEADLINE_MS * 2 : DEMO_DEADLINE_MS,
    );
  });
  try {
    await Promise.race([qemu ? qemuDemo() : emulatedDemo(), deadline]);
    clearTimeout(timer);
    console.log(`\ndemo finished in ${((performance.now() - started) / 1000).toFixed(1)} s`);
    Deno.exit(0);
  } catch (e) {
    clearTimeout(timer);
    console.error(`\ndemo failed: ${e instanceof Error ? e.message : e}`);
    Deno.exit(1);
  }
}
