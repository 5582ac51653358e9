/**
 * End-to-end: the daemon (main.ts, as a child process) serving a real Linux guest under QEMU
 * (TCG). The guest's own `vmw_vsock_virtio_transport` driver and socat talk AF_VSOCK; the
 * host side is the hybrid-vsock protocol of Firecracker and vhost-device-vsock:
 *
 * - host -> guest: connect to `<uds>`, write `CONNECT <port>\n`, read `OK <hostport>\n` once
 *   the guest accepts (the socket is closed when the guest refuses or the connect times out);
 * - guest -> host: a guest connect to CID 2 port P reaches a listener on `<uds>_P`, and is
 *   refused (RST) when nothing listens there.
 *
 * One guest boot is shared by the data-path scenarios (boots cost seconds under TCG):
 * guest->host 8 MiB, host->guest echo of 4 MiB, 16 concurrent guest->host streams (half of
 * them into host apps that read slowly, so the backend must buffer and hold credit back until
 * the guest closes), a refused guest connect, a driver unload/reload (rmmod + modprobe)
 * between two transfers, and a driver reset (sysfs unbind + bind: rmmod is refused while a
 * socket is open) under a live host connection. The "kick after start" scenario (a host
 * CONNECT queued while the guest is still booting is answered the moment the driver starts the
 * rings) needs its own boot: the guest starts its listener from a boot hook, before the vsock
 * driver probes the device, and the backend runs with a 60 s connect timeout so that only the
 * kick-after-start path, not a retry after a timeout, can answer within a second.
 *
 * Every wait on the guest has a deadline; a timeout quotes the tail of the guest console and
 * of the backend log. Each scenario prints its measured time (`e2e: <what>: <n> ms`).
 * Set E2E_LOG_DIR to keep the guest console and the backend log of every run.
 */
import assert from "node:assert/strict";
import { VSOCK_HOST_CID as VMADDR_CID_HOST } from "../../lib/vsock/constants.ts";
import { ensureGuestImage, GuestVM, skipE2e } from "./guest_vm.ts";
import { BackendProcess } from "./backend.ts";
import { concat } from "../../lib/testing/bytes.ts";
import {
  BOOT_TIMEOUT_MS,
  type Diagnostics,
  diagnostics,
  GUEST_CMD_TIMEOUT_MS,
  GUEST_KERNEL_ARGS,
  guestOk,
  type GuestProcess,
  guestRun,
  guestSpawn,
  report,
  sleep,
  tail,
  TRANSFER_TIMEOUT_MS,
  within,
} from "./e2e_util.ts";
import {
  acceptAndRead,
  expectSocketFds,
  hostListen,
  hybridConnect,
  hybridConnectWhenListening,
  parseSha256sum,
  readExactly,
  socketFdCount,
  waitClosed,
  writeAll,
} from "./host_side.ts";
import { echoThroughGuest, guestToHostFile } from "./transfers.ts";

const ignore = skipE2e("vsock tests");

const GUEST_CID = 3;
const MiB = 1024 * 1024;
const KiB = 1024;
const enc = new TextEncoder();
const dec = new TextDecoder();

/** Kick after start: the queued CONNECT must be answered this soon after the guest is ready. */
const EARLY_CONNECT_MAX_MS = 1_000;
/** A refused guest connect must fail faster than this (no connect timeout involved). */
const REFUSED_MAX_MS = 2_000;
/** After a driver reset, the backend must close the host app's socket within this long. */
const RESET_CLOSE_MAX_MS = 5_000;

const TRANSPORT_DRIVER_DIR = "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport";

/**
 * Unbinds the vsock transport from its virtio device and binds it again: the driver's remove
 * (device reset) and probe, as in a module reload. Unlike `rmmod`, this works while AF_VSOCK
 * sockets are open (each open socket pins the module: rmmod fails with EAGAIN).
 */
const REBIND_DRIVER = `cd ${TRANSPORT_DRIVER_DIR} && dev=$(ls -d virtio*) && ` +
  `echo "$dev" > unbind && echo "$dev" > bind`;

// ---- kick after start: a boot hook that listens before the vsock driver probes --------------

const EARLY_PORT = 7000;
const EARLY_LISTENING_MARKER = "E2E-EARLY-LISTENING";
const EARLY_HOOK_PATH = "/e2e-early-init";

/**
 * Runs as the guest's first process (`rdinit=`): loads the vsock core (AF_VSOCK without a
 * transport), starts a one-shot echo listener on EARLY_PORT, prints a marker once socat
 * listens, and hands over to the harness's /init, which loads the virtio transport (the
 * rings start then) and prints the ready marker. The kernel passes init no PATH.
 */
