/**
 * End-to-end SOCK_SEQPACKET with a real Linux guest (6.1: its virtio-vsock driver speaks
 * SEQPACKET when VIRTIO_VSOCK_F_SEQPACKET is offered). socat and busybox have no vsock
 * seqpacket sockets: the guest side is `vsock_seq` (vsock_seq.c, built static into the
 * initramfs by build_initramfs.sh); the host side is `host_seqpacket.ts` (SOCK_SEQPACKET Unix
 * sockets through FFI). Hybrid-vsock naming (README "Socket types"):
 *
 * - host -> guest: a SOCK_SEQPACKET socket connected to `<uds>.seqpacket`, first message
 *   `CONNECT <port>\n`, answer message `OK <host-port>\n`, then one send() = one guest message;
 * - guest -> host: a guest seqpacket connect to CID 2 port P reaches a SOCK_SEQPACKET
 *   listener at `<uds>_<P>`.
 *
 * Scenarios: (0) vsock_seq itself over the guest's vsock_loopback, no back end (so a failure
 * of the others is not the helper's); (a) a guest echo service reached from the host with
 * messages of 1 B, 4 KiB, 64 KiB and 128 KiB, sent back to back, each coming back as one
 * message of its size; (b) a guest client of a host echo service, the same sizes; (c) two
 * sibling guests of one daemon, boundaries and MSG_EOR kept. AF_UNIX never reports MSG_EOR, so
 * records are only checked guest to guest.
 *
 * Skipped (with a warning) when the e2e prerequisites or gcc with a static libc (Debian: gcc
 * libc6-dev) are missing, unless CI or E2E_REQUIRED is set: then they fail.
 */
import assert from "node:assert/strict";
import { VSOCK_HOST_CID as VMADDR_CID_HOST } from "../../lib/vsock/constants.ts";
import { ensureGuestImage, GuestVM, missingPrerequisites, skipE2e } from "./guest_vm.ts";
import { BackendProcess, type SiblingVm } from "./backend.ts";
import {
  BOOT_TIMEOUT_MS,
  type Diagnostics,
  diagnostics,
  GUEST_KERNEL_ARGS,
  type GuestDiagnostics,
  guestOk,
  type GuestProcess,
  guestRun,
  guestSpawn,
  LISTEN_TIMEOUT_MS,
  report,
  sleep,
  TRANSFER_TIMEOUT_MS,
  within,
} from "./e2e_util.ts";
import { seqpacketHybridConnect, SeqpacketListener, SeqpacketRefused } from "./host_seqpacket.ts";
import { pattern } from "../../lib/testing/host.ts";

const KiB = 1024;
/** The message sizes the issue names: 1 B, 4 KiB, 64 KiB and 128 KiB (fits Linux's default
 * 256 KiB buf_alloc). */
const SIZES = [1, 4 * KiB, 64 * KiB, 128 * KiB];
const GUEST_CID = 3;
const SIBLING_CID = 4;
const BUILD_DIR = new URL("../../build/e2e/", import.meta.url).pathname;

/** Why vsock_seq cannot be built here, or null: gcc and a static libc must exist. */
function vsockSeqUnbuildable(): string | null {
  try {
    const out = new Deno.Command("gcc", { args: ["-print-file-name=libc.a"] }).outputSync();
    const path = new TextDecoder().decode(out.stdout).trim();
    if (!out.success || !path.startsWith("/")) return "gcc finds no static libc (libc6-dev)";
    Deno.statSync(path);
    return null;
  } catch {
    return "gcc or its static libc missing (apt-get install gcc libc6-dev)";
  }
}

const missing = missingPrerequisites();
const noHelper = vsockSeqUnbuildable();
if (noHelper !== null) missing.push(`vsock_seq: ${noHelper}`);
const ignore = skipE2e("seqpacket tests", missing);

/** Builds the image; fails clearly when vsock_seq did not make it into it. */
async function guestImage(): Promise<void> {
  await ensureGuestImage();
  try {
    Deno.statSync(`${BUILD_DIR}vsock_seq`);
  } catch {
    const why = await Deno.readTextFile(`${BUILD_DIR}vsock_seq.missing`).catch(() => "?");
    throw new Error(`build_initramfs.sh left vsock_seq out of the guest image: ${why}`);
  }
}

async function boot(backend: BackendProcess | null, socket?: string): Promise<GuestVM> {
  return await GuestVM.boot({
    vhostSocket: socket ?? backend?.socket,
    timeoutMs: BOOT_TIMEOUT_MS,
    kernelArgs: GUEST_KERNEL_ARGS,
  }).catch((e) => {
    throw new Error(`${(e as Error).message}\n${backend?.logTail() ?? ""}`);
  });
}

