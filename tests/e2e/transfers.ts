/**
 * Data-path scenarios shared by the QEMU tests: a file streamed guest -> host through socat and
 * checked by sha256 on both sides, and random bytes echoed host -> guest -> host through a
 * guest `socat ... EXEC:cat` service reached with the hybrid CONNECT.
 */
import assert from "node:assert/strict";
import { VSOCK_HOST_CID as VMADDR_CID_HOST } from "../../lib/vsock/constants.ts";
import type { BackendProcess } from "./backend.ts";
import {
  type GuestDiagnostics,
  guestOk,
  guestSpawn,
  report,
  TRANSFER_TIMEOUT_MS,
  within,
} from "./e2e_util.ts";
import {
  acceptAndRead,
  hostListen,
  hybridConnectWhenListening,
  parseSha256sum,
  readExactly,
  waitClosed,
  writeAll,
} from "./host_side.ts";

const MiB = 1024 * 1024;

/** What the scenarios need: the guest, the back end, for diagnostics and the host side. */
export type Rig = GuestDiagnostics & { backend: BackendProcess };

/** Guest -> host: `bytes` random bytes to host port `port`, intact; reports as `label`. */
export async function guestToHostFile(d: Rig, port: number, bytes: number, label: string) {
  const file = `/tmp/g2h${port}`;
  const hashes = parseSha256sum(
    await guestOk(d, `head -c ${bytes} /dev/urandom > ${file} && sha256sum ${file}`),
  );
  const listener = hostListen(d.backend, port);
  try {
    const start = performance.now();
    const recv = acceptAndRead(listener, 1);
    const send = guestOk(
      d,
      `socat -u FILE:${file} VSOCK-CONNECT:${VMADDR_CID_HOST}:${port}`,
      TRANSFER_TIMEOUT_MS,
    );
    const [[got]] = await within(
      Promise.all([recv, send]),
      TRANSFER_TIMEOUT_MS,
      `the ${label} stream`,
      d,
    );
    report(label, got.eofAt - start);
    assert.equal(got.bytes, bytes);
    assert.equal(got.sha256, hashes.get(file));
  } finally {
    listener.close();
  }
}

/** Host -> guest -> host: `bytes` random bytes echoed by a guest service on `port`, intact. */
export async function echoThroughGuest(d: Rig, port: number, bytes: number, label: string) {
  const server = await guestSpawn(d, `socat VSOCK-LISTEN:${port},fork EXEC:cat`);
  let conn: Deno.Conn | undefined;
  try {
    const c = await hybridConnectWhenListening(d.backend.udsPath, port, d);
    conn = c.conn;
    assert.ok(c.hostPort > 0);
    const payload = new Uint8Array(bytes);
    // getRandomValues fills at most 64 KiB per call
    for (let off = 0; off < payload.length; off += 65536) {
      crypto.getRandomValues(payload.subarray(off, off + 65536));
    }
    const start = performance.now();
    const [, echoed] = await within(
      Promise.all([writeAll(c.conn, payload), readExactly(c.conn, payload.length)]),
      TRANSFER_TIMEOUT_MS,
      `the ${bytes / MiB} MiB echo`,
      d,
    );
    report(label, performance.now() - start);
    const firstDiff = echoed.findIndex((b, i) => b !== payload[i]);
    assert.equal(firstDiff, -1, `echo differs at byte ${firstDiff}`);
    c.conn.closeWrite();
    assert.equal(await within(waitClosed(c.conn), 10_000, "echo EOF", d), "EOF");
  } finally {
    conn?.close();
    await server.stop();
  }
}
