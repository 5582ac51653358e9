/**
 * Host-side SOCK_SEQPACKET Unix sockets for the e2e tests (Deno has none): the host apps of the
 * hybrid-vsock seqpacket protocol (`<uds-path>.seqpacket` for host -> guest, a listener at
 * `<uds-path>_<P>` for guest -> host; see README "Socket types").
 *
 * Every socket is non-blocking and polled with short sleeps: these are test helpers, kept
 * simple, not an event loop. One `send` is one message and one `recv` one message (read(2)
 * on a seqpacket socket returns one whole message); AF_UNIX never reports MSG_EOR, so record
 * boundaries are not visible here, only message boundaries.
 */
import { sys } from "../../ffi/libc.ts";
import { check, EAGAIN, SysError } from "../../ffi/errno.ts";
import { close, readRaw } from "../../ffi/fd.ts";
import {
  acceptRaw,
  connectRaw,
  sendWithFds,
  setSockOptInt,
  SO_SNDBUF,
  SOCK_SEQPACKET,
  sockaddrUn,
  unixSocket,
} from "../../ffi/socket.ts";

/** Largest message a `recv` takes whole (a longer one would be truncated). */
export const SEQPACKET_MAX_MSG = 1024 * 1024;
/** SO_SNDBUF asked for (the kernel doubles it, capped by net.core.wmem_max): a 128 KiB
 * message must fit in the send buffer in one piece. */
const SNDBUF = 1024 * 1024;
const POLL_MS = 2;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A connected SOCK_SEQPACKET socket. */
export class SeqpacketSocket {
  #fd: number;
  readonly #buf = new Uint8Array(SEQPACKET_MAX_MSG + 1);

  constructor(fd: number) {
    this.#fd = fd;
    setSockOptInt(fd, SO_SNDBUF, SNDBUF);
  }

  /** Connects to `path`; throws SysError (ENOENT, ECONNREFUSED, EPROTOTYPE...). */
  static connect(path: string): SeqpacketSocket {
    const fd = unixSocket(SOCK_SEQPACKET, true);
    const r = connectRaw(fd, path);
    if (r < 0) {
      close(fd);
      throw new SysError("connect", -r, path);
    }
    return new SeqpacketSocket(fd);
  }

  /** Sends `msg` as one message, waiting while the send buffer is full. */
  async send(msg: Uint8Array, timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const n = sendWithFds(this.#fd, msg);
      if (n === msg.length) return;
      if (n >= 0) throw new Error(`seqpacket send: ${n} of ${msg.length} bytes`);
      if (n !== -EAGAIN) throw new SysError("sendmsg", -n, `${msg.length}-byte message`);
      if (Date.now() >= deadline) throw new Error(`seqpacket send: no room in ${timeoutMs} ms`);
      await sleep(POLL_MS);
    }
  }

  /** The next message (a copy), or null at EOF / connection reset. */
  async recv(timeoutMs = 30_000): Promise<Uint8Array | null> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const n = readRaw(this.#fd, this.#buf);
      if (n > SEQPACKET_MAX_MSG) throw new Error(`seqpacket recv: message > ${SEQPACKET_MAX_MSG}`);
      if (n > 0) return this.#buf.slice(0, n);
      if (n === 0) return null;
      if (n !== -EAGAIN) return null; // ECONNRESET and friends: the connection is gone
      if (Date.now() >= deadline) throw new Error(`seqpacket recv: nothing in ${timeoutMs} ms`);
      await sleep(POLL_MS);
    }
  }

  close(): void {
    if (this.#fd < 0) return;
    close(this.#fd);
    this.#fd = -1;
  }
}

/** A SOCK_SEQPACKET listener bound to `path` (a stale socket file is replaced). */
export class SeqpacketListener {
  #fd: number;

  constructor(readonly path: string) {
    try {
      if (Deno.lstatSync(path).isSocket) Deno.removeSync(path);
    } catch { /* no such file */ }
    const addr = sockaddrUn(path);
    const fd = unixSocket(SOCK_SEQPACKET, true);
    try {
      check("bind", sys.bind(fd, addr, addr.byteLength), path);
      check("listen", sys.listen(fd, 16), path);
    } catch (e) {
      close(fd);
      throw e;
    }
    this.#fd = fd;
  }

  /** The next connection. */
  async accept(timeoutMs = 30_000): Promise<SeqpacketSocket> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const fd = acceptRaw(this.#fd, true);
      if (fd >= 0) return new SeqpacketSocket(fd);
      if (fd !== -EAGAIN) throw new SysError("accept", -fd, this.path);
      if (Date.now() >= deadline) {
        throw new Error(`no connection on ${this.path} in ${timeoutMs} ms`);
      }
      await sleep(POLL_MS);
    }
  }

  close(): void {
    if (this.#fd < 0) return;
    close(this.#fd);
    this.#fd = -1;
    try {
      Deno.removeSync(this.path);
    } catch { /* gone */ }
  }
}

/**
 * Host -> guest seqpacket: connect to `<udsPath>.seqpacket`, send the message
 * `CONNECT <port>\n`, expect the message `OK <host-port>\n`. Throws with the reason when the
 * back end refuses (EOF instead of OK) or answers something else.
 */
export async function seqpacketHybridConnect(
  udsPath: string,
  port: number,
  timeoutMs = 10_000,
): Promise<{ sock: SeqpacketSocket; hostPort: number }> {
  const sock = SeqpacketSocket.connect(`${udsPath}.seqpacket`);
  try {
    await sock.send(new TextEncoder().encode(`CONNECT ${port}\n`));
    const reply = await sock.recv(timeoutMs);
    if (reply === null) throw new SeqpacketRefused(`CONNECT ${port}: closed by the back end`);
    const text = new TextDecoder().decode(reply);
    const m = /^OK (\d+)\n$/.exec(text);
    if (!m) throw new Error(`CONNECT ${port}: unexpected reply ${JSON.stringify(text)}`);
    return { sock, hostPort: Number(m[1]) };
  } catch (e) {
    sock.close();
    throw e;
  }
}

/** The back end closed the seqpacket hybrid connection instead of answering OK. */
export class SeqpacketRefused extends Error {
  override name = "SeqpacketRefused";
}
