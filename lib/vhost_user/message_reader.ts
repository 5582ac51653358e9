/**
 * Reads whole vhost-user messages off the non-blocking front-end socket.
 *
 * A message is a 12-byte header then `size` payload bytes; file descriptors
 * ride as SCM_RIGHTS on the header's bytes. The reader receives the header with
 * recvmsg (collecting fds), then the payload, keeping partial state across
 * EAGAIN so a slow or hostile front end cannot block the reactor. A `size`
 * beyond the largest legitimate payload is a protocol error (the connection is
 * dropped), so memory use stays bounded.
 */
import { EAGAIN, ECONNRESET, readRaw, recvWithFds } from "../../ffi/mod.ts";
import { decodeHeader } from "./messages.ts";
import { VHOST_USER_HDR_SIZE } from "./protocol.ts";
import { close } from "../../ffi/mod.ts";

/** Largest payload any request we accept may carry (memory table, config, inflight). */
export const MAX_MESSAGE_PAYLOAD = 4096;
/** Most fds we keep for one message; more is a protocol error. */
export const MAX_MESSAGE_FDS = 8;

export interface RawMessage {
  request: number;
  flags: number;
  payload: Uint8Array;
  fds: number[];
}

export type ReadResult =
  | { kind: "message"; message: RawMessage }
  | { kind: "again" }
  | { kind: "eof" }
  | { kind: "error"; reason: string };

export class MessageReader {
  readonly #header = new Uint8Array(VHOST_USER_HDR_SIZE);
  #headerLen = 0;
  #payload: Uint8Array | null = null;
  #payloadLen = 0;
  #request = 0;
  #flags = 0;
  #fds: number[] = [];

  constructor(readonly fd: number) {}

  /** Reads until one message is complete, or EAGAIN/EOF/error. */
  next(): ReadResult {
    while (this.#headerLen < VHOST_USER_HDR_SIZE) {
      const r = recvWithFds(
        this.fd,
        this.#header.subarray(this.#headerLen),
        VHOST_USER_HDR_SIZE - this.#headerLen,
      );
      if (typeof r === "number") {
        if (r === -EAGAIN) return { kind: "again" };
        // A front end that closes with replies unread resets the connection: between
        // messages that is its hang-up, like EOF.
        if (r === -ECONNRESET && this.#headerLen === 0) return this.#eof();
        return this.#fail(`recvmsg errno ${-r}`);
      }
      this.#fds.push(...r.fds);
      if (r.truncated) return this.#fail("file descriptors were truncated (MSG_CTRUNC)");
      if (this.#fds.length > MAX_MESSAGE_FDS) return this.#fail("too many file descriptors");
      if (r.n === 0) return this.#headerLen === 0 ? this.#eof() : this.#fail("EOF in a header");
      this.#headerLen += r.n;
      if (this.#headerLen === VHOST_USER_HDR_SIZE) {
        const h = decodeHeader(this.#header);
        if (h instanceof Error) return this.#fail(h.message);
        if (h.size > MAX_MESSAGE_PAYLOAD) {
          return this.#fail(`payload size ${h.size} exceeds ${MAX_MESSAGE_PAYLOAD}`);
        }
        this.#request = h.request;
        this.#flags = h.flags;
        this.#payload = new Uint8Array(h.size);
        this.#payloadLen = 0;
      }
    }
    const payload = this.#payload!;
    while (this.#payloadLen < payload.length) {
      const n = readRaw(
        this.fd,
        payload.subarray(this.#payloadLen),
        payload.length - this.#payloadLen,
      );
      if (n === -EAGAIN) return { kind: "again" };
      if (n < 0) return this.#fail(`read errno ${-n}`);
      if (n === 0) return this.#fail("EOF in the middle of a message");
      this.#payloadLen += n;
    }
    const message: RawMessage = {
      request: this.#request,
      flags: this.#flags,
      payload,
      fds: this.#fds,
    };
    this.#headerLen = 0;
    this.#payload = null;
    this.#fds = [];
    return { kind: "message", message };
  }

  /** Closes any fds received for a message not yet returned. */
  #discardFds(): void {
    for (const fd of this.#fds) close(fd);
    this.#fds = [];
  }

  #eof(): ReadResult {
    this.#discardFds();
    return { kind: "eof" };
  }

  #fail(reason: string): ReadResult {
    this.#discardFds();
    return { kind: "error", reason };
  }

  dispose(): void {
    this.#discardFds();
  }
}
