/**
 * The transport of the testing vhost-user front end: one connected Unix socket to the back
 * end, carrying whole messages (the 12-byte header of `docs/interop/vhost-user.rst` and its
 * payload) with file descriptors as SCM_RIGHTS.
 *
 * A request goes out in one `sendmsg` (retried while the send buffer is full, the fds on the
 * first part only). A reply is read with a synchronous `recvmsg` behind a `poll` timeout: the
 * back end is another process, so blocking this thread briefly costs nothing. The header is
 * checked with the back end's own codec (`decodeHeader`, `isReply`); timeouts, EOF and
 * malformed or mismatched replies throw `VhostUserError` naming the request.
 *
 * Which requests get a reply is protocol knowledge and lives in `vhost_user_client.ts`.
 */

import {
  close,
  EAGAIN,
  ECONNRESET,
  POLLERR,
  pollFds,
  POLLHUP,
  POLLIN,
  POLLOUT,
  recvWithFds,
  sendWithFds,
  SysError,
} from "../../ffi/mod.ts";
import { CodecError, decodeHeader, isReply } from "../vhost_user/messages.ts";
import {
  requestName,
  VHOST_USER_HDR_SIZE,
  VHOST_USER_MAX_PAYLOAD_SIZE,
  VHOST_USER_REPLY_MASK,
} from "../vhost_user/protocol.ts";

/** A failed vhost-user exchange: timeout, EOF, a malformed or unexpected reply, a NACK. */
export class VhostUserError extends Error {
  override name = "VhostUserError";
}

/** A reply as read from the socket. The caller owns `fds`. */
export interface VhostUserReply {
  readonly request: number;
  readonly flags: number;
  readonly payload: Uint8Array;
  readonly fds: number[];
}

/** One connection to a back end: whole messages out, replies in. */
export class VhostUserChannel {
  #sock: number;
  readonly #replyTimeoutMs: number;
  #repliesReceived = 0;
  /** bytes read from the socket but not yet consumed (a reply split across reads) */
  readonly #rxBuf = new Uint8Array(VHOST_USER_HDR_SIZE + VHOST_USER_MAX_PAYLOAD_SIZE);

  /** Takes ownership of the connected, non-blocking socket `sock`. */
  constructor(sock: number, replyTimeoutMs: number) {
    this.#sock = sock;
    this.#replyTimeoutMs = replyTimeoutMs;
  }

  /** The socket fd; -1 once closed. */
  get fd(): number {
    return this.#sock;
  }

  /** Replies read so far. */
  get repliesReceived(): number {
    return this.#repliesReceived;
  }

  /** The default reply timeout. */
  get replyTimeoutMs(): number {
    return this.#replyTimeoutMs;
  }

  /** Closes the socket. */
  close(): void {
    close(this.#sock);
    this.#sock = -1;
  }

  /** Whether bytes nobody asked for are waiting on the socket (a stray reply). */
  hasPendingInput(): boolean {
    return (pollFds([this.#sock], [POLLIN], 0)[0] & POLLIN) !== 0;
  }

  /** Sends the encoded message `msg` of request `req` with `fds`. */
  send(msg: Uint8Array, fds: readonly number[], req: number): void {
    let off = 0;
    let first = true;
    const deadline = Date.now() + this.#replyTimeoutMs;
    while (off < msg.length) {
      const n = sendWithFds(this.#sock, msg.subarray(off), first ? fds : []);
      if (n === -EAGAIN) {
        const left = deadline - Date.now();
        if (left <= 0) {
          throw new VhostUserError(`${requestName(req)}: socket send buffer full for too long`);
        }
        pollFds([this.#sock], [POLLOUT], Math.min(left, 100));
        continue;
      }
      if (n < 0) {
        throw new VhostUserError(
          `${requestName(req)}: send failed: ${new SysError("sendmsg", -n).message}` +
            " (the back end closed the connection?)",
        );
      }
      off += n;
      first = false;
    }
  }

  /** Reads exactly `len` bytes into #rxBuf[at..], collecting fds. */
  #recvExactly(at: number, len: number, fds: number[], req: number, deadline: number): void {
    let got = 0;
    while (got < len) {
      const r = recvWithFds(this.#sock, this.#rxBuf.subarray(at + got), len - got);
      if (typeof r === "number") {
        if (r === -ECONNRESET) {
          // A back end that closes the socket with our request unread resets it: a
          // disconnect like an EOF (e.g. a back end still serving another front end).
          for (const fd of fds) close(fd);
          throw new VhostUserError(
            `${requestName(req)}: the back end closed the connection before replying (reset)`,
          );
        }
        if (r !== -EAGAIN) {
          throw new VhostUserError(
            `${requestName(req)}: receive failed: ${new SysError("recvmsg", -r).message}`,
          );
        }
        const left = deadline - Date.now();
        if (left <= 0) {
          for (const fd of fds) close(fd);
          throw new VhostUserError(
            `${requestName(req)}: no reply from the back end within ${this.#replyTimeoutMs} ms`,
          );
        }
        const rev = pollFds([this.#sock], [POLLIN], Math.min(left, 1000))[0];
        if ((rev & (POLLHUP | POLLERR)) !== 0 && (rev & POLLIN) === 0) {
          throw new VhostUserError(
            `${requestName(req)}: the back end closed the connection before replying`,
          );
        }
        continue;
      }
      fds.push(...r.fds);
      if (r.n === 0) {
        for (const fd of fds) close(fd);
        throw new VhostUserError(
          `${requestName(req)}: the back end closed the connection before replying`,
        );
      }
      got += r.n;
    }
  }

  /** Reads the reply to `req`, waiting at most `timeoutMs`. */
  readReply(req: number, timeoutMs: number): VhostUserReply {
    const deadline = Date.now() + timeoutMs;
    const fds: number[] = [];
    this.#recvExactly(0, VHOST_USER_HDR_SIZE, fds, req, deadline);
    const fail = (why: string): never => {
      for (const fd of fds) close(fd);
      throw new VhostUserError(`${requestName(req)}: bad reply: ${why}`);
    };
    // decodeHeader checks the version, the flag bits and the payload size bound.
    const hdr = decodeHeader(this.#rxBuf.subarray(0, VHOST_USER_HDR_SIZE));
    if (hdr instanceof CodecError) return fail(hdr.message);
    const { request, flags, size } = hdr;
    if (!isReply(flags)) fail(`REPLY flag (0x${VHOST_USER_REPLY_MASK.toString(16)}) not set`);
    if (request !== req) fail(`it answers ${requestName(request)} (stray or out-of-order reply)`);
    this.#recvExactly(VHOST_USER_HDR_SIZE, size, fds, req, deadline);
    const payload = this.#rxBuf.slice(VHOST_USER_HDR_SIZE, VHOST_USER_HDR_SIZE + size);
    this.#repliesReceived++;
    return { request, flags, payload, fds };
  }
}