/** Starts `vsock_seq listen <port>` in the guest and waits until it listens. */
async function guestEchoServer(d: GuestDiagnostics, port: number): Promise<GuestProcess> {
  const p = await guestSpawn(d, `vsock_seq listen ${port}`);
  const deadline = Date.now() + LISTEN_TIMEOUT_MS;
  for (;;) {
    const r = await guestRun(d, `grep -q 'listening on ${port}' ${p.log}`);
    if (r.code === 0) return p;
    const log = await guestRun(d, `cat ${p.log}`);
    if (/FAIL/.test(log.output) || Date.now() >= deadline) {
      await p.stop();
      throw new Error(`vsock_seq listen ${port} did not come up:\n${log.output}`);
    }
    await sleep(100);
  }
}

/** Runs the guest client and asserts every message came back intact. */
async function guestClient(
  d: GuestDiagnostics,
  cid: number,
  port: number,
  specs: string[],
): Promise<string> {
  const cmd = `vsock_seq connect ${cid} ${port} ${specs.join(" ")}`;
  const r = await guestRun(d, cmd, TRANSFER_TIMEOUT_MS);
  assert.equal(
    r.code,
    0,
    `${cmd} failed (exit ${r.code}):\n${r.output}\n${diagnostics(d)}`,
  );
  assert.match(r.output, new RegExp(`all ${specs.length} messages ok`));
  return r.output;
}

/** `seqpacketHybridConnect`, retried while the back end refuses (listener not up yet). */
async function hostConnect(d: Diagnostics, udsPath: string, port: number) {
  const deadline = Date.now() + LISTEN_TIMEOUT_MS;
  for (let attempts = 1;; attempts++) {
    try {
      return await within(seqpacketHybridConnect(udsPath, port), 10_000, `CONNECT ${port}`, d);
    } catch (e) {
      if (!(e instanceof SeqpacketRefused) || Date.now() >= deadline) {
        throw new Error(
          `seqpacket CONNECT ${port} via ${udsPath}.seqpacket failed after ${attempts} ` +
            `attempts: ${(e as Error).message}\n${diagnostics(d)}`,
        );
      }
      await sleep(100);
    }
  }
}

/** Host echo service: each message of each connection back as one message, until EOF. */
function hostEchoService(listener: SeqpacketListener, seen: number[]): Promise<void> {
  return (async () => {
    const s = await listener.accept(TRANSFER_TIMEOUT_MS);
    try {
      for (;;) {
        const m = await s.recv(TRANSFER_TIMEOUT_MS);
        if (m === null) return;
        seen.push(m.length);
        await s.send(m);
      }
    } finally {
      s.close();
    }
  })();
}

async function finish(backend: BackendProcess | null, failed: boolean, vms: GuestVM[]) {
  for (const vm of vms) await vm.shutdown();
  if (!backend) return;
  await backend.stop();
  if (failed) console.error(`backend log kept: ${backend.logFile}`);
  else await backend.discardLog();
}

Deno.test({
  name: "e2e seqpacket: vsock_seq keeps boundaries and MSG_EOR over the guest's vsock_loopback",
  ignore,
  sanitizeOps: false,
  sanitizeResources: false,
}, async () => {
  await guestImage();
  const vm = await boot(null);
  try {
    const d = { vm };
    await guestOk(d, "modprobe vsock_loopback");
    const server = await guestEchoServer(d, 6000);
    const start = performance.now();
    const out = await guestClient(d, 1, 6000, ["1e", "4096n", "65536e", "131072n", "7e"]);
    report("seqpacket loopback, 5 messages", performance.now() - start);
    assert.match(out, /message 0: 1 bytes ok eor=1/);
    assert.match(out, /message 3: 131072 bytes ok eor=0/);
    await server.stop();
  } finally {
    await vm.shutdown();
  }
});

