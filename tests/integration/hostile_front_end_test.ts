/**
 * A hostile or careless vhost-user front end must not take the back end down with it, nor
 * keep the next front end out (issue "Hostile inputs", items 11 and 12, and the defects the
 * front-end fuzzer found). Each test runs main.ts as a child process and talks raw
 * vhost-user to it (`tests/fuzz/raw_front_end.ts`).
 *
 * - reconnect at once: the old front end queues more messages than the back end handles per
 *   readiness event and closes; a new one connects immediately. The back end used to refuse
 *   it (the old connection's EOF still unread), leaving the VM without a front end.
 * - a front end that never reads its replies: the back end used to log one line per message
 *   (`reply could not be sent (errno 11)`) and drop or cut replies, breaking the framing. Now
 *   the connection ends with one line, and the next front end is served.
 * - kick, call and error fds that are not eventfds (found by the fuzzer): a pipe as the call
 *   fd made every interrupt throw out of the device's batch-end hook (an ERROR line with a
 *   stack per batch, and the rest of the batch's signalling skipped). Now refused.
 */
import assert from "node:assert/strict";
import { close, memfdCreate, pipe } from "../../ffi/mod.ts";
import {
  type BackendProcess,
  readExactly,
  spawnBackend,
  startVm,
  VSOCK_VQ_RX,
  VSOCK_VQ_TX,
} from "../../lib/testing/mod.ts";
import {
  decodeU64,
  encodeMemoryTable,
  encodeRequest,
  encodeU64,
  encodeVringState,
} from "../../lib/vhost_user/messages.ts";
import {
  VhostUserProtocolFeatureMask as PF,
  VhostUserRequest as R,
} from "../../lib/vhost_user/protocol.ts";
import { RawFrontEnd } from "../fuzz/raw_front_end.ts";

/** `count` copies of the message `msg`, back to back. */
function repeated(msg: Uint8Array, count: number): Uint8Array {
  const out = new Uint8Array(msg.length * count);
  for (let i = 0; i < count; i++) out.set(msg, i * msg.length);
  return out;
}

/** A fresh front end's GET_FEATURES round trip: "reply", or how it failed. */
function getFeatures(backend: BackendProcess, timeoutMs: number): string {
  const fe = new RawFrontEnd(backend.socketPath);
  try {
    if (fe.send(encodeRequest(R.GET_FEATURES)) !== "sent") return "send failed";
    return fe.readUntil(R.GET_FEATURES, timeoutMs).outcome;
  } finally {
    fe.close();
  }
}

/** The u64 of a REPLY_ACK (0 = success). */
function ackValue(reply: { payload: Uint8Array }): bigint {
  const v = decodeU64(reply.payload);
  if (v instanceof Error) throw v;
  return v;
}

async function withBackend(fn: (b: BackendProcess) => Promise<void> | void): Promise<string> {
  const backend = await spawnBackend();
  try {
    await fn(backend);
  } finally {
    const exit = await backend.stop();
    // deno-lint-ignore no-unsafe-finally
    if (exit.code !== 0 && exit.signal !== "SIGTERM") throw new Error(exit.stderr);
  }
  return backend.stderr();
}

const TIMEOUT = { sanitizeOps: false, sanitizeResources: false };

/** Lets the child's stderr drain run (the raw socket calls above block this thread). */
const settle = (ms = 200) => new Promise((r) => setTimeout(r, ms));

Deno.test({
  name:
    "reconnect at once: a front end that connects while the old one's last messages and EOF are still queued is served",
  ...TIMEOUT,
  fn: async () => {
    // SET_OWNER needs no reply, so the old front end leaves nothing unread behind.
    const flood = repeated(encodeRequest(R.SET_OWNER), 1000);
    const refused: string[] = [];
    await withBackend(async (backend) => {
      for (let i = 0; i < 50; i++) {
        const old = new RawFrontEnd(backend.socketPath);
        const sent = old.send(flood, [], 5000);
        old.close();
        // The old front end is refused too when the previous try's new one was.
        if (sent !== "sent") refused.push(`try ${i}: the old front end's send: ${sent}`);
        const outcome = getFeatures(backend, 2000);
        if (outcome !== "reply") refused.push(`try ${i}: the new front end: ${outcome}`);
      }
      await settle();
      assert.deepEqual(refused, [], "tries where the new front end was not served");
      assert.doesNotMatch(backend.stderr(), /second front end/);
    });
  },
});

Deno.test({
  name:
    "a front end that never reads its replies is disconnected with one log line; the next front end is served",
  ...TIMEOUT,
  fn: async () => {
    await withBackend(async (backend) => {
      await settle();
      const linesBefore = backend.stderr().split("\n").length;
      const fe = new RawFrontEnd(backend.socketPath);
      // 1,000 GET_FEATURES per write, up to 50,000 in all; never a read.
      const burst = repeated(encodeRequest(R.GET_FEATURES), 1000);
      let sent = 0;
      let off = 0;
      let hungUp = false;
      const deadline = performance.now() + 10_000;
      while (sent < 50 * burst.length && performance.now() < deadline) {
        const n = fe.trySend(burst.subarray(off));
        if (n > 0) {
          sent += n;
          off = (off + n) % burst.length;
        } else if (n === -11 /* EAGAIN */) {
          if (fe.hungUp(20)) {
            hungUp = true;
            break;
          }
        } else {
          hungUp = true; // EPIPE / ECONNRESET: the back end closed the connection
          break;
        }
      }
      fe.close();
      await settle();
      const lines = backend.stderr().split("\n").slice(linesBefore - 1).filter((l) => l);
      assert.ok(hungUp, `the back end kept the front end after ${sent / 12} requests`);
      assert.ok(
        lines.length <= 6,
        `the back end logged ${lines.length} lines:\n${lines.slice(0, 10).join("\n")}`,
      );
      assert.match(backend.stderr(), /a reply could not be sent whole/);
      assert.equal(getFeatures(backend, 2000), "reply", "the next front end is served");
    });
  },
});