const EARLY_HOOK = `#!/bin/sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t devtmpfs devtmpfs /dev
$bb modprobe vsock || echo E2E-EARLY-MODPROBE-FAILED
/usr/bin/socat -d -d VSOCK-LISTEN:${EARLY_PORT} 'EXEC:/bin/busybox cat' </dev/null >/tmp/early.log 2>&1 &
i=0
while ! $bb grep -q listening /tmp/early.log && [ $i -lt 500 ]; do $bb usleep 10000; i=$((i+1)); done
echo "${EARLY_LISTENING_MARKER} $($bb cut -d' ' -f1 /proc/uptime)"
exec /init
`;

/** newc ("070701") cpio archive of regular files, with the trailer. */
function cpioNewc(
  files: { name: string; mode: number; data: Uint8Array }[],
): Uint8Array<ArrayBuffer> {
  const chunks: Uint8Array[] = [];
  let size = 0;
  const pad4 = (b: Uint8Array) => {
    chunks.push(b);
    size += b.length;
    if (size % 4) {
      chunks.push(new Uint8Array(4 - (size % 4)));
      size += 4 - (size % 4);
    }
  };
  const entry = (ino: number, name: string, mode: number, data: Uint8Array) => {
    const nameBytes = enc.encode(`${name}\0`);
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    const fields = [ino, mode, 0, 0, 1, 0, data.length, 0, 0, 0, 0, nameBytes.length, 0];
    const header = `070701${fields.map((f) => f.toString(16).padStart(8, "0")).join("")}`;
    pad4(new Uint8Array([...enc.encode(header), ...nameBytes]));
    if (data.length > 0) pad4(data);
  };
  files.forEach((f, i) => entry(0x7e2e0001 + i, f.name, f.mode, f.data));
  entry(0, "TRAILER!!!", 0, new Uint8Array(0));
  return concat(chunks);
}

/**
 * The harness initramfs with the early hook appended as a second (gzip) archive: the kernel
 * unpacks concatenated archives in order, so the hook is added without touching the image.
 */
async function initrdWithEarlyHook(dir: string): Promise<{ kernel: string; initrd: string }> {
  const image = await ensureGuestImage();
  const overlay = cpioNewc([{
    name: EARLY_HOOK_PATH.slice(1),
    mode: 0o100755,
    data: enc.encode(EARLY_HOOK),
  }]);
  const gz = new Uint8Array(
    await new Response(new Blob([overlay]).stream().pipeThrough(new CompressionStream("gzip")))
      .arrayBuffer(),
  );
  const base = await Deno.readFile(image.initrd);
  const initrd = `${dir}/initramfs-early.cpio.gz`;
  const combined = new Uint8Array(base.length + gz.length);
  combined.set(base);
  combined.set(gz, base.length);
  await Deno.writeFile(initrd, combined);
  return { kernel: image.kernel, initrd };
}

/** Polls a growing file for a line starting with `marker`; resolves with performance.now(). */
async function watchFor(path: string, marker: string, stop: { done: boolean }): Promise<number> {
  const re = new RegExp(`(^|\\n)${marker}\\b`);
  while (!stop.done) {
    const text = await Deno.readTextFile(path).catch(() => "");
    if (re.test(text.replaceAll("\r", ""))) return performance.now();
    await sleep(5);
  }
  return NaN;
}

/**
 * Milliseconds between the first backend log line matching `from` and the first later one
 * matching `to` (log lines start with an ISO time); null when either is missing. For reports
 * only: nothing asserts on the log format.
 */
function backendLogGap(log: string, from: RegExp, to: RegExp): number | null {
  let start: number | null = null;
  for (const line of log.split("\n")) {
    const time = Date.parse(line.split(" ", 1)[0]);
    if (Number.isNaN(time)) continue;
    if (start === null) {
      if (from.test(line)) start = time;
    } else if (to.test(line)) {
      return time - start;
    }
  }
  return null;
}

// ---- the tests -----------------------------------------------------------------------------

