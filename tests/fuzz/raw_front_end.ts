/**
 * A raw vhost-user front end for hostile-input tests: whole or partial messages
 * (`docs/interop/vhost-user.rst` framing: a 12-byte header, then the payload, fds as
 * SCM_RIGHTS) go out exactly as given, and replies are read back without assuming they
 * answer any particular request, so a test can see stray, missing or out-of-order replies.
 *
 * Unlike `VhostUserChannel` (the well-behaved VMM's transport) nothing here throws on a
 * closed connection: a hostile front end expects to be hung up on, and reports it.
 */

import {
  close,
  connectUnix,
  EAGAIN,
  POLLERR,
  pollFds,
  POLLHUP,
  POLLIN,
  POLLOUT,
  recvWithFds,
  sendWithFds,
} from "../../ffi/mod.ts";
import { decodeHeader, isReply } from "../../lib/vhost_user/messages.ts";
import { VHOST_USER_HDR_SIZE, VHOST_USER_MAX_PAYLOAD_SIZE } from "../../lib/vhost_user/protocol.ts";

/** One reply read off the socket (its fds, if any, were closed). */
export interface RawReply {
  readonly request: number;
  readonly flags: number;
  readonly payload: Uint8Array;
}

/** How a wait for a reply ended. */
export type ReplyOutcome = "reply" | "closed" | "timeout" | "malformed";

/** A non-blocking connection to a back end's vhost-user socket. */
export class RawFrontEnd {
  #fd: number;
  readonly #buf = new Uint8Array(VHOST_USER_HDR_SIZE + VHOST_USER_MAX_PAYLOAD_SIZE);
  #have = 0;
  /** why the last `readUntil` returned "malformed" */
  malformed = "";

  constructor(path: string) {
    this.#fd = connectUnix(path);
  }

  get fd(): number {
    return this.#fd;
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  close(): void {
    if (this.#fd >= 0) close(this.#fd);
    this.#fd = -1;
  }

  /**
   * Sends all of `bytes` (the fds with the first part), waiting for room up to `timeoutMs`.
   * Returns "sent", "closed" (the back end hung up) or "full" (no room in time).
   */
  send(
    bytes: Uint8Array,
    fds: readonly number[] = [],
    timeoutMs = 1000,
  ): "sent" | "closed" | "full" {
    let off = 0;
    let first = true;
    const deadline = performance.now() + timeoutMs;
    while (off < bytes.length || (first && fds.length > 0)) {
      const n = sendWithFds(this.#fd, bytes.subarray(off), first ? fds : []);
      if (n === -EAGAIN) {
        const left = deadline - performance.now();
        if (left <= 0) return "full";
        pollFds([this.#fd], [POLLOUT], Math.max(1, Math.min(50, Math.ceil(left))));
        continue;
      }
      if (n < 0) return "closed";
      off += n;
      first = false;
    }
    return "sent";
  }

  /** One non-blocking send attempt: bytes sent, or -errno. */
  trySend(bytes: Uint8Array): number {
    return sendWithFds(this.#fd, bytes);
  }

  /** Whether the back end has hung up (POLLHUP/POLLERR, or EOF pending). */
  hungUp(timeoutMs = 0): boolean {
    const rev = pollFds([this.#fd], [POLLIN], timeoutMs)[0];
    return (rev & (POLLHUP | POLLERR)) !== 0;
  }

  /**
   * Reads replies until one answers `request` (returned last in `replies`), the connection
   * closes, `timeoutMs` passes, or a reply is malformed (see `malformed`).
   */
  readUntil(request: number, timeoutMs: number): { outcome: ReplyOutcome; replies: RawReply[] } {
    const replies: RawReply[] = [];
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      // Complete replies already buffered first.
      while (this.#have >= VHOST_USER_HDR_SIZE) {
        const h = decodeHeader(this.#buf.subarray(0, VHOST_USER_HDR_SIZE));
        if (h instanceof Error) return this.#bad(replies, h.message);
        if (!isReply(h.flags)) return this.#bad(replies, `no REPLY flag (flags 0x${h.flags})`);
        const len = VHOST_USER_HDR_SIZE + h.size;
        if (this.#have < len) break;
        const reply = {
          request: h.request,
          flags: h.flags,
          payload: this.#buf.slice(VHOST_USER_HDR_SIZE, len),
        };
        this.#buf.copyWithin(0, len, this.#have);
        this.#have -= len;
        replies.push(reply);
        if (h.request === request) return { outcome: "reply", replies };
      }
      const r = recvWithFds(this.#fd, this.#buf.subarray(this.#have));
      if (typeof r === "number") {
        if (r !== -EAGAIN) return { outcome: "closed", replies };
        const left = deadline - performance.now();
        if (left <= 0) return { outcome: "timeout", replies };
        pollFds([this.#fd], [POLLIN], Math.max(1, Math.ceil(left)));
        continue;
      }
      for (const fd of r.fds) close(fd);
      if (r.n === 0) return { outcome: "closed", replies };
      this.#have += r.n;
    }
  }

  #bad(replies: RawReply[], why: string): { outcome: ReplyOutcome; replies: RawReply[] } {
    this.malformed = why;
    return { outcome: "malformed", replies };
  }
}
