/**
 * The host side of hybrid vsock, for tests, with Deno's own async Unix sockets (so they run
 * on Deno's event loop while the guest driver awaits its eventfds):
 *
 * - host -> guest: connect to the back end's `uds_path`, write `CONNECT <port>\n`, read
 *   `OK <host-port>\n` once the guest accepted; the back end closes the socket when the guest
 *   refuses (`hostConnect`);
 * - guest -> host: the back end connects to `<uds_path>_<port>` when the guest connects to
 *   CID 2 port `port` (`hostListen`).
 *
 * The OK line is read one byte at a time, so bytes the back end forwards right after it stay
 * in the socket for the caller's first read: nothing is lost in a buffer here.
 *
 * Every helper takes a timeout and rejects with `HostTimeoutError` naming what it waited for;
 * on timeout the socket involved is closed (a pending Deno read cannot be cancelled otherwise).
 */

import { concat } from "./bytes.ts";

/** A host-side wait ran out of time. */
export class HostTimeoutError extends Error {
  override name = "HostTimeoutError";
}

/** The back end refused a CONNECT (closed the socket, or answered something else than OK). */
export class HostConnectError extends Error {
  override name = "HostConnectError";
}

/** Default timeout of the host helpers. */
export const HOST_TIMEOUT_MS = 10000;
/** Longest OK line accepted ("OK " + a u32 + "\n" is at most 14 bytes). */
const MAX_OK_LINE = 64;

/** Options with a timeout. */
export interface HostTimeout {
  /** default 10000 ms */
  readonly timeoutMs?: number;
}

/** Runs `op` with a deadline; on timeout closes `closer` (to abort pending I/O) and rejects. */
async function withTimeout<T>(
  op: Promise<T>,
  timeoutMs: number,
  what: string,
  closer?: { close(): void },
): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      try {
        closer?.close();
      } catch { /* already closed */ }
      reject(new HostTimeoutError(`timed out after ${timeoutMs} ms waiting for ${what}`));
    }, timeoutMs);
  });
  try {
    return await Promise.race([op, timeout]);
  } finally {
    clearTimeout(timer);
    op.catch(() => {}); // the losing read fails with "closed"; nobody awaits it
  }
}

/** A host connection to a guest port, after the CONNECT/OK handshake. */
export interface HostConnection {
  readonly conn: Deno.UnixConn;
  /** the port in the back end's `OK <port>` line */
  readonly hostPort: number;
}

/**
 * Connects to guest port `port` through the back end's hybrid socket `udsPath`: sends
 * `CONNECT <port>\n` (plus `initialData` in the same write, if given, as clients may) and
 * waits for `OK <host-port>\n`. Rejects with HostConnectError when the back end closes the
 * socket (the guest refused) or answers with anything else, HostTimeoutError on timeout.
 */
export async function hostConnect(
  udsPath: string,
  port: number,
  opts: HostTimeout & { initialData?: Uint8Array } = {},
): Promise<HostConnection> {
  const timeoutMs = opts.timeoutMs ?? HOST_TIMEOUT_MS;
  const conn = await withTimeout(
    Deno.connect({ transport: "unix", path: udsPath }),
    timeoutMs,
    `connect to ${udsPath}`,
  );
  try {
    const line = new TextEncoder().encode(`CONNECT ${port}\n`);
    const first = opts.initialData ? concat([line, opts.initialData]) : line;
    await withTimeout(writeAll(conn, first), timeoutMs, `sending CONNECT ${port}`, conn);
    const reply = await withTimeout(readLine(conn), timeoutMs, `OK for CONNECT ${port}`, conn);
    if (reply === null) {
      throw new HostConnectError(
        `CONNECT ${port} via ${udsPath}: the back end closed the socket (guest refused?)`,
      );
    }
    const m = /^OK (\d+)\r?$/.exec(reply);
    if (m === null) {
      throw new HostConnectError(`CONNECT ${port}: unexpected reply ${JSON.stringify(reply)}`);
    }
    return { conn, hostPort: Number(m[1]) };
  } catch (e) {
    try {
      conn.close();
    } catch { /* closed by a timeout */ }
    throw e;
  }
}