Deno.test({
  name: "e2e seqpacket: host <-> guest through the back end keeps message boundaries",
  ignore,
  sanitizeOps: false,
  sanitizeResources: false,
}, async (t) => {
  await guestImage();
  const backend = await BackendProcess.start({ guestCid: GUEST_CID });
  const vms: GuestVM[] = [];
  let failed = true;
  try {
    const vm = await boot(backend);
    vms.push(vm);
    const d = { vm, backend };

    const okA = await t.step("(a) host -> guest echo service via <uds>.seqpacket", async () => {
      const server = await guestEchoServer(d, 6000);
      const { sock } = await hostConnect(d, backend.udsPath, 6000);
      try {
        const msgs = SIZES.map((n, i) => pattern(n, i + 1));
        const start = performance.now();
        // Back to back: a back end that merged or split messages would show other lengths.
        const sending = (async () => {
          for (const m of msgs) await sock.send(m, TRANSFER_TIMEOUT_MS);
        })();
        const echoes: Uint8Array[] = [];
        for (let i = 0; i < msgs.length; i++) {
          const e = await within(
            sock.recv(TRANSFER_TIMEOUT_MS),
            TRANSFER_TIMEOUT_MS,
            `echo ${i}`,
            d,
          );
          assert.ok(e !== null, `EOF instead of echo ${i}\n${diagnostics(d)}`);
          echoes.push(e);
        }
        await sending;
        report(
          "seqpacket host->guest echo of 1 B, 4 KiB, 64 KiB, 128 KiB",
          performance.now() - start,
        );
        assert.deepEqual(echoes.map((e) => e.length), SIZES, "one echo per message, same sizes");
        for (let i = 0; i < msgs.length; i++) assert.deepEqual(echoes[i], msgs[i], `echo ${i}`);
        const log = await guestOk(d, `cat ${server.log}`);
        for (const n of SIZES) assert.match(log, new RegExp(`echo ${n} bytes`));
      } finally {
        sock.close();
        await server.stop();
      }
    });

    const okB = await t.step("(b) guest client -> host service at <uds>_<P>", async () => {
      const port = 7000;
      const listener = new SeqpacketListener(`${backend.udsPath}_${port}`);
      const seen: number[] = [];
      try {
        const service = hostEchoService(listener, seen);
        service.catch(() => {});
        const start = performance.now();
        await guestClient(d, VMADDR_CID_HOST, port, SIZES.map(String));
        report(
          "seqpacket guest->host echo of 1 B, 4 KiB, 64 KiB, 128 KiB",
          performance.now() - start,
        );
        await within(service, TRANSFER_TIMEOUT_MS, "the host service to see EOF", d);
        assert.deepEqual(seen, SIZES, "the host app received one message per guest message");
      } finally {
        listener.close();
      }
    });

    const okC = await t.step("(b') a guest connect to a stream listener is refused", async () => {
      const port = 7001;
      const stream = Deno.listen({ transport: "unix", path: `${backend.udsPath}_${port}` });
      try {
        const r = await guestRun(d, `vsock_seq connect ${VMADDR_CID_HOST} ${port} 1`);
        assert.notEqual(r.code, 0, `connect to a stream listener succeeded:\n${r.output}`);
        assert.match(r.output, /FAIL connect/);
      } finally {
        stream.close();
      }
    });

    if (okA && okB && okC) {
      assert.ok(backend.running, `the backend exited\n${backend.logTail()}`);
      assert.deepEqual(backend.errorLines(), [], `errors in the backend log\n${backend.logTail()}`);
      failed = false;
    }
  } finally {
    await finish(backend, failed, vms);
  }
});

Deno.test({
  name: "e2e seqpacket: two sibling guests of one daemon keep boundaries and MSG_EOR",
  ignore,
  sanitizeOps: false,
  sanitizeResources: false,
}, async () => {
  await guestImage();
  const siblings: SiblingVm[] = [
    { guestCid: GUEST_CID, groups: "seq" },
    { guestCid: SIBLING_CID, groups: "seq" },
  ];
  const backend = await BackendProcess.start({ vms: siblings });
  const vms: GuestVM[] = [];
  let failed = true;
  try {
    // One after the other: each TCG guest takes a host core while it boots.
    const a = await boot(backend, backend.sockets[0]);
    vms.push(a);
    const b = await boot(backend, backend.sockets[1]);
    vms.push(b);
    const da = { vm: a, backend };
    const db = { vm: b, backend };
    const server = await guestEchoServer(da, 6100);
    const start = performance.now();
    const specs = [...SIZES.map((n, i) => `${n}${i % 2 ? "e" : "n"}`), "7e", "3n"];
    const out = await guestClient(db, GUEST_CID, 6100, specs);
    report("seqpacket sibling echo (6 messages)", performance.now() - start);
    assert.match(out, /message 1: 4096 bytes ok eor=1/);
    assert.match(out, /message 2: 65536 bytes ok eor=0/);
    await server.stop();
    assert.ok(backend.running, `the backend exited\n${backend.logTail()}`);
    assert.deepEqual(backend.errorLines(), [], `errors in the backend log\n${backend.logTail()}`);
    failed = false;
  } finally {
    await finish(backend, failed, vms);
  }
});