Deno.test({
  name:
    "a call fd that is not an eventfd is refused: the device's interrupts never throw (found by the front-end fuzzer)",
  ...TIMEOUT,
  fn: async () => {
    const vm = await startVm({ profile: "qemu", guest: { timeoutMs: 3000 } });
    let stderr = "";
    try {
      // A pipe's read end whose write end is closed: every interrupt write fails (EBADF).
      const [r, w] = pipe();
      close(w);
      for (const q of [VSOCK_VQ_RX, VSOCK_VQ_TX]) {
        const ack = vm.frontEnd.request(R.SET_VRING_CALL, encodeU64(q), [r], { needReply: true });
        assert.notEqual(ackValue(ack!), 0n, `vring ${q}: a pipe accepted as the call fd`);
      }
      close(r);
      // Traffic both ways makes the device interrupt the guest.
      const listener = vm.guest.listen(5000);
      const [host, conn] = await Promise.all([vm.hostConnect(5000), listener.accept()]);
      await conn.write(new TextEncoder().encode("ping"));
      assert.equal(new TextDecoder().decode(await readExactly(host.conn, 4)), "ping");
      host.conn.close();
      await conn.close();
      listener.close();
    } finally {
      stderr = (await vm.stop()).stderr;
    }
    assert.doesNotMatch(stderr, /threw/, "an exception escaped to the reactor");
  },
});

Deno.test({
  name:
    "CHECK_DEVICE_STATE on a load whose fd never reaches EOF does not block the reactor; it fails after its wait",
  ...TIMEOUT,
  fn: async () => {
    await withBackend(async (backend) => {
      const fe = new RawFrontEnd(backend.socketPath);
      const [r, w] = pipe();
      try {
        const protocolFeatures = 1n << 30n;
        assert.equal(fe.send(encodeRequest(R.SET_FEATURES, encodeU64(protocolFeatures))), "sent");
        assert.equal(
          fe.send(encodeRequest(R.SET_PROTOCOL_FEATURES, encodeU64(PF.DEVICE_STATE))),
          "sent",
        );
        const transfer = new Uint8Array(8);
        new DataView(transfer.buffer).setUint32(0, 1, true); // load, phase stopped
        assert.equal(fe.send(encodeRequest(R.SET_DEVICE_STATE_FD, transfer), [r]), "sent");
        assert.equal(fe.readUntil(R.SET_DEVICE_STATE_FD, 2000).outcome, "reply");
        // The front end keeps the write end open: no EOF will come.
        assert.equal(fe.send(encodeRequest(R.CHECK_DEVICE_STATE)), "sent");
        // Meanwhile the reactor serves others: a host client with a bad line is closed at once.
        const t0 = performance.now();
        const host = await Deno.connect({ transport: "unix", path: backend.udsPath });
        await host.write(new TextEncoder().encode("NOPE\n"));
        const eof = await host.read(new Uint8Array(8)).catch(() => null);
        const ms = performance.now() - t0;
        host.close();
        assert.equal(eof, null);
        assert.ok(ms < 500, `the reactor was blocked: the bad client was closed after ${ms} ms`);
        const check = fe.readUntil(R.CHECK_DEVICE_STATE, 3000);
        assert.equal(check.outcome, "reply");
        assert.notEqual(ackValue(check.replies.at(-1)!), 0n, "the load without EOF failed");
        // The front end's next request is read and answered again.
        assert.equal(fe.send(encodeRequest(R.GET_FEATURES)), "sent");
        assert.equal(fe.readUntil(R.GET_FEATURES, 2000).outcome, "reply");
      } finally {
        close(w);
        fe.close();
      }
    });
  },
});

Deno.test({
  name:
    "a refused SET_MEM_TABLE leaves no ring over unmapped memory: enabling the rings afterwards does not crash the back end (found by the front-end fuzzer: SIGSEGV)",
  ...TIMEOUT,
  fn: async () => {
    const vm = await startVm({ profile: "qemu", guest: { timeoutMs: 3000 } });
    try {
      // A region whose fd holds less than its size: refused, after the old table was unmapped.
      const fd = memfdCreate("too-small", 4096);
      const table = encodeMemoryTable({
        regions: [{ guestAddr: 0, size: 1 << 20, userAddr: 0x7000_0000, mmapOffset: 0 }],
      });
      const ack = vm.frontEnd.request(R.SET_MEM_TABLE, table, [fd], { needReply: true });
      close(fd);
      assert.notEqual(ackValue(ack!), 0n, "the short fd is refused");
      for (const q of [VSOCK_VQ_RX, VSOCK_VQ_TX]) {
        vm.frontEnd.request(R.SET_VRING_ENABLE, encodeVringState({ index: q, num: 1 }), [], {
          needReply: true,
        });
        vm.frontEnd.kick(q);
      }
      await settle(300);
      // Still the same process, still answering.
      const features = vm.frontEnd.request(R.GET_FEATURES, undefined, [], { expectReply: true });
      assert.ok(features !== null && features !== undefined);
      assert.doesNotMatch(vm.backend.stderr(), /died|SIGSEGV/);
    } finally {
      await vm.stop();
    }
  },
});