Deno.test({
  name: "e2e: real guest through the backend: streams, echo, concurrency, refusal, reloads",
  ignore,
  sanitizeOps: false,
  sanitizeResources: false,
}, async (t) => {
  const backend = await BackendProcess.start({ guestCid: GUEST_CID });
  let vm: GuestVM | undefined;
  let failed = true;
  try {
    vm = await GuestVM.boot({
      vhostSocket: backend.socket,
      timeoutMs: BOOT_TIMEOUT_MS,
      kernelArgs: GUEST_KERNEL_ARGS,
    })
      .catch((e) => {
        throw new Error(`${(e as Error).message}\n${backend.logTail()}`);
      });
    report("guest boot (shared guest)", vm.bootMs);
    const d = { vm, backend };
    const baselineSockets = socketFdCount(backend);

    const ok1 = await t.step(
      "guest->host 8 MiB stream arrives intact",
      () => guestToHostFile(d, 5000, 8 * MiB, "guest->host 8 MiB"),
    );

    const ok2 = await t.step(
      "host->guest echo of 4 MiB through CONNECT is intact",
      () => echoThroughGuest(d, 6000, 4 * MiB, "host->guest echo 4 MiB"),
    );

    const ok3 = await t.step(
      "16 concurrent guest->host streams, half into slow host apps, arrive intact",
      async () => {
        const port = 5100;
        const streams = 16;
        // 256 KiB ... ~1 MiB, a distinct size (and content) each
        const sizes = Array.from({ length: streams }, (_, i) => 256 * KiB + i * 52_428);
        const hashes = parseSha256sum(
          await guestOk(
            d,
            sizes.map((s, i) => `head -c ${s} /dev/urandom > /tmp/s${i}`).join(" && ") +
              " && sha256sum /tmp/s*",
          ),
        );
        const listener = hostListen(backend, port);
        try {
          const start = performance.now();
          // Every other host app reads 4 KiB every 10 ms: its socket fills up, so
          // the backend buffers (and the guest waits for credit), up to the guest's close.
          const recv = acceptAndRead(
            listener,
            streams,
            (i) => i % 2 === 1 ? { chunk: 4 * KiB, pauseMs: 10 } : undefined,
          );
          const send = guestOk(
            d,
            `pids=; for i in $(seq 0 ${streams - 1}); do ` +
              `socat -u FILE:/tmp/s$i VSOCK-CONNECT:${VMADDR_CID_HOST}:${port} & pids="$pids $!"; ` +
              `done; rc=0; for p in $pids; do wait $p || rc=1; done; exit $rc`,
            TRANSFER_TIMEOUT_MS,
          );
          const [got] = await within(
            Promise.all([recv, send]),
            TRANSFER_TIMEOUT_MS,
            `${streams} concurrent guest->host streams`,
            d,
          );
          report(
            `${streams} concurrent guest->host streams (${
              (sizes.reduce((a, b) => a + b) / MiB).toFixed(1)
            } MiB)`,
            Math.max(...got.map((g) => g.eofAt)) - start,
          );
          const want = sizes.map((s, i) => `${s} ${hashes.get(`/tmp/s${i}`)}`);
          const have = got.map((g) => `${g.bytes} ${g.sha256}`);
          const bad = got.filter((g) => !want.includes(`${g.bytes} ${g.sha256}`));
          assert.deepEqual(
            have.toSorted(),
            want.toSorted(),
            `${bad.length} of ${streams} streams differ from every guest file; received sizes ` +
              `${got.map((g) => g.bytes).toSorted((a, b) => a - b).join(",")}, sent ${
                sizes.join(",")
              }\n${backend.logTail(1500)}`,
          );
        } finally {
          listener.close();
        }
      },
    );

    const ok7 = await t.step("a guest connect to a port nobody listens on is refused", async () => {
      const port = 5999;
      const start = performance.now();
      const r = await guestRun(
        d,
        `socat -u OPEN:/dev/null VSOCK-CONNECT:${VMADDR_CID_HOST}:${port}`,
        10_000,
      );
      const ms = performance.now() - start;
      report("refused guest connect (socat exit, incl. console round trip)", ms);
      assert.notEqual(r.code, 0, `socat succeeded: ${r.output}`);
      assert.match(r.output, /Connection (refused|reset)/);
      assert.ok(ms < REFUSED_MAX_MS, `refusal took ${Math.round(ms)} ms`);
    });

    const ok4 = await t.step("driver unload/reload between two transfers", async () => {
      const hashes = parseSha256sum(
        await guestOk(d, "head -c 1048576 /dev/urandom > /tmp/r1 && sha256sum /tmp/r1"),
      );
      const transfer = async (port: number, label: string) => {
        const listener = hostListen(backend, port);
        try {
          const start = performance.now();
          const [[got]] = await within(
            Promise.all([
              acceptAndRead(listener, 1),
              guestOk(d, `socat -u FILE:/tmp/r1 VSOCK-CONNECT:${VMADDR_CID_HOST}:${port}`),
            ]),
            TRANSFER_TIMEOUT_MS,
            `the ${label} transfer`,
            d,
          );
          report(`guest->host 1 MiB ${label}`, got.eofAt - start);
          assert.equal(got.bytes, MiB);
          assert.equal(got.sha256, hashes.get("/tmp/r1"));
        } finally {
          listener.close();
        }
      };
      await transfer(5200, "before the reload");
      const start = performance.now();
      await d.vm.reloadVsockDriver(GUEST_CMD_TIMEOUT_MS).catch((e) => {
        throw new Error(`${(e as Error).message}\n${backend.logTail()}`);
      });
      report("rmmod + modprobe vmw_vsock_virtio_transport", performance.now() - start);
      await transfer(5201, "after the reload");
      await expectSocketFds(backend, baselineSockets, "after the reload and both transfers");
      assert.deepEqual(backend.errorLines(), []);
    });

    const ok6 = await t.step(
      "driver reset closes a live host connection; CONNECT works after",
      async () => {
        const port = 6100;
        const server = await guestSpawn(d, `socat VSOCK-LISTEN:${port} EXEC:cat`);
        let conn: Deno.Conn | undefined;
        let conn2: Deno.Conn | undefined;
        let server2: GuestProcess | undefined;
        try {
          const c = await hybridConnectWhenListening(backend.udsPath, port, d);
          conn = c.conn;
          await writeAll(conn, enc.encode("ping\n"));
          assert.equal(
            dec.decode(await within(readExactly(conn, 5), 10_000, "the echo", d)),
            "ping\n",
          );
          const closed = waitClosed(conn);
          const start = performance.now();
          await guestOk(d, REBIND_DRIVER);
          const how = await within(
            closed,
            RESET_CLOSE_MAX_MS,
            "the backend to close the host app's socket after the driver reset",
            d,
          );
          report(`driver reset -> host socket closed (${how})`, performance.now() - start);
          // the guest side lost its connection too: the one-shot socat has exited
          await guestOk(
            d,
            `for i in $(seq 50); do ${server.aliveTest} || exit 0; sleep 0.1; done; ` +
              `echo "the guest socat survived the reset"; exit 1`,
          );
          const port2 = port + 1;
          server2 = await guestSpawn(d, `socat VSOCK-LISTEN:${port2} EXEC:cat`);
          const reconnectStart = performance.now();
          const c2 = await hybridConnectWhenListening(backend.udsPath, port2, d);
          conn2 = c2.conn;
          report(
            "CONNECT after the driver reset (incl. guest listener start)",
            performance.now() - reconnectStart,
          );
          await writeAll(conn2, enc.encode("pong\n"));
          assert.equal(
            dec.decode(await within(readExactly(conn2, 5), 10_000, "the echo", d)),
            "pong\n",
          );
          conn2.closeWrite();
          assert.equal(await within(waitClosed(conn2), 10_000, "echo EOF", d), "EOF");
          conn2.close();
          conn2 = undefined;
          conn.close();
          conn = undefined;
          await expectSocketFds(backend, baselineSockets, "after the driver reset");
          assert.deepEqual(backend.errorLines(), []);
        } finally {
          conn?.close();
          conn2?.close();
          await server.stop();
          await server2?.stop();
        }
      },
    );

    // A failed step fails this test already; the whole-run checks only matter otherwise.
    if (ok1 && ok2 && ok3 && ok4 && ok6 && ok7) {
      assert.ok(backend.running, `the backend exited\n${backend.logTail()}`);
      assert.deepEqual(backend.errorLines(), [], `errors in the backend log\n${backend.logTail()}`);
      failed = false;
    }
  } finally {
    await vm?.shutdown();
    await backend.stop();
    if (failed) console.error(`backend log kept: ${backend.logFile}`);
    else await backend.discardLog();
  }
});