/** Reads one line up to "\n" byte by byte (null on EOF before any newline). */
async function readLine(conn: Deno.Conn): Promise<string | null> {
  const buf = new Uint8Array(MAX_OK_LINE);
  const one = new Uint8Array(1);
  let n = 0;
  for (;;) {
    const r = await conn.read(one);
    if (r === null) return null;
    if (r === 0) continue;
    if (one[0] === 0x0a) return new TextDecoder().decode(buf.subarray(0, n));
    if (n === buf.length) {
      throw new HostConnectError(`reply line longer than ${MAX_OK_LINE} bytes`);
    }
    buf[n++] = one[0];
  }
}

/** A host listener at `<udsPath>_<port>` (where the back end sends guest connects to CID 2). */
export class HostListener {
  /** the socket path */
  readonly path: string;
  readonly listener: Deno.UnixListener;

  /** @internal Use `hostListen`. */
  constructor(path: string, listener: Deno.UnixListener) {
    this.path = path;
    this.listener = listener;
  }

  /** The next connection from the back end. */
  accept(opts: HostTimeout = {}): Promise<Deno.UnixConn> {
    const timeoutMs = opts.timeoutMs ?? HOST_TIMEOUT_MS;
    return withTimeout(
      this.listener.accept(),
      timeoutMs,
      `a connection on ${this.path}`,
      this.listener,
    );
  }

  /** Stops listening and removes the socket file. */
  close(): void {
    try {
      this.listener.close();
    } catch { /* closed */ }
    try {
      Deno.removeSync(this.path);
    } catch { /* gone */ }
  }
}

/** Listens on `<udsPath>_<port>` (a stale socket file is replaced). */
export function hostListen(udsPath: string, port: number): HostListener {
  const path = `${udsPath}_${port}`;
  try {
    if (Deno.lstatSync(path).isSocket) Deno.removeSync(path);
  } catch { /* none */ }
  return new HostListener(path, Deno.listen({ transport: "unix", path }));
}

/** Writes all of `data` (Deno's write may be partial). */
export async function writeAll(conn: Deno.Conn, data: Uint8Array): Promise<void> {
  let off = 0;
  while (off < data.length) off += await conn.write(data.subarray(off));
}

/** Reads exactly `n` bytes; rejects on EOF first or timeout (closing `conn`). */
export function readExactly(
  conn: Deno.Conn,
  n: number,
  opts: HostTimeout = {},
): Promise<Uint8Array> {
  const op = (async () => {
    const out = new Uint8Array(n);
    let got = 0;
    while (got < n) {
      const r = await conn.read(out.subarray(got));
      if (r === null) throw new HostConnectError(`EOF after ${got} of ${n} bytes`);
      got += r;
    }
    return out;
  })();
  return withTimeout(op, opts.timeoutMs ?? HOST_TIMEOUT_MS, `${n} bytes`, conn);
}

/** Reads until EOF; rejects on timeout (closing `conn`). */
export function readAll(conn: Deno.Conn, opts: HostTimeout = {}): Promise<Uint8Array> {
  const op = (async () => {
    const parts: Uint8Array[] = [];
    const buf = new Uint8Array(65536);
    for (;;) {
      const r = await conn.read(buf);
      if (r === null) return concat(parts);
      parts.push(buf.slice(0, r));
    }
  })();
  return withTimeout(op, opts.timeoutMs ?? HOST_TIMEOUT_MS, "EOF", conn);
}

/** Deterministic test data: `n` bytes of a simple pattern seeded by `seed`. */
export function pattern(n: number, seed = 1): Uint8Array {
  const out = new Uint8Array(n);
  const words = new Uint32Array(out.buffer, 0, n >>> 2);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    // xorshift32: one step per 4 bytes
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
  for (let i = words.length * 4; i < n; i++) out[i] = (seed + i) & 0xff;
  return out;
}
