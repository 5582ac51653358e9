/**
 * The host side of the end-to-end tests: host apps speaking the hybrid-vsock protocol of
 * Firecracker and vhost-device-vsock to the daemon under test, shared by every QEMU test.
 *
 * - host -> guest: connect to `<uds>`, write `CONNECT <port>\n`, read `OK <hostport>\n` once
 *   the guest accepts (the socket is closed when the guest refuses or the connect times out);
 * - guest -> host: a guest connect to CID 2 port P reaches a listener on `<uds>_P`.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import type { BackendProcess } from "./backend.ts";
import { type Diagnostics, diagnostics, LISTEN_TIMEOUT_MS, sleep, within } from "./e2e_util.ts";

const KiB = 1024;
const enc = new TextEncoder();
const dec = new TextDecoder();

export interface Received {
  bytes: number;
  sha256: string;
  /** performance.now() when EOF was seen */
  eofAt: number;
}

/** A host app that reads slowly: `chunk` bytes per read, then a pause. */
export interface Throttle {
  chunk: number;
  pauseMs: number;
}

/**
 * Reads `conn` to EOF, hashing as it goes. With `throttle`, the host socket fills up and the
 * backend must hold guest data back (its buffer and the guest's credit), not only writev it.
 */
export async function readToEof(conn: Deno.Conn, throttle?: Throttle): Promise<Received> {
  const hash = createHash("sha256");
  const buf = new Uint8Array(throttle?.chunk ?? 256 * KiB);
  let bytes = 0;
  while (true) {
    const n = await conn.read(buf);
    if (n === null) break;
    hash.update(buf.subarray(0, n));
    bytes += n;
    if (throttle) await sleep(throttle.pauseMs);
  }
  return { bytes, sha256: hash.digest("hex"), eofAt: performance.now() };
}

/** Waits for EOF or ECONNRESET on `conn`, discarding data; returns how it ended. */
export async function waitClosed(conn: Deno.Conn): Promise<string> {
  const buf = new Uint8Array(64 * KiB);
  try {
    while ((await conn.read(buf)) !== null) { /* discard */ }
    return "EOF";
  } catch (e) {
    if (e instanceof Deno.errors.ConnectionReset) return "ECONNRESET";
    throw e;
  }
}

export async function writeAll(conn: Deno.Conn, data: Uint8Array): Promise<void> {
  let off = 0;
  while (off < data.length) off += await conn.write(data.subarray(off));
}

/** Reads exactly `n` bytes (rejects on early EOF). */
export async function readExactly(conn: Deno.Conn, n: number): Promise<Uint8Array> {
  const out = new Uint8Array(n);
  let got = 0;
  while (got < n) {
    const r = await conn.read(out.subarray(got));
    if (r === null) throw new Error(`EOF after ${got} of ${n} bytes`);
    got += r;
  }
  return out;
}

export class Refused extends Error {
  override name = "Refused";
}

/**
 * Host -> guest: `CONNECT <port>\n` on the hybrid socket, then the `OK <hostport>\n` line.
 * Rejects with {@link Refused} when the backend closes the socket instead (guest refused or
 * the connect timed out). The caller owns the returned connection.
 */
export async function hybridConnect(
  udsPath: string,
  port: number,
): Promise<{ conn: Deno.UnixConn; hostPort: number }> {
  const conn = await Deno.connect({ transport: "unix", path: udsPath });
  try {
    await writeAll(conn, enc.encode(`CONNECT ${port}\n`));
    // Byte by byte: nothing after the newline may be consumed (it belongs to the stream).
    const line: number[] = [];
    const one = new Uint8Array(1);
    while (line.length < 64) {
      let n: number | null;
      try {
        n = await conn.read(one);
      } catch (e) {
        if (e instanceof Deno.errors.ConnectionReset) n = null;
        else throw e;
      }
      if (n === null) throw new Refused(`CONNECT ${port}: closed by the backend`);
      if (one[0] === 0x0a) break;
      line.push(one[0]);
    }
    const text = dec.decode(new Uint8Array(line));
    const m = /^OK (\d+)$/.exec(text);
    if (!m) throw new Error(`CONNECT ${port}: unexpected reply ${JSON.stringify(text)}`);
    return { conn, hostPort: Number(m[1]) };
  } catch (e) {
    conn.close();
    throw e;
  }
}

/** {@link hybridConnect}, retried while the guest refuses (its listener is not up yet). */
export async function hybridConnectWhenListening(
  udsPath: string,
  port: number,
  d: Diagnostics,
): Promise<{ conn: Deno.UnixConn; hostPort: number; attempts: number }> {
  const deadline = Date.now() + LISTEN_TIMEOUT_MS;
  for (let attempts = 1;; attempts++) {
    try {
      return {
        ...(await within(hybridConnect(udsPath, port), 10_000, `CONNECT ${port}`, d)),
        attempts,
      };
    } catch (e) {
      if (!(e instanceof Refused) || Date.now() >= deadline) {
        throw new Error(
          `no guest listener answered CONNECT ${port} within ${LISTEN_TIMEOUT_MS} ms ` +
            `(${attempts} attempts; last: ${(e as Error).message})\n${diagnostics(d)}`,
        );
      }
      await sleep(100);
    }
  }
}

/** Listener for guest connects to host port `port` (`<uds>_<port>`). */
export function hostListen(backend: BackendProcess, port: number): Deno.UnixListener {
  return Deno.listen({ transport: "unix", path: `${backend.udsPath}_${port}` });
}

/** Accepts `n` connections, reading each to EOF concurrently (the i-th as `throttle(i)`). */
export async function acceptAndRead(
  listener: Deno.Listener,
  n: number,
  throttle: (i: number) => Throttle | undefined = () => undefined,
): Promise<Received[]> {
  const reads: Promise<Received>[] = [];
  const conns: Deno.Conn[] = [];
  try {
    for (let i = 0; i < n; i++) {
      const c = await listener.accept();
      conns.push(c);
      reads.push(readToEof(c, throttle(i)));
    }
    return await Promise.all(reads);
  } finally {
    for (const c of conns) c.close();
  }
}

export function socketFdCount(backend: BackendProcess): number {
  return backend.openFds().filter((f) => f.startsWith("socket:")).length;
}

/** Waits until the backend holds `want` sockets again (closing is asynchronous). */
export async function expectSocketFds(backend: BackendProcess, want: number, what: string) {
  const deadline = Date.now() + 3_000;
  let now = socketFdCount(backend);
  while (now !== want && Date.now() < deadline) {
    await sleep(50);
    now = socketFdCount(backend);
  }
  assert.equal(now, want, `${what}: backend holds ${now} sockets, ${want} expected (stale?)`);
}

// ---- guest-side helpers --------------------------------------------------------------------

/** sha256 of guest files: `sha256sum` output -> Map(path -> hex). */
export function parseSha256sum(out: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const line of out.trim().split("\n")) {
    const [hex, path] = line.split(/\s+/);
    assert.match(hex, /^[0-9a-f]{64}$/, `bad sha256sum line ${JSON.stringify(line)}`);
    m.set(path, hex);
  }
  return m;
}