Deno.test({
  name:
    "e2e: a host CONNECT issued while the guest boots is answered once it listens (kick after start)",
  ignore,
  sanitizeOps: false,
  sanitizeResources: false,
}, async () => {
  // A long connect timeout: the CONNECT must be delivered by the ring start itself, not by a
  // timeout and a retry (the 2 s gap that kick after start removes).
  // Debug level: the log then shows when the rings start (quoted if the test fails).
  const backend = await BackendProcess.start({
    guestCid: GUEST_CID,
    logLevel: "debug",
    extraArgs: ["--connect-timeout-ms", "60000"],
  });
  const dir = await Deno.makeTempDir({ prefix: "e2e-early-" });
  const logFile = Deno.env.get("E2E_LOG_DIR")
    ? `${Deno.env.get("E2E_LOG_DIR")}/guest-early-${Date.now()}-${Deno.pid}.log`
    : `${dir}/console.log`;
  let vm: GuestVM | undefined;
  let conn: Deno.Conn | undefined;
  const stopWatch = { done: false };
  let failed = true;
  try {
    const image = await initrdWithEarlyHook(dir);
    const d: Diagnostics = { backend };
    const start = performance.now();
    const booting = GuestVM.boot({
      vhostSocket: backend.socket,
      logFile,
      timeoutMs: BOOT_TIMEOUT_MS,
      kernel: image.kernel,
      initrd: image.initrd,
      kernelArgs: `${GUEST_KERNEL_ARGS} rdinit=${EARLY_HOOK_PATH}`,
    });
    booting.catch(() => {});
    const listening = watchFor(logFile, EARLY_LISTENING_MARKER, stopWatch);
    const ready = watchFor(logFile, "E2E-GUEST-READY", stopWatch);
    const consoleTail = () =>
      `--- guest console (tail; ${logFile}) ---\n` +
      tail(Deno.readTextFileSync(logFile).replaceAll("\r", ""));
    // The harness writes the QEMU command line to the log just before it spawns QEMU.
    await within(watchFor(logFile, "# \\S*qemu", stopWatch), BOOT_TIMEOUT_MS, "QEMU to start", d);
    // QEMU is starting (the guest cannot have a driver yet): CONNECT now.
    const connecting = hybridConnect(backend.udsPath, EARLY_PORT);
    connecting.catch(() => {});
    const connectSentAt = performance.now();
    vm = await booting.catch((e) => {
      throw new Error(`${(e as Error).message}\n${backend.logTail()}`);
    });
    d.vm = vm;
    const c = await within(connecting, 10_000, "the OK line of the early CONNECT", d).catch(
      (e) => {
        throw new Error(`${(e as Error).message}\n${consoleTail()}`);
      },
    );
    const okAt = performance.now();
    conn = c.conn;
    stopWatch.done = true;
    const listenAt = await listening;
    const readyAt = await ready;
    assert.ok(!Number.isNaN(listenAt), `no ${EARLY_LISTENING_MARKER} marker\n${consoleTail()}`);
    assert.ok(!Number.isNaN(readyAt), `no ready marker\n${consoleTail()}`);
    assert.doesNotMatch(vm.consoleLog, /E2E-EARLY-MODPROBE-FAILED/);
    assert.ok(
      connectSentAt < listenAt,
      "the CONNECT was sent after the guest listened: the scenario did not test an early CONNECT",
    );
    // The driver starts the rings between the listener marker and the ready marker; the OK
    // may even arrive before the ready marker is read from the console.
    const upAt = Math.max(listenAt, readyAt);
    report(
      `early CONNECT (sent ${Math.round(connectSentAt - start)} ms after boot start, ${
        Math.round(listenAt - connectSentAt)
      } ms before the guest listened) answered, ` +
        `relative to the guest listener+driver being up`,
      okAt - upAt,
    );
    report("early CONNECT answered, relative to the guest listener marker", okAt - listenAt);
    const ringToEstablished = backendLogGap(
      backend.logText(),
      /vhost-user: vring \d+ active/,
      new RegExp(`established host-initiated \\S+ <-> guest:${EARLY_PORT}\\b`),
    );
    if (ringToEstablished !== null) {
      report(
        "early CONNECT, backend log: rings started -> connection established",
        ringToEstablished,
      );
    }
    assert.ok(
      okAt - upAt < EARLY_CONNECT_MAX_MS,
      `OK arrived ${Math.round(okAt - upAt)} ms after the guest was up\n${diagnostics(d)}`,
    );
    // A real connection: the guest's one-shot listener echoes.
    await writeAll(conn, enc.encode("early\n"));
    assert.equal(dec.decode(await within(readExactly(conn, 6), 10_000, "the echo", d)), "early\n");
    conn.closeWrite();
    assert.equal(await within(waitClosed(conn), 10_000, "echo EOF", d), "EOF");
    const early = await guestOk({ vm, backend }, "cat /tmp/early.log");
    assert.match(early, /accepting connection from AF=40 cid:2 /);
    assert.deepEqual(backend.errorLines(), []);
    failed = false;
  } finally {
    stopWatch.done = true;
    conn?.close();
    await vm?.shutdown();
    await backend.stop();
    if (failed) console.error(`backend log kept: ${backend.logFile}; guest console: ${logFile}`);
    else await backend.discardLog();
    if (!failed || logFile.startsWith(Deno.env.get("E2E_LOG_DIR") ?? "\0")) {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  }
});
